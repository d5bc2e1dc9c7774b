//! The frame index of a vzk image's disk: where every 1 MiB zstd frame of every disk
//! chunk lies in its blob, and the BLAKE3 of its decoded bytes, so that one frame can be
//! fetched with a `Range` request, decoded and verified on its own (lazy disks, see
//! [`crate::lazy`]).
//!
//! The index is one more layer of the manifest ([`mt::VZK_DISK_FRAMES`], title
//! `disk.frames`), so its own sha256 is pinned by the manifest digest. Binary, little
//! endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `VZKFIDX1` |
//! | 4 | decoded bytes per frame (the last frame of a chunk may be shorter) |
//! | 4 | number of disk chunks, as many as the manifest's `disk.img` layers |
//! | per chunk: 4 | number of frames (`ceil(chunk size / frame size)`) |
//! | per frame: 4 + 32 | compressed length, BLAKE3-256 of the decoded frame |
//!
//! The frames of a chunk follow each other in its blob from offset 0; their compressed
//! lengths add up to the blob's size. [`FrameIndex::map`] checks all of that against the
//! manifest's disk chunks before anything is read.

use crate::manifest::FilePlan;

/// The index's magic bytes.
pub const MAGIC: &[u8; 8] = b"VZKFIDX1";
/// Largest index we read (a 1.8 TB disk in 1 MiB frames).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// One compressed frame as pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEntry {
    /// Compressed length in the chunk's blob.
    pub clen: u32,
    /// BLAKE3 of the decoded frame.
    pub digest: [u8; 32],
}

/// The frames of every disk chunk, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameIndex {
    /// Decoded bytes per frame.
    pub frame_size: u32,
    /// Per chunk, its frames.
    pub chunks: Vec<Vec<FrameEntry>>,
}

/// A frame located in the disk and in its blob: what a lazy read needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Offset of its decoded bytes in the disk.
    pub offset: u64,
    /// Decoded length.
    pub len: u32,
    /// Index of its chunk in the disk's parts.
    pub part: usize,
    /// Offset of its compressed bytes in the chunk's blob.
    pub coffset: u64,
    /// Compressed length.
    pub clen: u32,
    /// BLAKE3 of the decoded bytes.
    pub digest: [u8; 32],
    /// The decoded bytes are all zero (nothing to fetch).
    pub zero: bool,
}

impl FrameIndex {
    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let frames: usize = self.chunks.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(16 + 4 * self.chunks.len() + 36 * frames);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.frame_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            for f in c {
                out.extend_from_slice(&f.clen.to_le_bytes());
                out.extend_from_slice(&f.digest);
            }
        }
        out
    }

    /// Parse the binary form; the reason when it is not one.
    pub fn decode(bytes: &[u8]) -> Result<FrameIndex, String> {
        let mut r = Reader(bytes);
        if r.take(8)? != MAGIC {
            return Err("not a frame index (bad magic)".into());
        }
        let frame_size = r.u32()?;
        if frame_size == 0 || frame_size > 64 << 20 {
            return Err(format!("frame size {frame_size} is out of range"));
        }
        let n = r.u32()? as usize;
        // Every chunk takes at least 4 bytes: a count that cannot fit is refused before
        // anything is allocated for it.
        if n > r.0.len() / 4 {
            return Err(format!("{n} chunks cannot fit in the index"));
        }
        let mut chunks = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.u32()? as usize;
            if k > r.0.len() / 36 {
                return Err(format!("{k} frames cannot fit in the index"));
            }
            let mut frames = Vec::with_capacity(k);
            for _ in 0..k {
                let clen = r.u32()?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32)?);
                frames.push(FrameEntry { clen, digest });
            }
            chunks.push(frames);
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the last chunk", r.0.len()));
        }
        Ok(FrameIndex { frame_size, chunks })
    }

    /// Check the index against the disk's chunks in the manifest and locate every frame;
    /// the reason when they disagree.
    pub fn map(&self, disk: &FilePlan) -> Result<Vec<Frame>, String> {
        if self.chunks.len() != disk.parts.len() {
            return Err(format!(
                "the index lists {} disk chunks, the manifest {}",
                self.chunks.len(),
                disk.parts.len()
            ));
        }
        let fs = u64::from(self.frame_size);
        let mut out = Vec::new();
        let mut zero_digests: Vec<(u32, [u8; 32])> = Vec::new();
        for (i, (frames, part)) in self.chunks.iter().zip(&disk.parts).enumerate() {
            let want = part.size.div_ceil(fs);
            if frames.len() as u64 != want {
                return Err(format!(
                    "chunk {i} ({} bytes) has {} frames in the index, want {want}",
                    part.size,
                    frames.len()
                ));
            }
            let mut coffset = 0u64;
            for (j, f) in frames.iter().enumerate() {
                let offset = part.offset + j as u64 * fs;
                let len = (part.offset + part.size - offset).min(fs) as u32;
                let zd = match zero_digests.iter().find(|(l, _)| *l == len) {
                    Some((_, d)) => *d,
                    None => {
                        let d = *blake3::hash(&vec![0u8; len as usize]).as_bytes();
                        zero_digests.push((len, d));
                        d
                    }
                };
                if f.clen == 0 {
                    return Err(format!("chunk {i} frame {j} has no compressed bytes"));
                }
                out.push(Frame {
                    offset,
                    len,
                    part: i,
                    coffset,
                    clen: f.clen,
                    digest: f.digest,
                    zero: f.digest == zd,
                });
                coffset += u64::from(f.clen);
            }
            if coffset != part.desc.size {
                return Err(format!(
                    "chunk {i}: its frames add up to {coffset} compressed bytes, its blob has {}",
                    part.desc.size
                ));
            }
        }
        Ok(out)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the index ends early".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::manifest::{Descriptor, Part};
    use crate::media_types::{Encoding, Role};

    fn part(offset: u64, size: u64, blob: u64) -> Part {
        Part {
            desc: Descriptor {
                media_type: crate::media_types::VZK_DISK.into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                size: blob,
                data: None,
                platform: None,
                annotations: None,
            },
            encoding: Encoding::ZstdChunk,
            offset,
            size,
            digest: String::new(),
        }
    }

    fn entry(clen: u32, fill: u8) -> FrameEntry {
        FrameEntry {
            clen,
            digest: [fill; 32],
        }
    }

    fn index() -> (FrameIndex, FilePlan) {
        let idx = FrameIndex {
            frame_size: 1 << 20,
            chunks: vec![
                vec![entry(100, 1), entry(50, 2)],
                vec![FrameEntry {
                    clen: 9,
                    digest: *blake3::hash(&vec![0u8; 1 << 20]).as_bytes(),
                }],
            ],
        };
        let plan = FilePlan {
            role: Role::Disk,
            size: (3 << 20) - 5,
            parts: vec![part(0, (2 << 20) - 5, 150), part((2 << 20) - 5, 1 << 20, 9)],
        };
        (idx, plan)
    }

    #[test]
    fn round_trips_and_locates_frames() {
        let (idx, plan) = index();
        let bytes = idx.encode();
        assert_eq!(FrameIndex::decode(&bytes).unwrap(), idx);
        let frames = idx.map(&plan).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!((frames[1].offset, frames[1].len), (1 << 20, (1 << 20) - 5));
        assert_eq!((frames[1].coffset, frames[1].clen), (100, 50));
        assert_eq!((frames[2].part, frames[2].coffset), (1, 0));
        assert!(frames[2].zero && !frames[0].zero);
    }

    #[test]
    fn refuses_what_disagrees_with_the_manifest() {
        let (idx, mut plan) = index();
        plan.parts[0].desc.size = 151;
        assert!(idx.map(&plan).unwrap_err().contains("151"));
        let (idx, mut plan) = index();
        plan.parts.pop();
        assert!(idx.map(&plan).unwrap_err().contains("2 disk chunks"));
        let (mut idx, plan) = index();
        idx.chunks[0].pop();
        assert!(idx.map(&plan).unwrap_err().contains("want 2"));
    }

    #[test]
    fn refuses_malformed_bytes() {
        let (idx, _) = index();
        let bytes = idx.encode();
        for cut in [0, 7, 12, 20, bytes.len() - 1] {
            assert!(FrameIndex::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(FrameIndex::decode(&extra).unwrap_err().contains("after"));
        let mut huge = bytes[..16].to_vec();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            FrameIndex::decode(&huge)
                .unwrap_err()
                .contains("cannot fit")
        );
        let mut magic = bytes;
        magic[0] = b'X';
        assert!(FrameIndex::decode(&magic).unwrap_err().contains("magic"));
    }
}
