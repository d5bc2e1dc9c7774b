//! The VM pod provider of vz-kubelet: container 0 of a pod runs as a VM.
//!
//! * [`VmProvider`] is built on an injected `Arc<dyn Hypervisor>` (the binary picks
//!   this host's with `vzk_backend::open`; tests may pass a fake) and implements the node
//!   runtime's `PodLifecycle`, `NodeProvider` and `StreamingRuntime` (see [`provider`]
//!   for the contract). It names no backend: the VM network namespace, QEMU's processes
//!   and files are the backend's business (`Vm::connect`, `Vm::host_usage`).
//! * [`ProviderArgs`]: its flags, flattened into `vz-kubelet run`.
//! * [`Backends`]: what it runs pods on: the hypervisor, an [`ImageSource`] (the image
//!   crate's store in the binary) and whether dockerd runs side-cars; tests pass fakes
//!   (`src/provider/tests.rs` tests the provider's rules that way, under a paused clock).
//! * [`pod`]: one pod's lifecycle task (pull → slot → clone → boot → IP → SSH ready).
//! * [`boot`]: what the VM boots (macOS loader, Linux kernel or EFI) from the image and
//!   the backend's capabilities (pure).
//! * [`status`]: the pod status, derived once from the VM's phase and history and the
//!   side-cars' and init containers' statuses (pure, table-tested).
//! * [`resources`]: vCPUs and memory from requests/limits within backend bounds (pure).
//! * `restart`: the one supervision loop (`supervise` over a `Supervised` container:
//!   the VM in [`pod`], a side-car or init container in [`sidecars`]) and its rules
//!   (restartPolicy, CrashLoopBackOff, their events).
//! * [`engine`]: the [`ContainerEngine`] trait side-car and init containers run on
//!   (the Docker crate's runtime in the binary, a fake in tests).
//! * [`images`]: the [`ImageSource`] trait (the image crate's store in the binary).
//! * [`slots`]: the VM slot pool (at most N VMs).
//! * [`health`]: `ping` and the node conditions VMBackendReady, DockerReady, DataDirReady.
//! * [`vm_limit`]: the hypervisor's limit of running VMs (two macOS VMs per Mac) and its
//!   leak: a pod event, the node condition VMLimitLeaked, VM capacity dropped.
//! * [`logs`]: the serial console as `kubectl logs`.
//! * [`metrics`]: pulls, pod start phases, boots, slots and pods by phase for `/metrics`.
//! * [`record`]: the on-disk pod record used to re-adopt VMs after a restart.
//! * [`sidecars`]: containers 1..N as Docker side-cars (pull, run, restart, streams, stats).
//! * [`init`]: init containers (and native side-cars) in Docker before the VM boots.
//! * [`volumes`]: pod volumes as VM shares (9p, mounted at `mountPath` over SSH) and
//!   side-car binds.
//! * [`probes`]: startup/readiness/liveness probes (exec, tcpSocket, httpGet) for the VM
//!   and the side-cars, and the restart back-off.
//!
//! The pod path, in reading order: `vzk_node::pods` (the watch, env resolution) →
//! [`provider`] (`create_pod`: validation, the pod record) → [`pod`] (`run_new`: pull,
//! [`boot`], [`volumes`], slot, clone, `Hypervisor::create`/`Vm::start`; then
//! `pod::supervise`: the VM under the one supervision loop of `restart`, with IP, SSH
//! readiness, hooks and [`probes`] in `pod::guest`) → [`status`] (derived once from the
//! pod's state; what the node writes).
//!
//! Tests: `cargo test -p vzk-provider` runs the unit tests anywhere and, as root with
//! `KUBEBUILDER_ASSETS` set, `tests/e2e` against a real kube-apiserver, dockerd, a
//! `docker-registry` and QEMU (TCG) VMs in a network namespace the test creates; the
//! packages are those of `.ci/packages.apt` (`scripts/install-deps.sh`).
//!
//! Env values of containers 1..N (they may be secrets) are never written to disk: after
//! an agent restart a side-car is re-created only once the pod controller hands the
//! provider the env-resolved pod again.

pub mod args;
pub mod boot;
pub mod crash;
pub mod engine;
pub mod error;
pub mod guest_mounts;
pub mod health;
pub mod identity;
pub mod images;
pub mod init;
pub mod logs;
pub mod metrics;
pub mod pod;
pub mod probes;
pub mod provider;
pub mod record;
pub mod resources;
mod restart;
pub mod sidecars;
pub mod slots;
pub mod status;
pub mod templates;
pub mod vm_limit;
pub mod volumes;

pub use args::ProviderArgs;
pub use engine::ContainerEngine;
pub use error::ProviderInitError;
pub use images::{ImageSource, StoreSource};
pub use provider::{Backends, VM_RESOURCE, VmProvider};
pub use sidecars::Containers;
