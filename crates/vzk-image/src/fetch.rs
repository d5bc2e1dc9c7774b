//! Streaming one blob from the registry into a file region, verified on the way.
//!
//! ```text
//!  async download task ──Bytes──▶ BlobReader (blocking thread: sha256 + size of the blob)
//!   (resumes with Range                │ decoder (gzip / zstd / Apple LZ4 / none)
//!    after a dropped connection)       ▼
//!         4 MiB buffers (a zstd frame is decoded straight into one, see zstd_frames); each
//!         piece hashed (content digest) and scanned for zero 64 KiB blocks while cache-hot
//!                                     │
//!                                     ▼
//!                      writer thread: pwrite of the non-zero runs only
//!                                     (O_DIRECT where the filesystem allows)
//! ```
//!
//! Nothing is held in memory beyond a few buffers. The blob digest and size, and the
//! content digest and size, are checked as the bytes flow; a part is only reported
//! successful when all four match. Content larger than declared stops at once
//! ([`ImageError::DecompressionBomb`]).

use std::fs::File;
use std::io::{BufRead, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as smpsc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::content_digest::{Algorithm, ContentHasher};
use crate::error::{ImageError, Result};
use crate::manifest::Part;
use crate::media_types::Encoding;
use crate::progress::Progress;
use crate::registry::{Registry, error_chain};

/// Blocks of this size that are all zero are not written (they stay holes).
pub(crate) const SPARSE_BLOCK: usize = 64 << 10;
const BUF: usize = 4 << 20;
const MAX_RESUMES: u32 = 8;

/// Download a blob, resuming with `Range` after transport errors, into a channel.
pub(crate) async fn download(
    reg: Arc<Registry>,
    digest: String,
    size: u64,
    tx: mpsc::Sender<Result<Bytes>>,
    progress: Arc<dyn Progress>,
) {
    let mut offset = 0u64;
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let (resp, partial, host) = reg.get_blob_at(&digest, offset).await?;
            let mut skip = if partial { 0 } else { offset };
            let mut stream = resp.bytes_stream();
            while let Some(item) = stream.next().await {
                let mut chunk = item.map_err(|e| {
                    // Resume elsewhere if another host can serve it.
                    reg.host_failed(host);
                    ImageError::Registry {
                        registry: reg.host_label(host).to_string(),
                        what: format!("GET blob {digest}"),
                        detail: error_chain(&e),
                    }
                })?;
                if skip > 0 {
                    let n = skip.min(chunk.len() as u64);
                    skip -= n;
                    chunk = chunk.slice(n as usize..);
                    if chunk.is_empty() {
                        continue;
                    }
                }
                let n = chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(true); // the consumer gave up (it has its own error)
                }
                offset += n;
                progress.advance(n);
            }
            Ok::<bool, ImageError>(offset >= size)
        };
        match attempt.await {
            Ok(true) => return,
            Ok(false) => {
                // The body ended early without a transport error: resume as well.
                failures += 1;
                if failures > MAX_RESUMES {
                    let _ = tx
                        .send(Err(ImageError::DigestMismatch {
                            digest: digest.clone(),
                            file: "blob".into(),
                            reason: format!(
                                "the registry keeps ending the blob at {offset} of {size} bytes"
                            ),
                        }))
                        .await;
                    return;
                }
            }
            Err(e @ (ImageError::NotFound { .. } | ImageError::Unauthorized { .. })) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                failures += 1;
                if failures > MAX_RESUMES {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                tracing::warn!(%digest, offset, attempt = failures, error = %e, "blob download interrupted; resuming");
            }
        }
        tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10)))).await;
    }
}

/// The compressed side: reads the channel, hashes and counts the blob.
pub(crate) struct BlobReader {
    rx: mpsc::Receiver<Result<Bytes>>,
    cur: Bytes,
    hasher: Sha256,
    count: u64,
    size: u64,
    digest: String,
    file: String,
    eof: bool,
    failure: Option<ImageError>,
}

impl BlobReader {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<Bytes>>,
        digest: &str,
        size: u64,
        file: &str,
    ) -> BlobReader {
        BlobReader {
            rx,
            cur: Bytes::new(),
            hasher: Sha256::new(),
            count: 0,
            size,
            digest: digest.to_string(),
            file: file.to_string(),
            eof: false,
            failure: None,
        }
    }

    fn mismatch(&self, reason: String) -> ImageError {
        ImageError::DigestMismatch {
            digest: self.digest.clone(),
            file: self.file.clone(),
            reason,
        }
    }

    /// Pull the next network chunk; checks the size limit and, at the end, the digest.
    fn next_chunk(&mut self) -> std::io::Result<()> {
        if self.eof || self.failure.is_some() {
            return Ok(());
        }
        match self.rx.blocking_recv() {
            Some(Ok(b)) => {
                self.count += b.len() as u64;
                if self.count > self.size {
                    return Err(self.fail(self.mismatch(format!(
                        "blob is longer than its declared {} bytes",
                        self.size
                    ))));
                }
                self.hasher.update(&b);
                self.cur = b;
                Ok(())
            }
            Some(Err(e)) => Err(self.fail(e)),
            None => {
                self.eof = true;
                if self.count != self.size {
                    return Err(self.fail(
                        self.mismatch(format!("got {} bytes, expected {}", self.count, self.size)),
                    ));
                }
                let got = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
                if got != self.digest {
                    return Err(self.fail(self.mismatch(format!("content hashes to {got}"))));
                }
                Ok(())
            }
        }
    }

    fn fail(&mut self, e: ImageError) -> std::io::Error {
        let msg = e.to_string();
        self.failure = Some(e);
        std::io::Error::other(msg)
    }

    /// Read to the end and verify; returns the first failure seen, if any.
    pub(crate) fn finish(&mut self) -> Result<()> {
        while !self.eof && self.failure.is_none() {
            self.cur = Bytes::new();
            let _ = self.next_chunk();
        }
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Take the recorded failure (the real cause behind a decoder error).
    pub(crate) fn take_failure(&mut self) -> Option<ImageError> {
        self.failure.take()
    }
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for BlobReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.cur.is_empty() && !self.eof {
            if let Some(e) = &self.failure {
                return Err(std::io::Error::other(e.to_string()));
            }
            self.next_chunk()?;
        }
        Ok(&self.cur)
    }

    fn consume(&mut self, amt: usize) {
        let _ = self.cur.split_to(amt);
    }
}

/// True if every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        // A fixed-size OR-fold vectorises; the early exit is per 64 bytes.
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Alignment of buffers, file offsets and lengths for `O_DIRECT` writes.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A `BUF`-byte buffer whose start is [`DIRECT_ALIGN`]-aligned (for `O_DIRECT`).
pub(crate) struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let v = vec![0u8; BUF + DIRECT_ALIGN];
        let off = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { v, off }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[self.off..self.off + BUF]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + BUF]
    }
}

/// Decode buffers are reused across parts: fresh 4 MiB allocations cost a page fault
/// per 4 KiB.
static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

fn take_buf() -> AlignedBuf {
    POOL.lock()
        .ok()
        .and_then(|mut p| p.pop())
        .unwrap_or_else(AlignedBuf::new)
}

fn give_buf(b: AlignedBuf) {
    if let Ok(mut p) = POOL.lock()
        && p.len() < 24
    {
        p.push(b);
    }
}

/// Where a part's decoded bytes go.
pub(crate) struct Target {
    pub(crate) file: Arc<File>,
    /// The same file opened with `O_DIRECT`, where the filesystem allows it: aligned runs
    /// are written through it, bypassing the page cache (whose copy-in costs more CPU
    /// than SHA-256 on virtualised hosts, and the data is not read back by us anyway).
    pub(crate) direct: Option<Arc<File>>,
    pub(crate) name: String,
    /// Set when another part of the pull failed: stop writing, the pull is lost anyway.
    pub(crate) cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// A chunk already on this machine, in the file of an image pulled before, with the
/// content digest a new part needs.
#[derive(Debug, Clone)]
pub(crate) struct LocalChunk {
    pub(crate) path: std::path::PathBuf,
    pub(crate) offset: u64,
}

/// Copy a part from a chunk of an image pulled before, verifying its content digest on
/// the way (a damaged cache is caught here, and the caller downloads the part instead).
pub(crate) fn copy_local(src: &LocalChunk, part: &Part, target: &Target) -> Result<()> {
    use std::io::{Seek as _, SeekFrom};
    let io_err = |op, source| ImageError::Io {
        op,
        path: src.path.clone(),
        source,
    };
    let mut file = File::open(&src.path).map_err(|e| io_err("open", e))?;
    file.seek(SeekFrom::Start(src.offset))
        .map_err(|e| io_err("seek", e))?;
    // A short file ends early; copy_out then reports the size mismatch.
    copy_out(&mut file.take(part.size), part, target, Mode::Chunk)
}

/// How [`copy_out`] reads and hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A zstd chunk: offered the rest of the buffer (frames decode in place), hashed in
    /// the reading thread.
    ZstdChunk,
    /// Other chunks: 256 KiB steps, hashed in the reading thread (parts run in parallel).
    Chunk,
    /// One blob per file (gzip, raw): 256 KiB steps, hashed in the writer thread so that
    /// decoding and hashing overlap.
    Whole,
}

impl Mode {
    fn of(e: Encoding) -> Mode {
        match e {
            Encoding::ZstdChunk => Mode::ZstdChunk,
            _ if e.is_chunk() => Mode::Chunk,
            _ => Mode::Whole,
        }
    }
}

/// Decode one part from `reader` into `target` at `part.offset`, verifying everything.
pub(crate) fn decode_part(mut reader: BlobReader, part: &Part, target: &Target) -> Result<()> {
    let mode = Mode::of(part.encoding);
    let result = match part.encoding {
        Encoding::Raw => copy_out(&mut reader, part, target, mode),
        Encoding::Gzip => copy_out(
            &mut flate2::bufread::MultiGzDecoder::new(&mut reader),
            part,
            target,
            mode,
        ),
        Encoding::ZstdChunk => match crate::zstd_frames::ZstdFrames::new(&mut reader) {
            Ok(mut d) => copy_out(&mut d, part, target, mode),
            Err(e) => Err(ImageError::Decompress {
                digest: part.desc.digest.clone(),
                file: target.name.clone(),
                detail: e.to_string(),
            }),
        },
        Encoding::AppleLz4Chunk => copy_out(
            &mut crate::tart::AppleLz4Reader::new(&mut reader),
            part,
            target,
            mode,
        ),
    };
    match result {
        Ok(()) => reader.finish(),
        Err(e) => {
            // A blob-level failure (wrong digest, network) is the real cause of a decoder error.
            if let Some(f) = reader.take_failure() {
                return Err(f);
            }
            if matches!(e, ImageError::Decompress { .. })
                && reader
                    .finish()
                    .is_err_and(|f| matches!(f, ImageError::DigestMismatch { .. }))
            {
                return Err(ImageError::DigestMismatch {
                    digest: part.desc.digest.clone(),
                    file: target.name.clone(),
                    reason: "content does not match the digest".into(),
                });
            }
            Err(e)
        }
    }
}

/// Other decoders are asked for this much at a time, so what they hand out is hashed and
/// scanned while it is still in the cache (zstd frames are taken whole, see
/// [`crate::zstd_frames`]).
const STEP: usize = 256 << 10;

/// A decoded buffer on its way to the writer thread.
struct Filled {
    buf: AlignedBuf,
    len: usize,
    /// Offset of `buf[0]` within the part.
    pos: u64,
    /// `[start, end)` runs of non-zero [`SPARSE_BLOCK`]s within `buf`.
    runs: Vec<(usize, usize)>,
}

/// Appends the non-zero [`SPARSE_BLOCK`]s of `data[from..]` to `runs`, merging adjacent
/// ones. `from` is a multiple of [`SPARSE_BLOCK`].
fn non_zero_runs(data: &[u8], from: usize, runs: &mut Vec<(usize, usize)>) {
    let mut at = from;
    while at < data.len() {
        let end = (at + SPARSE_BLOCK).min(data.len());
        if !is_zero(&data[at..end]) {
            match runs.last_mut() {
                Some((_, e)) if *e == at => *e = end,
                _ => runs.push((at, end)),
            }
        }
        at = end;
    }
}

/// Decode into 4 MiB buffers, finding zero blocks while each step is cache-hot; a writer
/// thread `pwrite`s the non-zero runs. The content hash is taken cache-hot in the decoding
/// thread for chunks (many parts run at once, so the cores are busy anyway), and in the
/// writer thread for a single-blob file (gzip, raw), so decoding and hashing it overlap.
fn copy_out(dec: &mut dyn Read, part: &Part, target: &Target, mode: Mode) -> Result<()> {
    let declared = part.size;
    let hasher = match Algorithm::of(&part.digest) {
        Ok(alg) => ContentHasher::new(alg),
        Err(reason) => {
            return Err(ImageError::DigestMismatch {
                digest: part.desc.digest.clone(),
                file: target.name.clone(),
                reason,
            });
        }
    };
    let (full_tx, full_rx) = smpsc::sync_channel::<Filled>(2);
    let (empty_tx, empty_rx) = smpsc::channel::<AlignedBuf>();
    for _ in 0..3 {
        let _ = empty_tx.send(take_buf());
    }
    let file = target.file.clone();
    let direct = target.direct.clone();
    let name = target.name.clone();
    let base = part.offset;
    let (mut local_hasher, mut writer_hasher) = if mode == Mode::Whole {
        (None, Some(hasher))
    } else {
        (Some(hasher), None)
    };
    let writer = std::thread::spawn(move || -> std::io::Result<Option<ContentHasher>> {
        for f in full_rx {
            if let Some(h) = writer_hasher.as_mut() {
                h.update(&f.buf[..f.len]);
            }
            for &(s, e) in &f.runs {
                write_run(
                    &file,
                    direct.as_deref(),
                    &f.buf[s..e],
                    base + f.pos + s as u64,
                )?;
            }
            let _ = empty_tx.send(f.buf);
        }
        Ok(writer_hasher)
    });
    let decompress_err = |e: std::io::Error| ImageError::Decompress {
        digest: part.desc.digest.clone(),
        file: name.clone(),
        detail: e.to_string(),
    };
    let step = if mode == Mode::ZstdChunk { BUF } else { STEP };
    let mut total = 0u64;
    let mut read_err = None;
    'outer: while let Ok(mut buf) = empty_rx.recv() {
        if target.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            read_err = Some(ImageError::Cancelled);
            break 'outer;
        }
        let (mut len, mut scanned, mut eof) = (0usize, 0usize, false);
        let mut runs = Vec::new();
        while len < BUF {
            // zstd is offered the whole rest of the buffer (a frame is decoded straight
            // into it) and hands out a frame or a step at a time; others get a step. Each
            // piece is hashed and scanned right away, while it is in the cache.
            match dec.read(&mut buf[len..(len + step).min(BUF)]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    let from = len;
                    len += n;
                    if total + len as u64 > declared {
                        read_err = Some(ImageError::DecompressionBomb {
                            digest: part.desc.digest.clone(),
                            file: name.clone(),
                            declared,
                        });
                        break 'outer;
                    }
                    if let Some(h) = local_hasher.as_mut() {
                        h.update(&buf[from..len]);
                    }
                    let whole = len / SPARSE_BLOCK * SPARSE_BLOCK;
                    non_zero_runs(&buf[..whole], scanned, &mut runs);
                    scanned = whole;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    read_err = Some(decompress_err(e));
                    break 'outer;
                }
            }
        }
        non_zero_runs(&buf[..len], scanned, &mut runs);
        if len > 0 {
            let pos = total;
            total += len as u64;
            if full_tx
                .send(Filled {
                    buf,
                    len,
                    pos,
                    runs,
                })
                .is_err()
            {
                break 'outer; // the writer failed: its error is reported below
            }
        } else {
            give_buf(buf);
        }
        if eof {
            break;
        }
    }
    drop(full_tx);
    let joined = writer.join();
    while let Ok(b) = empty_rx.try_recv() {
        give_buf(b);
    }
    let written =
        joined.map_err(|_| decompress_err(std::io::Error::other("writer thread panicked")))?;
    if let Some(e) = read_err {
        return Err(e);
    }
    let writer_hasher = written.map_err(|source| ImageError::Io {
        op: "write",
        path: name.clone().into(),
        source,
    })?;
    if total != declared {
        return Err(ImageError::DigestMismatch {
            digest: part.desc.digest.clone(),
            file: name,
            reason: format!("decompresses to {total} bytes, the manifest declares {declared}"),
        });
    }
    let Some(hasher) = local_hasher.or(writer_hasher) else {
        return Err(decompress_err(std::io::Error::other("content hasher lost")));
    };
    let got = hasher.finish();
    if got != part.digest {
        return Err(ImageError::DigestMismatch {
            digest: part.desc.digest.clone(),
            file: name,
            reason: format!(
                "uncompressed content hashes to {got}, the manifest declares {}",
                part.digest
            ),
        });
    }
    Ok(())
}

/// Writes `data` at `offset`: the [`DIRECT_ALIGN`]ed prefix through `direct` (when the
/// offset is aligned; `data` starts at an aligned address, see [`AlignedBuf`] and the 64 KiB
/// sparse blocks), the rest through the page cache.
fn write_run(file: &File, direct: Option<&File>, data: &[u8], offset: u64) -> std::io::Result<()> {
    let aligned_len = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    match direct {
        Some(d)
            if aligned_len > 0
                && offset.is_multiple_of(DIRECT_ALIGN as u64)
                && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) =>
        {
            if let Err(e) = d.write_all_at(&data[..aligned_len], offset) {
                // A device with larger sectors than DIRECT_ALIGN refuses: page cache it is.
                if e.raw_os_error() == Some(nix::libc::EINVAL) {
                    return file.write_all_at(data, offset);
                }
                return Err(e);
            }
            if aligned_len < data.len() {
                file.write_all_at(&data[aligned_len..], offset + aligned_len as u64)?;
            }
            Ok(())
        }
        _ => file.write_all_at(data, offset),
    }
}

/// Opens `path` for `O_DIRECT` writes; `None` where the filesystem refuses (e.g. tmpfs on
/// older kernels) or the platform has no `O_DIRECT`.
pub(crate) fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        match File::options()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no O_DIRECT here; writing through the page cache");
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Fetch a small blob (config) into memory, verified. `limit` bounds its size.
pub(crate) async fn fetch_small(
    reg: &Registry,
    digest: &str,
    size: u64,
    limit: u64,
) -> Result<Vec<u8>> {
    if size > limit {
        return Err(ImageError::DigestMismatch {
            digest: digest.into(),
            file: "config".into(),
            reason: format!("{size} bytes is more than the {limit} allowed"),
        });
    }
    let (mut resp, _, host) = reg.get_blob_at(digest, 0).await?;
    let mut buf = Vec::with_capacity(size as usize);
    while let Some(c) = resp.chunk().await.map_err(|e| ImageError::Registry {
        registry: reg.host_label(host).to_string(),
        what: format!("GET blob {digest}"),
        detail: error_chain(&e),
    })? {
        buf.extend_from_slice(&c);
        if buf.len() as u64 > size {
            break;
        }
    }
    let got = crate::registry::sha256_digest(&buf);
    if buf.len() as u64 != size || got != digest {
        return Err(ImageError::DigestMismatch {
            digest: digest.into(),
            file: "config".into(),
            reason: format!(
                "got {} bytes hashing to {got} from {}",
                buf.len(),
                reg.host_label(host)
            ),
        });
    }
    Ok(buf)
}

/// Open a file for a pulled image and make it `size` bytes long (sparse).
pub(crate) fn create_sparse(path: &Path, size: u64) -> Result<File> {
    use crate::error::IoContext as _;
    let f = File::options()
        .create(true)
        .write(true)
        .read(true)
        .truncate(true)
        .open(path)
        .io("create", path)?;
    f.set_len(size).io("truncate", path)?;
    Ok(f)
}

/// Decodes a gzip stream of one or more members as a pull of an agoda image does (the
/// decoder the pull uses, `MultiGzDecoder` over a buffered reader), from input served in
/// `step`-byte pieces into reads of `out_size` bytes, stopping after `limit` decoded
/// bytes: how many were decoded. Hidden: only for the fuzz target `gzip_members`.
#[doc(hidden)]
pub fn decode_gzip_members(
    stream: &[u8],
    step: usize,
    out_size: usize,
    limit: u64,
) -> std::io::Result<u64> {
    let mut src = std::io::BufReader::with_capacity(step.max(1), stream);
    let mut dec = flate2::bufread::MultiGzDecoder::new(&mut src);
    let mut buf = vec![0u8; out_size.max(1)];
    let mut total = 0u64;
    while total < limit {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn non_zero_runs_merge_adjacent_blocks_and_skip_zero_ones() {
        let b = SPARSE_BLOCK;
        let mut data = vec![0u8; 6 * b + 100];
        data[b + 7] = 1; // block 1
        data[2 * b] = 1; // block 2 (adjacent: merged with 1)
        data[4 * b + b - 1] = 1; // block 4
        data[6 * b + 99] = 1; // the short tail
        let mut runs = Vec::new();
        // In two steps, as the decoder fills a buffer.
        non_zero_runs(&data[..3 * b], 0, &mut runs);
        non_zero_runs(&data, 3 * b, &mut runs);
        assert_eq!(runs, vec![(b, 3 * b), (4 * b, 5 * b), (6 * b, 6 * b + 100)]);
        let mut none = Vec::new();
        non_zero_runs(&[0u8; 3 * 65536], 0, &mut none);
        assert!(none.is_empty());
    }

    /// Aligned runs go through O_DIRECT, their unaligned tails and unaligned offsets
    /// through the page cache; the file reads back exactly what was written either way.
    #[test]
    fn direct_and_buffered_writes_land_byte_exact() {
        // On the disk, not a tmpfs, so O_DIRECT is really used where the kernel has it.
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let path = dir.path().join("disk.img");
        let file = create_sparse(&path, 1 << 20).unwrap();
        let direct = open_direct(&path);
        let mut buf = AlignedBuf::new();
        assert!((buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let n = (64 << 10) + 100;
        write_run(&file, direct.as_ref(), &buf[..n], 8192).unwrap();
        write_run(&file, direct.as_ref(), &buf[..5000], 300_001).unwrap();
        drop((file, direct));
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 1 << 20);
        assert_eq!(&back[8192..8192 + n], &buf[..n]);
        assert_eq!(&back[300_001..305_001], &buf[..5000]);
        assert!(back[..8192].iter().all(|&b| b == 0));
        assert!(back[8192 + n..300_001].iter().all(|&b| b == 0));
        assert!(back[305_001..].iter().all(|&b| b == 0));
    }

    #[test]
    fn gzip_members_decode_whole_in_any_piece_and_read_size() {
        use std::io::Write as _;
        let member = |b: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(b).unwrap();
            e.finish().unwrap()
        };
        let mut stream = member(&[7u8; 100_000]);
        stream.extend(member(b"second"));
        for (step, out) in [(1, 1), (8, 4096), (1 << 16, 1 << 20)] {
            assert_eq!(
                super::decode_gzip_members(&stream, step, out, u64::MAX).unwrap(),
                100_006
            );
        }
        assert!(
            super::decode_gzip_members(&stream[..stream.len() / 2], 64, 4096, u64::MAX).is_err()
        );
    }
}
