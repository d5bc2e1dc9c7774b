//! A small, read-only NBD (Network Block Device) server.
//!
//! A VM disk is served while its image is still being fetched: QEMU opens a qcow2 overlay whose
//! backing file is `nbd+unix:///disk?socket=…`, served here from an async [`Export`]. Writes go to
//! the overlay, so the export is read-only.
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>. Only the fixed
//! newstyle handshake and simple replies are implemented; a read that fails in the export gets an
//! `EIO` reply (never partial or wrong data) and the connection keeps serving.

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

    pub(crate) const EPERM: u32 = 1;
    pub(crate) const EIO: u32 = 5;
    pub(crate) const EINVAL: u32 = 22;
}
use proto::*;

/// Largest option payload accepted during the handshake.
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_BLOCK: u32 = 4096;

/// What an export reads from.
#[async_trait::async_trait]
pub trait Export: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with the bytes at `offset` (`offset + buf.len() <= size`, checked by the server
    /// before calling). An error becomes an `EIO` reply to that request only.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Name of the single export; the empty name (the default export) is accepted as well.
    pub export_name: String,
    /// Largest read (and discarded write payload) a request may carry, in bytes; at least 4096.
    pub max_request: u32,
    /// Requests of one connection served concurrently; at least 1.
    pub max_in_flight: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            export_name: "disk".to_owned(),
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
    #[error("write request of {0} bytes exceeds the maximum request size")]
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

/// Serve one already-accepted connection: handshake, then requests until `NBD_CMD_DISC` or EOF.
/// Requests run concurrently (up to `max_in_flight`) and replies may go out of order.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send>(
    stream: S,
    export: Arc<dyn Export>,
    opts: &ServerOptions,
) -> Result<(), NbdError> {
    validate(opts)?;
    let mut stream = BufReader::new(stream);
    if !handshake(&mut stream, export.size(), opts).await? {
        return Ok(());
    }
    debug!(export = %opts.export_name, "nbd transmission phase");
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
    let reading = transmission(reader, export, opts, tx, &mut tasks);
    tokio::try_join!(reading, writing).map(|_| ())
    // `tasks` is dropped here: on error, in-flight reads are aborted.
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
    let tflags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
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

/// Reads requests until `NBD_CMD_DISC` or EOF, answering directly or via a spawned read task.
/// Returning drops `tx`; the writer then finishes once the in-flight tasks have replied.
async fn transmission<R: AsyncRead + Unpin>(
    reader: R,
    export: Arc<dyn Export>,
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
        if cmd == CMD_WRITE {
            // The payload follows the header whatever the answer: consume it to stay in sync.
            if len > opts.max_request {
                return Err(NbdError::RequestTooLarge(len));
            }
            let copied =
                tokio::io::copy(&mut (&mut reader).take(len.into()), &mut tokio::io::sink())
                    .await?;
            if copied != u64::from(len) {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
        // A closed semaphore or channel means the writer is gone: stop reading.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return Ok(());
        };
        let error = match cmd {
            CMD_READ => {
                let in_bounds = offset
                    .checked_add(len.into())
                    .is_some_and(|end| end <= size);
                if flags != 0 || len == 0 || len > opts.max_request || !in_bounds {
                    EINVAL
                } else {
                    let (export, tx) = (export.clone(), tx.clone());
                    tasks.spawn(async move {
                        let mut data = vec![0u8; len as usize];
                        let error = match export.read_at(offset, &mut data).await {
                            Ok(()) => 0,
                            Err(e) => {
                                warn!(offset, len, error = %e, "nbd export read failed");
                                data = Vec::new();
                                EIO
                            }
                        };
                        let _ = tx
                            .send(Reply {
                                error,
                                handle,
                                data,
                                _permit: permit,
                            })
                            .await;
                    });
                    continue;
                }
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => EPERM,
            CMD_FLUSH => 0,
            _ => EINVAL,
        };
        if error != 0 {
            debug!(cmd, offset, len, error, "nbd request refused");
        }
        if tx
            .send(Reply {
                error,
                handle,
                data: Vec::new(),
                _permit: permit,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}
