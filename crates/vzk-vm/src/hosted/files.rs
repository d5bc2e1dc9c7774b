//! The files of a hosted VM in the hosts directory (the table is in the [module
//! docs](super)): [`VmFiles`] names them; [`StateFile`] and [`CreateFailure`] are the
//! formats of `<id>.state.json` and `<id>.error.json`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::protocol::chain;
use crate::hypervisor::{BackendKind, HypervisorError};
use crate::spec::VmSpec;

/// The longest Unix socket path (`sun_path` less the terminating NUL).
#[cfg(any(target_os = "macos", target_os = "ios"))]
const MAX_SOCKET_PATH: usize = 103;
#[cfg(not(any(target_os = "macos", target_os = "ios")))]
const MAX_SOCKET_PATH: usize = 107;

/// Why a VM's files cannot be named.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The id is not file-name safe.
    #[error("VM id {0:?} is not 1-64 characters of [A-Za-z0-9._-]")]
    InvalidId(String),
    /// The socket path exceeds the platform's limit.
    #[error(
        "the VM host socket path {path} is {len} bytes, longer than this platform's {MAX_SOCKET_PATH}; use a shorter data directory or VM id"
    )]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// The files of one hosted VM (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFiles {
    /// `<id>.sock`.
    pub socket: PathBuf,
    /// `<id>.state.json`.
    pub state: PathBuf,
    /// `<id>.spec.json`.
    pub spec: PathBuf,
    /// `<id>.log`.
    pub log: PathBuf,
    /// `<id>.error.json`.
    pub error: PathBuf,
}

const STATE_SUFFIX: &str = ".state.json";

impl VmFiles {
    /// The files of VM `id` in the hosts directory `dir`.
    pub fn new(dir: &Path, id: &str) -> Result<Self, FilesError> {
        if !VmSpec::is_valid_id(id) {
            return Err(FilesError::InvalidId(id.into()));
        }
        let socket = dir.join(format!("{id}.sock"));
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(FilesError::SocketPathTooLong { path: socket, len });
        }
        Ok(Self {
            socket,
            state: dir.join(format!("{id}{STATE_SUFFIX}")),
            spec: dir.join(format!("{id}.spec.json")),
            log: dir.join(format!("{id}.log")),
            error: dir.join(format!("{id}.error.json")),
        })
    }

    /// The VM id a state file's name belongs to (`<id>.state.json`).
    pub fn id_of_state_file(name: &str) -> Option<&str> {
        name.strip_suffix(STATE_SUFFIX)
            .filter(|id| VmSpec::is_valid_id(id))
    }

    /// Removes every file (missing ones are fine; other failures are logged).
    pub fn remove_all(&self) {
        for path in [
            &self.state,
            &self.socket,
            &self.spec,
            &self.error,
            &self.log,
        ] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a VM host file")
                }
            }
        }
    }

    /// The last non-empty line of the host's log (at most 300 characters), if any.
    pub fn log_tail(&self) -> Option<String> {
        let text = std::fs::read(&self.log).ok()?;
        let start = text.len().saturating_sub(4096);
        let text = String::from_utf8_lossy(&text[start..]);
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?.trim();
        let mut out: String = line.chars().take(300).collect();
        if out.len() < line.len() {
            out.push('…');
        }
        Some(out)
    }
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The host's state file (`<id>.state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateFile {
    /// The protocol version the host speaks.
    pub version: u32,
    /// The host process.
    pub pid: u32,
    /// Its socket.
    pub socket: PathBuf,
    /// The VM's spec.
    pub spec: VmSpec,
    /// The inner backend.
    pub backend: BackendKind,
}

/// Why a host could not create its VM (`<id>.error.json`), read by the agent when the
/// host exits before answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateFailure {
    /// Which [`HypervisorError`] it was: `invalidSpec`, `unsupported`, `alreadyExists`,
    /// `unavailable` or `create`.
    pub kind: String,
    /// The error chain.
    pub message: String,
    /// The inner backend.
    pub backend: BackendKind,
}

impl CreateFailure {
    /// The file form of `e`.
    pub fn from_error(e: &HypervisorError, backend: BackendKind) -> Self {
        let (kind, message) = match e {
            HypervisorError::InvalidSpec { message, .. } => ("invalidSpec", message.clone()),
            HypervisorError::Unsupported { feature, .. } => ("unsupported", feature.clone()),
            HypervisorError::AlreadyExists { .. } => ("alreadyExists", chain(e)),
            HypervisorError::Unavailable { detail, .. } => ("unavailable", detail.clone()),
            _ => ("create", chain(e)),
        };
        Self {
            kind: kind.into(),
            message,
            backend,
        }
    }

    /// The [`HypervisorError`] for VM `id`.
    pub fn into_error(self, id: &str) -> HypervisorError {
        let id = id.to_owned();
        match self.kind.as_str() {
            "invalidSpec" => HypervisorError::InvalidSpec {
                id,
                message: self.message,
            },
            "unsupported" => HypervisorError::Unsupported {
                backend: self.backend,
                feature: self.message,
            },
            "alreadyExists" => HypervisorError::AlreadyExists { id },
            "unavailable" => HypervisorError::Unavailable {
                backend: self.backend,
                detail: self.message,
            },
            _ => HypervisorError::Create {
                id,
                source: self.message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_by_id_and_bounded() {
        let f = VmFiles::new(Path::new("/d"), "vm-1").expect("valid");
        assert_eq!(f.socket, Path::new("/d/vm-1.sock"));
        assert_eq!(f.state, Path::new("/d/vm-1.state.json"));
        assert_eq!(VmFiles::id_of_state_file("vm-1.state.json"), Some("vm-1"));
        assert_eq!(VmFiles::id_of_state_file("vm-1.spec.json"), None);
        assert_eq!(VmFiles::id_of_state_file("vm-1.state.json.tmp"), None);
        assert!(matches!(
            VmFiles::new(Path::new("/d"), "../x"),
            Err(FilesError::InvalidId(_))
        ));
        let long = format!("/{}", "d".repeat(80));
        let err = VmFiles::new(Path::new(&long), &"v".repeat(40)).expect_err("too long");
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[test]
    fn log_tail_is_the_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = VmFiles::new(dir.path(), "v").expect("valid");
        assert_eq!(f.log_tail(), None);
        std::fs::write(&f.log, "first\nsecond line\n\n").expect("write");
        assert_eq!(f.log_tail().as_deref(), Some("second line"));
        f.remove_all();
        assert!(!f.log.exists());
    }

    #[test]
    fn create_failures_map_back_to_hypervisor_errors() {
        let e = HypervisorError::InvalidSpec {
            id: "v".into(),
            message: "too many CPUs".into(),
        };
        let f = CreateFailure::from_error(&e, BackendKind::Vz);
        assert!(matches!(
            f.clone().into_error("v"),
            HypervisorError::InvalidSpec { message, .. } if message == "too many CPUs"
        ));
        let text = serde_json::to_string(&f).unwrap_or_default();
        let back: Option<CreateFailure> = serde_json::from_str(&text).ok();
        assert_eq!(back, Some(f));
        let e = HypervisorError::Create {
            id: "v".into(),
            source: "framework said no".into(),
        };
        let f = CreateFailure::from_error(&e, BackendKind::Vz);
        let back = f.into_error("v");
        assert!(matches!(back, HypervisorError::Create { .. }));
        assert!(chain(&back).contains("framework said no"));
        let odd = CreateFailure {
            kind: "fromTheFuture".into(),
            message: "m".into(),
            backend: BackendKind::Qemu,
        };
        assert!(matches!(
            odd.into_error("v"),
            HypervisorError::Create { .. }
        ));
    }
}
