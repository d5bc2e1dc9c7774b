//! Helpers the benches share: fail loudly, wait for pods, stop the agent.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};

/// Print `msg` as the bench's failure and exit 1.
pub(crate) fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("bench: {msg}");
    std::process::exit(1)
}

/// The pod's Ready condition is True.
pub(crate) fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Delete a pod (5 s grace) and wait until the API server no longer has it.
pub(crate) async fn delete_and_wait(pods: &Api<Pod>, name: &str) {
    let _ = pods
        .delete(name, &DeleteParams::default().grace_period(5))
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while pods.get_opt(name).await.ok().flatten().is_some() {
        if Instant::now() > deadline {
            die(format!("{name} not deleted in 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where a bench's agent runs and what it pulls from.
pub(crate) struct AgentSetup<'a> {
    pub(crate) cp: &'a vzk_testenv::ControlPlane,
    pub(crate) id: &'a vzk_testenv::NodeIdentity,
    pub(crate) data: &'a std::path::Path,
    /// The VMs' network namespace.
    pub(crate) netns: &'a str,
    /// The registry (`host:port`, plain HTTP).
    pub(crate) registry: &'a str,
    /// The guest's SSH key.
    pub(crate) ssh_key: &'a std::path::Path,
    /// Its stderr (the JSON log).
    pub(crate) log: &'a std::path::Path,
}

/// Starts `vz-kubelet run` (the bench's own build) as the setup's node, root SSH into
/// the guests, JSON logs, TCG unless `VZK_ACCEL` says otherwise, with `extra` flags.
pub(crate) fn spawn_agent(s: &AgentSetup<'_>, extra: &[&str]) -> AgentProc {
    let logf = std::fs::File::create(s.log).unwrap_or_else(|e| die(e));
    // `VZK_BENCH_KEEP_LOG=FILE`: the agent's log is copied there when the agent stops.
    let keep = std::env::var_os("VZK_BENCH_KEEP_LOG").map(|to| (s.log.to_path_buf(), to.into()));
    let accel = std::env::var("VZK_ACCEL").unwrap_or_else(|_| "tcg".into());
    let child = Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
        .args([
            "run",
            "--node-name",
            &s.id.node_name,
            "--node-ip",
            "127.0.0.1",
        ])
        .args(["--accel", &accel])
        .arg("--kubeconfig")
        .arg(&s.id.kubeconfig)
        .arg("--client-ca-file")
        .arg(s.cp.ca_cert_path())
        .args(["--kubelet-port", &vzk_testenv::free_port().to_string()])
        .args(["--listen-address", "127.0.0.1"])
        .arg("--data-dir")
        .arg(s.data)
        .args(["--vm-netns", s.netns, "--insecure-registry", s.registry])
        .args(["--ssh-user", "root", "--log-format", "json"])
        .arg("--ssh-private-key-path")
        .arg(s.ssh_key)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| die(e));
    AgentProc(child, keep)
}

/// The agent process: SIGTERM on drop, SIGKILL after 20 s; then its log is copied
/// where `VZK_BENCH_KEEP_LOG` said (from, to).
pub(crate) struct AgentProc(pub(crate) Child, Option<(PathBuf, PathBuf)>);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some((from, to)) = &self.1
            && let Err(e) = std::fs::copy(from, to)
        {
            eprintln!("keeping the agent's log at {}: {e}", to.display());
        }
    }
}

/// The median (the upper one of an even count; 0 for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// `name` from the environment, parsed, else `default`.
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits (up to 60 s) until the agent has registered `node`.
pub(crate) async fn wait_node_registered(admin: &kube::Client, node: &str) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while nodes.get_opt(node).await.ok().flatten().is_none() {
        if Instant::now() > deadline {
            die("node did not register");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
