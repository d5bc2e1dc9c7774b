//! Installing macOS from a restore image (`vz-kubelet image create macos`): the
//! framework calls only. What to make (sizes, minimums, the directory) is decided by
//! `vzk_image::create`; the machine is built from a [`VzConfig`] like any other VM.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use block2::RcBlock;
use objc2::AnyThread as _;
use objc2_foundation::{NSData, NSError};
use objc2_virtualization::{
    VZMacAuxiliaryStorage, VZMacAuxiliaryStorageInitializationOptions, VZMacHardwareModel,
    VZMacMachineIdentifier, VZMacOSRestoreImage,
};
use tokio::sync::oneshot;

use super::actor::{Actor, CommandError, CreateError};
use super::ns::{FrameworkError, UrlError, file_url};
use crate::config::VzConfig;
use crate::state::StatePublisher;

/// Why a restore image could not be read or installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A path could not be handed to the framework.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The framework could not load the restore image.
    #[error("loading the restore image failed")]
    Load(#[source] FrameworkError),
    /// The framework never answered the load.
    #[error("the restore image load was dropped without an answer")]
    LoadDropped,
    /// The hardware model data is not one the framework accepts.
    #[error("the hardware model data is not valid")]
    HardwareModel,
    /// The auxiliary storage could not be created.
    #[error("creating the auxiliary storage failed")]
    Aux(#[source] FrameworkError),
    /// The VM to install into could not be built.
    #[error("building the VM to install into failed")]
    Build(#[source] CreateError),
    /// The installer failed.
    #[error("the macOS installer failed")]
    Install(#[source] CommandError),
    /// The VM was released during the installation.
    #[error("the VM went away during the installation")]
    Released,
}

/// What the framework says of a restore image on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreInfo {
    /// The most featureful supported configuration's hardware model, if any.
    pub hardware_model: Option<Vec<u8>>,
    /// Whether this host supports that hardware model.
    pub host_supported: bool,
    /// Its minimum CPU count.
    pub min_cpus: u32,
    /// Its minimum memory, bytes.
    pub min_memory_bytes: u64,
    /// `major.minor.patch (build)`.
    pub version: String,
}

/// `loadFileURL:completionHandler:` and what the image asks for on this host.
pub async fn restore_info(ipsw: &Path) -> Result<RestoreInfo, InstallError> {
    let url = file_url(ipsw)?;
    let (tx, rx) = oneshot::channel::<Result<RestoreInfo, InstallError>>();
    let reply = Cell::new(Some(tx));
    let block = RcBlock::new(
        move |image: *mut VZMacOSRestoreImage, error: *mut NSError| {
            // SAFETY: the framework passes null or valid objects for the duration of
            // the call; the properties read have no preconditions.
            let outcome = unsafe {
                match (image.as_ref(), error.as_ref()) {
                    (_, Some(e)) => Err(InstallError::Load(FrameworkError::from_ns(e))),
                    (None, None) => Err(InstallError::LoadDropped),
                    (Some(image), None) => {
                        let v = image.operatingSystemVersion();
                        let version = format!(
                            "{}.{}.{} ({})",
                            v.majorVersion,
                            v.minorVersion,
                            v.patchVersion,
                            image.buildVersion()
                        );
                        Ok(match image.mostFeaturefulSupportedConfiguration() {
                            None => RestoreInfo {
                                hardware_model: None,
                                host_supported: false,
                                min_cpus: 0,
                                min_memory_bytes: 0,
                                version,
                            },
                            Some(req) => {
                                let model = req.hardwareModel();
                                RestoreInfo {
                                    hardware_model: Some(model.dataRepresentation().to_vec()),
                                    host_supported: model.isSupported(),
                                    min_cpus: u32::try_from(req.minimumSupportedCPUCount())
                                        .unwrap_or(u32::MAX),
                                    min_memory_bytes: req.minimumSupportedMemorySize(),
                                    version,
                                }
                            }
                        })
                    }
                }
            };
            if let Some(tx) = reply.take() {
                let _ = tx.send(outcome);
            }
        },
    );
    // SAFETY: a local file URL (the framework raises for others) and a block of the
    // declared signature; the handler may run on any thread and only sends on a channel.
    unsafe { VZMacOSRestoreImage::loadFileURL_completionHandler(&url, &block) };
    rx.await.map_err(|_| InstallError::LoadDropped)?
}

/// Create the auxiliary storage at `aux` for `hardware_model` and a new machine
/// identifier; returns the identifier's data representation.
pub fn create_platform(aux: &Path, hardware_model: &[u8]) -> Result<Vec<u8>, InstallError> {
    let url = file_url(aux)?;
    // SAFETY: initialisers with arguments of the declared types, on objects local to
    // this call.
    unsafe {
        let model = VZMacHardwareModel::initWithDataRepresentation(
            VZMacHardwareModel::alloc(),
            &NSData::with_bytes(hardware_model),
        )
        .ok_or(InstallError::HardwareModel)?;
        VZMacAuxiliaryStorage::initCreatingStorageAtURL_hardwareModel_options_error(
            VZMacAuxiliaryStorage::alloc(),
            &url,
            &model,
            VZMacAuxiliaryStorageInitializationOptions::empty(),
        )
        .map_err(|e| InstallError::Aux(FrameworkError::from_ns(&e)))?;
        Ok(VZMacMachineIdentifier::new().dataRepresentation().to_vec())
    }
}

/// Build the VM `config` (a macOS platform on the staged disk and auxiliary storage)
/// and run the installer on it with the restore image at `ipsw`.
pub async fn install(
    id: &str,
    config: VzConfig,
    ipsw: &Path,
    progress: impl Fn(f64) + Send + 'static,
) -> Result<(), InstallError> {
    let states = Arc::new(StatePublisher::new(id));
    let actor = Actor::build(id, config, states)
        .await
        .map_err(InstallError::Build)?;
    match actor.install_macos(ipsw, progress).await {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(InstallError::Install(e)),
        None => Err(InstallError::Released),
    }
}
