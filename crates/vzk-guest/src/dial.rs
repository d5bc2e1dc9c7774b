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
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

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

/// The pause between the first TCP connect attempts of a dial ([`CONNECT_GAPS_EVEN`] of
/// them); each later pause is twice the one before, up to [`CONNECT_GAP_MAX`].
pub(crate) const CONNECT_GAP_FIRST: Duration = Duration::from_millis(25);
/// How many pauses are [`CONNECT_GAP_FIRST`] before they start doubling: the address
/// usually comes up within about 100 ms of the DHCP exchange, and a connect that lands
/// the moment after waits no longer than one short gap.
pub(crate) const CONNECT_GAPS_EVEN: usize = 4;
/// The longest pause between two connect attempts of one dial.
pub(crate) const CONNECT_GAP_MAX: Duration = Duration::from_millis(800);
/// How many connect attempts of one dial may be in flight at once.
pub(crate) const CONNECT_ATTEMPTS_MAX: usize = 12;

/// The pause after the `started`-th connect attempt (1-based) before the next one.
fn connect_gap(started: usize) -> Duration {
    let doublings = started.saturating_sub(CONNECT_GAPS_EVEN).min(16);
    (CONNECT_GAP_FIRST * (1u32 << doublings)).min(CONNECT_GAP_MAX)
}

/// The TCP connection a dial runs over, to a guest that may not hold its address yet.
///
/// The host learns a guest's address from the DHCP exchange, a moment before the guest's
/// DHCP client has put it on the NIC. A SYN sent in that moment is dropped without a
/// reply, and the kernel sends it again only after its initial retransmission timeout of
/// 1 s (then 3 s, 7 s …): every start paid that second. So while no attempt has answered,
/// a fresh attempt (a fresh SYN) starts every 25 ms for the first 100 ms, then after 50 ms,
/// 100 ms … (doubling, at most 800 ms apart and 12 in flight). The first connection wins
/// and the others are dropped; the first refusal or error ends the dial's connect (the caller retries).
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    connector: Option<&Connector>,
) -> std::io::Result<tokio::net::TcpStream> {
    let attempt =
        || -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> {
            match connector {
                Some(connect) => connect(addr),
                None => Box::pin(tokio::net::TcpStream::connect(addr)),
            }
        };
    let mut attempts = FuturesUnordered::new();
    attempts.push(attempt());
    let mut started = 1;
    let mut next = tokio::time::Instant::now() + connect_gap(started);
    loop {
        tokio::select! {
            Some(result) = attempts.next() => {
                if started > 1 {
                    debug!(%addr, started, ok = result.is_ok(), "TCP connect answered after fresh attempts");
                }
                return result;
            }
            () = tokio::time::sleep_until(next), if started < CONNECT_ATTEMPTS_MAX => {
                attempts.push(attempt());
                started += 1;
                next += connect_gap(started);
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
    let stream = connect_tcp(addr, connector)
        .await
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A connector whose first `drop_first` calls never answer (a dropped SYN) and whose
    /// later ones do what `then` says; it counts its calls.
    fn connector(
        drop_first: usize,
        then: impl Fn(
            SocketAddr,
        )
            -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>>
        + Send
        + Sync
        + 'static,
    ) -> (Connector, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let c: Connector = Arc::new(move |addr| {
            if seen.fetch_add(1, Ordering::SeqCst) < drop_first {
                Box::pin(futures::future::pending())
            } else {
                then(addr)
            }
        });
        (c, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_attempt_overtakes_a_dropped_syn() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (c, calls) = connector(1, |a| Box::pin(tokio::net::TcpStream::connect(a)));
        // Without a second attempt this waits for ever (the clock is paused and
        // advances to the timeout).
        let stream = tokio::time::timeout(Duration::from_secs(30), connect_tcp(addr, Some(&c)))
            .await
            .unwrap_or_else(|_| panic!("no attempt after the dropped one answered"))
            .unwrap_or_else(|e| panic!("{e}"));
        let (_, peer) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stream.local_addr().ok(), Some(peer));
        assert!(calls.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_ends_the_connect_without_more_attempts() {
        let (c, calls) = connector(0, |_| {
            Box::pin(async { Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) })
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], 22));
        let err = connect_tcp(addr, Some(&c))
            .await
            .err()
            .unwrap_or_else(|| panic!("a refused connect succeeded"));
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_guest_that_never_answers_gets_a_bounded_number_of_attempts() {
        let (c, calls) = connector(usize::MAX, |_| Box::pin(futures::future::pending()));
        let addr = SocketAddr::from(([127, 0, 0, 1], 22));
        let r = tokio::time::timeout(Duration::from_secs(60), connect_tcp(addr, Some(&c))).await;
        assert!(r.is_err(), "a connect nobody answered ended");
        assert_eq!(calls.load(Ordering::SeqCst), CONNECT_ATTEMPTS_MAX);
    }

    /// The attempts start 25 ms apart for the first 100 ms, then the gaps double up to
    /// 800 ms.
    #[tokio::test(start_paused = true)]
    async fn attempts_follow_the_schedule() {
        let t0 = tokio::time::Instant::now();
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = times.clone();
        let c: Connector = Arc::new(move |_| {
            if let Ok(mut t) = seen.lock() {
                t.push(t0.elapsed().as_millis());
            }
            Box::pin(futures::future::pending())
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], 22));
        let _ = tokio::time::timeout(Duration::from_secs(10), connect_tcp(addr, Some(&c))).await;
        let got = times.lock().map(|t| t.clone()).unwrap_or_default();
        assert_eq!(
            got,
            [0, 25, 50, 75, 100, 150, 250, 450, 850, 1650, 2450, 3250]
        );
    }
}
