//! What the Virtualization.framework backend tells the VM runtime it can do.
//!
//! Contract: [`capabilities`] is a pure function of the framework's [`Bounds`] and of
//! whether the host is Apple Silicon (macOS guests need it). The running-VM cap is the
//! macOS license limit of two concurrent macOS VMs per host, which the reference also
//! applies to every VM. VMs do not outlive the agent: they run inside its process.
//! Saved machine states (macOS 14+) keep their NICs: a restored VM must have the
//! template's MAC ([`SnapshotDevices::Kept`]), and a state is only restored by the macOS
//! build that wrote it (the capabilities' version).

use vzk_vm::{BackendKind, BootKind, Capabilities, DiskFormat, SnapshotDevices};

use crate::limits::Bounds;

/// Concurrent macOS VMs a host may run (macOS license, enforced by the framework).
pub const MAX_MACOS_VMS: u32 = 2;

/// What the host's framework has, beside its [`Bounds`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFeatures {
    /// The host is Apple Silicon (macOS guests need it).
    pub apple_silicon: bool,
    /// `VZNetworkBlockDeviceStorageDeviceAttachment` (macOS 14+): a pod's disk may be
    /// served over NBD ([`DiskFormat::Nbd`]).
    pub nbd_disks: bool,
    /// `saveMachineStateToURL:` / `restoreMachineStateFromURL:` (macOS 14+).
    pub save_restore: bool,
    /// The host's macOS build (`23F79`): a saved state is restored only by the build
    /// that wrote it.
    pub os_build: String,
}

/// The backend's capabilities on a host with `bounds` and `host`'s features.
pub fn capabilities(bounds: &Bounds, host: &HostFeatures) -> Capabilities {
    let HostFeatures {
        apple_silicon,
        nbd_disks,
        save_restore,
        ..
    } = *host;
    let clamp_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let mut boot_kinds = vec![BootKind::LinuxKernel, BootKind::Efi];
    if apple_silicon {
        boot_kinds.insert(0, BootKind::MacOs);
    }
    Capabilities {
        backend: BackendKind::Vz,
        accelerator: "vz".into(),
        hardware_accelerated: true,
        cpus: (clamp_u32(bounds.min_cpus), clamp_u32(bounds.max_cpus)),
        memory_bytes: (bounds.min_memory, bounds.max_memory),
        boot_kinds,
        disk_formats: if nbd_disks {
            vec![DiskFormat::Raw, DiskFormat::Nbd]
        } else {
            vec![DiskFormat::Raw]
        },
        nat: true,
        bridged: true,
        shared_dirs: true,
        max_running_vms: Some(MAX_MACOS_VMS),
        vms_outlive_agent: false,
        snapshots: save_restore,
        snapshot_devices: SnapshotDevices::Kept,
        version: format!("macOS {}", host.os_build),
    }
}

#[cfg(test)]
mod tests {
    use vzk_vm::{
        BootSpec, DiskSpec, HypervisorError, MacAddr, NetworkAttachment, NicSpec, SharedDirSpec,
        SnapshotSpec, VmSpec,
    };

    use super::*;
    use crate::limits::MIB;

    const BOUNDS: Bounds = Bounds {
        min_cpus: 1,
        max_cpus: 10,
        min_memory: 128 * MIB,
        max_memory: 32 << 30,
    };

    fn host(apple_silicon: bool, nbd_disks: bool) -> HostFeatures {
        HostFeatures {
            apple_silicon,
            nbd_disks,
            save_restore: nbd_disks,
            os_build: "23F79".into(),
        }
    }

    fn spec(boot: BootSpec, format: DiskFormat) -> VmSpec {
        VmSpec {
            id: "vm-1".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            boot,
            disks: vec![DiskSpec {
                path: "/d.img".into(),
                read_only: false,
                format,
            }],
            nics: vec![],
            shared_dirs: vec![],
            console_log: None,
            snapshot: None,
        }
    }

    #[test]
    fn apple_silicon_runs_macos_intel_does_not() {
        let mac_boot = BootSpec::MacOs {
            aux_storage: "/aux.img".into(),
            hardware_model: vec![1],
            machine_id: vec![1],
        };
        let arm = capabilities(&BOUNDS, &host(true, true));
        assert!(arm.check(&spec(mac_boot.clone(), DiskFormat::Raw)).is_ok());
        let intel = capabilities(&BOUNDS, &host(false, true));
        assert!(matches!(
            intel.check(&spec(mac_boot, DiskFormat::Raw)),
            Err(HypervisorError::Unsupported {
                backend: BackendKind::Vz,
                ..
            })
        ));
        assert_eq!(arm.cpus, (1, 10));
        assert_eq!(arm.max_running_vms, Some(2));
        assert!(!arm.vms_outlive_agent);
    }

    #[test]
    fn qcow2_is_unsupported_and_nbd_only_where_the_framework_has_it() {
        let caps = capabilities(&BOUNDS, &host(true, true));
        let efi = BootSpec::Efi {
            variable_store: "/vars".into(),
        };
        assert!(matches!(
            caps.check(&spec(efi.clone(), DiskFormat::Qcow2)),
            Err(HypervisorError::Unsupported {
                backend: BackendKind::Vz,
                ..
            })
        ));
        assert!(caps.check(&spec(efi.clone(), DiskFormat::Nbd)).is_ok());
        let macos13 = capabilities(&BOUNDS, &host(true, false));
        assert!(matches!(
            macos13.check(&spec(efi, DiskFormat::Nbd)),
            Err(HypervisorError::Unsupported {
                backend: BackendKind::Vz,
                ..
            })
        ));
    }

    #[test]
    fn saved_states_keep_their_nics_and_name_the_macos_build() {
        let caps = capabilities(&BOUNDS, &host(true, true));
        assert!(caps.snapshots);
        assert_eq!(caps.snapshot_devices, SnapshotDevices::Kept);
        assert_eq!(caps.version, "macOS 23F79");
        assert!(!capabilities(&BOUNDS, &host(true, false)).snapshots);
        let mut s = spec(
            BootSpec::Efi {
                variable_store: "/vars".into(),
            },
            DiskFormat::Raw,
        );
        s.nics.push(NicSpec {
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            attachment: NetworkAttachment::Nat,
        });
        s.snapshot = Some(SnapshotSpec::Template {
            state: "/t/state".into(),
        });
        assert!(caps.check(&s).is_ok());
        s.shared_dirs.push(SharedDirSpec {
            tag: "t".into(),
            host_path: "/".into(),
            read_only: true,
        });
        assert!(matches!(
            caps.check(&s),
            Err(HypervisorError::Unsupported {
                backend: BackendKind::Vz,
                ..
            })
        ));
    }
}
