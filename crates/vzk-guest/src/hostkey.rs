//! Trust-on-first-use pinning of a guest's SSH host key.
//!
//! A VM's host key is unknown until it first boots (the guest generates it), so it
//! cannot be configured in advance; accepting any key (the reference's behaviour)
//! would let anything answering on the VM's IP receive our credentials and commands.
//! The compromise is TOFU: the first key seen for a VM is pinned, and every later
//! connection must present the same key or fail with [`HostKeyError::Mismatch`].
//!
//! A [`HostKeyStore`] is the pin of ONE VM. It lives either in a file the caller
//! names (normally inside the VM's state directory, so it survives agent restarts and
//! is deleted with the VM) or in memory (pinned for the life of the process). The
//! file holds one line in OpenSSH public-key format (`ssh-ed25519 AAAA…`) and is
//! written atomically (temporary file + rename).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::keys::PublicKey;
use tracing::{info, warn};

/// Why a host key was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The server presented a key different from the pinned one.
    #[error("guest host key mismatch: pinned {pinned}, server presented {presented}")]
    Mismatch {
        /// Fingerprint (SHA-256) of the pinned key.
        pinned: String,
        /// Fingerprint (SHA-256) of the key the server presented.
        presented: String,
    },
    /// The server authenticated with a certificate; only plain keys can be pinned.
    #[error("guest presented a host certificate; only plain host keys can be pinned")]
    Certificate,
    /// The pin file exists but could not be read.
    #[error("reading pinned host key {path}")]
    ReadPin {
        /// The pin file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The pin file does not hold a valid public key.
    #[error("parsing pinned host key {path}")]
    ParsePin {
        /// The pin file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    /// A key given in OpenSSH format did not parse.
    #[error("parsing host key {line:?}")]
    ParseKey {
        /// The text given.
        line: String,
        /// The parser's error.
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    /// The key could not be encoded for storage.
    #[error("encoding host key for pinning")]
    EncodeKey(#[source] russh::keys::ssh_key::Error),
    /// The pin file could not be written.
    #[error("writing pinned host key {path}")]
    WritePin {
        /// The pin file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The pinned host key of one VM. Cheap to clone (clones share the pin).
#[derive(Debug, Clone)]
pub struct HostKeyStore {
    path: Option<PathBuf>,
    pinned: Arc<Mutex<Option<PublicKey>>>,
}

impl HostKeyStore {
    /// A pin stored in `path` (created on first connect; the directory must exist).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            pinned: Arc::new(Mutex::new(None)),
        }
    }

    /// A pin kept in memory only, for this process's lifetime.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            pinned: Arc::new(Mutex::new(None)),
        }
    }

    /// The pin file, if the pin is stored in one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The pinned key, if one is pinned (reads the file if needed).
    pub fn pinned(&self) -> Result<Option<PublicKey>, HostKeyError> {
        let mut guard = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = self.read_file()?;
        }
        Ok(guard.clone())
    }

    /// Accepts `presented` if it equals the pinned key, or pins it if none is pinned.
    pub fn verify_or_pin(&self, presented: &PublicKey) -> Result<(), HostKeyError> {
        let mut guard = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = self.read_file()?;
        }
        match guard.as_ref() {
            Some(pinned) if pinned.key_data() == presented.key_data() => Ok(()),
            Some(pinned) => {
                let err = HostKeyError::Mismatch {
                    pinned: fingerprint(pinned),
                    presented: fingerprint(presented),
                };
                warn!(pin = ?self.path, error = %err, "guest host key rejected");
                Err(err)
            }
            None => {
                self.write_file(presented)?;
                info!(pin = ?self.path, fingerprint = %fingerprint(presented), "pinned guest host key on first connect");
                *guard = Some(presented.clone());
                Ok(())
            }
        }
    }

    /// [`Self::verify_or_pin`] of a key learned another way than a handshake, given in
    /// OpenSSH format (`ssh-ed25519 AAAA… [comment]`); e.g. the key a guest printed
    /// over an authenticated connection right after making it.
    pub fn verify_or_pin_openssh(&self, line: &str) -> Result<(), HostKeyError> {
        let key =
            PublicKey::from_openssh(line.trim()).map_err(|source| HostKeyError::ParseKey {
                line: line.trim().chars().take(120).collect(),
                source,
            })?;
        self.verify_or_pin(&key)
    }

    fn read_file(&self) -> Result<Option<PublicKey>, HostKeyError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(HostKeyError::ReadPin {
                    path: path.clone(),
                    source,
                });
            }
        };
        PublicKey::from_openssh(text.trim())
            .map(Some)
            .map_err(|source| HostKeyError::ParsePin {
                path: path.clone(),
                source,
            })
    }

    fn write_file(&self, key: &PublicKey) -> Result<(), HostKeyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut line = key.to_openssh().map_err(HostKeyError::EncodeKey)?;
        line.push('\n');
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, line)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| HostKeyError::WritePin {
                path: path.clone(),
                source,
            })
    }
}

/// The SHA-256 fingerprint of a key, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ a";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHS/37neyugBhY0lrcqc0Lv3OOU7rIZt0wdwWjVJ5tOE b";

    fn key(s: &str) -> PublicKey {
        match PublicKey::from_openssh(s) {
            Ok(k) => k,
            Err(e) => panic!("test key does not parse: {e}"),
        }
    }

    #[test]
    fn file_pin_is_written_once_and_enforced_across_instances() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("hostkey.pub");
        let store = HostKeyStore::file(&path);
        assert!(matches!(store.pinned(), Ok(None)));
        assert!(store.verify_or_pin(&key(KEY_A)).is_ok());
        assert!(store.verify_or_pin(&key(KEY_A)).is_ok());
        // A fresh store (an agent restart) reads the pin back from the file.
        let again = HostKeyStore::file(&path);
        assert!(again.verify_or_pin(&key(KEY_A)).is_ok());
        let err = again.verify_or_pin(&key(KEY_B));
        assert!(matches!(err, Err(HostKeyError::Mismatch { .. })), "{err:?}");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3"),
            "{text}"
        );
    }

    #[test]
    fn corrupt_pin_file_is_an_error_not_a_new_pin() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("hostkey.pub");
        if let Err(e) = std::fs::write(&path, "garbage\n") {
            panic!("write: {e}");
        }
        let err = HostKeyStore::file(&path).verify_or_pin(&key(KEY_A));
        assert!(matches!(err, Err(HostKeyError::ParsePin { .. })), "{err:?}");
    }

    #[test]
    fn in_memory_pin() {
        let store = HostKeyStore::in_memory();
        assert!(store.verify_or_pin(&key(KEY_B)).is_ok());
        assert!(matches!(
            store.verify_or_pin(&key(KEY_A)),
            Err(HostKeyError::Mismatch { .. })
        ));
        assert!(store.clone().verify_or_pin(&key(KEY_B)).is_ok());
    }

    #[test]
    fn a_key_told_in_openssh_format_is_pinned_like_a_presented_one() {
        let store = HostKeyStore::in_memory();
        assert!(store.verify_or_pin_openssh(&format!("{KEY_A}\n")).is_ok());
        assert!(store.verify_or_pin(&key(KEY_A)).is_ok());
        assert!(matches!(
            store.verify_or_pin_openssh(KEY_B),
            Err(HostKeyError::Mismatch { .. })
        ));
        assert!(matches!(
            HostKeyStore::in_memory().verify_or_pin_openssh("ssh-ed25519 not-base64"),
            Err(HostKeyError::ParseKey { .. })
        ));
    }
}
