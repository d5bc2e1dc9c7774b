//! Stopping a VM within a grace period: ACPI, then the shutdown command over SSH, then
//! force.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use vzk_core::PodEvent;
use vzk_vm::{Vm, VmState};

use crate::probes::handlers::AbortOnDrop;
use crate::provider::Inner;

use super::*;

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
