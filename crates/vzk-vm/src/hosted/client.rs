//! [`Hosted`]: the agent's [`Hypervisor`] whose VMs each run in a host process (see the
//! [module docs](super)). The wrapped in-process backend supplies the capabilities (with
//! `vms_outlive_agent` set) and the health check; it never creates a VM in the agent.
//!
//! [`Hypervisor::create`] checks the spec against the capabilities, writes
//! `<id>.spec.json`, spawns the [`Launcher`]'s program with `--dir D --spec FILE` (stdin
//! `/dev/null`, stdout and stderr to `<id>.log`), and waits for the host's state file and
//! hello, or for its exit (its `<id>.error.json` then becomes the error). The child is
//! reaped by a task; it detaches itself (new session), so the agent's death leaves it
//! running.
//!
//! [`Hypervisor::adopt_existing`] reads every `<id>.state.json` in `D` and attaches to
//! the host answering on its socket. A host that is gone (nothing listens) gives a VM in
//! state `Failed` (reason: its pid, why, the last line of its log) and its files are
//! removed. A host that listens but does not speak this protocol (hung, or another
//! version) gives a `Failed` VM too; its files stay until [`Vm::remove`], which ends
//! that host first (SIGTERM, then SIGKILL, only while the socket's peer is that pid).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use super::files::write_atomically;
use super::files::{CreateFailure, StateFile, VmFiles};
use super::protocol::chain;
use super::proxy::{AttachError, HostedVm};
use crate::hypervisor::{Capabilities, Hypervisor, HypervisorError, Vm};
use crate::spec::VmSpec;

/// Errors talking to, or starting, a VM host.
#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    /// Nothing listens on the host's socket.
    #[error("connecting to the VM host socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something listens but does not complete the protocol.
    #[error("the VM host on {socket} (pid {pid:?}) does not answer as one: {why}")]
    Unresponsive {
        /// The socket.
        socket: PathBuf,
        /// The peer's pid, when known.
        pid: Option<u32>,
        /// What went wrong.
        why: String,
    },
    /// The connection is closed (the host exited).
    #[error("the connection to the VM host is closed")]
    Closed,
    /// No answer in time.
    #[error("the VM host did not answer {op} within {after:?}")]
    Timeout {
        /// The op.
        op: &'static str,
        /// The budget.
        after: Duration,
    },
    /// An answer of the wrong kind.
    #[error("the VM host answered {op} with {got}")]
    Unexpected {
        /// The op.
        op: &'static str,
        /// What came.
        got: String,
    },
    /// Writing a request failed.
    #[error("writing to the VM host")]
    Write(#[source] io::Error),
    /// A file operation failed.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The host process could not be spawned.
    #[error("spawning the VM host {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The host process exited before answering, without an error file.
    #[error("the VM host process exited ({status}) before answering{log}")]
    Exited {
        /// How it exited.
        status: String,
        /// `; its log ends: …`, or empty.
        log: String,
    },
    /// The host process did not answer in time (it was killed).
    #[error("the VM host process did not answer within {after:?}")]
    StartTimeout {
        /// The budget.
        after: Duration,
    },
}

/// How host processes are started: `<program> <args…> --dir D --spec FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launcher {
    /// The program.
    pub program: PathBuf,
    /// Arguments before `--dir` (e.g. `vm host` and backend flags).
    pub args: Vec<OsString>,
}

impl Launcher {
    /// `program` with `args`.
    pub fn new<I, A>(program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// This very executable with `args` (normally `vm host` and the backend's flags).
    pub fn current_exe<I, A>(args: I) -> io::Result<Self>
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        Ok(Self::new(std::env::current_exe()?, args))
    }

    fn command(&self, dir: &Path, spec: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .arg("--dir")
            .arg(dir)
            .arg("--spec")
            .arg(spec)
            .kill_on_drop(false);
        cmd
    }
}

/// The default time a host has to create its VM and answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A backend whose VMs each run in a host process (see the module docs).
pub struct Hosted {
    inner: Arc<dyn Hypervisor>,
    caps: Capabilities,
    dir: PathBuf,
    launcher: Launcher,
    known: Mutex<HashMap<String, Weak<HostedVm>>>,
    start_timeout: Duration,
}

impl std::fmt::Debug for Hosted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hosted")
            .field("backend", &self.caps.backend)
            .field("dir", &self.dir)
            .field("launcher", &self.launcher)
            .finish_non_exhaustive()
    }
}

impl Hosted {
    /// Hosts VMs of `inner`'s kind in `dir` (created, mode 0700), starting host processes
    /// with `launcher`.
    pub fn new(
        inner: Arc<dyn Hypervisor>,
        dir: impl Into<PathBuf>,
        launcher: Launcher,
    ) -> Result<Self, HypervisorError> {
        let dir = dir.into();
        let mut caps = inner.capabilities().clone();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| HypervisorError::Unavailable {
                backend: caps.backend,
                detail: format!("cannot create the VM host directory {}: {e}", dir.display()),
            })?;
        caps.vms_outlive_agent = true;
        Ok(Self {
            inner,
            caps,
            dir,
            launcher,
            known: Mutex::new(HashMap::new()),
            start_timeout: START_TIMEOUT,
        })
    }

    /// How long a new host has to create its VM and answer (default 60 s).
    pub fn with_start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// The hosts directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn known(&self, id: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .and_then(Weak::upgrade)
            .is_some_and(|vm| !vm.is_removed())
    }

    fn remember(&self, vm: &Arc<HostedVm>) {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(vm.id().to_owned(), Arc::downgrade(vm));
    }

    /// The error for a host that exited while being waited for.
    fn exited(&self, id: &str, files: &VmFiles, status: String) -> HypervisorError {
        let failure = std::fs::read(&files.error)
            .ok()
            .and_then(|b| serde_json::from_slice::<CreateFailure>(&b).ok());
        let err = match failure {
            Some(f) => f.into_error(id),
            None => HypervisorError::Create {
                id: id.to_owned(),
                source: Box::new(HostedError::Exited {
                    status,
                    log: files
                        .log_tail()
                        .map(|l| format!("; its log ends: {l}"))
                        .unwrap_or_default(),
                }),
            },
        };
        files.remove_all();
        err
    }

    /// Attaches to the host of one state file, or describes why it is dead.
    async fn adopt_one(&self, files: VmFiles) -> Option<Arc<HostedVm>> {
        let state: StateFile = match std::fs::read(&files.state).map(|b| serde_json::from_slice(&b))
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(path = %files.state.display(), error = %e, "unreadable VM host state file; skipped");
                return None;
            }
            Err(e) => {
                tracing::warn!(path = %files.state.display(), error = %e, "cannot read a VM host state file; skipped");
                return None;
            }
        };
        let spec = state.spec;
        if VmFiles::new(&self.dir, &spec.id).ok().as_ref() != Some(&files) {
            tracing::warn!(path = %files.state.display(), vm.id = %spec.id, "VM host state file names another VM; skipped");
            return None;
        }
        match HostedVm::attach(spec.clone(), files.clone()).await {
            Ok(vm) => {
                tracing::info!(vm.id = %spec.id, host.pid = ?vm.host_pid(), state = ?*vm.state().borrow(), "re-attached to a VM host");
                Some(vm)
            }
            Err(AttachError::Gone(e)) => {
                let tail = files
                    .log_tail()
                    .map(|l| format!("; its log ends: {l}"))
                    .unwrap_or_default();
                let reason = format!(
                    "the VM host process (pid {}) is gone ({}){tail}",
                    state.pid,
                    chain(&e)
                );
                tracing::warn!(vm.id = %spec.id, %reason, "VM host gone; removing its files");
                files.remove_all();
                Some(HostedVm::dead(spec, files, reason, None))
            }
            Err(AttachError::Unresponsive(e, pid)) => {
                let reason = chain(&e);
                tracing::warn!(vm.id = %spec.id, %reason, "VM host unusable");
                Some(HostedVm::dead(spec, files, reason, pid))
            }
        }
    }
}

#[async_trait]
impl Hypervisor for Hosted {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.caps.check(&spec)?;
        let id = spec.id.clone();
        let files = VmFiles::new(&self.dir, &id).map_err(|e| HypervisorError::InvalidSpec {
            id: id.clone(),
            message: e.to_string(),
        })?;
        if self.known(&id) || UnixStream::connect(&files.socket).await.is_ok() {
            return Err(HypervisorError::AlreadyExists { id });
        }
        // Whatever is left is a dead host's.
        files.remove_all();
        let fail = |e: HostedError| HypervisorError::Create {
            id: id.clone(),
            source: Box::new(e),
        };
        let file_error = |what, path: &Path| {
            let path = path.to_owned();
            move |source| HostedError::File { what, path, source }
        };
        let json = serde_json::to_vec_pretty(&spec).map_err(io::Error::other);
        json.and_then(|bytes| write_atomically(&files.spec, &bytes))
            .map_err(file_error("writing", &files.spec))
            .map_err(fail)?;
        let log = std::fs::File::create(&files.log)
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(file_error("creating", &files.log))
            .map_err(fail)?;
        let mut child = self
            .launcher
            .command(&self.dir, &files.spec)
            .stdin(Stdio::null())
            .stdout(log.0)
            .stderr(log.1)
            .spawn()
            .map_err(|source| {
                files.remove_all();
                fail(HostedError::Spawn {
                    program: self.launcher.program.clone(),
                    source,
                })
            })?;
        let pid = child.id();
        tracing::info!(vm.id = %id, host.pid = ?pid, "VM host process started");
        let (exit_tx, mut exit_rx) = oneshot::channel();
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::debug!(host.pid = ?pid, ?status, "VM host process reaped");
            let _ = exit_tx.send(status);
        });
        let kill = || {
            if let Some(raw) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        };
        let deadline = Instant::now() + self.start_timeout;
        let mut delay = Duration::from_millis(5);
        loop {
            // The host writes its state file once its socket is bound.
            if files.state.exists() {
                return match HostedVm::attach(spec, files.clone()).await {
                    Ok(vm) => {
                        self.remember(&vm);
                        Ok(vm)
                    }
                    Err(e) => {
                        kill();
                        files.remove_all();
                        Err(fail(e.into_error()))
                    }
                };
            }
            tokio::select! {
                status = &mut exit_rx => {
                    let status = match status {
                        Ok(Ok(s)) => s.to_string(),
                        Ok(Err(e)) => format!("unknown status: {e}"),
                        Err(_) => "unknown status".to_owned(),
                    };
                    return Err(self.exited(&id, &files, status));
                }
                () = tokio::time::sleep(delay) => {}
            }
            if Instant::now() > deadline {
                kill();
                files.remove_all();
                return Err(fail(HostedError::StartTimeout {
                    after: self.start_timeout,
                }));
            }
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(HypervisorError::Adopt {
                    source: Box::new(e),
                });
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut out: Vec<Arc<dyn Vm>> = Vec::new();
        for name in names {
            let Some(id) = VmFiles::id_of_state_file(&name) else {
                continue;
            };
            if self.known(id) {
                continue;
            }
            let Ok(files) = VmFiles::new(&self.dir, id) else {
                continue;
            };
            if let Some(vm) = self.adopt_one(files).await {
                self.remember(&vm);
                out.push(vm);
            }
        }
        Ok(out)
    }

    async fn health(&self) -> Result<(), String> {
        self.inner.health().await
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
