//! The VM host process: [`serve`] runs one VM of an in-process backend and answers the
//! [`protocol`](super::protocol) on `<dir>/<id>.sock` until the VM has been removed.
//!
//! Lifecycle:
//! 1. detach from whoever started it: a new session (`setsid`, so signals to the agent's
//!    process group or session do not reach it), stdin from `/dev/null`, stdout and
//!    stderr appended to `<dir>/<id>.log`;
//! 2. refuse if a host already answers on the socket; create the VM with the inner
//!    backend (on failure write `<id>.error.json` for the agent and return the error);
//! 3. bind the socket (0600), then write `<id>.state.json` (pid, socket, spec);
//! 4. serve any number of connections, each its own task: requests run concurrently and
//!    are answered by id; `subscribe` pushes state and address changes;
//! 5. after a successful `remove`: remove every file, reply, send subscribers the final
//!    values, close and return. SIGTERM or SIGINT force-stops and removes the VM the same
//!    way; SIGHUP is ignored.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;

use super::files::write_atomically;
use super::files::{CreateFailure, FilesError, StateFile, VmFiles};
use super::own_usage;
use super::protocol::{
    Answer, ErrorKind, Frame, MAX_FRAME, Op, Outcome, ServerMessage, VERSION, WireError, encode,
    parse_request, read_frame, write_line,
};
use crate::hypervisor::{Hypervisor, HypervisorError, Vm, VmError, wait_for_state};
use crate::spec::VmSpec;

/// How long one message may take to write before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long subscribers get to receive the final values when the host exits.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a SIGTERM waits for the VM to end after forcing it off.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a VM host could not run.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The VM's files cannot be named.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another host already answers on the VM's socket.
    #[error("a VM host for {id} already answers on {socket}")]
    AlreadyRunning {
        /// The VM id.
        id: String,
        /// The socket.
        socket: PathBuf,
    },
    /// The inner backend could not create the VM.
    #[error(transparent)]
    Create(HypervisorError),
    /// Starting a new session failed.
    #[error("detaching from the parent's session")]
    Detach(#[source] nix::Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers")]
    Signals(#[source] io::Error),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HostError + use<> {
    let path = path.to_owned();
    move |source| HostError::Io { what, path, source }
}

/// Runs VM `spec` with backend `hv` as a detached host process answering on
/// `<dir>/<id>.sock` (see the module docs). Returns once the VM has been removed; the
/// caller should then exit the process.
pub async fn serve(hv: Arc<dyn Hypervisor>, spec: VmSpec, dir: &Path) -> Result<(), HostError> {
    let files = VmFiles::new(dir, &spec.id)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("creating", dir))?;
    detach(&files.log)?;
    let signals = Signals::install()?;
    tracing::info!(vm.id = %spec.id, pid = std::process::id(), dir = %dir.display(), "VM host starting");
    let backend = hv.capabilities().backend;
    let result = run(hv, spec, &files, signals.wait()).await;
    if let Err(HostError::Create(e)) = &result {
        let failure = CreateFailure::from_error(e, backend);
        let written = serde_json::to_vec(&failure)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomically(&files.error, &bytes));
        if let Err(e) = written {
            tracing::warn!(path = %files.error.display(), error = %e, "cannot write the error file");
        }
    }
    result
}

/// A new session; stdio to the log file.
fn detach(log: &Path) -> Result<(), HostError> {
    match nix::unistd::setsid() {
        Ok(_) => {}
        // Already a process group leader (started by hand from a shell): keep the session.
        Err(nix::errno::Errno::EPERM) => {}
        Err(e) => return Err(HostError::Detach(e)),
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_error("opening", log))?;
    let null = File::open("/dev/null").map_err(io_error("opening", Path::new("/dev/null")))?;
    let redirect = |r: nix::Result<()>| {
        r.map_err(|e| io_error("redirecting stdio to", log)(io::Error::from(e)))
    };
    redirect(nix::unistd::dup2_stdin(&null))?;
    redirect(nix::unistd::dup2_stdout(&file))?;
    redirect(nix::unistd::dup2_stderr(&file))
}

/// SIGTERM and SIGINT end the host (after stopping the VM); SIGHUP is ignored.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, HostError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |k| signal(k).map_err(HostError::Signals);
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    async fn wait(mut self) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return tracing::info!("SIGTERM"),
                _ = self.int.recv() => return tracing::info!("SIGINT"),
                _ = self.hup.recv() => tracing::info!("SIGHUP ignored"),
            }
        }
    }
}

/// What every connection of the host shares.
struct Shared {
    vm: Arc<dyn Vm>,
    files: VmFiles,
    /// Set once the VM is removed: connections send their final values and end.
    closing: watch::Sender<bool>,
}

/// The host without the process-wide parts (detaching, signals): creates the VM, serves
/// until it is removed or `shutdown` completes (then force-stops and removes it).
pub(crate) async fn run(
    hv: Arc<dyn Hypervisor>,
    spec: VmSpec,
    files: &VmFiles,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HostError> {
    let id = spec.id.clone();
    if UnixStream::connect(&files.socket).await.is_ok() {
        return Err(HostError::AlreadyRunning {
            id,
            socket: files.socket.clone(),
        });
    }
    let backend = hv.capabilities().backend;
    let vm = hv.create(spec.clone()).await.map_err(HostError::Create)?;
    let _ = std::fs::remove_file(&files.socket);
    let listener = UnixListener::bind(&files.socket).map_err(io_error("binding", &files.socket))?;
    std::fs::set_permissions(&files.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("restricting", &files.socket))?;
    let state = StateFile {
        version: VERSION,
        pid: std::process::id(),
        socket: files.socket.clone(),
        spec,
        backend,
    };
    serde_json::to_vec_pretty(&state)
        .map_err(io::Error::other)
        .and_then(|bytes| write_atomically(&files.state, &bytes))
        .map_err(io_error("writing", &files.state))?;
    tracing::info!(vm.id = %id, socket = %files.socket.display(), "VM host ready");

    let shared = Arc::new(Shared {
        vm,
        files: files.clone(),
        closing: watch::Sender::new(false),
    });
    let mut closing = shared.closing.subscribe();
    let mut conns = JoinSet::new();
    let mut stopping = false;
    tokio::pin!(shutdown);
    loop {
        let mut backoff = false;
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    backoff = true;
                }
            },
            _ = closing.wait_for(|c| *c) => break,
            () = &mut shutdown, if !stopping => {
                stopping = true;
                tokio::spawn(stop_and_remove(shared.clone()));
            }
            Some(_) = conns.join_next() => {}
        }
        if backoff {
            // Out of file descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(listener);
    files.remove_all();
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    tracing::info!(vm.id = %id, "VM removed; VM host exiting");
    Ok(())
}

/// On a termination signal: force the VM off, remove it, and close.
async fn stop_and_remove(shared: Arc<Shared>) {
    let vm = shared.vm.as_ref();
    tracing::info!(vm.id = vm.id(), "stopping the VM before exiting");
    if let Err(e) = vm.force_stop().await {
        tracing::warn!(vm.id = vm.id(), error = %e, "force stop failed");
    }
    if let Err(e) = wait_for_state(vm, STOP_TIMEOUT, "power-off", |s| s.is_final()).await {
        tracing::warn!(vm.id = vm.id(), error = %e, "the VM did not end");
    }
    if let Err(e) = vm.remove().await {
        tracing::warn!(vm.id = vm.id(), error = %e, "removing the VM failed");
    }
    shared.closing.send_replace(true);
}

type Writer = Arc<Mutex<OwnedWriteHalf>>;

/// Writes one message; `false` when the connection is unusable.
async fn send(writer: &Writer, msg: &ServerMessage) -> bool {
    let line = encode(msg);
    let mut w = writer.lock().await;
    match tokio::time::timeout(WRITE_TIMEOUT, write_line(&mut *w, &line)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "writing to a client failed");
            false
        }
        Err(_) => {
            tracing::warn!("a client does not read; giving up on it");
            false
        }
    }
}

async fn reply(writer: &Writer, id: Option<u64>, result: Outcome) -> bool {
    send(writer, &ServerMessage::Reply { id, result }).await
}

/// Serves one client until it leaves or the host closes.
async fn connection(stream: UnixStream, shared: Arc<Shared>) {
    let (read, write) = stream.into_split();
    let writer: Writer = Arc::new(Mutex::new(write));
    let mut reader = BufReader::new(read);
    let mut closing = shared.closing.subscribe();
    let mut greeted = false;
    let mut events: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader, MAX_FRAME) => frame,
            _ = closing.wait_for(|c| *c) => break,
        };
        let line = match frame {
            Ok(Some(Frame::Line(line))) => line,
            Ok(Some(Frame::TooLong(len))) => {
                let e = WireError::new(
                    ErrorKind::Malformed,
                    format!("a {len}-byte frame exceeds the limit of {MAX_FRAME} bytes"),
                );
                reply(&writer, None, Outcome::Err(e)).await;
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "reading from a client failed");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (id, op) = match parse_request(&line) {
            Ok(request) => request,
            Err((id, e)) => {
                tracing::debug!(kind = ?e.kind, message = %e.message, "unreadable request");
                reply(&writer, id, Outcome::Err(e)).await;
                continue;
            }
        };
        match op {
            Op::Hello { version } if version != VERSION => {
                let e = WireError::new(
                    ErrorKind::Version,
                    format!("this VM host speaks protocol version {VERSION}, the client {version}"),
                );
                reply(&writer, Some(id), Outcome::Err(e)).await;
                break;
            }
            Op::Hello { .. } => {
                greeted = true;
                let hello = Answer::Hello {
                    version: VERSION,
                    vm_id: shared.vm.id().to_owned(),
                    pid: std::process::id(),
                };
                reply(&writer, Some(id), Outcome::Ok(hello)).await;
            }
            _ if !greeted => {
                let e = WireError::new(
                    ErrorKind::HelloRequired,
                    format!(
                        "send {{\"id\":0,\"op\":\"hello\",\"version\":{VERSION}}} before {:?}",
                        op.name()
                    ),
                );
                reply(&writer, Some(id), Outcome::Err(e)).await;
            }
            Op::Subscribe => {
                let mut state = shared.vm.state();
                let mut ip = shared.vm.ip_address();
                let now = Answer::Subscribed {
                    state: state.borrow_and_update().clone(),
                    ip: *ip.borrow_and_update(),
                };
                reply(&writer, Some(id), Outcome::Ok(now)).await;
                if events.is_none() {
                    let closing = shared.closing.subscribe();
                    events = Some(tokio::spawn(forward_events(
                        state,
                        ip,
                        writer.clone(),
                        closing,
                    )));
                }
            }
            op => {
                let (shared, writer) = (shared.clone(), writer.clone());
                tokio::spawn(async move {
                    let outcome = answer(op, &shared).await;
                    let removed = op == Op::Remove && matches!(outcome, Outcome::Ok(_));
                    reply(&writer, Some(id), outcome).await;
                    if removed {
                        shared.closing.send_replace(true);
                    }
                });
            }
        }
    }
    if let Some(task) = events {
        if *shared.closing.borrow() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, task).await;
        } else {
            task.abort();
        }
    }
}

/// Pushes state and address changes until the host closes (then the final values).
async fn forward_events(
    mut state: watch::Receiver<crate::VmState>,
    mut ip: watch::Receiver<Option<std::net::Ipv4Addr>>,
    writer: Writer,
    mut closing: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = state.borrow_and_update().clone();
                Some(ServerMessage::State { state: now })
            }
            changed = ip.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *ip.borrow_and_update();
                Some(ServerMessage::Ip { ip: now })
            }
            closed = closing.wait_for(|c| *c) => {
                drop(closed);
                None
            }
        };
        let Some(msg) = msg else {
            let last = state.borrow().clone();
            let addr = *ip.borrow();
            if send(&writer, &ServerMessage::State { state: last }).await {
                send(&writer, &ServerMessage::Ip { ip: addr }).await;
            }
            return;
        };
        if !send(&writer, &msg).await {
            return;
        }
    }
}

/// Runs one VM operation.
async fn answer(op: Op, shared: &Shared) -> Outcome {
    let vm = &shared.vm;
    let done = |r: Result<(), VmError>| match r {
        Ok(()) => Outcome::Ok(Answer::Done),
        Err(e) => {
            tracing::info!(vm.id = vm.id(), op = op.name(), error = %super::protocol::chain(&e), "operation failed");
            Outcome::Err(WireError::from_vm_error(&e))
        }
    };
    match op {
        Op::State => Outcome::Ok(Answer::State {
            state: vm.state().borrow().clone(),
        }),
        Op::Ip => Outcome::Ok(Answer::Ip {
            ip: *vm.ip_address().borrow(),
        }),
        Op::Start => {
            tracing::info!(vm.id = vm.id(), "start");
            done(vm.start().await)
        }
        Op::RequestStop => {
            tracing::info!(vm.id = vm.id(), "stop requested");
            done(vm.request_stop().await)
        }
        Op::ForceStop => {
            tracing::info!(vm.id = vm.id(), "force stop");
            done(vm.force_stop().await)
        }
        Op::SaveState => {
            tracing::info!(vm.id = vm.id(), "save state");
            done(vm.save_state().await)
        }
        Op::Remove => {
            let r = vm.remove().await;
            if r.is_ok() {
                tracing::info!(vm.id = vm.id(), "removed");
                shared.files.remove_all();
            }
            done(r)
        }
        Op::ConsolePath => Outcome::Ok(Answer::ConsolePath {
            path: vm.console_log(),
        }),
        Op::Usage => Outcome::Ok(Answer::Usage {
            host: own_usage().map(Into::into),
            vm: vm.host_usage().map(Into::into),
        }),
        Op::Hello { .. } | Op::Subscribe => Outcome::Err(WireError::new(
            ErrorKind::Malformed,
            "hello and subscribe are answered by the connection",
        )),
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
pub(crate) mod tests;
