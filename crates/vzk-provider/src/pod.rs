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

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vzk_core::{PodEvent, PodKey};
use vzk_guest::{GuestConfig, GuestSession, HostKeyStore};
use vzk_image::{PinGuard, PullOptions, PullPolicy, Reference};
use vzk_vm::{DiskFormat, DiskSpec, MacAddr, NicSpec, Vm, VmSpec, VmState};

use crate::probes::handlers::AbortOnDrop;
use crate::probes::{
    self, ContainerProbes, ExecOutcome, OutputBuf, ProbeTarget, ProbeUpdate, RestartBackoff,
};
use crate::provider::Inner;
use crate::resources::vm_resources;
use crate::slots::Slot;
use crate::status::{VmHistory, VmPhase, apply_vm_history, pod_status, should_restart};

/// Why side-cars are not run (reported on their container statuses).
pub(crate) const SIDECAR_REASON: &str =
    "containers 1..N (Docker side-cars) are not run by this provider version";

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
    /// Cancels the lifecycle task (deletion).
    pub(crate) cancel: CancellationToken,
    /// Fires when the VM has ended or the pod is deleted (ends log follows).
    pub(crate) ended: CancellationToken,
    pub(crate) task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub(crate) create_lock: Arc<tokio::sync::Mutex<()>>,
    pub(crate) slot: Mutex<Option<Slot>>,
    pub(crate) pin: Mutex<Option<PinGuard>>,
    /// Restarts, last state and `started` of container 0.
    pub(crate) history: Mutex<VmHistory>,
    /// Containers 1..N (Docker side-cars) and the init containers.
    pub(crate) sidecars: crate::sidecars::PodSidecars,
    /// Whether the init containers have completed.
    pub(crate) init: crate::init::PodInit,
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
            ended: CancellationToken::new(),
            task: Mutex::new(None),
            create_lock: Arc::new(tokio::sync::Mutex::new(())),
            slot: Mutex::new(None),
            pin: Mutex::new(None),
            history: Mutex::new(VmHistory::default()),
            sidecars,
            init,
        }
    }

    pub(crate) fn status(&self) -> PodStatus {
        let phase = lock(&self.phase).clone();
        let history = lock(&self.history).clone();
        let mut status = pod_status(
            &self.pod,
            &phase,
            &self.start_time,
            history.restart_count,
            SIDECAR_REASON,
        );
        apply_vm_history(&mut status, &history);
        let restart_policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref());
        self.sidecars.merge_into(&mut status, restart_policy);
        crate::init::apply_status(self, &mut status);
        status
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

fn now() -> Time {
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

/// The lifecycle task of a new pod: runs until the VM ends or the pod is deleted. The
/// init containers run to completion first ([`crate::init`]).
pub(crate) async fn run_new(inner: Arc<Inner>, e: Arc<PodEntry>) {
    let cancel = e.cancel.clone();
    tokio::select! {
        () = cancel.cancelled() => {}
        () = async move {
            if crate::init::run(&inner, &e).await {
                create_and_watch(inner, e).await;
            }
        } => {}
    }
}

/// The lifecycle task of a re-adopted VM.
pub(crate) async fn run_adopted(inner: Arc<Inner>, e: Arc<PodEntry>, vm: Arc<dyn Vm>) {
    let cancel = e.cancel.clone();
    tokio::select! {
        () = cancel.cancelled() => {}
        () = watch_vm(inner, e, vm, None) => {}
    }
}

async fn create_and_watch(inner: Arc<Inner>, e: Arc<PodEntry>) {
    let Some(c0) = e.container0().cloned() else {
        return;
    };
    let image_name = c0.image.clone().unwrap_or_default();
    let reference = match Reference::parse(&image_name) {
        Ok(r) => r,
        Err(err) => {
            inner.event(
                &e,
                PodEvent::warning(
                    "InspectFailed",
                    format!("Failed to parse image name {image_name:?}: {err}"),
                ),
            );
            inner.waiting(&e, "InvalidImageName", err.to_string());
            return;
        }
    };

    // 1. Pull (with back-off, like the kubelet).
    let policy = PullPolicy::from_k8s(c0.image_pull_policy.as_deref(), &reference);
    let mut backoff = Duration::from_secs(10);
    let image = loop {
        let creds = match inner.credentials_for(&e.pod, &reference).await {
            Ok(c) => c,
            Err(msg) => {
                inner.event(
                    &e,
                    PodEvent::warning("FailedToRetrieveImagePullSecret", msg.clone()),
                );
                Vec::new()
            }
        };
        let opts = PullOptions {
            credentials: creds,
            policy,
            plain_http: inner.plain_http(&reference),
            ..Default::default()
        };
        let cached = inner.images.get(&reference).ok().flatten().is_some();
        if !(cached && policy == PullPolicy::IfNotPresent) {
            inner.event(
                &e,
                PodEvent::normal("Pulling", format!("Pulling image \"{image_name}\"")),
            );
        }
        let t0 = Instant::now();
        match inner.images.pull(&reference, &opts).await {
            Ok(img) => {
                if cached && policy == PullPolicy::IfNotPresent {
                    inner.event(
                        &e,
                        PodEvent::normal(
                            "Pulled",
                            format!("Container image \"{image_name}\" already present on machine"),
                        ),
                    );
                } else {
                    inner.event(
                        &e,
                        PodEvent::normal(
                            "Pulled",
                            format!(
                                "Successfully pulled image \"{image_name}\" in {:.3}s",
                                t0.elapsed().as_secs_f64()
                            ),
                        ),
                    );
                }
                break img;
            }
            Err(err) => {
                let msg = format!(
                    "Failed to pull image \"{image_name}\": {}",
                    error_chain(&err)
                );
                warn!(pod = %e.key, error = %msg, "pull failed");
                inner.event(&e, PodEvent::warning("Failed", msg.clone()));
                inner.waiting(&e, "ErrImagePull", msg.clone());
                tokio::time::sleep(Duration::from_secs(1)).await;
                inner.event(
                    &e,
                    PodEvent::normal(
                        "BackOff",
                        format!("Back-off pulling image \"{image_name}\""),
                    ),
                );
                inner.waiting(
                    &e,
                    "ImagePullBackOff",
                    format!("Back-off pulling image \"{image_name}\": {msg}"),
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    };
    match inner.images.pin(&image) {
        Ok(p) => *lock(&e.pin) = Some(p),
        Err(err) => warn!(pod = %e.key, error = %err, "cannot pin the image"),
    }

    // 2. What to boot.
    let files = crate::boot::ImageFiles {
        kernel: image.kernel(),
        initrd: image.initrd(),
        aux: image.aux(),
    };
    let boot = match crate::boot::plan(
        &image_name,
        &image.config,
        &files,
        inner.hv.capabilities(),
        &e.dir,
    ) {
        Ok(b) => b,
        Err(err) => {
            inner.event(&e, PodEvent::warning("Failed", err.to_string()));
            inner.waiting(&e, err.reason(), err.to_string());
            return;
        }
    };
    let res = match vm_resources(
        c0.resources.as_ref(),
        image.config.cpus,
        image.config.memory_bytes,
        &inner.policy,
    ) {
        Ok(r) => r,
        Err(err) => {
            inner.event(&e, PodEvent::warning("Failed", err.to_string()));
            inner.waiting(&e, err.reason(), err.to_string());
            return;
        }
    };

    // 2b. Volumes (FailedMount events and retries, like the kubelet).
    let shared_dirs = crate::volumes::prepare_with_retry(&inner, &e).await;

    // 3. A VM slot.
    let slot = match inner.slots.try_acquire() {
        Some(s) => s,
        None => {
            let msg = format!(
                "all {} VM slots of this node are in use; waiting for one",
                inner.slots.capacity()
            );
            inner.event(&e, PodEvent::normal("WaitingForVMSlot", msg.clone()));
            inner.waiting(&e, "WaitingForVMSlot", msg);
            match inner.slots.acquire().await {
                Some(s) => s,
                None => return,
            }
        }
    };
    *lock(&e.slot) = Some(slot);
    inner.waiting(&e, "ContainerCreating", "");

    // 4. Clone the disk.
    let disk_base = image.disk();
    let (disk_path, format) = {
        let dest = e.dir.join("disk");
        match inner.cloner.clone_disk(&disk_base, &dest) {
            Ok(kind) => (
                dest,
                if kind.qemu_format() == "qcow2" {
                    DiskFormat::Qcow2
                } else {
                    DiskFormat::Raw
                },
            ),
            Err(err) => {
                let msg = format!("cloning the VM disk: {}", error_chain(&err));
                inner.event(&e, PodEvent::warning("Failed", msg.clone()));
                inner.waiting(&e, "CreateContainerError", msg);
                lock(&e.slot).take();
                return;
            }
        }
    };
    // 4b. The per-pod copy the boot needs (a macOS guest writes its aux storage/NVRAM).
    // std::fs::copy clones on APFS (clonefile), so this costs no space there.
    if let Some((from, to)) = &boot.clone
        && let Err(err) = std::fs::copy(from, to)
    {
        let msg = format!(
            "copying {} into the pod: {err}",
            from.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
        inner.event(&e, PodEvent::warning("Failed", msg.clone()));
        inner.waiting(&e, "CreateContainerError", msg);
        lock(&e.slot).take();
        return;
    }
    let spec = VmSpec {
        id: vm_id(&e.key.uid),
        cpus: res.cpus,
        memory_bytes: res.memory_bytes,
        boot: boot.spec,
        disks: vec![DiskSpec {
            path: disk_path,
            read_only: false,
            format,
        }],
        nics: vec![NicSpec {
            mac: MacAddr::random(),
            attachment: inner.args.network.clone(),
        }],
        shared_dirs,
        console_log: Some(e.console_log()),
    };

    // 5. Create and start, under the create lock so deletion sees the VM.
    let guard = e.create_lock.clone().lock_owned().await;
    let hv = inner.hv.clone();
    let entry = e.clone();
    let created = detached(async move {
        let _guard = guard;
        let vm = hv
            .create(spec)
            .await
            .map_err(|err| ("CreateContainerError", error_chain(&err)))?;
        *lock(&entry.vm) = Some(vm.clone());
        vm.start().await.map_err(|err| match err {
            vzk_vm::VmError::LimitReached { detail, .. } => ("VMLimitReached", detail),
            err => ("RunContainerError", error_chain(&err)),
        })?;
        Ok::<_, (&'static str, String)>(vm)
    })
    .await;
    let vm = match created {
        Ok(vm) => {
            lock(&inner.vm_limit).started();
            vm
        }
        Err((reason, msg)) => {
            let msg = if reason == "VMLimitReached" {
                inner.vm_limit_refused(&e, &msg)
            } else {
                msg
            };
            inner.event(&e, PodEvent::warning("Failed", format!("Error: {msg}")));
            inner.set_phase(
                &e,
                VmPhase::Terminated {
                    exit_code: 128,
                    reason: reason.into(),
                    message: Some(msg),
                    started_at: None,
                    finished_at: now(),
                },
            );
            lock(&e.slot).take();
            return;
        }
    };
    inner.event(
        &e,
        PodEvent::normal(
            "Created",
            format!(
                "Created VM {} ({} vCPU, {} MiB)",
                vm.id(),
                res.cpus,
                res.memory_bytes >> 20
            ),
        ),
    );
    inner.event(
        &e,
        PodEvent::normal("Started", format!("Started VM {}", vm.id())),
    );
    watch_vm(inner, e, vm, c0.lifecycle.and_then(|l| l.post_start)).await;
}

/// How one VM run ended.
enum RunEnd {
    /// The VM reached a final state on its own (guest power-off, QEMU crash).
    Exited(VmState),
    /// The agent must stop it: liveness/startup probe or postStart hook failed.
    Kill {
        /// Event text, e.g. `Container vm failed liveness probe`.
        why: String,
        /// Details for `lastState.terminated.message`.
        message: String,
        /// The grace for the stop.
        grace: Duration,
    },
}

/// The pod's `terminationGracePeriodSeconds` (default 30 s).
pub(crate) fn pod_grace(pod: &Pod) -> Duration {
    Duration::from_secs(
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30),
    )
}

/// From a started (or adopted) VM: IP → SSH ready → postStart → probes, until the VM
/// ends; then, per `restartPolicy`, boot it again from the same disk clone (with the
/// kubelet's back-off) or record it as terminated.
///
/// VM "exit codes" (container 0's `terminated.exitCode`): 0 when the guest powered off
/// on its own (reason `Completed`), 1 when QEMU failed or crashed (`Error`), 143 when
/// the agent stopped it gracefully after a failed liveness/startup probe or postStart
/// hook (ACPI or SSH `poweroff`), 137 when it had to force it off (`Error`).
async fn watch_vm(
    inner: Arc<Inner>,
    e: Arc<PodEntry>,
    mut vm: Arc<dyn Vm>,
    post_start: Option<k8s_openapi::api::core::v1::LifecycleHandler>,
) {
    let probes = match e.container0().map(ContainerProbes::from_container) {
        Some(Ok(p)) => p,
        Some(Err(err)) => {
            warn!(pod = %e.key, error = %err, "probes not run");
            ContainerProbes::default()
        }
        None => ContainerProbes::default(),
    };
    let policy = e.pod.spec.as_ref().and_then(|s| s.restart_policy.clone());
    let mut backoff = RestartBackoff::default();
    loop {
        let started_at = now();
        let ran_since = tokio::time::Instant::now();
        lock(&e.history).started = probes.startup.is_none();
        inner.set_phase(
            &e,
            VmPhase::Running {
                started_at: started_at.clone(),
                ip: None,
                ready: false,
            },
        );
        let end = tokio::select! {
            s = final_state(vm.clone()) => RunEnd::Exited(s),
            k = guest(&inner, &e, &vm, post_start.clone(), &started_at, ran_since, &probes) => k,
        };
        let (exit_code, reason, message) = match end {
            RunEnd::Exited(VmState::Failed { reason }) => {
                inner.event(
                    &e,
                    PodEvent::warning("Failed", format!("VM ended: {reason}")),
                );
                (1, "Error".to_owned(), Some(reason))
            }
            RunEnd::Exited(_) => (
                0,
                "Completed".to_owned(),
                Some("the guest powered off".to_owned()),
            ),
            RunEnd::Kill {
                why,
                message,
                grace,
            } => {
                let restart = should_restart(policy.as_deref(), 137);
                inner.event(
                    &e,
                    PodEvent::normal(
                        "Killing",
                        if restart {
                            format!("{why}, will be restarted")
                        } else {
                            why.clone()
                        },
                    ),
                );
                let path = stop_vm(&inner, &e, vm.clone(), grace).await;
                if let Some(s) = e.session() {
                    s.close();
                }
                let code = if path == StopPath::Forced { 137 } else { 143 };
                (code, "Error".to_owned(), Some(format!("{why}: {message}")))
            }
        };
        let finished_at = now();
        let terminated = ContainerStateTerminated {
            exit_code,
            reason: Some(reason.clone()),
            message: message.clone(),
            started_at: Some(started_at.clone()),
            finished_at: Some(finished_at.clone()),
            ..Default::default()
        };
        if !should_restart(policy.as_deref(), exit_code) {
            inner.set_phase(
                &e,
                VmPhase::Terminated {
                    exit_code,
                    reason,
                    message,
                    started_at: Some(started_at),
                    finished_at,
                },
            );
            lock(&e.slot).take();
            e.ended.cancel();
            return;
        }
        lock(&e.history).last_state = Some(terminated);
        let delay = backoff.next_delay(ran_since.elapsed());
        if !delay.is_zero() {
            inner.event(
                &e,
                PodEvent::warning(
                    "BackOff",
                    format!(
                        "Back-off restarting failed container {} in pod {}_{}({})",
                        e.container, e.key.name, e.key.namespace, e.key.uid
                    ),
                ),
            );
            inner.waiting(
                &e,
                "CrashLoopBackOff",
                format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    delay.as_secs(),
                    e.container,
                    e.key.name,
                    e.key.namespace,
                    e.key.uid
                ),
            );
            tokio::time::sleep(delay).await;
        } else {
            inner.waiting(&e, "ContainerCreating", "");
        }
        // Our handle must be the last one: the backend re-creates the VM under its id.
        let spec = vm.spec().clone();
        drop(vm);
        vm = loop {
            match reboot(&inner, &e, spec.clone()).await {
                Ok(v) => break v,
                Err((reason, msg)) => {
                    inner.event(&e, PodEvent::warning("Failed", format!("Error: {msg}")));
                    inner.waiting(&e, reason, msg);
                    tokio::time::sleep(backoff.next_delay(Duration::ZERO)).await;
                }
            }
        };
        let history = {
            let mut h = lock(&e.history);
            h.restart_count += 1;
            h.clone()
        };
        if let Err(err) = crate::record::save_history(&e.dir, &history) {
            warn!(pod = %e.key, error = %err, "keeping the VM's restart count on disk");
        }
        inner.event(
            &e,
            PodEvent::normal("Started", format!("Started VM {} again", vm.id())),
        );
    }
}

/// The final state of `vm`.
async fn final_state(vm: Arc<dyn Vm>) -> VmState {
    let mut rx = vm.state();
    loop {
        let s = rx.borrow_and_update().clone();
        if s.is_final() {
            return s;
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone();
        }
    }
}

/// Boots the pod's VM again from `spec` (same disk clone, same MAC): removes the
/// ended VM, creates and starts a new one under the create lock (so deletion always
/// sees the current handle). The caller must hold no other handle on the old VM. The
/// guest's host key pin is reset: a new boot may generate a new host key (a guest whose
/// keys live in its initramfs does).
async fn reboot(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    spec: VmSpec,
) -> Result<Arc<dyn Vm>, (&'static str, String)> {
    if let Some(s) = lock(&e.session).take() {
        s.close();
    }
    let _ = std::fs::remove_file(e.dir.join("ssh_host_key"));
    let guard = e.create_lock.clone().lock_owned().await;
    let hv = inner.hv.clone();
    let entry = e.clone();
    detached(async move {
        let _guard = guard;
        let old = lock(&entry.vm).take();
        if let Some(old) = old {
            if !old.state().borrow().is_final() {
                let _ = old.force_stop().await;
            }
            if let Err(err) = old.remove().await {
                *lock(&entry.vm) = Some(old);
                return Err(("CreateContainerError", error_chain(&err)));
            }
        }
        // The ended boot's console becomes `kubectl logs --previous`; the new boot
        // writes a fresh one.
        if let Err(err) = std::fs::rename(entry.console_log(), entry.previous_console_log())
            && err.kind() != std::io::ErrorKind::NotFound
        {
            warn!(pod = %entry.key, error = %err, "keeping the previous boot's console log");
        }
        let vm = hv
            .create(spec)
            .await
            .map_err(|err| ("CreateContainerError", error_chain(&err)))?;
        *lock(&entry.vm) = Some(vm.clone());
        vm.start()
            .await
            .map_err(|err| ("RunContainerError", error_chain(&err)))?;
        Ok(vm)
    })
    .await
}

/// The guest side of one VM run: IP → SSH ready → postStart → probes. Returns only
/// when the VM must be killed (not ready within the ready timeout, failed
/// liveness/startup probe or postStart hook).
async fn guest(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    vm: &Arc<dyn Vm>,
    post_start: Option<k8s_openapi::api::core::v1::LifecycleHandler>,
    started_at: &Time,
    ran_since: tokio::time::Instant,
    probes: &ContainerProbes,
) -> RunEnd {
    // --ready-timeout-secs bounds launch → address → SSH as a whole; past it the VM is
    // killed and restarted (or the pod fails) per restartPolicy, like a failed startup probe.
    let deadline = ran_since + inner.ready_timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let not_ready = |what: String| {
        inner.event(e, PodEvent::warning("Unhealthy", what.clone()));
        RunEnd::Kill {
            why: format!(
                "Container {} was not ready within {}s (--ready-timeout-secs)",
                e.container,
                inner.ready_timeout.as_secs()
            ),
            message: what,
            grace: pod_grace(&e.pod),
        }
    };
    let ip = match vzk_vm::wait_for_ip(vm.as_ref(), left()).await {
        Ok(ip) => ip,
        // The VM ended by itself: the caller reports that.
        Err(vzk_vm::VmError::Ended { .. }) => return std::future::pending().await,
        Err(err) => {
            return not_ready(format!("VM address not found: {}", error_chain(&err)));
        }
    };
    let running = |ready: bool| VmPhase::Running {
        started_at: started_at.clone(),
        ip: Some(ip.to_string()),
        ready,
    };
    inner.set_phase(e, running(false));
    let session = GuestSession::new(
        std::net::SocketAddr::from((ip, 22)),
        e.creds.clone(),
        HostKeyStore::file(e.dir.join("ssh_host_key")),
        GuestConfig::from_env(),
    );
    let through = vm.clone();
    session.connect_with(Arc::new(move |addr| {
        let vm = through.clone();
        Box::pin(async move { vm.connect(addr).await })
    }));
    *lock(&e.session) = Some(session.clone());
    let timeout = left();
    let s = session.clone();
    if let Err(err) = detached(async move { s.wait_ready(timeout).await }).await {
        return not_ready(format!(
            "Readiness probe failed: guest SSH did not answer: {}",
            vzk_guest::ErrorChain(&err)
        ));
    }
    // Volumes at their mountPath before postStart and readiness.
    if let Err(msg) = crate::volumes::mount_in_guest(inner, e, &session).await {
        inner.event(e, PodEvent::warning("FailedMount", msg));
        return std::future::pending().await;
    }
    if let Some(cmd) = post_start.and_then(|h| h.exec).and_then(|x| x.command) {
        let s = session.clone();
        let out = detached(async move { s.output(&cmd).await }).await;
        let failure = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "PostStartHook exited with {}: {}",
                o.status.code,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(err) => Some(format!(
                "PostStartHook failed: {}",
                vzk_guest::ErrorChain(&err)
            )),
        };
        if let Some(msg) = failure {
            inner.event(e, PodEvent::warning("FailedPostStartHook", msg.clone()));
            return RunEnd::Kill {
                why: format!("Container {} failed its postStart hook", e.container),
                message: msg,
                grace: pod_grace(&e.pod),
            };
        }
    }
    if probes.is_empty() {
        lock(&e.history).started = true;
        inner.set_phase(e, running(true));
        return std::future::pending().await;
    }
    let target = Arc::new(VmProbeTarget {
        vm: vm.clone(),
        session,
        ip: IpAddr::V4(ip),
        env: probe_env(e.container0()),
    });
    let req = probes::run(target, probes.clone(), ran_since, |u| match u {
        ProbeUpdate::Started => {
            lock(&e.history).started = true;
            inner.push_status(e);
        }
        ProbeUpdate::Ready(r) => inner.set_phase(e, running(r)),
        ProbeUpdate::Unhealthy { message, .. } => {
            inner.event(e, PodEvent::warning("Unhealthy", message));
        }
    })
    .await;
    inner.set_phase(e, running(false));
    RunEnd::Kill {
        why: format!(
            "Container {} failed {} probe",
            e.container,
            req.kind.as_str().to_lowercase()
        ),
        message: req.message,
        grace: req.grace.unwrap_or_else(|| pod_grace(&e.pod)),
    }
}

/// Container 0's env for exec probes: the values the node resolved, without the SSH
/// credentials and names a shell cannot export.
fn probe_env(c: Option<&k8s_openapi::api::core::v1::Container>) -> Vec<(String, String)> {
    c.and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .filter(|v| !v.name.starts_with("VZ_SSH_") && vzk_guest::quote::is_env_name(&v.name))
        .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
        .collect()
}

/// Probes against the VM: exec over the guest's SSH (the remote command is signalled
/// when the probe times out), sockets opened through the VM handle (where its network is).
struct VmProbeTarget {
    vm: Arc<dyn Vm>,
    session: GuestSession,
    ip: IpAddr,
    env: Vec<(String, String)>,
}

#[async_trait::async_trait]
impl ProbeTarget for VmProbeTarget {
    async fn exec(&self, argv: &[String]) -> Result<ExecOutcome, String> {
        let s = self.session.clone();
        let argv = argv.to_vec();
        let env = self.env.clone();
        let out = OutputBuf::default();
        let io = out.io();
        let mut task = AbortOnDrop(tokio::spawn(async move {
            s.exec_with_env(&argv, &env, io).await
        }));
        let status = (&mut task.0)
            .await
            .map_err(|e| format!("probe task: {e}"))?
            .map_err(|e| vzk_guest::ErrorChain(&e).to_string())?;
        Ok(ExecOutcome {
            code: status.code,
            output: out.take(),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let vm = self.vm.clone();
        let mut task = AbortOnDrop(tokio::spawn(async move { vm.connect(addr).await }));
        (&mut task.0).await.map_err(std::io::Error::other)?
    }

    fn pod_ip(&self) -> Option<IpAddr> {
        Some(self.ip)
    }
}

/// Which path stopped a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopPath {
    /// It had already ended.
    AlreadyStopped,
    /// The guest powered off on the ACPI power button.
    Acpi,
    /// The guest ignored ACPI and powered off on the SSH shutdown command.
    Ssh,
    /// Forced off at the deadline.
    Forced,
}

/// The annotation naming the guest's shutdown command (run with `sh -c` over SSH when
/// ACPI does not stop the VM); default `poweroff`.
pub const SHUTDOWN_COMMAND_ANNOTATION: &str = "vz-kubelet.io/shutdown-command";

/// How long ACPI alone gets out of `grace`: half of it, at least 5 s (or all of a
/// shorter grace). The rest is for the SSH shutdown command, then the VM is forced.
pub(crate) fn acpi_share(grace: Duration) -> Duration {
    (grace / 2).max(grace.min(Duration::from_secs(5)))
}

/// Stops `vm` within `grace`: ACPI power button; if the guest has not powered off
/// after [`acpi_share`], the shutdown command over SSH (the guest's session, if any);
/// forced off at the deadline. Logs and records an event naming the path taken.
pub(crate) async fn stop_vm(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    vm: Arc<dyn Vm>,
    grace: Duration,
) -> StopPath {
    let deadline = tokio::time::Instant::now() + grace;
    let is_final = |v: &Arc<dyn Vm>| v.state().borrow().is_final();
    if is_final(&vm) {
        return StopPath::AlreadyStopped;
    }
    let wait_end = |v: Arc<dyn Vm>, d: Duration| async move {
        vzk_vm::wait_for_state(v.as_ref(), d, "power-off", VmState::is_final)
            .await
            .is_ok()
    };
    let mut path = StopPath::Forced;
    let acpi = acpi_share(grace);
    if !acpi.is_zero() {
        let v = vm.clone();
        let requested = detached(async move { v.request_stop().await }).await;
        match requested {
            Ok(()) if wait_end(vm.clone(), acpi).await => path = StopPath::Acpi,
            Ok(()) => {}
            Err(err) => {
                warn!(pod = %e.key, error = %error_chain(&err), "ACPI power-off request failed")
            }
        }
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if path == StopPath::Forced
        && !remaining.is_zero()
        && let Some(session) = e.session()
    {
        let cmd: Vec<String> = match e
            .pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SHUTDOWN_COMMAND_ANNOTATION))
        {
            Some(c) => vec!["sh".into(), "-c".into(), c.clone()],
            None => vec!["poweroff".into()],
        };
        info!(pod = %e.key, ?cmd, "the guest ignored ACPI power-off; shutting it down over SSH");
        let run = tokio::spawn(async move { session.output(&cmd).await });
        let run = AbortOnDrop(run);
        // The command may never answer (the guest goes down under it): bounded.
        let _ = tokio::time::timeout(remaining.min(Duration::from_secs(5)), async {
            let mut r = run;
            (&mut r.0).await
        })
        .await;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if wait_end(vm.clone(), remaining).await {
            path = StopPath::Ssh;
        }
    }
    if path == StopPath::Forced {
        let v = vm.clone();
        if let Err(err) = detached(async move { v.force_stop().await }).await {
            warn!(pod = %e.key, error = %error_chain(&err), "force stop failed");
        }
    }
    let msg = match path {
        StopPath::AlreadyStopped => "the VM had already stopped".to_owned(),
        StopPath::Acpi => "the guest powered off on the ACPI power button".to_owned(),
        StopPath::Ssh => format!(
            "the guest ignored the ACPI power button for {}s and powered off on the shutdown command over SSH",
            acpi.as_secs()
        ),
        StopPath::Forced => format!(
            "the guest did not power off within the grace period ({}s); the VM was forced off",
            grace.as_secs()
        ),
    };
    info!(pod = %e.key, ?path, "VM stopped: {msg}");
    inner.event(
        e,
        if path == StopPath::Forced {
            PodEvent::warning("VMStopped", msg)
        } else {
            PodEvent::normal("VMStopped", msg)
        },
    );
    path
}

/// `a: b: c` of an error and its sources.
pub(crate) use vzk_core::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_valid_and_reversible() {
        let uid = "0b7c6a7e-6f1e-4c39-9f67-2d2b6f0b1a11";
        let id = vm_id(uid);
        assert!(VmSpec::is_valid_id(&id));
        assert_eq!(uid_of(&id), Some(uid));
        assert_eq!(uid_of("other-vm"), None);
    }
}
