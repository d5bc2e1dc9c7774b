//! The VM: restart and back-off, slots, deletion order, ready timeout, pull back-off,
//! shutdown.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_failing_vm_restarts_under_always_with_doubling_back_off() {
    let h = harness(Opts::default()).await;
    let p = pod("crashy", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let id = vm_id(&p);
    for round in 1..=4 {
        h.hv.vm(&id).unwrap().fail("qemu exited with signal 9");
        let s = h
            .until(&p, "restarted", |s| {
                running(s) && c0(s).restart_count == round
            })
            .await;
        let last = c0(&s)
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }
    // Each fail is followed by a start: at once, then after 10 s, 20 s, 40 s (the kubelet's
    // CrashLoopBackOff), measured from the failure.
    let starts = h.hv.log.times(&format!("start {id}"));
    assert_eq!(starts.len(), 5, "{:?}", h.hv.log.calls());
    let failed = h.events("Failed");
    assert_eq!(failed.len(), 4, "{:?}", h.reasons());
    let delays: Vec<u64> = failed
        .iter()
        .zip(&starts[1..])
        .map(|((t, _), s)| (*s - *t).as_secs())
        .collect();
    assert_eq!(delays, [0, 10, 20, 40]);
    assert_eq!(h.events("BackOff").len(), 3);
    // Every restart removed the ended VM before creating the next.
    let calls = h.hv.log.calls();
    let life: Vec<&str> = calls
        .iter()
        .filter(|c| c.ends_with(&id))
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        life[..8],
        [
            "create", "start", "remove", "create", "start", "remove", "create", "start"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn while_restarting_the_pod_shows_crash_loop_back_off_and_stays_running() {
    let h = harness(Opts::default()).await;
    let p = pod("loop", "OnFailure");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let id = vm_id(&p);
    h.hv.vm(&id).unwrap().fail("boom");
    h.until(&p, "first restart", |s| {
        running(s) && c0(s).restart_count == 1
    })
    .await;
    h.hv.vm(&id).unwrap().fail("boom");
    let s = h
        .until(&p, "back-off", |s| {
            waiting_reason(s).as_deref() == Some("CrashLoopBackOff")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert!(!c0(&s).ready);
    let msg = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert!(
        msg.message
            .as_deref()
            .unwrap()
            .starts_with("back-off 10s restarting failed container=vm"),
        "{msg:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn under_never_a_failed_vm_fails_the_pod_and_frees_its_slot() {
    let h = harness(Opts {
        max_vms: 1,
        ..Opts::default()
    })
    .await;
    let a = pod("once", "Never");
    let b = pod("next", "Never");
    h.provider.create_pod(&a).await.unwrap();
    h.until(&a, "VM running", running).await;
    h.provider.create_pod(&b).await.unwrap();
    let s = h
        .until(&b, "waiting for a slot", |s| {
            waiting_reason(s).as_deref() == Some("WaitingForVMSlot")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert_eq!(h.events("WaitingForVMSlot").len(), 1);
    h.hv.vm(&vm_id(&a)).unwrap().fail("kernel panic");
    let s = h
        .until(&a, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    let t = c0(&s).state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(t.exit_code, 1);
    assert_eq!(t.message.as_deref(), Some("kernel panic"));
    assert_eq!(c0(&s).restart_count, 0);
    // Its slot went to the waiting pod; the failed VM was never booted again.
    h.until(&b, "second VM running", running).await;
    assert_eq!(h.hv.log.times(&format!("start {}", vm_id(&a))).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_pod_gets_the_slot_only_after_the_deleted_vm_is_removed() {
    let h = harness(Opts {
        max_vms: 1,
        ..Opts::default()
    })
    .await;
    let a = pod("first", "Always");
    let b = pod("second", "Always");
    h.provider.create_pod(&a).await.unwrap();
    h.until(&a, "VM running", running).await;
    h.provider.create_pod(&b).await.unwrap();
    h.until(&b, "waiting for a slot", |s| {
        waiting_reason(s).as_deref() == Some("WaitingForVMSlot")
    })
    .await;
    h.provider
        .delete_pod(&a, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(h.status(&a).await.is_none(), "deleted pods are forgotten");
    h.until(&b, "second VM running", running).await;
    let calls = h.hv.log.calls();
    let pos = |c: String| calls.iter().position(|x| *x == c).unwrap();
    assert!(
        pos(format!("remove {}", vm_id(&a))) < pos(format!("start {}", vm_id(&b))),
        "{calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn deletion_asks_the_guest_then_forces_at_the_end_of_the_grace_then_cleans_up() {
    let h = harness(Opts {
        acpi: false,
        ..Opts::default()
    })
    .await;
    let p = pod("stubborn", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let id = vm_id(&p);
    let pod_dir = h
        .dir
        .path()
        .join("data/pods")
        .join(p.metadata.uid.as_deref().unwrap());
    assert!(pod_dir.join("disk").exists(), "the per-pod disk clone");
    let t0 = Instant::now();
    h.provider
        .delete_pod(&p, Duration::from_secs(20))
        .await
        .unwrap();
    let took = t0.elapsed();
    let calls: Vec<String> =
        h.hv.log
            .calls()
            .into_iter()
            .filter(|c| c.ends_with(&id))
            .collect();
    let tail: Vec<&str> = calls[calls.len() - 3..]
        .iter()
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(tail, ["request_stop", "force_stop", "remove"], "{calls:?}");
    let req = h.hv.log.times("request_stop")[0];
    let force = h.hv.log.times("force_stop")[0];
    assert_eq!((force - t0).as_secs(), 20, "forced when the grace is spent");
    assert!(force > req);
    assert!(
        took >= Duration::from_secs(20) && took < Duration::from_secs(25),
        "{took:?}"
    );
    let killing = h.events("Killing");
    assert_eq!(killing.len(), 1);
    assert!(
        killing[0].1.message.contains("grace 20s"),
        "{:?}",
        killing[0].1
    );
    assert!(
        !pod_dir.exists(),
        "the pod directory (disk clone, console) is removed"
    );
    assert!(h.status(&p).await.is_none());
    // Nothing restarts a deleted pod's VM.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.hv.log.times(&format!("start {id}")).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_vm_not_ready_within_the_ready_timeout_is_killed_and_restarted_or_fails() {
    let h = harness(Opts {
        ready_timeout_secs: 30,
        ..Opts::default()
    })
    .await;
    let p = pod("silent", "Always");
    let t0 = Instant::now();
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "restarted for not answering", |s| {
            c0(s).restart_count == 1
        })
        .await;
    let last = c0(&s)
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(last.exit_code, 143, "stopped by the agent, gracefully");
    assert!(
        last.message
            .as_deref()
            .unwrap()
            .contains("was not ready within 30s"),
        "{last:?}"
    );
    let killing = h.events("Killing");
    assert!(
        killing[0].1.message.ends_with("will be restarted"),
        "{killing:?}"
    );
    // The SSH wait gives up at its last retry before the deadline.
    let at = (killing[0].0 - t0).as_millis();
    assert!((29_000..=31_000).contains(&at), "killed after {at} ms");
    assert!(!h.events("Unhealthy").is_empty());

    let p = pod("silent-never", "Never");
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    let t = c0(&s).state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(t.exit_code, 143);
    assert_eq!(c0(&s).restart_count, 0);
}

#[tokio::test(start_paused = true)]
async fn pull_failures_back_off_like_the_kubelet_then_the_vm_boots() {
    let h = harness(Opts::default()).await;
    h.images.failing_pulls.store(3, Ordering::SeqCst);
    let p = pod("pull", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "ErrImagePull", |s| {
        waiting_reason(s).as_deref() == Some("ErrImagePull")
    })
    .await;
    let s = h
        .until(&p, "ImagePullBackOff", |s| {
            waiting_reason(s).as_deref() == Some("ImagePullBackOff")
        })
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    let msg = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert!(
        msg.message
            .as_deref()
            .unwrap()
            .contains("registry unavailable"),
        "{msg:?}"
    );
    h.until(&p, "VM running", running).await;
    // 1 s of ErrImagePull, then a back-off of 10 s, 20 s, 40 s before each retry.
    let pulls = h.hv.log.times("pull ");
    assert_eq!(gaps(&pulls), [11, 21, 41]);
    assert_eq!(h.events("BackOff").len(), 3);
    assert_eq!(h.events("Failed").len(), 3);
    assert_eq!(h.events("Pulled").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_every_pod_task_and_leaves_vms_running() {
    let h = harness(Opts::default()).await;
    let (a, b) = (pod("keep-a", "Always"), pod("keep-b", "Always"));
    for p in [&a, &b] {
        h.provider.create_pod(p).await.unwrap();
        h.until(p, "VM running", running).await;
    }
    assert!(h.provider.shutdown(Duration::from_secs(10)).await);
    for p in [&a, &b] {
        let vm = h.hv.vm(&vm_id(p)).unwrap();
        assert_eq!(
            vm.current(),
            vzk_vm::VmState::Running,
            "VMs outlive the agent"
        );
    }
    let calls = h.hv.log.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("request_stop") || c.starts_with("remove")),
        "{calls:?}"
    );
    // A VM failing now is not restarted: its supervisor has returned.
    h.hv.vm(&vm_id(&a)).unwrap().fail("after shutdown");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.hv.log.times("create").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn after_a_host_reboot_recorded_pods_restart_or_fail_by_their_restart_policy() {
    let always = pod("always", "Always");
    let never = pod("never", "Never");
    let h = harness(Opts {
        recorded: vec![always.clone(), never.clone()],
        ..Default::default()
    })
    .await;
    // No VM was left to adopt: `Always` boots again as a restart, saying why.
    let s = h
        .until(&always, "booted again", |s| {
            running(s) && c0(s).restart_count == 1
        })
        .await;
    let last = c0(&s)
        .last_state
        .as_ref()
        .and_then(|l| l.terminated.as_ref())
        .unwrap();
    assert_eq!(last.exit_code, 137);
    assert!(
        last.message.as_deref().unwrap_or("").contains("gone"),
        "{last:?}"
    );
    assert_eq!(
        h.hv.log.times(&format!("start {}", vm_id(&always))).len(),
        1
    );
    // `Never` is not booted: the pod failed, with the reason.
    let s = h
        .until(&never, "failed", |s| s.phase.as_deref() == Some("Failed"))
        .await;
    let t = c0(&s)
        .state
        .as_ref()
        .and_then(|st| st.terminated.as_ref())
        .unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("Error")));
    assert!(t.message.as_deref().unwrap_or("").contains("gone"), "{t:?}");
    assert!(
        !h.hv.log.calls().iter().any(|c| c.ends_with(&vm_id(&never))),
        "{:?}",
        h.hv.log.calls()
    );
    // Both are the provider's again: listed, and deletable.
    let listed = h.provider.list_pods().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    h.provider
        .delete_pod(&never, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(h.status(&never).await.is_none());
}
