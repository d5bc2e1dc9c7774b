//! Establishing one authenticated SSH connection to a guest: TCP connect, handshake
//! with host-key pinning, then authentication (public key first, then password).
//!
//! The whole dial is bounded by [`GuestConfig::dial_timeout`]; on timeout the
//! half-open connection is dropped (which closes the socket). The connection keeps
//! itself alive with `keepalive@openssh.com` requests and closes itself after
//! [`GuestConfig::keepalive_max`] unanswered ones, so a dead guest is noticed even
//! while idle.

use std::net::SocketAddr;
use std::sync::Arc;

use russh::client::{self, AuthResult, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tracing::debug;

use crate::config::GuestConfig;
use crate::credentials::Credentials;
use crate::hostkey::{HostKeyError, HostKeyStore};
use crate::session::Connector;

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Connect, handshake and authentication did not finish in time.
    #[error("SSH dial did not complete within {0:?}")]
    Timeout(std::time::Duration),
    /// The dial task was aborted ([`crate::GuestSession::close`]) or panicked.
    #[error("SSH dial aborted")]
    Aborted,
    /// TCP connect or the SSH handshake failed.
    #[error("SSH connect/handshake failed")]
    Handshake(#[source] russh::Error),
    /// The server's host key was not accepted.
    #[error("SSH host key verification failed")]
    HostKey(#[source] HostKeyError),
    /// The authentication exchange failed (transport error).
    #[error("SSH authentication exchange failed")]
    Auth(#[source] russh::Error),
    /// The server rejected every credential we have.
    #[error("SSH authentication rejected for user {user:?} (tried: {tried})")]
    AuthRejected {
        /// The user name.
        user: String,
        /// The methods tried, e.g. `publickey,password`.
        tried: String,
    },
}

impl DialError {
    /// Whether retrying cannot help without a configuration change (rejected
    /// credentials, a changed host key).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::AuthRejected { .. } | Self::HostKey(_))
    }
}

/// The russh callback object: checks the host key against the pin.
pub(crate) struct ClientHandler {
    hostkeys: HostKeyStore,
}

/// Error type of [`ClientHandler`]: a transport error or a rejected host key.
#[derive(Debug)]
pub(crate) enum HandlerError {
    Ssh(russh::Error),
    HostKey(HostKeyError),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        Self::Ssh(e)
    }
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.hostkeys
                    .verify_or_pin(key)
                    .map_err(HandlerError::HostKey)?;
                Ok(true)
            }
            PublicKeyOrCertificate::Certificate(_) => {
                Err(HandlerError::HostKey(HostKeyError::Certificate))
            }
        }
    }
}

/// An authenticated connection.
pub(crate) type Connection = Handle<ClientHandler>;

/// Connects, verifies the host key and authenticates, all within the dial timeout.
pub(crate) async fn dial(
    addr: SocketAddr,
    connector: Option<&Connector>,
    creds: &Credentials,
    hostkeys: &HostKeyStore,
    cfg: &GuestConfig,
) -> Result<Connection, DialError> {
    tokio::time::timeout(
        cfg.dial_timeout,
        dial_unbounded(addr, connector, creds, hostkeys, cfg),
    )
    .await
    .map_err(|_| DialError::Timeout(cfg.dial_timeout))?
}

async fn dial_unbounded(
    addr: SocketAddr,
    connector: Option<&Connector>,
    creds: &Credentials,
    hostkeys: &HostKeyStore,
    cfg: &GuestConfig,
) -> Result<Connection, DialError> {
    let config = client::Config {
        keepalive_interval: Some(cfg.keepalive_interval),
        keepalive_max: cfg.keepalive_max,
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    };
    let handler = ClientHandler {
        hostkeys: hostkeys.clone(),
    };
    let stream = match connector {
        Some(connect) => connect(addr).await,
        None => tokio::net::TcpStream::connect(addr).await,
    }
    .map_err(|e| DialError::Handshake(russh::Error::IO(e)))?;
    // What `client::connect` would do with `nodelay: true`.
    let _ = stream.set_nodelay(true);
    let mut handle = client::connect_stream(Arc::new(config), stream, handler)
        .await
        .map_err(|e| match e {
            HandlerError::Ssh(e) => DialError::Handshake(e),
            HandlerError::HostKey(e) => DialError::HostKey(e),
        })?;
    debug!(%addr, "SSH handshake done");

    let mut tried = Vec::new();
    for key in creds.keys() {
        if !tried.contains(&"publickey") {
            tried.push("publickey");
        }
        let hash = if key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(DialError::Auth)?
                .flatten()
        } else {
            None
        };
        let res = handle
            .authenticate_publickey(creds.user(), PrivateKeyWithHashAlg::new(key.clone(), hash))
            .await
            .map_err(DialError::Auth)?;
        if matches!(res, AuthResult::Success) {
            debug!(%addr, user = creds.user(), "SSH public-key authentication succeeded");
            return Ok(handle);
        }
    }
    if let Some(password) = creds.password() {
        tried.push("password");
        let res = handle
            .authenticate_password(creds.user(), password)
            .await
            .map_err(DialError::Auth)?;
        if matches!(res, AuthResult::Success) {
            debug!(%addr, user = creds.user(), "SSH password authentication succeeded");
            return Ok(handle);
        }
    }
    Err(DialError::AuthRejected {
        user: creds.user().to_owned(),
        tried: tried.join(","),
    })
}
