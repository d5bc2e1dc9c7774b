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
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodStatus,
};
use tracing::{info, warn};
use vzk_core::stats::PodStats;
use vzk_core::streams::{AttachIo, ExitStatus, LogOptions, LogStream, PortStream};
use vzk_core::{PodEvent, ProviderError};
use vzk_docker::{
    DockerError, PullOutcome, PullPolicy, RegistryAuth, RunState, SidecarRuntime, SidecarSpec,
};

use crate::init::SlotKind;
use crate::pod::{PodEntry, error_chain, lock};
use crate::probes::{
    self, Action, ContainerProbes, ExecOutcome, OutputBuf, ProbeTarget, ProbeUpdate, RestartBackoff,
};
use crate::provider::Inner;
use crate::status::should_restart;

/// The node's side-car runtime, or why there is none.
pub(crate) struct Sidecars {
    node: String,
    runtime: tokio::sync::Mutex<Option<Arc<SidecarRuntime>>>,
    unavailable: Mutex<String>,
}

impl Sidecars {
    /// Connects to the local dockerd; failure is logged, not fatal.
    pub(crate) async fn connect(node: &str) -> Self {
        let (rt, why) = match SidecarRuntime::connect(node).await {
            Ok(rt) => (Some(Arc::new(rt)), String::new()),
            Err(e) => {
                let msg = error_chain(&e);
                warn!(error = %msg, "Docker unavailable: side-car containers will wait");
                (None, msg)
            }
        };
        Self {
            node: node.to_owned(),
            runtime: tokio::sync::Mutex::new(rt),
            unavailable: Mutex::new(why),
        }
    }

    /// The runtime, reconnecting once if there was none.
    pub(crate) async fn runtime(&self) -> Result<Arc<SidecarRuntime>, String> {
        let mut g = self.runtime.lock().await;
        if let Some(rt) = g.as_ref() {
            return Ok(rt.clone());
        }
        match SidecarRuntime::connect(&self.node).await {
            Ok(rt) => {
                let rt = Arc::new(rt);
                *g = Some(rt.clone());
                Ok(rt)
            }
            Err(e) => {
                let msg = error_chain(&e);
                *lock(&self.unavailable) = msg.clone();
                Err(msg)
            }
        }
    }

    /// The runtime if connected (no reconnect).
    pub(crate) fn connected(&self) -> Option<Arc<SidecarRuntime>> {
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
    pub(crate) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
            tasks: Mutex::new(Vec::new()),
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

    /// Merges the side-cars into a status built for container 0 (see [`merge`]).
    pub(crate) fn merge_into(&self, status: &mut PodStatus, restart_policy: Option<&str>) {
        let side: Vec<ContainerStatus> = lock(&self.slots)
            .iter()
            .filter(|s| s.kind == SlotKind::Sidecar)
            .map(|s| s.status.clone())
            .collect();
        if side.is_empty() {
            return;
        }
        merge(status, &side, restart_policy);
    }
}

/// Puts `sidecars` into `status` as containers 1..N, then recomputes the phase (the
/// kubelet's rules over every container) and `ContainersReady`/`Ready` (all ready).
pub(crate) fn merge(
    status: &mut PodStatus,
    sidecars: &[ContainerStatus],
    restart_policy: Option<&str>,
) {
    let cs = status.container_statuses.get_or_insert_with(Vec::new);
    cs.truncate(1);
    cs.extend(sidecars.iter().cloned());
    let (mut waiting, mut running, mut stopped, mut succeeded, mut failed) = (0, 0, 0, 0, 0);
    for c in cs.iter() {
        let st = c.state.clone().unwrap_or_default();
        let last = c.last_state.as_ref().and_then(|l| l.terminated.as_ref());
        if st.running.is_some() {
            running += 1;
        } else if let Some(t) = st.terminated.as_ref() {
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            } else {
                failed += 1;
            }
        } else if let Some(t) = last {
            // Waiting to be restarted: counts as having run.
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            } else {
                failed += 1;
            }
        } else {
            waiting += 1;
        }
    }
    let phase = if waiting > 0 && running == 0 && stopped == 0 {
        "Pending"
    } else if waiting > 0 {
        // Some started, some not yet: the kubelet says Pending until all have started.
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        match restart_policy.unwrap_or("Always") {
            "Never" if failed > 0 => "Failed",
            "Never" => "Succeeded",
            "OnFailure" if stopped == succeeded => "Succeeded",
            "OnFailure" => "Running",
            _ => "Running",
        }
    } else {
        "Pending"
    };
    // A container waiting with a lastState is a restart in progress: the pod runs.
    status.phase = Some(phase.to_owned());
    let all_ready = cs.iter().all(|c| c.ready);
    let reason = if matches!(phase, "Succeeded" | "Failed") {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let not_ready: Vec<&str> = cs
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    for cond in status.conditions.iter_mut().flatten() {
        if cond.type_ == "ContainersReady" || cond.type_ == "Ready" {
            let s = if all_ready { "True" } else { "False" };
            if cond.status != s {
                cond.status = s.to_owned();
                cond.last_transition_time =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    ));
            }
            if all_ready {
                cond.reason = None;
                cond.message = None;
            } else {
                cond.reason = Some(reason.to_owned());
                cond.message = Some(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                ));
            }
        }
    }
}

/// Starts the side-car tasks of a pod (`adopt`: after an agent restart, find the
/// running containers first). They wait for the pod's init containers.
pub(crate) fn start(inner: &Arc<Inner>, e: &Arc<PodEntry>, adopt: bool) {
    let n = lock(&e.sidecars.slots).len();
    let mut tasks = lock(&e.sidecars.tasks);
    for i in (0..n).filter(|&i| e.sidecars.kind(i) == Some(SlotKind::Sidecar)) {
        let (inner, e2) = (inner.clone(), e.clone());
        let cancel = e.cancel.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = async {
                    if crate::init::initialized(&e2).await {
                        run(inner, e2, i, adopt).await;
                    }
                } => {}
            }
        }));
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
    rt: Arc<SidecarRuntime>,
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

/// The life of slot `i`: side-car `i` (container `i + 1`) or an init container, which
/// returns once it has terminated for good (under its restart policy).
pub(crate) async fn run(inner: Arc<Inner>, e: Arc<PodEntry>, i: usize, adopt: bool) {
    let Some(mut c) = container(&e, i) else {
        return;
    };
    // Checked at create time; a record from an older agent may still hold a bad one.
    let probes = ContainerProbes::from_container(&c).unwrap_or_else(|err| {
        warn!(pod = %e.key, container = %c.name, error = %err, "side-car probes not run");
        ContainerProbes::default()
    });
    let set = |st: ContainerState, ready: bool| {
        e.sidecars.update(i, |s| {
            s.status.started = Some(st.running.is_some());
            s.status.state = Some(st);
            s.status.ready = ready;
        });
        inner.push_status(&e);
    };
    // Docker.
    let rt = loop {
        match inner.sidecars.runtime().await {
            Ok(rt) => break rt,
            Err(msg) => {
                set(
                    waiting(
                        "DockerUnavailable",
                        format!("Docker is not available on this node: {msg}"),
                    ),
                    false,
                );
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    let policy = e.sidecars.kind(i).and_then(|k| k.restart_policy(&e.pod));
    let mut backoff = RestartBackoff::default();
    let mut attempt: u32 = 0;
    // Re-adoption: keep watching what runs.
    let mut current: Option<String> = None;
    if adopt {
        match rt.find(&e.key, &c.name).await {
            Ok(Some(found)) => {
                attempt = found.attempt;
                e.sidecars.update(i, |s| {
                    s.id = Some(found.id.clone());
                    s.status.restart_count = i32::try_from(found.attempt).unwrap_or(i32::MAX);
                    s.status.container_id = Some(format!("docker://{}", found.id));
                });
                info!(pod = %e.key, container = %c.name, id = %found.id, "re-adopted a side-car");
                current = Some(found.id);
            }
            Ok(None) => {}
            Err(err) => {
                warn!(pod = %e.key, error = %error_chain(&err), "looking for side-cars to re-adopt")
            }
        }
    }
    loop {
        let id = match current.take() {
            Some(id) => id,
            None => {
                let Some(spec) = spec_for_create(&inner, &e, i, &c.name, adopt).await else {
                    return;
                };
                c = spec;
                match create_and_start(&inner, &e, &rt, &c, i, attempt).await {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        let ran_since = Instant::now();
        // Running (or already ended, for an adopted one).
        let mut probe_from = None;
        match rt.inspect(&id).await {
            Ok(st) => {
                e.sidecars
                    .update(i, |s| s.status.image_id = st.image_id.clone());
                let running = st.is_running();
                let state = st.to_k8s();
                if running && !probes.is_empty() {
                    // `started` and `ready` come from the probes.
                    probe_from = Some(started_instant(&state));
                    e.sidecars.update(i, |s| {
                        s.status.state = Some(state);
                        s.status.started = Some(false);
                        s.status.ready = false;
                    });
                    inner.push_status(&e);
                } else {
                    set(state, running);
                }
            }
            Err(err) => {
                warn!(pod = %e.key, container = %c.name, error = %error_chain(&err), "inspect")
            }
        }
        let mut killed: Option<String> = None;
        let waited = match probe_from {
            None => rt.wait(&id).await,
            Some(from) => {
                let target = Arc::new(SidecarProbeTarget {
                    rt: rt.clone(),
                    id: id.clone(),
                });
                let on = |u: ProbeUpdate| match u {
                    ProbeUpdate::Started => {
                        e.sidecars.update(i, |s| s.status.started = Some(true));
                        inner.push_status(&e);
                    }
                    ProbeUpdate::Ready(r) => {
                        e.sidecars.update(i, |s| s.status.ready = r);
                        inner.push_status(&e);
                    }
                    ProbeUpdate::Unhealthy { message, .. } => {
                        inner.container_event(&e, &c.name, PodEvent::warning("Unhealthy", message));
                    }
                };
                tokio::select! {
                    r = rt.wait(&id) => r,
                    req = probes::run(target, probes.clone(), from, on) => {
                        let why = format!(
                            "Container {} failed {} probe",
                            c.name,
                            req.kind.as_str().to_lowercase()
                        );
                        let restart = should_restart(policy.as_deref(), 137);
                        inner.container_event(
                            &e,
                            &c.name,
                            PodEvent::normal(
                                "Killing",
                                if restart { format!("{why}, will be restarted") } else { why.clone() },
                            ),
                        );
                        info!(pod = %e.key, container = %c.name, reason = %why, "killing a side-car");
                        e.sidecars.update(i, |s| s.status.ready = false);
                        inner.push_status(&e);
                        let grace = req.grace.unwrap_or_else(|| grace_of(&e));
                        if let Err(err) = rt.stop(&id, grace).await {
                            warn!(pod = %e.key, container = %c.name, error = %error_chain(&err), "stopping side-car");
                        }
                        killed = Some(format!("{why}: {}", req.message));
                        rt.wait(&id).await
                    }
                }
            }
        };
        let ended = match waited {
            Ok(st) => st,
            Err(err) => {
                let msg = error_chain(&err);
                warn!(pod = %e.key, container = %c.name, error = %msg, "side-car vanished");
                vzk_docker::SidecarState {
                    id: id.clone(),
                    image_id: String::new(),
                    status: RunState::Exited {
                        exit_code: 137,
                        reason: "ContainerCannotRun".into(),
                        message: Some(msg),
                        started_at: None,
                        finished_at: Some(k8s_openapi::jiff::Timestamp::now()),
                    },
                }
            }
        };
        let code = match &ended.status {
            RunState::Exited { exit_code, .. } => *exit_code,
            _ => 0,
        };
        let mut term = ended.to_k8s();
        if let (Some(msg), Some(t)) = (killed, term.terminated.as_mut()) {
            t.message = Some(msg);
        }
        if !should_restart(policy.as_deref(), code) {
            set(term, false);
            return;
        }
        if code != 0 {
            inner.container_event(
                &e,
                &c.name,
                PodEvent::warning(
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {} in pod {}_{}({})",
                        c.name, e.key.name, e.key.namespace, e.key.uid
                    ),
                ),
            );
        }
        let delay = backoff.next_delay(ran_since.elapsed());
        e.sidecars.update(i, |s| {
            s.status.last_state = Some(term.clone());
            s.status.ready = false;
            s.status.started = Some(false);
            s.status.state = Some(waiting(
                if delay.is_zero() {
                    "ContainerCreating"
                } else {
                    "CrashLoopBackOff"
                },
                if delay.is_zero() {
                    String::new()
                } else {
                    format!(
                        "back-off {}s restarting failed container={} pod={}_{}({})",
                        delay.as_secs(),
                        c.name,
                        e.key.name,
                        e.key.namespace,
                        e.key.uid
                    )
                },
            ));
        });
        inner.push_status(&e);
        tokio::time::sleep(delay).await;
        attempt += 1;
        e.sidecars.update(i, |s| {
            s.status.restart_count = i32::try_from(attempt).unwrap_or(i32::MAX);
        });
    }
}

/// Pull (with back-off), volumes, create, start, postStart. `None` when the
/// container can never be created (the status says why).
async fn create_and_start(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    rt: &Arc<SidecarRuntime>,
    c: &Container,
    i: usize,
    attempt: u32,
) -> Option<String> {
    let set_waiting = |reason: &str, msg: String| {
        e.sidecars.update(i, |s| {
            s.status.ready = false;
            s.status.started = Some(false);
            s.status.state = Some(waiting(reason, msg));
        });
        inner.push_status(e);
    };
    let image = c.image.clone().unwrap_or_default();
    let policy = PullPolicy::from_k8s(c.image_pull_policy.as_deref(), &image);
    let mut pull_backoff = Duration::from_secs(10);
    let mut create_backoff = RestartBackoff::default();
    loop {
        // 1. The image.
        let creds = match vzk_image::Reference::parse(&image) {
            Ok(r) => match inner.credentials_for(&e.pod, &r).await {
                Ok(c) => c,
                Err(msg) => {
                    inner.container_event(
                        e,
                        &c.name,
                        PodEvent::warning("FailedToRetrieveImagePullSecret", msg),
                    );
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let auths: Vec<RegistryAuth> = creds
            .into_iter()
            .map(|c| RegistryAuth {
                username: c.username,
                password: c.password,
                identity_token: c.identity_token,
            })
            .collect();
        let will_pull = policy == PullPolicy::Always
            || (policy == PullPolicy::IfNotPresent
                && !rt.image_present(&image).await.unwrap_or(false));
        if will_pull {
            inner.container_event(
                e,
                &c.name,
                PodEvent::normal("Pulling", format!("Pulling image \"{image}\"")),
            );
        }
        match rt.ensure_image(&image, policy, &auths).await {
            Ok(PullOutcome::AlreadyPresent) => inner.container_event(
                e,
                &c.name,
                PodEvent::normal(
                    "Pulled",
                    format!("Container image \"{image}\" already present on machine"),
                ),
            ),
            Ok(PullOutcome::Pulled { elapsed }) => inner.container_event(
                e,
                &c.name,
                PodEvent::normal(
                    "Pulled",
                    format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        elapsed.as_secs_f64()
                    ),
                ),
            ),
            Err(err @ (DockerError::InvalidImage { .. } | DockerError::InvalidSpec(_))) => {
                let msg = error_chain(&err);
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::warning("Failed", format!("Error: {msg}")),
                );
                set_waiting(err.reason(), msg);
                return None;
            }
            Err(err) => {
                let msg = format!("Failed to pull image \"{image}\": {}", error_chain(&err));
                warn!(pod = %e.key, container = %c.name, error = %msg, "side-car pull failed");
                inner.container_event(e, &c.name, PodEvent::warning("Failed", msg.clone()));
                set_waiting(err.reason(), msg.clone());
                tokio::time::sleep(Duration::from_secs(1)).await;
                let reason = if matches!(err, DockerError::ImageNeverPull { .. }) {
                    "ErrImageNeverPull"
                } else {
                    inner.container_event(
                        e,
                        &c.name,
                        PodEvent::normal("BackOff", format!("Back-off pulling image \"{image}\"")),
                    );
                    "ImagePullBackOff"
                };
                set_waiting(reason, format!("Back-off pulling image \"{image}\": {msg}"));
                tokio::time::sleep(pull_backoff).await;
                pull_backoff = (pull_backoff * 2).min(Duration::from_secs(300));
                continue;
            }
        }
        // 2. The pod's volumes (set up by the VM's task).
        let binds = loop {
            match inner.volumes.binds_for(&e.key.uid, c) {
                Ok(b) => break b,
                Err(err) => {
                    set_waiting(
                        "ContainerCreating",
                        format!("waiting for volumes: {}", vzk_core::error_chain(&err)),
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let binds: Vec<vzk_docker::Bind> = binds
            .into_iter()
            .map(|b| vzk_docker::Bind {
                host_path: b.host_path,
                container_path: b.container_path,
                read_only: b.read_only,
            })
            .collect();
        // 3. Create and start.
        let spec = SidecarSpec {
            pod: &e.key,
            container: c,
            binds: &binds,
            attempt,
        };
        let created = match rt.create(&spec).await {
            Ok(id) => id,
            Err(err) => {
                let msg = error_chain(&err);
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::warning("Failed", format!("Error: {msg}")),
                );
                set_waiting(err.reason(), msg);
                if matches!(err, DockerError::InvalidSpec(_)) {
                    return None;
                }
                tokio::time::sleep(
                    create_backoff
                        .next_delay(Duration::ZERO)
                        .max(Duration::from_secs(1)),
                )
                .await;
                continue;
            }
        };
        e.sidecars.update(i, |s| {
            if s.id.as_deref() != Some(created.as_str()) {
                s.prev_id = s.id.take();
            }
            s.id = Some(created.clone());
            s.status.container_id = Some(format!("docker://{created}"));
        });
        // Keep the previous attempt for --previous; remove anything older.
        if let Ok(all) = rt.list_ours(Some(&e.key.uid)).await {
            for old in all
                .iter()
                .filter(|o| o.container == c.name && o.attempt + 1 < attempt)
            {
                let _ = rt.remove(&old.id).await;
            }
        }
        inner.container_event(
            e,
            &c.name,
            PodEvent::normal("Created", format!("Created container {}", c.name)),
        );
        if let Err(err) = rt.start(&created).await {
            let msg = error_chain(&err);
            inner.container_event(
                e,
                &c.name,
                PodEvent::warning("Failed", format!("Error: {msg}")),
            );
            // Docker leaves a container that could not start as exited (code 128).
            return Some(created);
        }
        inner.container_event(
            e,
            &c.name,
            PodEvent::normal("Started", format!("Started container {}", c.name)),
        );
        // 4. postStart.
        if let Some(cmd) = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|x| x.command.clone())
        {
            e.sidecars.update(i, |s| {
                s.status.state = Some(ContainerState {
                    running: Some(k8s_openapi::api::core::v1::ContainerStateRunning {
                        started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            k8s_openapi::jiff::Timestamp::now(),
                        )),
                    }),
                    ..Default::default()
                });
                s.status.ready = false;
            });
            inner.push_status(e);
            let sink = AttachIo {
                stdin: None,
                stdout: Some(Box::pin(tokio::io::sink())),
                stderr: Some(Box::pin(tokio::io::sink())),
                tty: false,
                resize: None,
            };
            let failure = match rt.exec(&created, cmd, sink).await {
                Ok(st) if st.success() => None,
                Ok(st) => Some(format!("PostStartHook exited with {}", st.code)),
                Err(err) => Some(format!("PostStartHook failed: {}", error_chain(&err))),
            };
            if let Some(msg) = failure {
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::warning("FailedPostStartHook", msg.clone()),
                );
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::normal(
                        "Killing",
                        format!("FailedPostStartHook: stopping container {}", c.name),
                    ),
                );
                let _ = rt.stop(&created, grace_of(e)).await;
            }
        }
        return Some(created);
    }
}

fn grace_of(e: &PodEntry) -> Duration {
    Duration::from_secs(
        e.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30),
    )
}

/// Stops the pod's side-cars within `deadline` (preStop hooks, then `docker stop`
/// with the remaining grace) and removes every container labelled with its UID. The
/// pod's tasks must be cancelled already.
pub(crate) async fn stop_all(inner: Arc<Inner>, e: Arc<PodEntry>, deadline: tokio::time::Instant) {
    let tasks: Vec<_> = lock(&e.sidecars.tasks).drain(..).collect();
    for t in tasks {
        let _ = t.await;
    }
    if lock(&e.sidecars.slots).is_empty() {
        return;
    }
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    let containers: Vec<Container> = crate::init::docker_containers(&e.pod).cloned().collect();
    let stops = containers.into_iter().filter_map(|c| {
        let (id, _) = e.sidecars.ids(&c.name)?;
        let id = id?;
        let (rt, inner, e) = (rt.clone(), inner.clone(), e.clone());
        Some(async move {
            match rt.inspect(&id).await {
                Ok(st) if st.is_running() => {}
                _ => return,
            }
            inner.container_event(&e, &c.name, PodEvent::normal("Killing", format!("Stopping container {}", c.name)));
            if let Some(cmd) = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|x| x.command.clone())
            {
                let sink = AttachIo {
                    stdin: None,
                    stdout: Some(Box::pin(tokio::io::sink())),
                    stderr: Some(Box::pin(tokio::io::sink())),
                    tty: false,
                    resize: None,
                };
                match tokio::time::timeout_at(deadline, rt.exec(&id, cmd, sink)).await {
                    Ok(Ok(st)) if st.success() => {}
                    Ok(Ok(st)) => inner.container_event(&e, &c.name,
                        PodEvent::warning("FailedPreStopHook", format!("PreStopHook of {} exited with {}", c.name, st.code)),
                    ),
                    Ok(Err(err)) => inner.container_event(&e, &c.name,
                        PodEvent::warning("FailedPreStopHook", format!("PreStopHook of {}: {}", c.name, error_chain(&err))),
                    ),
                    Err(_) => inner.container_event(&e, &c.name,
                        PodEvent::warning("FailedPreStopHook", format!("PreStopHook of {} did not finish within the grace period", c.name)),
                    ),
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Err(err) = rt.stop(&id, remaining).await {
                warn!(pod = %e.key, container = %c.name, error = %error_chain(&err), "stopping side-car");
            }
        })
    });
    futures::future::join_all(stops).await;
    remove_all(&inner, &e).await;
}

async fn remove_all(inner: &Inner, e: &PodEntry) {
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    match rt.list_ours(Some(&e.key.uid)).await {
        Ok(list) => {
            for c in list {
                if let Err(err) = rt.remove(&c.id).await {
                    let msg = format!("removing container {}: {}", c.name, error_chain(&err));
                    warn!(pod = %e.key, error = %msg, "side-car cleanup incomplete");
                    inner.container_event(e, &c.name, PodEvent::warning("FailedKillPod", msg));
                }
            }
        }
        Err(err) => warn!(pod = %e.key, error = %error_chain(&err), "listing side-cars to remove"),
    }
}

/// Removes side-car containers of this node whose pod the provider does not run.
pub(crate) async fn cleanup_leftovers(inner: &Inner) {
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    let known: std::collections::HashSet<String> = lock(&inner.pods).keys().cloned().collect();
    match rt.cleanup(|uid| known.contains(uid)).await {
        Ok(removed) if !removed.is_empty() => info!(?removed, "removed leftover side-cars"),
        Ok(_) => {}
        Err(err) => warn!(error = %error_chain(&err), "side-car leftover cleanup"),
    }
}

fn to_provider(e: DockerError) -> ProviderError {
    match e {
        DockerError::NotFound(m) => ProviderError::NotFound(format!("container {m}")),
        DockerError::NotRunning(m) => ProviderError::invalid(
            "ContainerNotRunning",
            format!("container {m} is not running"),
        ),
        DockerError::Unreachable { .. } => ProviderError::Unavailable {
            message: error_chain(&e),
            retry_after: Some(Duration::from_secs(5)),
        },
        other => ProviderError::failed(other.reason(), error_chain(&other)),
    }
}

/// Whether `name` is a side-car of `e`.
pub(crate) fn is_sidecar(e: &PodEntry, name: &str) -> bool {
    e.sidecars.is_sidecar(name)
}

async fn target(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    previous: bool,
) -> Result<(Arc<SidecarRuntime>, String), ProviderError> {
    let rt = inner
        .sidecars
        .connected()
        .ok_or_else(|| ProviderError::Unavailable {
            message: format!(
                "Docker is not available on this node: {}",
                lock(&inner.sidecars.unavailable)
            ),
            retry_after: Some(Duration::from_secs(5)),
        })?;
    let (id, prev) = e
        .sidecars
        .ids(name)
        .ok_or_else(|| ProviderError::NotFound(format!("container {name} of pod {}", e.key)))?;
    let id = if previous { prev } else { id };
    let id = id.ok_or_else(|| {
        if previous {
            ProviderError::NotFound(format!(
                "previous terminated container {name} of pod {}",
                e.key
            ))
        } else {
            ProviderError::Unavailable {
                message: format!("container {name} of pod {} is not created yet", e.key),
                retry_after: Some(Duration::from_secs(2)),
            }
        }
    })?;
    Ok((rt, id))
}

/// `kubectl logs` of a side-car.
pub(crate) async fn logs(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    opts: &LogOptions,
) -> Result<LogStream, ProviderError> {
    let (rt, id) = target(inner, e, name, opts.previous).await?;
    rt.logs(&id, opts).await.map_err(to_provider)
}

/// `kubectl exec` into a side-car.
pub(crate) async fn exec(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    command: Vec<String>,
    io: AttachIo,
) -> Result<ExitStatus, ProviderError> {
    let (rt, id) = target(inner, e, name, false).await?;
    rt.exec(&id, command, io).await.map_err(to_provider)
}

/// `kubectl attach` to a side-car.
pub(crate) async fn attach(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    io: AttachIo,
) -> Result<ExitStatus, ProviderError> {
    let (rt, id) = target(inner, e, name, false).await?;
    rt.attach(&id, io).await.map_err(to_provider)
}

/// The side-car (or native side-car) that should receive a port-forward to `port`: one
/// declaring the port when container 0 does not.
pub(crate) fn port_owner(e: &PodEntry, port: u16) -> Option<String> {
    let cs = &e.pod.spec.as_ref()?.containers;
    let declares = |c: &Container| {
        c.ports
            .iter()
            .flatten()
            .any(|p| p.container_port == i32::from(port))
    };
    if cs.first().is_some_and(declares) {
        return None;
    }
    crate::init::docker_containers(&e.pod)
        .find(|c| declares(c))
        .map(|c| c.name.clone())
}

/// `kubectl port-forward` to a side-car's port.
pub(crate) async fn port_forward(
    inner: &Inner,
    e: &PodEntry,
    name: &str,
    port: u16,
    stream: PortStream,
) -> Result<(), ProviderError> {
    let (rt, id) = target(inner, e, name, false).await?;
    rt.port_forward(&id, port, stream)
        .await
        .map_err(to_provider)
}

/// Adds side-car stats to `out` (creating the pod's entry when the VM has none) and
/// to the pod totals.
pub(crate) async fn add_stats(inner: &Inner, entries: &[Arc<PodEntry>], out: &mut Vec<PodStats>) {
    let Some(rt) = inner.sidecars.connected() else {
        return;
    };
    for e in entries {
        let running: Vec<(String, String)> = lock(&e.sidecars.slots)
            .iter()
            .filter(|s| {
                s.status
                    .state
                    .as_ref()
                    .is_some_and(|st| st.running.is_some())
            })
            .filter_map(|s| Some((s.status.name.clone(), s.id.clone()?)))
            .collect();
        if running.is_empty() {
            continue;
        }
        let idx = match out.iter().position(|p| p.pod_ref.uid == e.key.uid) {
            Some(i) => i,
            None => {
                out.push(PodStats {
                    pod_ref: vzk_core::stats::PodReference {
                        name: e.key.name.clone(),
                        namespace: e.key.namespace.clone(),
                        uid: e.key.uid.clone(),
                    },
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        for (name, id) in running {
            let cs = match rt.stats(&id, &name).await {
                Ok(s) => s,
                Err(err) => {
                    warn!(pod = %e.key, container = %name, error = %error_chain(&err), "side-car stats");
                    continue;
                }
            };
            let p = &mut out[idx];
            if let Some(c) = &cs.cpu {
                let tot = p.cpu.get_or_insert_with(|| vzk_core::stats::CpuStats {
                    time: c.time,
                    ..Default::default()
                });
                tot.usage_nano_cores = sum(tot.usage_nano_cores, c.usage_nano_cores);
                tot.usage_core_nano_seconds =
                    sum(tot.usage_core_nano_seconds, c.usage_core_nano_seconds);
            }
            if let Some(m) = &cs.memory {
                let tot = p
                    .memory
                    .get_or_insert_with(|| vzk_core::stats::MemoryStats {
                        time: m.time,
                        ..Default::default()
                    });
                tot.usage_bytes = sum(tot.usage_bytes, m.usage_bytes);
                tot.working_set_bytes = sum(tot.working_set_bytes, m.working_set_bytes);
                tot.rss_bytes = sum(tot.rss_bytes, m.rss_bytes);
            }
            p.containers.push(cs);
        }
    }
}

fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.saturating_add(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerStateRunning, ContainerStateTerminated, PodCondition,
    };

    use super::*;

    /// A terminated state (helper for tests of [`merge`]).
    fn terminated(code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn cs(name: &str, state: ContainerState, ready: bool) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(state),
            ready,
            ..Default::default()
        }
    }

    fn running() -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        }
    }

    fn base(vm: ContainerStatus, phase: &str) -> PodStatus {
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(
                ["Initialized", "ContainersReady", "Ready"]
                    .iter()
                    .map(|t| PodCondition {
                        type_: (*t).into(),
                        status: "False".into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            container_statuses: Some(vec![vm, cs("side", waiting("SidecarNotRun", "x"), false)]),
            ..Default::default()
        }
    }

    fn cond(s: &PodStatus, t: &str) -> String {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
            .unwrap()
    }

    #[test]
    fn ready_needs_every_container() {
        let mut s = base(cs("vm", running(), true), "Running");
        merge(&mut s, &[cs("side", running(), false)], None);
        assert_eq!(cond(&s, "Ready"), "False");
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.container_statuses.as_ref().unwrap().len(), 2);
        let mut s = base(cs("vm", running(), true), "Running");
        merge(&mut s, &[cs("side", running(), true)], None);
        assert_eq!(cond(&s, "Ready"), "True");
        assert_eq!(cond(&s, "ContainersReady"), "True");
        assert_eq!(cond(&s, "Initialized"), "False", "untouched");
    }

    #[test]
    fn phase_over_all_containers() {
        // VM still pulling, side-car running: Pending.
        let mut s = base(cs("vm", waiting("Pulling", ""), false), "Pending");
        merge(&mut s, &[cs("side", running(), true)], None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        // OnFailure: a side-car that exited 0 is no failure; the pod runs on.
        let mut s = base(cs("vm", running(), true), "Running");
        merge(
            &mut s,
            &[cs("side", terminated(0), false)],
            Some("OnFailure"),
        );
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready"), "False");
        // Never: everything ended, one failed → Failed.
        let mut s = base(cs("vm", terminated(0), false), "Succeeded");
        merge(&mut s, &[cs("side", terminated(3), false)], Some("Never"));
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        // OnFailure: all ended with 0 → Succeeded.
        let mut s = base(cs("vm", terminated(0), false), "Succeeded");
        merge(
            &mut s,
            &[cs("side", terminated(0), false)],
            Some("OnFailure"),
        );
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        // A side-car in back-off (waiting with a lastState) counts as started.
        let mut side = cs("side", waiting("CrashLoopBackOff", ""), false);
        side.last_state = Some(terminated(1));
        let mut s = base(cs("vm", running(), true), "Running");
        merge(&mut s, &[side], None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }

    fn pod_with_side_probe(probe: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [
                {"name": "vm", "image": "vm"},
                {"name": "side", "image": "bb", "ports": [{"name": "web", "containerPort": 8080}],
                 "livenessProbe": probe}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn sidecar_probes_are_checked_at_create_time() {
        let ok = [
            serde_json::json!({"tcpSocket": {"port": "web"}}),
            serde_json::json!({"tcpSocket": {"port": 8080, "host": "127.0.0.1"}}),
            serde_json::json!({"httpGet": {"port": 8080, "host": "localhost"}}),
            serde_json::json!({"httpGet": {"port": 8080, "host": "::1"}}),
            serde_json::json!({"exec": {"command": ["true"]}}),
        ];
        for p in ok {
            validate(&pod_with_side_probe(p.clone())).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
        let bad = [
            (
                serde_json::json!({"tcpSocket": {"port": 8080, "host": "10.0.0.1"}}),
                "host \"10.0.0.1\" is not reachable",
            ),
            (
                serde_json::json!({"httpGet": {"port": 8080, "host": "example.com"}}),
                "host \"example.com\"",
            ),
            (
                serde_json::json!({"tcpSocket": {"port": "nope"}}),
                "not a named port",
            ),
            (
                serde_json::json!({"grpc": {"port": 8080}}),
                "gRPC probes are not supported",
            ),
            (
                serde_json::json!({"exec": {"command": ["true"]}, "successThreshold": 2}),
                "successThreshold must be 1",
            ),
        ];
        for (p, want) in bad {
            match validate(&pod_with_side_probe(p.clone())) {
                Err(ProviderError::Invalid { reason, message }) => {
                    assert_eq!(reason, "InvalidProbe", "{p}");
                    assert!(message.contains(want), "{p}: {message}");
                    assert!(message.contains("\"side\""), "{p}: {message}");
                }
                other => panic!("{p}: {other:?}"),
            }
        }
    }

    #[test]
    fn port_forward_goes_to_the_vm_unless_only_a_sidecar_declares_the_port() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [
                {"name": "vm", "image": "vm", "ports": [{"containerPort": 22}]},
                {"name": "web", "image": "bb", "ports": [{"containerPort": 8080}, {"containerPort": 22}]}
            ]}
        }))
        .unwrap();
        let key = vzk_core::PodKey::of(&pod).unwrap();
        let e = PodEntry::new(
            key,
            pod,
            std::path::PathBuf::from("/nonexistent"),
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ),
            vzk_guest::Credentials::with_password("root", "x"),
        );
        assert_eq!(port_owner(&e, 8080).as_deref(), Some("web"));
        assert_eq!(port_owner(&e, 22), None);
        assert_eq!(port_owner(&e, 5900), None);
        assert!(is_sidecar(&e, "web"));
        assert!(!is_sidecar(&e, "vm"));
    }
}
