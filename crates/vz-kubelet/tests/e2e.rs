//! End to end, the way a user drives a node: the `vz-kubelet run` binary as
//! `system:node:<name>` against a real kube-apiserver (Node + RBAC + NodeRestriction),
//! a real `docker-registry` holding the test guest as a VM image, QEMU (TCG) VMs in a
//! network namespace the test owns, and real `kubectl` 1.37 for apply, wait, exec, logs,
//! port-forward and delete.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vzk_testenv::{ControlPlane, Netns, Registry, free_port, guest};

mod support;

use support::dockerd::PrivateDockerd;

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

/// A node under test: the guest image in a registry, the agent binary running as
/// `system:node:<node>` with its VMs in a network namespace of the test's own.
struct Node {
    cp: &'static ControlPlane,
    ns: String,
    node: String,
    image: String,
    registry: Registry,
    data: PathBuf,
    agent: Agent,
    /// The port of the agent's kubelet API (on 127.0.0.1).
    kubelet_port: u16,
    /// Held for its drop: the VMs' namespace goes after the agent.
    _netns: Netns,
    work: tempfile::TempDir,
}

impl Node {
    async fn start(prefix: &str) -> Node {
        Self::start_with(prefix, &[]).await
    }

    /// With extra `vz-kubelet run` arguments.
    async fn start_with(prefix: &str, extra: &[&str]) -> Node {
        Self::start_with_env(prefix, extra, &[]).await
    }

    /// With extra `vz-kubelet run` arguments and environment variables of the agent.
    async fn start_with_env(prefix: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let cp = ControlPlane::shared();
        let ns = cp.create_namespace(prefix).await;
        let node = format!("{prefix}-{:06x}", rand_u24());
        let id = cp.node_identity(&node);
        let registry = Registry::start();
        let g = guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let image = format!("{}/e2e/guest:v1", registry.addr);
        push_guest(work.path(), &image, &[]);
        let netns = Netns::new();
        let data = work.path().join("data");
        let log = work.path().join("agent.log");
        let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let kubelet_port = free_port();
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
                &kubelet_port.to_string(),
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
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "VZK_LOG",
                std::env::var("VZK_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("starting vz-kubelet: {e}"));
        let n = Node {
            cp,
            ns,
            node,
            image,
            registry,
            data,
            agent: Agent { child, log },
            kubelet_port,
            _netns: netns,
            work,
        };
        wait_until(Duration::from_secs(60), "the node object", || {
            n.kubectl(&["get", "node", &n.node]).status.success()
        });
        let out = n.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("node/{}", n.node),
            "--timeout=60s",
        ]);
        assert!(out.status.success(), "node Ready: {}", text(&out.stderr));
        n
    }

    /// GET `path` from the agent's kubelet API as a cluster admin (a client certificate
    /// of the cluster CA, authorized by SubjectAccessReview), through curl.
    fn kubelet_get(&self, path: &str) -> String {
        let pair = self
            .cp
            .issue_client_cert("e2e-admin", Some("system:masters"));
        let (crt, key) = (
            self.work.path().join("admin-client.crt"),
            self.work.path().join("admin-client.key"),
        );
        std::fs::write(&crt, &pair.cert_pem).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&key, &pair.key_pem).unwrap_or_else(|e| panic!("{e}"));
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail-with-body", "-k", "--cert"])
            .arg(&crt)
            .arg("--key")
            .arg(&key)
            .arg(format!("https://127.0.0.1:{}{path}", self.kubelet_port));
        let out = run(c);
        assert!(
            out.status.success(),
            "GET {path}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// kubectl as the admin, in the test's namespace.
    fn kubectl(&self, args: &[&str]) -> Output {
        let mut c = self.cp.kubectl();
        c.args(["-n", &self.ns]).args(args);
        run(c)
    }

    fn apply(&self, manifest: &serde_json::Value) {
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

    fn jsonpath(&self, what: &str, path: &str) -> String {
        text(
            &self
                .kubectl(&["get", what, "-o", &format!("jsonpath={path}")])
                .stdout,
        )
    }

    /// `reason: message` of the pod's events, one per line.
    fn events(&self, pod: &str) -> String {
        text(
            &self
                .kubectl(&[
                    "get",
                    "events",
                    "--field-selector",
                    &format!("involvedObject.name={pod}"),
                    "-o",
                    "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
                ])
                .stdout,
        )
    }
}

/// Pushes the test guest as `image` with extra `vz-kubelet image push` arguments.
fn push_guest(work: &Path, image: &str, extra: &[&str]) {
    let g = guest(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let img = work.join("image");
    if !img.join("config.json").exists() {
        g.image_dir(&img);
    }
    let mut push = vz_kubelet();
    push.args(["image", "push", "--root"])
        .arg(work.join("push-cache"))
        .arg("--plain-http")
        .args(extra)
        .arg(&img)
        .arg(image);
    let out = run(push);
    assert!(
        out.status.success(),
        "image push {image}: {}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_runs_a_vm_pod_with_kubectl_apply_exec_logs_port_forward_and_delete() {
    let n = Node::start("e2e").await;
    let (cp, ns, node, image, data) = (n.cp, &n.ns, &n.node, &n.image, &n.data);
    let kubectl = |args: &[&str]| n.kubectl(args);

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
    n.apply(&manifest);
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

    // /metrics, read by a Prometheus text parser: the pod's start has one observation
    // per phase, one boot and one fetched pull; the pod is counted Running in a slot.
    let text_metrics = n.kubelet_get("/metrics");
    let scrape = prometheus_parse::Scrape::parse(text_metrics.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("parsing /metrics: {e}\n{text_metrics}"));
    let value = |metric: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .find_map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{metric} {label:?} missing from /metrics:\n{text_metrics}"))
    };
    for phase in ["pull", "clone", "boot", "ip", "ssh", "ready"] {
        assert_eq!(
            value("vzk_pod_start_phase_seconds_count", Some(("phase", phase))),
            1.0,
            "phase {phase}:\n{text_metrics}"
        );
    }
    assert!(value("vzk_pod_start_phase_seconds_sum", Some(("phase", "ready"))) > 0.0);
    assert_eq!(value("vzk_vm_boots_total", None), 1.0);
    assert_eq!(
        value("vzk_image_pulls_total", Some(("result", "pulled"))),
        1.0
    );
    assert!(value("vzk_image_pulled_bytes_total", None) > 0.0);
    assert_eq!(value("vzk_pods", Some(("phase", "Running"))), 1.0);
    assert_eq!(value("vzk_vm_slots_in_use", None), 1.0);
    // The agent's own API writes: at least its status patches (HTTP 200).
    assert!(
        value("vzk_apiserver_requests_total", Some(("verb", "patch"))) >= 1.0,
        "{text_metrics}"
    );

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
        ns,
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
    c.args(["-n", ns, "port-forward", "pod/ci", ":22"])
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
    c.args(["-n", ns, "logs", "-f", "ci", "-c", "vm", "--tail=1"])
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
    let mut n = n;
    let status = n.agent.stop();
    assert!(
        status.success(),
        "agent exit: {status:?}\n{}",
        n.agent.log()
    );
}

fn rand_u24() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() & 0xff_ffff)
        .unwrap_or(0)
}

/// Waits until container 0 of `pod` waits with one of `reasons`; returns its message.
fn waiting_with(n: &Node, pod: &str, reasons: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = n.jsonpath(
            &format!("pod/{pod}"),
            "{.status.containerStatuses[0].state.waiting.reason}|{.status.containerStatuses[0].state.waiting.message}",
        );
        if let Some((reason, message)) = state.split_once('|')
            && reasons.contains(&reason)
        {
            return message.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{pod}: waiting for {reasons:?}, last state {state:?}\nevents:\n{}",
            n.events(pod)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn vm_pod(n: &Node, name: &str, image: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "nodeName": n.node,
            "tolerations": [{ "operator": "Exists" }],
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "vm", "image": image,
                "resources": { "requests": { "cpu": "1", "memory": "256Mi" } }
            }]
        }
    });
    if let (Some(spec), Some(extra)) = (pod["spec"].as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pods_end_in_clear_states_with_events_and_the_node_stays_ready() {
    let private = Registry::with_auth("alice", "right-password");
    let n = Node::start_with("e2e-bad", &["--insecure-registry", &private.addr]).await;

    // A VM image that does not exist.
    let missing = format!("{}/e2e/no-such-image:v1", n.registry.addr);
    n.apply(&vm_pod(&n, "missing", &missing, serde_json::json!({})));

    // An image behind auth, with a pull secret holding the wrong password.
    let private_image = format!("{}/e2e/guest:v1", private.addr);
    push_guest(
        n.work.path(),
        &private_image,
        &["--username", "alice", "--password", "right-password"],
    );
    let auth = base64_encode(b"alice:wrong-password");
    let dockercfg = serde_json::json!({ "auths": { private.addr.clone(): { "auth": auth } } });
    n.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "wrong-creds" },
        "type": "kubernetes.io/dockerconfigjson",
        "data": { ".dockerconfigjson": base64_encode(dockercfg.to_string().as_bytes()) }
    }));
    n.apply(&vm_pod(
        &n,
        "bad-secret",
        &private_image,
        serde_json::json!({ "imagePullSecrets": [{ "name": "wrong-creds" }] }),
    ));

    // A CPU request a VM cannot have.
    let mut fractional = vm_pod(&n, "fractional", &n.image, serde_json::json!({}));
    fractional["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "1500m".into();
    n.apply(&fractional);

    // A postStart hook that fails, with restartPolicy Never: the VM is killed, the pod fails.
    let mut hook = vm_pod(
        &n,
        "hook",
        &n.image,
        serde_json::json!({ "restartPolicy": "Never" }),
    );
    hook["spec"]["containers"][0]["lifecycle"] = serde_json::json!({ "postStart": { "exec": { "command": ["sh", "-c", "echo no-way >&2; exit 4"] } } });
    n.apply(&hook);

    let msg = waiting_with(&n, "missing", &["ErrImagePull", "ImagePullBackOff"]);
    assert!(
        msg.contains("no-such-image"),
        "message names the image: {msg}"
    );
    let msg = waiting_with(&n, "bad-secret", &["ErrImagePull", "ImagePullBackOff"]);
    assert!(
        msg.to_lowercase().contains("unauthorized")
            || msg.contains("401")
            || msg.contains("denied"),
        "message says the credentials were refused: {msg}"
    );
    let msg = waiting_with(&n, "fractional", &["InvalidCPU"]);
    assert!(msg.contains("1500m"), "message names the request: {msg}");
    assert!(
        n.events("fractional").contains("1500m"),
        "{}",
        n.events("fractional")
    );
    for pod in ["missing", "bad-secret"] {
        let ev = n.events(pod);
        assert!(
            ev.lines().any(|l| l.starts_with("Failed: ")),
            "{pod} events:\n{ev}"
        );
    }

    wait_until(
        Duration::from_secs(240),
        "the postStart pod to fail",
        || n.jsonpath("pod/hook", "{.status.phase}") == "Failed",
    );
    let ev = n.events("hook");
    assert!(
        ev.contains("FailedPostStartHook: ") && ev.contains("no-way"),
        "hook events:\n{ev}"
    );
    let terminated = n.jsonpath(
        "pod/hook",
        "{.status.containerStatuses[0].state.terminated.reason}",
    );
    assert!(
        !terminated.is_empty(),
        "container 0 terminated with a reason"
    );

    // None of it hurt the node.
    let ready = n.jsonpath(
        &format!("node/{}", n.node),
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    );
    assert_eq!(ready, "True");
    for pod in ["missing", "bad-secret", "fractional", "hook"] {
        let out = n.kubectl(&["delete", "pod", pod, "--wait=true", "--timeout=60s"]);
        assert!(out.status.success(), "delete {pod}: {}", text(&out.stderr));
    }
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// `type -> (status, reason, message)` of the node's conditions.
fn node_conditions(n: &Node) -> BTreeMap<String, (String, String, String)> {
    let out = n.kubectl(&["get", "node", &n.node, "-o", "json"]);
    let node: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                s(&c["type"]),
                (s(&c["status"]), s(&c["reason"]), s(&c["message"])),
            )
        })
        .collect()
}

/// Polls the node's conditions until `ok` holds for them; returns them.
fn wait_for_conditions(
    n: &Node,
    what: &str,
    ok: impl Fn(&BTreeMap<String, (String, String, String)>) -> bool,
) -> BTreeMap<String, (String, String, String)> {
    let start = Instant::now();
    let timeout = Duration::from_secs(90);
    loop {
        let c = node_conditions(n);
        if ok(&c) {
            return c;
        }
        assert!(
            start.elapsed() < timeout,
            "node {}: timed out after {timeout:?} waiting for {what}; conditions: {c:#?}\n{}",
            n.node,
            n.agent.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn status_of<'a>(c: &'a BTreeMap<String, (String, String, String)>, type_: &str) -> &'a str {
    c.get(type_).map_or("", |(s, _, _)| s.as_str())
}

fn message_of<'a>(c: &'a BTreeMap<String, (String, String, String)>, type_: &str) -> &'a str {
    c.get(type_).map_or("", |(_, _, m)| m.as_str())
}

/// Two agents on a dockerd of the test's own (`DOCKER_HOST`), one with
/// `--docker-optional`. Stopping that dockerd turns both nodes' DockerReady False with
/// a message naming dockerd; the plain node's Ready turns False naming the failed
/// check, the docker-optional node stays Ready. Starting dockerd again brings both back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_dockerd_turns_docker_ready_false_and_starting_it_recovers() {
    let host_bridge = || {
        Command::new("ip")
            .args(["link", "show", "docker0"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let had_bridge = host_bridge();
    let mut dockerd = PrivateDockerd::start();
    let host = dockerd.host();
    let env = [("DOCKER_HOST", host.as_str())];
    // Status every 2 s (the lease period is the status period).
    let fast = ["--lease-renew-seconds", "2"];
    let plain = Node::start_with_env("e2e-dkr", &fast, &env).await;
    let optional = Node::start_with_env(
        "e2e-dko",
        &[fast.as_slice(), &["--docker-optional"]].concat(),
        &env,
    )
    .await;
    let both_ready = |c: &BTreeMap<String, (String, String, String)>| {
        status_of(c, "DockerReady") == "True" && status_of(c, "Ready") == "True"
    };
    for n in [&plain, &optional] {
        wait_for_conditions(n, "DockerReady and Ready True", both_ready);
    }

    // dockerd stops (times from its SIGTERM).
    let stopped = Instant::now();
    dockerd.stop();
    let t_exit = stopped.elapsed();
    let c = wait_for_conditions(&plain, "DockerReady False", |c| {
        status_of(c, "DockerReady") == "False"
    });
    let t_docker = stopped.elapsed();
    let docker_msg = message_of(&c, "DockerReady").to_owned();
    assert!(
        docker_msg.contains("dockerd"),
        "DockerReady names dockerd: {c:#?}"
    );
    let c = wait_for_conditions(&plain, "Ready False", |c| status_of(c, "Ready") == "False");
    let t_ready = stopped.elapsed();
    let ready_msg = message_of(&c, "Ready");
    assert!(
        ready_msg.contains("DockerReady") && ready_msg.contains("dockerd"),
        "Ready names the failed check: {c:#?}"
    );
    assert_eq!(
        c.get("Ready").map(|(_, r, _)| r.as_str()),
        Some("ProviderUnhealthy"),
        "{c:#?}"
    );
    for other in ["VMBackendReady", "DataDirReady"] {
        assert_eq!(status_of(&c, other), "True", "only Docker failed: {c:#?}");
    }
    let c = wait_for_conditions(&optional, "DockerReady False (--docker-optional)", |c| {
        status_of(c, "DockerReady") == "False"
    });
    let t_optional = stopped.elapsed();
    assert!(
        message_of(&c, "DockerReady").contains("dockerd"),
        "DockerReady names dockerd: {c:#?}"
    );
    // Status periods later the optional node is still Ready.
    std::thread::sleep(Duration::from_secs(5));
    let c = node_conditions(&optional);
    assert_eq!(
        (status_of(&c, "DockerReady"), status_of(&c, "Ready")),
        ("False", "True"),
        "--docker-optional: the node stays Ready: {c:#?}"
    );
    println!(
        "dockerd stopped (exited {t_exit:.1?} after SIGTERM): DockerReady False after \
         {t_docker:.1?}, Ready False after {t_ready:.1?} (docker-optional node: DockerReady \
         False by {t_optional:.1?}, Ready stays True); DockerReady message: {docker_msg}"
    );

    // dockerd starts again (times from its answering).
    let spawned = Instant::now();
    dockerd.restart();
    let t_up = spawned.elapsed();
    let started = Instant::now();
    wait_for_conditions(&plain, "DockerReady True again", |c| {
        status_of(c, "DockerReady") == "True"
    });
    let t_docker = started.elapsed();
    let c = wait_for_conditions(&plain, "Ready True again", |c| {
        status_of(c, "Ready") == "True"
    });
    let t_ready = started.elapsed();
    assert_eq!(
        c.get("Ready").map(|(_, r, _)| r.as_str()),
        Some("KubeletReady"),
        "{c:#?}"
    );
    let c = wait_for_conditions(
        &optional,
        "DockerReady True again (--docker-optional)",
        both_ready,
    );
    let t_optional = started.elapsed();
    assert!(both_ready(&c));
    println!(
        "dockerd started again (answering {t_up:.1?} after its spawn): DockerReady True \
         after {t_docker:.1?}, Ready True after {t_ready:.1?} (docker-optional node: \
         DockerReady and Ready True by {t_optional:.1?})"
    );

    let mut plain = plain;
    let mut optional = optional;
    for a in [&mut plain.agent, &mut optional.agent] {
        let status = a.stop();
        assert!(status.success(), "agent exit: {status:?}\n{}", a.log());
    }
    drop((plain, optional));
    dockerd.stop();
    // The shared dockerd's bridge is untouched (other tests' containers need it).
    assert_eq!(host_bridge(), had_bridge, "the host's docker0 bridge");
}

/// An OTLP/HTTP (JSON) trace receiver on 127.0.0.1: accepts `POST /v1/traces` (HTTP/1.1,
/// keep-alive, `Content-Length` bodies) and keeps each request's JSON.
struct OtlpReceiver {
    url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("binding the OTLP receiver: {e}"));
        let url = format!(
            "http://{}",
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        );
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || Self::serve(conn, &kept));
            }
        });
        OtlpReceiver { url, requests }
    }

    fn serve(conn: std::net::TcpStream, kept: &std::sync::Mutex<Vec<serde_json::Value>>) {
        use std::io::Write as _;
        let mut writer = match conn.try_clone() {
            Ok(w) => w,
            Err(_) => return,
        };
        let mut reader = BufReader::new(conn);
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let ok = request_line.starts_with("POST /v1/traces ");
            if ok && let Ok(v) = serde_json::from_slice(&body) {
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(v);
            }
            let status = if ok { "200 OK" } else { "404 Not Found" };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
            );
            if writer.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Every span received, each with its resource's attributes under `"resource"`.
    fn spans(&self) -> Vec<serde_json::Value> {
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut spans = Vec::new();
        for req in requests.iter() {
            for rs in req["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        let mut s = s.clone();
                        s["resource"] = rs["resource"]["attributes"].clone();
                        spans.push(s);
                    }
                }
            }
        }
        spans
    }
}

/// The string value of attribute `key` in an OTLP JSON attribute list.
fn otlp_attr<'a>(attrs: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    attrs
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?
        .get("value")?
        .get("stringValue")?
        .as_str()
}

/// A span's start or end time (nanoseconds; OTLP JSON writes them as strings or numbers).
fn otlp_nanos(span: &serde_json::Value, field: &str) -> u64 {
    match &span[field] {
        serde_json::Value::String(s) => s.parse().unwrap_or(0),
        v => v.as_u64().unwrap_or(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_start_is_one_otlp_trace_with_its_phases_as_spans() {
    let receiver = OtlpReceiver::start();
    let mut n = Node::start_with_env(
        "e2e-otel",
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.as_str())],
    )
    .await;
    let image = n.image.clone();
    n.apply(&vm_pod(&n, "traced", &image, serde_json::json!({})));
    let out = n.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/traced",
        "--timeout=300s",
    ]);
    assert!(
        out.status.success(),
        "pod Ready: {}\n{}",
        text(&out.stderr),
        n.events("traced")
    );
    let uid = n.jsonpath("pod/traced", "{.metadata.uid}");

    // SIGTERM at once: the spans still queued in the batch exporter are flushed at exit.
    let status = n.agent.stop();
    assert!(
        status.success(),
        "agent exit: {status:?}\n{}",
        n.agent.log()
    );
    // The VM outlives the agent on purpose; this test has no further use for it.
    for pid in pids_with(&format!("vzk-{uid}")) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }

    let spans = receiver.spans();
    let dump = || serde_json::to_string_pretty(&spans).unwrap_or_default();
    let root = spans
        .iter()
        .find(|s| {
            s["name"] == "pod_start"
                && otlp_attr(&s["attributes"], "k8s.pod.name") == Some("traced")
        })
        .unwrap_or_else(|| panic!("no pod_start span of pod traced:\n{}", dump()));
    let attrs = &root["attributes"];
    assert_eq!(otlp_attr(attrs, "k8s.namespace.name"), Some(n.ns.as_str()));
    assert_eq!(otlp_attr(attrs, "k8s.pod.uid"), Some(uid.as_str()));
    assert_eq!(
        otlp_attr(attrs, "container.image.name"),
        Some(image.as_str())
    );
    assert_eq!(
        otlp_attr(&root["resource"], "service.name"),
        Some("vz-kubelet")
    );
    assert_eq!(
        otlp_attr(&root["resource"], "k8s.node.name"),
        Some(n.node.as_str())
    );
    // A trace of its own: the root has no parent.
    assert!(
        root["parentSpanId"].as_str().unwrap_or_default().is_empty(),
        "pod_start has a parent: {root}"
    );
    let trace = root["traceId"].as_str().unwrap_or_default();
    assert!(!trace.is_empty(), "{root}");
    // Each phase once, a child of pod_start in the same trace, one after the other.
    let mut last_end = otlp_nanos(root, "startTimeUnixNano");
    for phase in ["pull", "clone", "boot", "ip", "ssh"] {
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s["name"] == phase && s["traceId"] == trace)
            .collect();
        assert_eq!(found.len(), 1, "span {phase} in trace {trace}:\n{}", dump());
        let s = found[0];
        assert_eq!(s["parentSpanId"], root["spanId"], "parent of {phase}: {s}");
        let (start, end) = (
            otlp_nanos(s, "startTimeUnixNano"),
            otlp_nanos(s, "endTimeUnixNano"),
        );
        assert!(
            start >= last_end && end >= start,
            "{phase} runs {start}..{end}, the phase before ended at {last_end}"
        );
        last_end = end;
    }
    assert!(
        otlp_nanos(root, "endTimeUnixNano") >= last_end,
        "pod_start ends after ssh: {root}"
    );
}
