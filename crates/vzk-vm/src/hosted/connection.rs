//! The agent's end of one host socket: requests matched to replies by id, and the
//! host's `state` / `ip` events applied to a VM proxy's watch channels ([`Sinks`]).
//!
//! A reader task owns the read half. Unreadable host messages are logged and skipped (a
//! reply with a readable id still ends its request, with an error). When the host closes
//! the connection every pending request fails with [`HostedError::Closed`] and, if the
//! VM was subscribed and not in a final state, the VM becomes `Failed` with the host's
//! pid and the last line of its log as the reason.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::client::HostedError;
use super::files::VmFiles;
use super::protocol::{
    Answer, ErrorKind, Frame, MAX_FRAME, Op, Outcome, ServerMessage, VERSION, WireError,
    read_frame, write_line,
};
use crate::hypervisor::VmState;

/// How long the host has to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the host has to answer any other request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a request failed.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The host answered with an error.
    Remote(WireError),
    /// No answer (closed, timed out, unreadable).
    Local(HostedError),
}

/// Where a connection's events go: the proxy's channels.
#[derive(Debug)]
pub(crate) struct Sinks {
    pub(crate) state: watch::Sender<VmState>,
    pub(crate) ip: watch::Sender<Option<Ipv4Addr>>,
    files: VmFiles,
    pid: AtomicU32,
    attached: AtomicBool,
}

impl Sinks {
    pub(crate) fn new(files: VmFiles) -> Arc<Self> {
        Arc::new(Self {
            state: watch::Sender::new(VmState::Created),
            ip: watch::Sender::new(None),
            files,
            pid: AtomicU32::new(0),
            attached: AtomicBool::new(false),
        })
    }

    /// Moves to `next` unless the state is final already (final states stay).
    pub(crate) fn set_state(&self, next: VmState) {
        self.state.send_if_modified(|cur| {
            let change = !cur.is_final() && *cur != next;
            if change {
                *cur = next;
            }
            change
        });
    }

    fn set_ip(&self, next: Option<Ipv4Addr>) {
        self.ip.send_if_modified(|cur| {
            let change = *cur != next;
            if change {
                *cur = next;
            }
            change
        });
    }

    /// The host closed the connection: the VM failed with it unless it had ended.
    fn host_gone(&self, how: &str) {
        if !self.attached.load(Ordering::Acquire) || self.state.borrow().is_final() {
            return;
        }
        let pid = self.pid.load(Ordering::Relaxed);
        let tail = self
            .files
            .log_tail()
            .map(|l| format!("; its log ends: {l}"))
            .unwrap_or_default();
        let reason = format!("the VM host process (pid {pid}) {how}{tail}");
        tracing::warn!(socket = %self.files.socket.display(), %reason, "VM host gone");
        self.set_state(VmState::Failed { reason });
    }
}

/// A connection to one host, past the hello.
#[derive(Debug)]
pub(crate) struct Connection {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: watch::Receiver<bool>,
    reader: JoinHandle<()>,
    /// The host's pid, as it says in the hello.
    pub(crate) pid: u32,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Connects to `socket` and says hello. [`HostedError::Connect`] when nothing
    /// listens there; [`HostedError::Unresponsive`] when something does but does not
    /// complete the hello (with the peer's pid when the OS tells it).
    pub(crate) async fn open(socket: &Path, sinks: Arc<Sinks>) -> Result<Self, HostedError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| HostedError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        let peer = peer_pid(&stream);
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            BufReader::new(read),
            pending.clone(),
            sinks.clone(),
            closed_tx,
        ));
        let mut conn = Self {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(0),
            closed,
            reader,
            pid: 0,
        };
        let unresponsive = |why: String| HostedError::Unresponsive {
            socket: socket.to_owned(),
            pid: peer,
            why,
        };
        let hello = Op::Hello { version: VERSION };
        match tokio::time::timeout(HELLO_TIMEOUT, conn.request(hello)).await {
            Ok(Ok(Answer::Hello { version, pid, .. })) if version == VERSION => {
                conn.pid = pid;
                sinks.pid.store(pid, Ordering::Relaxed);
                Ok(conn)
            }
            Ok(Ok(other)) => Err(unresponsive(format!("hello answered with {other:?}"))),
            Ok(Err(RequestError::Remote(e))) => Err(unresponsive(format!(
                "hello refused ({:?}): {}",
                e.kind, e.message
            ))),
            Ok(Err(RequestError::Local(e))) => Err(unresponsive(format!("hello failed: {e}"))),
            Err(_) => Err(unresponsive(format!(
                "no answer to hello within {HELLO_TIMEOUT:?}"
            ))),
        }
    }

    /// Whether the host has closed the connection.
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits up to `timeout` for the host to close the connection.
    pub(crate) async fn wait_closed(&self, timeout: Duration) {
        let mut closed = self.closed.clone();
        let _ = tokio::time::timeout(timeout, closed.wait_for(|c| *c)).await;
    }

    /// Sends `op` and waits for its answer.
    pub(crate) async fn request(&self, op: Op) -> Result<Answer, RequestError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        // After the insert: the reader drains `pending` only after marking the
        // connection closed, so either it drains this entry or this check sees it.
        if self.is_closed() {
            lock(&self.pending).remove(&id);
            return Err(RequestError::Local(HostedError::Closed));
        }
        let written = {
            let mut w = self.writer.lock().await;
            write_line(&mut *w, &op.to_request(id)).await
        };
        if let Err(e) = written {
            lock(&self.pending).remove(&id);
            return Err(RequestError::Local(HostedError::Write(e)));
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(Outcome::Ok(answer))) => Ok(answer),
            Ok(Ok(Outcome::Err(e))) => Err(RequestError::Remote(e)),
            Ok(Err(_)) => Err(RequestError::Local(HostedError::Closed)),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(RequestError::Local(HostedError::Timeout {
                    op: op.name(),
                    after: REQUEST_TIMEOUT,
                }))
            }
        }
    }
}

/// The peer's pid (Linux `SO_PEERCRED`, macOS `LOCAL_PEEREPID`).
pub(crate) fn peer_pid(stream: &UnixStream) -> Option<u32> {
    let pid = stream.peer_cred().ok()?.pid()?;
    u32::try_from(pid).ok().filter(|&p| p > 0)
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    pending: Pending,
    sinks: Arc<Sinks>,
    closed: watch::Sender<bool>,
) {
    let how = loop {
        match read_frame(&mut reader, MAX_FRAME).await {
            Ok(Some(Frame::Line(line))) => handle_line(&line, &pending, &sinks),
            Ok(Some(Frame::TooLong(len))) => {
                tracing::warn!(len, "skipping an over-long message from the VM host");
            }
            Ok(None) => break "closed its connection".to_owned(),
            Err(e) => break format!("connection failed: {e}"),
        }
    };
    closed.send_replace(true);
    let dropped: Vec<_> = lock(&pending).drain().collect();
    drop(dropped);
    sinks.host_gone(&how);
}

/// The `"id"` of a message that is not valid JSON (truncated, say), so its request
/// fails now rather than at its timeout: the first `"id":` followed by digits.
fn salvage_id(line: &[u8]) -> Option<u64> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
        return v.get("id")?.as_u64();
    }
    let key = b"\"id\":";
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &line[at..];
    let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Applies one host message.
fn handle_line(line: &[u8], pending: &Pending, sinks: &Sinks) {
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match serde_json::from_slice::<ServerMessage>(line) {
        Ok(ServerMessage::Reply {
            id: Some(id),
            result,
        }) => {
            // Applied here, in message order, so no later event is overwritten.
            if let Outcome::Ok(Answer::Subscribed { state, ip }) = &result {
                sinks.set_state(state.clone());
                sinks.set_ip(*ip);
                sinks.attached.store(true, Ordering::Release);
            }
            match lock(pending).remove(&id) {
                Some(tx) => {
                    let _ = tx.send(result);
                }
                None => tracing::debug!(id, "a reply to no pending request"),
            }
        }
        Ok(ServerMessage::Reply { id: None, result }) => {
            tracing::warn!(?result, "the VM host could not read a request");
        }
        Ok(ServerMessage::State { state }) => sinks.set_state(state),
        Ok(ServerMessage::Ip { ip }) => sinks.set_ip(ip),
        Err(e) => {
            let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            tracing::warn!(error = %e, message = %shown, "unreadable message from the VM host");
            let id = salvage_id(line);
            if let Some(tx) = id.and_then(|id| lock(pending).remove(&id)) {
                let _ = tx.send(Outcome::Err(WireError::new(
                    ErrorKind::Malformed,
                    format!("unreadable reply from the VM host: {e}"),
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::salvage_id;

    #[test]
    fn ids_are_salvaged_from_broken_replies() {
        assert_eq!(
            salvage_id(br#"{"type":"reply","id":12,"result":"#),
            Some(12)
        );
        assert_eq!(salvage_id(br#"{"type":"reply", "id": 7}"#), Some(7));
        assert_eq!(salvage_id(br#"{"type":"reply","id":null}"#), None);
        assert_eq!(salvage_id(b"garbage"), None);
        assert_eq!(salvage_id(br#"{"id":"#), None);
        assert_eq!(salvage_id(br#"{"id":99999999999999999999999}"#), None);
    }
}
