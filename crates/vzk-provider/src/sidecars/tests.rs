#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, Pod, PodStatus};
use vzk_core::ProviderError;

use crate::pod::PodEntry;
use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStateTerminated, PodCondition};

use super::*;

/// A terminated state (helper for tests of [`merge`]).
fn terminated(code: i32) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn cs(name: &str, state: ContainerState, ready: bool) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(state),
        ready,
        ..Default::default()
    }
}

fn running() -> ContainerState {
    ContainerState {
        running: Some(ContainerStateRunning::default()),
        ..Default::default()
    }
}

fn base(vm: ContainerStatus, phase: &str) -> PodStatus {
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(
            ["Initialized", "ContainersReady", "Ready"]
                .iter()
                .map(|t| PodCondition {
                    type_: (*t).into(),
                    status: "False".into(),
                    ..Default::default()
                })
                .collect(),
        ),
        container_statuses: Some(vec![vm, cs("side", waiting("SidecarNotRun", "x"), false)]),
        ..Default::default()
    }
}

fn cond(s: &PodStatus, t: &str) -> String {
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
        .unwrap()
}

#[test]
fn ready_needs_every_container() {
    let mut s = base(cs("vm", running(), true), "Running");
    merge(&mut s, &[cs("side", running(), false)], None);
    assert_eq!(cond(&s, "Ready"), "False");
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(s.container_statuses.as_ref().unwrap().len(), 2);
    let mut s = base(cs("vm", running(), true), "Running");
    merge(&mut s, &[cs("side", running(), true)], None);
    assert_eq!(cond(&s, "Ready"), "True");
    assert_eq!(cond(&s, "ContainersReady"), "True");
    assert_eq!(cond(&s, "Initialized"), "False", "untouched");
}

#[test]
fn phase_over_all_containers() {
    // VM still pulling, side-car running: Pending.
    let mut s = base(cs("vm", waiting("Pulling", ""), false), "Pending");
    merge(&mut s, &[cs("side", running(), true)], None);
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    // OnFailure: a side-car that exited 0 is no failure; the pod runs on.
    let mut s = base(cs("vm", running(), true), "Running");
    merge(
        &mut s,
        &[cs("side", terminated(0), false)],
        Some("OnFailure"),
    );
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(cond(&s, "Ready"), "False");
    // Never: everything ended, one failed → Failed.
    let mut s = base(cs("vm", terminated(0), false), "Succeeded");
    merge(&mut s, &[cs("side", terminated(3), false)], Some("Never"));
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    // OnFailure: all ended with 0 → Succeeded.
    let mut s = base(cs("vm", terminated(0), false), "Succeeded");
    merge(
        &mut s,
        &[cs("side", terminated(0), false)],
        Some("OnFailure"),
    );
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    // A side-car in back-off (waiting with a lastState) counts as started.
    let mut side = cs("side", waiting("CrashLoopBackOff", ""), false);
    side.last_state = Some(terminated(1));
    let mut s = base(cs("vm", running(), true), "Running");
    merge(&mut s, &[side], None);
    assert_eq!(s.phase.as_deref(), Some("Running"));
}

fn pod_with_side_probe(probe: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": {"containers": [
            {"name": "vm", "image": "vm"},
            {"name": "side", "image": "bb", "ports": [{"name": "web", "containerPort": 8080}],
             "livenessProbe": probe}
        ]}
    }))
    .unwrap()
}

#[test]
fn sidecar_probes_are_checked_at_create_time() {
    let ok = [
        serde_json::json!({"tcpSocket": {"port": "web"}}),
        serde_json::json!({"tcpSocket": {"port": 8080, "host": "127.0.0.1"}}),
        serde_json::json!({"httpGet": {"port": 8080, "host": "localhost"}}),
        serde_json::json!({"httpGet": {"port": 8080, "host": "::1"}}),
        serde_json::json!({"exec": {"command": ["true"]}}),
    ];
    for p in ok {
        validate(&pod_with_side_probe(p.clone())).unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    let bad = [
        (
            serde_json::json!({"tcpSocket": {"port": 8080, "host": "10.0.0.1"}}),
            "host \"10.0.0.1\" is not reachable",
        ),
        (
            serde_json::json!({"httpGet": {"port": 8080, "host": "example.com"}}),
            "host \"example.com\"",
        ),
        (
            serde_json::json!({"tcpSocket": {"port": "nope"}}),
            "not a named port",
        ),
        (
            serde_json::json!({"grpc": {"port": 8080}}),
            "gRPC probes are not supported",
        ),
        (
            serde_json::json!({"exec": {"command": ["true"]}, "successThreshold": 2}),
            "successThreshold must be 1",
        ),
    ];
    for (p, want) in bad {
        match validate(&pod_with_side_probe(p.clone())) {
            Err(ProviderError::Invalid { reason, message }) => {
                assert_eq!(reason, "InvalidProbe", "{p}");
                assert!(message.contains(want), "{p}: {message}");
                assert!(message.contains("\"side\""), "{p}: {message}");
            }
            other => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn port_forward_goes_to_the_vm_unless_only_a_sidecar_declares_the_port() {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": {"containers": [
            {"name": "vm", "image": "vm", "ports": [{"containerPort": 22}]},
            {"name": "web", "image": "bb", "ports": [{"containerPort": 8080}, {"containerPort": 22}]}
        ]}
    }))
    .unwrap();
    let key = vzk_core::PodKey::of(&pod).unwrap();
    let e = PodEntry::new(
        key,
        pod,
        std::path::PathBuf::from("/nonexistent"),
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
        vzk_guest::Credentials::with_password("root", "x"),
    );
    assert_eq!(port_owner(&e, 8080).as_deref(), Some("web"));
    assert_eq!(port_owner(&e, 22), None);
    assert_eq!(port_owner(&e, 5900), None);
    assert!(is_sidecar(&e, "web"));
    assert!(!is_sidecar(&e, "vm"));
}
