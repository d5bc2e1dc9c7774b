//! Container 0 alone and with side-cars: phase table, readiness, transition times.

use super::*;

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
