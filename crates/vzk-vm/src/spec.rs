//! The description of a VM every backend accepts: [`VmSpec`] and its parts.
//!
//! A spec is plain data (serde, so backends can persist it in a VM's state directory and
//! re-adopt the VM later). It says *what* to run, never *how*: each backend maps it to
//! its own machine (QEMU command line, Virtualization.framework configuration) and
//! rejects what it cannot do with a typed error (see
//! [`Capabilities::check`](crate::hypervisor::Capabilities::check)).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// Everything needed to create one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// A unique, file-name-safe identifier (`[A-Za-z0-9._-]`, 1..=64 chars). Backends
    /// use it to name state directories and devices, and to find the VM after a restart.
    pub id: String,
    /// Number of virtual CPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// How the guest boots.
    pub boot: BootSpec,
    /// Block devices, in guest order (the first is the boot/root disk).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in guest order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Host directories shared with the guest.
    #[serde(default)]
    pub shared_dirs: Vec<SharedDirSpec>,
    /// Where the guest's serial console output is appended (what `kubectl logs` serves
    /// for the VM container). `None`: the console is discarded.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Whether the VM takes part in machine-state snapshots (`None`: an ordinary boot).
    #[serde(default)]
    pub snapshot: Option<SnapshotSpec>,
}

/// A VM's part in machine-state snapshots (start by restore).
///
/// A template and the VMs restored from it share one machine layout: what differs per VM
/// (its NICs and shared directories) sits on hot-plug ports, so the template unplugs it
/// before its state is saved and a restored VM plugs in its own (a new MAC address, so a
/// new DHCP lease) after the state is loaded. The guest must bring up a NIC that appears
/// while it runs (the test guest does; so do ifupdown's `allow-hotplug`, networkd and
/// NetworkManager).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "camelCase")]
pub enum SnapshotSpec {
    /// Booted to become a template: [`Vm::save_state`](crate::Vm::save_state) may be called
    /// once the guest is ready, and writes the machine to `state`.
    #[serde(rename_all = "camelCase")]
    Template {
        /// Where the saved machine state goes.
        state: PathBuf,
    },
    /// Restored from a template's saved state instead of booted. The spec's disks must be
    /// (copy-on-write clones of) the template's disks at the moment of the save, in the
    /// same order, and its boot, CPUs and memory the template's.
    #[serde(rename_all = "camelCase")]
    Restore {
        /// The saved machine state ([`Vm::save_state`](crate::Vm::save_state)'s file).
        state: PathBuf,
    },
}

/// How many hot-plug ports a snapshot layout has: a VM restored from a template can be
/// given this many NICs and shared directories together.
pub const SNAPSHOT_HOTPLUG_PORTS: usize = 6;

/// How a guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum BootSpec {
    /// Direct Linux kernel boot.
    #[serde(rename_all = "camelCase")]
    LinuxKernel {
        /// The kernel image (`vmlinuz` / `Image`).
        kernel: PathBuf,
        /// An optional initial ramdisk.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A macOS guest (Virtualization.framework only).
    #[serde(rename_all = "camelCase")]
    MacOs {
        /// The (cloned) auxiliary storage file, opened as an existing file.
        aux_storage: PathBuf,
        /// `VZMacHardwareModel.dataRepresentation`.
        hardware_model: Vec<u8>,
        /// `VZMacMachineIdentifier.dataRepresentation`.
        machine_id: Vec<u8>,
    },
    /// UEFI firmware boot from the first disk.
    #[serde(rename_all = "camelCase")]
    Efi {
        /// The EFI variable store; created if missing.
        variable_store: PathBuf,
    },
}

impl BootSpec {
    /// The kind of boot, for capability checks and messages.
    pub fn kind(&self) -> BootKind {
        match self {
            Self::LinuxKernel { .. } => BootKind::LinuxKernel,
            Self::MacOs { .. } => BootKind::MacOs,
            Self::Efi { .. } => BootKind::Efi,
        }
    }
}

/// The kinds of [`BootSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BootKind {
    /// [`BootSpec::LinuxKernel`].
    LinuxKernel,
    /// [`BootSpec::MacOs`].
    MacOs,
    /// [`BootSpec::Efi`].
    Efi,
}

impl std::fmt::Display for BootKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::LinuxKernel => "linux-kernel",
            Self::MacOs => "macos",
            Self::Efi => "efi",
        })
    }
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// The image file (for a pod: the image cache's copy-on-write clone or overlay).
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// On-disk format of `path`.
    #[serde(default)]
    pub format: DiskFormat,
}

/// On-disk format of a [`DiskSpec`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DiskFormat {
    /// A raw image (the only format Virtualization.framework reads).
    #[default]
    Raw,
    /// A qcow2 image (QEMU only), e.g. an overlay over a cached base image.
    Qcow2,
    /// No file: `path` is the Unix socket of an NBD server whose export [`NBD_EXPORT`]
    /// is the raw disk (a pod's writable layer over an image served on demand).
    Nbd,
}

/// The export name a [`DiskFormat::Nbd`] disk's server serves.
pub const NBD_EXPORT: &str = "disk";

/// The NBD URI of the export [`NBD_EXPORT`] on the Unix socket `socket`
/// (`nbd+unix:///disk?socket=/path`).
pub fn nbd_unix_url(socket: &std::path::Path) -> String {
    format!("nbd+unix:///{NBD_EXPORT}?socket={}", socket.display())
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Nbd => "nbd",
        })
    }
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicSpec {
    /// The guest-visible MAC address (see [`MacAddr::random`]).
    pub mac: MacAddr,
    /// What the NIC is plugged into.
    #[serde(default)]
    pub attachment: NetworkAttachment,
}

/// What a NIC is plugged into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "camelCase")]
pub enum NetworkAttachment {
    /// A private network owned by the agent, with DHCP and outbound masquerading
    /// (QEMU: the agent's bridge + dnsmasq; macOS: the framework's shared NAT).
    #[default]
    Nat,
    /// Joined to an existing host network; the guest gets its lease from that network.
    Bridged {
        /// The host interface (Linux: a bridge such as `br0`; macOS: `en0`, `vlan0`).
        interface: String,
    },
}

impl std::fmt::Display for NetworkAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nat => f.write_str("nat"),
            Self::Bridged { interface } => write!(f, "bridged({interface})"),
        }
    }
}

/// A host directory shared with the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedDirSpec {
    /// The mount tag the guest uses (Linux: `mount -t 9p <tag>` / `-t virtiofs <tag>`;
    /// macOS guests: the entry name under the automount share).
    pub tag: String,
    /// The host directory.
    pub host_path: PathBuf,
    /// Share read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl VmSpec {
    /// Whether `id` is usable as a VM identifier (see [`VmSpec::id`]).
    pub fn is_valid_id(id: &str) -> bool {
        (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !id.starts_with('.')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_json() {
        let spec = VmSpec {
            id: "ns-pod-0".into(),
            cpus: 2,
            memory_bytes: 512 << 20,
            boot: BootSpec::LinuxKernel {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
            },
            disks: vec![DiskSpec {
                path: "/d.qcow2".into(),
                read_only: false,
                format: DiskFormat::Qcow2,
            }],
            nics: vec![NicSpec {
                mac: MacAddr::random(),
                attachment: NetworkAttachment::Bridged {
                    interface: "br0".into(),
                },
            }],
            shared_dirs: vec![SharedDirSpec {
                tag: "data".into(),
                host_path: "/srv".into(),
                read_only: true,
            }],
            console_log: Some("/log".into()),
            snapshot: Some(SnapshotSpec::Restore {
                state: "/t/state".into(),
            }),
        };
        let json = serde_json::to_string(&spec).unwrap_or_default();
        assert!(json.contains("\"mode\":\"bridged\""), "{json}");
        let back: VmSpec = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, spec);
    }

    #[test]
    fn ids_are_file_name_safe() {
        assert!(VmSpec::is_valid_id("default-web-0_a.b"));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(!VmSpec::is_valid_id(bad), "{bad:?}");
        }
    }
}
