//! The agent killed at each step of a pod's creation and deletion (issue 16's fault matrix):
//! `VZK_CRASH_POINT` makes `vz-kubelet run` SIGKILL itself at a named point (see
//! `vzk_provider::crash`); the agent is then started again without it, as a supervisor
//! would, and the node must end as if nothing had happened.
//!
//! | killed at | then |
//! |---|---|
//! | `create:recorded`, `create:cloned`, `create:vm-created`, `create:vm-started` | the pod Ready, exactly one QEMU process for it, `kubectl exec` answers; after its deletion no QEMU, VM state dir or pod dir of it |
//! | `delete:vm-stopped`, `delete:vm-removed` (a pod being deleted) | the deletion completes: the pod gone from the API server, no QEMU, VM state dir or pod dir of it |
//!
//! Real components: a private kube-apiserver, the agent binary, QEMU (TCG) in a network
//! namespace of the test's, the test guest in a local registry.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{Cluster, pids_with, text, wait_until};

/// Waits for the agent to end by its crash point; panics if it does not within `timeout`.
fn wait_killed(c: &mut Cluster, point: &str, timeout: Duration) {
    let mut agent = c
        .agent
        .take()
        .unwrap_or_else(|| panic!("the agent is not running"));
    let deadline = Instant::now() + timeout;
    loop {
        match agent.child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt as _;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "the agent ended by SIGKILL at {point}: {status:?}\n{}",
                    agent.log()
                );
                let log = agent.log();
                assert!(
                    log.contains(point),
                    "the agent's log names the point {point}:\n{log}"
                );
                return;
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!(
                "the agent did not reach {point} within {timeout:?} ({other:?})\n{}",
                agent.log()
            ),
        }
    }
}

/// Entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The VM state dirs of the agent (QEMU backend: `<data>/qemu/vms/<id>`), named by pod UID.
fn vm_dirs(c: &Cluster) -> Vec<String> {
    entries(&c.work.path().join("data/qemu/vms"))
}

fn pod_dirs(c: &Cluster) -> Vec<String> {
    entries(&c.work.path().join("data/pods"))
}

/// Asserts the node holds nothing of the pod with `uid`.
fn nothing_left(c: &Cluster, what: &str, uid: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("no QEMU process of {what}"),
        || pids_with(uid).is_empty(),
    );
    let vms = vm_dirs(c);
    assert!(
        !vms.iter().any(|d| d.contains(uid)),
        "{what}: a VM state dir is left: {vms:?}"
    );
    let pods = pod_dirs(c);
    assert!(
        !pods.iter().any(|d| d == uid),
        "{what}: the pod dir is left: {pods:?}"
    );
}

fn restart_without_crash_point(c: &mut Cluster) {
    c.extra_env.clear();
    c.start_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_any_step_of_a_pod_leaves_no_orphan_and_no_duplicate() {
    let t0 = Instant::now();
    let mut c = Cluster::start("killpt", &["--max-vms", "2"]).await;
    let mut timings = Vec::new();

    for (i, point) in [
        "create:recorded",
        "create:cloned",
        "create:vm-created",
        "create:vm-started",
    ]
    .into_iter()
    .enumerate()
    {
        let t = Instant::now();
        c.stop_agent();
        c.extra_env = vec![(vzk_provider::crash::ENV.into(), point.into())];
        c.start_agent();
        let pod = format!("create-{i}");
        c.apply(&c.vm_pod(&pod, "Always"));
        wait_killed(&mut c, point, Duration::from_secs(120));
        let uid = c.uid(&pod);
        restart_without_crash_point(&mut c);
        c.wait_pod_ready(&pod);
        let pids = pids_with(&uid);
        assert_eq!(
            pids.len(),
            1,
            "{point}: one QEMU process for {pod}: {pids:?}"
        );
        let vms: Vec<String> = vm_dirs(&c)
            .into_iter()
            .filter(|d| d.contains(&uid))
            .collect();
        assert_eq!(vms.len(), 1, "{point}: one VM state dir for {pod}: {vms:?}");
        let out = c.kubectl(&["exec", &pod, "-c", "vm", "--", "echo", "ok"]);
        assert_eq!(
            text(&out.stdout).trim(),
            "ok",
            "{point}: exec into {pod}: {}",
            text(&out.stderr)
        );
        let out = c.kubectl(&["delete", "pod", &pod, "--wait=true", "--timeout=120s"]);
        assert!(out.status.success(), "delete {pod}: {}", text(&out.stderr));
        nothing_left(&c, &format!("{pod} after {point}"), &uid);
        timings.push((point, t.elapsed()));
    }

    for (i, point) in ["delete:vm-stopped", "delete:vm-removed"]
        .into_iter()
        .enumerate()
    {
        let t = Instant::now();
        c.stop_agent();
        c.extra_env = vec![(vzk_provider::crash::ENV.into(), point.into())];
        c.start_agent();
        let pod = format!("delete-{i}");
        c.apply(&c.vm_pod(&pod, "Always"));
        c.wait_pod_ready(&pod);
        let uid = c.uid(&pod);
        let out = c.kubectl(&["delete", "pod", &pod, "--wait=false"]);
        assert!(out.status.success(), "delete {pod}: {}", text(&out.stderr));
        wait_killed(&mut c, point, Duration::from_secs(120));
        restart_without_crash_point(&mut c);
        wait_until(
            Duration::from_secs(120),
            &format!("{pod} gone from the API server after {point}"),
            || {
                let out = c.kubectl(&["get", "pod", &pod]);
                !out.status.success() && text(&out.stderr).contains("NotFound")
            },
        );
        nothing_left(&c, &format!("{pod} after {point}"), &uid);
        let log = c
            .agent
            .as_ref()
            .map(support::Agent::log)
            .unwrap_or_default();
        assert!(
            !log.contains("booting it again") && !log.contains("VM started"),
            "{point}: a pod being deleted is not booted again by the next agent:\n{log}"
        );
        timings.push((point, t.elapsed()));
    }
    assert!(
        vm_dirs(&c).is_empty() && pids_with(&c.work.path().display().to_string()).is_empty(),
        "no VM of any pod left: {:?}",
        vm_dirs(&c)
    );
    eprintln!("kill points: {timings:.1?}; {:.1?} in all", t0.elapsed());
}
