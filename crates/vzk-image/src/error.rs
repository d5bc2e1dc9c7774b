//! The crate's error type: one variant per operation that can fail.

use std::path::PathBuf;
use std::sync::Arc;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The text given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry refused our credentials (or we had none and it wants some).
    #[error("registry {registry} refused authentication for {repository}: {detail}")]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// What the registry said.
        detail: String,
    },
    /// An HTTP request to the registry failed.
    #[error("registry {registry}: {what}: {detail}")]
    Registry {
        /// Registry host.
        registry: String,
        /// The request, e.g. `GET manifest latest`.
        what: String,
        /// Status or transport error.
        detail: String,
    },
    /// The manifest or image is not on the registry.
    #[error("registry {registry}: {what} not found")]
    NotFound {
        /// Registry host.
        registry: String,
        /// What was looked for.
        what: String,
    },
    /// The manifest is malformed or breaks a rule of its format.
    #[error("invalid manifest for {reference}: {reason}")]
    InvalidManifest {
        /// The image reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A layer has a media type we do not know.
    #[error("unsupported layer media type {media_type:?} in {reference}")]
    UnsupportedMediaType {
        /// The image reference.
        reference: String,
        /// The media type.
        media_type: String,
    },
    /// A blob's bytes do not match its descriptor (digest or size).
    #[error("blob {digest} of {file}: {reason}")]
    DigestMismatch {
        /// The descriptor digest.
        digest: String,
        /// The file it belongs to.
        file: String,
        /// Expected vs actual.
        reason: String,
    },
    /// Decompressed content is larger than its declared uncompressed size.
    #[error("blob {digest} of {file} decompresses to more than the declared {declared} bytes")]
    DecompressionBomb {
        /// The descriptor digest.
        digest: String,
        /// The file.
        file: String,
        /// Declared uncompressed size.
        declared: u64,
    },
    /// Compressed data is corrupt.
    #[error("blob {digest} of {file}: cannot decompress: {detail}")]
    Decompress {
        /// The descriptor digest.
        digest: String,
        /// The file.
        file: String,
        /// Decoder error.
        detail: String,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The cache's filesystem ran out of space during a pull; nothing partial was kept.
    #[error(
        "no space left on device for image {reference} in {path}: {} free, the image is up to {needed} bytes uncompressed (sparse zeros take none); free space or lower the cache budget ({detail})",
        available.map_or_else(|| "unknown bytes".to_string(), |a| format!("{a} bytes"))
    )]
    NoSpace {
        /// The image reference.
        reference: String,
        /// The cache root.
        path: PathBuf,
        /// Uncompressed size of the image's files (an upper bound: zero blocks stay holes).
        needed: u64,
        /// Free bytes on the cache's filesystem after the failed pull was cleaned up.
        available: Option<u64>,
        /// The failed operation.
        detail: String,
    },
    /// `imagePullPolicy: Never` and the image is not in the cache.
    #[error("image {reference} is not present locally and the pull policy is Never")]
    NotPresent {
        /// The image reference.
        reference: String,
    },
    /// A local file or directory (an image directory to push, a VM to import, an OCI
    /// layout, a restore image) is not what it should be.
    #[error("{path}: {reason}")]
    InvalidImageDir {
        /// The directory or file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// No copy-on-write clone mechanism works here; we never fall back to a full copy.
    #[error("no copy-on-write clone possible for {path}: {reason}")]
    CloneUnsupported {
        /// Where a clone was attempted.
        path: PathBuf,
        /// Why each mechanism failed.
        reason: String,
    },
    /// Another pull of the same image failed; this is its error.
    #[error("{0}")]
    Shared(Arc<ImageError>),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl ImageError {
    /// True if this error (or the one it shares) is "no space left on device" (`ENOSPC`,
    /// or `EDQUOT` for a quota).
    pub fn is_no_space(&self) -> bool {
        fn io_no_space(e: &std::io::Error) -> bool {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        }
        match self {
            Self::NoSpace { .. } => true,
            Self::Io { source, .. } => {
                io_no_space(source)
                    || std::error::Error::source(source)
                        .and_then(|s| s.downcast_ref::<std::io::Error>())
                        .is_some_and(io_no_space)
            }
            Self::Shared(e) => e.is_no_space(),
            _ => false,
        }
    }
}

/// Shorthand.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Attach an operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| ImageError::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
