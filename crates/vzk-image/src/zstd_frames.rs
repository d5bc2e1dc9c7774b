//! zstd decoding straight into the caller's buffer.
//!
//! zstd's streaming decoder normally decodes into a window buffer of its own and copies
//! out of it: a second pass over every decoded byte. We push each chunk as a run of
//! independent frames of [`FRAME`] bytes that declare their content size; a frame that
//! fits in the caller's buffer is decoded *into* it (`ZSTD_d_stableOutBuffer`), with no
//! copy. Any other frame (no declared size, larger than the buffer left, images pushed
//! as one frame per chunk before, or by other tools) is streamed the usual way, so every
//! valid zstd stream decodes.

use std::io::{BufRead, Read};

use zstd::zstd_safe::{self, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

/// Decoded bytes per zstd frame in the chunks we push.
pub(crate) const FRAME: usize = 1 << 20;

/// A frame header is at most this long (`ZSTD_FRAMEHEADERSIZE_MAX`).
const HEADER_MAX: usize = 18;

/// Output handed out per call while streaming a frame through zstd's own buffer: small
/// enough that the caller hashes it while it is still in the cache.
const STREAM_STEP: usize = 256 << 10;

/// A `Read` of the decoded bytes of a zstd stream (one or more frames) read from `src`.
pub(crate) struct ZstdFrames<'r, R: BufRead> {
    src: &'r mut R,
    dctx: DCtx<'static>,
    /// Inside a frame that is being streamed through zstd's window buffer.
    streaming: bool,
    /// Frames decoded straight into the caller's buffer (for tests and logs).
    pub(crate) in_place: u64,
}

fn zerr(code: usize) -> std::io::Error {
    std::io::Error::other(format!("zstd: {}", zstd_safe::get_error_name(code)))
}

fn truncated() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "zstd: the stream ends inside a frame",
    )
}

impl<'r, R: BufRead> ZstdFrames<'r, R> {
    pub(crate) fn new(src: &'r mut R) -> std::io::Result<Self> {
        let dctx = DCtx::try_create()
            .ok_or_else(|| std::io::Error::other("zstd: cannot allocate a decoder"))?;
        Ok(ZstdFrames {
            src,
            dctx,
            streaming: false,
            in_place: 0,
        })
    }

    /// Start the next frame in the given output mode.
    fn begin(&mut self, stable: bool) -> std::io::Result<()> {
        self.dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
        self.dctx
            .set_parameter(DParameter::StableOutBuffer(stable))
            .map_err(zerr)?;
        Ok(())
    }

    /// One `ZSTD_decompressStream` call on what `src` has buffered: zstd's hint (0 at the
    /// end of a frame) and whether `src` was at its end.
    fn step(&mut self, ob: &mut OutBuffer<'_, [u8]>) -> std::io::Result<(usize, bool)> {
        let input = self.src.fill_buf()?;
        let eof = input.is_empty();
        let mut ib = InBuffer::around(input);
        let r = self.dctx.decompress_stream(ob, &mut ib).map_err(zerr)?;
        let used = ib.pos();
        self.src.consume(used);
        Ok((r, eof))
    }

    /// Decode one whole frame of `size` bytes into `out[..size]`.
    fn frame_into(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.begin(true)?;
        let size = out.len();
        let mut ob = OutBuffer::around(out);
        loop {
            match self.step(&mut ob)? {
                (0, _) => break,
                (_, true) => return Err(truncated()),
                _ => {}
            }
        }
        if ob.pos() != size {
            return Err(std::io::Error::other(format!(
                "zstd: a frame declaring {size} bytes decoded to {}",
                ob.pos()
            )));
        }
        self.in_place += 1;
        Ok(size)
    }

    /// Stream (part of) the current frame through zstd's buffer into `out`.
    fn stream_into(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min(STREAM_STEP);
        let mut ob = OutBuffer::around(&mut out[..n]);
        loop {
            let (r, eof) = self.step(&mut ob)?;
            if r == 0 {
                self.streaming = false;
                break;
            }
            if ob.pos() == n {
                break;
            }
            if eof {
                return Err(truncated());
            }
        }
        Ok(ob.pos())
    }
}

impl<R: BufRead> Read for ZstdFrames<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        // Frames that decode to nothing (skippable ones, empty ones) must not end the
        // stream: go on to the next frame.
        loop {
            if self.streaming {
                let n = self.stream_into(out)?;
                if n > 0 || self.streaming {
                    return Ok(n);
                }
                continue;
            }
            let head = self.src.fill_buf()?;
            if head.is_empty() {
                return Ok(0); // the end, at a frame boundary
            }
            let declared = if head.len() >= HEADER_MAX {
                zstd_safe::get_frame_content_size(head).ok().flatten()
            } else {
                None // a header split across network reads: stream this frame
            };
            match declared {
                Some(size) if size > 0 && size <= out.len() as u64 => {
                    return self.frame_into(&mut out[..size as usize]);
                }
                _ => {
                    self.begin(false)?;
                    self.streaming = true;
                }
            }
        }
    }
}

/// Decodes a whole zstd stream as a pull does, from input served in `step`-byte pieces
/// into reads of `out_size` bytes, stopping after `limit` decoded bytes: how many were
/// decoded. Hidden: only for the fuzz target `zstd_frames`.
#[doc(hidden)]
pub fn decode_zstd_frames(
    stream: &[u8],
    step: usize,
    out_size: usize,
    limit: u64,
) -> std::io::Result<u64> {
    let mut src = std::io::BufReader::with_capacity(step.max(1), stream);
    let mut dec = ZstdFrames::new(&mut src)?;
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

    fn content(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                if (i / 70_000) % 3 == 0 {
                    0
                } else {
                    (i * 31 % 251) as u8
                }
            })
            .collect()
    }

    /// Reads everything with the given output sizes, from input served in `step`-byte
    /// pieces (network reads split frames and headers anywhere).
    fn decode(stream: &[u8], step: usize, out_size: usize) -> std::io::Result<Vec<u8>> {
        decode_counting(stream, step, out_size).map(|(got, _)| got)
    }

    /// The decoded bytes and how many frames were decoded in place.
    fn decode_counting(
        stream: &[u8],
        step: usize,
        out_size: usize,
    ) -> std::io::Result<(Vec<u8>, u64)> {
        let mut src = std::io::BufReader::with_capacity(step, stream);
        let mut dec = ZstdFrames::new(&mut src)?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; out_size];
        loop {
            let n = dec.read(&mut buf)?;
            if n == 0 {
                return Ok((got, dec.in_place));
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    fn frames(data: &[u8], frame: usize) -> Vec<u8> {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let mut out = Vec::new();
        for piece in data.chunks(frame) {
            out.extend(c.compress(piece).unwrap());
        }
        out
    }

    #[test]
    fn sized_frames_single_frames_and_streams_without_sizes_all_decode() {
        let data = content(3 * FRAME + 12_345);
        let ours = frames(&data, FRAME);
        let single = zstd::bulk::compress(&data, 3).unwrap();
        // The streaming encoder writes no content size.
        let mut no_size = Vec::new();
        {
            let mut e = zstd::stream::write::Encoder::new(&mut no_size, 3).unwrap();
            std::io::Write::write_all(&mut e, &data).unwrap();
            e.finish().unwrap();
        }
        // A skippable frame and an empty frame in between must not end the stream.
        let mut odd = frames(&data[..FRAME], FRAME);
        odd.extend([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        odd.extend(zstd::bulk::compress(&[], 3).unwrap());
        odd.extend(frames(&data[FRAME..], FRAME));
        for (what, stream) in [
            ("ours", &ours),
            ("single", &single),
            ("no size", &no_size),
            ("odd", &odd),
        ] {
            for step in [7, 4096, 1 << 20] {
                for out in [100_000, 4 << 20] {
                    let got = decode(stream, step, out).unwrap();
                    assert!(got == data, "{what} step {step} out {out}");
                }
            }
        }
        // Sized frames that fit are decoded in place; the others are streamed.
        let in_place = |s: &[u8], out| decode_counting(s, 1 << 20, out).unwrap().1;
        assert_eq!(in_place(&ours, 4 << 20), 4);
        assert_eq!(in_place(&ours, 100_000), 1); // only the short last frame fits
        assert_eq!(in_place(&single, 4 << 20), 1);
        assert_eq!(in_place(&no_size, 4 << 20), 0);
        assert_eq!(in_place(&odd, 4 << 20), 4);
    }

    #[test]
    fn truncated_and_corrupt_streams_are_errors() {
        let data = content(2 * FRAME);
        let ours = frames(&data, FRAME);
        for cut in [ours.len() - 1, ours.len() / 2, 5] {
            let err = decode(&ours[..cut], 4096, 4 << 20).unwrap_err();
            assert!(err.to_string().contains("zstd"), "{err}");
        }
        let mut bad = ours.clone();
        let mid = bad.len() / 4;
        for b in &mut bad[mid..mid + 32] {
            *b ^= 0xa5;
        }
        // zstd frames carry no checksum here (the content digest is checked by the
        // caller): corruption is an error or, at worst, different bytes.
        assert!(decode(&bad, 4096, 4 << 20).map_or(true, |got| got != data));
    }
}
