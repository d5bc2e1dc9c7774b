#![doc = include_str!("../README.md")]

pub mod auth;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
mod host;
pub mod metrics;
mod query;
mod readahead;
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
