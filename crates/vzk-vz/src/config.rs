//! Derivation of a Virtualization.framework machine description from a [`VmSpec`].
//!
//! [`derive`] turns the backend-neutral spec (plus the backend's [`VzOptions`] and the
//! host's [`Bounds`]) into a [`VzConfig`]: plain data, one field per
//! `VZVirtualMachineConfiguration` device list, that the macOS layer translates one to
//! one into framework objects. Every rule that can be checked without the framework is
//! checked here, so that `validate()` failures on a Mac are the exception:
//!
//! * CPUs and memory within the framework's bounds, memory a multiple of 1 MiB
//!   ([`crate::limits`]);
//! * boot: macOS ([`Platform::Mac`]: `VZMacOSBootLoader`, aux storage, hardware model,
//!   machine identifier from the image or [fresh](MachineIdentifier::Fresh)), Linux
//!   kernel (`VZLinuxBootLoader`) or EFI (`VZEFIBootLoader`, generic platform);
//! * disks: raw images or NBD sockets, absolute paths, a boot disk for macOS and EFI;
//! * NICs: unicast MAC, NAT or bridged to a named interface;
//! * shared directories: macOS guests get one virtio-fs device with the automount tag
//!   and one entry per share (named by its tag, unique, no `/`); Linux guests get one
//!   virtio-fs device per share, named by its tag (non-empty, at most 36 UTF-8 bytes,
//!   the framework's limit);
//! * graphics: macOS guests always get a Mac display (1920×1200 at 80 ppi, as the
//!   reference, for VNC later); Linux guests get a virtio display only if asked;
//! * the serial console goes to `console_log` when set.

use std::path::{Path, PathBuf};

use vzk_vm::{BootSpec, DiskFormat, MacAddr, NetworkAttachment, VmSpec, nbd_unix_url};

use crate::limits::{Bounds, LimitsError};

/// The longest virtio-fs tag the framework accepts, in UTF-8 bytes.
pub const MAX_SHARE_TAG_BYTES: usize = 36;

/// Why a spec cannot be run by Virtualization.framework.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// CPU or memory outside the framework's bounds.
    #[error("CPU or memory request rejected")]
    Resources(#[source] LimitsError),
    /// A disk is not a raw image.
    #[error("disk {index} is {format}; Virtualization.framework reads raw images and NBD only")]
    DiskFormat {
        /// Position in `spec.disks`.
        index: usize,
        /// Its format.
        format: DiskFormat,
    },
    /// macOS and EFI guests boot from a disk, and none is given.
    #[error("a {boot} guest needs a boot disk, and the spec has none")]
    NoBootDisk {
        /// The boot kind.
        boot: vzk_vm::BootKind,
    },
    /// A host path is relative.
    #[error("{what} path {path:?} is not absolute")]
    RelativePath {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// macOS platform data is empty.
    #[error("macOS platform field {field} is empty")]
    EmptyPlatformData {
        /// The field.
        field: &'static str,
    },
    /// A NIC MAC has the multicast bit set.
    #[error("NIC {index} MAC {mac} is multicast")]
    MulticastMac {
        /// Position in `spec.nics`.
        index: usize,
        /// The MAC.
        mac: MacAddr,
    },
    /// A bridged NIC names no interface.
    #[error("NIC {index} is bridged to an empty interface name")]
    EmptyBridgeInterface {
        /// Position in `spec.nics`.
        index: usize,
    },
    /// A shared directory's tag is unusable.
    #[error("shared directory tag {tag:?} is invalid: {reason}")]
    ShareTag {
        /// The tag.
        tag: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two shared directories have the same tag.
    #[error("shared directory tag {tag:?} is used twice")]
    DuplicateShareTag {
        /// The tag.
        tag: String,
    },
}

/// Backend-wide choices that are not part of a [`VmSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VzOptions {
    /// Give every macOS VM a new `VZMacMachineIdentifier` instead of the image's (the
    /// reference reuses the image's for every clone, which makes clones look like one
    /// machine to iCloud/MDM).
    pub fresh_machine_identifier: bool,
    /// Give Linux guests a virtio display of this size (macOS guests always get one).
    pub linux_display: Option<(u32, u32)>,
}

/// Which `VZMacMachineIdentifier` a macOS VM gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineIdentifier {
    /// The image's `dataRepresentation`.
    FromImage(Vec<u8>),
    /// A new identifier (`VZMacMachineIdentifier.new()`).
    Fresh,
}

/// Platform and boot loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platform {
    /// `VZMacPlatformConfiguration` + `VZMacOSBootLoader`.
    Mac {
        /// The cloned `aux.img`, opened as existing `VZMacAuxiliaryStorage`.
        aux_storage: PathBuf,
        /// `VZMacHardwareModel.dataRepresentation`.
        hardware_model: Vec<u8>,
        /// The machine identifier.
        machine_identifier: MachineIdentifier,
    },
    /// `VZGenericPlatformConfiguration` + `VZLinuxBootLoader`.
    LinuxKernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// `VZGenericPlatformConfiguration` + `VZEFIBootLoader`.
    Efi {
        /// The EFI variable store (opened if it exists, else created).
        variable_store: PathBuf,
    },
}

/// A virtio block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// What it reads and writes.
    pub source: DiskSource,
    /// Attach read-only.
    pub read_only: bool,
}

/// The attachment behind a [`Disk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// `VZDiskImageStorageDeviceAttachment`: a raw image file.
    Image(PathBuf),
    /// `VZNetworkBlockDeviceStorageDeviceAttachment` (macOS 14+): an NBD server, by its
    /// URI (`nbd+unix:///disk?socket=/path`).
    Nbd(String),
}

/// A virtio NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Its MAC (`VZMACAddress`).
    pub mac: MacAddr,
    /// `VZNATNetworkDeviceAttachment` or `VZBridgedNetworkDeviceAttachment`.
    pub attachment: NetworkAttachment,
}

/// The tag of a virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShareTag {
    /// `VZVirtioFileSystemDeviceConfiguration.macOSGuestAutomountTag`: the macOS guest
    /// mounts the entries under `/Volumes/My Shared Files/<name>`.
    MacAutomount,
    /// A tag a Linux guest mounts (`mount -t virtiofs <tag> <dir>`).
    Named(String),
}

/// One host directory in a share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareEntry {
    /// The entry name (the spec's tag).
    pub name: String,
    /// The host directory.
    pub host_path: PathBuf,
    /// Share read-only.
    pub read_only: bool,
}

/// A virtio-fs device: a `VZSingleDirectoryShare` when it has one entry and a
/// [`ShareTag::Named`] tag, else a `VZMultipleDirectoryShare` keyed by entry name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDevice {
    /// The device tag.
    pub tag: ShareTag,
    /// The directories.
    pub entries: Vec<ShareEntry>,
}

/// The display device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graphics {
    /// `VZMacGraphicsDeviceConfiguration` with one display.
    Mac {
        /// Pixels.
        width: u32,
        /// Pixels.
        height: u32,
        /// Pixels per inch.
        ppi: u32,
    },
    /// `VZVirtioGraphicsDeviceConfiguration` with one scanout.
    Virtio {
        /// Pixels.
        width: u32,
        /// Pixels.
        height: u32,
    },
}

/// The machine the macOS layer builds: one field per device list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VzConfig {
    /// `cpuCount`.
    pub cpus: u64,
    /// `memorySize`, bytes.
    pub memory_bytes: u64,
    /// Platform and boot loader.
    pub platform: Platform,
    /// `storageDevices`.
    pub disks: Vec<Disk>,
    /// `networkDevices`.
    pub nics: Vec<Nic>,
    /// `directorySharingDevices`.
    pub shares: Vec<ShareDevice>,
    /// `graphicsDevices`.
    pub graphics: Option<Graphics>,
    /// A virtio console serial port appending to this file.
    pub serial_log: Option<PathBuf>,
    /// USB keyboard and pointing device (macOS guests, for VNC later).
    pub input_devices: bool,
    /// A virtio entropy device (Linux guests, except in saved machines: the framework
    /// could not save one on macOS 14, as Tart found).
    pub entropy: bool,
    /// The machine is saved or restored ([`vzk_vm::SnapshotSpec`]): the build checks
    /// `validateSaveRestoreSupport`, so a template that could never be saved fails at
    /// once instead of after its boot.
    pub save_restore: bool,
}

impl VzConfig {
    /// Whether this is a macOS guest.
    pub fn is_mac(&self) -> bool {
        matches!(self.platform, Platform::Mac { .. })
    }
}

/// Derives the machine for `spec`.
pub fn derive(
    spec: &VmSpec,
    options: &VzOptions,
    bounds: &Bounds,
) -> Result<VzConfig, ConfigError> {
    let cpus = bounds
        .check_cpus(u64::from(spec.cpus) * 1000)
        .map_err(ConfigError::Resources)?;
    let memory_bytes = bounds
        .check_memory(spec.memory_bytes)
        .map_err(ConfigError::Resources)?;
    let platform = platform(spec, options)?;
    let mac = matches!(platform, Platform::Mac { .. });
    if matches!(platform, Platform::Mac { .. } | Platform::Efi { .. }) && spec.disks.is_empty() {
        return Err(ConfigError::NoBootDisk {
            boot: spec.boot.kind(),
        });
    }
    let disks = spec
        .disks
        .iter()
        .enumerate()
        .map(|(index, d)| {
            absolute("disk", &d.path)?;
            let source = match d.format {
                DiskFormat::Raw => DiskSource::Image(d.path.clone()),
                DiskFormat::Nbd => DiskSource::Nbd(nbd_unix_url(&d.path)),
                format @ DiskFormat::Qcow2 => {
                    return Err(ConfigError::DiskFormat { index, format });
                }
            };
            Ok(Disk {
                source,
                read_only: d.read_only,
            })
        })
        .collect::<Result<_, _>>()?;
    let nics = spec
        .nics
        .iter()
        .enumerate()
        .map(|(index, n)| {
            if !n.mac.is_unicast() {
                return Err(ConfigError::MulticastMac { index, mac: n.mac });
            }
            if matches!(&n.attachment, NetworkAttachment::Bridged { interface } if interface.trim().is_empty()) {
                return Err(ConfigError::EmptyBridgeInterface { index });
            }
            Ok(Nic { mac: n.mac, attachment: n.attachment.clone() })
        })
        .collect::<Result<_, _>>()?;
    let shares = shares(spec, mac)?;
    let graphics = if mac {
        Some(Graphics::Mac {
            width: 1920,
            height: 1200,
            ppi: 80,
        })
    } else {
        options
            .linux_display
            .map(|(width, height)| Graphics::Virtio { width, height })
    };
    if let Some(log) = &spec.console_log {
        absolute("console log", log)?;
    }
    Ok(VzConfig {
        cpus,
        memory_bytes,
        platform,
        disks,
        nics,
        shares,
        graphics,
        serial_log: spec.console_log.clone(),
        input_devices: mac,
        entropy: !mac && spec.snapshot.is_none(),
        save_restore: spec.snapshot.is_some(),
    })
}

fn platform(spec: &VmSpec, options: &VzOptions) -> Result<Platform, ConfigError> {
    Ok(match &spec.boot {
        BootSpec::MacOs {
            aux_storage,
            hardware_model,
            machine_id,
        } => {
            absolute("aux storage", aux_storage)?;
            if hardware_model.is_empty() {
                return Err(ConfigError::EmptyPlatformData {
                    field: "hardware model",
                });
            }
            let machine_identifier = if options.fresh_machine_identifier {
                MachineIdentifier::Fresh
            } else if machine_id.is_empty() {
                return Err(ConfigError::EmptyPlatformData {
                    field: "machine identifier",
                });
            } else {
                MachineIdentifier::FromImage(machine_id.clone())
            };
            Platform::Mac {
                aux_storage: aux_storage.clone(),
                hardware_model: hardware_model.clone(),
                machine_identifier,
            }
        }
        BootSpec::LinuxKernel {
            kernel,
            initrd,
            cmdline,
        } => {
            absolute("kernel", kernel)?;
            if let Some(i) = initrd {
                absolute("initrd", i)?;
            }
            Platform::LinuxKernel {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            }
        }
        BootSpec::Efi { variable_store } => {
            absolute("EFI variable store", variable_store)?;
            Platform::Efi {
                variable_store: variable_store.clone(),
            }
        }
    })
}

fn shares(spec: &VmSpec, mac: bool) -> Result<Vec<ShareDevice>, ConfigError> {
    let mut entries: Vec<ShareEntry> = Vec::new();
    for s in &spec.shared_dirs {
        let bad = |reason| ConfigError::ShareTag {
            tag: s.tag.clone(),
            reason,
        };
        if s.tag.is_empty() {
            return Err(bad("empty"));
        }
        if mac && (s.tag.contains('/') || s.tag == "." || s.tag == "..") {
            return Err(bad(
                "a macOS share entry name cannot contain '/' or be '.' or '..'",
            ));
        }
        if !mac && s.tag.len() > MAX_SHARE_TAG_BYTES {
            return Err(bad("longer than 36 UTF-8 bytes"));
        }
        if entries.iter().any(|e| e.name == s.tag) {
            return Err(ConfigError::DuplicateShareTag { tag: s.tag.clone() });
        }
        absolute("shared directory", &s.host_path)?;
        entries.push(ShareEntry {
            name: s.tag.clone(),
            host_path: s.host_path.clone(),
            read_only: s.read_only,
        });
    }
    Ok(if entries.is_empty() {
        Vec::new()
    } else if mac {
        vec![ShareDevice {
            tag: ShareTag::MacAutomount,
            entries,
        }]
    } else {
        entries
            .into_iter()
            .map(|e| ShareDevice {
                tag: ShareTag::Named(e.name.clone()),
                entries: vec![e],
            })
            .collect()
    })
}

fn absolute(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(ConfigError::RelativePath {
            what,
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
