//! A small QMP (QEMU Machine Protocol) client over a Unix socket, raw JSON.
//!
//! Protocol: the server greets with `{"QMP": ...}`; the client must send
//! `qmp_capabilities` before anything else; then each `{"execute", "arguments", "id"}`
//! gets exactly one `{"return"|"error", "id"}` reply, while asynchronous
//! `{"event", "data", "timestamp"}` messages may arrive at any time in between.
//!
//! [`QmpClient::connect`] does the greeting and negotiation, then a reader task routes
//! replies to their callers by `id` and events to the channel returned alongside the
//! client. Commands are plain `serde_json` values ([`QmpClient::execute`]), so any QEMU
//! version's commands can be sent (the "raw escape hatch"); the helpers cover what the
//! backend uses. When the socket closes (QEMU exited) pending commands fail with
//! [`QmpError::Closed`] and the event channel ends.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, mpsc, oneshot};

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event name, e.g. `SHUTDOWN`, `POWERDOWN`, `STOP`.
    pub name: String,
    /// The event's `data` member (`null` when absent).
    pub data: Value,
}

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error("connecting to QMP socket {path} failed")]
    Connect {
        /// The socket path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The greeting or capability negotiation failed.
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    /// Writing a command failed.
    #[error("sending QMP command {command} failed")]
    Send {
        /// The command.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection closed before the reply arrived.
    #[error("QMP connection closed")]
    Closed,
    /// No reply within the deadline.
    #[error("QMP command {command} timed out after {after:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The deadline.
        after: Duration,
    },
}

type Pending =
    Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QmpClient {
    /// Connects to `path`, negotiates capabilities and returns the client and its events.
    pub async fn connect(
        path: &Path,
    ) -> Result<(Self, mpsc::UnboundedReceiver<QmpEvent>), QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| QmpError::Handshake("no greeting within 10s".into()))?
            .map_err(|e| QmpError::Handshake(e.to_string()))?
            .ok_or_else(|| QmpError::Handshake("socket closed before the greeting".into()))?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Handshake(format!("bad greeting: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Handshake(format!(
                "unexpected greeting {greeting}"
            )));
        }
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let closed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_loop(lines, pending.clone(), closed.clone(), events_tx));
        let client = Self {
            writer: Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            closed,
            reader,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok((client, events_rx))
    }

    /// Whether the connection has closed (QEMU exited or closed the monitor).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends a command and waits (up to 30 s) for its reply's `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, Duration::from_secs(30))
            .await
    }

    /// [`QmpClient::execute`] with an explicit deadline.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        // Checked after registering: the reader sets it before clearing `pending`.
        if self.closed.load(Ordering::Acquire) {
            self.forget(id);
            return Err(QmpError::Closed);
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            if let Err(source) = w.write_all(line.as_bytes()).await {
                self.forget(id);
                return Err(QmpError::Send {
                    command: command.into(),
                    source,
                });
            }
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    command: command.into(),
                    after: deadline,
                })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `shutdown`, ...).
    pub async fn query_status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// `system_powerdown`: press the ACPI power button.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `quit`: end QEMU now. The connection closing first counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self
            .execute_timeout("quit", None, Duration::from_secs(5))
            .await
        {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// One message from QEMU, as [`parse_message`] classifies it.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// An asynchronous event.
    Event(QmpEvent),
    /// The reply to command `id`: its `return` value, or the error's class and description.
    Reply {
        /// The command's id.
        id: u64,
        /// `return`, or `(class, desc)` of `error`.
        result: Result<Value, (String, String)>,
    },
    /// Valid JSON that is neither (e.g. a reply without a numeric id): ignored.
    Other,
}

/// Classifies one line QEMU sent; `None` when it is not JSON. Public (hidden) for the
/// fuzz target `qmp_message`.
#[doc(hidden)]
pub fn parse_message(line: &str) -> Option<QmpMessage> {
    let v = serde_json::from_str::<Value>(line).ok()?;
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let data = v.get("data").cloned().unwrap_or(Value::Null);
        return Some(QmpMessage::Event(QmpEvent {
            name: name.to_owned(),
            data,
        }));
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        return Some(QmpMessage::Other);
    };
    let result = if let Some(r) = v.get("return") {
        Ok(r.clone())
    } else {
        let e = v.get("error").cloned().unwrap_or(Value::Null);
        let s = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Err((s("class"), s("desc")))
    };
    Some(QmpMessage::Reply { id, result })
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<QmpEvent>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        match parse_message(&line) {
            None => tracing::warn!(line = %line, "unparsable QMP message"),
            Some(QmpMessage::Event(ev)) => {
                // The receiver may be gone (nobody watching): events are then dropped.
                let _ = events.send(ev);
            }
            Some(QmpMessage::Reply { id, result }) => {
                let tx = pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(tx) = tx {
                    let _ = tx.send(result);
                }
            }
            Some(QmpMessage::Other) => {}
        }
    }
    // Closed: fail everything still waiting, and everything sent from now on.
    closed.store(true, Ordering::Release);
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    /// A scripted QMP peer: greets, acknowledges capabilities, answers `query-status`
    /// after emitting an event, rejects anything else, closes on `quit`.
    async fn scripted_server(listener: UnixListener) {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let _ = w
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await;
        while let Ok(Some(l)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
            let id = v["id"].clone();
            let out = match v["execute"].as_str() {
                Some("qmp_capabilities") => json!({"return": {}, "id": id}).to_string(),
                Some("query-status") => format!(
                    "{}\n{}",
                    json!({"event": "RESUME", "timestamp": {}}),
                    json!({"return": {"status": "running", "running": true}, "id": id})
                ),
                Some("quit") => return,
                _ => json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id})
                    .to_string(),
            };
            let _ = w.write_all(format!("{out}\n").as_bytes()).await;
        }
    }

    #[test]
    fn classifies_messages() {
        assert_eq!(parse_message("not json"), None);
        assert_eq!(
            parse_message(r#"{"event":"STOP"}"#),
            Some(QmpMessage::Event(QmpEvent {
                name: "STOP".into(),
                data: Value::Null
            }))
        );
        assert_eq!(
            parse_message(r#"{"return":{"status":"running"},"id":7}"#),
            Some(QmpMessage::Reply {
                id: 7,
                result: Ok(json!({"status": "running"}))
            })
        );
        assert_eq!(
            parse_message(r#"{"error":{"class":"GenericError","desc":"no"},"id":8}"#),
            Some(QmpMessage::Reply {
                id: 8,
                result: Err(("GenericError".into(), "no".into()))
            })
        );
        assert_eq!(
            parse_message(r#"{"return":{},"id":-1}"#),
            Some(QmpMessage::Other)
        );
        assert_eq!(parse_message("[1]"), Some(QmpMessage::Other));
    }

    #[tokio::test]
    async fn routes_replies_and_events_and_reports_errors_and_close() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(scripted_server(listener));
        let (qmp, mut events) = QmpClient::connect(&path)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(qmp.query_status().await.ok().as_deref(), Some("running"));
        assert_eq!(
            events.recv().await.map(|e| e.name).as_deref(),
            Some("RESUME")
        );
        let err = qmp.execute("frobnicate", Some(json!({"x": 1}))).await;
        assert!(
            matches!(err, Err(QmpError::Command { ref class, .. }) if class == "CommandNotFound"),
            "{err:?}"
        );
        assert!(qmp.quit().await.is_ok());
        assert!(
            events.recv().await.is_none(),
            "event stream ends when the socket closes"
        );
        assert!(matches!(
            qmp.query_status().await,
            Err(QmpError::Closed | QmpError::Send { .. })
        ));
    }
}
