//! The fault matrix (issue 16), each row against the real components: a private
//! kube-apiserver, `vz-kubelet run`, the test guest under QEMU (TCG) in a network
//! namespace of the test's.
//!
//! | fault | expected |
//! |---|---|
//! | a VM's QEMU killed with SIGKILL | `Always`: booted again, restartCount 1, lastState `Error` |
//! | the API server down for 60 s, a `Never` VM dying meanwhile | the other VMs keep running (same QEMU processes); the pod's `Failed` reaches the API server soon after it returns |
//! | a host reboot: the agent stopped, every QEMU process gone, the agent started afresh | `Always` boots again as a restart saying why; `Never` ends `Failed` with the reason, not booted |
//! | the registry down when a pod's image is pulled | `ErrImagePull`, then `ImagePullBackOff` and `BackOff` events; Ready once the registry answers again |
//! | the disk full (pod dirs on a 128 KiB tmpfs) when the VM's disk is cloned | a `Failed` event and `CreateContainerError` naming "No space left on device", no clone file, no QEMU; Ready once there is room |

mod support;

use std::time::{Duration, Instant};

use support::{Cluster, kill, pids_with, run, text, wait_until};

fn one_pid(c: &Cluster, pod: &str) -> u32 {
    let uid = c.uid(pod);
    let pids = pids_with(&uid);
    assert_eq!(
        pids.len(),
        1,
        "one QEMU process for {pod} ({uid}): {pids:?}"
    );
    pids[0]
}

fn restarts(c: &Cluster, pod: &str) -> String {
    c.jsonpath(
        &format!("pod/{pod}"),
        "{.status.containerStatuses[0].restartCount}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_the_api_server_down_and_a_host_reboot_end_as_the_kubelet_would() {
    let t0 = Instant::now();
    let mut c = Cluster::start("faults", &["--max-vms", "3"]).await;
    for (name, policy) in [
        ("always", "Always"),
        ("never", "Never"),
        ("never-reboot", "Never"),
    ] {
        c.apply(&c.vm_pod(name, policy));
    }
    for name in ["always", "never", "never-reboot"] {
        c.wait_pod_ready(name);
    }
    let t_ready = t0.elapsed();

    // Row 1: QEMU killed with SIGKILL → restarted under Always, the kill recorded.
    let pid = one_pid(&c, "always");
    kill("-KILL", pid);
    wait_until(
        Duration::from_secs(240),
        "always restarted and Ready",
        || {
            restarts(&c, "always") == "1"
                && c.jsonpath(
                    "pod/always",
                    r#"{.status.conditions[?(@.type=="Ready")].status}"#,
                ) == "True"
        },
    );
    let last = c.jsonpath(
        "pod/always",
        "{.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].lastState.terminated.reason}",
    );
    assert_eq!(last, "1 Error", "lastState after SIGKILL");
    assert_ne!(one_pid(&c, "always"), pid, "a new QEMU process");
    let t_row1 = t0.elapsed();

    // Row 2: the API server down for 60 s; a Never VM dies meanwhile.
    let (always_uid, never_uid) = (c.uid("always"), c.uid("never"));
    let before = one_pid(&c, "always");
    let never_pid = one_pid(&c, "never");
    c.cp.stop_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    kill("-KILL", never_pid);
    std::thread::sleep(Duration::from_secs(58));
    assert!(pids_with(&never_uid).is_empty(), "the killed VM stays gone");
    assert_eq!(
        pids_with(&always_uid),
        vec![before],
        "the other VM kept running through the outage"
    );
    c.cp.start_apiserver().unwrap_or_else(|e| {
        panic!(
            "restarting kube-apiserver: {}",
            vzk_testenv::error_chain(&e)
        )
    });
    let back = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "never Failed after the outage",
        || c.jsonpath("pod/never", "{.status.phase}") == "Failed",
    );
    let reconciled = back.elapsed();
    assert_eq!(one_pid(&c, "always"), before, "still the same QEMU process");
    assert_eq!(restarts(&c, "always"), "1", "no restart from the outage");
    let t_row2 = t0.elapsed();

    // Row 3: a host reboot: the agent stops, every VM process goes, a fresh agent starts.
    c.stop_agent();
    for pod in ["always", "never-reboot"] {
        kill("-KILL", one_pid(&c, pod));
    }
    wait_until(Duration::from_secs(10), "every QEMU process gone", || {
        pids_with(&c.uid("always")).is_empty() && pids_with(&c.uid("never-reboot")).is_empty()
    });
    c.start_agent();
    wait_until(
        Duration::from_secs(240),
        "always booted again and Ready",
        || {
            restarts(&c, "always") == "2"
                && c.jsonpath(
                    "pod/always",
                    r#"{.status.conditions[?(@.type=="Ready")].status}"#,
                ) == "True"
        },
    );
    let message = c.jsonpath(
        "pod/always",
        "{.status.containerStatuses[0].lastState.terminated.message}",
    );
    assert!(message.contains("gone"), "why it restarted: {message:?}");
    wait_until(Duration::from_secs(60), "never-reboot Failed", || {
        c.jsonpath("pod/never-reboot", "{.status.phase}") == "Failed"
    });
    let t = c.jsonpath(
        "pod/never-reboot",
        "{.status.containerStatuses[0].state.terminated.exitCode}|{.status.containerStatuses[0].state.terminated.message}",
    );
    assert!(
        t.starts_with("137|") && t.contains("gone"),
        "never-reboot: {t:?}"
    );
    assert!(
        pids_with(&c.uid("never-reboot")).is_empty(),
        "a Never pod is not booted again"
    );
    eprintln!(
        "fault matrix: 3 VMs Ready at {t_ready:.1?}; SIGKILL row done at {t_row1:.1?}; \
         API outage row done at {t_row2:.1?} (Failed visible {reconciled:.1?} after the API server \
         answered); reboot row done at {:.1?}",
        t0.elapsed()
    );
}

/// The events of `pod` as `reason: message` lines.
fn events(c: &Cluster, pod: &str) -> String {
    c.jsonpath(
        "events",
        &format!(
            r#"{{range .items[?(@.involvedObject.name=="{pod}")]}}{{.reason}}: {{.message}}{{"\n"}}{{end}}"#
        ),
    )
}

fn waiting(c: &Cluster, pod: &str) -> String {
    c.jsonpath(
        &format!("pod/{pod}"),
        "{.status.containerStatuses[0].state.waiting.reason}|{.status.containerStatuses[0].state.waiting.message}",
    )
}

/// A tmpfs mounted over a directory for the test; lazily unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        let out = run({
            let mut cmd = std::process::Command::new("mount");
            cmd.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir);
            cmd
        });
        assert!(out.status.success(), "mount tmpfs: {}", text(&out.stderr));
        Tmpfs(dir.to_owned())
    }

    fn resize(&self, size: &str) {
        let out = run({
            let mut cmd = std::process::Command::new("mount");
            cmd.args(["-o", &format!("remount,size={size}")])
                .arg(&self.0);
            cmd
        });
        assert!(out.status.success(), "remount tmpfs: {}", text(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_down_and_the_disk_full_hold_a_pod_with_clear_events_until_mended() {
    let t0 = Instant::now();
    let mut c = Cluster::start("faults-io", &["--max-vms", "2"]).await;

    // Row: the registry down when the image is pulled (nothing cached yet).
    c.registry.stop();
    c.apply(&c.vm_pod("pull", "Always"));
    wait_until(
        Duration::from_secs(60),
        "ImagePullBackOff and a BackOff event",
        || {
            waiting(&c, "pull").starts_with("ImagePullBackOff|")
                && events(&c, "pull").contains("BackOff: Back-off pulling image")
        },
    );
    let ev = events(&c, "pull");
    assert!(
        ev.contains("Failed: Failed to pull image"),
        "the pull failure as an event: {ev}"
    );
    assert!(
        pids_with(&c.uid("pull")).is_empty(),
        "no VM without its image"
    );
    c.registry.restart();
    let back = Instant::now();
    c.wait_pod_ready("pull");
    let t_pull = back.elapsed();
    let out = c.kubectl(&["delete", "pod", "pull", "--wait=true", "--timeout=120s"]);
    assert!(out.status.success(), "delete pull: {}", text(&out.stderr));

    // Row: the disk full while the VM's disk is cloned. The image is cached (outside
    // the pod dirs); the pod dirs get 128 KiB, less than a qcow2 overlay's header.
    let pods_dir = c.work.path().join("data/pods");
    let tmpfs = Tmpfs::mount(&pods_dir, "128k");
    c.apply(&c.vm_pod("full", "Always"));
    let uid = c.uid("full");
    wait_until(
        Duration::from_secs(60),
        "CreateContainerError naming the full disk",
        || {
            let w = waiting(&c, "full");
            w.starts_with("CreateContainerError|") && w.contains("No space left on device")
        },
    );
    let ev = events(&c, "full");
    assert!(
        ev.contains("Failed: cloning the VM disk") && ev.contains("No space left on device"),
        "the clone failure as an event: {ev}"
    );
    let pod_dir = pods_dir.join(&uid);
    assert!(pod_dir.is_dir(), "the pod's dir {}", pod_dir.display());
    assert!(
        !pod_dir.join("disk").exists(),
        "nothing half-made: {:?}",
        std::fs::read_dir(&pod_dir).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    assert!(pids_with(&uid).is_empty(), "no VM without its disk");
    tmpfs.resize("256m");
    let room = Instant::now();
    c.wait_pod_ready("full");
    let t_full = room.elapsed();
    let out = c.kubectl(&["exec", "full", "-c", "vm", "--", "echo", "ok"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "ok",
        "exec: {}",
        text(&out.stderr)
    );
    let out = c.kubectl(&["delete", "pod", "full", "--wait=true", "--timeout=120s"]);
    assert!(out.status.success(), "delete full: {}", text(&out.stderr));
    drop(tmpfs);
    eprintln!(
        "fault matrix (I/O): Ready {t_pull:.1?} after the registry returned, {t_full:.1?} after the \
         disk had room; {:.1?} in all",
        t0.elapsed()
    );
}
