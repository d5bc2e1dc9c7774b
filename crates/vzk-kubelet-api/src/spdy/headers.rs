//! SPDY/3 header blocks and their compression.
//!
//! A header block is `count(u32)` then `len(u32) name len(u32) value` pairs, all
//! big-endian; several values of one name are joined with NUL. On the wire each block is
//! a chunk of **one zlib stream per direction that lasts the whole connection**, primed
//! with the SPDY/3 dictionary and ended with a sync flush ([`HeaderCompressor`],
//! [`HeaderDecompressor`]). Names are lowercase on the wire; lookups here ignore case
//! (Go canonicalises names on read).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::SPDY_DICTIONARY;

/// Largest decompressed header block we accept (a guard against zlib bombs).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// An error compressing, decompressing or parsing a header block.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The zlib stream of the peer is corrupt.
    #[error("decompressing a header block")]
    Decompress(#[source] flate2::DecompressError),
    /// The zlib stream of the peer asked for a dictionary we could not set.
    #[error("setting the SPDY dictionary on the decompressor")]
    SetDecompressDictionary(#[source] flate2::DecompressError),
    /// Our compressor failed (should not happen).
    #[error("compressing a header block")]
    Compress(#[source] flate2::CompressError),
    /// The peer's zlib stream made no progress on its input.
    #[error("header block zlib stream stalled")]
    Stalled,
    /// The peer's zlib stream ended (SPDY streams are never finished).
    #[error("header block zlib stream ended")]
    StreamEnded,
    /// The decompressed block exceeds [`MAX_HEADER_BLOCK`].
    #[error("decompressed header block larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    /// The decompressed block is not a valid `count + pairs` block.
    #[error("malformed header block: {0}")]
    Malformed(&'static str),
}

/// Headers of a SYN_STREAM, SYN_REPLY or HEADERS frame, in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a header (the name is lowercased).
    #[must_use]
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.push(name, value);
        self
    }

    /// Adds a header (the name is lowercased).
    pub fn push(&mut self, name: &str, value: &str) {
        self.0.push((name.to_ascii_lowercase(), value.to_owned()));
    }

    /// The first value of `name` (case-insensitive); NUL-joined values give the first one.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or(v))
    }

    /// All `(name, value)` pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The uncompressed wire form.
    pub fn to_block(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self
                .0
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>(),
        );
        put_len(&mut out, self.0.len());
        for (n, v) in &self.0 {
            put_len(&mut out, n.len());
            out.extend_from_slice(n.as_bytes());
            put_len(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    /// Parses the uncompressed wire form.
    pub fn from_block(block: &[u8]) -> Result<Self, HeaderError> {
        let mut rest = block;
        let count = take_u32(&mut rest).ok_or(HeaderError::Malformed("truncated count"))?;
        // Every pair takes at least 8 bytes: bound the allocation by the input.
        if (count as usize).saturating_mul(8) > rest.len() {
            return Err(HeaderError::Malformed("count larger than the block"));
        }
        let mut pairs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = take_bytes(&mut rest).ok_or(HeaderError::Malformed("truncated name"))?;
            if name.is_empty() {
                return Err(HeaderError::Malformed("empty header name"));
            }
            let value = take_bytes(&mut rest).ok_or(HeaderError::Malformed("truncated value"))?;
            pairs.push((
                String::from_utf8_lossy(name).to_ascii_lowercase(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        }
        if !rest.is_empty() {
            return Err(HeaderError::Malformed("trailing bytes after the last pair"));
        }
        Ok(Self(pairs))
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(u32::from_be_bytes(*head))
}

fn take_bytes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take_u32(rest)? as usize;
    if rest.len() < len {
        return None;
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Some(head)
}

/// The sending direction's persistent zlib stream.
pub struct HeaderCompressor {
    zlib: Compress,
}

impl std::fmt::Debug for HeaderCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderCompressor")
            .field("total_in", &self.zlib.total_in())
            .finish()
    }
}

impl HeaderCompressor {
    /// A compressor primed with the SPDY dictionary. Its window is 2 KiB (11 bits), not
    /// zlib's 32 KiB: header blocks are small and the dictionary (1,423 bytes) still fits,
    /// and each session's compressor then holds ~130 KiB instead of ~260 KiB. Any
    /// inflater (a 32 KiB window) reads what it writes.
    pub fn new() -> Result<Self, HeaderError> {
        let mut zlib = Compress::new_with_window_bits(Compression::best(), true, 11);
        zlib.set_dictionary(SPDY_DICTIONARY)
            .map_err(HeaderError::Compress)?;
        Ok(Self { zlib })
    }

    /// Compresses one block and sync-flushes it, appending to `out`.
    pub fn compress(&mut self, headers: &Headers, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        let block = headers.to_block();
        let mut consumed = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(block.len() + 256);
            }
            let before = self.zlib.total_in();
            self.zlib
                .compress_vec(&block[consumed..], out, FlushCompress::Sync)
                .map_err(HeaderError::Compress)?;
            consumed += usize::try_from(self.zlib.total_in() - before).unwrap_or(usize::MAX);
            // Done once all input is in and the flush left spare output room.
            if consumed >= block.len() && out.capacity() - out.len() >= 64 {
                return Ok(());
            }
        }
    }
}

/// The receiving direction's persistent zlib stream.
pub struct HeaderDecompressor {
    zlib: Decompress,
}

impl std::fmt::Debug for HeaderDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderDecompressor")
            .field("total_in", &self.zlib.total_in())
            .finish()
    }
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    /// A decompressor expecting a zlib header (the dictionary is set when asked for).
    pub fn new() -> Self {
        Self {
            zlib: Decompress::new(true),
        }
    }

    /// Decompresses the exact header-block bytes of one frame and parses them.
    pub fn decompress(&mut self, input: &[u8]) -> Result<Headers, HeaderError> {
        let mut out = Vec::with_capacity((input.len() * 4).clamp(64, MAX_HEADER_BLOCK));
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(HeaderError::TooLarge);
                }
                out.reserve(out.len().min(MAX_HEADER_BLOCK - out.len()).max(64));
            }
            let (in0, out0) = (self.zlib.total_in(), out.len());
            let res = self
                .zlib
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += usize::try_from(self.zlib.total_in() - in0).unwrap_or(usize::MAX);
            match res {
                Ok(Status::StreamEnd) => return Err(HeaderError::StreamEnded),
                Ok(_) => {
                    if consumed >= input.len() && out.len() < out.capacity() {
                        break;
                    }
                    if self.zlib.total_in() == in0
                        && out.len() == out0
                        && out.len() < out.capacity()
                    {
                        return Err(HeaderError::Stalled);
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.zlib
                        .set_dictionary(SPDY_DICTIONARY)
                        .map_err(HeaderError::SetDecompressDictionary)?;
                }
                Err(e) => return Err(HeaderError::Decompress(e)),
            }
        }
        if out.len() > MAX_HEADER_BLOCK {
            return Err(HeaderError::TooLarge);
        }
        Headers::from_block(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trips_and_lookup_ignores_case() {
        let h = Headers::new()
            .with("streamType", "error")
            .with("Port", "80");
        let back = Headers::from_block(&h.to_block()).expect("parses");
        assert_eq!(back, h);
        assert_eq!(back.get("STREAMTYPE"), Some("error"));
        assert_eq!(back.get("port"), Some("80"));
        assert_eq!(back.get("requestid"), None);
    }

    #[test]
    fn dictionary_starts_as_the_spec_says() {
        assert_eq!(&SPDY_DICTIONARY[..11], b"\0\0\0\x07options");
        assert_eq!(SPDY_DICTIONARY.len(), 1423);
    }

    #[test]
    fn persistent_streams_round_trip_many_blocks_including_empty_ones() {
        let mut c = HeaderCompressor::new().expect("compressor");
        let mut d = HeaderDecompressor::new();
        for i in 0..50 {
            let h = if i % 7 == 0 {
                Headers::new()
            } else {
                Headers::new()
                    .with("streamtype", "data")
                    .with("requestid", &i.to_string())
            };
            let mut wire = Vec::new();
            c.compress(&h, &mut wire).expect("compress");
            assert_eq!(d.decompress(&wire).expect("decompress"), h);
        }
    }

    #[test]
    fn malformed_blocks_are_errors() {
        assert!(Headers::from_block(&[0, 0, 0]).is_err());
        assert!(Headers::from_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(Headers::from_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(
            HeaderDecompressor::new()
                .decompress(b"not zlib at all")
                .is_err()
        );
    }
}
