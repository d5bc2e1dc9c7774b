//! The real Debian 12 guest through the whole product (issue 17, items 4 and 6): systemd,
//! OpenSSH and cloud-init in an image built from Debian's packages by
//! `scripts/build-debian-guest.sh`, pushed as a vzk image and run as pods by the agent.
//!
//! Proven as a user sees it, through the API server and kubectl: the pod is Ready only
//! once OpenSSH answers; cloud-init took the pod's host name, its own SSH key and its
//! user-data (from an annotation, or from a configMap the pod lists) from the agent's
//! NoCloud seed; `kubectl exec` returns the command's exit
//! code and keeps stdout and stderr apart; `kubectl logs` shows systemd's console; a
//! configMap volume is mounted by the agent inside the systemd guest; a second pod of
//! the same image refuses the first pod's key; `kubectl delete` shuts systemd down
//! cleanly through the ACPI power button (its console, followed to the end, shows the
//! kernel's power-down and the agent's event names the ACPI path). A third pod runs the
//! EFI variant of the image (GPT, GRUB on the EFI system partition, no kernel in the
//! image), booted through OVMF.
//!
//! Real components: a private kube-apiserver, the agent binary, QEMU (TCG) in a network
//! namespace of the test's, the registry, OpenSSH's client from inside that namespace.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::{Cluster, public_of, text, wait_until, wait_until_or};
use vzk_testenv::strip_ansi;

/// A pod of the Debian image: 1 GiB (cloud-init is Python), one CPU, 60 s of grace so
/// that systemd has time to stop under TCG.
fn debian_pod(c: &Cluster, name: &str, image: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "nodeName": c.node,
            "restartPolicy": "Never",
            "tolerations": [{ "operator": "Exists" }],
            "terminationGracePeriodSeconds": 60,
            "containers": [{
                "name": "vm", "image": image,
                "resources": { "requests": { "cpu": "1", "memory": "1Gi" } },
            }]
        }
    });
    json_merge(&mut pod, extra);
    pod
}

/// Merges `patch` into `v` (objects key by key; anything else replaced).
fn json_merge(v: &mut serde_json::Value, patch: serde_json::Value) {
    match (v, patch) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, pv) in b {
                json_merge(a.entry(k).or_insert(serde_json::Value::Null), pv);
            }
        }
        (v, patch) => *v = patch,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_guest_with_systemd_and_cloud_init_runs_the_whole_path() {
    let dir = vzk_testenv::debian_guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let c = Cluster::start("deb", &["--max-vms", "3"]).await;
    let image = format!("{}/deb/debian:12", c.registry.addr);
    support::push_dir(c.work.path(), dir, &image);
    // The same root filesystem on a GPT disk with GRUB on its EFI system partition and
    // no kernel in the image: the agent boots it by EFI (OVMF).
    let efi_image = format!("{}/deb/debian:12-efi", c.registry.addr);
    support::push_dir(c.work.path(), &dir.join("efi"), &efi_image);

    let user_data = |who: &str| {
        format!(
            "#cloud-config\nwrite_files:\n  - path: /etc/vzk-user-data\n    content: |\n      written by {who}\n"
        )
    };
    c.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "app" },
        "data": { "greeting": "hello from a configMap\n" }
    }));
    c.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "alpha-init" },
        "data": { "user-data": user_data("a configMap the pod lists") }
    }));
    // alpha: a configMap volume mounted at /etc/app, and user-data from another
    // configMap the pod lists but does not mount. beta: user-data in an annotation.
    let alpha = debian_pod(
        &c,
        "alpha",
        &image,
        serde_json::json!({
            "metadata": { "annotations": { "vz-kubelet.io/cloud-init-user-data-from": "init" } },
            "spec": {
                "volumes": [
                    { "name": "cfg", "configMap": { "name": "app" } },
                    { "name": "init", "configMap": { "name": "alpha-init" } },
                ],
                "containers": [{
                    "name": "vm", "image": image,
                    "resources": { "requests": { "cpu": "1", "memory": "1Gi" } },
                    "volumeMounts": [{ "name": "cfg", "mountPath": "/etc/app", "readOnly": true }],
                }]
            }
        }),
    );
    let beta = debian_pod(
        &c,
        "beta",
        &image,
        serde_json::json!({
            "metadata": { "annotations": {
                "vz-kubelet.io/cloud-init-user-data": user_data("an annotation"),
            } },
        }),
    );
    c.apply(&alpha);
    c.apply(&beta);
    c.apply(&debian_pod(&c, "gamma", &efi_image, serde_json::json!({})));
    for pod in ["alpha", "beta", "gamma"] {
        c.wait_pod_ready(pod);
    }

    // Ready means OpenSSH answers in a booted systemd guest.
    let exec = |pod: &str, cmd: &[&str]| {
        let mut args = vec!["exec", pod, "--"];
        args.extend_from_slice(cmd);
        c.kubectl(&args)
    };
    let out = exec(
        "alpha",
        &["sh", "-c", "cat /proc/1/comm; systemctl is-active ssh"],
    );
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "systemd\nactive\n");
    let out = exec("alpha", &["sh", "-c", "ssh -V 2>&1"]);
    assert!(
        text(&out.stdout).contains("OpenSSH"),
        "{}",
        text(&out.stdout)
    );

    // Exit codes and the two output streams.
    let out = exec(
        "alpha",
        &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert!(
        text(&out.stderr).contains("to-err"),
        "{}",
        text(&out.stderr)
    );
    let out = exec("alpha", &["false"]);
    assert_eq!(out.status.code(), Some(1));
    let out = exec("alpha", &["/no/such/command"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    // gamma came up through EFI firmware and GRUB; alpha by direct kernel boot.
    let out = exec("gamma", &["test", "-d", "/sys/firmware/efi"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "gamma booted by EFI: {}",
        text(&out.stderr)
    );
    let out = exec("alpha", &["test", "-d", "/sys/firmware/efi"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "alpha booted its kernel directly"
    );
    let out = exec("gamma", &["cat", "/proc/cmdline"]);
    assert!(
        text(&out.stdout).contains("root=LABEL=root"),
        "{}",
        text(&out.stdout)
    );

    // cloud-init took the pod's host name and user-data from the seed.
    for pod in ["alpha", "beta", "gamma"] {
        let out = exec(pod, &["hostname"]);
        assert_eq!(text(&out.stdout).trim(), pod, "{}", text(&out.stderr));
    }
    for (pod, who) in [
        ("alpha", "a configMap the pod lists"),
        ("beta", "an annotation"),
    ] {
        let out = exec(pod, &["cat", "/etc/vzk-user-data"]);
        assert_eq!(
            text(&out.stdout),
            format!("written by {who}\n"),
            "{}",
            text(&out.stderr)
        );
    }

    // The configMap, mounted read-only by the agent over 9p inside the systemd guest.
    let out = exec("alpha", &["cat", "/etc/app/greeting"]);
    assert_eq!(
        text(&out.stdout),
        "hello from a configMap\n",
        "{}",
        text(&out.stderr)
    );
    let out = exec("alpha", &["cat", "/proc/mounts"]);
    let mounts = text(&out.stdout);
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/etc/app"))
        .unwrap_or_else(|| panic!("/etc/app not mounted:\n{mounts}"));
    assert!(line.contains(" 9p ") && line.contains("ro"), "{line}");
    let out = exec("alpha", &["sh", "-c", "echo x > /etc/app/greeting"]);
    assert!(!out.status.success(), "a read-only volume took a write");

    // kubectl logs: systemd's console, from the kernel to a running OpenSSH.
    let out = c.kubectl(&["logs", "alpha"]);
    let console = strip_ansi(&text(&out.stdout));
    for want in [
        "Linux version",
        "Welcome to Debian GNU/Linux 12",
        "Starting ssh.service - OpenBSD Secure Shell server",
        "VZK-SSHD-START",
        "Cloud-init v.",
    ] {
        assert!(console.contains(want), "console lacks {want:?}:\n{console}");
    }

    // Each pod has its own key; the other pod's key does not open it.
    let pods_dir = c.work.path().join("data/pods");
    let (a_key, b_key) = (
        pods_dir.join(c.uid("alpha")).join("ssh_ed25519"),
        pods_dir.join(c.uid("beta")).join("ssh_ed25519"),
    );
    let out = exec("beta", &["cat", "/root/.ssh/authorized_keys"]);
    let keys = text(&out.stdout);
    assert!(
        keys.contains(&public_of(&b_key)),
        "beta's own key in {keys}"
    );
    assert!(!keys.contains(&public_of(&a_key)), "alpha's key in {keys}");
    let b_ip = c.jsonpath("pod/beta", "{.status.podIP}");
    support::assert_only_own_key_opens(&c.netns.name, &b_ip, &b_key, &a_key);

    // Graceful delete: follow alpha's console while deleting it.
    let followed_path = c.work.path().join("alpha-followed.log");
    let followed_file = std::fs::File::create(&followed_path).unwrap_or_else(|e| panic!("{e}"));
    let mut follow = c.cp.kubectl();
    follow
        .args(["-n", &c.ns, "logs", "-f", "alpha"])
        .stdout(followed_file)
        .stderr(Stdio::null());
    let mut follow = follow
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl logs -f: {e}"));
    std::thread::sleep(Duration::from_secs(1));
    let out = c.kubectl(&["delete", "pod", "alpha", "--wait=true", "--timeout=180s"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    // The stream ends with the VM.
    wait_until_or(
        Duration::from_secs(60),
        "kubectl logs -f to end with the VM",
        || matches!(follow.try_wait(), Ok(Some(_))),
        || support::tail(&followed_path, 20),
    );
    let tail = strip_ansi(&std::fs::read_to_string(&followed_path).unwrap_or_default());
    assert!(
        tail.contains("reboot: Power down"),
        "the followed console does not end in a power-down:\n{}",
        tail.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    assert!(
        tail.contains("System Power Off"),
        "systemd did not reach its power-off target:\n{}",
        tail.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    let mut stopped = String::new();
    wait_until(Duration::from_secs(30), "alpha's VMStopped event", || {
        stopped = c.jsonpath(
            "events",
            "{range .items[?(@.reason==\"VMStopped\")]}{.involvedObject.name}: {.message}{\"\\n\"}{end}",
        );
        stopped.contains("alpha: ")
    });
    assert!(
        stopped.contains("alpha: the guest powered off on the ACPI power button"),
        "{stopped}"
    );
}

/// The Debian guest started by restore (issue 18): a template made ahead of time from the
/// image (`--snapshot-template`), then two pods created at once, both restored from it.
/// Each is its own although both come from one saved machine: its host name, its own NIC
/// (a MAC of its own, plugged in after the restore and configured by systemd-networkd's
/// DHCP) and address, new OpenSSH host keys, a new machine id, the host's clock; a file
/// one writes is absent in the other; OpenSSH still answers after its keys changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_pods_restored_from_one_template_are_each_their_own() {
    let dir = vzk_testenv::debian_guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let mut c = Cluster::start("debr", &["--snapshot-start", "--max-vms", "3"]).await;
    let image = format!("{}/debr/debian:12", c.registry.addr);
    support::push_dir(c.work.path(), dir, &image);
    // The template of that image and the pods' shape, made when the agent starts.
    c.stop_agent();
    c.extra_args.extend([
        "--snapshot-template".to_owned(),
        format!("{image},cpu=1,memory=1Gi"),
    ]);
    c.start_agent();
    let images = c.work.path().join("data/images");
    let mut meta = None;
    wait_until_or(
        Duration::from_secs(900),
        "the Debian template made ahead of time",
        || {
            meta = find_file(&images, "template.json");
            meta.is_some()
        },
        || c.agent.as_ref().map(|a| a.log()).unwrap_or_default(),
    );
    let template = meta
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("template.json without a directory"))
        .to_path_buf();
    let template_host_key = std::fs::read_to_string(template.join("ssh_host_key"))
        .unwrap_or_else(|e| panic!("the template's pinned host key: {e}"));
    let key_body = |line: &str| line.split_whitespace().nth(1).unwrap_or("").to_owned();

    for pod in ["one", "two"] {
        c.apply(&debian_pod(&c, pod, &image, serde_json::json!({})));
    }
    for pod in ["one", "two"] {
        c.wait_pod_ready(pod);
    }
    let exec = |pod: &str, cmd: &str| {
        let out = c.kubectl(&["exec", pod, "--", "sh", "-c", cmd]);
        assert!(out.status.success(), "{pod}: {cmd}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let mut seen = Vec::new();
    for pod in ["one", "two"] {
        let started = c.jsonpath(
            "events",
            &format!(
                "{{range .items[?(@.involvedObject.name==\"{pod}\")]}}{{.reason}}: {{.message}}{{\"\\n\"}}{{end}}"
            ),
        );
        assert!(
            started
                .lines()
                .any(|l| l.starts_with("Started:") && l.contains("by restoring template")),
            "{pod} was not restored:\n{started}"
        );
        assert!(!started.contains("RestoreFailed"), "{pod}:\n{started}");
        assert_eq!(exec(pod, "hostname").trim(), pod);
        assert_eq!(exec(pod, "systemctl is-active ssh").trim(), "active");
        // The clock: the guest's within a second of the host's around the exec.
        let before = now_secs();
        let guest: f64 = exec(pod, "date +%s.%N")
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{pod}'s date: {e}"));
        let after = now_secs();
        assert!(
            guest > before - 1.0 && guest < after + 1.0,
            "{pod}'s clock {guest} vs the host's {before}..{after}"
        );
        let host_key = exec(pod, "cat /etc/ssh/ssh_host_ed25519_key.pub");
        assert_ne!(
            key_body(&host_key),
            key_body(&template_host_key),
            "{pod} kept the template's host key"
        );
        let mac = exec(
            pod,
            "for n in /sys/class/net/*; do [ \"${n##*/}\" = lo ] || cat $n/address; done",
        );
        let machine_id = exec(pod, "cat /etc/machine-id");
        let ip = c.jsonpath(&format!("pod/{pod}"), "{.status.podIP}");
        assert!(!ip.is_empty(), "{pod} has no IP");
        assert!(
            exec(pod, "ip -4 -o addr show").contains(&format!("inet {ip}/")),
            "{pod}'s NIC lacks {ip}"
        );
        seen.push((ip, mac.trim().to_owned(), machine_id, key_body(&host_key)));
    }
    let (one, two) = (&seen[0], &seen[1]);
    assert_ne!(one.0, two.0, "both pods have one IP");
    assert_ne!(one.1, two.1, "both pods have one MAC");
    assert_ne!(one.2, two.2, "both pods have one machine id");
    assert_ne!(one.3, two.3, "both pods have one host key");
    exec("one", "echo mine > /root/only-in-one && sync");
    assert_eq!(
        exec(
            "two",
            "test -e /root/only-in-one && echo there || echo absent"
        )
        .trim(),
        "absent"
    );
    for pod in ["one", "two"] {
        let out = c.kubectl(&["delete", "pod", pod, "--wait=true", "--timeout=180s"]);
        assert!(out.status.success(), "delete {pod}: {}", text(&out.stderr));
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The first file called `name` under `root` (depth first), if any, outside the
/// directories of templates still being made (`<id>.partial-<rand>`).
fn find_file(root: &Path, name: &str) -> Option<std::path::PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if e.file_name().to_string_lossy().contains(".partial-") {
                continue;
            }
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
