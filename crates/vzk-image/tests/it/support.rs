//! Test support: a real `docker-registry` on a free loopback port, image directories
//! with realistic content, and a TCP proxy that can drop a connection mid-blob.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub(crate) const USER: &str = "alice";
pub(crate) const PASS: &str = "s3cret";

pub(crate) use vzk_testenv::Registry as TestRegistry;

/// A real `docker-registry` on loopback, with htpasswd auth ([`USER`]/[`PASS`]) or without.
pub(crate) fn registry(auth: bool) -> TestRegistry {
    if auth {
        TestRegistry::with_auth(USER, PASS)
    } else {
        TestRegistry::start()
    }
}

/// Registry access over plain HTTP (the test registries' loopback addresses).
pub(crate) fn plain() -> vzk_image::RegistryOptions {
    vzk_image::RegistryOptions {
        plain_http: true,
        ..Default::default()
    }
}

/// Pull options over plain HTTP, otherwise the defaults.
pub(crate) fn pull_opts() -> vzk_image::PullOptions {
    vzk_image::PullOptions {
        plain_http: true,
        ..Default::default()
    }
}

/// Deterministic pseudo-random bytes.
pub(crate) fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Compressible text.
pub(crate) fn text_bytes(n: usize) -> Vec<u8> {
    let words = [
        "kubelet ", "virtual ", "machine ", "apple ", "qemu ", "disk ", "image ", "pod\n",
        "lorem ", "ipsum ",
    ];
    let mut v = Vec::with_capacity(n + 16);
    let mut i = 0usize;
    while v.len() < n {
        v.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        i += 1;
    }
    v.truncate(n);
    v
}

/// Write a disk of `size` bytes: zero extents, random and text regions, sparse where zero.
pub(crate) fn write_disk(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).expect("create disk");
    f.set_len(size).expect("set_len");
    use std::os::unix::fs::FileExt as _;
    let block = 1u64 << 20;
    let mut off = 0;
    let mut i = seed;
    while off < size {
        let n = block.min(size - off) as usize;
        match i % 10 {
            0..=3 => {} // zero
            4..=6 => f.write_all_at(&random_bytes(i, n), off).expect("write"),
            _ => f.write_all_at(&text_bytes(n), off).expect("write"),
        }
        off += n as u64;
        i += 1;
    }
}

/// Flips 64 bytes in the middle of the largest disk chunk of the vzk image `m`, in the
/// registry's storage (which serves it as it is); returns that chunk's digest.
pub(crate) fn tamper_largest_disk_chunk(
    reg: &TestRegistry,
    m: &vzk_image::manifest::Manifest,
) -> String {
    let victim = m
        .layers
        .iter()
        .filter(|l| l.media_type == vzk_image::media_types::VZK_DISK)
        .max_by_key(|l| l.size)
        .expect("a disk chunk");
    let path = reg.blob_path(&victim.digest);
    let mut bytes = std::fs::read(&path).expect("blob");
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).expect("tamper");
    victim.digest.clone()
}

/// A Linux image directory: kernel, initrd, disk.img, config.json.
pub(crate) fn linux_image(dir: &Path, disk_size: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("kernel"), random_bytes(1, 300_000)).expect("kernel");
    std::fs::write(dir.join("initrd"), text_bytes(200_001)).expect("initrd");
    write_disk(&dir.join("disk.img"), disk_size, 3);
    std::fs::write(
        dir.join("config.json"),
        r#"{"mediatype":"application/vnd.vz-kubelet.vm.config.v1+json","os":"linux","arch":"amd64","kernelCmdline":"console=ttyS0 root=/dev/vda rw","cpus":1,"memoryBytes":268435456}"#,
    )
    .expect("config");
}

/// A macOS image directory: disk.img, aux.img, config.json (reference example config).
pub(crate) fn macos_image(dir: &Path, disk_size: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write_disk(&dir.join("disk.img"), disk_size, 5);
    let mut aux = vec![0u8; 33570816 / 16];
    aux[..4096].copy_from_slice(&random_bytes(9, 4096));
    std::fs::write(dir.join("aux.img"), aux).expect("aux");
    std::fs::write(dir.join("config.json"), MACOS_CONFIG).expect("config");
}

pub(crate) const MACOS_CONFIG: &str = r#"{
    "mediatype": "application/vnd.agoda.macosvz.config.v1+json",
    "os": "darwin",
    "hardwareModelData": "YnBsaXN0MDDTAQIDBAUGXxAZRGF0YVJlcHJlc2VudGF0aW9uVmVyc2lvbl8QD1BsYXRmb3JtVmVyc2lvbl8QEk1pbmltdW1TdXBwb3J0ZWRPUxQAAAAAAAAAAAAAAAAAAAABEAKjBwgIEA0QAAgPKz1SY2VpawAAAAAAAAEBAAAAAAAAAAkAAAAAAAAAAAAAAAAAAABt",
    "machineIdData": "YnBsaXN0MDDRAQJURUNJRBMWYaHTD7Jo1QgLEAAAAAAAAAEBAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAZ",
    "storage": [
        { "mediatype": "application/vnd.agoda.macosvz.disk.image.v1", "file": "disk.img" },
        { "mediatype": "application/vnd.agoda.macosvz.aux.image.v1", "file": "aux.img" }
    ]
}"#;

pub(crate) fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).expect("open");
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

pub(crate) fn assert_same_file(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::metadata(a).expect("a").len(),
        std::fs::metadata(b).expect("b").len(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    assert_eq!(
        sha256_file(a),
        sha256_file(b),
        "{} vs {}",
        a.display(),
        b.display()
    );
}

/// A TCP proxy in front of `upstream`. Once armed, it cuts the first connection whose
/// response stream passes `cut_after` bytes (once). Counts response bytes.
pub(crate) struct DropProxy {
    pub(crate) addr: String,
    pub(crate) response_bytes: Arc<AtomicU64>,
    pub(crate) cuts: Arc<AtomicU64>,
}

impl DropProxy {
    pub(crate) async fn start(upstream: String, cut_after: Option<u64>) -> DropProxy {
        DropProxy::start_with(upstream, cut_after, None).await
    }

    /// Like `start`, sleeping `delay` after every 16 KiB of response (a slow network).
    pub(crate) async fn start_with(
        upstream: String,
        cut_after: Option<u64>,
        delay: Option<Duration>,
    ) -> DropProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let response_bytes = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicU64::new(0));
        let armed = Arc::new(AtomicBool::new(cut_after.is_some()));
        let (rb, c) = (response_bytes.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let (rb, c, armed) = (rb.clone(), c.clone(), armed.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut buf = vec![0u8; 16 << 10];
                        let mut seen = 0u64;
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            seen += n as u64;
                            if let Some(limit) = cut_after
                                && seen > limit
                                && armed.swap(false, Ordering::SeqCst)
                            {
                                c.fetch_add(1, Ordering::SeqCst);
                                return; // drop both sides mid-response
                            }
                            rb.fetch_add(n as u64, Ordering::SeqCst);
                            if let Some(d) = delay {
                                tokio::time::sleep(d).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        DropProxy {
            addr,
            response_bytes,
            cuts,
        }
    }
}
