//! The test double of the provider: "containers" are local processes. exec spawns the
//! command (with a real PTY for `tty`), attach spawns a `cat`-like main process,
//! port-forward connects to `127.0.0.1:<port>`, logs come from an in-memory journal
//! the test appends to.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use vzk_core::stats::PodStats;
use vzk_core::streams::{
    AttachIo, BoxReader, BoxWriter, ContainerRef, ExitStatus, LogOptions, LogStream, PortStream,
};
use vzk_core::{PodKey, ProviderError, StreamingRuntime};

type Journal = HashMap<String, Vec<(DateTime<Utc>, String)>>;

/// Local-process provider double.
pub(crate) struct ProcessRuntime {
    journal: Arc<Mutex<Journal>>,
    bump: watch::Sender<u64>,
    pub(crate) stats: Mutex<Vec<PodStats>>,
}

impl ProcessRuntime {
    pub(crate) fn new() -> Self {
        Self {
            journal: Arc::new(Mutex::new(HashMap::new())),
            bump: watch::channel(0).0,
            stats: Mutex::new(Vec::new()),
        }
    }

    /// Appends a log line to `container` with timestamp `at`.
    pub(crate) fn log_at(&self, container: &str, at: DateTime<Utc>, line: &str) {
        if let Ok(mut j) = self.journal.lock() {
            j.entry(container.to_owned())
                .or_default()
                .push((at, line.to_owned()));
        }
        self.bump.send_modify(|n| *n += 1);
    }

    pub(crate) fn log(&self, container: &str, line: &str) {
        self.log_at(container, Utc::now(), line);
    }

    fn lines(&self, container: &str) -> Vec<(DateTime<Utc>, String)> {
        self.journal
            .lock()
            .map(|j| j.get(container).cloned().unwrap_or_default())
            .unwrap_or_default()
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::failed("TestDouble", format!("{what}: {e}"))
}

fn format_line(opts: &LogOptions, t: DateTime<Utc>, l: &str) -> Bytes {
    if opts.timestamps {
        Bytes::from(format!(
            "{} {l}\n",
            t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        ))
    } else {
        Bytes::from(format!("{l}\n"))
    }
}

/// Copy buffers, as large as vzk-guest's (exec stdin, port-forward).
const COPY_BUFFER: usize = 64 * 1024;

async fn copy_out(mut r: impl tokio::io::AsyncRead + Unpin, mut w: BoxWriter) {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

async fn copy_in(r: BoxReader, mut w: impl tokio::io::AsyncWrite + Unpin) {
    let mut r = tokio::io::BufReader::with_capacity(COPY_BUFFER, r);
    let _ = tokio::io::copy_buf(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

fn exit_of(s: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus {
        code: s
            .code()
            .or_else(|| s.signal().map(|n| 128 + n))
            .unwrap_or(255),
    }
}

async fn run_piped(command: Vec<String>, io: AttachIo) -> Result<ExitStatus, ProviderError> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| ProviderError::invalid("NoCommand", "empty"))?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(if io.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if io.stdout.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(if io.stderr.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| ProviderError::NotFound(format!("{prog}: {e}")))?;
    let stdin_task = match (io.stdin, child.stdin.take()) {
        (Some(r), Some(w)) => Some(tokio::spawn(copy_in(r, w))),
        _ => None,
    };
    let mut outs = Vec::new();
    if let (Some(w), Some(r)) = (io.stdout, child.stdout.take()) {
        outs.push(tokio::spawn(copy_out(r, w)));
    }
    if let (Some(w), Some(r)) = (io.stderr, child.stderr.take()) {
        outs.push(tokio::spawn(copy_out(r, w)));
    }
    let status = child.wait().await.map_err(|e| failed("wait", e))?;
    for o in outs {
        let _ = o.await;
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    Ok(exit_of(status))
}

async fn run_tty(command: Vec<String>, io: AttachIo) -> Result<ExitStatus, ProviderError> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| ProviderError::invalid("NoCommand", "empty"))?;
    let pty = nix::pty::openpty(None, None).map_err(|e| failed("openpty", e))?;
    let slave_path = nix::unistd::ttyname(&pty.slave).map_err(|e| failed("ttyname", e))?;
    let clone = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(|e| failed("dup", e));
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::from(clone(&pty.slave)?))
        .stdout(Stdio::from(clone(&pty.slave)?))
        .stderr(Stdio::from(clone(&pty.slave)?))
        .kill_on_drop(true);
    let mut resize = io.resize;
    let slave_for_resize = slave_path.clone();
    let resizer = tokio::spawn(async move {
        while let Some(r) = match resize.as_mut() {
            Some(rx) => rx.recv().await,
            None => None,
        } {
            let _ = tokio::process::Command::new("stty")
                .arg("-F")
                .arg(&slave_for_resize)
                .args(["rows", &r.height.to_string(), "cols", &r.width.to_string()])
                .status()
                .await;
        }
    });
    // Let the initial size (the client's first resize event) land before the process starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut child = cmd
        .spawn()
        .map_err(|e| ProviderError::NotFound(format!("{prog}: {e}")))?;
    drop(cmd);
    drop(pty.slave);
    let master = std::fs::File::from(pty.master);
    let master_w = master.try_clone().map_err(|e| failed("dup", e))?;
    let out = io
        .stdout
        .map(|w| tokio::spawn(copy_out(tokio::fs::File::from_std(master), w)));
    let inp = io
        .stdin
        .map(|r| tokio::spawn(copy_in(r, tokio::fs::File::from_std(master_w))));
    let status = child.wait().await.map_err(|e| failed("wait", e))?;
    if let Some(o) = out {
        let _ = tokio::time::timeout(Duration::from_secs(5), o).await;
    }
    if let Some(i) = inp {
        i.abort();
    }
    resizer.abort();
    Ok(exit_of(status))
}

#[async_trait]
impl StreamingRuntime for ProcessRuntime {
    async fn logs(
        &self,
        target: &ContainerRef,
        opts: &LogOptions,
    ) -> Result<LogStream, ProviderError> {
        let all = self.lines(&target.container);
        let since = opts.since_time.or_else(|| {
            opts.since_seconds
                .map(|s| Utc::now() - chrono::Duration::seconds(i64::try_from(s).unwrap_or(0)))
        });
        let mut picked: Vec<(DateTime<Utc>, String)> = all
            .iter()
            .filter(|(t, _)| since.is_none_or(|s| *t >= s))
            .cloned()
            .collect();
        if let Some(n) = opts.tail_lines {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            picked = picked.split_off(picked.len().saturating_sub(n));
        }
        let initial: Vec<std::io::Result<Bytes>> = picked
            .iter()
            .map(|(t, l)| Ok(format_line(opts, *t, l)))
            .collect();
        let head = futures::stream::iter(initial);
        if !opts.follow {
            return Ok(head.boxed());
        }
        let seen = all.len();
        let container = target.container.clone();
        let journal = self.journal.clone();
        let rx = self.bump.subscribe();
        let opts = opts.clone();
        let tail = futures::stream::unfold((rx, seen), move |(mut rx, mut seen)| {
            let (opts, journal, container) = (opts.clone(), journal.clone(), container.clone());
            async move {
                loop {
                    let lines = journal
                        .lock()
                        .map(|j| j.get(&container).cloned().unwrap_or_default())
                        .unwrap_or_default();
                    if lines.len() > seen {
                        let chunk: Vec<u8> = lines[seen..]
                            .iter()
                            .flat_map(|(t, l)| format_line(&opts, *t, l).to_vec())
                            .collect();
                        seen = lines.len();
                        return Some((Ok(Bytes::from(chunk)), (rx, seen)));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        });
        Ok(head.chain(tail).boxed())
    }

    async fn exec(
        &self,
        _target: &ContainerRef,
        command: Vec<String>,
        io: AttachIo,
    ) -> Result<ExitStatus, ProviderError> {
        if io.tty {
            run_tty(command, io).await
        } else {
            run_piped(command, io).await
        }
    }

    async fn attach(
        &self,
        _target: &ContainerRef,
        io: AttachIo,
    ) -> Result<ExitStatus, ProviderError> {
        let cmd = vec!["sh".into(), "-c".into(), "echo attached; exec cat".into()];
        if io.tty {
            run_tty(cmd, io).await
        } else {
            run_piped(cmd, io).await
        }
    }

    async fn port_forward(
        &self,
        _pod: &PodKey,
        port: u16,
        mut stream: PortStream,
    ) -> Result<(), ProviderError> {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| {
                ProviderError::failed("ConnectionRefused", format!("127.0.0.1:{port}: {e}"))
            })?;
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut tcp,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await;
        Ok(())
    }

    async fn pod_stats(&self) -> Result<Vec<PodStats>, ProviderError> {
        Ok(self.stats.lock().map(|s| s.clone()).unwrap_or_default())
    }
}
