//! Driving one SSH session channel for an exec or an interactive shell, wired to a
//! kubelet [`AttachIo`].
//!
//! # Contract
//! * The command runs as `exec <quoted argv>` (see [`crate::quote`]), so the remote
//!   program gets the caller's argv exactly and is itself the session's process.
//! * stdout and stderr stay apart (SSH data vs. extended data 1). Under a PTY the
//!   guest merges them, as a terminal does.
//! * stdin is streamed as it arrives; its end is sent as SSH EOF. Without stdin the
//!   EOF is sent at once, so the program reads an empty stdin, never a hang.
//! * With a TTY, the PTY starts at the caller's first resize event (or
//!   [`GuestConfig::default_size`] if none comes within
//!   [`GuestConfig::initial_size_wait`]), and EVERY later resize is sent as a
//!   `window-change` request.
//! * The result is the real exit code; an `exit-signal` `n` becomes `128 + n`.
//! * **Cancellation**: if the caller drops the future (its client went away) or
//!   writing the output fails, the remote process gets `TERM`, then `KILL` after
//!   [`GuestConfig::kill_grace`] if the channel is still open, and the channel is
//!   closed. The connection itself stays up for other sessions.

use std::sync::Arc;
use std::time::Duration;

use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty, Sig};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;
use tracing::{debug, warn};
use vzk_core::streams::{AttachIo, ExitStatus, TermSize};

use crate::config::GuestConfig;

/// Why an exec or shell session failed (a non-zero exit is not a failure).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Sending the PTY request failed.
    #[error("requesting a PTY")]
    RequestPty(#[source] Box<russh::Error>),
    /// Sending the exec or shell request failed.
    #[error("starting the remote command")]
    Start(#[source] Box<russh::Error>),
    /// The server refused the exec or shell request.
    #[error("the guest refused to start the command")]
    StartRefused,
    /// Writing the command's output to the caller failed (the client went away);
    /// the remote process was cancelled.
    #[error("writing {stream} to the client")]
    WriteOutput {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server closed the channel without answering the exec/shell request.
    #[error("the guest closed the session before starting the command")]
    ClosedBeforeStart,
    /// The session ended without an exit status (connection lost or guest crashed).
    #[error("the session ended without an exit status (connection lost?)")]
    NoExitStatus,
}

/// What to start on the channel.
pub(crate) enum Start {
    /// An `exec` request with this command string.
    Exec(String),
    /// A `shell` request (interactive login shell), preceded by these `export` lines
    /// written to its stdin (empty if none).
    Shell(String),
}

/// A channel on which the server has accepted the exec/shell request.
pub(crate) struct Started {
    /// Cancels the remote process if the exec is dropped from here on.
    guard: CancelGuard,
    tx: Arc<ChannelWriteHalf<Msg>>,
    /// Messages that arrived before the acceptance (normally none).
    early: Vec<ChannelMsg>,
    /// Shell preamble to write before stdin.
    preamble: Option<String>,
}

/// Requests the PTY (if `pty` is set) and starts `start` on `channel`, waiting for
/// the server to accept.
///
/// [`ExecError::ClosedBeforeStart`] means the server closed the channel without
/// answering: the command did not run and nothing of the caller's I/O was used, so
/// the caller may retry on a new channel. (dropbear does this to a channel opened
/// while another session's process is being killed.)
pub(crate) async fn start(
    channel: Channel<Msg>,
    start: &Start,
    pty: Option<TermSize>,
    cfg: &GuestConfig,
) -> Result<Started, ExecError> {
    let (rx, tx) = channel.split();
    let tx = Arc::new(tx);
    // Armed from the start: a caller dropped while waiting for the server's answer
    // must not leave a process running.
    let mut guard = CancelGuard {
        rx: Some(rx),
        tx: Some(tx.clone()),
        grace: cfg.kill_grace,
    };
    if let Some(size) = pty {
        let modes = [
            (Pty::ECHO, 1),
            (Pty::TTY_OP_ISPEED, 14400),
            (Pty::TTY_OP_OSPEED, 14400),
        ];
        tx.request_pty(
            false,
            &cfg.term,
            u32::from(size.width),
            u32::from(size.height),
            0,
            0,
            &modes,
        )
        .await
        .map_err(|e| ExecError::RequestPty(Box::new(e)))?;
    }
    let preamble = match start {
        Start::Exec(cmd) => {
            tx.exec(true, cmd.as_bytes())
                .await
                .map_err(|e| ExecError::Start(Box::new(e)))?;
            None
        }
        Start::Shell(preamble) => {
            tx.request_shell(true)
                .await
                .map_err(|e| ExecError::Start(Box::new(e)))?;
            (!preamble.is_empty()).then(|| preamble.clone())
        }
    };
    let mut early = Vec::new();
    loop {
        match guard.next().await {
            Some(ChannelMsg::Success) => break,
            Some(ChannelMsg::Failure) => {
                guard.disarm();
                let _ = tx.close().await;
                return Err(ExecError::StartRefused);
            }
            Some(ChannelMsg::Close) | None => {
                guard.disarm();
                return Err(ExecError::ClosedBeforeStart);
            }
            Some(other) => early.push(other),
        }
    }
    Ok(Started {
        guard,
        tx,
        early,
        preamble,
    })
}

/// Wires a started channel to `io` until the remote process ends; returns its exit
/// status. `io.resize` must no longer hold the event used for the initial size.
pub(crate) async fn pump(started: Started, io: AttachIo) -> Result<ExitStatus, ExecError> {
    let AttachIo {
        stdin,
        mut stdout,
        mut stderr,
        tty,
        resize,
    } = io;
    let Started {
        mut guard,
        tx,
        early,
        preamble,
    } = started;
    let _stdin_task = spawn_stdin(tx.clone(), stdin, preamble);
    let _resize_task = if tty {
        resize.map(|rx| spawn_resize(tx.clone(), rx))
    } else {
        None
    };

    let mut status: Option<i32> = None;
    let mut early = early.into_iter();
    loop {
        let msg = match early.next() {
            Some(m) => m,
            None => match guard.next().await {
                Some(m) => m,
                None => break,
            },
        };
        match msg {
            ChannelMsg::Data { data } => {
                if let Err(source) = write_out(stdout.as_mut(), &data).await {
                    guard.cancel().await;
                    return Err(ExecError::WriteOutput {
                        stream: "stdout",
                        source,
                    });
                }
            }
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                if let Err(source) = write_out(stderr.as_mut(), &data).await {
                    guard.cancel().await;
                    return Err(ExecError::WriteOutput {
                        stream: "stderr",
                        source,
                    });
                }
            }
            ChannelMsg::ExitStatus { exit_status } => {
                status = Some(i32::try_from(exit_status.min(255)).unwrap_or(255));
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                ..
            } => {
                let n = signal_number(&signal_name);
                debug!(signal = ?signal_name, core_dumped, "remote process killed by a signal");
                status = Some(128 + n);
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    // The loop ends on the server's CLOSE (russh answers it) or a dead connection:
    // either way there is nothing left to close.
    guard.disarm();
    for w in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        if let Err(e) = w.flush().await {
            debug!(error = %e, "flushing exec output failed");
        }
    }
    status
        .map(|code| ExitStatus { code })
        .ok_or(ExecError::NoExitStatus)
}

async fn write_out(
    w: Option<&mut vzk_core::streams::BoxWriter>,
    data: &[u8],
) -> std::io::Result<()> {
    match w {
        Some(w) => w.write_all(data).await,
        None => Ok(()),
    }
}

pub(crate) async fn initial_size(
    resize: Option<&mut tokio::sync::mpsc::Receiver<TermSize>>,
    cfg: &GuestConfig,
) -> TermSize {
    let Some(rx) = resize else {
        return cfg.default_size;
    };
    match tokio::time::timeout(cfg.initial_size_wait, rx.recv()).await {
        Ok(Some(size)) if size.width > 0 && size.height > 0 => size,
        _ => cfg.default_size,
    }
}

/// Streams stdin (after an optional preamble) into the channel, then sends EOF.
fn spawn_stdin(
    tx: Arc<ChannelWriteHalf<Msg>>,
    stdin: Option<vzk_core::streams::BoxReader>,
    preamble: Option<String>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut w = tx.make_writer();
        if let Some(p) = preamble
            && let Err(e) = w.write_all(p.as_bytes()).await
        {
            debug!(error = %e, "writing shell preamble failed");
            return;
        }
        if let Some(stdin) = stdin {
            // A large buffer: each write becomes SSH packets of the peer's maximum size
            // (32 KiB for OpenSSH) instead of one per 8 KiB (`tokio::io::copy`'s buffer);
            // every packet costs russh an allocation, a queued message and a MAC.
            let mut stdin = BufReader::with_capacity(crate::session::COPY_BUFFER, stdin);
            match tokio::io::copy_buf(&mut stdin, &mut w).await {
                Ok(bytes) => debug!(bytes, "stdin ended"),
                Err(e) => debug!(error = %e, "stdin copy stopped"),
            }
        }
        if let Err(e) = w.shutdown().await {
            debug!(error = %e, "sending EOF failed");
        }
    }))
}

/// Applies every resize event as a `window-change` request.
fn spawn_resize(
    tx: Arc<ChannelWriteHalf<Msg>>,
    mut rx: tokio::sync::mpsc::Receiver<TermSize>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        while let Some(size) = rx.recv().await {
            let (cols, rows) = (u32::from(size.width), u32::from(size.height));
            debug!(cols, rows, "window change");
            if let Err(e) = tx.window_change(cols, rows, 0, 0).await {
                debug!(error = %e, "window change failed");
                return;
            }
        }
    }))
}

/// Aborts a helper task when the exec ends, however it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cancels the remote process unless disarmed: on drop (the caller's future was
/// dropped) it spawns the cancel; [`CancelGuard::cancel`] does it inline.
struct CancelGuard {
    rx: Option<ChannelReadHalf>,
    tx: Option<Arc<ChannelWriteHalf<Msg>>>,
    grace: Duration,
}

impl CancelGuard {
    /// The next channel message; `None` once the channel ended (or was cancelled).
    async fn next(&mut self) -> Option<ChannelMsg> {
        match self.rx.as_mut() {
            Some(rx) => rx.wait().await,
            None => None,
        }
    }

    fn disarm(&mut self) {
        self.tx = None;
    }

    async fn cancel(&mut self) {
        if let (Some(rx), Some(tx)) = (self.rx.take(), self.tx.take()) {
            cancel_remote(rx, tx, self.grace).await;
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let (Some(rx), Some(tx)) = (self.rx.take(), self.tx.take()) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(cancel_remote(rx, tx, self.grace));
                }
                Err(_) => warn!("exec dropped outside a runtime; remote process not signalled"),
            }
        }
    }
}

/// `TERM`; if the channel has not ended within `grace`, `KILL`; if it still has not
/// ended after another `grace`, close it from our side.
///
/// The server closes the channel itself once the process is gone; we only send
/// `CHANNEL_CLOSE` when it does not. (Closing first while the server is still
/// tearing the session down races with channels opened meanwhile on some servers —
/// dropbear 2022.83 then drops the *new* channel without an exit status.)
async fn cancel_remote(mut rx: ChannelReadHalf, tx: Arc<ChannelWriteHalf<Msg>>, grace: Duration) {
    debug!("cancelling remote process");
    for sig in [Sig::TERM, Sig::KILL] {
        if tx.signal(sig.clone()).await.is_err() {
            return; // connection already gone: nothing left to signal
        }
        if wait_closed(&mut rx, grace).await {
            debug!(signal = ?sig, "remote process ended after cancel");
            return;
        }
    }
    warn!("remote process survived TERM and KILL; closing the channel");
    let _ = tx.close().await;
}

/// Waits up to `grace` for the server to close the channel.
async fn wait_closed(rx: &mut ChannelReadHalf, grace: Duration) -> bool {
    tokio::time::timeout(grace, async {
        while let Some(msg) = rx.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// The Linux number of an SSH signal name (RFC 4254 names, without `SIG`).
pub(crate) fn signal_number(sig: &Sig) -> i32 {
    match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(name) => {
            let name = name.strip_prefix("SIG").unwrap_or(name);
            match name {
                "TRAP" => 5,
                "BUS" => 7,
                "USR2" => 12,
                "STKFLT" => 16,
                "CHLD" => 17,
                "CONT" => 18,
                "STOP" => 19,
                "TSTP" => 20,
                "TTIN" => 21,
                "TTOU" => 22,
                "URG" => 23,
                "XCPU" => 24,
                "XFSZ" => 25,
                "VTALRM" => 26,
                "PROF" => 27,
                "WINCH" => 28,
                "IO" => 29,
                "PWR" => 30,
                "SYS" => 31,
                other => other
                    .parse::<i32>()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .unwrap_or_else(|| {
                        warn!(signal = other, "unknown exit signal name");
                        127
                    }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_map_to_linux_numbers() {
        assert_eq!(signal_number(&Sig::KILL), 9);
        assert_eq!(signal_number(&Sig::TERM), 15);
        assert_eq!(signal_number(&Sig::Custom("USR2".into())), 12);
        assert_eq!(signal_number(&Sig::Custom("SIGBUS".into())), 7);
        assert_eq!(signal_number(&Sig::Custom("34".into())), 34);
        assert_eq!(signal_number(&Sig::Custom("BOGUS".into())), 127);
    }
}
