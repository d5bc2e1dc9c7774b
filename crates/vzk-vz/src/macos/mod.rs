//! The thin `unsafe` layer over Virtualization.framework (`objc2-virtualization`).
//!
//! * [`hypervisor`]: [`VzHypervisor`], the [`vzk_vm::Hypervisor`] of macOS hosts.
//! * [`vm`]: [`VzVm`], the `Send` handle of one VM ([`vzk_vm::Vm`]).
//! * [`actor`]: the per-VM serial dispatch queue that owns the framework objects and
//!   executes commands.
//! * [`build`]: [`VzConfig`](crate::config::VzConfig) → `VZVirtualMachineConfiguration`.
//! * [`delegate`]: the `VZVirtualMachineDelegate` that reports guest stops and errors.
//! * [`bpf`]: sniffing a host interface through `/dev/bpf*` (bridged guests' IP).
//! * [`install`]: installing macOS from a restore image (`image create macos`).
//! * [`ns`]: Foundation helpers (`NSURL` from paths, `NSError` → [`ns::FrameworkError`]).
//!
//! # Threading contract
//! Every VM has its own private **serial** dispatch queue. The `VZVirtualMachine`, its
//! configuration objects and its delegate are created on that queue and only ever
//! touched from closures submitted to it; completion handlers and delegate callbacks
//! run there too. Async callers talk to the VM by submitting a closure and awaiting a
//! `tokio::sync::oneshot` reply. No main run loop is needed.
//!
//! Compiled on macOS, and elsewhere with the `typecheck` feature (type-check only; see
//! `scripts/check-macos.sh`). All logic that does not need the framework lives in the
//! platform-independent modules of this crate.

pub mod actor;
pub mod bpf;
pub mod build;
pub mod delegate;
pub mod hypervisor;
pub mod install;
pub mod ns;
pub mod vm;

pub use hypervisor::VzHypervisor;
pub use vm::VzVm;
