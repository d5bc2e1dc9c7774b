//! [`GuestSession`]: the one persistent SSH connection to one VM, shared by every
//! exec, attach, port-forward and probe aimed at that VM.
//!
//! # Guarantees
//! * **Lazy, single-flight dial.** The first operation dials; operations that arrive
//!   while a dial is in flight wait for that same dial (and share its result, error
//!   included) instead of opening connections of their own. The dial runs in its own
//!   task, so a caller that gives up does not abort it for the others.
//! * **Keepalive.** An idle connection sends `keepalive@openssh.com` every
//!   [`GuestConfig::keepalive_interval`] and closes itself after
//!   [`GuestConfig::keepalive_max`] missed replies.
//! * **Reconnect once.** If opening a channel fails because the transport is dead
//!   (or does not answer within the dial timeout), the connection is retired, a new
//!   one is dialled and the open is retried once. A channel the server *refuses*
//!   (e.g. `MaxSessions`, or a closed port for a forward) is returned as an error
//!   without re-dialling: the transport is fine.
//! * [`GuestSession::close`] is idempotent, aborts a dial in flight and disconnects.
//!
//! # Caveats
//! Operations already running on a connection that dies end with an error; they are
//! not resumed (a remote process cannot be re-attached over SSH).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use russh::client::Msg;
use russh::{Channel, ChannelOpenFailure};
use tokio::task::AbortHandle;
use tracing::{Instrument, debug, info, info_span, warn};
use vzk_core::streams::{AttachIo, ExitStatus, PortStream};

use crate::config::GuestConfig;
use crate::credentials::Credentials;
use crate::dial::{Connection, DialError, dial};
use crate::exec::{self, ExecError, Start};
use crate::hostkey::HostKeyStore;
use crate::quote;

/// An error of a guest operation.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Connecting to the guest failed.
    #[error("connecting to guest {addr} over SSH")]
    Dial {
        /// The guest's SSH address.
        addr: SocketAddr,
        /// Why (shared by all callers of the same dial).
        #[source]
        source: Arc<DialError>,
    },
    /// Opening a channel failed on a fresh connection too.
    #[error("opening an SSH channel to guest {addr}")]
    OpenChannel {
        /// The guest's SSH address.
        addr: SocketAddr,
        /// The transport error.
        #[source]
        source: Box<russh::Error>,
    },
    /// Opening a channel did not complete within the dial timeout, on a fresh
    /// connection too.
    #[error("opening an SSH channel to guest {addr} timed out after {after:?}")]
    OpenChannelTimeout {
        /// The guest's SSH address.
        addr: SocketAddr,
        /// The bound.
        after: Duration,
    },
    /// The guest refused to open the channel (e.g. session limit, or nothing
    /// listening on a forwarded port).
    #[error("guest {addr} refused the SSH channel: {reason:?}")]
    ChannelRefused {
        /// The guest's SSH address.
        addr: SocketAddr,
        /// The server's reason.
        reason: ChannelOpenFailure,
    },
    /// The command cannot be sent (empty argv, NUL byte, bad env name).
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// The exec or shell session failed.
    #[error("running a command in guest {addr}")]
    Exec {
        /// The guest's SSH address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: ExecError,
    },
    /// Copying a forwarded connection failed.
    #[error("forwarding to guest port {port}")]
    Forward {
        /// The guest TCP port.
        port: u16,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The readiness probe ran but exited non-zero.
    #[error("readiness probe exited with {0}")]
    ProbeFailed(i32),
    /// The guest did not become ready in time.
    #[error("guest not ready after {after:?}")]
    NotReady {
        /// The bound that expired.
        after: Duration,
        /// The last probe error.
        #[source]
        last: Box<GuestError>,
    },
    /// [`GuestSession::close`] was called.
    #[error("guest session closed")]
    Closed,
}

impl GuestError {
    /// Whether retrying cannot help without a configuration change (rejected
    /// credentials, a changed host key, an invalid command).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Dial { source, .. } => source.is_permanent(),
            Self::InvalidCommand(_) | Self::Closed => true,
            Self::NotReady { last, .. } => last.is_permanent(),
            _ => false,
        }
    }
}

type SharedDial = Shared<BoxFuture<'static, Result<Arc<Conn>, Arc<DialError>>>>;

/// One authenticated connection and its generation number.
pub(crate) struct Conn {
    generation: u64,
    handle: Connection,
}

enum State {
    Idle,
    Dialing {
        generation: u64,
        result: SharedDial,
        abort: AbortHandle,
    },
    Connected(Arc<Conn>),
    Closed,
}

struct Inner {
    addr: SocketAddr,
    creds: Credentials,
    hostkeys: HostKeyStore,
    config: GuestConfig,
    state: Mutex<State>,
    generations: AtomicU64,
    /// Opens the TCP connection each dial runs over; a plain connect if unset.
    connector: OnceLock<Connector>,
}

/// Opens the TCP connection to a guest address that an SSH dial runs over.
pub type Connector = Arc<
    dyn Fn(
            SocketAddr,
        ) -> futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>>
        + Send
        + Sync,
>;

/// The SSH access to one VM. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct GuestSession {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GuestSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSession")
            .field("addr", &self.inner.addr)
            .field("user", &self.inner.creds.user())
            .finish_non_exhaustive()
    }
}

/// Captured result of [`GuestSession::output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the command ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

impl GuestSession {
    /// A session for the guest at `addr` (normally `<vm-ip>:22`). Nothing is dialled
    /// until the first operation.
    pub fn new(
        addr: SocketAddr,
        creds: Credentials,
        hostkeys: HostKeyStore,
        config: GuestConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                addr,
                creds,
                hostkeys,
                config,
                state: Mutex::new(State::Idle),
                generations: AtomicU64::new(0),
                connector: OnceLock::new(),
            }),
        }
    }

    /// Like [`Self::new`] with the default config, and dials now, so bad credentials
    /// or a changed host key surface immediately.
    pub async fn connect(
        addr: SocketAddr,
        creds: Credentials,
        hostkeys: HostKeyStore,
    ) -> Result<Self, GuestError> {
        let session = Self::new(addr, creds, hostkeys, GuestConfig::default());
        session.connection().await?;
        Ok(session)
    }

    /// Makes every later dial open its TCP connection with `connector`, e.g. the VM
    /// handle's own connect, which reaches a guest in another network namespace.
    /// Only the first call has an effect.
    pub fn connect_with(&self, connector: Connector) {
        let _ = self.inner.connector.set(connector);
    }

    /// The guest's SSH address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// How many dials this session has started (1 for a healthy long-lived session;
    /// each reconnect adds one).
    pub fn dial_count(&self) -> u64 {
        self.inner.generations.load(Ordering::Relaxed)
    }

    /// Runs `argv` in the guest wired to `io` and returns its exit status.
    ///
    /// `argv[0]` is looked up in the guest's `PATH` by its login shell; the argv is
    /// passed intact (see [`crate::quote`]). A non-zero exit is `Ok`.
    pub async fn exec<S: AsRef<str>>(
        &self,
        argv: &[S],
        io: AttachIo,
    ) -> Result<ExitStatus, GuestError> {
        self.exec_with_env(argv, &[], io).await
    }

    /// [`Self::exec`] with environment variables exported first.
    pub async fn exec_with_env<S: AsRef<str>>(
        &self,
        argv: &[S],
        env: &[(String, String)],
        io: AttachIo,
    ) -> Result<ExitStatus, GuestError> {
        let cmd = self.command(argv, env)?;
        let span = info_span!("guest_exec", guest.addr = %self.inner.addr, argv0 = argv[0].as_ref(), tty = io.tty);
        self.run(Start::Exec(cmd), io, false).instrument(span).await
    }

    /// Starts the user's interactive login shell (the `attach` of a VM), with `env`
    /// exported first (written to the shell's input).
    pub async fn shell(
        &self,
        env: &[(String, String)],
        io: AttachIo,
    ) -> Result<ExitStatus, GuestError> {
        check_env(env)?;
        let mut preamble = String::new();
        for (name, value) in env {
            preamble.push_str(&format!("export {name}={}\n", quote::quote_word(value)));
        }
        let span = info_span!("guest_shell", guest.addr = %self.inner.addr, tty = io.tty);
        self.run(Start::Shell(preamble), io, false)
            .instrument(span)
            .await
    }

    /// Runs `argv` without stdin and captures stdout and stderr (each capped at
    /// 16 MiB; beyond that the command is cancelled and an error returned).
    ///
    /// Meant for the agent's own idempotent commands (probes, stats scripts): if the
    /// server drops the session before starting the command it is retried (up to 3
    /// attempts),
    /// which on dropbear can run it twice (see the crate docs).
    pub async fn output<S: AsRef<str>>(&self, argv: &[S]) -> Result<Output, GuestError> {
        let cmd = self.command(argv, &[])?;
        let (out, out_buf) = crate::capture::CaptureWriter::new(CAPTURE_LIMIT);
        let (err, err_buf) = crate::capture::CaptureWriter::new(CAPTURE_LIMIT);
        let io = AttachIo {
            stdin: None,
            stdout: Some(Box::pin(out)),
            stderr: Some(Box::pin(err)),
            tty: false,
            resize: None,
        };
        let span =
            info_span!("guest_output", guest.addr = %self.inner.addr, argv0 = argv[0].as_ref());
        let status = self
            .run(Start::Exec(cmd), io, true)
            .instrument(span)
            .await?;
        Ok(Output {
            status,
            stdout: out_buf.take(),
            stderr: err_buf.take(),
        })
    }

    /// Readiness check: connects (if needed) and runs `true`, bounded by the dial
    /// timeout plus 10 s. `true` only if it exited 0.
    pub async fn ready(&self) -> bool {
        match self.probe().await {
            Ok(()) => true,
            Err(e) => {
                debug!(guest.addr = %self.inner.addr, error = %ErrorChain(&e), "guest not ready");
                false
            }
        }
    }

    /// Polls [`Self::ready`] every 250 ms until it succeeds or `timeout` expires.
    /// Stops early on a permanent error (rejected credentials, changed host key).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), GuestError> {
        self.poll(timeout, || self.probe()).await
    }

    /// Dials now unless connected, polling every 250 ms while the guest does not answer,
    /// until `timeout`; like [`Self::wait_ready`] but without running a command. Stops
    /// early on a permanent error (rejected credentials, a changed host key).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), GuestError> {
        self.poll(timeout, || async { self.connection().await.map(|_| ()) })
            .await
    }

    /// Runs `attempt` every 250 ms until it succeeds, fails permanently or `timeout`
    /// expires (then [`GuestError::NotReady`] with the last error).
    async fn poll<F, Fut>(&self, timeout: Duration, mut attempt: F) -> Result<(), GuestError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), GuestError>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let err = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if e.is_permanent() => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => GuestError::ProbeFailed(-1),
            };
            if tokio::time::Instant::now() + READY_POLL >= deadline {
                return Err(GuestError::NotReady {
                    after: timeout,
                    last: Box::new(err),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Forwards one connection to TCP `port` on the guest's loopback through the SSH
    /// connection (`direct-tcpip`), copying both ways until both sides are done.
    /// Returns the bytes copied (to the guest, from the guest).
    pub async fn forward_tcp(
        &self,
        port: u16,
        mut stream: PortStream,
    ) -> Result<(u64, u64), GuestError> {
        let channel = self
            .open_channel(move |conn| async move {
                conn.handle
                    .channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 0)
                    .await
            })
            .await?;
        let mut remote = channel.into_stream();
        let copied = tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut remote,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await
        .map_err(|source| GuestError::Forward { port, source })?;
        debug!(guest.addr = %self.inner.addr, port, to_guest = copied.0, from_guest = copied.1, "port forward done");
        Ok(copied)
    }

    /// A session with other credentials and another host-key pin that takes over this
    /// session's live connection, so the guest is not dialled again: its later dials
    /// (after that connection ends) use `creds` and `hostkeys`. Meant for a guest whose
    /// keys were just changed over this connection (a VM restored from a template,
    /// reached with the template's key, made the pod's own). This session is closed; a
    /// dial it had in flight is aborted (the new session dials afresh when used).
    pub fn hand_over(&self, creds: Credentials, hostkeys: HostKeyStore) -> GuestSession {
        let old = {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *st, State::Closed)
        };
        let state = match old {
            State::Connected(conn) if !conn.handle.is_closed() => State::Connected(conn),
            State::Connected(conn) => {
                spawn_disconnect(conn);
                State::Idle
            }
            State::Dialing { abort, .. } => {
                abort.abort();
                State::Idle
            }
            State::Idle | State::Closed => State::Idle,
        };
        let connector = OnceLock::new();
        if let Some(c) = self.inner.connector.get() {
            let _ = connector.set(c.clone());
        }
        GuestSession {
            inner: Arc::new(Inner {
                addr: self.inner.addr,
                creds,
                hostkeys,
                config: self.inner.config.clone(),
                state: Mutex::new(state),
                generations: AtomicU64::new(self.inner.generations.load(Ordering::Relaxed)),
                connector,
            }),
        }
    }

    /// Closes the session: aborts a dial in flight, disconnects, and fails every
    /// later operation with [`GuestError::Closed`]. Idempotent.
    pub fn close(&self) {
        let old = {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *st, State::Closed)
        };
        match old {
            State::Dialing { abort, .. } => abort.abort(),
            State::Connected(conn) => spawn_disconnect(conn),
            State::Idle | State::Closed => {}
        }
    }

    /// Validates `argv`/`env` and builds the exec request string.
    fn command<S: AsRef<str>>(
        &self,
        argv: &[S],
        env: &[(String, String)],
    ) -> Result<String, GuestError> {
        if argv.is_empty() {
            return Err(GuestError::InvalidCommand("empty argv".into()));
        }
        if argv.iter().any(|a| a.as_ref().contains('\0')) {
            return Err(GuestError::InvalidCommand(
                "argv contains a NUL byte".into(),
            ));
        }
        check_env(env)?;
        Ok(quote::exec_command(argv, env))
    }

    async fn probe(&self) -> Result<(), GuestError> {
        let bound = self.inner.config.dial_timeout + Duration::from_secs(10);
        match tokio::time::timeout(bound, self.output(&["true"])).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(GuestError::ProbeFailed(out.status.code)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(GuestError::NotReady {
                after: bound,
                last: Box::new(GuestError::ProbeFailed(-1)),
            }),
        }
    }

    /// Opens a session channel, starts `start` and pumps `io` until it exits.
    ///
    /// With `retry_unstarted`, a channel the server closes before accepting the
    /// request is retried on a new channel (up to 3 attempts, 20/40 ms apart). dropbear (2022.83) closes every
    /// session channel that has not started its command yet whenever *any* child of
    /// the connection exits; our request may already be on its way then, and dropbear
    /// runs it anyway with its output discarded. A retry can therefore run the
    /// command twice, so only idempotent internal commands ([`Self::output`]) retry;
    /// user execs report [`ExecError::ClosedBeforeStart`].
    async fn run(
        &self,
        start: Start,
        mut io: AttachIo,
        retry_unstarted: bool,
    ) -> Result<ExitStatus, GuestError> {
        let addr = self.inner.addr;
        let cfg = &self.inner.config;
        let pty = if io.tty {
            Some(exec::initial_size(io.resize.as_mut(), cfg).await)
        } else {
            None
        };
        let mut attempt: u64 = 0;
        let started = loop {
            attempt += 1;
            let channel = self
                .open_channel(|conn| async move { conn.handle.channel_open_session().await })
                .await?;
            match exec::start(channel, &start, pty, cfg).await {
                Ok(started) => break started,
                Err(ExecError::ClosedBeforeStart)
                    if retry_unstarted && attempt < UNSTARTED_ATTEMPTS =>
                {
                    warn!(guest.addr = %addr, attempt, "guest closed the session before starting the command; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(source) => return Err(GuestError::Exec { addr, source }),
            }
        };
        let status = exec::pump(started, io)
            .await
            .map_err(|source| GuestError::Exec { addr, source })?;
        debug!(code = status.code, "guest command exited");
        Ok(status)
    }

    /// Opens a channel with `open`, re-dialling once if the transport is dead.
    async fn open_channel<F, Fut>(&self, open: F) -> Result<Channel<Msg>, GuestError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<Channel<Msg>, russh::Error>>,
    {
        let addr = self.inner.addr;
        let bound = self.inner.config.dial_timeout;
        let conn = self.connection().await?;
        let generation = conn.generation;
        match tokio::time::timeout(bound, open(conn)).await {
            Ok(Ok(ch)) => return Ok(ch),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                return Err(GuestError::ChannelRefused { addr, reason });
            }
            Ok(Err(e)) => {
                warn!(guest.addr = %addr, error = %e, "SSH connection dead; reconnecting once");
            }
            Err(_) => {
                warn!(guest.addr = %addr, ?bound, "SSH channel open timed out; reconnecting once");
            }
        }
        self.retire(generation);
        let conn = self.connection().await?;
        match tokio::time::timeout(bound, open(conn)).await {
            Ok(Ok(ch)) => Ok(ch),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                Err(GuestError::ChannelRefused { addr, reason })
            }
            Ok(Err(e)) => Err(GuestError::OpenChannel {
                addr,
                source: Box::new(e),
            }),
            Err(_) => Err(GuestError::OpenChannelTimeout { addr, after: bound }),
        }
    }

    /// The live connection, dialling (single-flight) if there is none.
    async fn connection(&self) -> Result<Arc<Conn>, GuestError> {
        let dial = {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            match &*st {
                State::Closed => return Err(GuestError::Closed),
                State::Connected(c) if !c.handle.is_closed() => return Ok(c.clone()),
                State::Dialing { result, .. } => result.clone(),
                State::Idle | State::Connected(_) => self.start_dial(&mut st),
            }
        };
        dial.await.map_err(|source| GuestError::Dial {
            addr: self.inner.addr,
            source,
        })
    }

    /// Starts a dial task and records it as the one in flight.
    fn start_dial(&self, st: &mut State) -> SharedDial {
        let inner = &self.inner;
        let generation = inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let (addr, creds, hostkeys, config, connector) = (
            inner.addr,
            inner.creds.clone(),
            inner.hostkeys.clone(),
            inner.config.clone(),
            inner.connector.get().cloned(),
        );
        info!(guest.addr = %addr, generation, "dialling guest over SSH");
        let fut = async move { dial(addr, connector.as_ref(), &creds, &hostkeys, &config).await }
            .instrument(info_span!("guest_dial", guest.addr = %addr, generation));
        let task = tokio::spawn(fut);
        let abort = task.abort_handle();
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let result = async move {
            let res = match task.await {
                Ok(Ok(handle)) => Ok(Arc::new(Conn { generation, handle })),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(_) => Err(Arc::new(DialError::Aborted)),
            };
            if let Err(e) = &res {
                warn!(guest.addr = %addr, generation, error = %ErrorChain(e.as_ref()), "SSH dial failed");
            }
            if let Some(inner) = weak.upgrade() {
                let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                if matches!(&*st, State::Dialing { generation: g, .. } if *g == generation) {
                    *st = match &res {
                        Ok(conn) => State::Connected(conn.clone()),
                        Err(_) => State::Idle,
                    };
                }
            }
            res
        }
        .boxed()
        .shared();
        *st = State::Dialing {
            generation,
            result: result.clone(),
            abort,
        };
        result
    }

    /// Drops the connection of `generation` if it is still the current one.
    fn retire(&self, generation: u64) {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(&*st, State::Connected(c) if c.generation == generation)
            && let State::Connected(conn) = std::mem::replace(&mut *st, State::Idle)
        {
            spawn_disconnect(conn);
        }
    }
}

const CAPTURE_LIMIT: usize = 16 << 20;
/// Buffer of the copies into SSH channels (exec stdin, port-forward): large enough that
/// every write fills a whole SSH packet (the peer's maximum, 32 KiB for OpenSSH).
pub(crate) const COPY_BUFFER: usize = 64 * 1024;
/// Attempts of an idempotent command whose session the server drops unstarted.
const UNSTARTED_ATTEMPTS: u64 = 3;
const READY_POLL: Duration = Duration::from_millis(250);

fn check_env(env: &[(String, String)]) -> Result<(), GuestError> {
    for (name, value) in env {
        if !quote::is_env_name(name) {
            return Err(GuestError::InvalidCommand(format!(
                "invalid env var name {name:?}"
            )));
        }
        if value.contains('\0') {
            return Err(GuestError::InvalidCommand(format!(
                "env var {name} contains a NUL byte"
            )));
        }
    }
    Ok(())
}

fn spawn_disconnect(conn: Arc<Conn>) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let _ = conn
                .handle
                .disconnect(russh::Disconnect::ByApplication, "vz-kubelet closing", "en")
                .await;
        });
    }
}

pub use vzk_core::ErrorChain;
