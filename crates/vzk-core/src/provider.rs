//! The provider interface: what the node runtime asks of a pod backend.
//!
//! A backend implements three traits, bundled as [`Provider`]:
//!
//! * [`PodLifecycle`]: create, update, delete and report pods. Status flows back by
//!   *push*: the runtime hands the provider a [`PodNotifier`] once, and the provider
//!   sends a [`PodStatusUpdate`] whenever a pod's status changes. There is no polling.
//! * [`NodeProvider`]: node capacity, extra node conditions and a liveness ping.
//! * [`StreamingRuntime`]: logs, exec, attach, port-forward and stats for the kubelet API.
//!
//! # Guarantees the runtime gives a provider
//! * `create_pod` receives a pod whose container `env` is fully resolved: every
//!   `valueFrom` is replaced by a literal `value` and `envFrom` is expanded (the provider
//!   never needs to read Secrets or ConfigMaps for env).
//! * `create_pod` is called at most once per pod UID while the provider reports the pod
//!   (after an agent restart, pods the provider already lists are not created again).
//! * `delete_pod` is called once the pod has a `deletionTimestamp` (or no longer exists in
//!   the API server); `NotFound` from it is treated as success.
//!
//! # What a provider must do
//! * Never block the caller for long in `create_pod`: start the work and report progress
//!   through the notifier (Pending → Running …).
//! * Return typed [`ProviderError`]s; `Invalid` means "do not retry this pod spec".

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{NodeCondition, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tokio::sync::mpsc;

use crate::error::ProviderError;
use crate::stats::PodStats;
use crate::streams::{AttachIo, ContainerRef, ExitStatus, LogOptions, LogStream, PortStream};

/// Identifies one pod incarnation: namespace, name and UID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
    /// UID of the pod object (a pod re-created with the same name has a new UID).
    pub uid: String,
}

impl PodKey {
    /// Builds the key of a pod object; `None` if it lacks a namespace, name or UID.
    pub fn of(pod: &Pod) -> Option<Self> {
        let m = &pod.metadata;
        Some(Self {
            namespace: m.namespace.clone()?,
            name: m.name.clone()?,
            uid: m.uid.clone()?,
        })
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A change a provider pushes to the runtime.
#[derive(Debug, Clone)]
pub enum PodUpdate {
    /// A new status for a pod.
    Status {
        /// The pod the status belongs to.
        key: PodKey,
        /// The full pod status as the provider sees it. The runtime keeps the fields
        /// the provider cannot know (e.g. the scheduler's `PodScheduled` condition) and
        /// patches the API server only when the result differs from what it last wrote.
        status: Box<PodStatus>,
    },
    /// An event to record on a pod (Pulling, Pulled, Started, Unhealthy, ...).
    Event {
        /// The pod the event is about.
        key: PodKey,
        /// The event.
        event: PodEvent,
    },
}

/// An event about a pod, recorded by the runtime as an `events.k8s.io/v1` Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// `Warning` when true, `Normal` otherwise.
    pub warning: bool,
    /// CamelCase reason (`Pulling`, `Started`, `Failed`, ...).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// The container it is about (`regarding.fieldPath` = `spec.containers{name}`), or
    /// the pod as a whole.
    pub container: Option<String>,
}

impl PodEvent {
    /// The same event, about container `name`.
    pub fn in_container(mut self, name: impl Into<String>) -> Self {
        self.container = Some(name.into());
        self
    }

    /// A `Normal` event.
    pub fn normal(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason: reason.into(),
            message: message.into(),
            container: None,
        }
    }

    /// A `Warning` event.
    pub fn warning(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason: reason.into(),
            message: message.into(),
            container: None,
        }
    }
}

/// The channel a provider uses to push pod status changes and events to the runtime.
///
/// Cheap to clone; sending never blocks (the runtime coalesces status updates per pod).
#[derive(Debug, Clone)]
pub struct PodNotifier {
    tx: mpsc::UnboundedSender<PodUpdate>,
}

impl PodNotifier {
    /// Creates a notifier and the receiving end the runtime drains.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<PodUpdate>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Reports a new status for `key`. Returns `false` if the runtime has shut down.
    pub fn notify(&self, key: PodKey, status: PodStatus) -> bool {
        self.tx
            .send(PodUpdate::Status {
                key,
                status: Box::new(status),
            })
            .is_ok()
    }

    /// Records an event on `key`. Returns `false` if the runtime has shut down.
    pub fn event(&self, key: PodKey, event: PodEvent) -> bool {
        self.tx.send(PodUpdate::Event { key, event }).is_ok()
    }
}

/// Pod lifecycle operations.
#[async_trait]
pub trait PodLifecycle: Send + Sync + 'static {
    /// Starts running `pod` (env already resolved). Should return quickly; progress is
    /// reported through the [`PodNotifier`].
    async fn create_pod(&self, pod: &Pod) -> Result<(), ProviderError>;

    /// Applies a change to a running pod's spec. Return `Invalid` with reason
    /// `RecreateRequired` when the change cannot be applied in place.
    async fn update_pod(&self, pod: &Pod) -> Result<(), ProviderError>;

    /// Stops `pod`, giving its containers up to `grace` to exit, and releases all its
    /// resources. Returns when the pod is gone. `NotFound` is treated as success.
    async fn delete_pod(&self, pod: &Pod, grace: Duration) -> Result<(), ProviderError>;

    /// The current status of a pod the provider runs, `None` if it does not know it.
    async fn pod_status(&self, key: &PodKey) -> Result<Option<PodStatus>, ProviderError>;

    /// Every pod the provider currently runs (used to reconcile at start-up).
    async fn list_pods(&self) -> Result<Vec<PodKey>, ProviderError>;

    /// Installs the notifier used to push status changes. Called once, before any
    /// other pod operation.
    fn set_notifier(&self, notifier: PodNotifier);
}

/// Facts about the runtime, for the Node's `status.nodeInfo`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// e.g. `qemu://10.0.2` or `vz://macos-26`; goes to `containerRuntimeVersion`.
    pub container_runtime_version: String,
    /// Overrides the OS image reported for the node (default: the host's).
    pub os_image: Option<String>,
}

/// Node-level questions the node controller asks.
#[async_trait]
pub trait NodeProvider: Send + Sync + 'static {
    /// Capacity of the node (`cpu`, `memory`, `ephemeral-storage`, `pods`, extended
    /// resources). Allocatable is reported equal to capacity.
    async fn capacity(&self) -> Result<BTreeMap<String, Quantity>, ProviderError>;

    /// Extra node conditions owned by the provider (merged with the runtime's own
    /// Ready/MemoryPressure/DiskPressure/PIDPressure). Timestamps may be left empty;
    /// the runtime keeps `lastTransitionTime` stable while a condition does not change.
    async fn conditions(&self) -> Vec<NodeCondition> {
        Vec::new()
    }

    /// Liveness of the provider. While this fails the node lease is not renewed, so the
    /// control plane marks the node NotReady.
    async fn ping(&self) -> Result<(), ProviderError>;

    /// Runtime name and version for `nodeInfo`.
    fn runtime_info(&self) -> RuntimeInfo;
}

/// The streaming operations behind `kubectl logs/exec/attach/port-forward` and stats.
#[async_trait]
pub trait StreamingRuntime: Send + Sync + 'static {
    /// Logs of one container. With `opts.follow` the stream stays open and yields new
    /// output as it is written, until the container stops or the reader goes away.
    async fn logs(
        &self,
        target: &ContainerRef,
        opts: &LogOptions,
    ) -> Result<LogStream, ProviderError>;

    /// Runs `command` in a container. A non-zero exit is `Ok(ExitStatus)`, not an error.
    async fn exec(
        &self,
        target: &ContainerRef,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, ProviderError>;

    /// Attaches to the main process of a container.
    async fn attach(
        &self,
        target: &ContainerRef,
        io: AttachIo,
    ) -> Result<ExitStatus, ProviderError>;

    /// Connects `stream` to TCP `port` of the pod and copies bytes both ways until
    /// either side closes.
    async fn port_forward(
        &self,
        pod: &PodKey,
        port: u16,
        stream: PortStream,
    ) -> Result<(), ProviderError>;

    /// Per-pod resource usage, for `/stats/summary` and `/metrics/resource`.
    async fn pod_stats(&self) -> Result<Vec<PodStats>, ProviderError>;
}

/// Everything a pod backend implements.
pub trait Provider: PodLifecycle + NodeProvider + StreamingRuntime {}

impl<T: PodLifecycle + NodeProvider + StreamingRuntime> Provider for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn pod_key_requires_namespace_name_and_uid() {
        let mut pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("p".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(PodKey::of(&pod), None);
        pod.metadata.uid = Some("u1".into());
        let key = PodKey::of(&pod).expect("complete metadata");
        assert_eq!(key.to_string(), "ns/p");
        assert_eq!(key.uid, "u1");
    }

    #[tokio::test]
    async fn notifier_delivers_in_order_and_reports_shutdown() {
        let (n, mut rx) = PodNotifier::channel();
        let key = PodKey {
            namespace: "a".into(),
            name: "b".into(),
            uid: "c".into(),
        };
        for phase in ["Pending", "Running"] {
            let status = PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            };
            assert!(n.notify(key.clone(), status));
        }
        let phase = |u: Option<PodUpdate>| match u {
            Some(PodUpdate::Status { status, .. }) => status.phase,
            _ => None,
        };
        assert_eq!(phase(rx.recv().await).as_deref(), Some("Pending"));
        assert_eq!(phase(rx.recv().await).as_deref(), Some("Running"));
        assert!(n.event(key.clone(), PodEvent::warning("Failed", "boom")));
        match rx.recv().await {
            Some(PodUpdate::Event { event, .. }) => {
                assert!(event.warning && event.reason == "Failed")
            }
            other => panic!("expected an event, got {other:?}"),
        }
        drop(rx);
        assert!(!n.notify(key, PodStatus::default()));
    }
}
