//! Pod status from the VM pod's lifecycle state (macos-vz-kubelet.md §3.6, with its
//! quirks fixed).
//!
//! # Contract
//! [`pod_status`] is a pure function of the pod spec and a [`VmPhase`]:
//! * `Waiting` (pulling, waiting for a VM slot, booting before the VM runs, a failure
//!   we keep retrying) → phase `Pending`, container 0 `waiting{reason, message}`.
//! * `Running` → phase `Running`, container 0 `running{startedAt}`, `ready` when the
//!   guest answers SSH and the readiness probe (if any) passes;
//!   `ContainersReady`/`Ready` follow it.
//! * `Terminated` → phase `Succeeded` for exit code 0, else `Failed`;
//!   container 0 `terminated{exitCode, reason, message, startedAt, finishedAt}`.
//! * `Initialized` is `True` from the start; a pod with init containers gets it (and
//!   `initContainerStatuses`) from [`crate::init_status`].
//! * The `PodScheduled` condition and `hostIP` are merged by the node runtime.
//! * Other containers (side-cars) are reported `waiting` with the reason given.
//! * [`apply_vm_history`] adds what survives VM restarts: `restartCount`,
//!   `lastState.terminated`, `started` (startup probe), and keeps a pod whose VM waits
//!   to be restarted (`CrashLoopBackOff`) `Running`; [`should_restart`] is the
//!   `restartPolicy` decision for a VM exit code (0 guest power-off, 1 QEMU failure,
//!   143 stopped by the agent, 137 forced).

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Where the VM of a pod is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum VmPhase {
    /// Not running yet (or retrying): `reason` is a CamelCase kubelet-style reason
    /// (`ContainerCreating`, `Pulling`, `WaitingForVMSlot`, `ErrImagePull`...).
    Waiting {
        /// Reason.
        reason: String,
        /// Message.
        message: String,
    },
    /// The VM runs.
    Running {
        /// When the VM started.
        started_at: Time,
        /// The VM's IP, once discovered.
        ip: Option<String>,
        /// Whether the guest answers (SSH).
        ready: bool,
    },
    /// The VM ended (or could never start).
    Terminated {
        /// 0 for a clean power-off.
        exit_code: i32,
        /// `Completed`, `Error`, or a failure reason.
        reason: String,
        /// Details.
        message: Option<String>,
        /// When it started, if it did.
        started_at: Option<Time>,
        /// When it ended.
        finished_at: Time,
    },
}

fn condition(type_: &str, ok: bool, reason: Option<&str>, at: &Time) -> PodCondition {
    PodCondition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: (!ok).then(|| reason.unwrap_or("ContainersNotReady").to_owned()),
        last_transition_time: Some(at.clone()),
        ..Default::default()
    }
}

/// The status of `pod` whose container 0 is in `vm`; `start_time` is when the provider
/// accepted the pod; `sidecar_reason` explains side-cars that are not run.
pub fn pod_status(
    pod: &Pod,
    vm: &VmPhase,
    start_time: &Time,
    restart_count: i32,
    sidecar_reason: &str,
) -> PodStatus {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let (phase, ready, ip, state) = match vm {
        VmPhase::Waiting { reason, message } => (
            "Pending",
            false,
            None,
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: (!message.is_empty()).then(|| message.clone()),
                }),
                ..Default::default()
            },
        ),
        VmPhase::Running {
            started_at,
            ip,
            ready,
        } => (
            "Running",
            *ready,
            ip.clone(),
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            },
        ),
        VmPhase::Terminated {
            exit_code,
            reason,
            message,
            started_at,
            finished_at,
        } => (
            if *exit_code == 0 {
                "Succeeded"
            } else {
                "Failed"
            },
            false,
            None,
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: started_at.clone(),
                    finished_at: Some(finished_at.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    };
    let now = match vm {
        VmPhase::Running { started_at, .. } => started_at.clone(),
        VmPhase::Terminated { finished_at, .. } => finished_at.clone(),
        VmPhase::Waiting { .. } => start_time.clone(),
    };
    let mut statuses = Vec::with_capacity(containers.len());
    for (i, c) in containers.iter().enumerate() {
        let (state, ready, started) = if i == 0 {
            let started = matches!(vm, VmPhase::Running { .. });
            (state.clone(), ready, Some(started))
        } else {
            (
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("SidecarNotRun".into()),
                        message: Some(sidecar_reason.to_owned()),
                    }),
                    ..Default::default()
                },
                false,
                Some(false),
            )
        };
        statuses.push(ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: String::new(),
            ready,
            started,
            restart_count: if i == 0 { restart_count } else { 0 },
            state: Some(state),
            ..Default::default()
        });
    }
    let all_ready = ready && containers.len() <= 1;
    let not_ready_reason = match vm {
        VmPhase::Terminated { .. } => "PodCompleted",
        _ => "ContainersNotReady",
    };
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![
            condition("Initialized", true, None, start_time),
            condition("ContainersReady", all_ready, Some(not_ready_reason), &now),
            condition("Ready", all_ready, Some(not_ready_reason), &now),
        ]),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        start_time: Some(start_time.clone()),
        container_statuses: Some(statuses),
        ..Default::default()
    }
}

/// What container 0 carries across VM restarts (merged by [`apply_vm_history`]).
/// `restart_count` and `last_state` are also kept on disk ([`crate::record::save_history`])
/// so they survive an agent restart.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmHistory {
    /// How many times the VM was booted again.
    pub restart_count: i32,
    /// How the previous VM run ended (`lastState.terminated`).
    pub last_state: Option<ContainerStateTerminated>,
    /// Whether the startup probe passed (true at once without one).
    #[serde(skip)]
    pub started: bool,
}

/// Whether a VM that ended with `exit_code` is booted again under the pod's
/// `restartPolicy` (default `Always`): `Always` yes, `OnFailure` only for a non-zero
/// exit code, `Never` no. VM exit codes: 0 = the guest powered off on its own, 1 = QEMU
/// failed or crashed, 143 = stopped by the agent gracefully, 137 = forced off.
pub fn should_restart(restart_policy: Option<&str>, exit_code: i32) -> bool {
    match restart_policy.unwrap_or("Always") {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// Merges `history` into a status made by [`pod_status`]: container 0's
/// `restartCount`, `lastState` and `started`; a VM waiting to be restarted (it has a
/// `lastState`) keeps the pod `Running`, as the kubelet's phase rules say for a
/// container that is restarting.
pub fn apply_vm_history(status: &mut PodStatus, history: &VmHistory) {
    let Some(cs) = status
        .container_statuses
        .as_mut()
        .and_then(|c| c.first_mut())
    else {
        return;
    };
    cs.restart_count = history.restart_count;
    cs.last_state = history.last_state.clone().map(|t| ContainerState {
        terminated: Some(t),
        ..Default::default()
    });
    let state = cs.state.as_ref();
    if state.is_some_and(|s| s.running.is_some()) {
        cs.started = Some(history.started);
    }
    if state.is_some_and(|s| s.waiting.is_some()) && history.last_state.is_some() {
        status.phase = Some("Running".into());
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn pod(n: usize) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: (0..n)
                    .map(|i| Container {
                        name: format!("c{i}"),
                        image: Some(format!("img{i}")),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn cond(s: &PodStatus, t: &str) -> String {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
            .unwrap_or_default()
    }

    #[test]
    fn waiting_is_pending_with_the_reason() {
        let t = Time(Timestamp::now());
        let s = pod_status(
            &pod(1),
            &VmPhase::Waiting {
                reason: "WaitingForVMSlot".into(),
                message: "2 of 2 VM slots in use".into(),
            },
            &t,
            0,
            "",
        );
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.clone().unwrap_or_default()[0];
        let w = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
        assert_eq!(
            w.and_then(|w| w.reason.as_deref()),
            Some("WaitingForVMSlot")
        );
        assert_eq!(s.pod_ip, None);
    }

    #[test]
    fn running_readiness_drives_the_conditions() {
        let t = Time(Timestamp::now());
        let mut vm = VmPhase::Running {
            started_at: t.clone(),
            ip: Some("10.0.0.5".into()),
            ready: false,
        };
        let s = pod_status(&pod(1), &vm, &t, 0, "");
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Initialized"), "True");
        assert_eq!(cond(&s, "Ready"), "False");
        assert_eq!(s.pod_ip.as_deref(), Some("10.0.0.5"));
        if let VmPhase::Running { ready, .. } = &mut vm {
            *ready = true;
        }
        let s = pod_status(&pod(1), &vm, &t, 2, "");
        assert_eq!(cond(&s, "ContainersReady"), "True");
        assert_eq!(cond(&s, "Ready"), "True");
        let cs = &s.container_statuses.clone().unwrap_or_default()[0];
        assert!(cs.ready);
        assert_eq!(cs.restart_count, 2);
        // With a side-car that is not run, the pod is never Ready.
        let s = pod_status(&pod(2), &vm, &t, 0, "no docker");
        assert_eq!(cond(&s, "Ready"), "False");
    }

    #[test]
    fn exit_codes_decide_succeeded_or_failed() {
        let t = Time(Timestamp::now());
        let term = |code| VmPhase::Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: Some(t.clone()),
            finished_at: t.clone(),
        };
        let s = pod_status(&pod(1), &term(0), &t, 0, "");
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let s = pod_status(&pod(1), &term(137), &t, 0, "");
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let cs = &s.container_statuses.clone().unwrap_or_default()[0];
        let term = cs.state.as_ref().and_then(|s| s.terminated.as_ref());
        assert_eq!(term.map(|t| t.exit_code), Some(137));
        assert_eq!(cond(&s, "Ready"), "False");
    }

    #[test]
    fn restart_policies_decide_by_exit_code() {
        assert!(should_restart(None, 0));
        assert!(should_restart(Some("Always"), 0));
        assert!(should_restart(Some("Always"), 1));
        assert!(!should_restart(Some("OnFailure"), 0));
        assert!(should_restart(Some("OnFailure"), 137));
        assert!(!should_restart(Some("Never"), 1));
        assert!(!should_restart(Some("Never"), 0));
    }

    #[test]
    fn history_sets_restarts_last_state_started_and_keeps_a_restarting_pod_running() {
        let t = Time(Timestamp::now());
        let last = ContainerStateTerminated {
            exit_code: 143,
            reason: Some("Error".into()),
            ..Default::default()
        };
        let h = VmHistory {
            restart_count: 2,
            last_state: Some(last.clone()),
            started: false,
        };
        let running = VmPhase::Running {
            started_at: t.clone(),
            ip: None,
            ready: false,
        };
        let mut s = pod_status(&pod(1), &running, &t, 2, "");
        apply_vm_history(&mut s, &h);
        let cs = &s.container_statuses.clone().unwrap_or_default()[0];
        assert_eq!(cs.restart_count, 2);
        assert_eq!(cs.started, Some(false), "startup probe not passed yet");
        assert_eq!(
            cs.last_state.as_ref().and_then(|l| l.terminated.clone()),
            Some(last)
        );
        let backoff = VmPhase::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: "back-off 10s".into(),
        };
        let mut s = pod_status(&pod(1), &backoff, &t, 2, "");
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        apply_vm_history(&mut s, &h);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready"), "False");
        // A first start (no history) stays Pending.
        let mut s = pod_status(&pod(1), &backoff, &t, 0, "");
        apply_vm_history(&mut s, &VmHistory::default());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
    }
}
