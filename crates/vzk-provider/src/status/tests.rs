//! Tables of the status rules: container 0 alone, with side-cars, with init
//! containers, across restart policies and exit codes (what `kubectl get pod` shows is
//! checked with its printer's rules).
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStateTerminated, Pod};
use k8s_openapi::jiff::Timestamp;

use super::*;

fn now() -> Time {
    Time(Timestamp::now())
}

/// A pod of `n` containers (c0 the VM) under `policy`, with init containers `init`
/// (`"~name"`: a native side-car).
fn pod(n: usize, policy: Option<&str>, init: &[&str]) -> Pod {
    let init: Vec<serde_json::Value> = init
        .iter()
        .map(|n| match n.strip_prefix('~') {
            Some(n) => serde_json::json!({"name": n, "image": "bb", "restartPolicy": "Always"}),
            None => serde_json::json!({"name": n, "image": "bb"}),
        })
        .collect();
    let containers: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "image": format!("img{i}")}))
        .collect();
    let mut spec = serde_json::json!({"containers": containers, "restartPolicy": policy});
    if !init.is_empty() {
        spec["initContainers"] = serde_json::Value::Array(init);
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": spec,
    }))
    .unwrap()
}

fn w(name: &str, reason: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(waiting(reason, None)),
        ..Default::default()
    }
}

fn run(name: &str, ready: bool) -> ContainerStatus {
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

fn term_state(code: i32) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn term(name: &str, code: i32, restarts: i32) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(term_state(code)),
        restart_count: restarts,
        ..Default::default()
    }
}

/// Waiting to be restarted after a failure.
fn crash_loop(name: &str, restarts: i32) -> ContainerStatus {
    let mut s = w(name, "CrashLoopBackOff");
    s.last_state = Some(term_state(1));
    s.restart_count = restarts;
    s
}

fn vm_waiting(reason: &str) -> VmPhase {
    VmPhase::Waiting {
        reason: reason.into(),
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

fn vm_ended(code: i32) -> VmPhase {
    VmPhase::Terminated {
        exit_code: code,
        reason: if code == 0 { "Completed" } else { "Error" }.into(),
        message: None,
        started_at: Some(now()),
        finished_at: now(),
    }
}

/// Everything a test varies, with defaults for the rest.
struct View {
    pod: Pod,
    vm: VmPhase,
    history: VmHistory,
    sidecars: Vec<ContainerStatus>,
    init: Vec<ContainerStatus>,
    initialized_at: Option<Time>,
    start: Time,
}

impl View {
    fn new(pod: Pod, vm: VmPhase) -> Self {
        let start = now();
        let has_init = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|i| !i.is_empty());
        Self {
            pod,
            vm,
            history: VmHistory::default(),
            sidecars: Vec::new(),
            init: Vec::new(),
            initialized_at: (!has_init).then(|| start.clone()),
            start,
        }
    }
    fn sidecars(mut self, s: Vec<ContainerStatus>) -> Self {
        self.sidecars = s;
        self
    }
    fn init(mut self, s: Vec<ContainerStatus>, at: Option<&Time>) -> Self {
        self.init = s;
        self.initialized_at = at.cloned();
        self
    }
    fn history(mut self, h: VmHistory) -> Self {
        self.history = h;
        self
    }
    fn status(&self) -> PodStatus {
        self.status_after(None)
    }
    fn status_after(&self, previous: Option<&PodStatus>) -> PodStatus {
        pod_status(
            &PodView {
                pod: &self.pod,
                start_time: &self.start,
                vm: &self.vm,
                history: &self.history,
                sidecars: &self.sidecars,
                init: &self.init,
                initialized_at: self.initialized_at.as_ref(),
            },
            previous,
            &now(),
        )
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

fn c0(s: &PodStatus) -> &ContainerStatus {
    &s.container_statuses.as_ref().unwrap()[0]
}

fn waiting_reason(c: &ContainerStatus) -> Option<&str> {
    c.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

/// What `kubectl get pod` shows in its STATUS column (its printer's rules for init
/// containers, then the waiting reason of the first app container, or the phase).
fn kubectl(p: &Pod, s: &PodStatus) -> String {
    let init = p
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let mut reason = None;
    for (i, c) in s.init_container_statuses.iter().flatten().enumerate() {
        let st = c.state.as_ref().unwrap();
        let native = init.iter().any(|x| x.name == c.name && is_native(x));
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
        return waiting_reason(c0(s))
            .map(str::to_owned)
            .unwrap_or_else(|| s.phase.clone().unwrap());
    }
    reason.unwrap()
}

// ---- container 0 alone ----

#[test]
fn waiting_is_pending_with_the_reason() {
    let mut v = View::new(pod(1, None, &[]), vm_waiting("WaitingForVMSlot"));
    v.vm = VmPhase::Waiting {
        reason: "WaitingForVMSlot".into(),
        message: "2 of 2 VM slots in use".into(),
    };
    let s = v.status();
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert_eq!(waiting_reason(c0(&s)), Some("WaitingForVMSlot"));
    let msg = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(msg.message.as_deref(), Some("2 of 2 VM slots in use"));
    assert_eq!(s.pod_ip, None);
    assert_eq!(s.init_container_statuses, None);
}

#[test]
fn running_readiness_drives_the_conditions() {
    let s = View::new(pod(1, None, &[]), vm_running(false)).status();
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(cond(&s, "Initialized").status, "True");
    let r = cond(&s, "Ready");
    assert_eq!(
        (r.status.as_str(), r.reason.as_deref()),
        ("False", Some("ContainersNotReady"))
    );
    assert_eq!(
        r.message.as_deref(),
        Some("containers with unready status: [c0]")
    );
    assert_eq!(s.pod_ip.as_deref(), Some("10.0.0.5"));
    assert_eq!(s.pod_ips.as_ref().unwrap()[0].ip, "10.0.0.5");
    let s = View::new(pod(1, None, &[]), vm_running(true))
        .history(VmHistory {
            restart_count: 2,
            ..Default::default()
        })
        .status();
    assert_eq!(cond(&s, "ContainersReady").status, "True");
    assert_eq!(cond(&s, "Ready").status, "True");
    assert!(c0(&s).ready);
    assert_eq!(c0(&s).restart_count, 2);
    // With a side-car not started yet, the pod is not Ready.
    let s = View::new(pod(2, None, &[]), vm_running(true)).status();
    assert_eq!(cond(&s, "Ready").status, "False");
    let side = &s.container_statuses.as_ref().unwrap()[1];
    assert_eq!(
        (side.name.as_str(), waiting_reason(side)),
        ("c1", Some("ContainerCreating"))
    );
}

#[test]
fn exit_codes_decide_succeeded_or_failed() {
    let s = View::new(pod(1, None, &[]), vm_ended(0)).status();
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    let s = View::new(pod(1, None, &[]), vm_ended(137)).status();
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    let t = c0(&s).state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(t.exit_code, 137);
    let r = cond(&s, "Ready");
    assert_eq!(
        (r.status.as_str(), r.reason.as_deref()),
        ("False", Some("PodCompleted"))
    );
    assert_eq!(s.pod_ip, None, "no address once the VM is gone");
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
    let s = View::new(pod(1, None, &[]), vm_running(false))
        .history(h.clone())
        .status();
    assert_eq!(c0(&s).restart_count, 2);
    assert_eq!(c0(&s).started, Some(false), "startup probe not passed yet");
    assert_eq!(
        c0(&s)
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.clone()),
        Some(last)
    );
    let started = View::new(pod(1, None, &[]), vm_running(false))
        .history(VmHistory {
            started: true,
            ..h.clone()
        })
        .status();
    assert_eq!(c0(&started).started, Some(true));
    let backoff = View::new(pod(1, None, &[]), vm_waiting("CrashLoopBackOff")).history(h);
    let s = backoff.status();
    assert_eq!(s.phase.as_deref(), Some("Running"), "a restart in progress");
    assert_eq!(cond(&s, "Ready").status, "False");
    assert_eq!(c0(&s).started, Some(false));
    // A first start (no history) stays Pending.
    let s = View::new(pod(1, None, &[]), vm_waiting("CrashLoopBackOff")).status();
    assert_eq!(s.phase.as_deref(), Some("Pending"));
}

/// The phase table: restartPolicy × how container 0 stands × a side-car.
#[test]
fn phase_table_over_policies_exit_codes_and_sidecars() {
    type Case = (
        Option<&'static str>,
        fn() -> VmPhase,
        Option<fn() -> ContainerStatus>,
        bool,
        &'static str,
    );
    let restarting = VmHistory {
        restart_count: 1,
        last_state: Some(ContainerStateTerminated {
            exit_code: 1,
            ..Default::default()
        }),
        started: false,
    };
    // (policy, VM, side-car (None: no side-car), VM restarting, phase)
    let cases: &[Case] = &[
        (None, || vm_waiting("Pulling"), None, false, "Pending"),
        (None, || vm_running(true), None, false, "Running"),
        (
            None,
            || vm_waiting("CrashLoopBackOff"),
            None,
            true,
            "Running",
        ),
        (Some("Never"), || vm_ended(0), None, false, "Succeeded"),
        (Some("Never"), || vm_ended(143), None, false, "Failed"),
        (Some("OnFailure"), || vm_ended(0), None, false, "Succeeded"),
        // The VM could not be created (final under any policy).
        (Some("Always"), || vm_ended(128), None, false, "Failed"),
        (
            Some("OnFailure"),
            || vm_waiting("CrashLoopBackOff"),
            None,
            true,
            "Running",
        ),
        // VM still pulling, side-car running: Pending.
        (
            None,
            || vm_waiting("Pulling"),
            Some(|| run("c1", true)),
            false,
            "Pending",
        ),
        // VM running, side-car still being created: Pending, as the kubelet says.
        (
            None,
            || vm_running(true),
            Some(|| w("c1", "ContainerCreating")),
            false,
            "Pending",
        ),
        (
            None,
            || vm_running(true),
            Some(|| run("c1", false)),
            false,
            "Running",
        ),
        // OnFailure: a side-car that exited 0 is no failure; the pod runs on.
        (
            Some("OnFailure"),
            || vm_running(true),
            Some(|| term("c1", 0, 0)),
            false,
            "Running",
        ),
        // Never: everything ended, one failed → Failed.
        (
            Some("Never"),
            || vm_ended(0),
            Some(|| term("c1", 3, 0)),
            false,
            "Failed",
        ),
        (
            Some("Never"),
            || vm_ended(0),
            Some(|| term("c1", 0, 0)),
            false,
            "Succeeded",
        ),
        // Never: the VM ended but the side-car still runs.
        (
            Some("Never"),
            || vm_ended(1),
            Some(|| run("c1", true)),
            false,
            "Running",
        ),
        // OnFailure: all ended with 0 → Succeeded.
        (
            Some("OnFailure"),
            || vm_ended(0),
            Some(|| term("c1", 0, 0)),
            false,
            "Succeeded",
        ),
        // A side-car in back-off (waiting with a lastState) counts as started.
        (
            None,
            || vm_running(true),
            Some(|| crash_loop("c1", 1)),
            false,
            "Running",
        ),
        // Both restarting.
        (
            None,
            || vm_waiting("CrashLoopBackOff"),
            Some(|| crash_loop("c1", 3)),
            true,
            "Running",
        ),
    ];
    for (i, (policy, vm, side, restarting_vm, want)) in cases.iter().enumerate() {
        let n = if side.is_some() { 2 } else { 1 };
        let mut v = View::new(pod(n, *policy, &[]), vm());
        if let Some(side) = side {
            v = v.sidecars(vec![side()]);
        }
        if *restarting_vm {
            v = v.history(restarting.clone());
        }
        let s = v.status();
        assert_eq!(
            s.phase.as_deref(),
            Some(*want),
            "case {i}: {policy:?} {:?} {:?}",
            v.vm,
            v.sidecars
        );
        let ready = cond(&s, "Ready");
        let all_ready = s
            .container_statuses
            .as_ref()
            .unwrap()
            .iter()
            .all(|c| c.ready);
        assert_eq!(ready.status == "True", all_ready, "case {i}");
        if matches!(*want, "Succeeded" | "Failed") {
            assert_eq!(ready.reason.as_deref(), Some("PodCompleted"), "case {i}");
        }
    }
}

#[test]
fn ready_needs_every_container_and_names_the_unready() {
    let p = pod(3, None, &[]);
    let s = View::new(p.clone(), vm_running(true))
        .sidecars(vec![run("c1", false), run("c2", false)])
        .status();
    let r = cond(&s, "Ready");
    assert_eq!(r.status, "False");
    assert_eq!(
        r.message.as_deref(),
        Some("containers with unready status: [c1 c2]")
    );
    assert_eq!(cond(&s, "ContainersReady").status, "False");
    assert_eq!(s.container_statuses.as_ref().unwrap().len(), 3);
    let s = View::new(p, vm_running(true))
        .sidecars(vec![run("c1", true), run("c2", true)])
        .status();
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(cond(&s, "ContainersReady").status, "True");
    assert_eq!(cond(&s, "Ready").message, None);
}

#[test]
fn transition_times_move_only_when_a_condition_changes() {
    let v = View::new(pod(1, None, &[]), vm_running(false));
    let first = v.status();
    let t0 = cond(&first, "Ready").last_transition_time;
    std::thread::sleep(std::time::Duration::from_millis(5));
    let again = v.status_after(Some(&first));
    assert_eq!(cond(&again, "Ready").last_transition_time, t0, "unchanged");
    let ready = View::new(pod(1, None, &[]), vm_running(true)).status_after(Some(&again));
    let t1 = cond(&ready, "Ready").last_transition_time;
    assert_ne!(t1, t0, "changed to True");
    assert_eq!(
        cond(&again, "Initialized").last_transition_time,
        Some(v.start.clone()),
        "initialized at the start (no init containers)"
    );
}

// ---- init containers ----

/// The pod `p` with init containers seed, flaky (and the native side-car proxy first).
fn init_pod(policy: &str, native: bool) -> Pod {
    let names: &[&str] = if native {
        &["~proxy", "seed", "flaky"]
    } else {
        &["seed", "flaky"]
    };
    pod(1, Some(policy), names)
}

fn init_view(p: &Pod, vm: VmPhase, init: Vec<ContainerStatus>, at: Option<&Time>) -> PodStatus {
    View::new(p.clone(), vm).init(init, at).status()
}

#[test]
fn init_progress_is_pending_with_the_vm_initializing() {
    let p = init_pod("OnFailure", false);
    let wait = || vm_waiting("ContainerCreating");
    // Nothing ran yet.
    let s = init_view(
        &p,
        wait(),
        vec![w("seed", "PodInitializing"), w("flaky", "PodInitializing")],
        None,
    );
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert_eq!(kubectl(&p, &s), "Init:0/2");
    assert_eq!(waiting_reason(c0(&s)), Some("PodInitializing"));
    let c = cond(&s, "Initialized");
    assert_eq!(c.status, "False");
    assert_eq!(c.reason.as_deref(), Some("ContainersNotInitialized"));
    assert_eq!(
        c.message.as_deref(),
        Some("containers with incomplete status: [seed flaky]")
    );
    assert_eq!(cond(&s, "Ready").status, "False");
    // The first is pulling (ContainerCreating reads PodInitializing), then runs.
    let s = init_view(
        &p,
        wait(),
        vec![
            w("seed", "ContainerCreating"),
            w("flaky", "PodInitializing"),
        ],
        None,
    );
    assert_eq!(kubectl(&p, &s), "Init:0/2");
    let s = init_view(
        &p,
        wait(),
        vec![run("seed", false), w("flaky", "PodInitializing")],
        None,
    );
    assert_eq!(kubectl(&p, &s), "Init:0/2");
    let seed = &s.init_container_statuses.as_ref().unwrap()[0];
    assert!(!seed.ready && seed.started == Some(true));
    // The first completed: ready (the kubelet's rule), not started.
    let s = init_view(
        &p,
        wait(),
        vec![term("seed", 0, 0), run("flaky", false)],
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
    // A missing init status (not reported yet) reads PodInitializing too.
    let s = init_view(&p, wait(), vec![], None);
    let names: Vec<_> = s
        .init_container_statuses
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), waiting_reason(c)))
        .collect();
    assert_eq!(
        names,
        [
            ("seed", Some("PodInitializing")),
            ("flaky", Some("PodInitializing"))
        ]
    );
}

#[test]
fn a_failing_init_container_shows_error_then_crash_loop_and_stays_pending() {
    let p = init_pod("Always", false);
    let wait = || vm_waiting("ContainerCreating");
    let s = init_view(
        &p,
        wait(),
        vec![term("seed", 0, 0), term("flaky", 1, 0)],
        None,
    );
    assert_eq!(kubectl(&p, &s), "Init:Error");
    assert_eq!(s.phase.as_deref(), Some("Pending"), "retried, not failed");
    assert_eq!(s.reason, None);
    let s = init_view(
        &p,
        wait(),
        vec![term("seed", 0, 0), crash_loop("flaky", 1)],
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
    let p = init_pod("Never", false);
    let s = init_view(
        &p,
        vm_waiting("ContainerCreating"),
        vec![term("seed", 0, 0), term("flaky", 3, 0)],
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
    assert_eq!(waiting_reason(c0(&s)), Some("PodInitializing"));
    // Under OnFailure the same exit is retried: Pending, no pod reason.
    let p = init_pod("OnFailure", false);
    let s = init_view(
        &p,
        vm_waiting("ContainerCreating"),
        vec![term("seed", 0, 0), term("flaky", 3, 0)],
        None,
    );
    assert_eq!((s.phase.as_deref(), s.reason), (Some("Pending"), None));
}

#[test]
fn initialized_pods_report_completed_init_containers_and_the_vm() {
    let p = init_pod("OnFailure", false);
    let at = now();
    let done = vec![term("seed", 0, 0), term("flaky", 0, 2)];
    // The VM boots after initialization.
    let s = init_view(&p, vm_waiting("ContainerCreating"), done.clone(), Some(&at));
    let c = cond(&s, "Initialized");
    assert_eq!((c.status.as_str(), c.reason), ("True", None));
    assert_eq!(c.last_transition_time, Some(at.clone()));
    assert_eq!(kubectl(&p, &s), "ContainerCreating");
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    // Ready once the VM is.
    let s = init_view(&p, vm_running(true), done, Some(&at));
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
    let p = init_pod("Always", true);
    let wait = || vm_waiting("ContainerCreating");
    // The native side-car has not started yet: the next one waits.
    let s = init_view(
        &p,
        wait(),
        vec![
            w("proxy", "ContainerCreating"),
            w("seed", "PodInitializing"),
            w("flaky", "PodInitializing"),
        ],
        None,
    );
    assert_eq!(kubectl(&p, &s), "Init:0/3");
    // Started: counted as done for initialization.
    let s = init_view(
        &p,
        wait(),
        vec![
            run("proxy", true),
            run("seed", false),
            w("flaky", "PodInitializing"),
        ],
        None,
    );
    assert_eq!(kubectl(&p, &s), "Init:1/3");
    let proxy = &s.init_container_statuses.as_ref().unwrap()[0];
    assert!(proxy.ready && proxy.started == Some(true), "{proxy:?}");
    // Initialized, the VM ready, but the native side-car not ready: not Ready.
    let at = now();
    let s = init_view(
        &p,
        vm_running(true),
        vec![run("proxy", false), term("seed", 0, 0), term("flaky", 0, 0)],
        Some(&at),
    );
    assert_eq!(s.phase.as_deref(), Some("Running"));
    let r = cond(&s, "Ready");
    assert_eq!(r.status, "False");
    assert_eq!(
        r.message.as_deref(),
        Some("containers with unready status: [proxy]")
    );
    let s = init_view(
        &p,
        vm_running(true),
        vec![run("proxy", true), term("seed", 0, 0), term("flaky", 0, 0)],
        Some(&at),
    );
    assert_eq!(cond(&s, "Ready").status, "True");
    // A failed native side-car under Never does not fail the pod (it is restarted).
    let p = init_pod("Never", true);
    let s = init_view(
        &p,
        wait(),
        vec![
            term("proxy", 1, 0),
            w("seed", "PodInitializing"),
            w("flaky", "PodInitializing"),
        ],
        None,
    );
    assert_eq!((s.phase.as_deref(), s.reason), (Some("Pending"), None));
}
