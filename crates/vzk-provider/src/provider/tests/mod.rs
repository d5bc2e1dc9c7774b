//! The provider's rules with fake backends ([`super::fakes`]) under tokio's paused
//! clock: no root, QEMU, dockerd or API server, and minutes of back-off in milliseconds.
//! Each test drives the provider through `PodLifecycle` as the node runtime does and
//! reads what it reports (statuses, events) and what it asked the backends to do.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use tokio::time::Instant;
use vzk_core::{PodEvent, PodKey, PodLifecycle, PodNotifier, PodUpdate};

use super::fakes::{TestEngine, TestHv, TestImages};
use super::{Backends, VmProvider};
use crate::args::ProviderArgs;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: ProviderArgs,
}

struct Harness {
    provider: Arc<VmProvider>,
    hv: Arc<TestHv>,
    images: Arc<TestImages>,
    engine: Arc<TestEngine>,
    events: Arc<Mutex<Vec<(Instant, PodEvent)>>>,
    dir: tempfile::TempDir,
}

struct Opts {
    max_vms: u32,
    ready_timeout_secs: u64,
    acpi: bool,
    /// Side-car and init containers run in the fake engine (else: no engine).
    engine: bool,
    /// The backend is Virtualization.framework-like (macOS boots).
    mac_host: bool,
    /// That backend attaches NBD disks (macOS 14+).
    mac_nbd: bool,
    /// The image is macOS, with this `config.json`.
    mac_image: Option<serde_json::Value>,
    /// More flags.
    extra_args: Vec<String>,
    /// Pods a previous agent recorded (their VMs are gone, as after a host reboot).
    recorded: Vec<Pod>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            max_vms: 2,
            ready_timeout_secs: 3600,
            acpi: true,
            engine: false,
            mac_host: false,
            mac_nbd: false,
            mac_image: None,
            extra_args: Vec::new(),
            recorded: Vec::new(),
        }
    }
}

async fn harness(o: Opts) -> Harness {
    try_harness(o).await.unwrap()
}

async fn try_harness(o: Opts) -> Result<Harness, crate::ProviderInitError> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = Cli::try_parse_from(
        [
            "x".to_owned(),
            "--data-dir".into(),
            data.display().to_string(),
            "--max-vms".into(),
            o.max_vms.to_string(),
            "--ssh-user".into(),
            "admin".into(),
            "--ssh-password".into(),
            "admin".into(),
            "--ready-timeout-secs".into(),
            o.ready_timeout_secs.to_string(),
        ]
        .into_iter()
        .chain(o.extra_args),
    )
    .unwrap()
    .args;
    // Never used: the test pods reference no Secret or ConfigMap.
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let hv = Arc::new(if o.mac_host {
        TestHv::mac(o.mac_nbd)
    } else {
        TestHv::new(o.acpi)
    });
    let image_dir = dir.path().join("image");
    let images = Arc::new(match o.mac_image {
        Some(config) => TestImages::mac(&image_dir, hv.log.clone(), config),
        None => TestImages::new(&image_dir, hv.log.clone()),
    });
    let engine = Arc::new(TestEngine::new(hv.log.clone()));
    for p in &o.recorded {
        let key = PodKey::of(p).unwrap();
        let dir = data.join("pods").join(&key.uid);
        std::fs::create_dir_all(&dir).unwrap();
        crate::record::PodRecord::new(&key, p, "2026-01-01T00:00:00Z".into())
            .save(&dir.join("pod.json"))
            .unwrap();
    }
    let backends = Backends {
        hypervisor: hv.clone(),
        images: images.clone(),
        containers: if o.engine {
            crate::sidecars::Containers::Engine(engine.clone())
        } else {
            crate::sidecars::Containers::None
        },
    };
    let provider = VmProvider::with_backends(
        args,
        "fake-node",
        "127.0.0.1".parse().unwrap(),
        client,
        backends,
    )
    .await?;
    let (notifier, mut rx) = PodNotifier::channel();
    provider.set_notifier(notifier);
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            if let PodUpdate::Event { event, .. } = u {
                ev.lock().unwrap().push((Instant::now(), event));
            }
        }
    });
    Ok(Harness {
        provider,
        hv,
        images,
        engine,
        events,
        dir,
    })
}

fn pod(name: &str, policy: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {
            "restartPolicy": policy,
            "containers": [{"name": "vm", "image": "registry.test/vm:1"}]
        }
    }))
    .unwrap()
}

fn vm_id(p: &Pod) -> String {
    crate::pod::vm_id(p.metadata.uid.as_deref().unwrap())
}

fn c0(s: &PodStatus) -> &ContainerStatus {
    &s.container_statuses.as_ref().unwrap()[0]
}

fn waiting_reason(s: &PodStatus) -> Option<String> {
    c0(s).state.as_ref()?.waiting.as_ref()?.reason.clone()
}

fn running(s: &PodStatus) -> bool {
    c0(s).state.as_ref().is_some_and(|st| st.running.is_some())
}

impl Harness {
    async fn status(&self, p: &Pod) -> Option<PodStatus> {
        self.provider
            .pod_status(&PodKey::of(p).unwrap())
            .await
            .unwrap()
    }

    /// Polls the pod's status (virtual time) until `f` holds.
    async fn until(&self, p: &Pod, what: &str, f: impl Fn(&PodStatus) -> bool) -> PodStatus {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let s = self.status(p).await;
            if let Some(s) = s.as_ref().filter(|s| f(s)) {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never; last status {s:#?}; calls {:?}",
                self.hv.log.calls()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn events(&self, reason: &str) -> Vec<(Instant, PodEvent)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.reason == reason)
            .cloned()
            .collect()
    }

    fn engine_starts(&self, name: &str) -> usize {
        self.hv.log.times(&format!("start {name}")).len()
    }

    fn reasons(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.reason.clone())
            .collect()
    }
}

/// Seconds between consecutive instants.
fn gaps(t: &[Instant]) -> Vec<u64> {
    t.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect()
}

mod containers;
mod hostile;
mod identity;
mod mac;
mod registry;
mod vm;
