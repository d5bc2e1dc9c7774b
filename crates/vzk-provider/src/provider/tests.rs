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
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            max_vms: 2,
            ready_timeout_secs: 3600,
            acpi: true,
            engine: false,
        }
    }
}

async fn harness(o: Opts) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = Cli::try_parse_from([
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
    ])
    .unwrap()
    .args;
    // Never used: the test pods reference no Secret or ConfigMap.
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let hv = Arc::new(TestHv::new(o.acpi));
    let images = Arc::new(TestImages::new(&dir.path().join("image"), hv.log.clone()));
    let engine = Arc::new(TestEngine::new(hv.log.clone()));
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
    .await
    .unwrap();
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
    Harness {
        provider,
        hv,
        images,
        engine,
        events,
        dir,
    }
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

#[tokio::test(start_paused = true)]
async fn a_failing_vm_restarts_under_always_with_doubling_back_off() {
    let h = harness(Opts::default()).await;
    let p = pod("crashy", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let id = vm_id(&p);
    for round in 1..=4 {
        h.hv.vm(&id).unwrap().fail("qemu exited with signal 9");
        let s = h
            .until(&p, "restarted", |s| {
                running(s) && c0(s).restart_count == round
            })
            .await;
        let last = c0(&s)
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }
    // Each fail is followed by a start: at once, then after 10 s, 20 s, 40 s (the kubelet's
    // CrashLoopBackOff), measured from the failure.
    let starts = h.hv.log.times(&format!("start {id}"));
    assert_eq!(starts.len(), 5, "{:?}", h.hv.log.calls());
    let failed = h.events("Failed");
    assert_eq!(failed.len(), 4, "{:?}", h.reasons());
    let delays: Vec<u64> = failed
        .iter()
        .zip(&starts[1..])
        .map(|((t, _), s)| (*s - *t).as_secs())
        .collect();
    assert_eq!(delays, [0, 10, 20, 40]);
    assert_eq!(h.events("BackOff").len(), 3);
    // Every restart removed the ended VM before creating the next.
    let calls = h.hv.log.calls();
    let life: Vec<&str> = calls
        .iter()
        .filter(|c| c.ends_with(&id))
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        life[..8],
        [
            "create", "start", "remove", "create", "start", "remove", "create", "start"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn while_restarting_the_pod_shows_crash_loop_back_off_and_stays_running() {
    let h = harness(Opts::default()).await;
    let p = pod("loop", "OnFailure");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let id = vm_id(&p);
    h.hv.vm(&id).unwrap().fail("boom");
    h.until(&p, "first restart", |s| {
        running(s) && c0(s).restart_count == 1
    })
    .await;
    h.hv.vm(&id).unwrap().fail("boom");
    let s = h
        .until(&p, "back-off", |s| {
            waiting_reason(s).as_deref() == Some("CrashLoopBackOff")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert!(!c0(&s).ready);
    let msg = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert!(
        msg.message
            .as_deref()
            .unwrap()
            .starts_with("back-off 10s restarting failed container=vm"),
        "{msg:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn under_never_a_failed_vm_fails_the_pod_and_frees_its_slot() {
    let h = harness(Opts {
        max_vms: 1,
        ..Opts::default()
    })
    .await;
    let a = pod("once", "Never");
    let b = pod("next", "Never");
    h.provider.create_pod(&a).await.unwrap();
    h.until(&a, "VM running", running).await;
    h.provider.create_pod(&b).await.unwrap();
    let s = h
        .until(&b, "waiting for a slot", |s| {
            waiting_reason(s).as_deref() == Some("WaitingForVMSlot")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert_eq!(h.events("WaitingForVMSlot").len(), 1);
    h.hv.vm(&vm_id(&a)).unwrap().fail("kernel panic");
    let s = h
        .until(&a, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    let t = c0(&s).state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(t.exit_code, 1);
    assert_eq!(t.message.as_deref(), Some("kernel panic"));
    assert_eq!(c0(&s).restart_count, 0);
    // Its slot went to the waiting pod; the failed VM was never booted again.
    h.until(&b, "second VM running", running).await;
    assert_eq!(h.hv.log.times(&format!("start {}", vm_id(&a))).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_pod_gets_the_slot_only_after_the_deleted_vm_is_removed() {
    let h = harness(Opts {
        max_vms: 1,
        ..Opts::default()
    })
    .await;
    let a = pod("first", "Always");
    let b = pod("second", "Always");
    h.provider.create_pod(&a).await.unwrap();
    h.until(&a, "VM running", running).await;
    h.provider.create_pod(&b).await.unwrap();
    h.until(&b, "waiting for a slot", |s| {
        waiting_reason(s).as_deref() == Some("WaitingForVMSlot")
    })
    .await;
    h.provider
        .delete_pod(&a, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(h.status(&a).await.is_none(), "deleted pods are forgotten");
    h.until(&b, "second VM running", running).await;
    let calls = h.hv.log.calls();
    let pos = |c: String| calls.iter().position(|x| *x == c).unwrap();
    assert!(
        pos(format!("remove {}", vm_id(&a))) < pos(format!("start {}", vm_id(&b))),
        "{calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn deletion_asks_the_guest_then_forces_at_the_end_of_the_grace_then_cleans_up() {
    let h = harness(Opts {
        acpi: false,
        ..Opts::default()
    })
    .await;
    let p = pod("stubborn", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let id = vm_id(&p);
    let pod_dir = h
        .dir
        .path()
        .join("data/pods")
        .join(p.metadata.uid.as_deref().unwrap());
    assert!(pod_dir.join("disk").exists(), "the per-pod disk clone");
    let t0 = Instant::now();
    h.provider
        .delete_pod(&p, Duration::from_secs(20))
        .await
        .unwrap();
    let took = t0.elapsed();
    let calls: Vec<String> =
        h.hv.log
            .calls()
            .into_iter()
            .filter(|c| c.ends_with(&id))
            .collect();
    let tail: Vec<&str> = calls[calls.len() - 3..]
        .iter()
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(tail, ["request_stop", "force_stop", "remove"], "{calls:?}");
    let req = h.hv.log.times("request_stop")[0];
    let force = h.hv.log.times("force_stop")[0];
    assert_eq!((force - t0).as_secs(), 20, "forced when the grace is spent");
    assert!(force > req);
    assert!(
        took >= Duration::from_secs(20) && took < Duration::from_secs(25),
        "{took:?}"
    );
    let killing = h.events("Killing");
    assert_eq!(killing.len(), 1);
    assert!(
        killing[0].1.message.contains("grace 20s"),
        "{:?}",
        killing[0].1
    );
    assert!(
        !pod_dir.exists(),
        "the pod directory (disk clone, console) is removed"
    );
    assert!(h.status(&p).await.is_none());
    // Nothing restarts a deleted pod's VM.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.hv.log.times(&format!("start {id}")).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_vm_not_ready_within_the_ready_timeout_is_killed_and_restarted_or_fails() {
    let h = harness(Opts {
        ready_timeout_secs: 30,
        ..Opts::default()
    })
    .await;
    let p = pod("silent", "Always");
    let t0 = Instant::now();
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "restarted for not answering", |s| {
            c0(s).restart_count == 1
        })
        .await;
    let last = c0(&s)
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(last.exit_code, 143, "stopped by the agent, gracefully");
    assert!(
        last.message
            .as_deref()
            .unwrap()
            .contains("was not ready within 30s"),
        "{last:?}"
    );
    let killing = h.events("Killing");
    assert!(
        killing[0].1.message.ends_with("will be restarted"),
        "{killing:?}"
    );
    // The SSH wait gives up at its last retry before the deadline.
    let at = (killing[0].0 - t0).as_millis();
    assert!((29_000..=31_000).contains(&at), "killed after {at} ms");
    assert!(!h.events("Unhealthy").is_empty());

    let p = pod("silent-never", "Never");
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    let t = c0(&s).state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(t.exit_code, 143);
    assert_eq!(c0(&s).restart_count, 0);
}

#[tokio::test(start_paused = true)]
async fn pull_failures_back_off_like_the_kubelet_then_the_vm_boots() {
    let h = harness(Opts::default()).await;
    h.images.failing_pulls.store(3, Ordering::SeqCst);
    let p = pod("pull", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "ErrImagePull", |s| {
        waiting_reason(s).as_deref() == Some("ErrImagePull")
    })
    .await;
    let s = h
        .until(&p, "ImagePullBackOff", |s| {
            waiting_reason(s).as_deref() == Some("ImagePullBackOff")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    let msg = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert!(
        msg.message
            .as_deref()
            .unwrap()
            .contains("registry unavailable"),
        "{msg:?}"
    );
    h.until(&p, "VM running", running).await;
    // 1 s of ErrImagePull, then a back-off of 10 s, 20 s, 40 s before each retry.
    let pulls = h.hv.log.times("pull ");
    assert_eq!(gaps(&pulls), [11, 21, 41]);
    assert_eq!(h.events("BackOff").len(), 3);
    assert_eq!(h.events("Failed").len(), 3);
    assert_eq!(h.events("Pulled").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_every_pod_task_and_leaves_vms_running() {
    let h = harness(Opts::default()).await;
    let (a, b) = (pod("keep-a", "Always"), pod("keep-b", "Always"));
    for p in [&a, &b] {
        h.provider.create_pod(p).await.unwrap();
        h.until(p, "VM running", running).await;
    }
    assert!(h.provider.shutdown(Duration::from_secs(10)).await);
    for p in [&a, &b] {
        let vm = h.hv.vm(&vm_id(p)).unwrap();
        assert_eq!(
            vm.current(),
            vzk_vm::VmState::Running,
            "VMs outlive the agent"
        );
    }
    let calls = h.hv.log.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("request_stop") || c.starts_with("remove")),
        "{calls:?}"
    );
    // A VM failing now is not restarted: its supervisor has returned.
    h.hv.vm(&vm_id(&a)).unwrap().fail("after shutdown");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.hv.log.times("create").len(), 2);
}

// ---- side-car and init containers, in the fake engine ----

fn hybrid(name: &str, policy: &str, init: &[&str]) -> Pod {
    let init: Vec<serde_json::Value> = init
        .iter()
        .map(|n| serde_json::json!({"name": n, "image": "bb"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {
            "restartPolicy": policy,
            "initContainers": init,
            "containers": [
                {"name": "vm", "image": "registry.test/vm:1"},
                {"name": "side", "image": "bb"}
            ]
        }
    }))
    .unwrap()
}

fn named<'a>(list: Option<&'a Vec<ContainerStatus>>, name: &str) -> Option<&'a ContainerStatus> {
    list?.iter().find(|c| c.name == name)
}

fn is_running(c: Option<&ContainerStatus>) -> bool {
    c.and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

#[tokio::test(start_paused = true)]
async fn a_failing_side_car_restarts_with_the_same_back_off_as_the_vm() {
    let h = harness(Opts {
        engine: true,
        ..Opts::default()
    })
    .await;
    h.engine
        .script("side", &[Some(1), Some(1), Some(1), Some(1)]);
    let p = hybrid("side-crash", "Always", &[]);
    h.provider.create_pod(&p).await.unwrap();
    let back_off = h
        .until(&p, "side-car in back-off", |s| {
            let side = named(s.container_statuses.as_ref(), "side");
            side.and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
                == Some("CrashLoopBackOff")
        })
        .await;
    assert_eq!(
        back_off.phase.as_deref(),
        Some("Running"),
        "restarting, not failed"
    );
    let s = h
        .until(&p, "side-car running after 4 failures", |s| {
            let side = named(s.container_statuses.as_ref(), "side");
            is_running(side) && side.is_some_and(|c| c.restart_count == 4)
        })
        .await;
    let side = named(s.container_statuses.as_ref(), "side").unwrap();
    let last = side
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(last.exit_code, 1);
    // The same rule as the VM's: at once, then 10 s, 20 s, 40 s.
    assert_eq!(gaps(&h.hv.log.times("start side")), [0, 10, 20, 40]);
    let side_back_offs = h
        .events("BackOff")
        .iter()
        .filter(|(_, e)| e.container.as_deref() == Some("side"))
        .count();
    assert_eq!(side_back_offs, 3, "one per delayed restart, as for the VM");
    // The VM was never touched by the side-car's failures.
    assert_eq!(h.hv.log.times("start vzk-").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn init_containers_run_in_order_to_completion_before_the_vm_boots() {
    let h = harness(Opts {
        engine: true,
        ..Opts::default()
    })
    .await;
    h.engine.script("seed", &[Some(0)]);
    h.engine.script("flaky", &[Some(1), Some(1), Some(0)]);
    let p = hybrid("inits", "OnFailure", &["seed", "flaky"]);
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "initialized and running", |s| {
            running(s) && is_running(named(s.container_statuses.as_ref(), "side"))
        })
        .await;
    let init = s.init_container_statuses.as_ref();
    let flaky = named(init, "flaky").unwrap();
    assert_eq!(flaky.restart_count, 2);
    assert!(flaky.ready, "completed");
    assert_eq!(named(init, "seed").unwrap().restart_count, 0);
    let initialized = s
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Initialized")
        .unwrap();
    assert_eq!(initialized.status, "True");
    // Order: seed, flaky (three times, with back-off), then the VM's pull and boot and
    // the side-car.
    let calls = h.hv.log.calls();
    let order: Vec<&str> = calls
        .iter()
        .filter(|c| c.starts_with("start ") || c.starts_with("pull "))
        .map(String::as_str)
        .collect();
    assert_eq!(
        order[..5],
        [
            "start seed",
            "start flaky",
            "start flaky",
            "start flaky",
            "pull registry.test/vm:1"
        ],
        "{calls:?}"
    );
    let vm = calls
        .iter()
        .position(|c| c.starts_with("start vzk-"))
        .unwrap();
    let side = calls.iter().position(|c| c == "start side").unwrap();
    assert!(vm > 4 && side > 4, "{calls:?}");
    assert_eq!(gaps(&h.hv.log.times("start flaky")), [0, 10]);
}

#[tokio::test(start_paused = true)]
async fn an_init_container_failing_under_never_fails_the_pod_before_any_vm() {
    let h = harness(Opts {
        engine: true,
        ..Opts::default()
    })
    .await;
    h.engine.script("explode", &[Some(3)]);
    let p = hybrid("boom", "Never", &["explode"]);
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    assert_eq!(s.reason.as_deref(), Some("InitContainerFailed"));
    assert_eq!(
        s.message.as_deref(),
        Some("Init container explode failed with exit code 3 (Error)")
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = h.hv.log.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("pull ") || c.starts_with("create vzk-")),
        "no VM image pulled, no VM created: {calls:?}"
    );
    assert!(!calls.iter().any(|c| c == "start side"), "{calls:?}");
    assert_eq!(h.engine_starts("explode"), 1, "never retried");
}

#[tokio::test(start_paused = true)]
async fn without_a_container_engine_side_cars_wait_naming_why() {
    let h = harness(Opts::default()).await;
    let p = hybrid("no-engine", "Always", &[]);
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "side-car waiting", |s| {
            let side = named(s.container_statuses.as_ref(), "side");
            side.and_then(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
                .is_some_and(|m| m.contains("no container engine"))
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
}
