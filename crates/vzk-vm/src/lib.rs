//! The VM runtime of vz-kubelet.
//!
//! * [`hypervisor`]: the backend-neutral [`Hypervisor`] / [`Vm`] traits, [`VmState`],
//!   [`Capabilities`] and the stop/wait helpers. `vzk-vz` (macOS) implements them too.
//! * [`spec`]: [`VmSpec`], the data every backend accepts.
//! * [`mac`]: random locally-administered [`MacAddr`]esses.
//! * [`qemu`]: the QEMU backend for Linux hosts (KVM when it really works, else TCG).
//! * [`net`]: TAPs, the NAT network (bridge + dnsmasq + masquerade), IP discovery.

pub mod hypervisor;
pub mod mac;
pub mod net;
pub mod qemu;
pub mod spec;

pub use hypervisor::{
    BackendKind, Capabilities, Hypervisor, HypervisorError, ProbeReport, StopOutcome, Vm, VmError,
    VmState, stop_gracefully, wait_for_ip, wait_for_state,
};
pub use mac::MacAddr;
pub use spec::{
    BootKind, BootSpec, DiskFormat, DiskSpec, NetworkAttachment, NicSpec, SharedDirSpec, VmSpec,
};
