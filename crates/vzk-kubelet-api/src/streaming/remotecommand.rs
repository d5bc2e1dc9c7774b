//! remotecommand (exec and attach) over SPDY.
//!
//! The client opens `error`, then `stdin`/`stdout`/`stderr` as requested, then `resize`
//! (TTY, v3+), each marked by the `streamType` header. We accept every stream, wait
//! (at most the stream-creation timeout) until the expected set is there, run the
//! provider, then tear down in order: output streams half-closed (FIN), the status on
//! the error stream (Status JSON for v4/v5, text on failure for v1–v3) and its FIN,
//! then the session closed (unfinished streams reset, transport closed).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use vzk_core::ProviderError;
use vzk_core::streams::{AttachIo, BoxReader, BoxWriter, TermSize};

use super::status::{self, Outcome};
use super::{ExecRequest, Op};
use crate::metrics::{StreamKind, Transport};
use crate::server::AppState;
use crate::spdy::{Session, SessionConfig, SpdyStream};

/// A negotiated remotecommand protocol version (1–5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version(pub(crate) u8);

impl Version {
    pub(crate) fn of(protocol: &str) -> Self {
        match protocol {
            "v5.channel.k8s.io" => Self(5),
            "v4.channel.k8s.io" => Self(4),
            "v3.channel.k8s.io" => Self(3),
            "v2.channel.k8s.io" => Self(2),
            _ => Self(1),
        }
    }
}

#[derive(Default)]
struct Streams {
    error: Option<SpdyStream>,
    stdin: Option<SpdyStream>,
    stdout: Option<SpdyStream>,
    stderr: Option<SpdyStream>,
    resize: Option<SpdyStream>,
}

impl Streams {
    fn complete(&self, req: &ExecRequest, v: Version) -> bool {
        self.error.is_some()
            && (!req.stdin || self.stdin.is_some())
            && (!req.stdout || self.stdout.is_some())
            && (!req.stderr || self.stderr.is_some())
            && (!(req.tty && v >= Version(3)) || self.resize.is_some())
    }
}

/// Accepts the client's streams until the expected set is complete.
async fn collect(
    session: &mut Session,
    req: &ExecRequest,
    v: Version,
    timeout: Duration,
) -> Result<Streams, String> {
    let mut s = Streams::default();
    let deadline = tokio::time::Instant::now() + timeout;
    while !s.complete(req, v) {
        let next = tokio::time::timeout_at(deadline, session.next_stream()).await;
        let incoming = match next {
            Err(_) => {
                return Err(format!(
                    "timed out waiting for client streams after {timeout:?}"
                ));
            }
            Ok(None) => return Err("connection closed before all streams were created".into()),
            Ok(Some(i)) => i,
        };
        let kind = incoming
            .headers()
            .get("streamtype")
            .unwrap_or_default()
            .to_owned();
        let Some(stream) = incoming.accept() else {
            continue;
        };
        let slot = match kind.as_str() {
            "error" => &mut s.error,
            "stdin" => &mut s.stdin,
            "stdout" => &mut s.stdout,
            "stderr" => &mut s.stderr,
            "resize" => &mut s.resize,
            other => {
                debug!(
                    stream_type = other,
                    "remotecommand: ignoring unknown stream type"
                );
                continue;
            }
        };
        *slot = Some(stream);
    }
    Ok(s)
}

/// Reads newline-separated `{"Width":..,"Height":..}` objects and forwards them.
pub(crate) async fn pump_resize<R: AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<TermSize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TermSize>();
        let mut used = 0;
        loop {
            match it.next() {
                Some(Ok(size)) => {
                    used = it.byte_offset();
                    if tx.send(size).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    warn!(error = %e, "remotecommand: bad resize message, ignoring further resizes");
                    return;
                }
                None => {
                    used = buf.len();
                    break;
                }
            }
        }
        buf.drain(..used);
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}

/// Runs the provider call for an exec/attach request with the given streams.
pub(crate) async fn run_provider(st: &AppState, req: &ExecRequest, io: AttachIo) -> Outcome {
    let call = async {
        match req.op {
            Op::Exec => st.runtime.exec(&req.target, req.command.clone(), io).await,
            Op::Attach => st.runtime.attach(&req.target, io).await,
        }
    };
    tokio::select! {
        r = call => r,
        () = st.shutdown.cancelled() => Err(ProviderError::Unavailable { message: "kubelet API shutting down".into(), retry_after: None }),
    }
}

/// Serves one upgraded SPDY remotecommand connection.
pub(crate) async fn serve<T>(io: T, st: AppState, req: ExecRequest, protocol: &'static str)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let kind = match req.op {
        Op::Exec => StreamKind::Exec,
        Op::Attach => StreamKind::Attach,
    };
    let _open = st.metrics.session(kind, Transport::Spdy);
    let v = Version::of(protocol);
    let mut session = match Session::start(io, SessionConfig::default()) {
        Ok(s) => s,
        Err(error) => {
            warn!(error = %crate::error_chain(&error), "remotecommand: cannot start SPDY session");
            return;
        }
    };
    let streams = match collect(&mut session, &req, v, st.stream_creation_timeout).await {
        Ok(s) => s,
        Err(why) => {
            warn!(%why, "remotecommand: streams not created");
            session.close().await;
            return;
        }
    };
    let Streams {
        error,
        stdin,
        stdout,
        stderr,
        resize,
    } = streams;
    let (resize_tx, resize_rx) = mpsc::channel(16);
    let resize_task = resize
        .filter(|_| req.tty)
        .map(|r| tokio::spawn(pump_resize(r, resize_tx)));
    let io = AttachIo {
        stdin: stdin.map(|s| Box::pin(s) as BoxReader),
        stdout: stdout.map(|s| Box::pin(s) as BoxWriter),
        stderr: stderr
            .filter(|_| !req.tty)
            .map(|s| Box::pin(s) as BoxWriter),
        tty: req.tty,
        resize: req.tty.then_some(resize_rx),
    };
    let outcome = run_provider(&st, &req, io).await;
    debug!(ok = outcome.is_ok(), "remotecommand: provider returned");
    if let Some(t) = resize_task {
        t.abort();
    }
    if let Some(mut e) = error {
        let msg = if v >= Version(4) {
            Some(status::v4_status(&outcome))
        } else {
            status::legacy_status(&outcome)
        };
        if let Some(msg) = msg {
            let _ = e.write_all(msg.as_bytes()).await;
        }
        let _ = e.shutdown().await;
    }
    session.close().await;
}
