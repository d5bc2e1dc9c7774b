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
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vzk_core::{PodEvent, PodKey};
use vzk_guest::{GuestConfig, GuestSession, HostKeyStore};
use vzk_image::{PinGuard, PullOptions, PullPolicy, Reference};
use vzk_vm::{BootSpec, DiskFormat, DiskSpec, MacAddr, NicSpec, Vm, VmSpec, VmState};

use crate::provider::Inner;
use crate::resources::vm_resources;
use crate::slots::Slot;
use crate::status::{VmPhase, pod_status};

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
        }
    }

    pub(crate) fn status(&self) -> PodStatus {
        let phase = lock(&self.phase).clone();
        pod_status(&self.pod, &phase, &self.start_time, 0, SIDECAR_REASON)
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

    fn container0(&self) -> Option<&k8s_openapi::api::core::v1::Container> {
        self.pod.spec.as_ref().and_then(|s| s.containers.first())
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

    pub(crate) fn event(&self, e: &PodEntry, ev: PodEvent) {
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

/// The lifecycle task of a new pod: runs until the VM ends or the pod is deleted.
pub(crate) async fn run_new(inner: Arc<Inner>, e: Arc<PodEntry>) {
    let cancel = e.cancel.clone();
    tokio::select! {
        () = cancel.cancelled() => {}
        () = create_and_watch(inner, e) => {}
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
    let invalid = |msg: String| {
        inner.event(&e, PodEvent::warning("Failed", msg.clone()));
        inner.waiting(&e, "InvalidVMImage", msg);
    };
    let Some(kernel) = image.kernel() else {
        invalid(format!(
            "image {image_name} has no kernel: the QEMU backend boots Linux images with a kernel (os {})",
            image.config.os.as_str()
        ));
        return;
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
    let spec = VmSpec {
        id: vm_id(&e.key.uid),
        cpus: res.cpus,
        memory_bytes: res.memory_bytes,
        boot: BootSpec::LinuxKernel {
            kernel,
            initrd: image.initrd(),
            cmdline: image
                .config
                .kernel_cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0".into()),
        },
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
    let created = inner
        .exec
        .run(async move {
            let _guard = guard;
            let vm = hv
                .create(spec)
                .await
                .map_err(|err| ("CreateContainerError", error_chain(&err)))?;
            *lock(&entry.vm) = Some(vm.clone());
            vm.start()
                .await
                .map_err(|err| ("RunContainerError", error_chain(&err)))?;
            Ok::<_, (&'static str, String)>(vm)
        })
        .await;
    let vm = match created {
        Ok(vm) => vm,
        Err((reason, msg)) => {
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

/// From a started (or adopted) VM: IP → SSH ready → postStart, then wait for the end.
async fn watch_vm(
    inner: Arc<Inner>,
    e: Arc<PodEntry>,
    vm: Arc<dyn Vm>,
    post_start: Option<k8s_openapi::api::core::v1::LifecycleHandler>,
) {
    let started_at = now();
    inner.set_phase(
        &e,
        VmPhase::Running {
            started_at: started_at.clone(),
            ip: None,
            ready: false,
        },
    );
    let ended = watch_end(&inner, &e, vm.clone(), started_at.clone());
    let ready = async {
        let ip = match vzk_vm::wait_for_ip(vm.as_ref(), inner.ready_timeout).await {
            Ok(ip) => ip,
            Err(err) => {
                inner.event(
                    &e,
                    PodEvent::warning(
                        "Unhealthy",
                        format!("VM address not found: {}", error_chain(&err)),
                    ),
                );
                return std::future::pending::<()>().await;
            }
        };
        inner.set_phase(
            &e,
            VmPhase::Running {
                started_at: started_at.clone(),
                ip: Some(ip.to_string()),
                ready: false,
            },
        );
        let session = GuestSession::new(
            std::net::SocketAddr::from((ip, 22)),
            e.creds.clone(),
            HostKeyStore::file(e.dir.join("ssh_host_key")),
            GuestConfig::from_env(),
        );
        *lock(&e.session) = Some(session.clone());
        let timeout = inner.ready_timeout;
        let s = session.clone();
        if let Err(err) = inner
            .exec
            .run(async move { s.wait_ready(timeout).await })
            .await
        {
            inner.event(
                &e,
                PodEvent::warning(
                    "Unhealthy",
                    format!(
                        "Readiness probe failed: guest SSH did not answer: {}",
                        vzk_guest::ErrorChain(&err)
                    ),
                ),
            );
            return std::future::pending::<()>().await;
        }
        // Volumes at their mountPath before postStart and readiness.
        if let Err(msg) = crate::volumes::mount_in_guest(&inner, &e, &session).await {
            inner.event(&e, PodEvent::warning("FailedMount", msg));
            return std::future::pending::<()>().await;
        }
        if let Some(cmd) = post_start.and_then(|h| h.exec).and_then(|x| x.command) {
            let s = session.clone();
            let out = inner.exec.run(async move { s.output(&cmd).await }).await;
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
                inner.event(&e, PodEvent::warning("FailedPostStartHook", msg));
                let v = vm.clone();
                let _ = inner.exec.run(async move { v.force_stop().await }).await;
                return std::future::pending::<()>().await;
            }
        }
        inner.set_phase(
            &e,
            VmPhase::Running {
                started_at: started_at.clone(),
                ip: Some(ip.to_string()),
                ready: true,
            },
        );
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = ended => {}
        () = ready => {}
    }
}

/// Waits for the VM to reach a final state, then records it and frees the slot.
async fn watch_end(inner: &Arc<Inner>, e: &Arc<PodEntry>, vm: Arc<dyn Vm>, started_at: Time) {
    let mut rx = vm.state();
    let state = loop {
        let s = rx.borrow_and_update().clone();
        if s.is_final() {
            break s;
        }
        if rx.changed().await.is_err() {
            break rx.borrow().clone();
        }
    };
    let (exit_code, reason, message) = match state {
        VmState::Failed { reason } => (1, "Error".to_owned(), Some(reason)),
        _ => (
            0,
            "Completed".to_owned(),
            Some("the guest powered off".to_owned()),
        ),
    };
    if exit_code != 0 {
        inner.event(
            e,
            PodEvent::warning(
                "Failed",
                format!("VM ended: {}", message.clone().unwrap_or_default()),
            ),
        );
    }
    inner.set_phase(
        e,
        VmPhase::Terminated {
            exit_code,
            reason,
            message,
            started_at: Some(started_at),
            finished_at: now(),
        },
    );
    lock(&e.slot).take();
    e.ended.cancel();
}

/// `a: b: c` of an error and its sources.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    vzk_guest::ErrorChain(e).to_string()
}

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
