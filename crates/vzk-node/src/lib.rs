//! The provider-agnostic node runtime of vz-kubelet.
//!
//! * [`node::NodeController`]: registers the Node, keeps its status and Lease live.
//! * [`pods::PodController`]: runs the pods bound to the node through a
//!   [`vzk_core::PodLifecycle`] provider.
//! * [`api_metrics`]: the agent's API requests by verb and code, as a client layer.
//! * [`config::NodeConfig`]: validated configuration (NodeRestriction-safe labels).
//! * [`volumes::VolumeManager`]: pod volumes on the host (emptyDir, hostPath, configMap,
//!   secret, downwardAPI, projected service-account tokens), kept current.
//!
//! The runtime needs only the rights of `system:node:<name>` under the Node authorizer:
//! it watches its own pods, its Node and Lease, and reads a Secret or ConfigMap only
//! because one of its pods references it.

pub mod api_metrics;
pub mod config;
pub mod env;
pub mod host;
pub mod labels;
pub mod node;
pub mod pods;
pub mod quantity;
pub mod volumes;

pub use config::{NodeConfig, TaintSpec};
pub use node::NodeController;
pub use pods::PodController;
