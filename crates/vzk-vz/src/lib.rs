//! Virtualization.framework backend of vz-kubelet (macOS hosts).
//!
//! The logic lives in platform-independent modules, unit-tested on Linux:
//!
//! * [`config`]: a [`vzk_vm::VmSpec`] → [`config::VzConfig`], the machine the framework
//!   will be asked to build, with every check that needs no framework.
//! * [`limits`]: CPU and memory against the framework's bounds; [`quantity`] turns the
//!   pod's Kubernetes quantities into the millicores and bytes it checks.
//! * [`image_config`]: the macOS image's `config.json` (hardware model, machine id).
//! * [`state`]: framework states and delegate callbacks → [`vzk_vm::VmState`].
//! * [`discovery`]: `/var/db/dhcpd_leases` and `arp -an` parsers for IP discovery.
//! * [`capabilities`]: what the backend reports to the VM runtime.
//!
//! The thin `unsafe` layer over `objc2-virtualization` is in `macos` (compiled on macOS,
//! and on any host with the `typecheck` feature, which only type-checks it; see
//! `scripts/check-macos.sh`). It is the only code of the workspace allowed `unsafe`.

pub mod capabilities;
pub mod config;
pub mod discovery;
pub mod image_config;
pub mod limits;
pub use vzk_core::quantity;
pub mod state;

#[cfg(any(target_os = "macos", feature = "typecheck"))]
pub mod macos;
