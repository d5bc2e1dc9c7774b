//! Test support: the cached test guest pushed as a VM image to a real `docker-registry`
//! on loopback, a network namespace per test (every process in it is killed on drop),
//! and the node runtime run in-process as a node identity.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vzk_node::pods::PodControllerConfig;
use vzk_node::{NodeConfig, NodeController, PodController};
use vzk_provider::VmProvider;
use vzk_testenv::NodeIdentity;

pub use vzk_testenv::{Guest, Netns, Registry};

/// The test guest (scripts/build-test-guest.sh, cached by input hash under the shared
/// target tmp dir, so every test binary builds it once).
pub fn guest() -> &'static Guest {
    vzk_testenv::guest(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

/// Lays the guest out as a Linux VM image directory (kernel, initrd, disk.img, config.json).
pub fn guest_image_dir(dest: &Path) {
    guest().image_dir(dest);
}

/// Builds the busybox side-car image (`scripts/build-sidecar-image.sh`) as `tag`, pushes
/// it to `registry` and removes it locally, so a node has to pull it; returns its name.
pub fn push_sidecar_image(registry: &str, tag: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-sidecar-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args([tag, registry])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(image, format!("{registry}/{tag}"));
    let _ = Command::new("docker").args(["rmi", &image]).output();
    image
}

/// Ids of Docker containers (running or not) labelled with the pod UID.
pub fn docker_ids(uid: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=vz-kubelet.io/pod-uid={uid}"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
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
