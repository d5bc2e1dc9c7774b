//! A pod's own writable disk over a shared base that may still be downloading: a block
//! the pod never wrote is read from the base ([`LazyDisk`], shared by every pod of the
//! image, never written), a block it wrote from the pod's sparse data file. This is the
//! copy-on-write layer for backends that attach a raw disk over NBD and have no overlay
//! format of their own (Virtualization.framework's
//! `VZNetworkBlockDeviceStorageDeviceAttachment`); QEMU uses a qcow2 overlay instead.
//!
//! Granularity is [`COW_BLOCK`] bytes. A write that covers part of a block the pod has
//! not written yet first reads the rest of that block from the base (fetching it if need
//! be). Writes are serialized, so two writes into different parts of one such block
//! cannot undo each other; reads run concurrently with them. A write is visible to every
//! read that starts after it returned; it is durable after [`CowDisk::flush`]
//! (`NBD_CMD_FLUSH`, or a write with `FUA`).
//!
//! The map of written blocks lives in memory: the layer lasts as long as the agent that
//! serves it, which is as long as a Virtualization.framework VM lives (it runs in the
//! agent's process).

use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::lazy::LazyDisk;

/// Bytes per copy-on-write block.
pub const COW_BLOCK: u64 = 4096;

/// A pod's copy-on-write view of a base disk (see the module docs).
pub struct CowDisk {
    base: Arc<LazyDisk>,
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    /// One bit per block: set once the block's bytes are in `file`.
    written: RwLock<Vec<u64>>,
    writes: tokio::sync::Mutex<()>,
    written_blocks: AtomicU64,
}

impl std::fmt::Debug for CowDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowDisk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field(
                "written_blocks",
                &self.written_blocks.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl CowDisk {
    /// A new layer over `base` whose data file is `path` (created, or emptied, sparse).
    pub fn create(base: Arc<LazyDisk>, path: &Path) -> io::Result<CowDisk> {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let size = base.size();
        file.set_len(size)?;
        let blocks = size.div_ceil(COW_BLOCK);
        let words = usize::try_from(blocks.div_ceil(64)).map_err(io::Error::other)?;
        Ok(CowDisk {
            base,
            file,
            path: path.to_path_buf(),
            size,
            written: RwLock::new(vec![0; words]),
            writes: tokio::sync::Mutex::new(()),
            written_blocks: AtomicU64::new(0),
        })
    }

    /// The disk's size (the base's).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The pod's data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The base this layer reads unwritten blocks from.
    pub fn base(&self) -> &Arc<LazyDisk> {
        &self.base
    }

    /// Bytes the pod has written so far, in whole blocks.
    pub fn written_bytes(&self) -> u64 {
        self.written_blocks.load(Ordering::Relaxed) * COW_BLOCK
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<u64> {
        offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {offset} are past the disk's end ({})",
                        self.size
                    ),
                )
            })
    }

    fn is_written(&self, block: u64) -> bool {
        let map = self.written.read().unwrap_or_else(|p| p.into_inner());
        map.get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    fn mark_written(&self, first: u64, last: u64) {
        let mut map = self.written.write().unwrap_or_else(|p| p.into_inner());
        let mut newly = 0;
        for b in first..=last {
            if let Some(w) = map.get_mut((b / 64) as usize) {
                let bit = 1 << (b % 64);
                if *w & bit == 0 {
                    *w |= bit;
                    newly += 1;
                }
            }
        }
        self.written_blocks.fetch_add(newly, Ordering::Relaxed);
    }

    /// The byte range of block `b`.
    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * COW_BLOCK;
        (start, (start + COW_BLOCK).min(self.size))
    }

    /// Fill `buf` with the disk's bytes at `offset`: the pod's where it wrote them, the
    /// base's elsewhere.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = self.check(offset, buf.len())?;
        let mut pos = offset;
        while pos < end {
            let mine = self.is_written(pos / COW_BLOCK);
            let mut run_end = self.block_range(pos / COW_BLOCK).1.min(end);
            while run_end < end && self.is_written(run_end / COW_BLOCK) == mine {
                run_end = self.block_range(run_end / COW_BLOCK).1.min(end);
            }
            let part = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if mine {
                self.file.read_exact_at(part, pos)?;
            } else {
                self.base.read_at(pos, part).await?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Write `buf` at `offset` into the pod's layer (never into the base).
    pub async fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let _serial = self.writes.lock().await;
        let first = offset / COW_BLOCK;
        let last = (end - 1) / COW_BLOCK;
        // The edge blocks the write covers only partly, and which the pod has not
        // written yet, are completed from the base first.
        let mut mid = (offset, end);
        let edges: &[u64] = if first == last {
            &[first]
        } else {
            &[first, last]
        };
        for &b in edges {
            let (bs, be) = self.block_range(b);
            let partial = offset > bs || end < be;
            if !partial || self.is_written(b) {
                continue;
            }
            let mut block = vec![0u8; (be - bs) as usize];
            self.base.read_at(bs, &mut block).await?;
            let (ws, we) = (offset.max(bs), end.min(be));
            block[(ws - bs) as usize..(we - bs) as usize]
                .copy_from_slice(&buf[(ws - offset) as usize..(we - offset) as usize]);
            self.file.write_all_at(&block, bs)?;
            if b == first {
                mid.0 = be.min(end);
            }
            if b == last {
                mid.1 = bs.max(mid.0);
            }
        }
        if mid.0 < mid.1 {
            self.file.write_all_at(
                &buf[(mid.0 - offset) as usize..(mid.1 - offset) as usize],
                mid.0,
            )?;
        }
        self.mark_written(first, last);
        Ok(())
    }

    /// Make every write that returned durable.
    pub async fn flush(&self) -> io::Result<()> {
        let file = self.file.try_clone()?;
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(io::Error::other)?
    }
}
