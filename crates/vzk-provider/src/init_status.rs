//! The pod status of init containers (pure; the lifecycle is [`crate::init`]).
//!
//! # Contract
//! [`apply`] adds the init containers to a status built for the app containers
//! ([`crate::status::pod_status`], then the side-cars' merge), with the kubelet's rules:
//! * `initContainerStatuses` in spec order. An init container that runs to completion
//!   is `ready` once terminated with exit code 0 and `started` only while running; a
//!   native side-car (`restartPolicy: Always`) keeps the `started`/`ready` its probes
//!   (or, without any, running) gave it. `ContainerCreating` reads `PodInitializing`,
//!   the kubelet's reason for an init container not started yet.
//! * `Initialized`: `False` (reason `ContainersNotInitialized`, message naming the
//!   incomplete ones) until the lifecycle says the pod is initialized, then `True` from
//!   that time.
//! * Not initialized: phase `Pending`, every app container not running waits with reason
//!   `PodInitializing`, `ContainersReady`/`Ready` are `False`. Under `restartPolicy:
//!   Never` an init container terminated with a non-zero exit code fails the pod: phase
//!   `Failed`, reason `InitContainerFailed`, a message naming it and its exit code.
//! * Initialized: native side-cars' readiness counts for `ContainersReady`/`Ready`.

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Pod `reason` of a pod whose init container failed under `restartPolicy: Never`.
pub const INIT_FAILED_REASON: &str = "InitContainerFailed";

fn is_native(init: &[Container], name: &str) -> bool {
    init.iter()
        .any(|c| c.name == name && crate::init::is_native(c))
}

fn completed(s: &ContainerStatus) -> bool {
    s.state
        .as_ref()
        .and_then(|st| st.terminated.as_ref())
        .is_some_and(|t| t.exit_code == 0)
}

fn set_condition(
    status: &mut PodStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    at: Option<&Time>,
) {
    let conds = status.conditions.get_or_insert_with(Vec::new);
    let idx = match conds.iter().position(|c| c.type_ == type_) {
        Some(i) => i,
        None => {
            conds.push(PodCondition {
                type_: type_.to_owned(),
                ..Default::default()
            });
            conds.len() - 1
        }
    };
    let c = &mut conds[idx];
    let s = if ok { "True" } else { "False" };
    if let Some(at) = at {
        c.last_transition_time = Some(at.clone());
    } else if c.status != s {
        c.last_transition_time = Some(Time(Timestamp::now()));
    }
    c.status = s.to_owned();
    c.reason = (!ok).then(|| reason.to_owned());
    c.message = (!ok).then_some(message);
}

/// Adds `statuses` (of the `init` containers, in spec order) to `status`; see the module
/// docs. `initialized_at` is when the pod finished initializing (`None`: not yet),
/// `start_time` when the provider accepted it.
pub fn apply(
    status: &mut PodStatus,
    init: &[Container],
    mut statuses: Vec<ContainerStatus>,
    restart_policy: Option<&str>,
    initialized_at: Option<&Time>,
    start_time: &Time,
) {
    for s in &mut statuses {
        let st = s.state.get_or_insert_with(ContainerState::default);
        if let Some(w) = st.waiting.as_mut()
            && w.reason.as_deref() == Some("ContainerCreating")
        {
            w.reason = Some("PodInitializing".into());
        }
        if !is_native(init, &s.name) {
            s.started = Some(st.running.is_some());
            s.ready = completed(s);
        }
    }
    let incomplete: Vec<&str> = statuses
        .iter()
        .filter(|s| {
            if is_native(init, &s.name) {
                s.started != Some(true)
            } else {
                !completed(s)
            }
        })
        .map(|s| s.name.as_str())
        .collect();
    let failed = statuses.iter().find_map(|s| {
        let t = s.state.as_ref()?.terminated.as_ref()?;
        (restart_policy == Some("Never") && t.exit_code != 0 && !is_native(init, &s.name))
            .then(|| (s.name.clone(), t.clone()))
    });
    set_condition(
        status,
        "Initialized",
        initialized_at.is_some(),
        "ContainersNotInitialized",
        format!(
            "containers with incomplete status: [{}]",
            incomplete.join(" ")
        ),
        initialized_at.or(Some(start_time)),
    );
    let cs = status.container_statuses.get_or_insert_with(Vec::new);
    if initialized_at.is_none() {
        for c in cs.iter_mut() {
            let st = c.state.get_or_insert_with(ContainerState::default);
            if st.running.is_none() && st.terminated.is_none() {
                let message = st.waiting.as_ref().and_then(|w| w.message.clone());
                st.waiting = Some(ContainerStateWaiting {
                    reason: Some("PodInitializing".into()),
                    message,
                });
            }
            c.ready = false;
            c.started = Some(false);
        }
    }
    let unready: Vec<String> = cs
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.clone())
        .chain(
            statuses
                .iter()
                .filter(|s| is_native(init, &s.name) && !s.ready)
                .map(|s| s.name.clone()),
        )
        .collect();
    if let Some((name, t)) = &failed
        && initialized_at.is_none()
    {
        status.phase = Some("Failed".into());
        status.reason = Some(INIT_FAILED_REASON.into());
        status.message = Some(format!(
            "Init container {name} failed with exit code {} ({})",
            t.exit_code,
            t.reason.as_deref().unwrap_or("Error")
        ));
    } else if initialized_at.is_none() {
        status.phase = Some("Pending".into());
    }
    let not_ready_reason = if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    for type_ in ["ContainersReady", "Ready"] {
        let was_true = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == type_ && c.status == "True");
        if unready.is_empty() {
            continue;
        }
        let message = format!("containers with unready status: [{}]", unready.join(" "));
        let at = (!was_true)
            .then(|| {
                status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == type_)
                    .and_then(|c| c.last_transition_time.clone())
            })
            .flatten();
        set_condition(status, type_, false, not_ready_reason, message, at.as_ref());
    }
    status.init_container_statuses = Some(statuses);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStateTerminated, Pod};

    use super::*;
    use crate::status::{VmPhase, pod_status};

    fn pod(policy: &str, native: bool) -> Pod {
        let mut init = vec![
            serde_json::json!({"name": "seed", "image": "bb"}),
            serde_json::json!({"name": "flaky", "image": "bb"}),
        ];
        if native {
            init.insert(
                0,
                serde_json::json!({"name": "proxy", "image": "bb", "restartPolicy": "Always"}),
            );
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {
                "restartPolicy": policy,
                "initContainers": init,
                "containers": [{"name": "vm", "image": "vm"}]
            }
        }))
        .unwrap()
    }

    fn waiting(name: &str, reason: &str) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn running(name: &str, ready: bool) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..Default::default()
            }),
            started: Some(true),
            ready,
            ..Default::default()
        }
    }

    fn terminated(name: &str, code: i32, restarts: i32) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            restart_count: restarts,
            ..Default::default()
        }
    }

    fn crash_loop(name: &str, restarts: i32) -> ContainerStatus {
        let mut s = waiting(name, "CrashLoopBackOff");
        s.last_state = terminated(name, 1, 0).state;
        s.restart_count = restarts;
        s
    }

    fn now() -> Time {
        Time(Timestamp::now())
    }

    /// The pod's status as the provider reports it: the VM in `vm`, then the init
    /// containers.
    fn status(
        p: &Pod,
        vm: VmPhase,
        init: Vec<ContainerStatus>,
        initialized: Option<&Time>,
    ) -> PodStatus {
        let t = now();
        let mut s = pod_status(p, &vm, &t, 0, "");
        let spec = p.spec.as_ref().unwrap();
        apply(
            &mut s,
            spec.init_containers.as_deref().unwrap(),
            init,
            spec.restart_policy.as_deref(),
            initialized,
            &t,
        );
        s
    }

    fn vm_waiting() -> VmPhase {
        VmPhase::Waiting {
            reason: "ContainerCreating".into(),
            message: String::new(),
        }
    }

    fn vm_running(ready: bool) -> VmPhase {
        VmPhase::Running {
            started_at: now(),
            ip: Some("10.0.0.5".into()),
            ready,
        }
    }

    fn cond(s: &PodStatus, t: &str) -> PodCondition {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .cloned()
            .unwrap()
    }

    /// What `kubectl get pod` shows in its STATUS column (its printer's rules for init
    /// containers, then the waiting reason of the first app container, or the phase).
    fn kubectl(p: &Pod, s: &PodStatus) -> String {
        let spec = p.spec.as_ref().unwrap();
        let init = spec.init_containers.as_deref().unwrap();
        let mut reason = None;
        for (i, c) in s.init_container_statuses.iter().flatten().enumerate() {
            let st = c.state.as_ref().unwrap();
            let native = is_native(init, &c.name);
            if completed(c) || (native && c.started == Some(true)) {
                continue;
            }
            reason = Some(match (&st.terminated, &st.waiting) {
                (Some(t), _) => format!("Init:{}", t.reason.clone().unwrap()),
                (None, Some(w)) if w.reason.as_deref() != Some("PodInitializing") => {
                    format!("Init:{}", w.reason.clone().unwrap())
                }
                _ => format!("Init:{i}/{}", init.len()),
            });
            break;
        }
        if cond(s, "Initialized").status == "True" || reason.is_none() {
            let app = s.container_statuses.as_ref().unwrap()[0]
                .state
                .clone()
                .unwrap();
            return app
                .waiting
                .and_then(|w| w.reason)
                .unwrap_or_else(|| s.phase.clone().unwrap());
        }
        reason.unwrap()
    }

    #[test]
    fn init_progress_is_pending_with_the_vm_initializing() {
        let p = pod("OnFailure", false);
        // Nothing ran yet.
        let s = status(
            &p,
            vm_waiting(),
            vec![
                waiting("seed", "PodInitializing"),
                waiting("flaky", "PodInitializing"),
            ],
            None,
        );
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(kubectl(&p, &s), "Init:0/2");
        let vm = &s.container_statuses.as_ref().unwrap()[0];
        let w = vm.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(w.reason.as_deref(), Some("PodInitializing"));
        let c = cond(&s, "Initialized");
        assert_eq!(c.status, "False");
        assert_eq!(c.reason.as_deref(), Some("ContainersNotInitialized"));
        assert_eq!(
            c.message.as_deref(),
            Some("containers with incomplete status: [seed flaky]")
        );
        assert_eq!(cond(&s, "Ready").status, "False");
        // The first is pulling (ContainerCreating reads PodInitializing), then runs.
        let s = status(
            &p,
            vm_waiting(),
            vec![
                waiting("seed", "ContainerCreating"),
                waiting("flaky", "PodInitializing"),
            ],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:0/2");
        let s = status(
            &p,
            vm_waiting(),
            vec![running("seed", false), waiting("flaky", "PodInitializing")],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:0/2");
        let seed = &s.init_container_statuses.as_ref().unwrap()[0];
        assert!(!seed.ready && seed.started == Some(true));
        // The first completed: ready (the kubelet's rule), not started.
        let s = status(
            &p,
            vm_waiting(),
            vec![terminated("seed", 0, 0), running("flaky", false)],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:1/2");
        assert_eq!(
            cond(&s, "Initialized").message.as_deref(),
            Some("containers with incomplete status: [flaky]")
        );
        let seed = &s.init_container_statuses.as_ref().unwrap()[0];
        assert!(seed.ready && seed.started == Some(false), "{seed:?}");
        assert_eq!(s.phase.as_deref(), Some("Pending"));
    }

    #[test]
    fn a_failing_init_container_shows_error_then_crash_loop_and_stays_pending() {
        let p = pod("Always", false);
        let s = status(
            &p,
            vm_waiting(),
            vec![terminated("seed", 0, 0), terminated("flaky", 1, 0)],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:Error");
        assert_eq!(s.phase.as_deref(), Some("Pending"), "retried, not failed");
        assert_eq!(s.reason, None);
        let s = status(
            &p,
            vm_waiting(),
            vec![terminated("seed", 0, 0), crash_loop("flaky", 1)],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:CrashLoopBackOff");
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let flaky = &s.init_container_statuses.as_ref().unwrap()[1];
        assert_eq!(flaky.restart_count, 1);
        assert!(!flaky.ready);
    }

    #[test]
    fn never_fails_the_pod_naming_the_init_container_and_its_exit_code() {
        let p = pod("Never", false);
        let s = status(
            &p,
            vm_waiting(),
            vec![terminated("seed", 0, 0), terminated("flaky", 3, 0)],
            None,
        );
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        assert_eq!(s.reason.as_deref(), Some(INIT_FAILED_REASON));
        assert_eq!(
            s.message.as_deref(),
            Some("Init container flaky failed with exit code 3 (Error)")
        );
        assert_eq!(kubectl(&p, &s), "Init:Error");
        assert_eq!(cond(&s, "Initialized").status, "False");
        assert_eq!(
            cond(&s, "Ready").reason.as_deref(),
            Some("PodCompleted"),
            "the pod is done"
        );
        let vm = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            vm.state.as_ref().unwrap().waiting.as_ref().unwrap().reason,
            Some("PodInitializing".into())
        );
    }

    #[test]
    fn initialized_pods_report_completed_init_containers_and_the_vm() {
        let p = pod("OnFailure", false);
        let at = now();
        let done = vec![terminated("seed", 0, 0), terminated("flaky", 0, 2)];
        // The VM boots after initialization.
        let s = status(&p, vm_waiting(), done.clone(), Some(&at));
        let c = cond(&s, "Initialized");
        assert_eq!((c.status.as_str(), c.reason), ("True", None));
        assert_eq!(c.last_transition_time, Some(at.clone()));
        assert_eq!(kubectl(&p, &s), "ContainerCreating");
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        // Ready once the VM is.
        let s = status(&p, vm_running(true), done, Some(&at));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(kubectl(&p, &s), "Running");
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "ContainersReady").status, "True");
        let init = s.init_container_statuses.unwrap();
        assert_eq!(
            init.iter().map(|c| c.restart_count).collect::<Vec<_>>(),
            [0, 2]
        );
        assert!(init.iter().all(|c| c.ready));
    }

    #[test]
    fn native_sidecars_gate_the_next_init_container_and_count_for_readiness() {
        let p = pod("Always", true);
        // The native side-car has not started yet: the next one waits.
        let s = status(
            &p,
            vm_waiting(),
            vec![
                waiting("proxy", "ContainerCreating"),
                waiting("seed", "PodInitializing"),
                waiting("flaky", "PodInitializing"),
            ],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:0/3");
        // Started: counted as done for initialization.
        let s = status(
            &p,
            vm_waiting(),
            vec![
                running("proxy", true),
                running("seed", false),
                waiting("flaky", "PodInitializing"),
            ],
            None,
        );
        assert_eq!(kubectl(&p, &s), "Init:1/3");
        let proxy = &s.init_container_statuses.as_ref().unwrap()[0];
        assert!(proxy.ready && proxy.started == Some(true), "{proxy:?}");
        // Initialized, the VM ready, but the native side-car not ready: not Ready.
        let at = now();
        let s = status(
            &p,
            vm_running(true),
            vec![
                running("proxy", false),
                terminated("seed", 0, 0),
                terminated("flaky", 0, 0),
            ],
            Some(&at),
        );
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let r = cond(&s, "Ready");
        assert_eq!(r.status, "False");
        assert_eq!(
            r.message.as_deref(),
            Some("containers with unready status: [proxy]")
        );
        let s = status(
            &p,
            vm_running(true),
            vec![
                running("proxy", true),
                terminated("seed", 0, 0),
                terminated("flaky", 0, 0),
            ],
            Some(&at),
        );
        assert_eq!(cond(&s, "Ready").status, "True");
    }
}
