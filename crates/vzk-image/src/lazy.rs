//! A disk served before its download ends: every read fetches (one `Range` request),
//! decodes and verifies only the 1 MiB frames it covers, writes them into the local
//! sparse copy and reads from there; meanwhile [`LazyDisk::complete`] fetches the rest
//! in disk order, always behind the guest's reads, and checks every chunk as a whole
//! at the end. The frames are located by the image's frame index
//! ([`crate::frame_index`]), itself pinned by the manifest.
//!
//! A frame is written once: concurrent readers of one frame share its fetch. A frame
//! whose BLAKE3 differs from the index is never written or served. A fetch that fails
//! (the registry down, a dropped connection) is retried with back-off; when the retries
//! run out the read fails, and so does the disk ([`LazyState::Failed`]): its user gets
//! a clear reason instead of data it cannot trust.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, watch};

use crate::content_digest::{Algorithm, ContentHasher};
use crate::frame_index::Frame;
use crate::manifest::Part;
use crate::registry::Registry;

/// How a lazy disk fetches.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// Attempts per fetch before the disk fails.
    pub attempts: u32,
    /// The first retry's delay; it doubles up to [`LazyOptions::max_backoff`].
    pub backoff: Duration,
    /// The longest delay between attempts.
    pub max_backoff: Duration,
    /// Bytes per second the background completion may take (`None`: all it can get).
    /// Guest reads are never limited and always go first.
    pub background_rate: Option<u64>,
    /// Compressed bytes per background request.
    pub background_request: u64,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            attempts: 8,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
            background_rate: None,
            background_request: 8 << 20,
        }
    }
}

/// Where a lazy disk stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LazyState {
    /// Frames are still missing.
    Filling {
        /// Decoded bytes present (fetched or all-zero).
        present: u64,
        /// The disk's size.
        size: u64,
    },
    /// Every frame is present and every chunk matched its digest.
    Complete,
    /// A fetch failed for good, or a frame or chunk failed verification.
    Failed(String),
}

/// Counters of a lazy disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Compressed bytes fetched for guest reads.
    pub guest_bytes: u64,
    /// Compressed bytes fetched by the background completion.
    pub background_bytes: u64,
    /// Frames fetched for guest reads.
    pub guest_frames: u64,
}

/// A disk image filled on demand from its registry blobs.
pub struct LazyDisk {
    reg: Arc<Registry>,
    parts: Vec<Part>,
    frames: Vec<Frame>,
    cells: Vec<OnceCell<()>>,
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    opts: LazyOptions,
    state: watch::Sender<LazyState>,
    present: AtomicU64,
    guest_reads: AtomicUsize,
    guest_bytes: AtomicU64,
    guest_frames: AtomicU64,
    background_bytes: AtomicU64,
}

impl std::fmt::Debug for LazyDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyDisk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl LazyDisk {
    /// A lazy disk of `size` bytes at `path` (created sparse), its `frames` located by a
    /// checked index over the disk's `parts`.
    pub(crate) fn create(
        reg: Arc<Registry>,
        parts: Vec<Part>,
        frames: Vec<Frame>,
        path: &Path,
        size: u64,
        opts: LazyOptions,
    ) -> std::io::Result<LazyDisk> {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        let present: u64 = frames
            .iter()
            .filter(|f| f.zero)
            .map(|f| u64::from(f.len))
            .sum();
        let cells = frames.iter().map(|_| OnceCell::new()).collect();
        let (state, _) = watch::channel(LazyState::Filling { present, size });
        let disk = LazyDisk {
            reg,
            parts,
            frames,
            cells,
            file,
            path: path.to_path_buf(),
            size,
            opts,
            state,
            present: AtomicU64::new(present),
            guest_reads: AtomicUsize::new(0),
            guest_bytes: AtomicU64::new(0),
            guest_frames: AtomicU64::new(0),
            background_bytes: AtomicU64::new(0),
        };
        Ok(disk)
    }

    /// A disk already complete on local storage (a cached image's), served as it is: for
    /// pods whose disks were served on demand by an agent before this one.
    pub(crate) fn local(reg: Arc<Registry>, path: &Path) -> std::io::Result<LazyDisk> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let (state, _) = watch::channel(LazyState::Complete);
        Ok(LazyDisk {
            reg,
            parts: Vec::new(),
            frames: Vec::new(),
            cells: Vec::new(),
            file,
            path: path.to_path_buf(),
            size,
            opts: LazyOptions::default(),
            state,
            present: AtomicU64::new(size),
            guest_reads: AtomicUsize::new(0),
            guest_bytes: AtomicU64::new(0),
            guest_frames: AtomicU64::new(0),
            background_bytes: AtomicU64::new(0),
        })
    }

    /// Where the first frame with data starts (`None`: the disk is all zeros).
    pub fn first_data_offset(&self) -> Option<u64> {
        self.frames.iter().find(|f| !f.zero).map(|f| f.offset)
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The local copy.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the disk stands, as it changes.
    pub fn state(&self) -> watch::Receiver<LazyState> {
        self.state.subscribe()
    }

    /// What was fetched so far.
    pub fn stats(&self) -> LazyStats {
        LazyStats {
            guest_bytes: self.guest_bytes.load(Ordering::Relaxed),
            background_bytes: self.background_bytes.load(Ordering::Relaxed),
            guest_frames: self.guest_frames.load(Ordering::Relaxed),
        }
    }

    fn failed(&self) -> Option<String> {
        match &*self.state.borrow() {
            LazyState::Failed(r) => Some(r.clone()),
            _ => None,
        }
    }

    fn fail(&self, reason: &str) {
        self.state.send_if_modified(|s| {
            if matches!(s, LazyState::Failed(_)) {
                return false;
            }
            tracing::warn!(path = %self.path.display(), %reason, "lazy disk failed");
            *s = LazyState::Failed(reason.to_owned());
            true
        });
    }

    /// Fill `buf` with the disk's bytes at `offset`, fetching the frames it covers first.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "read of {} bytes at {offset} past the disk's end ({})",
                        buf.len(),
                        self.size
                    ),
                )
            })?;
        if buf.is_empty() || self.frames.is_empty() {
            return self.file.read_exact_at(buf, offset);
        }
        let first = self.frame_at(offset);
        let last = self.frame_at(end - 1);
        self.guest_reads.fetch_add(1, Ordering::SeqCst);
        let res = futures::future::try_join_all((first..=last).map(|i| self.ensure(i))).await;
        self.guest_reads.fetch_sub(1, Ordering::SeqCst);
        res.map_err(std::io::Error::other)?;
        self.file.read_exact_at(buf, offset)
    }

    /// The index of the frame holding byte `offset` (< size).
    fn frame_at(&self, offset: u64) -> usize {
        self.frames
            .partition_point(|f| f.offset + u64::from(f.len) <= offset)
            .min(self.frames.len().saturating_sub(1))
    }

    /// Frame `i` present in the local copy, fetched for a guest read if it is not.
    async fn ensure(&self, i: usize) -> Result<(), String> {
        let f = &self.frames[i];
        if f.zero || self.cells[i].initialized() {
            return Ok(());
        }
        if let Some(r) = self.failed() {
            return Err(r);
        }
        self.cells[i]
            .get_or_try_init(|| async {
                let bytes = self
                    .fetch(f.part, f.coffset, f.coffset + u64::from(f.clen))
                    .await?;
                self.guest_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.guest_frames.fetch_add(1, Ordering::Relaxed);
                self.store(i, bytes).await
            })
            .await
            .map(|_| ())
    }

    /// Compressed bytes `[from, to)` of a chunk's blob, with retries; the disk fails when
    /// they run out.
    async fn fetch(&self, part: usize, from: u64, to: u64) -> Result<bytes::Bytes, String> {
        let digest = &self.parts[part].desc.digest;
        let mut delay = self.opts.backoff;
        let mut attempt = 1;
        loop {
            if let Some(r) = self.failed() {
                return Err(r);
            }
            match self.reg.get_blob_range(digest, from, to).await {
                Ok(b) => return Ok(b),
                Err(e) if attempt < self.opts.attempts.max(1) => {
                    tracing::debug!(%digest, from, to, attempt, error = %e, "lazy fetch failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.opts.max_backoff);
                    attempt += 1;
                }
                Err(e) => {
                    let reason = format!(
                        "fetching bytes {from}-{} of disk chunk {digest} failed {attempt} times: {}",
                        to - 1,
                        crate::registry::error_chain(&e)
                    );
                    self.fail(&reason);
                    return Err(reason);
                }
            }
        }
    }

    /// Decode and verify frame `i` from its compressed bytes (on a blocking thread: a
    /// MiB of zstd and BLAKE3), then write it.
    async fn store(&self, i: usize, compressed: bytes::Bytes) -> Result<(), String> {
        let f = &self.frames[i];
        let (len, digest) = (f.len as usize, f.digest);
        let checked = tokio::task::spawn_blocking(move || {
            let decoded = zstd::bulk::decompress(&compressed, len)
                .map_err(|e| format!("does not decode: {e}"))?;
            if decoded.len() != len {
                return Err(format!("decodes to {} bytes, not {len}", decoded.len()));
            }
            let got = blake3::hash(&decoded);
            if got.as_bytes() != &digest {
                return Err(format!(
                    "fails verification (BLAKE3 {got}, the index says {})",
                    hex::encode(digest)
                ));
            }
            Ok(decoded)
        })
        .await
        .unwrap_or_else(|e| Err(format!("was not decoded: {e}")));
        let written = checked.and_then(|decoded| {
            self.file
                .write_all_at(&decoded, f.offset)
                .map_err(|e| format!("cannot be written to {}: {e}", self.path.display()))
        });
        if let Err(what) = written {
            let reason = format!(
                "the frame at disk offset {} (bytes {}-{} of chunk {}) {what}; it is not served",
                f.offset,
                f.coffset,
                f.coffset + u64::from(f.clen) - 1,
                self.parts[f.part].desc.digest
            );
            self.fail(&reason);
            return Err(reason);
        }
        let present =
            self.present.fetch_add(u64::from(f.len), Ordering::Relaxed) + u64::from(f.len);
        self.state.send_if_modified(|s| match s {
            LazyState::Filling { present: p, .. } => {
                *p = present;
                true
            }
            _ => false,
        });
        Ok(())
    }

    /// Fetch every missing frame in disk order (behind guest reads, at most
    /// `background_rate`), then check every chunk as a whole and fsync. Ends in
    /// [`LazyState::Complete`] or [`LazyState::Failed`].
    pub async fn complete(&self) -> Result<(), String> {
        let started = Instant::now();
        let mut taken = 0u64;
        let mut i = 0;
        while i < self.frames.len() {
            if let Some(r) = self.failed() {
                return Err(r);
            }
            let f = &self.frames[i];
            if f.zero || self.cells[i].initialized() {
                i += 1;
                continue;
            }
            // A run of missing frames of one chunk, up to one request's worth.
            let mut j = i + 1;
            while j < self.frames.len()
                && self.frames[j].part == f.part
                && !self.frames[j].zero
                && !self.cells[j].initialized()
                && self.frames[j].coffset + u64::from(self.frames[j].clen) - f.coffset
                    <= self.opts.background_request.max(1)
            {
                j += 1;
            }
            // Guest reads first.
            while self.guest_reads.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let last = &self.frames[j - 1];
            let bytes = self
                .fetch(f.part, f.coffset, last.coffset + u64::from(last.clen))
                .await?;
            self.background_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            for k in i..j {
                let fk = &self.frames[k];
                let at = (fk.coffset - f.coffset) as usize;
                let piece = bytes.slice(at..at + fk.clen as usize);
                self.cells[k]
                    .get_or_try_init(|| self.store(k, piece))
                    .await?;
            }
            taken += bytes.len() as u64;
            if let Some(rate) = self.opts.background_rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(taken as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            i = j;
        }
        // Every chunk as a whole, against the manifest.
        let res = self.verify_chunks().await;
        match &res {
            Ok(()) => {
                self.state.send_replace(LazyState::Complete);
            }
            Err(r) => self.fail(r),
        }
        res
    }

    async fn verify_chunks(&self) -> Result<(), String> {
        let file = self.file.try_clone().map_err(|e| e.to_string())?;
        let parts = self.parts.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 4 << 20];
            for p in &parts {
                let alg = Algorithm::of(&p.digest)?;
                let mut h = ContentHasher::new(alg);
                let mut pos = 0u64;
                while pos < p.size {
                    let n = (p.size - pos).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], p.offset + pos)
                        .map_err(|e| format!("reading {}: {e}", path.display()))?;
                    h.update(&buf[..n]);
                    pos += n as u64;
                }
                let got = h.finish();
                if got != p.digest {
                    return Err(format!(
                        "disk chunk at offset {} is {got} once complete, the manifest says {}",
                        p.offset, p.digest
                    ));
                }
            }
            file.sync_all()
                .map_err(|e| format!("fsync {}: {e}", path.display()))
        })
        .await
        .map_err(|e| format!("chunk check: {e}"))?
    }
}
