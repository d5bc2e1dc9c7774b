//! Test support: a test's node ([`TestNode`]: the provider on QEMU with its VMs in a
//! network namespace of the test's own, every process in it killed on drop, and the node
//! runtime run in-process as a node identity), the cached test guest pushed as a VM image
//! to the test's own `docker-registry` on loopback.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vzk_core::streams::{AttachIo, ContainerRef};
use vzk_core::{PodLifecycle as _, ProviderError, StreamingRuntime as _};
use vzk_image::{PushOptions, Reference, RegistryOptions};
use vzk_node::pods::PodControllerConfig;
use vzk_node::{NodeConfig, NodeController, PodController};
use vzk_provider::{ProviderArgs, VmProvider};
use vzk_testenv::{ControlPlane, NodeIdentity};
use vzk_vm::Hypervisor;

pub use vzk_testenv::{Guest, Netns, Registry};

/// One test's node: its registry, data dir and netns, the provider on them run by an
/// in-process agent as node `<prefix>-<pid hex>`, and a fresh namespace `<prefix>-*`.
///
/// Destructure a binding, not the call (`let env = TestNode::start(..).await; let TestNode
/// { provider, .. } = env;`): the fields `..` leaves out of a temporary are dropped at
/// once, and a dropped [`Registry`] or [`Netns`] kills its processes. Fields drop in the
/// order they are declared: the agent and the provider before the netns (which kills the
/// VMs), that before the data dir, the registry last.
pub struct TestNode {
    pub cp: &'static ControlPlane,
    pub ns: String,
    pub admin: kube::Client,
    /// Pods and events of `ns`, as the admin.
    pub pods: Api<Pod>,
    pub events: Api<Event>,
    pub agent: Agent,
    pub provider: Arc<VmProvider>,
    /// What `provider` was started with (for [`restart_provider`]).
    pub provider_args: ProviderArgs,
    pub node: String,
    pub id: NodeIdentity,
    pub netns: Netns,
    /// The provider's data dir, under `tmp`.
    pub data: PathBuf,
    pub tmp: tempfile::TempDir,
    pub registry: Registry,
}

impl TestNode {
    /// Starts the node, its provider with [`args`] changed by `tweak`.
    pub async fn start(prefix: &str, tweak: impl FnOnce(&mut ProviderArgs)) -> TestNode {
        Self::start_on(prefix, tweak, |hv| hv).await
    }

    /// [`TestNode::start`] with the provider's hypervisor (QEMU) seen through `wrap`.
    pub async fn start_on(
        prefix: &str,
        tweak: impl FnOnce(&mut ProviderArgs),
        wrap: impl FnOnce(Arc<dyn Hypervisor>) -> Arc<dyn Hypervisor>,
    ) -> TestNode {
        let cp = ControlPlane::shared();
        let registry = Registry::start();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let netns = Netns::new();
        let node = format!("{prefix}-{:06x}", std::process::id());
        let id = cp.node_identity(&node);
        let mut provider_args = args(&data, &registry.addr);
        tweak(&mut provider_args);
        let provider = start_provider_on(provider_args.clone(), &netns, &id, wrap).await;
        let agent = Agent::start(&id, provider.clone()).await;
        let ns = cp.create_namespace(prefix).await;
        let admin = cp.admin_client().await;
        TestNode {
            cp,
            pods: Api::namespaced(admin.clone(), &ns),
            events: Api::namespaced(admin.clone(), &ns),
            ns,
            admin,
            agent,
            provider,
            provider_args,
            node,
            id,
            netns,
            data,
            tmp,
            registry,
        }
    }

    /// Pushes the test guest to the node's registry as `vzk/<name>:v1`, with
    /// `extra_cmdline` appended to its kernel command line; returns the image.
    pub async fn push_guest(&self, name: &str, extra_cmdline: &str) -> String {
        let dir = self.tmp.path().join("images").join(name);
        guest_image_dir(&dir);
        if !extra_cmdline.is_empty() {
            let p = dir.join("config.json");
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let cmdline = format!("{} {extra_cmdline}", cfg["kernelCmdline"].as_str().unwrap());
            cfg["kernelCmdline"] = cmdline.into();
            std::fs::write(&p, cfg.to_string()).unwrap();
        }
        let image = format!("{}/vzk/{name}:v1", self.registry.addr);
        let opts = PushOptions {
            registry: RegistryOptions {
                plain_http: true,
                ..Default::default()
            },
            ..Default::default()
        };
        vzk_image::push(&dir, &Reference::parse(&image).unwrap(), &opts)
            .await
            .unwrap();
        image
    }
}

/// The provider's flags in a test: one VM slot, the test's registry over plain HTTP, the
/// test guest's SSH user and key.
pub fn args(data: &Path, registry: &str) -> ProviderArgs {
    let mut a = ProviderArgs::new(data);
    a.max_vms = 1;
    a.insecure_registries = vec![registry.to_owned()];
    a.ssh_user = Some("root".into());
    a.ssh_private_key_path = Some(guest().openssh_key.clone());
    a.ready_timeout_secs = 150;
    a
}

/// The provider on this host's backend (QEMU, its VMs in `netns`), as `vz-kubelet run`
/// builds it, as node `id`.
pub async fn start_provider(a: ProviderArgs, netns: &Netns, id: &NodeIdentity) -> Arc<VmProvider> {
    start_provider_on(a, netns, id, |hv| hv).await
}

/// [`start_provider`] with the hypervisor seen through `wrap`.
pub async fn start_provider_on(
    a: ProviderArgs,
    netns: &Netns,
    id: &NodeIdentity,
    wrap: impl FnOnce(Arc<dyn Hypervisor>) -> Arc<dyn Hypervisor>,
) -> Arc<VmProvider> {
    let backend = vzk_backend::BackendArgs {
        vm_netns: Some(netns.name.clone()),
        ..Default::default()
    };
    let hv = vzk_backend::open(&backend, &a.data_dir.join("qemu"))
        .await
        .unwrap();
    let client = id.client().await;
    VmProvider::new(
        a,
        &id.node_name,
        "127.0.0.1".parse().unwrap(),
        client,
        wrap(hv),
    )
    .await
    .unwrap()
}

/// An agent restart: `agent` stopped as a kill would (VMs and side-cars keep running),
/// `provider` dropped, and a second later a new provider started with `a` as node `id`
/// (on the same data dir and netns); its agent is not started yet.
pub async fn restart_provider(
    agent: Agent,
    provider: Arc<VmProvider>,
    a: ProviderArgs,
    netns: &Netns,
    id: &NodeIdentity,
) -> Arc<VmProvider> {
    agent.stop().await;
    drop(provider);
    tokio::time::sleep(Duration::from_secs(1)).await;
    start_provider(a, netns, id).await
}

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

/// Deletes pod `name` with `grace` seconds and waits, up to `timeout`, until its object
/// is gone.
pub async fn delete_pod(pods: &Api<Pod>, name: &str, grace: u32, timeout: Duration) {
    let dp = DeleteParams {
        grace_period_seconds: Some(grace),
        ..Default::default()
    };
    pods.delete(name, &dp).await.unwrap();
    wait_for(timeout, &format!("{name} gone"), || async {
        pods.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// Waits, up to `timeout`, until `provider` lists no pod (its cleanup follows the
/// objects' removal).
pub async fn wait_all_released(provider: &VmProvider, timeout: Duration) {
    wait_for(timeout, "every pod released by the provider", || async {
        provider.list_pods().await.ok()?.is_empty().then_some(())
    })
    .await;
}

/// What the API server's TokenReview says of `token`.
pub async fn review_token(admin: &kube::Client, token: &str) -> TokenReviewStatus {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: None,
        },
        ..Default::default()
    };
    let review = Api::<TokenReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    review.status.unwrap()
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

/// Runs `argv` in container `c` (stdout captured, no stdin, no TTY): its exit code and
/// its output.
pub async fn exec_argv(
    provider: &VmProvider,
    c: &ContainerRef,
    argv: &[&str],
) -> Result<(i32, String), ProviderError> {
    let out = Capture::default();
    let io = AttachIo {
        stdin: None,
        stdout: Some(Box::pin(out.clone())),
        stderr: None,
        tty: false,
        resize: None,
    };
    let argv = argv.iter().map(|a| (*a).to_owned()).collect();
    let status = provider.exec(c, argv, io).await?;
    Ok((status.code, out.text()))
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

/// `(reason, message)` of the events regarding pod `name`.
pub async fn events_of(events: &Api<Event>, name: &str) -> Vec<(String, String)> {
    let list = events.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.reason.clone().unwrap_or_default(),
                e.note.clone().unwrap_or_default(),
            )
        })
        .collect()
}

pub async fn wait_event(
    events: &Api<Event>,
    name: &str,
    reason: &str,
    timeout: Duration,
) -> String {
    wait_for(timeout, &format!("event {reason} of {name}"), || async {
        events_of(events, name)
            .await
            .into_iter()
            .find(|(r, _)| r == reason)
            .map(|(_, m)| m)
    })
    .await
}

/// Files named `name` under `dir`, at any depth.
pub fn walk(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

pub fn sha256_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}
