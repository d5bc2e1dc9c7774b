//! Init containers of a VM pod, run in Docker with the side-car machinery
//! ([`crate::sidecars`]: pull with the pod's pull secrets and back-off, the pod's volumes
//! as bind mounts, env resolved by the node runtime, events, logs).
//!
//! # Contract
//! * `create_pod` refuses (`InvalidPod`) an init container without an image. Init
//!   containers always run in Docker (an image that is a VM image fails to pull there).
//! * A new pod's task first sets up the pod's volumes, then runs the init containers in
//!   order, each to completion, before container 0 (the VM) is pulled and booted and
//!   before the side-cars (containers 1..N) start.
//! * A failing init container is retried under `restartPolicy` `Always`/`OnFailure`
//!   with the kubelet's back-off ([`crate::probes::RestartBackoff`]: at once, then 10 s
//!   doubling to 5 min), `restartCount` and `lastState` counting; under `Never` the pod
//!   fails: phase `Failed`, reason `InitContainerFailed`, a message naming the
//!   container and its exit code; the VM is never booted and native side-cars already
//!   started are stopped.
//! * Native side-cars (`restartPolicy: Always` on an init container) start in order:
//!   the next init container starts once the side-car has started (startup probe passed,
//!   or running without one). They then run like side-cars (restarted whenever they
//!   exit, probes, stopped on pod deletion) and are reported in `initContainerStatuses`,
//!   `ready` per their readiness probe (without one: ready while running); their
//!   readiness counts for `ContainersReady`/`Ready`.
//! * Status ([`crate::status`]): `initContainerStatuses`, the `Initialized`
//!   condition, and while initializing phase `Pending` with every app container waiting
//!   `PodInitializing` (what kubectl shows as `Init:N/M`, `Init:Error`,
//!   `Init:CrashLoopBackOff`).
//! * `kubectl logs/exec -c <init container>` go to its Docker container (`--previous`:
//!   the attempt before).
//! * After an agent restart a re-adopted (running) VM pod is initialized: its init
//!   containers are not run again; their Docker containers (found by our labels) give
//!   their statuses, and native side-cars are re-adopted like side-cars.
//! * Deletion stops and removes their Docker containers with the side-cars' (only
//!   containers carrying our labels).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStatus, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vzk_core::ProviderError;

use crate::pod::{PodEntry, error_chain, lock};
use crate::provider::Inner;

/// What a Docker container slot of a pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotKind {
    /// One of containers 1..N.
    Sidecar,
    /// An init container that runs to completion.
    Init,
    /// An init container with `restartPolicy: Always`.
    NativeSidecar,
}

impl SlotKind {
    /// The kind of init container `c`.
    pub(crate) fn of_init(c: &Container) -> SlotKind {
        if is_native(c) {
            SlotKind::NativeSidecar
        } else {
            SlotKind::Init
        }
    }

    /// The waiting reason of a slot that has not started yet (the kubelet's).
    pub(crate) fn initial_reason(self) -> &'static str {
        match self {
            SlotKind::Sidecar => "ContainerCreating",
            SlotKind::Init | SlotKind::NativeSidecar => "PodInitializing",
        }
    }

    /// The restart policy the slot runs under: the pod's for a side-car; for an init
    /// container `Never` under a pod's `Never`, else `OnFailure` (an init container that
    /// completed is never run again); `Always` for a native side-car.
    pub(crate) fn restart_policy(self, pod: &Pod) -> Option<String> {
        let pod_policy = pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
        match self {
            SlotKind::Sidecar => pod_policy,
            SlotKind::Init if pod_policy.as_deref() == Some("Never") => Some("Never".into()),
            SlotKind::Init => Some("OnFailure".into()),
            SlotKind::NativeSidecar => Some("Always".into()),
        }
    }
}

/// Whether init container `c` is a native side-car (`restartPolicy: Always`).
pub(crate) fn is_native(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn init_containers(pod: &Pod) -> &[Container] {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
}

/// Every container of `pod` that runs in Docker: containers 1..N, then the init
/// containers.
pub(crate) fn docker_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter().skip(1))
        .chain(init_containers(pod))
}

/// The container (or init container) named `name` (names are unique across both).
pub(crate) fn find_container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .chain(init_containers(pod))
        .find(|c| c.name == name)
}

/// Create-time checks of the init containers: each has an image.
pub(crate) fn validate(pod: &Pod) -> Result<(), ProviderError> {
    for c in init_containers(pod) {
        if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
            return Err(ProviderError::invalid(
                "InvalidPod",
                format!(
                    "init container {:?} has no image (init containers run in Docker)",
                    c.name
                ),
            ));
        }
    }
    Ok(())
}

/// Where a pod's initialization is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum InitState {
    /// Init containers still to run.
    Running,
    /// All done (at that time): the VM and the side-cars may start.
    Done(Time),
    /// An init container failed under `restartPolicy: Never`.
    Failed,
}

/// The initialization of one pod (sticky: an initialized pod stays initialized).
#[derive(Debug)]
pub(crate) struct PodInit {
    state: watch::Sender<InitState>,
    /// Stops the native side-cars of a pod that failed to initialize.
    halt: CancellationToken,
}

impl PodInit {
    /// A pod without init containers is initialized at `start`.
    pub(crate) fn new(pod: &Pod, start: &Time) -> Self {
        let state = if init_containers(pod).is_empty() {
            InitState::Done(start.clone())
        } else {
            InitState::Running
        };
        Self {
            state: watch::Sender::new(state),
            halt: CancellationToken::new(),
        }
    }

    fn set(&self, s: InitState) {
        self.state.send_replace(s);
    }

    pub(crate) fn initialized_at(&self) -> Option<Time> {
        match &*self.state.borrow() {
            InitState::Done(t) => Some(t.clone()),
            _ => None,
        }
    }
}

/// Waits until the pod is initialized (`true`) or has failed to (`false`).
pub(crate) async fn initialized(e: &PodEntry) -> bool {
    let mut rx = e.init.state.subscribe();
    let r = rx.wait_for(|s| *s != InitState::Running).await;
    r.is_ok_and(|s| matches!(*s, InitState::Done(_)))
}

/// The init container slots of `e`, in order.
fn init_slots(e: &PodEntry) -> Vec<(usize, SlotKind, String)> {
    lock(&e.sidecars.slots)
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind != SlotKind::Sidecar)
        .map(|(i, s)| (i, s.kind, s.status.name.clone()))
        .collect()
}

fn slot_status(e: &PodEntry, i: usize) -> Option<ContainerStatus> {
    lock(&e.sidecars.slots).get(i).map(|s| s.status.clone())
}

/// Runs native side-car `i` as a pod task (stopped by deletion or [`PodInit::halt`]).
fn spawn_native(inner: &Arc<Inner>, e: &Arc<PodEntry>, i: usize, adopt: bool) {
    if e.cancel.is_cancelled() {
        return;
    }
    let (inner, e2) = (inner.clone(), e.clone());
    let halt = e.init.halt.clone();
    e.spawn(async move {
        tokio::select! {
            () = halt.cancelled() => {}
            () = crate::sidecars::run(inner, e2, i, adopt) => {}
        }
    });
}

/// Runs the init containers of a new pod in order; `true` once all have completed
/// (the pod is initialized), `false` when one failed for good (`restartPolicy: Never`;
/// the pod is `Failed`). Waits forever on an init container that can never be created
/// (its status says why), as the kubelet does.
pub(crate) async fn run(inner: &Arc<Inner>, e: &Arc<PodEntry>) -> bool {
    let slots = init_slots(e);
    if slots.is_empty() {
        return true;
    }
    // Init containers get the pod's volumes (set up again, idempotently, for the VM).
    crate::volumes::prepare_with_retry(inner, e).await;
    let n = slots.len();
    for (k, (i, kind, name)) in slots.into_iter().enumerate() {
        info!(pod = %e.key, container = %name, "init container {}/{n}", k + 1);
        if kind == SlotKind::NativeSidecar {
            spawn_native(inner, e, i, false);
            let mut rx = e.sidecars.subscribe();
            while slot_status(e, i).and_then(|s| s.started) != Some(true) {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            continue;
        }
        crate::sidecars::run(inner.clone(), e.clone(), i, false).await;
        let term = slot_status(e, i)
            .and_then(|s| s.state)
            .and_then(|s| s.terminated);
        match term {
            Some(t) if t.exit_code == 0 => {}
            Some(t) => {
                fail(inner, e, &name, &t).await;
                return false;
            }
            None => {
                warn!(pod = %e.key, container = %name, "init container cannot be created; the pod stays initializing");
                std::future::pending::<()>().await;
            }
        }
    }
    e.init.set(InitState::Done(Time(Timestamp::now())));
    info!(pod = %e.key, "pod initialized");
    inner.push_status(e);
    true
}

/// The pod failed to initialize: native side-cars are stopped, the pod is `Failed`.
async fn fail(inner: &Arc<Inner>, e: &Arc<PodEntry>, name: &str, t: &ContainerStateTerminated) {
    warn!(pod = %e.key, container = %name, exit_code = t.exit_code, "init container failed; restartPolicy Never fails the pod");
    e.init.set(InitState::Failed);
    e.init.halt.cancel();
    if let Some(rt) = inner.sidecars.connected() {
        let natives: Vec<(usize, String)> = lock(&e.sidecars.slots)
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == SlotKind::NativeSidecar)
            .filter_map(|(i, s)| Some((i, s.id.clone()?)))
            .collect();
        for (i, id) in natives {
            if let Err(err) = rt.stop(&id, grace(e)).await {
                warn!(pod = %e.key, error = %error_chain(&err), "stopping a native side-car");
            }
            if let Ok(st) = rt.inspect(&id).await {
                e.sidecars.update(i, |s| {
                    s.status.state = Some(st.to_k8s());
                    s.status.ready = false;
                    s.status.started = Some(false);
                });
            }
        }
    }
    inner.push_status(e);
}

fn grace(e: &PodEntry) -> Duration {
    Duration::from_secs(
        e.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30),
    )
}

/// A re-adopted pod (its VM runs, so it was initialized): its native side-cars are
/// re-adopted, and its other init containers are reported from their Docker
/// containers, never run again.
pub(crate) fn adopt(inner: &Arc<Inner>, e: &Arc<PodEntry>) {
    let slots = init_slots(e);
    if slots.is_empty() {
        return;
    }
    e.init.set(InitState::Done(e.start_time.clone()));
    let mut completed = Vec::new();
    for (i, kind, name) in slots {
        match kind {
            SlotKind::NativeSidecar => spawn_native(inner, e, i, true),
            _ => completed.push((i, name)),
        }
    }
    e.spawn(report_completed(inner.clone(), e.clone(), completed));
}

/// Statuses of the completed init containers of a re-adopted pod, from Docker.
async fn report_completed(inner: Arc<Inner>, e: Arc<PodEntry>, slots: Vec<(usize, String)>) {
    let rt = inner.sidecars.runtime().await.ok();
    let mut last_finish: Option<Time> = None;
    for (i, name) in slots {
        let found = match &rt {
            Some(rt) => match rt.find(&e.key, &name).await {
                Ok(Some(c)) => rt.inspect(&c.id).await.ok().map(|st| (c, st)),
                Ok(None) => None,
                Err(err) => {
                    warn!(pod = %e.key, container = %name, error = %error_chain(&err), "looking for an init container");
                    None
                }
            },
            None => None,
        };
        let state = match found {
            Some((c, st)) => {
                let state = st.to_k8s();
                e.sidecars.update(i, |s| {
                    s.id = Some(c.id.clone());
                    s.status.container_id = Some(format!("docker://{}", c.id));
                    s.status.image_id = st.image_id.clone();
                    s.status.restart_count = i32::try_from(c.attempt).unwrap_or(i32::MAX);
                });
                state
            }
            None => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 0,
                    reason: Some("Completed".into()),
                    message: Some(
                        "completed before the agent restarted; its container is gone".into(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        if let Some(f) = state
            .terminated
            .as_ref()
            .and_then(|t| t.finished_at.clone())
        {
            last_finish = last_finish.max(Some(f));
        }
        e.sidecars.update(i, |s| s.status.state = Some(state));
    }
    if let Some(t) = last_finish {
        e.init.set(InitState::Done(t));
    }
    info!(pod = %e.key, "re-adopted pod: init containers reported, not run again");
    inner.push_status(&e);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pod(policy: Option<&str>, init: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {
                "restartPolicy": policy,
                "initContainers": init,
                "containers": [{"name": "vm", "image": "vm"}, {"name": "side", "image": "bb"}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn init_containers_restart_on_failure_unless_never_and_native_ones_always() {
        let init = serde_json::json!([
            {"name": "seed", "image": "bb"},
            {"name": "proxy", "image": "bb", "restartPolicy": "Always"}
        ]);
        for (pod_policy, init_policy, side_policy) in [
            (None, "OnFailure", None),
            (Some("Always"), "OnFailure", Some("Always")),
            (Some("OnFailure"), "OnFailure", Some("OnFailure")),
            (Some("Never"), "Never", Some("Never")),
        ] {
            let p = pod(pod_policy, init.clone());
            let spec = p.spec.as_ref().unwrap();
            let kinds: Vec<SlotKind> = spec
                .init_containers
                .iter()
                .flatten()
                .map(SlotKind::of_init)
                .collect();
            assert_eq!(kinds, [SlotKind::Init, SlotKind::NativeSidecar]);
            assert_eq!(
                SlotKind::Init.restart_policy(&p).as_deref(),
                Some(init_policy)
            );
            assert_eq!(
                SlotKind::NativeSidecar.restart_policy(&p).as_deref(),
                Some("Always")
            );
            assert_eq!(SlotKind::Sidecar.restart_policy(&p).as_deref(), side_policy);
        }
    }

    #[test]
    fn docker_runs_the_sidecars_and_init_containers_and_each_needs_an_image() {
        let p = pod(None, serde_json::json!([{"name": "seed", "image": "bb"}]));
        let names: Vec<&str> = docker_containers(&p).map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["side", "seed"]);
        assert_eq!(
            find_container(&p, "seed").map(|c| c.name.as_str()),
            Some("seed")
        );
        assert_eq!(
            find_container(&p, "vm").map(|c| c.name.as_str()),
            Some("vm")
        );
        assert!(validate(&p).is_ok());
        let t = Time(Timestamp::now());
        assert_eq!(*PodInit::new(&p, &t).state.borrow(), InitState::Running);
        for bad in [
            serde_json::json!([{"name": "seed"}]),
            serde_json::json!([{"name": "seed", "image": " "}]),
        ] {
            match validate(&pod(None, bad)) {
                Err(ProviderError::Invalid { reason, message }) => {
                    assert_eq!(reason, "InvalidPod");
                    assert!(
                        message.contains("init container \"seed\" has no image"),
                        "{message}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        // Without init containers the pod is initialized when accepted.
        let p = pod(None, serde_json::json!([]));
        assert_eq!(PodInit::new(&p, &t).initialized_at(), Some(t.clone()));
    }
}
