//! What the binary's cluster tests share: a private control plane, the test guest pushed
//! to a local `docker-registry`, a network namespace for the VMs, and `vz-kubelet run` as
//! `system:node:<name>`, stopped and started again at will. (Each test binary uses a
//! part of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vzk_testenv::{ControlPlane, Netns, NodeIdentity, Registry, free_port, guest};

pub(crate) mod dockerd;
pub(crate) mod soak;

pub(crate) fn vz_kubelet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
}

pub(crate) fn run(mut c: Command) -> Output {
    let what = format!("{c:?}");
    c.output().unwrap_or_else(|e| panic!("{what}: {e}"))
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `f` every 500 ms until it holds; panics naming `what` after `timeout`.
pub(crate) fn wait_until(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    wait_until_or(timeout, what, f, String::new);
}

/// [`wait_until`], with `dump()` (the state that explains a time-out) in the panic.
pub(crate) fn wait_until_or(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
    dump: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", dump());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The last `n` lines of the file at `path` (or why it cannot be read).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let t = text(&b);
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Every process but this one: its pid and command line (arguments joined by spaces).
pub(crate) fn processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            out.push((pid, text(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// Pids of QEMU processes whose command line contains `needle` (a pod UID names its QEMU).
pub(crate) fn pids_with(needle: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(needle) && cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Sends `signal` (e.g. `-KILL`) to `pid`.
pub(crate) fn kill(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

/// Pushes the test guest as `image`.
pub(crate) fn push_guest(work: &Path, image: &str) {
    let g = guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let img = work.join("image");
    g.image_dir(&img);
    push_dir(work, &img, image);
}

/// Pushes the image directory `dir` as `image` (plain HTTP, a push cache under `work`).
pub(crate) fn push_dir(work: &Path, dir: &Path, image: &str) {
    let mut push = vz_kubelet();
    push.args(["image", "push", "--root"])
        .arg(work.join("push-cache"))
        .arg("--plain-http")
        .arg(dir)
        .arg(image);
    let out = run(push);
    assert!(
        out.status.success(),
        "image push {image}: {}",
        text(&out.stderr)
    );
}

/// The public key of a private key file, as `ssh-keygen -y` derives it (type and key
/// material, no comment).
pub(crate) fn public_of(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(key)
        .output()
        .unwrap_or_else(|e| panic!("ssh-keygen: {e}"));
    assert!(out.status.success(), "ssh-keygen -y: {}", text(&out.stderr));
    text(&out.stdout)
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// From the VMs' network namespace, the guest at `ip` lets `own` in and refuses `other`.
pub(crate) fn assert_only_own_key_opens(netns: &str, ip: &str, own: &Path, other: &Path) {
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "podIP {ip:?}");
    let (ok, err) = ssh_with(netns, own, ip);
    assert!(ok, "{ip} with its own key: {err}");
    let (ok, err) = ssh_with(netns, other, ip);
    assert!(!ok, "{ip} must refuse the other pod's key");
    assert!(err.contains("Permission denied"), "{err}");
}

/// `ssh -i key root@ip true` from the VMs' namespace; returns (success, stderr).
pub(crate) fn ssh_with(netns: &str, key: &Path, ip: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ssh", "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=20",
            &format!("root@{ip}"),
            "true",
        ])
        .output()
        .unwrap_or_else(|e| panic!("ssh: {e}"));
    (out.status.success(), text(&out.stderr))
}

/// One run of the agent; stopped on drop, its log printed if the test failed.
pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Agent {
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as `systemctl stop` would; SIGKILL after 30 s.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        kill("-TERM", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
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

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- vz-kubelet log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// A private control plane and one node whose agent can be stopped and started again
/// (same node name, data dir and port), its VMs in a network namespace of the test's.
pub(crate) struct Cluster {
    /// Dropped first: the agent goes before its VMs' namespace and the control plane.
    pub(crate) agent: Option<Agent>,
    pub(crate) netns: Netns,
    pub(crate) ns: String,
    pub(crate) node: String,
    pub(crate) id: NodeIdentity,
    pub(crate) image: String,
    pub(crate) registry: Registry,
    pub(crate) kubelet_port: u16,
    pub(crate) runs: u32,
    pub(crate) extra_args: Vec<String>,
    /// Environment of the next agent start (e.g. `VZK_CRASH_POINT`).
    pub(crate) extra_env: Vec<(String, String)>,
    pub(crate) work: tempfile::TempDir,
    /// Dropped last.
    pub(crate) cp: ControlPlane,
}

impl Cluster {
    /// A private control plane (so a test may stop its API server) and the node, Ready.
    pub(crate) async fn start(prefix: &str, extra_args: &[&str]) -> Cluster {
        let cp = ControlPlane::start()
            .unwrap_or_else(|e| panic!("control plane: {}", vzk_testenv::error_chain(&e)));
        let ns = cp.create_namespace(prefix).await;
        let node = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let id = cp.node_identity(&node);
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let image = format!("{}/{prefix}/guest:v1", registry.addr);
        push_guest(work.path(), &image);
        let mut c = Cluster {
            agent: None,
            netns: Netns::new(),
            ns,
            node,
            id,
            image,
            registry,
            kubelet_port: free_port(),
            runs: 0,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            extra_env: Vec::new(),
            work,
            cp,
        };
        c.start_agent();
        c
    }

    /// Starts `vz-kubelet run` and waits until the node is Ready.
    pub(crate) fn start_agent(&mut self) {
        self.runs += 1;
        let log = self.work.path().join(format!("agent-{}.log", self.runs));
        let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let g = guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
        let child = vz_kubelet()
            .args(["run", "--node-name", &self.node, "--node-ip", "127.0.0.1"])
            .args(["--accel", "tcg"])
            .arg("--kubeconfig")
            .arg(&self.id.kubeconfig)
            .arg("--client-ca-file")
            .arg(self.cp.ca_cert_path())
            .args(["--kubelet-port", &self.kubelet_port.to_string()])
            .args(["--listen-address", "127.0.0.1"])
            .arg("--data-dir")
            .arg(self.work.path().join("data"))
            .args(["--vm-netns", &self.netns.name])
            .args(["--insecure-registry", &self.registry.addr])
            .args(["--ssh-user", "root"])
            .arg("--ssh-private-key-path")
            .arg(&g.openssh_key)
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env(
                "VZK_LOG",
                std::env::var("VZK_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("starting vz-kubelet: {e}"));
        self.agent = Some(Agent { child, log });
        wait_until(Duration::from_secs(60), "the node object", || {
            self.kubectl(&["get", "node", &self.node]).status.success()
        });
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("node/{}", self.node),
            "--timeout=60s",
        ]);
        assert!(out.status.success(), "node Ready: {}", text(&out.stderr));
    }

    /// SIGTERM to the agent; asserts a clean exit.
    pub(crate) fn stop_agent(&mut self) {
        let mut agent = self
            .agent
            .take()
            .unwrap_or_else(|| panic!("the agent is not running"));
        let status = agent.stop();
        assert!(status.success(), "agent exit {status:?}\n{}", agent.log());
    }

    /// kubectl as the admin, in the test's namespace.
    pub(crate) fn kubectl(&self, args: &[&str]) -> Output {
        let mut c = self.cp.kubectl();
        c.args(["-n", &self.ns]).args(args);
        run(c)
    }

    pub(crate) fn jsonpath(&self, what: &str, path: &str) -> String {
        text(
            &self
                .kubectl(&["get", what, "-o", &format!("jsonpath={path}")])
                .stdout,
        )
    }

    pub(crate) fn describe(&self, what: &str) -> String {
        text(&self.kubectl(&["describe", what]).stdout)
    }

    pub(crate) fn apply(&self, manifest: &serde_json::Value) {
        let mut c = self.cp.kubectl();
        c.args(["-n", &self.ns, "apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("kubectl apply: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin
                .write_all(manifest.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "kubectl apply: {}", text(&out.stderr));
    }

    pub(crate) fn wait_pod_ready(&self, pod: &str) {
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=300s",
        ]);
        assert!(
            out.status.success(),
            "pod {pod} Ready: {}\n{}",
            text(&out.stderr),
            self.describe(&format!("pod/{pod}"))
        );
    }

    /// The pod's UID.
    pub(crate) fn uid(&self, pod: &str) -> String {
        self.jsonpath(&format!("pod/{pod}"), "{.metadata.uid}")
    }

    /// A VM pod bound to this node (no scheduler needed), 256 MiB, with `policy`.
    pub(crate) fn vm_pod(&self, name: &str, policy: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name },
            "spec": {
                "nodeName": self.node,
                "restartPolicy": policy,
                "tolerations": [{ "operator": "Exists" }],
                "terminationGracePeriodSeconds": 10,
                "containers": [{
                    "name": "vm", "image": self.image,
                    "resources": { "requests": { "cpu": "1", "memory": "256Mi" } },
                }]
            }
        })
    }
}
