//! Errors of bringing the provider up ([`ProviderInitError`]). Errors of pod
//! operations are `vzk_core::ProviderError`s.

use std::path::PathBuf;

/// Why [`crate::VmProvider::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderInitError {
    /// A state directory could not be created.
    #[error("creating {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image cache could not be opened.
    #[error("opening the image cache")]
    OpenImageStore(#[source] vzk_image::ImageError),
    /// No clone mechanism works in the pods directory.
    #[error("detecting how to clone disks")]
    DetectCloner(#[source] vzk_image::ImageError),
    /// The registry hosts configuration (`--registry-config-dir`) is unusable.
    #[error("reading the registry configuration")]
    RegistryConfig(#[source] vzk_image::HostsError),
    /// The node's docker config could not be read.
    #[error("reading the node's docker config")]
    ReadDockerConfig(#[source] vzk_image::ImageError),
    /// VMs of a previous agent could not be re-adopted.
    #[error("re-adopting VMs of a previous agent")]
    Adopt(#[source] vzk_vm::HypervisorError),
}
