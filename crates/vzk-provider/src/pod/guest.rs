//! The guest side of one VM run: address, SSH readiness (bounded by the ready
//! timeout), volumes in the guest, postStart, and the probes against the VM.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use vzk_core::PodEvent;
use vzk_guest::{GuestSession, HostKeyStore};
use vzk_vm::Vm;

use crate::metrics::StartPhase;
use crate::probes::handlers::AbortOnDrop;
use crate::probes::{self, ContainerProbes, ExecOutcome, OutputBuf, ProbeTarget, ProbeUpdate};
use crate::provider::Inner;
use crate::status::VmPhase;

use super::*;

/// The guest side of one VM run: IP → SSH ready → postStart → probes. Returns only
/// when the VM must be killed (not ready within the ready timeout, failed
/// liveness/startup probe or postStart hook).
pub(super) async fn guest(
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
    // Only the pod's first run observes its start phases (a restart's are not a start's).
    let clock = lock(&e.start_clock).take();
    // Whatever ends this start before Ready marks its trace as an error.
    let _stop_unless_ready = crate::metrics::StopClock(clock.clone());
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
    if let Some(c) = &clock {
        c.phase(StartPhase::Ip);
    }
    // A restored guest is the template's until it is made the pod's own: the session
    // that did that is the pod's (its commands just ran: SSH answers). A booted guest's
    // session is the pod's while its SSH is waited for.
    let session = match &vm.spec().snapshot {
        Some(vzk_vm::SnapshotSpec::Restore { state }) => {
            match super::restore::reidentify(e, vm, ip, state, left()).await {
                Ok(session) => {
                    *lock(&e.session) = Some(session.clone());
                    session
                }
                Err(msg) => {
                    return not_ready(format!("Re-identifying the restored VM failed: {msg}"));
                }
            }
        }
        _ => {
            let session = guest_session(
                vm,
                ip,
                e.creds.clone(),
                HostKeyStore::file(e.dir.join(HOST_KEY_FILE)),
            );
            *lock(&e.session) = Some(session.clone());
            let (s, timeout) = (session.clone(), left());
            if let Err(err) = detached(async move { s.wait_ready(timeout).await }).await {
                return not_ready(format!(
                    "Readiness probe failed: guest SSH did not answer: {}",
                    vzk_guest::ErrorChain(&err)
                ));
            }
            session
        }
    };
    if let Some(c) = &clock {
        c.phase(StartPhase::Ssh);
    }
    // Volumes at their mountPath before postStart and readiness.
    let fs = crate::volumes::ShareFs::of(inner.hv.capabilities().backend, &vm.spec().boot);
    if let Err(msg) = crate::volumes::mount_in_guest(inner, e, &session, fs).await {
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
        if let Some(c) = &clock {
            c.ready();
        }
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
        ProbeUpdate::Ready(r) => {
            inner.set_phase(e, running(r));
            if r && let Some(c) = &clock {
                c.ready();
            }
        }
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
pub(super) fn probe_env(
    c: Option<&k8s_openapi::api::core::v1::Container>,
) -> Vec<(String, String)> {
    c.and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .filter(|v| !v.name.starts_with("VZ_SSH_") && vzk_guest::quote::is_env_name(&v.name))
        .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
        .collect()
}

/// Probes against the VM: exec over the guest's SSH (the remote command is signalled
/// when the probe times out), sockets opened through the VM handle (where its network is).
pub(super) struct VmProbeTarget {
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
