//! A small NBD (Network Block Device) server on Unix sockets, for read-only and writable exports.
//!
//! - Read-only: a VM disk is served while its image is still being fetched. QEMU opens a qcow2
//!   overlay whose backing file is `nbd+unix:///disk?socket=…`, served here from an async
//!   [`Export`]; writes go to the overlay. The export is advertised `NBD_FLAG_READ_ONLY` and
//!   write requests get `EPERM`.
//! - Writable ([`Export::writable`]): a pod's own copy-on-write disk, attached directly as a raw
//!   disk (Virtualization.framework's `VZNetworkBlockDeviceStorageDeviceAttachment`, or QEMU's
//!   `-drive file=nbd+unix:///disk?socket=…,format=raw`). `NBD_CMD_WRITE`,
//!   `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_FLUSH` and the `NBD_CMD_FLAG_FUA` flag are served through
//!   [`Export::write_at`], [`Export::write_zeroes`] and [`Export::flush`].
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>. Only the fixed
//! newstyle handshake and simple replies are implemented. Requests of a connection run
//! concurrently and may be answered out of order. An export that fails a request gets an error
//! reply for that request only (never partial or wrong data) and the connection keeps serving:
//! `EIO` for reads; for writes and flushes `ENOSPC` (out of space), `EPERM` (permission denied)
//! or `EIO`.
//!
//! Write ordering and durability:
//! - A write's payload is read from the socket by the request loop (it follows the header); the
//!   write then runs concurrently with the other requests, and its reply is sent only once
//!   [`Export::write_at`] (and, with `NBD_CMD_FLAG_FUA`, a following [`Export::flush`]) returned.
//! - `NBD_CMD_FLUSH` calls [`Export::flush`] once the request has been read. Every write the
//!   client had seen a reply to when it sent the flush had returned from `write_at` by then, so
//!   the export's contract (make durable whatever returned before the call) gives the protocol's
//!   guarantee: the flush is answered only once all writes answered before it are durable.
//!   Writes still in flight when the flush arrives may or may not be covered, as the protocol
//!   allows.
//! - The export is shared by every connection and advertised `NBD_FLAG_CAN_MULTI_CONN`: a write
//!   that returned must be visible to reads of every connection, and a flush must cover writes
//!   from every connection.
//! - Nothing is flushed implicitly when a client disconnects.
//!
//! Size limits: reads and writes carry at most [`ServerOptions::max_request`] bytes (advertised as
//! the maximum payload size). A larger write payload is still read and thrown away, and refused
//! with `EINVAL`, if it is at most 32 MiB (the protocol says payloads up to 2^25 bytes SHOULD NOT
//! be treated as a denial of service); beyond both limits the server hangs up
//! ([`NbdError::RequestTooLarge`]), since it cannot answer without reading it all.
//! `NBD_CMD_WRITE_ZEROES` has no payload and may cover any length within the export.

use std::io;
use std::sync::Arc;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

#[cfg(test)]
mod tests;

/// Wire constants from the NBD protocol document.
mod proto {
    pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
    pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
    pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
    pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
    pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub(crate) const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    pub(crate) const OPT_EXPORT_NAME: u32 = 1;
    pub(crate) const OPT_ABORT: u32 = 2;
    pub(crate) const OPT_LIST: u32 = 3;
    pub(crate) const OPT_INFO: u32 = 6;
    pub(crate) const OPT_GO: u32 = 7;
    pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;

    pub(crate) const REP_ACK: u32 = 1;
    pub(crate) const REP_SERVER: u32 = 2;
    pub(crate) const REP_INFO: u32 = 3;
    pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub(crate) const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub(crate) const INFO_EXPORT: u16 = 0;
    pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

    pub(crate) const CMD_READ: u16 = 0;
    pub(crate) const CMD_WRITE: u16 = 1;
    pub(crate) const CMD_DISC: u16 = 2;
    pub(crate) const CMD_FLUSH: u16 = 3;
    pub(crate) const CMD_TRIM: u16 = 4;
    pub(crate) const CMD_WRITE_ZEROES: u16 = 6;

    pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
    pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

    pub(crate) const EPERM: u32 = 1;
    pub(crate) const EIO: u32 = 5;
    pub(crate) const EINVAL: u32 = 22;
    pub(crate) const ENOSPC: u32 = 28;
}
use proto::*;

/// Largest option payload accepted during the handshake.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_BLOCK: u32 = 4096;
/// Write payloads up to this size are read (and thrown away) even above `max_request`: the
/// protocol says a payload of at most 2^25 bytes SHOULD NOT be taken for a denial of service.
const DISCARD_LIMIT: u32 = 1 << 25;
/// Largest zero buffer [`Export::write_zeroes`]'s default writes at once.
const ZERO_PIECE: u64 = 1 << 20;

/// What an export reads from and, if [`writable`](Export::writable), writes to.
///
/// Only [`size`](Export::size) and [`read_at`](Export::read_at) are required: the other methods
/// default to a read-only export. The methods are called concurrently, by the requests of one
/// connection and of several, possibly for overlapping ranges (a client must not assume any order
/// between its requests in flight). A call may be dropped before it completes when its
/// connection fails or the server shuts down; that request is then never answered, and the bytes
/// of its range are unspecified, but the export must stay usable.
#[async_trait::async_trait]
pub trait Export: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with the bytes at `offset` (`offset + buf.len() <= size`, checked by the server
    /// before calling). An error becomes an `EIO` reply to that request only.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Whether clients may write. Asked once per connection, at the handshake. If false (the
    /// default), the export is advertised read-only, write requests get `EPERM` and the write
    /// methods are never called.
    fn writable(&self) -> bool {
        false
    }

    /// Write `buf` at `offset` (`buf` is not empty, at most `max_request` bytes, in bounds —
    /// checked by the server before calling —, with any alignment). The request is answered once
    /// this returns; from then on reads of every connection must see the new bytes. An error
    /// becomes an error reply to that request only: `ENOSPC` for [`io::ErrorKind::StorageFull`],
    /// `QuotaExceeded` or `FileTooLarge`, `EPERM` for `PermissionDenied`, else `EIO`.
    ///
    /// The default refuses with `PermissionDenied`.
    async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let _ = (offset, buf);
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the export is read-only",
        ))
    }

    /// Make durable every write ([`write_at`](Export::write_at),
    /// [`write_zeroes`](Export::write_zeroes)) that returned before this call, from any
    /// connection. Called on writable exports for `NBD_CMD_FLUSH`, and after the write of a
    /// request flagged `NBD_CMD_FLAG_FUA`, before answering it. Errors are mapped as for
    /// `write_at`.
    ///
    /// The default does nothing (there is no cache, or durability does not matter).
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Make the `len` bytes at `offset` read as zeroes (`len > 0`, in bounds — checked by the
    /// server —; `len` may exceed `max_request`, as the request has no payload). Errors are
    /// mapped as for `write_at`.
    ///
    /// The default writes zero buffers of at most 1 MiB through [`write_at`](Export::write_at);
    /// override it where zeroing can be cheaper (punching a hole in a file, marking blocks of an
    /// overlay as zero).
    async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_PIECE) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_PIECE);
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range past the end"))?;
            self.write_at(at, &zeroes[..n as usize]).await?;
            done += n;
        }
        Ok(())
    }
}

/// The export name of [`ServerOptions::default`].
pub const DEFAULT_EXPORT: &str = "disk";

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name of the single export; the empty name (the default export) is accepted as well.
    pub export_name: String,
    /// Largest read or write a request may carry, in bytes; at least 4096. Advertised as the
    /// maximum payload size; see the crate docs for larger write payloads.
    pub max_request: u32,
    /// Requests of one connection served concurrently; at least 1.
    pub max_in_flight: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            export_name: DEFAULT_EXPORT.to_owned(),
            max_request: 32 << 20,
            max_in_flight: 16,
        }
    }
}

/// Errors ending a connection or the server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("option of {0} bytes is too large")]
    OptionTooLarge(u32),
    #[error("write payload of {0} bytes exceeds both the maximum request size and 32 MiB")]
    RequestTooLarge(u32),
    #[error("invalid server options: {0}")]
    InvalidOptions(&'static str),
}

/// Serve `export` on `listener` until `shutdown` fires; each connection runs in its own task.
/// On shutdown, open connections are dropped (in-flight requests are abandoned).
pub async fn serve(
    listener: UnixListener,
    export: Arc<dyn Export>,
    opts: ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), NbdError> {
    validate(&opts)?;
    let opts = Arc::new(opts);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let (export, opts) = (export.clone(), opts.clone());
                conns.spawn(async move {
                    match serve_connection(stream, export, &opts).await {
                        Ok(()) => debug!("nbd connection closed"),
                        Err(e) => warn!(error = %e, "nbd connection failed"),
                    }
                });
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning, the listener itself is still fine.
                warn!(error = %e, "nbd accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    info!(open = conns.len(), "nbd server shutting down");
    conns.shutdown().await;
    Ok(())
}

fn validate(opts: &ServerOptions) -> Result<(), NbdError> {
    if opts.max_request < PREFERRED_BLOCK {
        return Err(NbdError::InvalidOptions(
            "max_request must be at least 4096",
        ));
    }
    if opts.max_in_flight == 0 {
        return Err(NbdError::InvalidOptions("max_in_flight must be at least 1"));
    }
    Ok(())
}

/// Transmission flags advertised for an export.
fn transmission_flags(writable: bool) -> u16 {
    if writable {
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
    } else {
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    }
}

/// Serve one already-accepted connection: handshake, then requests until `NBD_CMD_DISC` or EOF.
/// Requests run concurrently (up to `max_in_flight`) and replies may go out of order.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    export: Arc<dyn Export>,
    opts: &ServerOptions,
) -> Result<(), NbdError> {
    validate(opts)?;
    let writable = export.writable();
    let tflags = transmission_flags(writable);
    let mut stream = BufReader::new(stream);
    if !handshake(&mut stream, export.size(), tflags, opts).await? {
        return Ok(());
    }
    debug!(export = %opts.export_name, writable, "nbd transmission phase");
    let (reader, writer) = tokio::io::split(stream);
    let mut writer = BufWriter::new(writer);
    let (tx, mut rx) = mpsc::channel::<Reply>(opts.max_in_flight + 1);
    let mut tasks = JoinSet::new();
    let writing = async move {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        while let Some(reply) = rx.recv().await {
            header[4..8].copy_from_slice(&reply.error.to_be_bytes());
            header[8..].copy_from_slice(&reply.handle.to_be_bytes());
            writer.write_all(&header).await?;
            writer.write_all(&reply.data).await?;
            if rx.is_empty() {
                writer.flush().await?;
            }
        }
        // All senders are gone: every accepted request has been answered.
        writer.flush().await?;
        let _ = writer.shutdown().await;
        Ok::<_, NbdError>(())
    };
    let reading = transmission(reader, export, writable, opts, tx, &mut tasks);
    tokio::try_join!(reading, writing).map(|_| ())
    // `tasks` is dropped here: on error, in-flight requests are aborted.
}

/// One reply waiting for the writer; the permit bounds the requests in flight (and the memory).
struct Reply {
    error: u32,
    handle: u64,
    data: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

/// Fixed newstyle handshake and option haggling. Returns false if the client aborted.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    size: u64,
    tflags: u16,
    opts: &ServerOptions,
) -> Result<bool, NbdError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let name_ok = |name: &[u8]| name.is_empty() || name == opts.export_name.as_bytes();

    loop {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if option != OPT_EXPORT_NAME {
                send_opt_reply(s, option, REP_ERR_TOO_BIG, &[]).await?;
            }
            return Err(NbdError::OptionTooLarge(len));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        debug!(option, len, "nbd option");

        match option {
            OPT_EXPORT_NAME => {
                if !name_ok(&data) {
                    // No way to report an error to this option: the session must end.
                    return Err(NbdError::UnknownExport(
                        String::from_utf8_lossy(&data).into(),
                    ));
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&size.to_be_bytes());
                reply.extend_from_slice(&tflags.to_be_bytes());
                if !no_zeroes {
                    reply.resize(reply.len() + 124, 0);
                }
                s.write_all(&reply).await?;
                s.flush().await?;
                return Ok(true);
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = send_opt_reply(s, option, REP_ACK, &[]).await;
                return Ok(false);
            }
            OPT_LIST if !data.is_empty() => send_opt_reply(s, option, REP_ERR_INVALID, &[]).await?,
            OPT_LIST => {
                let name = opts.export_name.as_bytes();
                let mut server = Vec::with_capacity(4 + name.len());
                server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                server.extend_from_slice(name);
                send_opt_reply(s, option, REP_SERVER, &server).await?;
                send_opt_reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    send_opt_reply(s, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                if !name_ok(name) {
                    send_opt_reply(s, option, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                }
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&tflags.to_be_bytes());
                send_opt_reply(s, option, REP_INFO, &export).await?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    let mut block = Vec::with_capacity(14);
                    block.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    for v in [1, PREFERRED_BLOCK, opts.max_request] {
                        block.extend_from_slice(&u32::to_be_bytes(v));
                    }
                    send_opt_reply(s, option, REP_INFO, &block).await?;
                }
                send_opt_reply(s, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            // Simple replies only; TLS, metadata contexts, extended headers, ...: not supported.
            OPT_STRUCTURED_REPLY => send_opt_reply(s, option, REP_ERR_UNSUP, &[]).await?,
            _ => send_opt_reply(s, option, REP_ERR_UNSUP, &[]).await?,
        }
    }
}

/// Parses NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count × u16 info types.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

async fn send_opt_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&reply_type.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await?;
    s.flush().await
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Answer at once with this error (0: success), without calling the export.
    Reply(u32),
    Read,
    /// The payload, read by the request loop, is handed to [`Op::run`].
    Write {
        fua: bool,
    },
    WriteZeroes {
        fua: bool,
    },
    Flush,
}

/// Checks a request against the export (its size, whether it is writable) and the options.
fn check_request(
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    size: u64,
    writable: bool,
    max_request: u32,
) -> Op {
    let in_bounds = offset
        .checked_add(len.into())
        .is_some_and(|end| end <= size);
    // NBD_FLAG_SEND_FUA (writable exports only) means accepting the FUA flag on any command.
    let fua_ok = if writable { CMD_FLAG_FUA } else { 0 };
    let flags_ok = |allowed: u16| flags & !allowed == 0;
    let fua = flags & CMD_FLAG_FUA != 0;
    match cmd {
        CMD_READ if !flags_ok(fua_ok) || len == 0 || len > max_request || !in_bounds => {
            Op::Reply(EINVAL)
        }
        CMD_READ => Op::Read,
        // Read-only: exactly as before writes were supported.
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM if !writable => Op::Reply(EPERM),
        CMD_FLUSH if !writable => Op::Reply(0),
        // The protocol says writes past the end SHOULD get ENOSPC (reads and trims EINVAL).
        CMD_WRITE if !flags_ok(CMD_FLAG_FUA) || len == 0 || len > max_request => Op::Reply(EINVAL),
        CMD_WRITE if !in_bounds => Op::Reply(ENOSPC),
        CMD_WRITE => Op::Write { fua },
        // NO_HOLE: zeroes are written or the equivalent, whatever the flag. FAST_ZERO is not
        // advertised, so it is an unknown flag here.
        CMD_WRITE_ZEROES if !flags_ok(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) || len == 0 => {
            Op::Reply(EINVAL)
        }
        CMD_WRITE_ZEROES if !in_bounds => Op::Reply(ENOSPC),
        CMD_WRITE_ZEROES => Op::WriteZeroes { fua },
        CMD_FLUSH if !flags_ok(CMD_FLAG_FUA) => Op::Reply(EINVAL),
        CMD_FLUSH => Op::Flush,
        // NBD_CMD_TRIM is not advertised for writable exports; CACHE, BLOCK_STATUS, unknown.
        _ => Op::Reply(EINVAL),
    }
}

/// The error code replied for a failed write or flush.
fn write_error_code(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        io::ErrorKind::PermissionDenied => EPERM,
        _ => EIO,
    }
}

impl Op {
    /// Runs a request on the export: the reply's error code and data.
    async fn run(
        self,
        export: &dyn Export,
        offset: u64,
        len: u32,
        payload: Vec<u8>,
    ) -> (u32, Vec<u8>) {
        let (what, result) = match self {
            Op::Reply(error) => return (error, Vec::new()),
            Op::Read => {
                let mut data = vec![0u8; len as usize];
                return match export.read_at(offset, &mut data).await {
                    Ok(()) => (0, data),
                    Err(e) => {
                        warn!(offset, len, error = %e, "nbd export read failed");
                        (EIO, Vec::new())
                    }
                };
            }
            Op::Write { fua } => (
                "write",
                write_then_flush(export.write_at(offset, &payload), export, fua).await,
            ),
            Op::WriteZeroes { fua } => (
                "write zeroes",
                write_then_flush(export.write_zeroes(offset, len.into()), export, fua).await,
            ),
            Op::Flush => ("flush", export.flush().await),
        };
        match result {
            Ok(()) => (0, Vec::new()),
            Err(e) => {
                let code = write_error_code(&e);
                warn!(offset, len, error = %e, code, "nbd export {what} failed");
                (code, Vec::new())
            }
        }
    }
}

/// Awaits a write, then with `fua` flushes it, before the request is answered.
async fn write_then_flush(
    write: impl Future<Output = io::Result<()>>,
    export: &dyn Export,
    fua: bool,
) -> io::Result<()> {
    write.await?;
    if fua {
        export.flush().await?;
    }
    Ok(())
}

/// Consumes the payload of an `NBD_CMD_WRITE`, which follows the header whatever the answer.
/// Returns it if `keep` (and it fits `max_request`), else reads it in pieces and throws it away.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u32,
    max_request: u32,
    keep: bool,
) -> Result<Vec<u8>, NbdError> {
    if len > max_request.max(DISCARD_LIMIT) {
        // Reading it all just to refuse it would be a denial of service: hang up.
        return Err(NbdError::RequestTooLarge(len));
    }
    if keep && len <= max_request {
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload).await?;
        return Ok(payload);
    }
    let copied = tokio::io::copy(&mut reader.take(len.into()), &mut tokio::io::sink()).await?;
    if copied != u64::from(len) {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Vec::new())
}

/// Reads requests until `NBD_CMD_DISC` or EOF, answering directly or via a spawned task (reads,
/// and on writable exports writes and flushes). Returning drops `tx`; the writer then finishes
/// once the in-flight tasks have replied.
async fn transmission<R: AsyncRead + Unpin>(
    reader: R,
    export: Arc<dyn Export>,
    writable: bool,
    opts: &ServerOptions,
    tx: mpsc::Sender<Reply>,
    tasks: &mut JoinSet<()>,
) -> Result<(), NbdError> {
    let mut reader = BufReader::new(reader);
    let in_flight = Arc::new(Semaphore::new(opts.max_in_flight));
    let size = export.size();
    loop {
        while tasks.try_join_next().is_some() {}
        if reader.fill_buf().await?.is_empty() {
            debug!("nbd client closed the connection without NBD_CMD_DISC");
            return Ok(());
        }
        let mut req = [0u8; 28];
        reader.read_exact(&mut req).await?;
        let magic = u32::from_be_bytes([req[0], req[1], req[2], req[3]]);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes([req[4], req[5]]);
        let cmd = u16::from_be_bytes([req[6], req[7]]);
        let handle = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(req[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([req[24], req[25], req[26], req[27]]);

        if cmd == CMD_DISC {
            debug!("nbd client disconnects");
            return Ok(());
        }
        // Taken before a write's payload is buffered, so that the permits bound that memory too.
        // A closed semaphore or channel means the writer is gone: stop reading.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return Ok(());
        };
        let op = check_request(cmd, flags, offset, len, size, writable, opts.max_request);
        let payload = if cmd == CMD_WRITE {
            let keep = matches!(op, Op::Write { .. });
            read_payload(&mut reader, len, opts.max_request, keep).await?
        } else {
            Vec::new()
        };
        if let Op::Reply(error) = op {
            if error != 0 {
                debug!(cmd, flags, offset, len, error, "nbd request refused");
            }
            let reply = Reply {
                error,
                handle,
                data: Vec::new(),
                _permit: permit,
            };
            if tx.send(reply).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let (export, tx) = (export.clone(), tx.clone());
        tasks.spawn(async move {
            let (error, data) = op.run(&*export, offset, len, payload).await;
            let _ = tx
                .send(Reply {
                    error,
                    handle,
                    data,
                    _permit: permit,
                })
                .await;
        });
    }
}
