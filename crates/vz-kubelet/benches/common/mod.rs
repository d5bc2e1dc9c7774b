//! Helpers the benches share: fail loudly, wait for pods, stop the agent.
#![allow(dead_code)]

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

/// The agent process: SIGTERM on drop, SIGKILL after 20 s.
pub(crate) struct AgentProc(pub(crate) Child);

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
    }
}

/// The median (the upper one of an even count; 0 for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}
