//! The I/O that the kubelet API hands a provider for logs, exec, attach and
//! port-forward. Protocol framing (SPDY, WebSocket) is the kubelet API's business; a
//! provider sees plain async byte streams.

use std::pin::Pin;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// A boxed reader (stdin of an exec/attach).
pub type BoxReader = Pin<Box<dyn AsyncRead + Send>>;
/// A boxed writer (stdout/stderr of an exec/attach).
pub type BoxWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// A bidirectional byte stream (one port-forward connection).
pub trait PortIo: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> PortIo for T {}
/// A boxed port-forward connection.
pub type PortStream = Pin<Box<dyn PortIo>>;

/// A log stream: chunks of container output, already filtered and formatted according
/// to the [`LogOptions`] (timestamps prefixed, tail/since/limit applied).
pub type LogStream = BoxStream<'static, std::io::Result<Bytes>>;

/// One container of one pod, as named in a kubelet API path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID if the request named one (exec/attach paths may carry it).
    pub uid: Option<String>,
    /// Container name.
    pub container: String,
}

/// Terminal size from a resize event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TermSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The streams of an exec or attach session. A `None` stream was not requested.
pub struct AttachIo {
    /// Input for the process; EOF means the client closed stdin.
    pub stdin: Option<BoxReader>,
    /// Process standard output (with a TTY: the terminal output).
    pub stdout: Option<BoxWriter>,
    /// Process standard error (never present with a TTY).
    pub stderr: Option<BoxWriter>,
    /// Whether a terminal was requested.
    pub tty: bool,
    /// Terminal resize events, in order; present only with `tty`.
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

impl std::fmt::Debug for AttachIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("tty", &self.tty)
            .field("resize", &self.resize.is_some())
            .finish()
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code 0–255 (a signal `n` is reported as `128 + n`).
    pub code: i32,
}

impl ExitStatus {
    /// Exit code 0.
    pub const SUCCESS: Self = Self { code: 0 };

    /// Whether the process exited 0.
    pub fn success(self) -> bool {
        self.code == 0
    }
}

/// Options of a `/containerLogs` request (the kubelet's `PodLogOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep the stream open and send new output.
    pub follow: bool,
    /// Only the last N lines.
    pub tail_lines: Option<u64>,
    /// Only output newer than this many seconds.
    pub since_seconds: Option<u64>,
    /// Only output newer than this time (RFC 3339).
    pub since_time: Option<DateTime<Utc>>,
    /// Prefix each line with its RFC 3339 timestamp.
    pub timestamps: bool,
    /// Stop after this many bytes.
    pub limit_bytes: Option<u64>,
    /// Logs of the previous (terminated) instance of the container.
    pub previous: bool,
}
