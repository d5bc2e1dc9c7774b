//! The wire format between the agent ([`super::client`]) and a VM host process
//! ([`super::server`]): JSON, one message per line (`\n`), at most [`MAX_FRAME`] bytes,
//! over the host's Unix socket. (The host's files are in [`super::files`].)
//!
//! # Requests (agent → host)
//! `{"id": N, "op": NAME, …}` with `id` an unsigned integer echoed in the reply. The first
//! request of a connection must be `{"id":0,"op":"hello","version":1}`; the host answers
//! with its version, the VM id and its pid, or with a `version` error and closes.
//!
//! | op | answer | |
//! |---|---|---|
//! | `hello` | `hello` | `version` required |
//! | `state` / `ip` | `state` / `ip` | current values |
//! | `subscribe` | `subscribed` (state, ip) | then `state` / `ip` events on every change |
//! | `start`, `requestStop`, `forceStop` | `done` | as [`Vm`](crate::Vm) |
//! | `remove` | `done` | files removed; the host then exits |
//! | `consolePath` | `consolePath` | the inner VM's console log file |
//! | `usage` | `usage` | host process's own CPU/RSS, the inner VM's |
//!
//! # Host messages
//! `{"type":"reply","id":N,"result":{"ok":ANSWER}}`, `{"type":"reply","id":N,"result":
//! {"err":{"kind":K,"message":M}}}` (`id` is `null` when the request was unreadable),
//! and the events `{"type":"state","state":{…}}`, `{"type":"ip","ip":"a.b.c.d"|null}`.
//!
//! A frame that is not JSON, too long, not UTF-8, lacks an `id`, names an unknown op or
//! comes before the hello gets an error reply (`malformed`, `unknownOp`,
//! `helloRequired`); the connection stays open. Neither side ever panics on input.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::hypervisor::{BackendKind, HostUsage, VmError, VmState};

/// The protocol version both sides must speak.
pub const VERSION: u32 = 1;

/// The longest frame accepted, in bytes (without the newline).
pub const MAX_FRAME: usize = 1 << 20;

/// A request's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Version handshake; must come first.
    Hello {
        /// The client's protocol version.
        version: u32,
    },
    /// The current state.
    State,
    /// The current guest address.
    Ip,
    /// Current state and address, then events on every change.
    Subscribe,
    /// [`crate::Vm::start`].
    Start,
    /// [`crate::Vm::request_stop`].
    RequestStop,
    /// [`crate::Vm::force_stop`].
    ForceStop,
    /// [`crate::Vm::remove`]; the host exits afterwards.
    Remove,
    /// [`crate::Vm::console_log`].
    ConsolePath,
    /// The host process's usage and the inner VM's.
    Usage,
    /// [`crate::Vm::save_state`].
    SaveState,
}

/// Every op name, for error messages.
const OP_NAMES: &[&str] = &[
    "hello",
    "state",
    "ip",
    "subscribe",
    "start",
    "requestStop",
    "forceStop",
    "remove",
    "consolePath",
    "usage",
    "saveState",
];

impl Op {
    /// The op's wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::State => "state",
            Self::Ip => "ip",
            Self::Subscribe => "subscribe",
            Self::Start => "start",
            Self::RequestStop => "requestStop",
            Self::ForceStop => "forceStop",
            Self::Remove => "remove",
            Self::ConsolePath => "consolePath",
            Self::Usage => "usage",
            Self::SaveState => "saveState",
        }
    }

    /// The operation's name in [`VmError`]s (as the in-process backends name it).
    pub fn operation(self) -> &'static str {
        match self {
            Self::RequestStop => "request stop",
            Self::ForceStop => "force stop",
            Self::SaveState => "saving the state",
            other => other.name(),
        }
    }

    /// The request line (without the newline) for this op with `id`.
    pub fn to_request(self, id: u64) -> Vec<u8> {
        let value = match self {
            Self::Hello { version } => {
                serde_json::json!({"id": id, "op": self.name(), "version": version})
            }
            _ => serde_json::json!({"id": id, "op": self.name()}),
        };
        value.to_string().into_bytes()
    }
}

/// Parses one request frame; on failure, the error reply to send (with the request's id
/// when it could be read).
pub fn parse_request(frame: &[u8]) -> Result<(u64, Op), (Option<u64>, WireError)> {
    let value: serde_json::Value = serde_json::from_slice(frame).map_err(|e| {
        (
            None,
            WireError::new(ErrorKind::Malformed, format!("not a JSON request: {e}")),
        )
    })?;
    let Some(obj) = value.as_object() else {
        return Err((
            None,
            WireError::new(ErrorKind::Malformed, "a request is a JSON object"),
        ));
    };
    let Some(id) = obj.get("id").and_then(serde_json::Value::as_u64) else {
        return Err((
            None,
            WireError::new(
                ErrorKind::Malformed,
                "a request needs \"id\", an unsigned integer",
            ),
        ));
    };
    let Some(name) = obj.get("op").and_then(serde_json::Value::as_str) else {
        return Err((
            Some(id),
            WireError::new(ErrorKind::Malformed, "a request needs \"op\", a string"),
        ));
    };
    let op = match name {
        "hello" => {
            let version = obj
                .get("version")
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u32::try_from(v).ok());
            let Some(version) = version else {
                return Err((
                    Some(id),
                    WireError::new(
                        ErrorKind::Malformed,
                        "hello needs \"version\", an unsigned 32-bit integer",
                    ),
                ));
            };
            Op::Hello { version }
        }
        "state" => Op::State,
        "ip" => Op::Ip,
        "subscribe" => Op::Subscribe,
        "start" => Op::Start,
        "requestStop" => Op::RequestStop,
        "forceStop" => Op::ForceStop,
        "remove" => Op::Remove,
        "consolePath" => Op::ConsolePath,
        "usage" => Op::Usage,
        "saveState" => Op::SaveState,
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err((
                Some(id),
                WireError::new(
                    ErrorKind::UnknownOp,
                    format!("unknown op {shown:?}; known: {}", OP_NAMES.join(", ")),
                ),
            ));
        }
    };
    Ok((id, op))
}

/// A message from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// The answer to request `id` (`None`: the request was unreadable).
    Reply {
        /// The request's id.
        id: Option<u64>,
        /// The outcome.
        result: Outcome,
    },
    /// The VM's state changed (after `subscribe`).
    State {
        /// The new state.
        state: VmState,
    },
    /// The guest's address changed (after `subscribe`).
    Ip {
        /// The new address.
        ip: Option<Ipv4Addr>,
    },
}

/// A request's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// It worked.
    Ok(Answer),
    /// It did not.
    Err(WireError),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Answer {
    /// To `hello`.
    #[serde(rename_all = "camelCase")]
    Hello {
        /// The host's protocol version.
        version: u32,
        /// The VM the host runs.
        vm_id: String,
        /// The host's pid.
        pid: u32,
    },
    /// To `state`.
    State {
        /// The current state.
        state: VmState,
    },
    /// To `ip`.
    Ip {
        /// The current address.
        ip: Option<Ipv4Addr>,
    },
    /// To `subscribe`: the values events will change.
    Subscribed {
        /// The current state.
        state: VmState,
        /// The current address.
        ip: Option<Ipv4Addr>,
    },
    /// To `start`, `requestStop`, `forceStop`, `remove`.
    Done,
    /// To `consolePath`.
    ConsolePath {
        /// The console log file.
        path: Option<PathBuf>,
    },
    /// To `usage`.
    Usage {
        /// The host process itself.
        host: Option<WireUsage>,
        /// What the inner backend reports for the VM (a child process), if anything.
        vm: Option<WireUsage>,
    },
}

/// [`HostUsage`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireUsage {
    /// User + system CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

impl From<HostUsage> for WireUsage {
    fn from(u: HostUsage) -> Self {
        Self {
            cpu_ns: u.cpu_ns,
            rss_bytes: u.rss_bytes,
        }
    }
}

impl From<WireUsage> for HostUsage {
    fn from(u: WireUsage) -> Self {
        Self {
            cpu_ns: u.cpu_ns,
            rss_bytes: u.rss_bytes,
        }
    }
}

/// What kind of error a reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The frame was not a readable request.
    Malformed,
    /// The op is not known to this host.
    UnknownOp,
    /// A request came before the hello.
    HelloRequired,
    /// The protocol versions differ; the host closes the connection.
    Version,
    /// [`VmError::InvalidState`] (`state` says which).
    InvalidState,
    /// [`VmError::Unsupported`] (`backend` says which).
    Unsupported,
    /// [`VmError::LimitReached`].
    LimitReached,
    /// The operation failed (`message` has the error chain).
    Failed,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireError {
    /// The kind.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
    /// The VM's state (`invalidState`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// The backend (`unsupported`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}

/// An error and its causes, `: `-joined.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

impl WireError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            state: None,
            backend: None,
        }
    }

    /// The wire form of a VM operation's error.
    pub fn from_vm_error(e: &VmError) -> Self {
        let mut w = Self::new(ErrorKind::Failed, chain(e));
        match e {
            VmError::InvalidState { state, .. } => {
                w.kind = ErrorKind::InvalidState;
                w.state = Some(state.clone());
            }
            VmError::Unsupported { backend, .. } => {
                w.kind = ErrorKind::Unsupported;
                w.backend = Some(*backend);
            }
            VmError::LimitReached { detail, .. } => {
                w.kind = ErrorKind::LimitReached;
                w.message = detail.clone();
            }
            _ => {}
        }
        w
    }

    /// The [`VmError`] of VM `id` this reply to `op` stands for.
    pub fn into_vm_error(self, id: &str, op: Op) -> VmError {
        let id = id.to_owned();
        let operation = op.operation();
        match (self.kind, self.state, self.backend) {
            (ErrorKind::InvalidState, Some(state), _) => VmError::InvalidState {
                id,
                operation,
                state,
            },
            (ErrorKind::Unsupported, _, Some(backend)) => {
                VmError::Unsupported { backend, operation }
            }
            (ErrorKind::LimitReached, _, _) => VmError::LimitReached {
                id,
                detail: self.message,
            },
            (kind, state, backend) => {
                let source = Box::new(Self {
                    kind,
                    message: self.message,
                    state,
                    backend,
                });
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
        }
    }
}

/// One frame read by [`read_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A line (without its newline), at most [`MAX_FRAME`] bytes.
    Line(Vec<u8>),
    /// A line longer than the limit, discarded; its length.
    TooLong(usize),
}

/// Reads the next frame; `None` at end of stream. A final line without a newline is a
/// frame too. Lines over `max` bytes are discarded whole (the stream stays in sync).
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Frame>> {
    let mut line = Vec::new();
    let mut len = 0usize;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(match len {
                0 => None,
                n if n > max => Some(Frame::TooLong(n)),
                _ => Some(Frame::Line(line)),
            });
        }
        let (part, used, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        len = len.saturating_add(part.len());
        if len <= max {
            line.extend_from_slice(part);
        } else {
            line = Vec::new();
        }
        r.consume(used);
        if done {
            return Ok(Some(if len > max {
                Frame::TooLong(len)
            } else {
                Frame::Line(line)
            }));
        }
    }
}

/// Writes one message line and flushes.
pub async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.push(b'\n');
    w.write_all(&buf).await?;
    w.flush().await
}

/// The line of a host message.
pub fn encode(msg: &ServerMessage) -> Vec<u8> {
    // Serialising these types cannot fail (string keys, no non-finite floats); an empty
    // object would still be a readable frame.
    serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
