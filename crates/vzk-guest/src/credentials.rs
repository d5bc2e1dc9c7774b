//! SSH credentials for a guest: the user, a private key (from a file or base64 text,
//! optionally passphrase-protected) and/or a password.
//!
//! The sources and their environment variables are the reference implementation's
//! (`VZ_SSH_USER`, `VZ_SSH_PRIVATE_KEY_BASE64`, `VZ_SSH_PRIVATE_KEY_PATH`,
//! `VZ_SSH_PRIVATE_KEY_PASSPHRASE`, `VZ_SSH_PASSWORD`), so existing deployments keep
//! working. The binary fills a [`CredentialSource`] from flags or env and calls
//! [`Credentials::load`] once; a bad key is then reported at start-up, not at the
//! first exec.
//!
//! Contract: a user is required, and at least one of key or password. When both are
//! given, public-key authentication is tried first, then the password. A base64 key
//! wins over a key path.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use russh::keys::PrivateKey;

/// Environment variable: the SSH user name (required).
pub const ENV_USER: &str = "VZ_SSH_USER";
/// Environment variable: a private key, base64 of its PEM/OpenSSH text (preferred).
pub const ENV_PRIVATE_KEY_BASE64: &str = "VZ_SSH_PRIVATE_KEY_BASE64";
/// Environment variable: path of a private key file.
pub const ENV_PRIVATE_KEY_PATH: &str = "VZ_SSH_PRIVATE_KEY_PATH";
/// Environment variable: passphrase of an encrypted private key.
pub const ENV_PRIVATE_KEY_PASSPHRASE: &str = "VZ_SSH_PRIVATE_KEY_PASSPHRASE";
/// Environment variable: password for password authentication.
pub const ENV_PASSWORD: &str = "VZ_SSH_PASSWORD";

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// No user name was given.
    #[error("no SSH user given (set {ENV_USER})")]
    MissingUser,
    /// Neither a key nor a password was given.
    #[error(
        "no SSH secret given: set {ENV_PRIVATE_KEY_BASE64}, {ENV_PRIVATE_KEY_PATH} or {ENV_PASSWORD}"
    )]
    MissingSecret,
    /// The base64 key text is not valid base64.
    #[error("decoding the base64 SSH private key")]
    DecodeKeyBase64(#[source] base64::DecodeError),
    /// The decoded base64 key is not UTF-8 text.
    #[error("the base64 SSH private key does not decode to text")]
    KeyNotText(#[source] std::string::FromUtf8Error),
    /// The key file could not be read.
    #[error("reading SSH private key file {path}")]
    ReadKeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key text could not be parsed (or decrypted with the passphrase).
    #[error("parsing SSH private key from {origin}")]
    ParseKey {
        /// Where the key came from (a path or "base64").
        origin: String,
        /// The parser's error.
        #[source]
        source: russh::keys::Error,
    },
}

/// Raw credential settings, as given by flags or environment; turned into
/// [`Credentials`] by [`Credentials::load`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CredentialSource {
    /// The user name.
    pub user: Option<String>,
    /// Base64 of the private key's text (whitespace is ignored).
    pub private_key_base64: Option<String>,
    /// Path of a private key file.
    pub private_key_path: Option<PathBuf>,
    /// Passphrase of an encrypted private key.
    pub passphrase: Option<String>,
    /// Password for password authentication.
    pub password: Option<String>,
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSource")
            .field("user", &self.user)
            .field(
                "private_key_base64",
                &self.private_key_base64.as_ref().map(|_| "<redacted>"),
            )
            .field("private_key_path", &self.private_key_path)
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "<redacted>"),
            )
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl CredentialSource {
    /// Reads the `VZ_SSH_*` environment variables. Blank values count as unset.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Self::from_env`], with a custom variable lookup (for flags layered over
    /// env, and for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        Self {
            user: get(ENV_USER).map(|u| u.trim().to_owned()),
            private_key_base64: get(ENV_PRIVATE_KEY_BASE64),
            private_key_path: get(ENV_PRIVATE_KEY_PATH).map(PathBuf::from),
            passphrase: lookup(ENV_PRIVATE_KEY_PASSPHRASE).filter(|v| !v.is_empty()),
            password: lookup(ENV_PASSWORD).filter(|v| !v.is_empty()),
        }
    }
}

/// Validated credentials: a user plus a parsed key and/or a password. Cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    /// A key tried before `key` (the pod's own identity).
    first_key: Option<Arc<PrivateKey>>,
    key: Option<Arc<PrivateKey>>,
    password: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field(
                "first_key",
                &self.first_key.as_ref().map(|k| k.algorithm().to_string()),
            )
            .field("key", &self.key.as_ref().map(|k| k.algorithm().to_string()))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Credentials {
    /// Credentials with a parsed private key.
    pub fn with_key(user: impl Into<String>, key: PrivateKey) -> Self {
        Self {
            user: user.into(),
            first_key: None,
            key: Some(Arc::new(key)),
            password: None,
        }
    }

    /// Credentials with a password only.
    pub fn with_password(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            first_key: None,
            key: None,
            password: Some(password.into()),
        }
    }

    /// Adds a key tried before the others: a pod's own identity
    /// ([`crate::PodIdentity`]), which its guest knows when it took the pod's seed; the
    /// configured key and password remain for guests that did not.
    #[must_use]
    pub fn with_first_key(mut self, key: PrivateKey) -> Self {
        self.first_key = Some(Arc::new(key));
        self
    }

    /// Adds a password, tried after the key.
    #[must_use]
    pub fn and_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Validates a [`CredentialSource`]: reads and parses the key, decrypting it with
    /// the passphrase if it is encrypted.
    pub fn load(source: &CredentialSource) -> Result<Self, CredentialsError> {
        let user = source.user.clone().ok_or(CredentialsError::MissingUser)?;
        let passphrase = source.passphrase.as_deref();
        let key = if let Some(b64) = &source.private_key_base64 {
            let compact: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(CredentialsError::DecodeKeyBase64)?;
            let text = String::from_utf8(bytes).map_err(CredentialsError::KeyNotText)?;
            Some(parse_key(&text, passphrase, "base64")?)
        } else if let Some(path) = &source.private_key_path {
            let text =
                std::fs::read_to_string(path).map_err(|source| CredentialsError::ReadKeyFile {
                    path: path.clone(),
                    source,
                })?;
            Some(parse_key(&text, passphrase, &path.display().to_string())?)
        } else {
            None
        };
        if key.is_none() && source.password.is_none() {
            return Err(CredentialsError::MissingSecret);
        }
        Ok(Self {
            user,
            first_key: None,
            key: key.map(Arc::new),
            password: source.password.clone(),
        })
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The private keys, in the order they are tried.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &Arc<PrivateKey>> {
        self.first_key.iter().chain(self.key.iter())
    }

    /// The password, if any.
    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }
}

fn parse_key(
    text: &str,
    passphrase: Option<&str>,
    origin: &str,
) -> Result<PrivateKey, CredentialsError> {
    russh::keys::decode_secret_key(text, passphrase).map_err(|source| CredentialsError::ParseKey {
        origin: origin.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn source(vars: &[(&str, &str)]) -> CredentialSource {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CredentialSource::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn user_and_a_secret_are_required() {
        assert!(matches!(
            Credentials::load(&source(&[(ENV_PASSWORD, "pw")])),
            Err(CredentialsError::MissingUser)
        ));
        assert!(matches!(
            Credentials::load(&source(&[(ENV_USER, "admin"), (ENV_PASSWORD, "")])),
            Err(CredentialsError::MissingSecret)
        ));
        let c = match Credentials::load(&source(&[(ENV_USER, " admin "), (ENV_PASSWORD, "pw")])) {
            Ok(c) => c,
            Err(e) => panic!("password credentials rejected: {e}"),
        };
        assert_eq!(c.user(), "admin");
        assert_eq!(c.password(), Some("pw"));
        assert!(c.keys().next().is_none());
        assert!(
            !format!("{c:?}").contains("pw\""),
            "password leaked into Debug"
        );
    }

    #[test]
    fn bad_key_material_is_a_typed_error() {
        let e = Credentials::load(&source(&[
            (ENV_USER, "u"),
            (ENV_PRIVATE_KEY_BASE64, "!!!not base64!!!"),
        ]));
        assert!(
            matches!(e, Err(CredentialsError::DecodeKeyBase64(_))),
            "{e:?}"
        );
        // Valid base64 of text that is no key.
        let e = Credentials::load(&source(&[
            (ENV_USER, "u"),
            (ENV_PRIVATE_KEY_BASE64, "aGVsbG8="),
        ]));
        assert!(matches!(e, Err(CredentialsError::ParseKey { .. })), "{e:?}");
        let e = Credentials::load(&source(&[
            (ENV_USER, "u"),
            (ENV_PRIVATE_KEY_PATH, "/nonexistent/vzk-guest/key"),
        ]));
        assert!(
            matches!(e, Err(CredentialsError::ReadKeyFile { .. })),
            "{e:?}"
        );
    }
}
