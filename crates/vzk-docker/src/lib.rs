//! Docker side-cars of vz-kubelet pods (containers 1..N; container 0 is the VM), over
//! [bollard]. This crate knows nothing of VMs: it turns a Kubernetes container into a
//! Docker container and back into a container state, and serves its streams.
//!
//! # Contract
//! * [`SidecarRuntime::connect`] talks to the local dockerd (`DOCKER_HOST` or
//!   `/var/run/docker.sock`), negotiates the API version down to the daemon's, and fails
//!   with [`DockerError::Unreachable`] when there is none — the caller then runs VM-only
//!   pods and reports side-cars as waiting.
//! * Every container it creates carries the labels of [`spec`] (`vz-kubelet.io/pod-uid`,
//!   `namespace`, `pod`, `container`, `node`, `attempt`) and is named
//!   `vzk_<ns>_<pod>_<container>_<uid8>_<attempt>`. [`SidecarRuntime::list_ours`] and
//!   [`SidecarRuntime::cleanup`] only ever look at containers labelled with this
//!   runtime's node name: a container without our labels is never touched (the Go
//!   reference force-removes by name prefix).
//! * Docker's restart policy is `no`; restarts are the caller's (per pod `restartPolicy`),
//!   each restart a new container (`attempt` + 1), so the previous one keeps its logs.
//! * Networking: side-cars run on Docker's default bridge, in a network namespace of
//!   their own — they do not share the VM's. Port-forward enters the side-car's network
//!   namespace and connects to `127.0.0.1:<port>` there, as the kubelet does for a pod
//!   (so ports bound to the container's loopback are reachable too).
//! * Exec keeps the process's exit code (the reference loses it): the exec is inspected
//!   after its output ends.

mod attach;
pub mod error;
mod exec;
mod inspect;
mod list;
pub mod logs;
mod netns;
mod pull;
mod run;
mod runtime;
pub mod spec;
mod stats;

pub use error::{DockerError, error_chain};
pub use inspect::{RunState, SidecarState};
pub use list::OwnedContainer;
pub use pull::{PullOutcome, RegistryAuth};
pub use runtime::SidecarRuntime;
pub use spec::{Bind, ImageRef, PullPolicy, SidecarSpec, container_name};
