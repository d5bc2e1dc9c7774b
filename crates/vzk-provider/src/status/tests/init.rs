//! Init containers and native side-cars.

use super::*;

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
