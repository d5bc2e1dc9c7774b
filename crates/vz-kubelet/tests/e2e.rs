//! End to end, the way a user drives a node: the `vz-kubelet run` binary as
//! `system:node:<name>` against a real kube-apiserver (Node + RBAC + NodeRestriction),
//! a real `docker-registry` holding the test guest as a VM image, QEMU (TCG) VMs in a
//! network namespace the test owns, and real `kubectl` 1.37 for apply, wait, exec, logs,
//! port-forward and delete.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vzk_testenv::{ControlPlane, Netns, Registry, free_port, guest};

fn vz_kubelet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
}

fn run(mut c: Command) -> Output {
    let what = format!("{c:?}");
    c.output().unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The agent process; SIGTERM and wait on drop, its log printed if the test failed.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix_kill(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = self.child.kill();
                    return self
                        .child
                        .wait()
                        .unwrap_or_else(|e| panic!("waiting for the agent: {e}"));
                }
            }
        }
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- vz-kubelet log ----\n{}", self.log());
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn pids_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if text(&cmd).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_runs_a_vm_pod_with_kubectl_apply_exec_logs_port_forward_and_delete() {
    let cp = ControlPlane::shared();
    let ns = cp.create_namespace("e2e").await;
    let node = format!("e2e-bin-{:06x}", rand_u24());
    let id = cp.node_identity(&node);
    let registry = Registry::start();
    let g = guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let img = work.path().join("image");
    g.image_dir(&img);
    let image = format!("{}/e2e/guest:v1", registry.addr);
    let mut push = vz_kubelet();
    push.args(["image", "push", "--root"])
        .arg(work.path().join("push-cache"))
        .arg("--plain-http")
        .arg(&img)
        .arg(&image);
    let out = run(push);
    assert!(out.status.success(), "image push: {}", text(&out.stderr));

    let netns = Netns::new();
    let data = work.path().join("data");
    let log = work.path().join("agent.log");
    let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let child = vz_kubelet()
        .args([
            "run",
            "--node-name",
            &node,
            "--node-ip",
            "127.0.0.1",
            "--accel",
            "tcg",
        ])
        .arg("--kubeconfig")
        .arg(&id.kubeconfig)
        .arg("--client-ca-file")
        .arg(cp.ca_cert_path())
        .args([
            "--kubelet-port",
            &free_port().to_string(),
            "--listen-address",
            "127.0.0.1",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--vm-netns",
            &netns.name,
            "--insecure-registry",
            &registry.addr,
        ])
        .args(["--ssh-user", "root"])
        .arg("--ssh-private-key-path")
        .arg(&g.openssh_key)
        .env(
            "VZK_LOG",
            std::env::var("VZK_E2E_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("starting vz-kubelet: {e}"));
    let mut agent = Agent { child, log };

    let kubectl = |args: &[&str]| -> Output {
        let mut c = cp.kubectl();
        c.args(["-n", &ns]).args(args);
        run(c)
    };
    wait_until(Duration::from_secs(60), "the node object", || {
        kubectl(&["get", "node", &node]).status.success()
    });
    let out = kubectl(&[
        "wait",
        "--for=condition=Ready",
        &format!("node/{node}"),
        "--timeout=60s",
    ]);
    assert!(out.status.success(), "node Ready: {}", text(&out.stderr));

    // kubectl apply, then Pending → Running and Ready with the VM's IP.
    let manifest = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "ci" },
        "spec": {
            "nodeName": node,
            "tolerations": [{ "operator": "Exists" }],
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "vm", "image": image,
                "resources": { "requests": { "cpu": "1", "memory": "256Mi" } },
                "ports": [{ "name": "ssh", "containerPort": 22 }],
                "lifecycle": { "preStop": { "exec": { "command": ["sh", "-c", "echo prestop-ran > /dev/console"] } } }
            }]
        }
    });
    let mut apply = cp.kubectl();
    apply
        .args(["-n", &ns, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = apply
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl apply: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(manifest.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "kubectl apply: {}", text(&out.stderr));
    let out = kubectl(&["wait", "--for=condition=Ready", "pod/ci", "--timeout=300s"]);
    assert!(
        out.status.success(),
        "pod Ready: {}\n{}",
        text(&out.stderr),
        text(&kubectl(&["describe", "pod", "ci"]).stdout)
    );
    let ip = text(&kubectl(&["get", "pod", "ci", "-o", "jsonpath={.status.podIP}"]).stdout);
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "podIP {ip:?}");
    let reasons = text(
        &kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=ci",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .stdout,
    );
    for r in ["Pulling", "Pulled", "Created", "Started"] {
        assert!(
            reasons.split_whitespace().any(|x| x == r),
            "event {r} missing from {reasons}"
        );
    }

    // kubectl exec: output and a non-zero exit code preserved.
    let out = kubectl(&[
        "exec",
        "ci",
        "-c",
        "vm",
        "--",
        "sh",
        "-c",
        "echo in-the-vm; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "in-the-vm");
    // stdin through exec.
    let mut c = cp.kubectl();
    c.args([
        "-n",
        &ns,
        "exec",
        "-i",
        "ci",
        "-c",
        "vm",
        "--",
        "sh",
        "-c",
        "tr a-z A-Z",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{e}"));
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(b"shout\n")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text(&out.stdout).trim(), "SHOUT", "{}", text(&out.stderr));

    // kubectl logs: the VM's serial console.
    let out = kubectl(&["logs", "ci", "-c", "vm"]);
    assert!(out.status.success(), "logs: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("VZK-SSHD-START"),
        "console: {}",
        text(&out.stdout)
    );
    let out = kubectl(&["logs", "ci", "-c", "vm", "--tail=3"]);
    assert!(
        text(&out.stdout).lines().count() <= 3,
        "tail: {}",
        text(&out.stdout)
    );

    // kubectl port-forward to the VM's SSH port reaches dropbear.
    let mut c = cp.kubectl();
    c.args(["-n", &ns, "port-forward", "pod/ci", ":22"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut pf = c
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl port-forward: {e}"));
    let stdout = pf
        .stdout
        .take()
        .unwrap_or_else(|| panic!("port-forward stdout"));
    // Keep draining kubectl's stdout: it writes a line per connection and dies of
    // SIGPIPE if nobody reads.
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    // "Forwarding from 127.0.0.1:41235 -> 22"
    let local = line
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("unexpected port-forward output {line:?}"))
        .to_owned();
    let banner = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&local).map_err(|e| format!("{local}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = [0u8; 64];
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("reading the SSH banner: {e}"))?;
        Ok::<_, String>(text(&buf[..n]))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = pf.kill();
    let pf_err = pf
        .wait_with_output()
        .map(|o| text(&o.stderr))
        .unwrap_or_default();
    let banner = banner.unwrap_or_else(|e| panic!("{e}; kubectl port-forward said: {pf_err}"));
    assert!(
        banner.starts_with("SSH-2.0-"),
        "banner {banner:?}; kubectl port-forward said: {pf_err}"
    );

    // kubectl delete with a grace period: preStop ran, the VM stopped, nothing left.
    let uid = text(&kubectl(&["get", "pod", "ci", "-o", "jsonpath={.metadata.uid}"]).stdout);
    assert!(!pids_with(&uid).is_empty(), "a QEMU process for pod {uid}");
    // Follow the console while the pod is deleted: the preStop hook writes to it.
    let mut c = cp.kubectl();
    c.args(["-n", &ns, "logs", "-f", "ci", "-c", "vm", "--tail=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut follow = c.spawn().unwrap_or_else(|e| panic!("kubectl logs -f: {e}"));
    let mut follow_out = follow
        .stdout
        .take()
        .unwrap_or_else(|| panic!("logs -f stdout"));
    let console = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = follow_out.read_to_string(&mut s);
        s
    });
    std::thread::sleep(Duration::from_secs(2));
    let out = kubectl(&[
        "delete",
        "pod",
        "ci",
        "--grace-period=30",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    wait_until(Duration::from_secs(30), "the VM process to exit", || {
        pids_with(&uid).is_empty()
    });
    let leftovers: Vec<String> = std::fs::read_dir(data.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&uid))
        .collect();
    assert!(leftovers.is_empty(), "pod state left behind: {leftovers:?}");
    let _ = follow.kill();
    let _ = follow.wait();
    let console = console.join().unwrap_or_default();
    assert!(
        console.contains("prestop-ran"),
        "preStop output on the console:\n{console}"
    );

    // The node agent stops cleanly on SIGTERM.
    let status = agent.stop();
    assert!(status.success(), "agent exit: {status:?}\n{}", agent.log());
    drop(netns);
}

fn rand_u24() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xff_ffff)
        .unwrap_or(0)
}
