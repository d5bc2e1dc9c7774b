//! Docker side-cars: containers 1..N of a VM pod, run through [`vzk_docker`].
//!
//! # Contract
//! * At start-up the provider connects to the local dockerd. Without one the node
//!   still runs VM-only pods; side-cars then wait with reason `DockerUnavailable` (and
//!   the connection is retried when a pod with side-cars arrives).
//! * The same slots and `run` loop run the pod's init containers ([`crate::init`] decides
//!   when, and their restart policy).
//! * Each side-car has a task of its own, started with the pod once its init containers
//!   have completed (in parallel with the VM's pull and boot): pull per `imagePullPolicy` with the pod's pull secrets and
//!   the node's docker config (`Pulling`/`Pulled`, `ErrImagePull` →
//!   `ImagePullBackOff` with back-off), wait for the pod's volumes, create + start
//!   (`Created`/`Started`), postStart exec hook (`FailedPostStartHook` kills the
//!   container), then wait for it to end.
//! * `restartPolicy` (the pod's; default `Always`): `Always` restarts, `OnFailure`
//!   restarts only a non-zero exit, `Never` leaves it terminated. Restarts follow the
//!   kubelet's back-off (first at once, then 10 s doubling to 5 min, reset after 10 min
//!   of running; `BackOff` event, `waiting{CrashLoopBackOff}` with `lastState`). Each
//!   restart is a new Docker container (attempt + 1); the previous one is kept for
//!   `kubectl logs --previous`, older ones are removed.
//! * Probes ([`crate::probes`], the VM's runner): without any, a side-car is `ready`
//!   while it runs (after its postStart hook). A startup probe gates `started` and the
//!   other two; a readiness probe gates `ready`; a liveness (or startup) failure kills
//!   the container (`Killing` "Container <name> failed liveness probe, will be
//!   restarted", grace = the probe's `terminationGracePeriodSeconds` or the pod's) and
//!   `restartPolicy` decides on the exit code Docker records. Each failure is an
//!   `Unhealthy` event on the container. `exec` probes run through `docker exec` (a
//!   timed-out one is killed); `tcpSocket`/`httpGet` dial inside the side-car's own
//!   network namespace, at `127.0.0.1` by default. A probe `host` is honoured only when
//!   it is loopback (`127.0.0.0/8`, `::1`, `localhost`): any other host is refused at
//!   create time with `InvalidProbe` (nothing but the side-car's loopback is reachable
//!   from its namespace without leaving the node). Invalid probes fail the pod at
//!   create time with `InvalidProbe`, as for container 0.
//! * The pod's `ContainersReady`/`Ready` need every container ready; the phase follows
//!   the kubelet's rules over all containers (a side-car that exits 0 under `OnFailure`
//!   does not fail the pod).
//! * Env after an agent restart: the pod record on disk holds no env values of
//!   side-cars (they may be secrets). A side-car still running keeps its env (Docker
//!   has it). The pod controller hands a re-adopted pod, env resolved again, to
//!   `update_pod`, which keeps the latest resolved side-car containers in memory
//!   ([`set_resolved`]); a side-car of a re-adopted pod is (re-)created only from
//!   them, waiting (`ContainerCreating`, "waiting for the pod's environment") until
//!   they arrive.
//! * Deletion: preStop exec hooks, then `docker stop` with the remaining grace, then
//!   every container labelled with the pod's UID is removed. An agent restart leaves
//!   side-cars running; a re-adopted pod finds them by label and keeps watching them;
//!   containers of pods the new agent does not know are removed at start-up.
//! * Networking: side-cars run on Docker's default bridge in a network namespace of
//!   their own, not the VM's: they reach the VM at the pod IP, not at `localhost`.
//! * Port-forward of a pod goes to the VM, unless the port is declared (`ports`) by a
//!   side-car and not by container 0: then to that side-car's loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Pod,
};
use tracing::{info, warn};
use vzk_core::ProviderError;
use vzk_docker::{DockerError, SidecarRuntime};

use crate::engine::ContainerEngine;

use crate::init::SlotKind;
use crate::pod::{PodEntry, error_chain, lock};
use crate::probes::{Action, ContainerProbes, ExecOutcome, OutputBuf, ProbeTarget};
use crate::provider::Inner;

/// Which container engine runs a node's side-car and init containers.
pub enum Containers {
    /// The local dockerd: connected at start, and again on demand while it is down.
    Docker,
    /// This engine (tests pass a fake).
    Engine(Arc<dyn ContainerEngine>),
    /// None: side-car and init containers wait, naming why; no leftovers are looked for.
    None,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Containers::Docker => "Docker",
            Containers::Engine(_) => "Engine",
            Containers::None => "None",
        })
    }
}

/// The node's container engine, or why there is none.
pub(crate) struct Sidecars {
    node: String,
    runtime: tokio::sync::Mutex<Option<Arc<dyn ContainerEngine>>>,
    unavailable: Mutex<String>,
    /// Whether to (re)connect to the local dockerd when there is no engine.
    docker: bool,
}

/// Why side-cars wait when the provider runs without a container engine.
const DISABLED: &str = "this node runs no container engine for side-car and init containers";

async fn connect_docker(node: &str) -> Result<Arc<dyn ContainerEngine>, String> {
    match SidecarRuntime::connect(node).await {
        Ok(rt) => Ok(Arc::new(rt)),
        Err(e) => Err(error_chain(&e)),
    }
}

impl Sidecars {
    /// The engine `containers` names (connecting to dockerd now for `Docker`; a failure
    /// is logged, not fatal).
    pub(crate) async fn new(node: &str, containers: Containers) -> Self {
        let (rt, why, docker) = match containers {
            Containers::Docker => match connect_docker(node).await {
                Ok(rt) => (Some(rt), String::new(), true),
                Err(msg) => {
                    warn!(error = %msg, "Docker unavailable: side-car containers will wait");
                    (None, msg, true)
                }
            },
            Containers::Engine(rt) => (Some(rt), String::new(), false),
            Containers::None => (None, DISABLED.to_owned(), false),
        };
        Self {
            node: node.to_owned(),
            runtime: tokio::sync::Mutex::new(rt),
            unavailable: Mutex::new(why),
            docker,
        }
    }

    /// The engine, reconnecting to dockerd once if there was none.
    pub(crate) async fn runtime(&self) -> Result<Arc<dyn ContainerEngine>, String> {
        let mut g = self.runtime.lock().await;
        if let Some(rt) = g.as_ref() {
            return Ok(rt.clone());
        }
        if !self.docker {
            return Err(lock(&self.unavailable).clone());
        }
        match connect_docker(&self.node).await {
            Ok(rt) => {
                *g = Some(rt.clone());
                Ok(rt)
            }
            Err(msg) => {
                *lock(&self.unavailable) = msg.clone();
                Err(msg)
            }
        }
    }

    /// The engine if connected (no reconnect).
    pub(crate) fn connected(&self) -> Option<Arc<dyn ContainerEngine>> {
        self.runtime.try_lock().ok().and_then(|g| g.clone())
    }
}

/// One side-car's (or init container's) state as the pod status shows it.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) status: ContainerStatus,
    /// Docker id of the current attempt.
    pub(crate) id: Option<String>,
    /// Docker id of the previous attempt (for `--previous` logs).
    prev_id: Option<String>,
    /// A side-car, or an init container run by [`crate::init`].
    pub(crate) kind: SlotKind,
}

/// The Docker containers of one pod: side-cars (containers 1..N), then its init
/// containers ([`crate::init`] runs those).
#[derive(Debug, Default)]
pub(crate) struct PodSidecars {
    pub(crate) slots: Mutex<Vec<Slot>>,
    /// The latest env-resolved containers 1..N and init containers handed over by
    /// `update_pod` (memory only: never written to disk).
    resolved: tokio::sync::watch::Sender<Option<Arc<Vec<Container>>>>,
    /// Bumped on every slot update (what [`crate::init`] waits on).
    changed: tokio::sync::watch::Sender<u64>,
}

fn waiting(reason: &str, message: impl Into<String>) -> ContainerState {
    let m: String = message.into();
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message: (!m.is_empty()).then_some(m),
        }),
        ..Default::default()
    }
}

impl PodSidecars {
    /// Side-car slots for `containers` (all of the pod's; the first is the VM), then
    /// slots for the pod's `init` containers.
    pub(crate) fn new(containers: &[Container], init: &[Container]) -> Self {
        let slot = |c: &Container, kind: SlotKind| Slot {
            status: ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                state: Some(waiting(kind.initial_reason(), "")),
                started: Some(false),
                ..Default::default()
            },
            id: None,
            prev_id: None,
            kind,
        };
        let slots = containers
            .iter()
            .skip(1)
            .map(|c| slot(c, SlotKind::Sidecar))
            .chain(init.iter().map(|c| slot(c, SlotKind::of_init(c))))
            .collect();
        Self {
            slots: Mutex::new(slots),
            resolved: tokio::sync::watch::Sender::new(None),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(crate) fn update(&self, i: usize, f: impl FnOnce(&mut Slot)) {
        if let Some(s) = lock(&self.slots).get_mut(i) {
            f(s);
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Fires after every slot update.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn ids(&self, name: &str) -> Option<(Option<String>, Option<String>)> {
        lock(&self.slots)
            .iter()
            .find(|s| s.status.name == name)
            .map(|s| (s.id.clone(), s.prev_id.clone()))
    }

    fn is_sidecar(&self, name: &str) -> bool {
        lock(&self.slots).iter().any(|s| s.status.name == name)
    }

    pub(crate) fn kind(&self, i: usize) -> Option<SlotKind> {
        lock(&self.slots).get(i).map(|s| s.kind)
    }

    /// The statuses of the side-cars (containers 1..N) and of the init containers.
    pub(crate) fn statuses(&self) -> (Vec<ContainerStatus>, Vec<ContainerStatus>) {
        let (mut sidecars, mut init) = (Vec::new(), Vec::new());
        for s in lock(&self.slots).iter() {
            match s.kind {
                SlotKind::Sidecar => sidecars.push(s.status.clone()),
                _ => init.push(s.status.clone()),
            }
        }
        (sidecars, init)
    }
}

/// Starts the side-car tasks of a pod (`adopt`: after an agent restart, find the
/// running containers first). They wait for the pod's init containers.
pub(crate) fn start(inner: &Arc<Inner>, e: &Arc<PodEntry>, adopt: bool) {
    let n = lock(&e.sidecars.slots).len();
    for i in (0..n).filter(|&i| e.sidecars.kind(i) == Some(SlotKind::Sidecar)) {
        let (inner, e2) = (inner.clone(), e.clone());
        e.spawn(async move {
            if crate::init::initialized(&e2).await {
                run(inner, e2, i, adopt).await;
            }
        });
    }
}

/// Slot `i`'s container (a side-car or an init container; names are unique across
/// both) as the pod record (or the create call) gave it.
fn container(e: &PodEntry, i: usize) -> Option<Container> {
    let name = lock(&e.sidecars.slots).get(i)?.status.name.clone();
    crate::init::find_container(&e.pod, &name).cloned()
}

/// Side-car `i` as it should be (re-)created: the latest env-resolved spec from
/// `update_pod` if any. For a re-adopted pod (`adopted`), whose record has no env,
/// waits for that spec.
async fn spec_for_create(
    inner: &Inner,
    e: &PodEntry,
    i: usize,
    name: &str,
    adopted: bool,
) -> Option<Container> {
    let mut rx = e.sidecars.resolved.subscribe();
    if adopted && rx.borrow().is_none() {
        e.sidecars.update(i, |s| {
            s.status.ready = false;
            s.status.started = Some(false);
            s.status.state = Some(waiting(
                "ContainerCreating",
                "waiting for the pod's environment from the API server (agent restarted)",
            ));
        });
        inner.push_status(e);
        info!(pod = %e.key, container = %name, "side-car waits for its resolved env before re-creation");
        if rx.wait_for(Option::is_some).await.is_err() {
            return None;
        }
    }
    let latest = rx.borrow().clone();
    latest
        .and_then(|cs| cs.iter().find(|c| c.name == name).cloned())
        .or_else(|| container(e, i))
}

/// Keeps the env-resolved side-cars of `pod` (from `update_pod`) for re-creations.
pub(crate) fn set_resolved(inner: &Inner, pod: &Pod) {
    let Some(uid) = pod.metadata.uid.as_deref() else {
        return;
    };
    let Some(e) = lock(&inner.pods).get(uid).cloned() else {
        return;
    };
    let cs: Vec<Container> = crate::init::docker_containers(pod).cloned().collect();
    if cs.is_empty() {
        return;
    }
    e.sidecars.resolved.send_replace(Some(Arc::new(cs)));
}

/// Checks the probes of containers 1..N (as create does for container 0): the
/// probe itself, and a `tcpSocket`/`httpGet` host that is loopback if given.
pub(crate) fn validate(pod: &Pod) -> Result<(), ProviderError> {
    let invalid = |m: String| ProviderError::invalid("InvalidProbe", m);
    for c in crate::init::docker_containers(pod) {
        let probes = ContainerProbes::from_container(c).map_err(|e| invalid(e.to_string()))?;
        for spec in [&probes.startup, &probes.readiness, &probes.liveness]
            .into_iter()
            .flatten()
        {
            let host = match &spec.action {
                Action::Tcp { host, .. } | Action::Http { host, .. } => host.as_deref(),
                Action::Exec { .. } => None,
            };
            if let Some(h) = host
                && !is_loopback_host(h)
            {
                return Err(invalid(format!(
                    "{} probe of side-car container {:?}: host {h:?} is not reachable from the side-car's network namespace; only loopback (127.0.0.1, ::1, localhost) or no host is supported",
                    spec.kind, c.name
                )));
            }
        }
    }
    Ok(())
}

fn is_loopback_host(h: &str) -> bool {
    h.eq_ignore_ascii_case("localhost")
        || h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Probes against a side-car: exec through `docker exec` (killed when the probe
/// times out), sockets opened inside the container's network namespace.
struct SidecarProbeTarget {
    rt: Arc<dyn ContainerEngine>,
    id: String,
}

#[async_trait::async_trait]
impl ProbeTarget for SidecarProbeTarget {
    async fn exec(&self, argv: &[String]) -> Result<ExecOutcome, String> {
        let out = OutputBuf::default();
        let io = out.io();
        let st = self
            .rt
            .exec_probe(&self.id, argv.to_vec(), io)
            .await
            .map_err(|e| error_chain(&e))?;
        Ok(ExecOutcome {
            code: st.code,
            output: out.take(),
        })
    }

    async fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::other(
                "side-car probes reach only the loopback of the side-car's network namespace",
            ));
        }
        self.rt
            .connect_in(&self.id, addr, Duration::from_secs(10))
            .await
            .map_err(|e| match e {
                DockerError::Io { source, .. } => source,
                other => std::io::Error::other(error_chain(&other)),
            })
    }

    fn pod_ip(&self) -> Option<std::net::IpAddr> {
        Some(std::net::IpAddr::from([127, 0, 0, 1]))
    }
}

/// How long ago a container started (from Docker's `startedAt`), as an [`Instant`].
fn started_instant(state: &ContainerState) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let ago = state
        .running
        .as_ref()
        .and_then(|r| r.started_at.as_ref())
        .and_then(|t| {
            let d = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            Duration::try_from(d).ok()
        })
        .unwrap_or_default();
    now.checked_sub(ago).unwrap_or(now)
}

mod run;
mod stop;
mod streams;
#[cfg(test)]
mod tests;

pub(crate) use run::run;
pub(crate) use stop::{cleanup_leftovers, stop_all};
pub(crate) use streams::{add_stats, attach, exec, is_sidecar, logs, port_forward, port_owner};
