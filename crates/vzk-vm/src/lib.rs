//! The VM runtime of vz-kubelet.
//!
//! * [`hypervisor`]: the backend-neutral [`Hypervisor`] / [`Vm`] traits, [`VmState`],
//!   [`Capabilities`] and the stop/wait helpers. `vzk-vz` (macOS) implements them too.
//! * [`spec`]: [`VmSpec`], the data every backend accepts.
//! * [`mac`]: random locally-administered [`MacAddr`]esses.
//! * [`nat_settings`]: the NAT network's operator settings (subnet, bridge, guest DNS),
//!   validated on every platform.
//! * [`hosted`]: one VM host process per VM ([`hosted::Hosted`] in the agent,
//!   [`hosted::serve`] in the host), so VMs of in-process backends survive agent
//!   restarts and a backend crash takes down one VM only.
//! * `qemu` (Linux only): the QEMU backend (KVM when it really works, else TCG).
//! * `net` (Linux only): TAPs, the NAT network (bridge + dnsmasq + masquerade), IP discovery.
//! * `netns` (Linux only): a backend and its VMs run inside a network namespace of their
//!   own ([`Vm::connect`] opens guest connections there), so no caller enters it.
//!
//! On other targets (macOS, where `vzk-vz` implements the traits) only the
//! backend-neutral modules are compiled; `scripts/check-macos.sh` type-checks that build
//! for `aarch64-apple-darwin`.
//!
//! # Tests and benchmark
//! `cargo test -p vzk-vm` runs unit tests anywhere and, as root, `tests/qemu.rs` against
//! real QEMU (TCG unless KVM really works), dnsmasq and dropbear, each test inside a
//! network namespace it creates and tears down; `tests/nat_pair.rs` runs two agents' NAT
//! networks (own bridges, subnets and state dirs) side by side in one namespace, a VM on
//! each, and removes one while the other keeps working; `tests/nat_release.rs` removes NAT
//! VMs (one force-stopped, one dead after an agent restart) and checks dnsmasq dropped their
//! leases (DHCPRELEASE). The test guest (Debian kernel, busybox,
//! dropbear) is built and cached by `scripts/build-test-guest.sh`. Needs the Debian
//! packages `qemu-system-x86 qemu-utils dnsmasq-base dropbear-bin busybox-static cpio
//! iproute2 nftables` and network access to Debian's mirror on the first guest build.
//! `cargo run -p vzk-vm --example boot_bench` prints the start → SSH-ready table and the
//! agent-side split of a VM start (backend set-up, TAP, spawn, QMP, IP-discovery lag).

pub mod cloud_init;
pub mod hosted;
pub mod hypervisor;
pub mod mac;
pub mod nat_settings;
#[cfg(target_os = "linux")]
pub mod net;
#[cfg(target_os = "linux")]
pub mod netns;
#[cfg(target_os = "linux")]
pub mod procinfo;
#[cfg(target_os = "linux")]
pub mod qemu;
pub mod spec;

pub use hypervisor::{
    BackendKind, Capabilities, HostUsage, Hypervisor, HypervisorError, ProbeReport,
    SnapshotDevices, StopOutcome, Vm, VmError, VmState, stop_gracefully, wait_for_ip,
    wait_for_state,
};
pub use mac::MacAddr;
pub use spec::{
    BootKind, BootSpec, DiskFormat, DiskSpec, NBD_EXPORT, NetworkAttachment, NicSpec,
    SNAPSHOT_HOTPLUG_PORTS, SharedDirSpec, SnapshotSpec, VmSpec, nbd_unix_url,
};
