//! The pod controller: runs the pods bound to this node through a [`PodLifecycle`]
//! provider and writes their status back.
//!
//! # Flow
//! * One watch: pods with `spec.nodeName=<node>` (kube's watcher, with backoff; it
//!   re-lists by itself after an outage).
//! * One worker task per pod UID owns that pod's lifecycle: resolve env → `create_pod`
//!   → `update_pod` on spec changes → on `deletionTimestamp`, `delete_pod(grace)` then
//!   delete the API object with grace 0 and a UID precondition. A pod the provider
//!   already runs at start-up gets one `update_pod` with its env resolved again (a
//!   provider keeps no secret env values on disk, but needs them to re-create a
//!   container).
//! * Status is pushed by the provider through a [`PodNotifier`]; one status task merges
//!   it with what only the API server knows (the `PodScheduled` condition) and patches
//!   `pods/status` only when the result differs from what was last written.
//!
//! # Guarantees
//! * `create_pod` is called at most once per UID per agent process, and not at all for
//!   pods the provider already lists at start-up (restarting the agent does not disturb
//!   running pods). `delete_pod` is called once per UID.
//! * After the first full list, provider pods unknown to the API server are deleted.
//! * A provider or env error leaves the pod in a visible state (container `waiting`
//!   reason + message, or phase Failed for permanent errors) with an Event.
//! * Before `create_pod`, the ConfigMaps and Secrets the pod references (env, `envFrom`,
//!   volumes) are read once: each missing object or key is a Warning event with
//!   virtual-kubelet's reason (`MandatorySecretNotFound`, `OptionalConfigMapNotFound`,
//!   `MandatoryConfigMapKeyNotFound`, `FailedToReadMandatorySecret`, …; see
//!   [`RefProblem`]). Optional ones do not block the pod; mandatory ones keep it
//!   Pending (`CreateContainerConfigError` for env, `ContainerCreating` with
//!   `FailedMount` for volumes, as the kubelet shows them) and are retried every
//!   `retry_delay` until the object appears. Each event is published once per pod and
//!   problem (reason, object, key) while the problem lasts, not on every retry; the same
//!   failure message is not repeated either.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodStatus,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use vzk_core::{PodEvent, PodKey, PodLifecycle, PodNotifier, PodUpdate, ProviderError};

use crate::env::{self, EnvError};
use crate::node::error_chain;
use crate::volumes::ObjectReader;
use crate::volumes::sources::{self, ObjectKind, RefProblem};

/// Settings of the pod controller.
#[derive(Debug, Clone)]
pub struct PodControllerConfig {
    /// This node's name.
    pub node_name: String,
    /// The node's address, reported as `hostIP` when the provider gives none.
    pub host_ip: String,
    /// Node allocatable `cpu` (cores) and `memory` (bytes), for `resourceFieldRef`
    /// `limits.*` of containers without limits.
    pub allocatable: BTreeMap<String, f64>,
    /// Delay before retrying a failed env resolution or a retryable provider error.
    pub retry_delay: Duration,
}

impl PodControllerConfig {
    /// Defaults for `node_name`.
    pub fn new(node_name: impl Into<String>, host_ip: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            host_ip: host_ip.into(),
            allocatable: BTreeMap::new(),
            retry_delay: Duration::from_secs(10),
        }
    }
}

/// Errors that stop the pod controller.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The provider could not list its pods at start-up.
    #[error("listing the provider's pods")]
    ListProvider(#[source] ProviderError),
}

#[derive(Default)]
struct PodState {
    /// Latest object seen from the API server.
    latest: Option<Pod>,
    /// Last status written (or seen) for this UID.
    written: Option<PodStatus>,
    /// The provider's latest status when writing it failed: retried until it lands.
    unsent: Option<(PodKey, PodStatus)>,
}

struct Shared {
    client: kube::Client,
    config: PodControllerConfig,
    provider: Arc<dyn PodLifecycle>,
    recorder: Recorder,
    state: Mutex<HashMap<String, PodState>>,
}

/// Runs the pods of one node.
pub struct PodController {
    shared: Arc<Shared>,
}

/// A read-only view of the pods the controller knows (for the kubelet API's `/pods`).
#[derive(Clone)]
pub struct PodsView(Arc<Shared>);

impl PodsView {
    /// The latest object of every pod bound to this node that is still present.
    pub fn pods(&self) -> Vec<Pod> {
        self.0
            .state
            .lock()
            .map(|s| s.values().filter_map(|p| p.latest.clone()).collect())
            .unwrap_or_default()
    }
}

impl PodController {
    /// A controller for `config.node_name` backed by `provider`.
    pub fn new(
        client: kube::Client,
        config: PodControllerConfig,
        provider: Arc<dyn PodLifecycle>,
    ) -> Self {
        let reporter = Reporter {
            controller: "vz-kubelet".into(),
            instance: Some(config.node_name.clone()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            shared: Arc::new(Shared {
                client,
                config,
                provider,
                recorder,
                state: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A view of the pods, usable while the controller runs.
    pub fn view(&self) -> PodsView {
        PodsView(self.shared.clone())
    }

    /// Runs until `shutdown`. Pods keep running in the provider when the controller stops.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PodError> {
        let shared = self.shared;
        let (notifier, mut updates) = PodNotifier::channel();
        shared.provider.set_notifier(notifier);
        let known: HashSet<String> = loop {
            match shared.provider.list_pods().await {
                Ok(pods) => break pods.into_iter().map(|k| k.uid).collect(),
                Err(e) if e.is_retryable() => {
                    warn!(error = %e, "provider cannot list its pods yet; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => return Err(PodError::ListProvider(e)),
            }
        };
        let mut known_pending = Some(known.clone());
        info!(provider_pods = known.len(), "pod controller starting");

        let tracker = TaskTracker::new();
        let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
        let mut finished: HashSet<String> = HashSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();

        let api: Api<Pod> = Api::all(shared.client.clone());
        let wc = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", shared.config.node_name));
        let mut stream = watcher::watcher(api, wc).backoff(watch_backoff()).boxed();
        let mut retry_tick = tokio::time::interval(STATUS_RETRY);
        retry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_in_list: HashSet<String> = HashSet::new();

        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(uid) = done_rx.recv() => {
                    workers.remove(&uid);
                    finished.insert(uid);
                }
                Some(update) = updates.recv() => {
                    handle_update(&shared, update).await;
                }
                _ = retry_tick.tick() => {
                    retry_unsent(&shared).await;
                }
                ev = stream.try_next() => {
                    let ev = match ev {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %error_chain(&e), "pod watch error; the watcher retries");
                            continue;
                        }
                    };
                    match ev {
                        Event::Init => seen_in_list.clear(),
                        Event::InitApply(pod) | Event::Apply(pod) => {
                            let Some(uid) = pod.metadata.uid.clone() else { continue };
                            seen_in_list.insert(uid.clone());
                            if finished.contains(&uid) {
                                continue;
                            }
                            if let Some(tx) = workers.get(&uid) {
                                tx.send_replace(Some(pod));
                            } else {
                                let adopted = known.contains(&uid);
                                let (tx, rx) = watch::channel(Some(pod));
                                workers.insert(uid.clone(), tx);
                                let shared = shared.clone();
                                let done = done_tx.clone();
                                let token = shutdown.clone();
                                tracker.spawn(async move {
                                    pod_worker(shared, rx, adopted, token).await;
                                    let _ = done.send(uid);
                                });
                            }
                        }
                        Event::Delete(pod) => {
                            let Some(uid) = pod.metadata.uid.clone() else { continue };
                            finished.remove(&uid);
                            if let Some(tx) = workers.get(&uid) {
                                tx.send_replace(None);
                            }
                            forget(&shared, &uid);
                        }
                        Event::InitDone => {
                            // Pods that vanished while the watch was down.
                            for (uid, tx) in &workers {
                                if !seen_in_list.contains(uid) {
                                    tx.send_replace(None);
                                }
                            }
                            finished.retain(|uid| seen_in_list.contains(uid));
                            if let Some(known) = known_pending.take() {
                                delete_orphans(&shared, &known, &seen_in_list).await;
                            }
                        }
                    }
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        info!("pod controller stopped");
        Ok(())
    }
}

fn forget(shared: &Shared, uid: &str) {
    if let Ok(mut s) = shared.state.lock() {
        s.remove(uid);
    }
}

/// Provider pods whose UID the API server does not have: delete them.
async fn delete_orphans(shared: &Shared, known: &HashSet<String>, in_api: &HashSet<String>) {
    let Ok(pods) = shared.provider.list_pods().await else {
        return;
    };
    for key in pods
        .into_iter()
        .filter(|k| known.contains(&k.uid) && !in_api.contains(&k.uid))
    {
        info!(pod = %key, uid = %key.uid, "deleting a pod the API server no longer has");
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                namespace: Some(key.namespace.clone()),
                name: Some(key.name.clone()),
                uid: Some(key.uid.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        if let Err(e) = shared.provider.delete_pod(&pod, Duration::ZERO).await
            && !matches!(e, ProviderError::NotFound(_))
        {
            warn!(pod = %key, error = %e, "deleting an orphaned pod failed");
        }
    }
}

fn grace_of(pod: &Pod) -> Duration {
    let secs = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// What the worker is waiting for before it acts again.
enum Next {
    Change,
    Retry,
}

/// What one pod's worker has already said in events, so a retry does not say it again.
#[derive(Default)]
struct Told {
    /// Reference problems reported and still present ([`RefProblem::identity`]).
    problems: HashSet<(String, ObjectKind, String, Option<String>)>,
    /// The last `Failed`/`FailedMount` event (reason, message) of a pass that failed.
    failure: Option<(String, String)>,
}

/// Publishes a Warning for each problem not reported yet, and forgets those that are gone
/// (so a problem that comes back is reported again).
async fn report_problems(shared: &Shared, pod: &Pod, problems: &[RefProblem], told: &mut Told) {
    let current: HashSet<_> = problems.iter().map(RefProblem::identity).collect();
    told.problems.retain(|id| current.contains(id));
    for p in problems {
        if told.problems.insert(p.identity()) {
            let reason = p.reason();
            debug!(%reason, object = %p.name, "reference problem");
            publish(shared, pod, PodEvent::warning(reason, p.message())).await;
        }
    }
}

/// Publishes a failure event unless it is the one the last failed pass published.
async fn report_failure(shared: &Shared, pod: &Pod, told: &mut Told, reason: &str, msg: String) {
    let this = (reason.to_owned(), msg);
    if told.failure.as_ref() != Some(&this) {
        publish(
            shared,
            pod,
            PodEvent::warning(this.0.clone(), this.1.clone()),
        )
        .await;
        told.failure = Some(this);
    }
}

async fn pod_worker(
    shared: Arc<Shared>,
    mut rx: watch::Receiver<Option<Pod>>,
    adopted: bool,
    shutdown: CancellationToken,
) {
    let first = rx.borrow().clone();
    let Some(key) = first.as_ref().and_then(PodKey::of) else {
        return;
    };
    let span = info_span!("pod", pod.ns = %key.namespace, pod.name = %key.name, pod.uid = %key.uid);
    async move {
        let mut created = adopted;
        let mut applied_spec: Option<serde_json::Value> = None;
        let mut last_pod: Option<Pod> = None;
        let mut told = Told::default();
        if adopted {
            debug!("adopting a pod the provider already runs");
            if let Some(pod) = first.as_ref() {
                applied_spec = serde_json::to_value(&pod.spec).ok();
                if let Ok(Some(status)) = shared.provider.pod_status(&key).await {
                    record_latest(&shared, pod);
                    write_status(&shared, &key, status).await;
                }
                if pod.metadata.deletion_timestamp.is_none() && !is_terminal(pod) {
                    update(&shared, &key, pod, &mut told).await;
                }
            }
        }
        loop {
            let current = rx.borrow_and_update().clone();
            let next = match current {
                None => {
                    // Gone from the API server without us finishing it (force delete).
                    if created {
                        let pod = last_pod.clone().unwrap_or_default();
                        info!("pod removed from the API server; deleting it");
                        if let Err(e) = shared.provider.delete_pod(&pod, Duration::ZERO).await
                            && !matches!(e, ProviderError::NotFound(_))
                        {
                            warn!(error = %e, "provider delete failed");
                        }
                    }
                    return;
                }
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    record_latest(&shared, &pod);
                    finish_deletion(&shared, &key, &pod, created).await;
                    return;
                }
                Some(pod) => {
                    record_latest(&shared, &pod);
                    last_pod = Some(pod.clone());
                    if !created && is_terminal(&pod) {
                        Next::Change
                    } else if !created {
                        match create(&shared, &key, &pod, &mut told).await {
                            Ok(()) => {
                                created = true;
                                applied_spec = serde_json::to_value(&pod.spec).ok();
                                Next::Change
                            }
                            Err(next) => next,
                        }
                    } else {
                        let spec = serde_json::to_value(&pod.spec).ok();
                        if spec != applied_spec {
                            applied_spec = spec;
                            update(&shared, &key, &pod, &mut told).await;
                        }
                        Next::Change
                    }
                }
            };
            let retry = async {
                match next {
                    Next::Retry => tokio::time::sleep(shared.config.retry_delay).await,
                    Next::Change => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                () = retry => {}
            }
        }
    }
    .instrument(span)
    .await
}

async fn create(shared: &Shared, key: &PodKey, pod: &Pod, told: &mut Told) -> Result<(), Next> {
    // One reader for the volume check and the env: each object is read once per pass.
    let mut reader = ObjectReader::new(shared.client.clone());
    let mut problems = Vec::new();
    let volumes = sources::check_volume_refs(&mut reader, pod, &mut problems).await;
    let env =
        env::resolve_pod_env(&mut reader, pod, &shared.config.allocatable, &mut problems).await;
    report_problems(shared, pod, &problems, told).await;
    if let Err(e) = volumes {
        // As the kubelet: the volumes come first, the pod waits in ContainerCreating.
        let msg = format!("MountVolume.SetUp failed: {}", error_chain(&e));
        warn!(error = %msg, "a volume's ConfigMap or Secret is not there");
        report_failure(shared, pod, told, "FailedMount", msg.clone()).await;
        write_status(shared, key, waiting_status(pod, "ContainerCreating", &msg)).await;
        return Err(Next::Retry);
    }
    let resolved = match env {
        Ok(p) => p,
        Err(e) => {
            let msg = error_chain(&e);
            warn!(error = %msg, "cannot resolve the pod's environment");
            report_failure(shared, pod, told, "Failed", format!("Error: {msg}")).await;
            let status = waiting_status(pod, "CreateContainerConfigError", &msg);
            write_status(shared, key, status).await;
            // A missing object may appear later; a refused one will not change by itself.
            return Err(match e {
                EnvError::UnsupportedField(_) | EnvError::Resource { .. } => Next::Change,
                _ => Next::Retry,
            });
        }
    };
    told.failure = None;
    match shared.provider.create_pod(&resolved).await {
        Ok(()) => {
            info!("provider accepted the pod");
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            warn!(error = %msg, "provider failed to create the pod");
            publish(
                shared,
                pod,
                PodEvent::warning(e.reason().to_owned(), msg.clone()),
            )
            .await;
            if e.is_retryable() {
                write_status(shared, key, waiting_status(pod, e.reason(), &msg)).await;
                Err(Next::Retry)
            } else {
                let mut status = waiting_status(pod, e.reason(), &msg);
                status.phase = Some("Failed".into());
                status.reason = Some(e.reason().to_owned());
                status.message = Some(msg);
                write_status(shared, key, status).await;
                Err(Next::Change)
            }
        }
    }
}

async fn update(shared: &Shared, key: &PodKey, pod: &Pod, told: &mut Told) {
    let mut reader = ObjectReader::new(shared.client.clone());
    let mut problems = Vec::new();
    let env =
        env::resolve_pod_env(&mut reader, pod, &shared.config.allocatable, &mut problems).await;
    report_problems(shared, pod, &problems, told).await;
    let resolved = match env {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("Error: {}", error_chain(&e));
            report_failure(shared, pod, told, "Failed", msg).await;
            return;
        }
    };
    told.failure = None;
    if let Err(e) = shared.provider.update_pod(&resolved).await {
        warn!(pod = %key, error = %e, "provider could not apply the pod update");
        publish(
            shared,
            pod,
            PodEvent::warning(e.reason().to_owned(), e.to_string()),
        )
        .await;
    }
}

async fn finish_deletion(shared: &Shared, key: &PodKey, pod: &Pod, created: bool) {
    if created {
        let grace = grace_of(pod);
        publish(
            shared,
            pod,
            PodEvent::normal(
                "Killing",
                format!("Stopping pod (grace period {}s)", grace.as_secs()),
            ),
        )
        .await;
        let mut attempts = 0;
        loop {
            match shared.provider.delete_pod(pod, grace).await {
                Ok(()) | Err(ProviderError::NotFound(_)) => break,
                Err(e) if e.is_retryable() && attempts < 5 => {
                    attempts += 1;
                    warn!(error = %e, attempts, "provider delete failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    warn!(error = %e, "provider delete failed; removing the pod object anyway");
                    publish(
                        shared,
                        pod,
                        PodEvent::warning("FailedKillPod", e.to_string()),
                    )
                    .await;
                    break;
                }
            }
        }
    }
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &key.namespace);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(key.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&key.name, &dp).await {
        Ok(_) => info!("pod deleted"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => debug!("pod already gone"),
        Err(e) => warn!(error = %error_chain(&e), "deleting the pod object failed"),
    }
}

/// A Pending status whose containers all wait with `reason`.
fn waiting_status(pod: &Pod, reason: &str, message: &str) -> PodStatus {
    let mut status = pod.status.clone().unwrap_or_default();
    status.phase = Some("Pending".into());
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    status.container_statuses = Some(
        containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                ready: false,
                started: Some(false),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.to_owned()),
                        message: Some(message.to_owned()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    );
    status
}

fn record_latest(shared: &Shared, pod: &Pod) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if let Ok(mut s) = shared.state.lock() {
        let entry = s.entry(uid).or_default();
        if entry.written.is_none() {
            entry.written = pod.status.clone();
        }
        entry.latest = Some(pod.clone());
    }
}

async fn handle_update(shared: &Shared, update: PodUpdate) {
    match update {
        PodUpdate::Status { key, status } => write_status(shared, &key, *status).await,
        PodUpdate::Event { key, event } => {
            let pod = shared
                .state
                .lock()
                .ok()
                .and_then(|s| s.get(&key.uid).and_then(|p| p.latest.clone()));
            match pod {
                Some(pod) => publish(shared, &pod, event).await,
                None => {
                    debug!(pod = %key, reason = %event.reason, "event for an unknown pod dropped")
                }
            }
        }
    }
}

/// Merges what only the API server knows into the provider's status.
fn merge_status(existing: Option<&PodStatus>, mut status: PodStatus, host_ip: &str) -> PodStatus {
    let mut conditions = status.conditions.take().unwrap_or_default();
    for c in existing
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        if c.type_ == "PodScheduled"
            && !conditions.iter().any(|x: &PodCondition| x.type_ == c.type_)
        {
            conditions.insert(0, c.clone());
        }
    }
    if !conditions.is_empty() {
        status.conditions = Some(conditions);
    }
    if status.host_ip.is_none() && !host_ip.is_empty() {
        status.host_ip = Some(host_ip.to_owned());
        status.host_ips = Some(vec![HostIP {
            ip: host_ip.to_owned(),
        }]);
    }
    if status.start_time.is_none() {
        status.start_time = existing.and_then(|s| s.start_time.clone());
    }
    if status.qos_class.is_none() {
        status.qos_class = existing.and_then(|s| s.qos_class.clone());
    }
    status
}

/// The strategic merge patch that writes `status` whole. Lists keyed by a merge key are
/// merged by the API server, so a list whose old entries must go (the pod's IPs, after a
/// VM came back with a new address) carries the `$patch: replace` directive: without it
/// the old and new IPs would both be kept and the API server refuses the pod ("may specify
/// no more than one IP for each IP family"). `podIPs` follows `podIP` when only that is set.
fn status_patch(uid: &str, status: &PodStatus) -> serde_json::Value {
    let mut status = status.clone();
    if status.pod_ips.is_none()
        && let Some(ip) = &status.pod_ip
    {
        status.pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP { ip: ip.clone() }]);
    }
    let mut body = serde_json::json!({ "metadata": { "uid": uid }, "status": status });
    if let Some(ips) = body
        .get_mut("status")
        .and_then(|s| s.get_mut("podIPs"))
        .and_then(serde_json::Value::as_array_mut)
    {
        ips.insert(0, serde_json::json!({ "$patch": "replace" }));
    }
    body
}

async fn write_status(shared: &Shared, key: &PodKey, status: PodStatus) {
    let raw = status.clone();
    let merged = {
        let Ok(state) = shared.state.lock() else {
            return;
        };
        let entry = state.get(&key.uid);
        let existing = entry.and_then(|e| e.written.as_ref());
        let merged = merge_status(existing, status, &shared.config.host_ip);
        if existing == Some(&merged) {
            return;
        }
        merged
    };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &key.namespace);
    // metadata.uid in the patch is a precondition: never write to a re-created pod.
    let body = status_patch(&key.uid, &merged);
    match api
        .patch_status(&key.name, &PatchParams::default(), &Patch::Strategic(&body))
        .await
    {
        Ok(pod) => {
            debug!(pod = %key, phase = ?merged.phase, "pod status written");
            if let Ok(mut s) = shared.state.lock() {
                let entry = s.entry(key.uid.clone()).or_default();
                entry.written = Some(merged);
                entry.latest = Some(pod);
                entry.unsent = None;
            }
        }
        Err(e) => {
            warn!(pod = %key, error = %error_chain(&e), "writing pod status failed; will retry");
            if let Ok(mut s) = shared.state.lock()
                && let Some(entry) = s.get_mut(&key.uid)
            {
                entry.unsent = Some((key.clone(), raw));
            }
        }
    }
}

/// How often status writes that failed (API server down, conflict, timeout) are retried.
const STATUS_RETRY: Duration = Duration::from_secs(3);

/// Writes again every status whose last write failed. Costs nothing when none did.
async fn retry_unsent(shared: &Shared) {
    let pending: Vec<(PodKey, PodStatus)> = match shared.state.lock() {
        Ok(mut s) => s.values_mut().filter_map(|e| e.unsent.take()).collect(),
        Err(_) => return,
    };
    for (key, status) in pending {
        write_status(shared, &key, status).await;
    }
}

/// Watch re-connection back-off: 0.5 s doubling to 5 s, with jitter, reset after 60 s of
/// health. kube's default grows to 30 s, which leaves a node blind for half a minute after
/// a short API server outage.
fn watch_backoff() -> kube::runtime::utils::ResetTimerBackoff<CappedBackoff> {
    kube::runtime::utils::ResetTimerBackoff::new(
        CappedBackoff::new(Duration::from_millis(500), Duration::from_secs(5)),
        Duration::from_secs(60),
    )
}

/// Exponential back-off with a cap and ±20 % jitter.
pub(crate) struct CappedBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl CappedBackoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }
}

impl Iterator for CappedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter from the clock's sub-second nanoseconds: enough to spread a fleet.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let permille = 800 + u64::from(nanos % 401); // 0.8 ..= 1.2
        let jittered = base.as_millis() as u64 * permille / 1000;
        Some(Duration::from_millis(jittered))
    }
}

impl kube::runtime::utils::Backoff for CappedBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

async fn publish(shared: &Shared, pod: &Pod, event: PodEvent) {
    let ev = KubeEvent {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.clone(),
        note: Some(truncate(&event.message, 1000)),
        action: event_action(&event.reason, &event.message),
        secondary: None,
    };
    let mut regarding = pod.object_ref(&());
    // As the kubelet does: events about one container name it, so the VM's and a
    // side-car's "Started" are separate events, not one series.
    regarding.field_path = event.container.map(|c| {
        let init = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .any(|x| x.name == c);
        if init {
            format!("spec.initContainers{{{c}}}")
        } else {
            format!("spec.containers{{{c}}}")
        }
    });
    if let Err(e) = shared.recorder.publish(&ev, &regarding).await {
        debug!(pod = %pod.name_any(), error = %e, "publishing an event failed");
    }
}

/// The event's `action`, which kube's recorder uses (with type, reason and regarding)
/// to fold repeats into one series: the reason plus a digest of the message, so the
/// same message repeats as a series (count, lastObservedTime) while a different one
/// ("Readiness probe failed" then "Liveness probe failed", both `Unhealthy`) is its
/// own event, as the kubelet shows them.
fn event_action(reason: &str, message: &str) -> String {
    // FNV-1a: stable across processes and releases (std's hasher is not).
    let mut h: u32 = 0x811c_9dc5;
    for b in message.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let mut action = reason.chars().take(118).collect::<String>();
    action.push_str(&format!("-{h:08x}"));
    action
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff as _;

    #[test]
    fn same_message_same_action_different_message_different_action() {
        let a = event_action("Unhealthy", "Readiness probe failed: x");
        assert_eq!(a, event_action("Unhealthy", "Readiness probe failed: x"));
        assert_ne!(a, event_action("Unhealthy", "Liveness probe failed: x"));
        assert!(a.starts_with("Unhealthy-") && a.len() <= 128, "{a}");
        assert!(event_action(&"R".repeat(300), "m").len() <= 128);
    }

    #[test]
    fn watch_backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = CappedBackoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let d: Vec<Duration> = (0..8).filter_map(|_| b.next()).collect();
        let within = |d: Duration, base: u64| {
            d >= Duration::from_millis(base * 8 / 10) && d <= Duration::from_millis(base * 12 / 10)
        };
        for (d, base) in d
            .iter()
            .zip([500, 1000, 2000, 4000, 5000, 5000, 5000, 5000])
        {
            assert!(within(*d, base), "{d:?} not within 20% of {base} ms");
        }
        b.reset();
        assert!(within(b.next().unwrap_or_default(), 500));
    }

    #[test]
    fn merge_keeps_scheduler_condition_and_host_ip() {
        let existing = PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let provider = PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let m = merge_status(Some(&existing), provider, "192.0.2.1");
        let types: Vec<_> = m
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["PodScheduled", "Ready"]);
        assert_eq!(m.host_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(m.phase.as_deref(), Some("Running"));
    }

    #[test]
    fn grace_prefers_the_deletion_grace_period() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "terminationGracePeriodSeconds": 12}
        }))
        .expect("valid pod");
        assert_eq!(grace_of(&pod), Duration::from_secs(12));
        pod.metadata.deletion_grace_period_seconds = Some(3);
        assert_eq!(grace_of(&pod), Duration::from_secs(3));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
