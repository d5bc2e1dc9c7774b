//! `/healthz`, `/pods` (the pods assigned to this node, as a `PodList`) and `/metrics`
//! (the agent's own metrics).

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::server::AppState;

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

pub(crate) async fn pods(State(st): State<AppState>) -> Json<serde_json::Value> {
    let items = st.pods.pods();
    Json(serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": items,
    }))
}

/// `/runningpods/`, as the kubelet's debugging handlers serve it: a PodList of what the
/// runtime runs now (name, namespace, UID and container names of each pod), from the
/// runtime's own view rather than the API server's.
pub(crate) async fn running_pods(
    State(st): State<AppState>,
) -> Result<Json<serde_json::Value>, crate::error::ApiError> {
    let pods = st
        .runtime
        .pod_stats()
        .await
        .map_err(crate::error::ApiError::Provider)?;
    let items: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| {
            let containers: Vec<serde_json::Value> = p
                .containers
                .iter()
                .map(|c| serde_json::json!({ "name": c.name }))
                .collect();
            serde_json::json!({
                "metadata": {
                    "name": p.pod_ref.name,
                    "namespace": p.pod_ref.namespace,
                    "uid": p.pod_ref.uid,
                },
                "spec": { "containers": containers },
                "status": {},
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": items,
    })))
}

pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        st.metrics.render(),
    )
        .into_response()
}
