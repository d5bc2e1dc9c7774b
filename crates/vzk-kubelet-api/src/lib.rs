//! The kubelet HTTPS API of vz-kubelet (the port the API server and metrics-server
//! call, 10250 by default).
//!
//! * [`server`]: [`KubeletServer`], TLS with hot-reloaded certificates, client-cert and
//!   bearer-token authentication, SubjectAccessReview authorization.
//! * routes: `/containerLogs`, `/stats/summary`, `/metrics/resource`, `/pods`,
//!   `/healthz`, `/metrics`; every handler only translates to
//!   [`vzk_core::StreamingRuntime`] calls.
//! * [`streaming`]: `/exec`, `/attach` and `/portForward` over SPDY/3.1 ([`spdy`]) and
//!   WebSocket (`v5.channel.k8s.io`, `v4`, base64, the port-forward channel protocol and
//!   the `SPDY/3.1+portforward.k8s.io` tunnel).
//!
//! # Example
//! ```no_run
//! # async fn run(provider: std::sync::Arc<dyn vzk_core::StreamingRuntime>, client: kube::Client) {
//! use vzk_kubelet_api::KubeletServer;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:10250").await.unwrap();
//! KubeletServer::builder()
//!     .provider(provider)
//!     .node_name("node-1")
//!     .tls("/etc/vzk/kubelet.crt", "/etc/vzk/kubelet.key", "/etc/vzk/client-ca.crt")
//!     .authenticator(client)
//!     .serve(listener, std::future::pending())
//!     .await
//!     .unwrap();
//! # }
//! ```

pub mod auth;
pub mod error;
mod host;
pub mod metrics;
mod query;
mod routes;
pub mod server;
pub mod spdy;
pub mod streaming;
pub mod tls;

pub use server::{KubeletServer, KubeletServerBuilder, PodSource, ServerError};

/// The node-declared feature that lets a 1.36+ API server pass WebSocket exec/attach/
/// port-forward straight to this kubelet (`Node.status.declaredFeatures`).
pub const EXTEND_WEBSOCKETS_TO_KUBELET: &str = "ExtendWebSocketsToKubelet";

/// Whether this crate's WebSocket path (v5/v4 exec and attach, the port-forward
/// `SPDY/3.1+portforward.k8s.io` tunnel) is implemented and tested, i.e. whether the
/// node may declare [`EXTEND_WEBSOCKETS_TO_KUBELET`].
pub const WEBSOCKETS_SUPPORTED: bool = true;

/// Formats an error with its `source()` chain, `a: b: c`.
pub(crate) use vzk_core::error_chain;
