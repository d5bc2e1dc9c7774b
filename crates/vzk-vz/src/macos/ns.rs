//! Foundation helpers: `NSURL` from paths, `NSError` copied into a `Send` error.

use std::path::{Path, PathBuf};

use objc2::rc::Retained;
use objc2_foundation::{NSError, NSString, NSURL};

/// An `NSError` copied into plain data (the object itself is not `Send`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{description} ({domain} error {code})")]
pub struct FrameworkError {
    /// The error domain (`VZErrorDomain`, `NSPOSIXErrorDomain`, …).
    pub domain: String,
    /// The code within the domain.
    pub code: isize,
    /// `localizedDescription`.
    pub description: String,
}

impl FrameworkError {
    /// Copies `error`.
    pub fn from_ns(error: &NSError) -> Self {
        Self {
            domain: error.domain().to_string(),
            code: error.code(),
            description: error.localizedDescription().to_string(),
        }
    }
}

/// A path that cannot be made into a file URL (not UTF-8).
#[derive(Debug, thiserror::Error)]
#[error("path {path:?} cannot be expressed as a file URL (not UTF-8)")]
pub struct UrlError {
    /// The path.
    pub path: PathBuf,
}

/// A file URL for `path` (`fileURLWithPath:isDirectory:`).
pub fn file_url(path: &Path) -> Result<Retained<NSURL>, UrlError> {
    url(path, false)
}

/// A directory URL for `path`.
pub fn dir_url(path: &Path) -> Result<Retained<NSURL>, UrlError> {
    url(path, true)
}

fn url(path: &Path, is_dir: bool) -> Result<Retained<NSURL>, UrlError> {
    let text = path.to_str().ok_or_else(|| UrlError {
        path: path.to_owned(),
    })?;
    Ok(NSURL::fileURLWithPath_isDirectory(
        &NSString::from_str(text),
        is_dir,
    ))
}
