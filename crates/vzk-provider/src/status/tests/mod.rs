//! Tables of the status rules: container 0 alone, with side-cars, with init
//! containers, across restart policies and exit codes (what `kubectl get pod` shows is
//! checked with its printer's rules).
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStateTerminated, Pod};
use k8s_openapi::jiff::Timestamp;

use super::*;

fn now() -> Time {
    Time(Timestamp::now())
}

/// A pod of `n` containers (c0 the VM) under `policy`, with init containers `init`
/// (`"~name"`: a native side-car).
fn pod(n: usize, policy: Option<&str>, init: &[&str]) -> Pod {
    let init: Vec<serde_json::Value> = init
        .iter()
        .map(|n| match n.strip_prefix('~') {
            Some(n) => serde_json::json!({"name": n, "image": "bb", "restartPolicy": "Always"}),
            None => serde_json::json!({"name": n, "image": "bb"}),
        })
        .collect();
    let containers: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"name": format!("c{i}"), "image": format!("img{i}")}))
        .collect();
    let mut spec = serde_json::json!({"containers": containers, "restartPolicy": policy});
    if !init.is_empty() {
        spec["initContainers"] = serde_json::Value::Array(init);
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": spec,
    }))
    .unwrap()
}

fn w(name: &str, reason: &str) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(waiting(reason, None)),
        ..Default::default()
    }
}

fn run(name: &str, ready: bool) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        }),
        started: Some(true),
        ready,
        ..Default::default()
    }
}

fn term_state(code: i32) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn term(name: &str, code: i32, restarts: i32) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(term_state(code)),
        restart_count: restarts,
        ..Default::default()
    }
}

/// Waiting to be restarted after a failure.
fn crash_loop(name: &str, restarts: i32) -> ContainerStatus {
    let mut s = w(name, "CrashLoopBackOff");
    s.last_state = Some(term_state(1));
    s.restart_count = restarts;
    s
}

fn vm_waiting(reason: &str) -> VmPhase {
    VmPhase::Waiting {
        reason: reason.into(),
        message: String::new(),
    }
}

fn vm_running(ready: bool) -> VmPhase {
    VmPhase::Running {
        started_at: now(),
        ip: Some("10.0.0.5".into()),
        ready,
    }
}

fn vm_ended(code: i32) -> VmPhase {
    VmPhase::Terminated {
        exit_code: code,
        reason: if code == 0 { "Completed" } else { "Error" }.into(),
        message: None,
        started_at: Some(now()),
        finished_at: now(),
    }
}

/// Everything a test varies, with defaults for the rest.
struct View {
    pod: Pod,
    vm: VmPhase,
    history: VmHistory,
    sidecars: Vec<ContainerStatus>,
    init: Vec<ContainerStatus>,
    initialized_at: Option<Time>,
    start: Time,
}

impl View {
    fn new(pod: Pod, vm: VmPhase) -> Self {
        let start = now();
        let has_init = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|i| !i.is_empty());
        Self {
            pod,
            vm,
            history: VmHistory::default(),
            sidecars: Vec::new(),
            init: Vec::new(),
            initialized_at: (!has_init).then(|| start.clone()),
            start,
        }
    }
    fn sidecars(mut self, s: Vec<ContainerStatus>) -> Self {
        self.sidecars = s;
        self
    }
    fn init(mut self, s: Vec<ContainerStatus>, at: Option<&Time>) -> Self {
        self.init = s;
        self.initialized_at = at.cloned();
        self
    }
    fn history(mut self, h: VmHistory) -> Self {
        self.history = h;
        self
    }
    fn status(&self) -> PodStatus {
        self.status_after(None)
    }
    fn status_after(&self, previous: Option<&PodStatus>) -> PodStatus {
        pod_status(
            &PodView {
                pod: &self.pod,
                start_time: &self.start,
                vm: &self.vm,
                history: &self.history,
                sidecars: &self.sidecars,
                init: &self.init,
                initialized_at: self.initialized_at.as_ref(),
            },
            previous,
            &now(),
        )
    }
}

fn cond(s: &PodStatus, t: &str) -> PodCondition {
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == t)
        .cloned()
        .unwrap()
}

fn c0(s: &PodStatus) -> &ContainerStatus {
    &s.container_statuses.as_ref().unwrap()[0]
}

fn waiting_reason(c: &ContainerStatus) -> Option<&str> {
    c.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

/// What `kubectl get pod` shows in its STATUS column (its printer's rules for init
/// containers, then the waiting reason of the first app container, or the phase).
fn kubectl(p: &Pod, s: &PodStatus) -> String {
    let init = p
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let mut reason = None;
    for (i, c) in s.init_container_statuses.iter().flatten().enumerate() {
        let st = c.state.as_ref().unwrap();
        let native = init.iter().any(|x| x.name == c.name && is_native(x));
        if completed(c) || (native && c.started == Some(true)) {
            continue;
        }
        reason = Some(match (&st.terminated, &st.waiting) {
            (Some(t), _) => format!("Init:{}", t.reason.clone().unwrap()),
            (None, Some(w)) if w.reason.as_deref() != Some("PodInitializing") => {
                format!("Init:{}", w.reason.clone().unwrap())
            }
            _ => format!("Init:{i}/{}", init.len()),
        });
        break;
    }
    if cond(s, "Initialized").status == "True" || reason.is_none() {
        return waiting_reason(c0(s))
            .map(str::to_owned)
            .unwrap_or_else(|| s.phase.clone().unwrap());
    }
    reason.unwrap()
}

mod app;
mod init;
