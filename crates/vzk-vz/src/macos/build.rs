//! Builds a `VZVirtualMachineConfiguration` from a [`VzConfig`], one to one.
//!
//! Contract: every object is created from the plain data already checked by
//! [`crate::config::derive`]; what only the framework can judge (a hardware model this
//! host cannot run, a missing disk image, an unknown bridge interface, a configuration
//! that fails `validate()`) comes back as a typed [`BuildError`]. Call on the VM's
//! queue (the objects are not `Send`).

use std::path::{Path, PathBuf};

use objc2::AnyThread;
use objc2::rc::Retained;
use objc2_foundation::{NSArray, NSData, NSDictionary, NSString, NSURL};
use objc2_virtualization::{
    VZBridgedNetworkDeviceAttachment, VZBridgedNetworkInterface,
    VZDirectorySharingDeviceConfiguration, VZDiskImageStorageDeviceAttachment, VZEFIBootLoader,
    VZEFIVariableStore, VZEFIVariableStoreInitializationOptions, VZEntropyDeviceConfiguration,
    VZFileSerialPortAttachment, VZGenericPlatformConfiguration, VZGraphicsDeviceConfiguration,
    VZKeyboardConfiguration, VZLinuxBootLoader, VZMACAddress, VZMacAuxiliaryStorage,
    VZMacGraphicsDeviceConfiguration, VZMacGraphicsDisplayConfiguration, VZMacHardwareModel,
    VZMacMachineIdentifier, VZMacOSBootLoader, VZMacPlatformConfiguration,
    VZMultipleDirectoryShare, VZNATNetworkDeviceAttachment,
    VZNetworkBlockDeviceStorageDeviceAttachment, VZNetworkDeviceConfiguration,
    VZPointingDeviceConfiguration, VZSerialPortConfiguration, VZSharedDirectory,
    VZSingleDirectoryShare, VZStorageDeviceAttachment, VZStorageDeviceConfiguration,
    VZUSBKeyboardConfiguration, VZUSBScreenCoordinatePointingDeviceConfiguration,
    VZVirtioBlockDeviceConfiguration, VZVirtioConsoleDeviceSerialPortConfiguration,
    VZVirtioEntropyDeviceConfiguration, VZVirtioFileSystemDeviceConfiguration,
    VZVirtioGraphicsDeviceConfiguration, VZVirtioGraphicsScanoutConfiguration,
    VZVirtioNetworkDeviceConfiguration, VZVirtualMachineConfiguration,
};
use vzk_vm::NetworkAttachment;

use super::ns::{FrameworkError, UrlError, dir_url, file_url};
use crate::config::{
    DiskSource, Graphics, MachineIdentifier, Platform, ShareDevice, ShareTag, VzConfig,
};
use crate::limits::Bounds;

/// Why the framework objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A path cannot become a file URL.
    #[error("building a file URL failed")]
    Url(#[source] UrlError),
    /// The hardware model data is not a `VZMacHardwareModel`.
    #[error("the image's hardware model data is not a valid VZMacHardwareModel")]
    HardwareModel,
    /// The hardware model needs a newer host.
    #[error("this host cannot run the image's hardware model")]
    HardwareModelUnsupported,
    /// The machine identifier data is not a `VZMacMachineIdentifier`.
    #[error("the image's machine identifier data is not a valid VZMacMachineIdentifier")]
    MachineIdentifier,
    /// Opening or creating the EFI variable store failed.
    #[error("opening the EFI variable store {path:?} failed")]
    EfiVariableStore {
        /// The store.
        path: PathBuf,
        /// The framework's error.
        #[source]
        source: FrameworkError,
    },
    /// Attaching a disk image failed.
    #[error("attaching disk image {path:?} failed")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The framework's error.
        #[source]
        source: FrameworkError,
    },
    /// An NBD disk's URI is not a valid `NSURL`.
    #[error("NBD disk URI {uri:?} is not a valid URL")]
    NbdUrl {
        /// The URI.
        uri: String,
    },
    /// Attaching an NBD disk failed.
    #[error("attaching the NBD disk {uri} failed")]
    NbdDisk {
        /// Its URI.
        uri: String,
        /// The framework's error.
        #[source]
        source: FrameworkError,
    },
    /// The MAC is not accepted by `VZMACAddress`.
    #[error("MAC address {mac} was rejected by the framework")]
    MacAddress {
        /// The MAC, canonical form.
        mac: String,
    },
    /// No host interface has the bridged attachment's identifier.
    #[error("network interface {name} not found (bridgeable: {available:?})")]
    BridgeInterfaceNotFound {
        /// The identifier asked for.
        name: String,
        /// The identifiers the framework offers.
        available: Vec<String>,
    },
    /// Opening the serial console log failed.
    #[error("opening the console log {path:?} failed")]
    SerialLog {
        /// The log file.
        path: PathBuf,
        /// The framework's error.
        #[source]
        source: FrameworkError,
    },
    /// `validate()` rejected the configuration.
    #[error("the VM configuration is invalid")]
    Validate(#[source] FrameworkError),
    /// `validateSaveRestoreSupport()` rejected a machine that is to be saved or restored.
    #[error("the VM configuration cannot be saved or restored")]
    SaveRestore(#[source] FrameworkError),
}

/// The framework's CPU and memory bounds on this host.
pub fn host_bounds() -> Bounds {
    // SAFETY: class properties without arguments, callable from any thread.
    unsafe {
        Bounds {
            min_cpus: VZVirtualMachineConfiguration::minimumAllowedCPUCount() as u64,
            max_cpus: VZVirtualMachineConfiguration::maximumAllowedCPUCount() as u64,
            min_memory: VZVirtualMachineConfiguration::minimumAllowedMemorySize(),
            max_memory: VZVirtualMachineConfiguration::maximumAllowedMemorySize(),
        }
    }
}

/// Builds and validates the configuration.
pub fn configuration(
    config: &VzConfig,
) -> Result<Retained<VZVirtualMachineConfiguration>, BuildError> {
    // SAFETY: every call below is a plain Objective-C setter or initialiser on objects
    // created in this function, with arguments of the declared types; the objects are
    // used on the current thread only (the VM's queue).
    unsafe {
        let cfg = VZVirtualMachineConfiguration::new();
        cfg.setCPUCount(config.cpus as usize);
        cfg.setMemorySize(config.memory_bytes);
        platform(&cfg, &config.platform)?;

        let disks = config
            .disks
            .iter()
            .map(|d| {
                let attachment: Retained<VZStorageDeviceAttachment> = match &d.source {
                    DiskSource::Image(path) => {
                        let url = file_url(path).map_err(BuildError::Url)?;
                        Retained::into_super(
                            VZDiskImageStorageDeviceAttachment::initWithURL_readOnly_error(
                                VZDiskImageStorageDeviceAttachment::alloc(),
                                &url,
                                d.read_only,
                            )
                            .map_err(|e| BuildError::Disk {
                                path: path.clone(),
                                source: FrameworkError::from_ns(&e),
                            })?,
                        )
                    }
                    DiskSource::Nbd(uri) => {
                        let url = NSURL::URLWithString(&NSString::from_str(uri))
                            .ok_or_else(|| BuildError::NbdUrl { uri: uri.clone() })?;
                        Retained::into_super(
                            VZNetworkBlockDeviceStorageDeviceAttachment::initWithURL_error(
                                VZNetworkBlockDeviceStorageDeviceAttachment::alloc(),
                                &url,
                            )
                            .map_err(|e| BuildError::NbdDisk {
                                uri: uri.clone(),
                                source: FrameworkError::from_ns(&e),
                            })?,
                        )
                    }
                };
                let dev = VZVirtioBlockDeviceConfiguration::initWithAttachment(
                    VZVirtioBlockDeviceConfiguration::alloc(),
                    &attachment,
                );
                Ok(Retained::into_super(dev))
            })
            .collect::<Result<Vec<Retained<VZStorageDeviceConfiguration>>, BuildError>>()?;
        cfg.setStorageDevices(&NSArray::from_retained_slice(&disks));

        let nics = config
            .nics
            .iter()
            .map(|n| {
                let dev = VZVirtioNetworkDeviceConfiguration::new();
                let mac = VZMACAddress::initWithString(
                    VZMACAddress::alloc(),
                    &NSString::from_str(&n.mac.to_string()),
                )
                .ok_or_else(|| BuildError::MacAddress {
                    mac: n.mac.to_string(),
                })?;
                dev.setMACAddress(&mac);
                match &n.attachment {
                    NetworkAttachment::Nat => {
                        dev.setAttachment(Some(&VZNATNetworkDeviceAttachment::new()))
                    }
                    NetworkAttachment::Bridged { interface } => {
                        let iface = bridge_interface(interface)?;
                        let att = VZBridgedNetworkDeviceAttachment::initWithInterface(
                            VZBridgedNetworkDeviceAttachment::alloc(),
                            &iface,
                        );
                        dev.setAttachment(Some(&att));
                    }
                }
                Ok(Retained::into_super(dev))
            })
            .collect::<Result<Vec<Retained<VZNetworkDeviceConfiguration>>, BuildError>>()?;
        cfg.setNetworkDevices(&NSArray::from_retained_slice(&nics));

        let shares = config
            .shares
            .iter()
            .map(share_device)
            .collect::<Result<Vec<Retained<VZDirectorySharingDeviceConfiguration>>, _>>()?;
        cfg.setDirectorySharingDevices(&NSArray::from_retained_slice(&shares));

        if let Some(g) = config.graphics {
            cfg.setGraphicsDevices(&NSArray::from_retained_slice(&[graphics(g)]));
        }
        if let Some(log) = &config.serial_log {
            cfg.setSerialPorts(&NSArray::from_retained_slice(&[serial(log)?]));
        }
        if config.input_devices {
            let kbd: Retained<VZKeyboardConfiguration> =
                Retained::into_super(VZUSBKeyboardConfiguration::new());
            cfg.setKeyboards(&NSArray::from_retained_slice(&[kbd]));
            let ptr: Retained<VZPointingDeviceConfiguration> =
                Retained::into_super(VZUSBScreenCoordinatePointingDeviceConfiguration::new());
            cfg.setPointingDevices(&NSArray::from_retained_slice(&[ptr]));
        }
        if config.entropy {
            let rng: Retained<VZEntropyDeviceConfiguration> =
                Retained::into_super(VZVirtioEntropyDeviceConfiguration::new());
            cfg.setEntropyDevices(&NSArray::from_retained_slice(&[rng]));
        }

        cfg.validateWithError()
            .map_err(|e| BuildError::Validate(FrameworkError::from_ns(&e)))?;
        if config.save_restore {
            cfg.validateSaveRestoreSupportWithError()
                .map_err(|e| BuildError::SaveRestore(FrameworkError::from_ns(&e)))?;
        }
        Ok(cfg)
    }
}

/// Sets platform and boot loader.
///
/// # Safety
/// Call on the thread that owns `cfg`.
unsafe fn platform(
    cfg: &VZVirtualMachineConfiguration,
    platform: &Platform,
) -> Result<(), BuildError> {
    // SAFETY: initialisers and setters with arguments of the declared types (see
    // `configuration`).
    unsafe {
        match platform {
            Platform::Mac {
                aux_storage,
                hardware_model,
                machine_identifier,
            } => {
                let p = VZMacPlatformConfiguration::new();
                let model = VZMacHardwareModel::initWithDataRepresentation(
                    VZMacHardwareModel::alloc(),
                    &NSData::with_bytes(hardware_model),
                )
                .ok_or(BuildError::HardwareModel)?;
                if !model.isSupported() {
                    return Err(BuildError::HardwareModelUnsupported);
                }
                let id = match machine_identifier {
                    MachineIdentifier::FromImage(data) => {
                        VZMacMachineIdentifier::initWithDataRepresentation(
                            VZMacMachineIdentifier::alloc(),
                            &NSData::with_bytes(data),
                        )
                        .ok_or(BuildError::MachineIdentifier)?
                    }
                    MachineIdentifier::Fresh => VZMacMachineIdentifier::new(),
                };
                let aux = VZMacAuxiliaryStorage::initWithURL(
                    VZMacAuxiliaryStorage::alloc(),
                    &*file_url(aux_storage).map_err(BuildError::Url)?,
                );
                p.setHardwareModel(&model);
                p.setMachineIdentifier(&id);
                p.setAuxiliaryStorage(Some(&aux));
                cfg.setPlatform(&p);
                cfg.setBootLoader(Some(&VZMacOSBootLoader::new()));
            }
            Platform::LinuxKernel {
                kernel,
                initrd,
                cmdline,
            } => {
                cfg.setPlatform(&VZGenericPlatformConfiguration::new());
                let loader = VZLinuxBootLoader::initWithKernelURL(
                    VZLinuxBootLoader::alloc(),
                    &*file_url(kernel).map_err(BuildError::Url)?,
                );
                if let Some(initrd) = initrd {
                    loader.setInitialRamdiskURL(Some(&*file_url(initrd).map_err(BuildError::Url)?));
                }
                loader.setCommandLine(&NSString::from_str(cmdline));
                cfg.setBootLoader(Some(&loader));
            }
            Platform::Efi { variable_store } => {
                cfg.setPlatform(&VZGenericPlatformConfiguration::new());
                let url = file_url(variable_store).map_err(BuildError::Url)?;
                let store = if variable_store.exists() {
                    VZEFIVariableStore::initWithURL(VZEFIVariableStore::alloc(), &url)
                } else {
                    VZEFIVariableStore::initCreatingVariableStoreAtURL_options_error(
                        VZEFIVariableStore::alloc(),
                        &url,
                        VZEFIVariableStoreInitializationOptions::empty(),
                    )
                    .map_err(|e| BuildError::EfiVariableStore {
                        path: variable_store.clone(),
                        source: FrameworkError::from_ns(&e),
                    })?
                };
                let loader = VZEFIBootLoader::new();
                loader.setVariableStore(Some(&store));
                cfg.setBootLoader(Some(&loader));
            }
        }
    }
    Ok(())
}

/// The bridgeable host interface whose identifier is `name`.
fn bridge_interface(name: &str) -> Result<Retained<VZBridgedNetworkInterface>, BuildError> {
    // SAFETY: a class method and a property getter without preconditions.
    let interfaces = unsafe { VZBridgedNetworkInterface::networkInterfaces() };
    let mut available = Vec::new();
    for i in 0..interfaces.count() {
        let iface = interfaces.objectAtIndex(i);
        // SAFETY: property getter.
        let id = unsafe { iface.identifier() }.to_string();
        if id == name {
            return Ok(iface);
        }
        available.push(id);
    }
    Err(BuildError::BridgeInterfaceNotFound {
        name: name.to_owned(),
        available,
    })
}

fn share_device(
    device: &ShareDevice,
) -> Result<Retained<VZDirectorySharingDeviceConfiguration>, BuildError> {
    // SAFETY: initialisers and setters with arguments of the declared types.
    unsafe {
        let dir =
            |path: &Path, read_only: bool| -> Result<Retained<VZSharedDirectory>, BuildError> {
                Ok(VZSharedDirectory::initWithURL_readOnly(
                    VZSharedDirectory::alloc(),
                    &*dir_url(path).map_err(BuildError::Url)?,
                    read_only,
                ))
            };
        let tag = match &device.tag {
            ShareTag::MacAutomount => {
                VZVirtioFileSystemDeviceConfiguration::macOSGuestAutomountTag()
            }
            ShareTag::Named(tag) => NSString::from_str(tag),
        };
        let fs = VZVirtioFileSystemDeviceConfiguration::initWithTag(
            VZVirtioFileSystemDeviceConfiguration::alloc(),
            &tag,
        );
        match (&device.tag, device.entries.as_slice()) {
            (ShareTag::Named(_), [one]) => {
                let share = VZSingleDirectoryShare::initWithDirectory(
                    VZSingleDirectoryShare::alloc(),
                    &*dir(&one.host_path, one.read_only)?,
                );
                fs.setShare(Some(&share));
            }
            (_, entries) => {
                let names: Vec<Retained<NSString>> = entries
                    .iter()
                    .map(|e| NSString::from_str(&e.name))
                    .collect();
                let dirs = entries
                    .iter()
                    .map(|e| dir(&e.host_path, e.read_only))
                    .collect::<Result<Vec<_>, BuildError>>()?;
                let keys: Vec<&NSString> = names.iter().map(|n| &**n).collect();
                let map = NSDictionary::from_retained_objects(&keys, &dirs);
                let share = VZMultipleDirectoryShare::initWithDirectories(
                    VZMultipleDirectoryShare::alloc(),
                    &map,
                );
                fs.setShare(Some(&share));
            }
        }
        Ok(Retained::into_super(fs))
    }
}

fn graphics(g: Graphics) -> Retained<VZGraphicsDeviceConfiguration> {
    let px = |v: u32| isize::try_from(v).unwrap_or(isize::MAX);
    // SAFETY: initialisers and setters with arguments of the declared types.
    unsafe {
        match g {
            Graphics::Mac { width, height, ppi } => {
                let dev = VZMacGraphicsDeviceConfiguration::new();
                let display = VZMacGraphicsDisplayConfiguration::initWithWidthInPixels_heightInPixels_pixelsPerInch(
                    VZMacGraphicsDisplayConfiguration::alloc(),
                    px(width),
                    px(height),
                    px(ppi),
                );
                dev.setDisplays(&NSArray::from_retained_slice(&[display]));
                Retained::into_super(dev)
            }
            Graphics::Virtio { width, height } => {
                let dev = VZVirtioGraphicsDeviceConfiguration::new();
                let scanout =
                    VZVirtioGraphicsScanoutConfiguration::initWithWidthInPixels_heightInPixels(
                        VZVirtioGraphicsScanoutConfiguration::alloc(),
                        px(width),
                        px(height),
                    );
                dev.setScanouts(&NSArray::from_retained_slice(&[scanout]));
                Retained::into_super(dev)
            }
        }
    }
}

fn serial(log: &Path) -> Result<Retained<VZSerialPortConfiguration>, BuildError> {
    // SAFETY: initialisers and setters with arguments of the declared types.
    unsafe {
        let attachment = VZFileSerialPortAttachment::initWithURL_append_error(
            VZFileSerialPortAttachment::alloc(),
            &*file_url(log).map_err(BuildError::Url)?,
            true,
        )
        .map_err(|e| BuildError::SerialLog {
            path: log.to_owned(),
            source: FrameworkError::from_ns(&e),
        })?;
        let port = VZVirtioConsoleDeviceSerialPortConfiguration::new();
        port.setAttachment(Some(&attachment));
        Ok(Retained::into_super(port))
    }
}
