//! Shared helpers of the QEMU integration tests and the boot benchmark: a network
//! namespace per test (everything, including QEMU and dnsmasq, runs inside it and is
//! killed when the guard drops, even on panic), the cached test guest, and SSH through
//! dropbear's `dbclient`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vzk_vm::{BootSpec, DiskFormat, DiskSpec, MacAddr, NetworkAttachment, NicSpec, VmSpec};

/// The test guest files (built once per test binary by scripts/build-test-guest.sh).
#[derive(Debug, Clone)]
pub struct Guest {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    pub key: PathBuf,
    pub cmdline: String,
}

pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        // Integration tests get CARGO_TARGET_TMPDIR; the benchmark example does not.
        let tmp = option_env!("CARGO_TARGET_TMPDIR")
            .unwrap_or(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tmp"));
        let dir = PathBuf::from(tmp).join("vzk-test-guest");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .expect("run build-test-guest.sh");
        assert!(
            out.status.success(),
            "building the test guest failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .unwrap()
            .trim()
            .to_owned();
        Guest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.gz"),
            disk: dir.join("disk.raw"),
            key: dir.join("id_ed25519"),
            cmdline,
            dir,
        }
    })
}

fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A network namespace owned by one test. Drop kills every process in it, then deletes it.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = format!("vzk-{}", random_suffix());
        run(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a new thread inside the namespace, with its own current-thread tokio
    /// runtime (sockets, TAPs and children it creates all live in the namespace).
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(f())
        });
        match handle.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill everything in the namespace (QEMU, dnsmasq, stray clients), then delete it.
        for _ in 0..3 {
            let out = Command::new("ip")
                .args(["netns", "pids", &self.name])
                .output();
            let pids: Vec<String> = out
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if pids.is_empty() {
                break;
            }
            for p in &pids {
                let _ = Command::new("kill").args(["-9", p]).status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A linux-kernel spec for the test guest with one NIC and a qcow2 overlay over the
/// guest's disk (created in `state`).
pub fn guest_spec(
    id: &str,
    state: &Path,
    attachment: NetworkAttachment,
    extra_cmdline: &str,
) -> VmSpec {
    let g = guest();
    let overlay = state.join(format!("{id}.qcow2"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&g.disk)
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    VmSpec {
        id: id.into(),
        cpus: 1,
        memory_bytes: 256 << 20,
        boot: BootSpec::LinuxKernel {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            cmdline: format!("{} {extra_cmdline}", g.cmdline),
        },
        disks: vec![DiskSpec {
            path: overlay,
            read_only: false,
            format: DiskFormat::Qcow2,
        }],
        nics: vec![NicSpec {
            mac: MacAddr::random(),
            attachment,
        }],
        shared_dirs: vec![],
        console_log: Some(state.join(format!("{id}.console.log"))),
        snapshot: None,
    }
}

/// Runs `argv` in the guest over SSH (dbclient, key auth, host key accepted).
/// Must be called from inside the namespace.
pub async fn ssh(ip: Ipv4Addr, command: &str) -> Output {
    tokio::process::Command::new("dbclient")
        .args(["-y", "-y", "-i"])
        .arg(&guest().key)
        .args(["-o", "ConnectTimeout=10"])
        .arg(format!("root@{ip}"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

/// Waits until TCP port 22 of `ip` accepts and a trivial SSH command succeeds.
pub async fn wait_ssh(ip: Ipv4Addr, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < timeout,
            "SSH on {ip} not ready after {timeout:?}"
        );
        let addr = std::net::SocketAddr::from((ip, 22));
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            let ok = tokio::process::Command::new("dbclient")
                .args(["-y", "-y", "-i"])
                .arg(&guest().key)
                .arg(format!("root@{ip}"))
                .arg("true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ok {
                return start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until TCP port 22 of `ip` accepts connections (sshd listening).
pub async fn wait_port(ip: Ipv4Addr, timeout: Duration) -> Duration {
    let start = Instant::now();
    let addr = std::net::SocketAddr::from((ip, 22));
    loop {
        assert!(
            start.elapsed() < timeout,
            "port 22 on {ip} not open after {timeout:?}"
        );
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `path` contains `needle`; returns the time it took.
pub async fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{} lacks {needle:?} after {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
