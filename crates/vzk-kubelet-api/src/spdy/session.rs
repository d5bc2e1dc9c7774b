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
//! * Outbound frames are encoded straight into one session buffer (a stream's write is
//!   copied once, into it) that the writer task swaps for its spare and writes in one
//!   go: no allocation per frame, one TLS write per batch (or, through a
//!   [`BatchWriter`] of messages, the batch's buffer becomes the message). While the
//!   writer is busy, consecutive writes of one stream grow the DATA frame still waiting
//!   in the buffer (up to [`SessionConfig::max_data_frame`]) instead of adding frames.
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
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::PollSemaphore;
use tracing::{debug, trace, warn};

use super::frame::{
    FLAG_FIN, Frame, FrameDecoder, FrameEncoder, MAX_PAYLOAD, put_data_header, rst, set_data_len,
};
use super::headers::{HeaderError, Headers};

/// Limits of a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Inbound DATA frames buffered per stream before the reader stops reading.
    pub inbound_frames_per_stream: usize,
    /// Outbound bytes queued for the writer task before stream writes wait.
    pub outbound_queue_bytes: usize,
    /// Largest DATA frame we send (at most 2^24 − 1; Go's spdystream takes any).
    pub max_data_frame: usize,
    /// Streams announced but not yet taken by [`Session::next_stream`].
    pub pending_streams: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            inbound_frames_per_stream: 16,
            outbound_queue_bytes: 1 << 20,
            max_data_frame: 256 * 1024,
            pending_streams: 64,
        }
    }
}

/// Where a session's writer task puts its encoded frames: one batch at a time, in order.
///
/// [`Session::start`] writes batches to an `AsyncWrite` (one `write_all` and a flush
/// each). A transport of messages (the SPDY-in-WebSocket tunnel) takes the batch's buffer
/// instead of copying it: [`Session::start_with`].
pub trait BatchWriter: Send + 'static {
    /// Writes all of `batch`. The writer may take the buffer; `batch` is cleared after.
    fn write_batch(&mut self, batch: &mut Vec<u8>) -> impl Future<Output = io::Result<()>> + Send;

    /// The session has been idle a while: give back memory kept for the next batches.
    fn idle(&mut self) {}

    /// Ends the transport once the last batch is written.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// A [`BatchWriter`] over a byte stream.
struct IoWriter<W>(W);

impl<W: AsyncWrite + Unpin + Send + 'static> BatchWriter for IoWriter<W> {
    async fn write_batch(&mut self, batch: &mut Vec<u8>) -> io::Result<()> {
        self.0.write_all(batch).await?;
        self.0.flush().await
    }

    async fn close(&mut self) {
        let _ = self.0.flush().await;
        let _ = self.0.shutdown().await;
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

/// Bytes of the transport read at a time (at least; a large frame reads more).
const READ_BUFFER: usize = 64 * 1024;
/// Capacity the writer's two buffers keep once the session has been idle for
/// [`IDLE_RELEASE`] (a burst grows them to the largest batch it wrote).
const IDLE_KEEP: usize = 64 * 1024;
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(1);
/// Received bytes acknowledged by WINDOW_UPDATE once this many accumulate (per stream and
/// for the session): half of SPDY/3.1's default 64 KiB window, so a strict peer never
/// waits on us.
const WINDOW_UPDATE_EVERY: u32 = 32 * 1024;

/// What the writer task has yet to write: encoded frames, in order.
struct Outbound {
    buf: Vec<u8>,
    encoder: FrameEncoder,
    /// Outbound credit held by the bytes in `buf` (returned once they are written).
    credit: usize,
    /// The last frame in `buf` is a DATA frame of this stream starting at this offset,
    /// and may grow.
    open_data: Option<(u32, usize)>,
    /// The writer is to stop once `buf` is written.
    close: bool,
    /// The writer is gone: nothing queued will be written.
    dead: bool,
}

#[derive(Debug, Default)]
struct StreamState {
    reset: AtomicBool,
    local_fin: AtomicBool,
    peer_fin: AtomicBool,
}

struct Shared {
    out: Mutex<Outbound>,
    wake_writer: Notify,
    credit: Arc<Semaphore>,
    streams: Mutex<HashMap<u32, Arc<StreamState>>>,
    max_data_frame: usize,
}

impl Shared {
    /// Runs `f` on the outbound buffer unless the writer is gone, then wakes the writer.
    fn with_out<R>(&self, f: impl FnOnce(&mut Outbound) -> R) -> Option<R> {
        let r = {
            let mut out = self.out.lock().ok()?;
            if out.dead {
                return None;
            }
            f(&mut out)
        };
        self.wake_writer.notify_one();
        Some(r)
    }

    /// Queues `frame` holding `credit`; `false` when the session's writer is gone.
    fn queue(&self, frame: Frame, credit: usize) -> bool {
        self.with_out(|out| {
            out.open_data = None;
            out.credit += credit;
            let Outbound { buf, encoder, .. } = out;
            if let Err(error) = encoder.encode_into(frame, buf) {
                warn!(%error, "spdy: cannot encode a frame");
            }
        })
        .is_some()
    }

    fn send(&self, frame: Frame) -> bool {
        self.queue(frame, 0)
    }

    /// Appends `data` to stream `id` (its credit already taken): grows the stream's DATA
    /// frame at the end of the buffer when there is one, else starts a frame.
    fn queue_data(&self, id: u32, data: &[u8]) -> bool {
        let max = self.max_data_frame;
        self.with_out(|out| {
            out.credit += data.len();
            if let Some((sid, at)) = out.open_data
                && sid == id
                && let Some(header) = out.buf.get_mut(at..at + 8)
            {
                let len = u32::from_be_bytes([0, header[5], header[6], header[7]]) as usize;
                if len + data.len() <= max {
                    set_data_len(header, len + data.len());
                    out.buf.extend_from_slice(data);
                    return;
                }
            }
            let at = out.buf.len();
            put_data_header(&mut out.buf, id, false, data.len());
            out.buf.extend_from_slice(data);
            out.open_data = Some((id, at));
        })
        .is_some()
    }

    /// Asks the writer to stop once what is queued is written.
    fn close(&self) {
        if let Ok(mut out) = self.out.lock() {
            out.close = true;
        }
        self.wake_writer.notify_one();
    }

    /// Queues a control frame answering the peer once outbound credit allows it; `false`
    /// when the session's writer is gone.
    async fn answer(&self, frame: Frame) -> bool {
        let cost = u32::try_from(CONTROL_CREDIT).unwrap_or(u32::MAX);
        match self.credit.acquire_many(cost).await {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        self.queue(frame, CONTROL_CREDIT)
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
        let (rd, wr) = tokio::io::split(io);
        Self::start_with(rd, IoWriter(wr), config)
    }

    /// Starts serving a SPDY connection that arrives on `rd` and leaves through `wr`.
    pub fn start_with<R, W>(rd: R, wr: W, config: SessionConfig) -> Result<Self, SessionError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: BatchWriter,
    {
        let encoder = FrameEncoder::new().map_err(SessionError::CreateCompressor)?;
        let shared = Arc::new(Shared {
            out: Mutex::new(Outbound {
                buf: Vec::new(),
                encoder,
                credit: 0,
                open_data: None,
                close: false,
                dead: false,
            }),
            wake_writer: Notify::new(),
            credit: Arc::new(Semaphore::new(config.outbound_queue_bytes.max(1))),
            streams: Mutex::new(HashMap::new()),
            // A write waits for credit of its size: never more than there is.
            max_data_frame: config
                .max_data_frame
                .min(config.outbound_queue_bytes)
                .clamp(1, MAX_PAYLOAD),
        });
        let (accept_tx, incoming) = mpsc::channel(config.pending_streams.max(1));
        let writer = tokio::spawn(write_loop(wr, shared.clone()));
        let reader = tokio::spawn(read_loop(
            FramedRead::with_capacity(rd, FrameDecoder::new(), READ_BUFFER),
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
        self.shared.close();
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
        self.reader.abort();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.close();
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
    // Received bytes not yet acknowledged by WINDOW_UPDATE: per stream, and the session's.
    let mut unacked: HashMap<u32, u32> = HashMap::new();
    let mut session_unacked = 0u32;
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
                if len > 0 && !fin {
                    let pending = unacked.entry(stream_id).or_insert(0);
                    *pending = pending.saturating_add(len);
                    if *pending >= WINDOW_UPDATE_EVERY {
                        let delta = std::mem::take(pending);
                        if !shared
                            .answer(Frame::WindowUpdate { stream_id, delta })
                            .await
                        {
                            break;
                        }
                    }
                }
                session_unacked = session_unacked.saturating_add(len);
                if session_unacked >= WINDOW_UPDATE_EVERY {
                    let delta = std::mem::take(&mut session_unacked);
                    let update = Frame::WindowUpdate {
                        stream_id: 0,
                        delta,
                    };
                    if !shared.answer(update).await {
                        break;
                    }
                }
                if fin {
                    inbound.remove(&stream_id);
                    unacked.remove(&stream_id);
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
                unacked.remove(&stream_id);
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

async fn write_loop<W: BatchWriter>(mut wr: W, shared: Arc<Shared>) {
    let mut spare: Vec<u8> = Vec::new();
    let mut failed = false;
    loop {
        let (credit, close) = {
            let Ok(mut out) = shared.out.lock() else {
                failed = true;
                break;
            };
            std::mem::swap(&mut out.buf, &mut spare);
            out.open_data = None;
            (std::mem::take(&mut out.credit), out.close)
        };
        if spare.is_empty() {
            if close {
                break;
            }
            let woken = tokio::time::timeout(IDLE_RELEASE, shared.wake_writer.notified()).await;
            if woken.is_err() {
                // Idle: give back what a burst grew, then wait as long as it takes.
                if spare.capacity() > IDLE_KEEP {
                    spare = Vec::new();
                }
                wr.idle();
                if let Ok(mut out) = shared.out.lock()
                    && out.buf.is_empty()
                    && out.buf.capacity() > IDLE_KEEP
                {
                    out.buf = Vec::new();
                }
                shared.wake_writer.notified().await;
            }
            continue;
        }
        let res = wr.write_batch(&mut spare).await;
        spare.clear();
        if credit > 0 {
            shared.credit.add_permits(credit);
        }
        if let Err(error) = res {
            debug!(%error, "spdy: writing to the peer failed");
            failed = true;
            break;
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
                shared.send(Frame::RstStream {
                    stream_id: id,
                    status: rst::CANCEL,
                });
            }
        }
        let mut last = shared
            .out
            .lock()
            .map(|mut out| std::mem::take(&mut out.buf))
            .unwrap_or_default();
        if !last.is_empty() {
            let _ = wr.write_batch(&mut last).await;
        }
        wr.close().await;
    }
    if let Ok(mut out) = shared.out.lock() {
        out.dead = true;
        out.buf = Vec::new();
    }
    shared.reset_all();
    shared.credit.close();
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

/// Serves a read from `buf`, received bytes held without a copy: as much as fits.
pub(crate) fn read_from(buf: &mut Bytes, out: &mut ReadBuf<'_>) {
    let n = buf.len().min(out.remaining());
    out.put_slice(&buf.split_to(n));
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
        read_from(&mut self.buf, out);
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
        if !self.shared.queue_data(self.id, &data[..n]) {
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
