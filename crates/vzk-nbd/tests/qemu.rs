//! The server against real QEMU tools: `qemu-img` / `qemu-io` from Debian's qemu-utils.
#![allow(clippy::unwrap_used)]

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use vzk_nbd::{Export, ServerOptions, serve};

const SIZE: usize = 64 << 20;
const MIB: usize = 1 << 20;

struct Mem(Vec<u8>);

#[async_trait::async_trait]
impl Export for Mem {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
}

/// A writable export in memory; logs the calls that change it or flush it.
struct MemRw {
    data: Mutex<Vec<u8>>,
    log: Mutex<Vec<Call>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read(u64),
    Write(u64),
    WriteZeroes(u64),
    Flush,
}

impl MemRw {
    fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Export for MemRw {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.log.lock().unwrap().push(Call::Read(offset));
        let start = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[start..start + buf.len()]);
        Ok(())
    }
    fn writable(&self) -> bool {
        true
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.log.lock().unwrap().push(Call::Write(offset));
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        self.log.lock().unwrap().push(Call::Flush);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Call::WriteZeroes(offset));
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + len as usize].fill(0);
        Ok(())
    }
}

/// Pseudo-random bytes (xorshift64), so misplaced blocks cannot compare equal.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a QEMU tool on a blocking thread (the server keeps running on the runtime); returns stdout.
async fn run(program: &str, args: Vec<String>) -> String {
    let shown = format!("{program} {}", args.join(" "));
    let out = tokio::task::spawn_blocking({
        let program = program.to_owned();
        move || Command::new(program).args(args).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Parses a `qemu-io -c 'read -v …'` hex dump (`00200000:  3f a1 …  ascii`).
fn hex_dump(out: &str) -> Vec<u8> {
    out.lines()
        .filter_map(|line| line.split_once(":  "))
        .filter(|(addr, _)| addr.len() == 8 && addr.chars().all(|c| c.is_ascii_hexdigit()))
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .take(16)
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn convert(url: &str, out: &Path, format: &str) -> Vec<u8> {
    let out = out.to_str().unwrap();
    run(
        "qemu-img",
        args(&["convert", "-f", format, "-O", "raw", url, out]),
    )
    .await;
    std::fs::read(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_and_overlays_the_export() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        println!("qemu-img not found: skipping the QEMU integration test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let data = random_bytes(SIZE);
    let export = Arc::new(Mem(data.clone()));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        UnixListener::bind(&socket).unwrap(),
        export,
        ServerOptions::default(),
        shutdown.clone(),
    ));
    let sock = socket.to_str().unwrap();
    let url = format!("nbd+unix:///disk?socket={sock}");
    let default_url = format!("nbd+unix://?socket={sock}");

    // Whole-export copies, by name and through the default (empty) export name.
    let copied = convert(&url, &dir.path().join("out.raw"), "raw").await;
    assert!(
        copied == data,
        "qemu-img convert of the export differs from the export"
    );
    let copied = convert(&default_url, &dir.path().join("default.raw"), "raw").await;
    assert!(
        copied == data,
        "qemu-img convert of the default export differs from the export"
    );

    // A qcow2 overlay backed by the export takes writes; reads elsewhere go through to the export.
    let overlay = dir.path().join("overlay.qcow2");
    let overlay = overlay.to_str().unwrap();
    run(
        "qemu-img",
        args(&["create", "-f", "qcow2", "-F", "raw", "-b", &url, overlay]),
    )
    .await;
    run(
        "qemu-io",
        args(&["-f", "qcow2", "-c", "write -P 0xab 0 1M", overlay]),
    )
    .await;
    let out = run(
        "qemu-io",
        args(&[
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -v 2M 512",
            overlay,
        ]),
    )
    .await;
    assert_eq!(
        hex_dump(&out),
        data[2 * MIB..2 * MIB + 512],
        "read-through bytes:\n{out}"
    );

    let merged = convert(overlay, &dir.path().join("merged.raw"), "qcow2").await;
    assert_eq!(merged.len(), SIZE);
    assert!(
        merged[..MIB].iter().all(|&b| b == 0xab),
        "overlay write lost"
    );
    assert!(
        merged[MIB..] == data[MIB..],
        "overlay does not read through to the export"
    );

    // The export itself is unchanged.
    let again = convert(&default_url, &dir.path().join("again.raw"), "raw").await;
    assert!(again == data, "the export changed");

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_writes_to_a_writable_export() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        println!("qemu-img not found: skipping the QEMU integration test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let data = random_bytes(SIZE);
    let export = Arc::new(MemRw {
        data: Mutex::new(data.clone()),
        log: Mutex::default(),
    });
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        UnixListener::bind(&socket).unwrap(),
        export.clone(),
        ServerOptions::default(),
        shutdown.clone(),
    ));
    let url = format!("nbd+unix:///disk?socket={}", socket.to_str().unwrap());
    let mut model = data.clone();

    // Write, read back (qemu-io fails on a pattern mismatch), flush.
    run(
        "qemu-io",
        args(&[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0xab 4096 65536",
            "-c",
            "read -P 0xab 4096 65536",
            "-c",
            "flush",
        ]),
    )
    .await;
    model[4096..4096 + 65536].fill(0xab);
    assert!(
        *export.data.lock().unwrap() == model,
        "the export does not hold exactly the write"
    );
    let calls = export.calls();
    let write = calls.iter().position(|&c| c == Call::Write(4096));
    assert!(
        write.is_some_and(|w| calls[w..].contains(&Call::Flush)),
        "no flush after the write: {calls:?}"
    );

    // Write zeroes (NBD_CMD_WRITE_ZEROES) and writes without then with FUA (qemu-io's default
    // cache mode, writethrough, would make every write FUA): the FUA write is flushed before its
    // reply, so before the read that follows it; the plain one is not.
    let (write_zeroes, plain, fua) = (MIB as u64, 2 * MIB as u64, 3 * MIB as u64);
    export.log.lock().unwrap().clear();
    run(
        "qemu-io",
        args(&[
            "-f",
            "raw",
            "-t",
            "writeback",
            &url,
            "-c",
            "write -z 1M 65536",
            "-c",
            "write -P 0xee 2M 4096",
            "-c",
            "read -P 0xee 2M 4096",
            "-c",
            "write -f -P 0xcd 3M 4096",
            "-c",
            "read -P 0xcd 3M 4096",
            "-c",
            "read -P 0 1M 65536",
        ]),
    )
    .await;
    let calls = export.calls();
    let after = |call: Call| {
        let at = calls.iter().position(|&c| c == call);
        at.and_then(|at| calls.get(at + 1)).copied()
    };
    assert!(
        calls.contains(&Call::WriteZeroes(write_zeroes)),
        "no NBD_CMD_WRITE_ZEROES: {calls:?}"
    );
    assert_eq!(
        after(Call::Write(plain)),
        Some(Call::Read(plain)),
        "{calls:?}"
    );
    assert_eq!(after(Call::Write(fua)), Some(Call::Flush), "{calls:?}");
    model[MIB..MIB + 65536].fill(0);
    model[2 * MIB..2 * MIB + 4096].fill(0xee);
    model[3 * MIB..3 * MIB + 4096].fill(0xcd);

    // Unwritten regions still read as the original bytes, through qemu-io and qemu-img.
    let out = run(
        "qemu-io",
        args(&[
            "-f",
            "raw",
            "-r",
            &url,
            "-c",
            "read -v 0 512",
            "-c",
            "read -v 5M 512",
        ]),
    )
    .await;
    let mut expected = data[..512].to_vec();
    expected.extend_from_slice(&data[5 * MIB..5 * MIB + 512]);
    assert_eq!(hex_dump(&out), expected, "unwritten bytes:\n{out}");
    let copied = convert(&url, &dir.path().join("out.raw"), "raw").await;
    assert!(
        copied == model,
        "qemu-img convert of the export differs from the writes"
    );
    assert!(*export.data.lock().unwrap() == model);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
