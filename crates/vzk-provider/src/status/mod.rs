//! Pod status, derived once from the pod's state (pure).
//!
//! # Contract
//! [`pod_status`] computes everything the provider reports about a pod (phase, the
//! pod's reason and message, the `Initialized`, `ContainersReady` and `Ready`
//! conditions, container and init-container statuses, the pod IP) in one pass from a
//! [`PodView`]: container 0's [`VmPhase`] and [`VmHistory`], the statuses the side-car
//! and init-container supervisors keep, and when initialization completed. The node
//! runtime merges what only the API server knows (`PodScheduled`, `hostIP`). The rules
//! are the kubelet's (`getPhase`, `GenerateContainersReadyCondition`), with one addition
//! for VMs: a VM in `Terminated` is final (the provider will not boot it again), so a
//! pod whose containers have all stopped is done whatever its `restartPolicy`.
//! * **Container 0**: `Waiting` → `waiting{reason, message}`; `Running` →
//!   `running{startedAt}`, `ready` when the guest answers SSH and the readiness probe (if
//!   any) passes, `started` once the startup probe passed; `Terminated` →
//!   `terminated{exitCode, reason, message, startedAt, finishedAt}`. `restartCount` and
//!   `lastState` come from the history, which survives VM restarts and agent restarts.
//! * **Init containers** in spec order: `ContainerCreating` reads `PodInitializing`; one
//!   that runs to completion is `ready` once terminated with exit code 0 and `started`
//!   only while running; a native side-car (`restartPolicy: Always`) keeps what its probes
//!   gave it. Until the pod is initialized every app container not running waits with
//!   reason `PodInitializing` and is neither ready nor started.
//! * **Phase**: not initialized → `Pending`, or `Failed` (reason `InitContainerFailed`,
//!   a message naming the container and its exit code) when an init container failed
//!   under `restartPolicy: Never`. Initialized, over the app containers (one waiting with
//!   a `lastState` is restarting and counts as stopped): any waiting → `Pending`; any
//!   running → `Running`; all stopped → `Running` under `Always` (or `OnFailure` with a
//!   failure) while the VM is not final, else `Succeeded` when every exit code is 0,
//!   else `Failed`.
//! * **Conditions**: `Initialized` is `True` from `initialized_at`, else `False`
//!   (`ContainersNotInitialized`, naming the incomplete init containers) since the
//!   start. `ContainersReady` and `Ready` are `True` when every app container and every
//!   native side-car is ready, else `False` with reason `ContainersNotReady`
//!   (`PodCompleted` once the phase is final) and a message naming the unready ones.
//!   Their `lastTransitionTime` is kept from the previous status while they do not change.
//! * **Pod IP**: the VM's address while it runs.
//!
//! [`should_restart`] is the `restartPolicy` decision for an exit code, shared by the VM,
//! side-car and init-container supervisors.

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Pod `reason` of a pod whose init container failed under `restartPolicy: Never`.
pub const INIT_FAILED_REASON: &str = "InitContainerFailed";

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
    /// The VM ended for good (or could never start): it is not booted again.
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

/// What container 0 carries across VM restarts. `restart_count` and `last_state` are
/// also kept on disk ([`crate::record::save_history`]) so they survive an agent restart.
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

/// Whether a container that ended with `exit_code` is run again under the pod's
/// `restartPolicy` (default `Always`): `Always` yes, `OnFailure` only for a non-zero
/// exit code, `Never` no. VM exit codes: 0 = the guest powered off on its own, 1 = the
/// hypervisor failed, 143 = stopped by the agent gracefully, 137 = forced off.
pub fn should_restart(restart_policy: Option<&str>, exit_code: i32) -> bool {
    match restart_policy.unwrap_or("Always") {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// Everything a pod's status is derived from (one snapshot).
#[derive(Debug, Clone, Copy)]
pub struct PodView<'a> {
    /// The pod as accepted.
    pub pod: &'a Pod,
    /// When the provider accepted the pod.
    pub start_time: &'a Time,
    /// Container 0.
    pub vm: &'a VmPhase,
    /// Container 0's restarts.
    pub history: &'a VmHistory,
    /// Statuses of containers 1..N as their supervisor keeps them (matched by name; a
    /// missing one is reported `ContainerCreating`).
    pub sidecars: &'a [ContainerStatus],
    /// Statuses of the init containers (matched by name, as above).
    pub init: &'a [ContainerStatus],
    /// When the init containers completed (the start time for a pod without any);
    /// `None` while they have not.
    pub initialized_at: Option<&'a Time>,
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message: message.filter(|m| !m.is_empty()),
        }),
        ..Default::default()
    }
}

fn not_started(c: &Container) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        state: Some(waiting("ContainerCreating", None)),
        started: Some(false),
        ..Default::default()
    }
}

/// Container 0's status from the VM's phase and history.
fn vm_container(c: &Container, vm: &VmPhase, history: &VmHistory) -> ContainerStatus {
    let (state, ready, started) = match vm {
        VmPhase::Waiting { reason, message } => {
            (waiting(reason, Some(message.clone())), false, false)
        }
        VmPhase::Running {
            started_at, ready, ..
        } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            },
            *ready,
            history.started,
        ),
        VmPhase::Terminated {
            exit_code,
            reason,
            message,
            started_at,
            finished_at,
        } => (
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
            false,
            false,
        ),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        ready,
        started: Some(started),
        restart_count: history.restart_count,
        state: Some(state),
        last_state: history.last_state.clone().map(|t| ContainerState {
            terminated: Some(t),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn is_native(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn terminated(s: &ContainerStatus) -> Option<&ContainerStateTerminated> {
    s.state.as_ref()?.terminated.as_ref()
}

fn completed(s: &ContainerStatus) -> bool {
    terminated(s).is_some_and(|t| t.exit_code == 0)
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.running.is_some())
}

/// An init container's status as the kubelet reports it.
fn init_container(c: &Container, mut s: ContainerStatus) -> ContainerStatus {
    if let Some(w) = s.state.as_mut().and_then(|st| st.waiting.as_mut())
        && w.reason.as_deref() == Some("ContainerCreating")
    {
        w.reason = Some("PodInitializing".into());
    }
    if !is_native(c) {
        s.started = Some(is_running(&s));
        s.ready = completed(&s);
    }
    s
}

/// An app container of a pod that is not initialized yet.
fn hold_for_init(s: &mut ContainerStatus) {
    let st = s.state.get_or_insert_with(ContainerState::default);
    if st.running.is_none() && st.terminated.is_none() {
        let message = st.waiting.as_ref().and_then(|w| w.message.clone());
        st.waiting = Some(ContainerStateWaiting {
            reason: Some("PodInitializing".into()),
            message,
        });
    }
    s.ready = false;
    s.started = Some(false);
}

/// The kubelet's phase over the app containers of an initialized pod.
fn app_phase(app: &[ContainerStatus], restart_policy: &str, vm_final: bool) -> &'static str {
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in app {
        let st = c.state.clone().unwrap_or_default();
        let last = c.last_state.as_ref().and_then(|l| l.terminated.as_ref());
        if st.running.is_some() {
            running += 1;
        } else if let Some(t) = st.terminated.as_ref().or(last) {
            // Terminated, or waiting to be restarted: either way it has run.
            stopped += 1;
            if t.exit_code == 0 {
                succeeded += 1;
            }
        } else {
            waiting += 1;
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped == 0 {
        "Pending"
    } else if restart_policy == "Always" && !vm_final {
        "Running"
    } else if stopped == succeeded {
        "Succeeded"
    } else if restart_policy == "OnFailure" && !vm_final {
        "Running"
    } else {
        "Failed"
    }
}

/// A condition, keeping `previous`'s transition time while its status is unchanged.
fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    at: Option<&Time>,
    previous: Option<&PodStatus>,
    now: &Time,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let kept = previous
        .and_then(|p| p.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone());
    PodCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: (!ok).then(|| reason.to_owned()),
        message: (!ok).then_some(message),
        last_transition_time: Some(at.cloned().or(kept).unwrap_or_else(|| now.clone())),
        ..Default::default()
    }
}

/// The pod's status (see the module docs). `previous` is the status last derived (for
/// condition transition times), `now` the time of this derivation.
pub fn pod_status(v: &PodView<'_>, previous: Option<&PodStatus>, now: &Time) -> PodStatus {
    let spec = v.pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let init_specs = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let policy = spec
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let find = |list: &[ContainerStatus], c: &Container| {
        list.iter()
            .find(|s| s.name == c.name)
            .cloned()
            .unwrap_or_else(|| not_started(c))
    };

    let mut app: Vec<ContainerStatus> = containers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i == 0 {
                vm_container(c, v.vm, v.history)
            } else {
                find(v.sidecars, c)
            }
        })
        .collect();
    let init: Vec<ContainerStatus> = init_specs
        .iter()
        .map(|c| init_container(c, find(v.init, c)))
        .collect();
    let initialized = v.initialized_at.is_some();
    if !initialized {
        app.iter_mut().for_each(hold_for_init);
    }

    let init_failure = (!initialized && policy == "Never")
        .then(|| {
            init_specs.iter().zip(&init).find_map(|(c, s)| {
                let t = terminated(s)?;
                (t.exit_code != 0 && !is_native(c)).then(|| (c.name.clone(), t.clone()))
            })
        })
        .flatten();
    let vm_final = matches!(v.vm, VmPhase::Terminated { .. });
    let phase = match (&init_failure, initialized) {
        (Some(_), _) => "Failed",
        (None, false) => "Pending",
        (None, true) => app_phase(&app, policy, vm_final),
    };
    let (reason, message) = match &init_failure {
        Some((name, t)) => (
            Some(INIT_FAILED_REASON.to_owned()),
            Some(format!(
                "Init container {name} failed with exit code {} ({})",
                t.exit_code,
                t.reason.as_deref().unwrap_or("Error")
            )),
        ),
        None => (None, None),
    };

    let incomplete: Vec<&str> = init_specs
        .iter()
        .zip(&init)
        .filter(|(c, s)| {
            if is_native(c) {
                s.started != Some(true)
            } else {
                !completed(s)
            }
        })
        .map(|(c, _)| c.name.as_str())
        .collect();
    let unready: Vec<&str> = app
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .chain(
            init_specs
                .iter()
                .zip(&init)
                .filter(|(c, s)| is_native(c) && !s.ready)
                .map(|(c, _)| c.name.as_str()),
        )
        .collect();
    let ready = unready.is_empty() && !app.is_empty();
    let not_ready_reason = if matches!(phase, "Succeeded" | "Failed") {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let unready_message = format!("containers with unready status: [{}]", unready.join(" "));
    let conditions = vec![
        condition(
            "Initialized",
            initialized,
            "ContainersNotInitialized",
            format!(
                "containers with incomplete status: [{}]",
                incomplete.join(" ")
            ),
            Some(v.initialized_at.unwrap_or(v.start_time)),
            previous,
            now,
        ),
        condition(
            "ContainersReady",
            ready,
            not_ready_reason,
            unready_message.clone(),
            None,
            previous,
            now,
        ),
        condition(
            "Ready",
            ready,
            not_ready_reason,
            unready_message,
            None,
            previous,
            now,
        ),
    ];
    let ip = match v.vm {
        VmPhase::Running { ip, .. } => ip.clone(),
        _ => None,
    };
    PodStatus {
        phase: Some(phase.to_owned()),
        reason,
        message,
        conditions: Some(conditions),
        pod_ips: ip.clone().map(|ip| vec![PodIP { ip }]),
        pod_ip: ip,
        start_time: Some(v.start_time.clone()),
        container_statuses: Some(app),
        init_container_statuses: (!init_specs.is_empty()).then_some(init),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
