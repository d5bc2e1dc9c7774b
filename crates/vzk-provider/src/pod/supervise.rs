//! Container 0 under the pod's one supervision loop ([`crate::restart::supervise`]):
//! watching a VM run, kills requested by probes and hooks, and booting it again.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use tracing::warn;
use vzk_core::PodEvent;
use vzk_vm::{Vm, VmSpec, VmState};

use crate::probes::ContainerProbes;
use crate::provider::Inner;
use crate::restart::{Ended, Restarts, Supervised, crash_loop_message, killing_message, supervise};
use crate::status::VmPhase;

use super::*;

/// How one VM run ended.
pub(super) enum RunEnd {
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
    /// The VM's disk, served on demand, failed for good (the registry gone past the
    /// retries, a frame that failed verification): the guest cannot be trusted to go on.
    DiskFailed(String),
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
/// kubelet's back-off) or record it as terminated ([`crate::restart::supervise`]).
///
/// VM "exit codes" (container 0's `terminated.exitCode`): 0 when the guest powered off
/// on its own (reason `Completed`), 1 when the hypervisor failed or crashed (`Error`),
/// 143 when the agent stopped it gracefully after a failed liveness/startup probe or
/// postStart hook (ACPI or SSH `poweroff`), 137 when it had to force it off (`Error`).
pub(super) async fn watch_vm(
    inner: Arc<Inner>,
    e: Arc<PodEntry>,
    vm: Arc<dyn Vm>,
    post_start: Option<k8s_openapi::api::core::v1::LifecycleHandler>,
) {
    // A guest can flood its console: keep the file within bounds while the VM runs.
    e.spawn(crate::logs::keep_console_within(
        e.console_log(),
        crate::logs::CONSOLE_MAX_BYTES,
        e.ended.clone(),
    ));
    let probes = match e.container0().map(ContainerProbes::from_container) {
        Some(Ok(p)) => p,
        Some(Err(err)) => {
            warn!(pod = %e.key, error = %err, "probes not run");
            ContainerProbes::default()
        }
        None => ContainerProbes::default(),
    };
    let restarts = Restarts::new(e.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()));
    // A restart boots the pod's disk cold (a reboot): restoring the template's memory
    // over a disk the pod has written would corrupt it.
    let mut spec = vm.spec().clone();
    spec.snapshot = None;
    let mut c = VmContainer {
        inner,
        e,
        spec,
        vm: Some(vm),
        post_start,
        probes,
    };
    supervise(&mut c, restarts).await;
}

/// Container 0 under [`supervise`].
struct VmContainer {
    inner: Arc<Inner>,
    e: Arc<PodEntry>,
    /// What every boot boots (same disk clone, same MAC).
    spec: VmSpec,
    /// The current VM (`None` while it is being booted again).
    vm: Option<Arc<dyn Vm>>,
    post_start: Option<k8s_openapi::api::core::v1::LifecycleHandler>,
    probes: ContainerProbes,
}

#[async_trait::async_trait]
impl Supervised for VmContainer {
    fn name(&self) -> &str {
        &self.e.container
    }

    fn pod(&self) -> &vzk_core::PodKey {
        &self.e.key
    }

    fn event(&self, ev: PodEvent) {
        self.inner.event(&self.e, ev);
    }

    async fn start(&mut self, restart: bool, restarts: &mut Restarts) -> bool {
        if !restart {
            // Booted by the create path, or re-adopted.
            return self.vm.is_some();
        }
        let (inner, e) = (&self.inner, &self.e);
        // Our handle must be the last one: the backend re-creates the VM under its id.
        self.vm = None;
        let vm = loop {
            match reboot(inner, e, self.spec.clone(), Console::Previous).await {
                Ok(v) => break v,
                Err((reason, msg)) => {
                    inner.event(e, PodEvent::warning("Failed", format!("Error: {msg}")));
                    inner.waiting(e, reason, msg);
                    tokio::time::sleep(restarts.retry_delay()).await;
                }
            }
        };
        inner.metrics.boot(true);
        let history = {
            let mut h = lock(&e.history);
            h.restart_count += 1;
            h.clone()
        };
        if let Err(err) = crate::record::save_history(&e.dir, &history) {
            warn!(pod = %e.key, error = %err, "keeping the VM's restart count on disk");
        }
        inner.event(
            e,
            PodEvent::normal("Started", format!("Started VM {} again", vm.id())),
        );
        self.vm = Some(vm);
        true
    }

    async fn run(&mut self, restarts: &Restarts) -> Ended {
        let (inner, e) = (&self.inner, &self.e);
        let Some(vm) = self.vm.clone() else {
            return std::future::pending().await;
        };
        let started_at = now();
        let ran_since = tokio::time::Instant::now();
        lock(&e.history).started = self.probes.startup.is_none();
        inner.set_phase(
            e,
            VmPhase::Running {
                started_at: started_at.clone(),
                ip: None,
                ready: false,
            },
        );
        let lazy_disk = lock(&e.lazy_disk).clone();
        let end = tokio::select! {
            s = final_state(vm.clone()) => RunEnd::Exited(s),
            reason = lazy_disk_failed(lazy_disk) => RunEnd::DiskFailed(reason),
            k = guest(inner, e, &vm, self.post_start.clone(), &started_at, ran_since, &self.probes) => k,
        };
        let (exit_code, reason, message) = match end {
            RunEnd::Exited(VmState::Failed { reason }) => {
                inner.event(
                    e,
                    PodEvent::warning("Failed", format!("VM ended: {reason}")),
                );
                (1, "Error".to_owned(), Some(reason))
            }
            RunEnd::DiskFailed(reason) => {
                let msg = format!("the VM's disk, served on demand, failed: {reason}");
                inner.event(e, PodEvent::warning("LazyDiskFailed", msg.clone()));
                let _ = vm.force_stop().await;
                if let Some(s) = e.session() {
                    s.close();
                }
                (1, "LazyDiskFailed".to_owned(), Some(msg))
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
                inner.event(
                    e,
                    PodEvent::normal("Killing", killing_message(&why, restarts.restarts(137))),
                );
                let path = stop_vm(inner, e, vm.clone(), grace).await;
                if let Some(s) = e.session() {
                    s.close();
                }
                let code = if path == StopPath::Forced { 137 } else { 143 };
                (code, "Error".to_owned(), Some(format!("{why}: {message}")))
            }
        };
        Ended {
            terminated: ContainerStateTerminated {
                exit_code,
                reason: Some(reason),
                message,
                started_at: Some(started_at),
                finished_at: Some(now()),
                ..Default::default()
            },
            ran_for: ran_since.elapsed(),
        }
    }

    fn finished(&mut self, ended: Ended) {
        let t = ended.terminated;
        self.inner.set_phase(
            &self.e,
            VmPhase::Terminated {
                exit_code: t.exit_code,
                reason: t.reason.unwrap_or_default(),
                message: t.message,
                started_at: t.started_at,
                finished_at: t.finished_at.unwrap_or_else(now),
            },
        );
        lock(&self.e.slot).take();
        self.e.ended.cancel();
    }

    fn restarting(&mut self, ended: &Ended, delay: Duration) {
        let e = &self.e;
        lock(&e.history).last_state = Some(ended.terminated.clone());
        if delay.is_zero() {
            self.inner.waiting(e, "ContainerCreating", "");
        } else {
            self.inner.waiting(
                e,
                "CrashLoopBackOff",
                crash_loop_message(delay, &e.container, &e.key),
            );
        }
    }
}

/// The reason a lazy disk failed, when it does (never for a disk that is not lazy, or
/// that completes).
async fn lazy_disk_failed(
    rx: Option<tokio::sync::watch::Receiver<vzk_image::LazyState>>,
) -> String {
    let Some(mut rx) = rx else {
        return std::future::pending().await;
    };
    let failed = match rx
        .wait_for(|s| matches!(s, vzk_image::LazyState::Failed(_)))
        .await
    {
        Ok(s) => match &*s {
            vzk_image::LazyState::Failed(r) => Some(r.clone()),
            _ => None,
        },
        Err(_) => None,
    };
    match failed {
        Some(r) => r,
        None => std::future::pending().await,
    }
}

/// The final state of `vm`.
pub(super) async fn final_state(vm: Arc<dyn Vm>) -> VmState {
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

/// What becomes of the ended boot's console log in [`reboot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Console {
    /// It becomes the previous boot's log.
    Previous,
    /// It is removed.
    Discard,
}

/// Boots the pod's VM again from `spec` (same disk clone, same MAC): removes the
/// ended VM, creates and starts a new one under the create lock (so deletion always
/// sees the current handle). The caller must hold no other handle on the old VM. The
/// guest's host key pin is reset: a new boot may generate a new host key (a guest whose
/// keys live in its initramfs does). `Console::Previous`: the ended boot's console log
/// becomes `kubectl logs --previous` (a restart); `Console::Discard`: it is dropped (a
/// restore that failed before the guest ran: nothing of it is a previous boot).
pub(super) async fn reboot(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    spec: VmSpec,
    console: Console,
) -> Result<Arc<dyn Vm>, (&'static str, String)> {
    if let Some(s) = lock(&e.session).take() {
        s.close();
    }
    let _ = std::fs::remove_file(e.dir.join(crate::pod::HOST_KEY_FILE));
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
        // The new boot writes a fresh console log.
        let kept = match console {
            Console::Previous => std::fs::rename(entry.console_log(), entry.previous_console_log()),
            Console::Discard => std::fs::remove_file(entry.console_log()),
        };
        if let Err(err) = kept
            && err.kind() != std::io::ErrorKind::NotFound
        {
            warn!(pod = %entry.key, error = %err, ?console, "setting the ended boot's console log aside");
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
