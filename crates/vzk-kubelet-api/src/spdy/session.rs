//! The server side of one SPDY/3.1 connection, shaped for Go's spdystream peers.
//!
//! [`Session::start`] splits the transport into a reader task and a writer task. The
//! peer opens every stream; each arrives as an [`IncomingStream`] from
//! [`Session::next_stream`], to be accepted (SYN_REPLY, then a [`SpdyStream`] that is an
//! `AsyncRead + AsyncWrite`) or rejected (RST_STREAM).
//!
//! # Contract
//! * Stream IDs from the peer must be odd and increasing; others get RST PROTOCOL_ERROR.
//! * Data is never sent on a stream before its SYN_REPLY (both go through one ordered
//!   queue, and a [`SpdyStream`] exists only after accept).
//! * Sends never wait for the peer's flow-control window (spdystream sends no
//!   WINDOW_UPDATE); we send WINDOW_UPDATEs for what we receive, for strict peers.
//! * Back-pressure: a stream's inbound queue is bounded; when it is full the reader stops
//!   reading the transport. Outbound bytes queued but not yet written are bounded too,
//!   and so are the control frames the reader queues in answer to the peer (PING echoes,
//!   WINDOW_UPDATEs, RST_STREAMs, GOAWAY): each takes [`CONTROL_CREDIT`] of the same
//!   outbound credit, so a peer that sends without reading stalls its own reads instead
//!   of growing the queue.
//! * PINGs from the peer are echoed; GOAWAY stops new streams; EOF or a framing error
//!   ends the session: reads see EOF, writes fail with `BrokenPipe`.
//! * Dropping a [`SpdyStream`] half-closes it (empty DATA + FIN) unless it was reset;
//!   [`Session::close`] flushes, resets the streams we did not finish, and closes the
//!   transport.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::PollSemaphore;
use tracing::{debug, trace, warn};

use super::frame::{FLAG_FIN, Frame, FrameDecoder, FrameEncoder, rst};
use super::headers::{HeaderError, Headers};

/// Limits of a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Inbound DATA frames buffered per stream before the reader stops reading.
    pub inbound_frames_per_stream: usize,
    /// Outbound bytes queued for the writer task before stream writes wait.
    pub outbound_queue_bytes: usize,
    /// Largest DATA frame we send.
    pub max_data_frame: usize,
    /// Streams announced but not yet taken by [`Session::next_stream`].
    pub pending_streams: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            inbound_frames_per_stream: 16,
            outbound_queue_bytes: 1 << 20,
            max_data_frame: 32 * 1024,
            pending_streams: 64,
        }
    }
}

/// Starting a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Creating the header compressor.
    #[error("creating the header compressor")]
    CreateCompressor(#[source] HeaderError),
}

/// Outbound credit a control frame queued by the reader takes (about its size on the
/// wire, rounded up; the queue entry itself is a few dozen bytes).
pub const CONTROL_CREDIT: usize = 32;

enum Outgoing {
    Frame { frame: Frame, credit: usize },
    Close,
}

#[derive(Debug, Default)]
struct StreamState {
    reset: AtomicBool,
    local_fin: AtomicBool,
    peer_fin: AtomicBool,
}

struct Shared {
    out: mpsc::UnboundedSender<Outgoing>,
    credit: Arc<Semaphore>,
    streams: Mutex<HashMap<u32, Arc<StreamState>>>,
    max_data_frame: usize,
}

impl Shared {
    fn send(&self, frame: Frame) -> bool {
        self.out.send(Outgoing::Frame { frame, credit: 0 }).is_ok()
    }

    /// Queues a control frame answering the peer once outbound credit allows it; `false`
    /// when the session's writer is gone.
    async fn answer(&self, frame: Frame) -> bool {
        let cost = u32::try_from(CONTROL_CREDIT).unwrap_or(u32::MAX);
        match self.credit.acquire_many(cost).await {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        self.out
            .send(Outgoing::Frame {
                frame,
                credit: CONTROL_CREDIT,
            })
            .is_ok()
    }

    fn forget_if_done(&self, id: u32, st: &StreamState) {
        let done = st.reset.load(Ordering::Acquire)
            || (st.local_fin.load(Ordering::Acquire) && st.peer_fin.load(Ordering::Acquire));
        if done && let Ok(mut map) = self.streams.lock() {
            map.remove(&id);
        }
    }

    fn reset_all(&self) {
        if let Ok(mut map) = self.streams.lock() {
            for st in map.values() {
                st.reset.store(true, Ordering::Release);
            }
            map.clear();
        }
    }
}

/// One server-side SPDY session.
pub struct Session {
    incoming: mpsc::Receiver<IncomingStream>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Starts serving a SPDY connection on `io` (already upgraded).
    pub fn start<T>(io: T, config: SessionConfig) -> Result<Self, SessionError>
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let encoder = FrameEncoder::new().map_err(SessionError::CreateCompressor)?;
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            out: out_tx,
            credit: Arc::new(Semaphore::new(config.outbound_queue_bytes)),
            streams: Mutex::new(HashMap::new()),
            max_data_frame: config.max_data_frame.max(1),
        });
        let (accept_tx, incoming) = mpsc::channel(config.pending_streams.max(1));
        let writer = tokio::spawn(write_loop(
            FramedWrite::new(wr, encoder),
            out_rx,
            shared.clone(),
        ));
        let reader = tokio::spawn(read_loop(
            FramedRead::new(rd, FrameDecoder::new()),
            shared.clone(),
            accept_tx,
            config,
        ));
        Ok(Self {
            incoming,
            shared,
            reader,
            writer: Some(writer),
        })
    }

    /// The next stream the peer opened; `None` once the session ended or the peer sent
    /// GOAWAY.
    pub async fn next_stream(&mut self) -> Option<IncomingStream> {
        self.incoming.recv().await
    }

    /// Flushes what is queued, resets streams we did not finish, and closes the
    /// transport.
    pub async fn close(mut self) {
        let _ = self.shared.out.send(Outgoing::Close);
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
        self.reader.abort();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.shared.out.send(Outgoing::Close);
        self.reader.abort();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameDecoder>,
    shared: Arc<Shared>,
    accept_tx: mpsc::Sender<IncomingStream>,
    config: SessionConfig,
) {
    let mut inbound: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut accept = Some(accept_tx);
    let mut last_id = 0u32;
    while let Some(next) = frames.next().await {
        let frame = match next {
            Ok(f) => f,
            Err(error) => {
                warn!(%error, "spdy: bad frame from peer, ending session");
                // One last frame without waiting for credit: the session ends here, so
                // nothing grows, and a peer that never reads cannot hold the end up.
                shared.send(Frame::GoAway {
                    last_good_stream_id: last_id,
                    status: 1,
                });
                break;
            }
        };
        trace!(?frame, "spdy: frame in");
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                if stream_id % 2 == 0 || stream_id <= last_id {
                    debug!(stream_id, last_id, "spdy: invalid stream id");
                    let rst = Frame::RstStream {
                        stream_id,
                        status: rst::PROTOCOL_ERROR,
                    };
                    if !shared.answer(rst).await {
                        break;
                    }
                    continue;
                }
                last_id = stream_id;
                let Some(acc) = accept.as_ref() else {
                    let rst = Frame::RstStream {
                        stream_id,
                        status: rst::REFUSED_STREAM,
                    };
                    if !shared.answer(rst).await {
                        break;
                    }
                    continue;
                };
                let state = Arc::new(StreamState::default());
                let (tx, rx) = mpsc::channel(config.inbound_frames_per_stream.max(1));
                if flags & FLAG_FIN != 0 {
                    state.peer_fin.store(true, Ordering::Release);
                } else {
                    inbound.insert(stream_id, tx);
                }
                if let Ok(mut map) = shared.streams.lock() {
                    map.insert(stream_id, state.clone());
                }
                let stream = SpdyStream {
                    id: stream_id,
                    state,
                    rx,
                    buf: Bytes::new(),
                    shared: shared.clone(),
                    credit: PollSemaphore::new(shared.credit.clone()),
                };
                let incoming = IncomingStream {
                    headers,
                    stream: Some(stream),
                };
                if acc.send(incoming).await.is_err() {
                    // Nobody takes streams any more; `IncomingStream`'s drop refused it.
                    accept = None;
                }
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                if let Some(tx) = inbound.get(&stream_id)
                    && !data.is_empty()
                    && tx.send(data).await.is_err()
                {
                    trace!(stream_id, "spdy: data for a stream nobody reads, dropped");
                }
                if len > 0 {
                    let stream = Frame::WindowUpdate {
                        stream_id,
                        delta: len,
                    };
                    let session = Frame::WindowUpdate {
                        stream_id: 0,
                        delta: len,
                    };
                    if !(shared.answer(stream).await && shared.answer(session).await) {
                        break;
                    }
                }
                if fin {
                    inbound.remove(&stream_id);
                    let st = shared
                        .streams
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&stream_id).cloned());
                    if let Some(st) = st {
                        st.peer_fin.store(true, Ordering::Release);
                        shared.forget_if_done(stream_id, &st);
                    }
                }
            }
            Frame::RstStream { stream_id, status } => {
                debug!(stream_id, status, "spdy: stream reset by peer");
                inbound.remove(&stream_id);
                let st = shared
                    .streams
                    .lock()
                    .ok()
                    .and_then(|mut m| m.remove(&stream_id));
                if let Some(st) = st {
                    st.reset.store(true, Ordering::Release);
                }
            }
            Frame::Ping { id } => {
                if id % 2 == 1 && !shared.answer(Frame::Ping { id }).await {
                    break;
                }
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                debug!(last_good_stream_id, status, "spdy: peer sent GOAWAY");
                accept = None;
            }
            other => trace!(frame = ?other, "spdy: frame ignored"),
        }
    }
    debug!("spdy: peer closed the session");
    drop(inbound);
    shared.reset_all();
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut sink: FramedWrite<W, FrameEncoder>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut failed = false;
    while let Some(msg) = rx.recv().await {
        match msg {
            Outgoing::Frame { frame, credit } => {
                let res = if rx.is_empty() {
                    sink.send(frame).await
                } else {
                    sink.feed(frame).await
                };
                if credit > 0 {
                    shared.credit.add_permits(credit);
                }
                if let Err(error) = res {
                    debug!(%error, "spdy: writing to the peer failed");
                    failed = true;
                    break;
                }
            }
            Outgoing::Close => break,
        }
    }
    if !failed {
        let open: Vec<(u32, Arc<StreamState>)> = shared
            .streams
            .lock()
            .map(|m| m.iter().map(|(id, st)| (*id, st.clone())).collect())
            .unwrap_or_default();
        for (id, st) in open {
            if !st.local_fin.load(Ordering::Acquire) && !st.reset.load(Ordering::Acquire) {
                let _ = sink
                    .feed(Frame::RstStream {
                        stream_id: id,
                        status: rst::CANCEL,
                    })
                    .await;
            }
        }
        let _ = sink.flush().await;
        let _ = sink.get_mut().shutdown().await;
    }
    shared.reset_all();
    shared.credit.close();
    rx.close();
}

/// A stream the peer opened, waiting to be accepted or rejected. Dropping it refuses
/// the stream (RST_STREAM REFUSED_STREAM).
pub struct IncomingStream {
    headers: Headers,
    stream: Option<SpdyStream>,
}

impl std::fmt::Debug for IncomingStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingStream")
            .field("id", &self.id())
            .field("headers", &self.headers)
            .finish()
    }
}

impl IncomingStream {
    /// The stream ID.
    pub fn id(&self) -> u32 {
        self.stream.as_ref().map_or(0, |s| s.id)
    }

    /// The SYN_STREAM headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Accepts the stream: sends an empty SYN_REPLY and returns the stream.
    pub fn accept(mut self) -> Option<SpdyStream> {
        let stream = self.stream.take()?;
        stream.shared.send(Frame::SynReply {
            stream_id: stream.id,
            fin: false,
            headers: Headers::new(),
        });
        Some(stream)
    }

    /// Rejects the stream with RST_STREAM `status`.
    pub fn reject(mut self, status: u32) {
        if let Some(s) = self.stream.take() {
            s.reset(status);
        }
    }
}

impl Drop for IncomingStream {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            s.reset(rst::REFUSED_STREAM);
        }
    }
}

/// An accepted stream: read the peer's data, write ours. Shutting down the write side
/// (or dropping) sends FIN.
pub struct SpdyStream {
    id: u32,
    state: Arc<StreamState>,
    rx: mpsc::Receiver<Bytes>,
    buf: Bytes,
    shared: Arc<Shared>,
    credit: PollSemaphore,
}

impl std::fmt::Debug for SpdyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdyStream")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish()
    }
}

impl SpdyStream {
    /// The stream ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Resets the stream (RST_STREAM `status`); further writes fail.
    pub fn reset(&self, status: u32) {
        if !self.state.reset.swap(true, Ordering::AcqRel) {
            self.shared.send(Frame::RstStream {
                stream_id: self.id,
                status,
            });
            if let Ok(mut m) = self.shared.streams.lock() {
                m.remove(&self.id);
            }
        }
    }

    /// Writes all of `data` (convenience for small control messages).
    pub async fn write_all_bytes(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await
    }

    fn send_fin(&self) {
        if self.state.reset.load(Ordering::Acquire) {
            return;
        }
        if !self.state.local_fin.swap(true, Ordering::AcqRel) {
            self.shared.send(Frame::Data {
                stream_id: self.id,
                fin: true,
                data: Bytes::new(),
            });
            self.shared.forget_if_done(self.id, &self.state);
        }
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "spdy stream closed")
}

impl AsyncRead for SpdyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            match ready!(self.rx.poll_recv(cx)) {
                Some(b) => self.buf = b,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        let chunk = self.buf.split_to(n);
        out.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SpdyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.state.reset.load(Ordering::Acquire) || self.state.local_fin.load(Ordering::Acquire)
        {
            return Poll::Ready(Err(broken()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(self.shared.max_data_frame);
        let permits = u32::try_from(n).unwrap_or(u32::MAX);
        let Some(permit) = ready!(self.credit.poll_acquire_many(cx, permits)) else {
            return Poll::Ready(Err(broken()));
        };
        permit.forget();
        let frame = Frame::Data {
            stream_id: self.id,
            fin: false,
            data: Bytes::copy_from_slice(&data[..n]),
        };
        if self
            .shared
            .out
            .send(Outgoing::Frame { frame, credit: n })
            .is_err()
        {
            return Poll::Ready(Err(broken()));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send_fin();
        Poll::Ready(Ok(()))
    }
}

impl Drop for SpdyStream {
    fn drop(&mut self) {
        self.send_fin();
    }
}
