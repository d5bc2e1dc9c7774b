//! [`HostedVm`]: the agent's [`Vm`] for a VM in a host process. State and address come
//! from the host's events (subscribed at attach); operations are requests; guest TCP
//! connections are opened directly ([`Vm::connect`]'s default).
//!
//! [`Vm::host_usage`] is synchronous, the host is not: it returns the last figures
//! fetched if they are at most 5 s old (else `None`), and, while it keeps being called, a
//! task refreshes them every 2 s (it stops 60 s after the last call). The figures are
//! also fetched when the proxy attaches.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::client::HostedError;
use super::connection::{Connection, RequestError, Sinks, peer_pid};
use super::files::VmFiles;
use super::protocol::{Answer, Op, WireUsage};
use crate::hypervisor::{HostUsage, Vm, VmError, VmState};
use crate::spec::VmSpec;

/// How often usage is refreshed while it is being read.
const USAGE_PERIOD: Duration = Duration::from_secs(2);
/// How long after the last read the refreshing stops.
const USAGE_IDLE: Duration = Duration::from_secs(60);
/// Figures older than this are not returned.
const USAGE_STALE: Duration = Duration::from_secs(5);
/// How long [`Vm::remove`] waits for the host to exit after its `done`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct UsageCache {
    /// The last figures and when they were fetched.
    value: Option<(Instant, HostUsage)>,
    wanted: Option<Instant>,
    refreshing: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why attaching to a host failed.
#[derive(Debug)]
pub(crate) enum AttachError {
    /// Nothing answers on the socket: the host is dead.
    Gone(HostedError),
    /// Something answers but not as a host should (hung, another protocol version);
    /// its pid when known.
    Unresponsive(HostedError, Option<u32>),
}

impl AttachError {
    pub(crate) fn into_error(self) -> HostedError {
        match self {
            Self::Gone(e) | Self::Unresponsive(e, _) => e,
        }
    }
}

/// A VM run by a host process.
#[derive(Debug)]
pub struct HostedVm {
    spec: VmSpec,
    files: VmFiles,
    conn: Option<Arc<Connection>>,
    sinks: Arc<Sinks>,
    console: Option<PathBuf>,
    usage: Arc<Mutex<UsageCache>>,
    removed: AtomicBool,
    /// A host that answers its socket but not the protocol: terminated on remove.
    stray_pid: Option<u32>,
}

impl HostedVm {
    /// Connects to the host of `spec` and subscribes to its state and address.
    pub(crate) async fn attach(spec: VmSpec, files: VmFiles) -> Result<Arc<Self>, AttachError> {
        let sinks = Sinks::new(files.clone());
        let conn = match Connection::open(&files.socket, sinks.clone()).await {
            Ok(c) => Arc::new(c),
            Err(e @ HostedError::Connect { .. }) => return Err(AttachError::Gone(e)),
            Err(e) => {
                let pid = match &e {
                    HostedError::Unresponsive { pid, .. } => *pid,
                    _ => None,
                };
                return Err(AttachError::Unresponsive(e, pid));
            }
        };
        let unresponsive = |why: String| {
            AttachError::Unresponsive(
                HostedError::Unresponsive {
                    socket: files.socket.clone(),
                    pid: Some(conn.pid),
                    why,
                },
                Some(conn.pid),
            )
        };
        match conn.request(Op::Subscribe).await {
            Ok(Answer::Subscribed { .. }) => {}
            Ok(other) => return Err(unresponsive(format!("subscribe answered with {other:?}"))),
            Err(RequestError::Remote(e)) => return Err(unresponsive(e.message)),
            Err(RequestError::Local(e)) => return Err(unresponsive(e.to_string())),
        }
        let console = match conn.request(Op::ConsolePath).await {
            Ok(Answer::ConsolePath { path }) => path,
            _ => spec.console_log.clone(),
        };
        let vm = Arc::new(Self {
            spec,
            files,
            conn: Some(conn),
            sinks,
            console,
            usage: Arc::default(),
            removed: AtomicBool::new(false),
            stray_pid: None,
        });
        vm.refresh_usage(false);
        Ok(vm)
    }

    /// A VM whose host is gone or unusable: `Failed { reason }`.
    pub(crate) fn dead(
        spec: VmSpec,
        files: VmFiles,
        reason: String,
        stray_pid: Option<u32>,
    ) -> Arc<Self> {
        let sinks = Sinks::new(files.clone());
        sinks.set_state(VmState::Failed { reason });
        Arc::new(Self {
            console: spec.console_log.clone(),
            spec,
            files,
            conn: None,
            sinks,
            usage: Arc::default(),
            removed: AtomicBool::new(false),
            stray_pid,
        })
    }

    /// Whether [`Vm::remove`] has completed.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The host's pid (`None` for a dead host).
    pub fn host_pid(&self) -> Option<u32> {
        self.conn.as_ref().map(|c| c.pid)
    }

    /// Starts a refresher task unless one runs; `wanted` marks a reader's demand.
    fn refresh_usage(&self, wanted: bool) {
        let Some(conn) = &self.conn else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut cache = lock(&self.usage);
        if wanted {
            cache.wanted = Some(Instant::now());
        }
        if cache.refreshing {
            return;
        }
        cache.refreshing = true;
        rt.spawn(refresh(Arc::downgrade(conn), self.usage.clone()));
    }

    async fn op(&self, op: Op) -> Result<(), VmError> {
        let id = self.spec.id.as_str();
        let state = self.sinks.state.borrow().clone();
        let conn = match &self.conn {
            Some(c) if !c.is_closed() => c,
            _ if state.is_final() => {
                return Err(VmError::InvalidState {
                    id: id.to_owned(),
                    operation: op.operation(),
                    state,
                });
            }
            _ => return Err(op_error(id, op, HostedError::Closed)),
        };
        match conn.request(op).await {
            Ok(Answer::Done) => Ok(()),
            Ok(other) => Err(op_error(
                id,
                op,
                HostedError::Unexpected {
                    op: op.name(),
                    got: format!("{other:?}"),
                },
            )),
            Err(RequestError::Remote(e)) => Err(e.into_vm_error(id, op)),
            Err(RequestError::Local(e)) => Err(op_error(id, op, e)),
        }
    }
}

fn op_error(id: &str, op: Op, e: HostedError) -> VmError {
    let id = id.to_owned();
    let source = Box::new(e);
    match op {
        Op::Start => VmError::Start { id, source },
        Op::RequestStop => VmError::RequestStop { id, source },
        Op::Remove => VmError::Remove { id, source },
        Op::SaveState => VmError::Snapshot {
            id,
            operation: "saving the state",
            source,
        },
        _ => VmError::ForceStop { id, source },
    }
}

fn combine(host: Option<WireUsage>, vm: Option<WireUsage>) -> Option<HostUsage> {
    if host.is_none() && vm.is_none() {
        return None;
    }
    let zero = WireUsage {
        cpu_ns: 0,
        rss_bytes: 0,
    };
    let (a, b) = (host.unwrap_or(zero), vm.unwrap_or(zero));
    Some(HostUsage {
        cpu_ns: a.cpu_ns.saturating_add(b.cpu_ns),
        rss_bytes: a.rss_bytes.saturating_add(b.rss_bytes),
    })
}

/// Fetches usage, then again every `USAGE_PERIOD` while it is wanted.
async fn refresh(conn: Weak<Connection>, cache: Arc<Mutex<UsageCache>>) {
    loop {
        let (value, closed) = match conn.upgrade() {
            Some(c) => {
                let value = match c.request(Op::Usage).await {
                    Ok(Answer::Usage { host, vm }) => combine(host, vm),
                    _ => None,
                };
                (value, c.is_closed())
            }
            None => (None, true),
        };
        let more = {
            let mut c = lock(&cache);
            c.value = value.map(|v| (Instant::now(), v));
            let more = !closed && c.wanted.is_some_and(|t| t.elapsed() < USAGE_IDLE);
            c.refreshing = more;
            more
        };
        if !more {
            return;
        }
        tokio::time::sleep(USAGE_PERIOD).await;
    }
}

/// Ends a host that answers its socket but not the protocol: SIGTERM, then SIGKILL
/// after 10 s; only while the socket's peer is still that pid (never a recycled one).
async fn terminate(socket: &std::path::Path, pid: u32) {
    use nix::sys::signal::{Signal, kill};
    if pid == std::process::id() {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else { return };
    let target = nix::unistd::Pid::from_raw(raw);
    let still_ours = || async {
        match UnixStream::connect(socket).await {
            Ok(s) => peer_pid(&s) == Some(pid),
            Err(_) => false,
        }
    };
    for (signal, wait) in [(Signal::SIGTERM, 100), (Signal::SIGKILL, 10)] {
        if !still_ours().await {
            return;
        }
        tracing::warn!(pid, ?signal, socket = %socket.display(), "ending an unresponsive VM host");
        let _ = kill(target, signal);
        for _ in 0..wait {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !still_ours().await {
                return;
            }
        }
    }
}

#[async_trait]
impl Vm for HostedVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn state(&self) -> watch::Receiver<VmState> {
        self.sinks.state.subscribe()
    }

    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
        self.sinks.ip.subscribe()
    }

    fn console_log(&self) -> Option<PathBuf> {
        self.console.clone()
    }

    async fn start(&self) -> Result<(), VmError> {
        self.op(Op::Start).await
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        self.op(Op::RequestStop).await
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        if self.sinks.state.borrow().is_final() {
            return Ok(());
        }
        self.op(Op::ForceStop).await
    }

    async fn save_state(&self) -> Result<(), VmError> {
        self.op(Op::SaveState).await
    }

    async fn remove(&self) -> Result<(), VmError> {
        let state = self.sinks.state.borrow().clone();
        if !state.is_final() {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "remove",
                state,
            });
        }
        match &self.conn {
            Some(conn) if !conn.is_closed() => {
                self.op(Op::Remove).await?;
                // The host removed its files before answering; it exits now.
                conn.wait_closed(EXIT_TIMEOUT).await;
            }
            _ => {
                if let Some(pid) = self.stray_pid {
                    terminate(&self.files.socket, pid).await;
                }
                self.files.remove_all();
            }
        }
        self.removed.store(true, Ordering::Release);
        Ok(())
    }

    fn host_usage(&self) -> Option<HostUsage> {
        if self.sinks.state.borrow().is_final() {
            return None;
        }
        self.refresh_usage(true);
        lock(&self.usage)
            .value
            .filter(|(at, _)| at.elapsed() < USAGE_STALE)
            .map(|(_, v)| v)
    }
}
