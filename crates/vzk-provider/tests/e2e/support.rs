//! Test support: the cached test guest pushed as a VM image to a real `docker-registry`
//! on loopback, a network namespace per test (every process in it is killed on drop),
//! and the node runtime run in-process as a node identity.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vzk_node::pods::PodControllerConfig;
use vzk_node::{NodeConfig, NodeController, PodController};
use vzk_provider::VmProvider;
use vzk_testenv::NodeIdentity;

/// The test guest (scripts/build-test-guest.sh, cached by input hash and shared with
/// the vzk-vm tests) plus an OpenSSH copy of its root key.
pub struct Guest {
    pub dir: PathBuf,
    pub openssh_key: PathBuf,
}

pub fn guest() -> &'static Guest {
    static G: OnceLock<Guest> = OnceLock::new();
    G.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vzk-test-guest");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build-test-guest.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let openssh_key =
            std::env::temp_dir().join(format!("vzk-provider-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&openssh_key);
        let out = Command::new("dropbearconvert")
            .args(["dropbear", "openssh"])
            .arg(dir.join("id_ed25519"))
            .arg(&openssh_key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dropbearconvert: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Guest { dir, openssh_key }
    })
}

/// Lays the guest out as a Linux VM image directory (kernel, initrd, disk.img, config.json).
pub fn guest_image_dir(dest: &Path) {
    let g = guest();
    std::fs::create_dir_all(dest).unwrap();
    for (from, to) in [
        ("vmlinuz", "kernel"),
        ("initramfs.gz", "initrd"),
        ("disk.raw", "disk.img"),
    ] {
        std::fs::copy(g.dir.join(from), dest.join(to)).unwrap();
    }
    let cmdline = std::fs::read_to_string(g.dir.join("cmdline")).unwrap();
    let config = serde_json::json!({
        "mediatype": "application/vnd.vz-kubelet.vm.config.v1+json",
        "os": "linux", "arch": "amd64",
        "kernelCmdline": cmdline.trim(),
        "cpus": 1, "memoryBytes": 256u64 << 20,
    });
    std::fs::write(dest.join("config.json"), config.to_string()).unwrap();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` on a free loopback port, killed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace owned by one test. Drop kills every process in it, then deletes it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = format!("vzkp-{:08x}", rand_u32());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        let _ = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status();
        Self { name }
    }

    /// Whether a link named `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
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

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// Pids of processes whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c).contains(needle)
            && pid != std::process::id() as i32
        {
            out.push(pid);
        }
    }
    out
}

/// A running in-process agent (node + pod controllers) for a provider.
pub struct Agent {
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    pub async fn start(id: &NodeIdentity, provider: Arc<VmProvider>) -> Agent {
        let client = id.client().await;
        let mut config = NodeConfig::new(&id.node_name);
        config.kubelet_port = 10250;
        config.status_check_interval = Duration::from_secs(2);
        config.lease_renew_interval = Duration::from_secs(2);
        config.validate().unwrap();
        let token = CancellationToken::new();
        let node = NodeController::new(client.clone(), config.clone(), provider.clone());
        let mut pc = PodControllerConfig::new(&config.node_name, config.internal_ip.to_string());
        pc.retry_delay = Duration::from_secs(1);
        pc.allocatable = BTreeMap::from([
            ("cpu".into(), 2.0),
            ("memory".into(), 8.0 * (1u64 << 30) as f64),
        ]);
        let pods = PodController::new(client, pc, provider);
        let (t1, t2) = (token.clone(), token.clone());
        let tasks = vec![
            tokio::spawn(async move { node.run(t1).await }),
            tokio::spawn(async move {
                if let Err(e) = pods.run(t2).await {
                    panic!("pod controller failed: {e}");
                }
            }),
        ];
        Agent { token, tasks }
    }

    /// Stops the agent as a kill would (VMs keep running).
    pub async fn stop(self) {
        self.token.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An in-memory writer for exec output.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
