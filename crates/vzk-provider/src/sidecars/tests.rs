#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::Pod;
use vzk_core::ProviderError;

use crate::pod::PodEntry;

use super::*;

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
