//! dockerd restarted under running hybrid pods (issue 16's fault matrix): a dockerd of the
//! test's own (its own network namespace and data root, `DOCKER_HOST` for the agent) is
//! stopped with SIGTERM, which stops every container, and started again.
//!
//! | pod (VM + busybox side-car) | after dockerd is back |
//! |---|---|
//! | `restartPolicy: Always` | the side-car runs again (restartCount ≥ 1, Ready), answers `kubectl exec` and `logs`; the VM kept its QEMU process and restartCount 0 |
//! | `restartPolicy: Never` | the side-car stays terminated with its exit code, not started again; the VM kept its QEMU process |
//!
//! Real components: a private kube-apiserver, the agent binary, QEMU (TCG), a private
//! dockerd, the test guest in a local registry.

mod support;

use std::time::{Duration, Instant};

use support::dockerd::PrivateDockerd;
use support::soak::{hybrid_pod, sidecar_image};
use support::{Cluster, pids_with, text, wait_until};

fn sidecar_status(c: &Cluster, pod: &str) -> String {
    c.jsonpath(
        &format!("pod/{pod}"),
        r#"{.status.containerStatuses[?(@.name=="sidecar")].restartCount}|{.status.containerStatuses[?(@.name=="sidecar")].state}"#,
    )
}

fn vm_restarts(c: &Cluster, pod: &str) -> String {
    c.jsonpath(
        &format!("pod/{pod}"),
        r#"{.status.containerStatuses[?(@.name=="vm")].restartCount}"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_restarted_side_cars_come_back_per_restart_policy_and_vms_keep_running() {
    let t0 = Instant::now();
    // dockerd makes its docker0 inside its own network namespace: side-cars get a network.
    let mut dockerd = PrivateDockerd::start_with(&[]);
    let mut c = Cluster::start("dkr", &["--max-vms", "2"]).await;
    let sidecar = sidecar_image(&c);
    dockerd.load_image(&sidecar);
    c.stop_agent();
    c.extra_env = vec![("DOCKER_HOST".into(), dockerd.host())];
    c.start_agent();

    for (pod, policy) in [("always", "Always"), ("never", "Never")] {
        let mut m = hybrid_pod(&c, pod, &sidecar);
        m["spec"]["restartPolicy"] = policy.into();
        c.apply(&m);
    }
    for pod in ["always", "never"] {
        c.wait_pod_ready(pod);
    }
    let qemu: Vec<(String, Vec<u32>)> = ["always", "never"]
        .iter()
        .map(|p| {
            let pids = pids_with(&c.uid(p));
            assert_eq!(pids.len(), 1, "one QEMU process for {p}: {pids:?}");
            ((*p).to_owned(), pids)
        })
        .collect();

    let stopped = Instant::now();
    dockerd.stop();
    let t_stop = stopped.elapsed();
    wait_until(
        Duration::from_secs(90),
        "the side-cars seen as no longer running",
        || {
            ["always", "never"]
                .iter()
                .all(|p| !sidecar_status(&c, p).contains("running"))
        },
    );
    let t_seen = stopped.elapsed();
    let restarted = Instant::now();
    dockerd.restart();
    wait_until(
        Duration::from_secs(120),
        "the Always pod's side-car running again",
        || {
            let s = sidecar_status(&c, "always");
            s.contains("running") && !s.starts_with("0|")
        },
    );
    c.wait_pod_ready("always");
    let t_back = restarted.elapsed();
    let out = c.kubectl(&["exec", "always", "-c", "sidecar", "--", "echo", "back"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "back",
        "exec into the restarted side-car: {}",
        text(&out.stderr)
    );
    let out = c.kubectl(&["logs", "always", "-c", "sidecar"]);
    assert!(
        text(&out.stdout).contains("side-car up"),
        "logs of the restarted side-car: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The Never pod's side-car stays terminated, for a while after dockerd is back.
    std::thread::sleep(Duration::from_secs(10));
    let s = sidecar_status(&c, "never");
    assert!(
        s.starts_with("0|") && s.contains("terminated") && s.contains("exitCode"),
        "the Never pod's side-car: {s}"
    );
    let ready = c.jsonpath(
        "pod/never",
        r#"{.status.phase}|{.status.conditions[?(@.type=="Ready")].status}"#,
    );
    assert_eq!(
        ready, "Running|False",
        "the Never pod with its side-car ended"
    );

    for (pod, pids) in &qemu {
        assert_eq!(
            &pids_with(&c.uid(pod)),
            pids,
            "{pod}: the same QEMU process"
        );
        assert_eq!(vm_restarts(&c, pod), "0", "{pod}: the VM was not restarted");
    }
    for pod in ["always", "never"] {
        let out = c.kubectl(&["delete", "pod", pod, "--wait=true", "--timeout=120s"]);
        assert!(out.status.success(), "delete {pod}: {}", text(&out.stderr));
    }
    let left = text(
        &std::process::Command::new("docker")
            .args(["-H", &dockerd.host(), "ps", "-aq"])
            .output()
            .unwrap_or_else(|e| panic!("docker ps: {e}"))
            .stdout,
    );
    assert!(left.trim().is_empty(), "side-car containers left: {left}");
    eprintln!(
        "dockerd restart: stopped in {t_stop:.1?}, side-cars seen down {t_seen:.1?} after its \
         SIGTERM, Always side-car back {t_back:.1?} after its restart; {:.1?} in all",
        t0.elapsed()
    );
}
