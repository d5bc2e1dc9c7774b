//! Provider-agnostic core of vz-kubelet.
//!
//! This crate holds the interface between the generic node runtime (node and pod
//! controllers, kubelet HTTP API) and whatever actually runs pods (the VM provider in
//! production, in-test doubles in tests). It knows nothing of VMs.
//!
//! * [`provider`]: the [`Provider`] trait family a runtime backend implements.
//! * [`streams`]: the I/O handed to exec/attach/port-forward/logs.
//! * [`stats`]: the kubelet `stats/v1alpha1` Summary types served on `/stats/summary`.
//! * [`error`]: the typed [`ProviderError`] and [`ErrorChain`].
//! * [`quantity`]: Kubernetes resource quantities as numbers.
//! * [`expand`]: `$(VAR)` expansion.

pub mod error;
pub mod expand;
pub mod provider;
pub mod quantity;
pub mod stats;
pub mod streams;

pub use error::{ErrorChain, ProviderError, error_chain};
pub use provider::{
    NodeProvider, PodEvent, PodKey, PodLifecycle, PodNotifier, PodUpdate, Provider, RuntimeInfo,
    StreamingRuntime,
};
