//! One VM pod: its shared state ([`PodEntry`]) and the lifecycle task that takes it
//! from accepted to running (pull → slot → clone → create → start → IP → SSH ready →
//! postStart) and watches the VM until it ends.
//!
//! # Contract
//! * Every step pushes a status (see [`crate::status`]) and the kubelet's events
//!   (`Pulling`, `Pulled`, `Created`, `Started`, `Failed`, `BackOff`, `Unhealthy`,
//!   `FailedPostStartHook`, `WaitingForVMSlot`).
//! * Image pull failures are retried with back-off (`ErrImagePull` then
//!   `ImagePullBackOff`, 10 s doubling to 5 min), as the kubelet does; an image the
//!   backend cannot boot is a permanent `Waiting{InvalidVMImage}`.
//! * The VM handle is stored in the entry under [`PodEntry::create_lock`] before the
//!   task can be cancelled again, so deletion always finds a VM it must stop.
//! * A VM that ends frees its slot at once; the overlay stays until deletion.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use vzk_core::{PodEvent, PodKey};
use vzk_guest::GuestSession;
use vzk_vm::Vm;

use crate::provider::Inner;
use crate::slots::Slot;
use crate::status::{PodView, VmHistory, VmPhase, pod_status};

/// The pod's pin of its guest's SSH host key, in the pod's directory.
pub(crate) const HOST_KEY_FILE: &str = "ssh_host_key";

/// An SSH session to port 22 of `ip`, dialled through `vm` (where the VM's network is).
pub(crate) fn guest_session(
    vm: &Arc<dyn Vm>,
    ip: std::net::Ipv4Addr,
    creds: vzk_guest::Credentials,
    host_keys: vzk_guest::HostKeyStore,
) -> GuestSession {
    let session = GuestSession::new(
        std::net::SocketAddr::from((ip, 22)),
        creds,
        host_keys,
        vzk_guest::GuestConfig::from_env(),
    );
    let through = vm.clone();
    session.connect_with(Arc::new(move |addr| {
        let vm = through.clone();
        Box::pin(async move { vm.connect(addr).await })
    }));
    session
}

/// The VM id of a pod UID.
pub(crate) fn vm_id(uid: &str) -> String {
    format!("vzk-{uid}")
}

/// The pod UID of a VM id made by [`vm_id`].
pub(crate) fn uid_of(vm_id: &str) -> Option<&str> {
    vm_id.strip_prefix("vzk-")
}

/// Shared state of one pod.
pub(crate) struct PodEntry {
    pub(crate) key: PodKey,
    pub(crate) pod: Pod,
    pub(crate) container: String,
    pub(crate) dir: PathBuf,
    pub(crate) start_time: Time,
    pub(crate) phase: Mutex<VmPhase>,
    pub(crate) vm: Mutex<Option<Arc<dyn Vm>>>,
    pub(crate) session: Mutex<Option<GuestSession>>,
    pub(crate) creds: vzk_guest::Credentials,
    /// Cancels the pod's tasks (deletion, agent shutdown).
    pub(crate) cancel: CancellationToken,
    /// The pod's tasks (lifecycle, side-car and init supervisors), each run in `span`.
    tasks: TaskTracker,
    /// The span every task of this pod runs in.
    span: tracing::Span,
    /// Fires when the VM has ended or the pod is deleted (ends log follows).
    pub(crate) ended: CancellationToken,
    pub(crate) create_lock: Arc<tokio::sync::Mutex<()>>,
    pub(crate) slot: Mutex<Option<Slot>>,
    pub(crate) pin: Mutex<Option<crate::images::ImagePin>>,
    /// The state of the VM's disk while it is served on demand (a lazy image).
    pub(crate) lazy_disk: Mutex<Option<tokio::sync::watch::Receiver<vzk_image::LazyState>>>,
    /// The server of the pod's own disk, where its clone is served rather than a file
    /// (an NBD disk for Virtualization.framework).
    pub(crate) disk_server: Mutex<Option<crate::images::ImagePin>>,
    /// Restarts, last state and `started` of container 0.
    pub(crate) history: Mutex<VmHistory>,
    /// Containers 1..N (Docker side-cars) and the init containers.
    pub(crate) sidecars: crate::sidecars::PodSidecars,
    /// Whether the init containers have completed.
    pub(crate) init: crate::init::PodInit,
    /// The status last derived (its conditions' transition times carry over).
    last_status: Mutex<Option<PodStatus>>,
    /// The clock of this pod's first start (none for a re-adopted VM).
    pub(crate) start_clock: Mutex<Option<Arc<crate::metrics::StartClock>>>,
}

impl PodEntry {
    pub(crate) fn new(
        key: PodKey,
        pod: Pod,
        dir: PathBuf,
        start_time: Time,
        creds: vzk_guest::Credentials,
    ) -> Self {
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let sidecars = crate::sidecars::PodSidecars::new(
            pod.spec
                .as_ref()
                .map(|s| s.containers.as_slice())
                .unwrap_or_default(),
            pod.spec
                .as_ref()
                .and_then(|s| s.init_containers.as_deref())
                .unwrap_or_default(),
        );
        let init = crate::init::PodInit::new(&pod, &start_time);
        let span = tracing::info_span!("pod", pod = %key);
        Self {
            key,
            pod,
            container,
            dir,
            start_time,
            phase: Mutex::new(VmPhase::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            }),
            vm: Mutex::new(None),
            session: Mutex::new(None),
            creds,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            span,
            ended: CancellationToken::new(),
            create_lock: Arc::new(tokio::sync::Mutex::new(())),
            slot: Mutex::new(None),
            pin: Mutex::new(None),
            lazy_disk: Mutex::new(None),
            disk_server: Mutex::new(None),
            history: Mutex::new(VmHistory::default()),
            sidecars,
            init,
            last_status: Mutex::new(None),
            start_clock: Mutex::new(None),
        }
    }

    /// The pod's status, derived from its state in one pass ([`crate::status`]).
    pub(crate) fn status(&self) -> PodStatus {
        let phase = lock(&self.phase).clone();
        let history = lock(&self.history).clone();
        let (sidecars, init) = self.sidecars.statuses();
        let initialized_at = self.init.initialized_at();
        let view = PodView {
            pod: &self.pod,
            start_time: &self.start_time,
            vm: &phase,
            history: &history,
            sidecars: &sidecars,
            init: &init,
            initialized_at: initialized_at.as_ref(),
        };
        let mut last = lock(&self.last_status);
        let status = pod_status(&view, last.as_ref(), &now());
        *last = Some(status.clone());
        status
    }

    /// Runs `fut` as one of the pod's tasks, in its span, until it ends or the pod's
    /// tasks are cancelled ([`PodEntry::cancel`]).
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use tracing::Instrument;
        let cancel = self.cancel.clone();
        self.tasks.spawn(
            async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = fut => {}
                }
            }
            .instrument(self.span.clone()),
        );
    }

    /// Cancels the pod's tasks and waits until every one has returned.
    pub(crate) async fn cancel_tasks(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The span of the pod's tasks.
    pub(crate) fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub(crate) fn vm(&self) -> Option<Arc<dyn Vm>> {
        lock(&self.vm).clone()
    }

    pub(crate) fn session(&self) -> Option<GuestSession> {
        lock(&self.session).clone()
    }

    pub(crate) fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The console of the VM's previous boot (kept when it is booted again).
    pub(crate) fn previous_console_log(&self) -> PathBuf {
        self.dir.join("console.previous.log")
    }

    fn container0(&self) -> Option<&k8s_openapi::api::core::v1::Container> {
        self.pod.spec.as_ref().and_then(|s| s.containers.first())
    }
}

/// Runs `fut` as a task of its own and waits for it: it runs to its end even if the caller
/// is dropped (a VM created under the create lock is always recorded, a stop in flight
/// completes). A panic in `fut` is resumed here.
pub(crate) async fn detached<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    match tokio::spawn(fut.in_current_span()).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("provider task cancelled: {e}"),
    }
}

/// Locks a std mutex, recovering from poisoning (the data are plain values).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}

impl Inner {
    pub(crate) fn set_phase(&self, e: &PodEntry, phase: VmPhase) {
        *lock(&e.phase) = phase;
        self.push_status(e);
    }

    pub(crate) fn push_status(&self, e: &PodEntry) {
        if let Some(n) = lock(&self.notifier).clone() {
            n.notify(e.key.clone(), e.status());
        }
    }

    /// An event about side-car `container`.
    pub(crate) fn container_event(&self, e: &PodEntry, container: &str, ev: PodEvent) {
        self.event(e, ev.in_container(container));
    }

    /// An event about container 0 (the VM) unless `ev` names another container.
    pub(crate) fn event(&self, e: &PodEntry, mut ev: PodEvent) {
        if ev.container.is_none() {
            ev.container = Some(e.container.clone());
        }
        info!(pod = %e.key, reason = %ev.reason, warning = ev.warning, message = %ev.message, "pod event");
        if let Some(n) = lock(&self.notifier).clone() {
            n.event(e.key.clone(), ev);
        }
    }

    fn waiting(&self, e: &PodEntry, reason: &str, message: impl Into<String>) {
        self.set_phase(
            e,
            VmPhase::Waiting {
                reason: reason.into(),
                message: message.into(),
            },
        );
    }
}

/// The lifecycle task of a new pod (run by [`PodEntry::spawn`]): runs until the VM
/// ends or the pod is deleted. The init containers run to completion first
/// ([`crate::init`]).
pub(crate) async fn run_new(inner: Arc<Inner>, e: Arc<PodEntry>) {
    if crate::init::run(&inner, &e).await {
        create_and_watch(inner, e).await;
    }
}

/// The lifecycle task of a re-adopted VM (run by [`PodEntry::spawn`]).
/// Serves the disk of a re-adopted pod again, which an agent before this one served on
/// demand; a failure is a `LazyDiskFailed` event (the VM's reads of its image then fail
/// once QEMU stops waiting for the server).
pub(crate) async fn reserve_lazy_disk(inner: Arc<Inner>, e: Arc<PodEntry>) {
    let Some(image) = e.container0().and_then(|c| c.image.clone()) else {
        return;
    };
    let res = match vzk_image::Reference::parse(&image) {
        Ok(reference) => {
            let (keyring, _) = inner.pull_keyring(&e.pod).await;
            let opts = inner.pull_options(&reference, keyring, vzk_image::PullPolicy::IfNotPresent);
            inner
                .images
                .reserve_lazy(&reference, &opts, &inner.args.lazy_options())
                .await
        }
        Err(err) => Err(err.into()),
    };
    match res {
        Ok(img) => {
            if let Some(l) = &img.lazy {
                *lock(&e.lazy_disk) = Some(l.disk().state());
                tracing::info!(pod = %e.key, nbd = %l.nbd_url(), "serving the VM's disk again");
            }
            match inner.images.pin(&img) {
                Ok(p) => *lock(&e.pin) = Some(p),
                Err(err) => warn!(pod = %e.key, error = %err, "cannot pin the image"),
            }
        }
        Err(err) => {
            let msg = format!(
                "the VM's disk was served on demand by the agent before this one and cannot be served again: {}",
                error_chain(err.as_ref())
            );
            warn!(pod = %e.key, error = %msg, "lazy disk lost");
            inner.event(&e, PodEvent::warning("LazyDiskFailed", msg));
        }
    }
}

pub(crate) async fn run_adopted(inner: Arc<Inner>, e: Arc<PodEntry>, vm: Arc<dyn Vm>) {
    watch_vm(inner, e, vm, None).await;
}

mod create;
mod guest;
mod restore;
mod stop;
mod supervise;

use create::*;
use guest::*;
pub(crate) use restore::prepare_ahead;
pub use stop::SHUTDOWN_COMMAND_ANNOTATION;
pub(crate) use stop::{StopPath, stop_vm};
pub(crate) use supervise::pod_grace;
use supervise::*;

/// `a: b: c` of an error and its sources.
pub(crate) use vzk_core::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use vzk_vm::VmSpec;

    #[test]
    fn vm_ids_are_valid_and_reversible() {
        let uid = "0b7c6a7e-6f1e-4c39-9f67-2d2b6f0b1a11";
        let id = vm_id(uid);
        assert!(VmSpec::is_valid_id(&id));
        assert_eq!(uid_of(&id), Some(uid));
        assert_eq!(uid_of("other-vm"), None);
    }
}
