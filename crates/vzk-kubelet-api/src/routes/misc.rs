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

pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        st.metrics.render(),
    )
        .into_response()
}
