//! A per-pod SSH identity: an Ed25519 key pair made for one pod's guest, whose public
//! half the guest receives at boot (cloud-init's NoCloud seed, see
//! `vzk_vm::cloud_init`) and whose private half stays in the pod's state directory
//! (mode 0600, removed with the pod). Another pod's key does not open this guest, and
//! this key opens no other.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::{Ed25519Keypair, Ed25519PrivateKey};

/// Why an identity could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the key file.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The stored key does not parse, or the key cannot be encoded.
    #[error("the pod's SSH key {path}: {detail}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// One pod's SSH key pair.
#[derive(Clone)]
pub struct PodIdentity {
    key: PrivateKey,
    public: String,
}

impl std::fmt::Debug for PodIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodIdentity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl PodIdentity {
    /// A fresh key pair from the system's random source.
    pub fn generate(comment: &str) -> Self {
        let seed: [u8; Ed25519PrivateKey::BYTE_SIZE] = rand::random();
        let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        key.set_comment(comment);
        Self::from_key(key)
    }

    fn from_key(key: PrivateKey) -> Self {
        let public = key
            .public_key()
            .to_openssh()
            .unwrap_or_else(|e| format!("<unencodable: {e}>"));
        Self { key, public }
    }

    /// The identity stored at `path`, or a new one written there (mode 0600, created
    /// exclusively) when there is none.
    pub fn load_or_create(path: &Path, comment: &str) -> Result<Self, IdentityError> {
        let bad = |detail: String| IdentityError::Key {
            path: path.to_path_buf(),
            detail,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let key = PrivateKey::from_openssh(&text).map_err(|e| bad(e.to_string()))?;
                return Ok(Self::from_key(key));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IdentityError::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let id = Self::generate(comment);
        let text = id
            .key
            .to_openssh(LineEnding::LF)
            .map_err(|e| bad(e.to_string()))?;
        let io = |op, source| IdentityError::Io {
            op,
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("create", e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write", e))?;
        Ok(id)
    }

    /// The private key (for [`crate::Credentials::with_first_key`]).
    pub fn private_key(&self) -> PrivateKey {
        self.key.clone()
    }

    /// The public key in OpenSSH's `authorized_keys` form.
    pub fn public_openssh(&self) -> &str {
        &self.public
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn an_identity_is_kept_0600_and_read_back_the_same() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ssh_ed25519");
        let a = PodIdentity::load_or_create(&p, "pod-a").unwrap();
        assert!(a.public_openssh().starts_with("ssh-ed25519 "));
        assert!(a.public_openssh().ends_with(" pod-a"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = PodIdentity::load_or_create(&p, "ignored").unwrap();
        assert_eq!(again.public_openssh(), a.public_openssh());
        let b = PodIdentity::load_or_create(&d.path().join("other"), "pod-b").unwrap();
        assert_ne!(
            a.public_openssh().split(' ').nth(1),
            b.public_openssh().split(' ').nth(1)
        );
        std::fs::write(&p, "garbage").unwrap();
        assert!(PodIdentity::load_or_create(&p, "x").is_err());
    }
}
