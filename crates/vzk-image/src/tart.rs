//! Tart's formats: the Apple `COMPRESSION_LZ4` block framing of `tart.disk.v2` layers,
//! and Tart's `config.json`, converted to ours.
//!
//! Framing: a sequence of blocks, each starting with a 4-byte tag:
//! `bv41` + u32le decoded size + u32le encoded size + raw LZ4 block (which may refer
//! back into the previous block's decoded bytes); `bv4-` + u32le size + stored bytes;
//! `bv4$` ends the stream.

use std::io::{BufRead, Read, Write};

use crate::config::{GuestOs, VmConfig};

const TAG_LZ4: &[u8; 4] = b"bv41";
const TAG_RAW: &[u8; 4] = b"bv4-";
const TAG_END: &[u8; 4] = b"bv4$";
/// Largest block we accept (Apple writes 64 KiB blocks).
const MAX_BLOCK: u32 = 16 << 20;
/// LZ4 looks back at most 64 KiB.
const WINDOW: usize = 64 << 10;

/// Decodes Apple LZ4 framing.
pub struct AppleLz4Reader<R> {
    inner: R,
    out: Vec<u8>,
    pos: usize,
    dict: Vec<u8>,
    enc: Vec<u8>,
    done: bool,
}

impl<R: BufRead> AppleLz4Reader<R> {
    /// Wrap a reader of framed data.
    pub fn new(inner: R) -> Self {
        AppleLz4Reader {
            inner,
            out: Vec::new(),
            pos: 0,
            dict: Vec::new(),
            enc: Vec::new(),
            done: false,
        }
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.inner.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn next_block(&mut self) -> std::io::Result<()> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let mut tag = [0u8; 4];
        self.inner
            .read_exact(&mut tag)
            .map_err(|e| bad(format!("truncated Apple LZ4 stream: {e}")))?;
        // The previous block's output becomes the dictionary of the next block.
        if !self.out.is_empty() {
            let keep = self.out.len().min(WINDOW);
            self.dict.clear();
            self.dict
                .extend_from_slice(&self.out[self.out.len() - keep..]);
        }
        self.out.clear();
        self.pos = 0;
        match &tag {
            TAG_LZ4 => {
                let decoded = self.u32()?;
                let encoded = self.u32()?;
                if decoded > MAX_BLOCK || encoded > MAX_BLOCK {
                    return Err(bad(format!(
                        "Apple LZ4 block of {decoded}/{encoded} bytes is too large"
                    )));
                }
                self.enc.resize(encoded as usize, 0);
                self.inner.read_exact(&mut self.enc)?;
                self.out.resize(decoded as usize, 0);
                let n = lz4_flex::block::decompress_into_with_dict(
                    &self.enc,
                    &mut self.out,
                    &self.dict,
                )
                .map_err(|e| bad(format!("bad LZ4 block: {e}")))?;
                if n != decoded as usize {
                    return Err(bad(format!(
                        "LZ4 block decoded to {n} bytes, header says {decoded}"
                    )));
                }
            }
            TAG_RAW => {
                let size = self.u32()?;
                if size > MAX_BLOCK {
                    return Err(bad(format!("stored block of {size} bytes is too large")));
                }
                self.out.resize(size as usize, 0);
                self.inner.read_exact(&mut self.out)?;
            }
            TAG_END => self.done = true,
            other => return Err(bad(format!("unknown Apple LZ4 block tag {other:?}"))),
        }
        Ok(())
    }
}

impl<R: BufRead> Read for AppleLz4Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.next_block()?;
        }
        let n = (self.out.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The decoded size of the blocks Apple's streaming LZ4 encoder writes, and ours.
pub const BLOCK: usize = 64 << 10;

/// Writes Apple LZ4 framing: `block`-sized blocks, each compressed with the previous
/// block as its dictionary (as Apple's streaming encoder does), stored (`bv4-`) when
/// compression does not shrink it, and `bv4$` at [`AppleLz4Writer::finish`].
pub struct AppleLz4Writer<W: Write> {
    inner: W,
    block: usize,
    buf: Vec<u8>,
    prev: Vec<u8>,
    enc: Vec<u8>,
}

impl<W: Write> AppleLz4Writer<W> {
    /// Frame into `inner` with blocks of `block` bytes (at most 16 MiB; [`BLOCK`] is
    /// what Apple writes).
    pub fn new(inner: W, block: usize) -> Self {
        let block = block.clamp(1, MAX_BLOCK as usize);
        AppleLz4Writer {
            inner,
            block,
            buf: Vec::with_capacity(block),
            prev: Vec::with_capacity(block),
            enc: Vec::new(),
        }
    }

    fn flush_block(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let dict = &self.prev[self.prev.len().saturating_sub(WINDOW)..];
        self.enc
            .resize(lz4_flex::block::get_maximum_output_size(self.buf.len()), 0);
        let n = lz4_flex::block::compress_into_with_dict(&self.buf, &mut self.enc, dict)
            .map_err(|e| std::io::Error::other(format!("LZ4: {e}")))?;
        // Both sizes are at most `MAX_BLOCK` (16 MiB), so they fit a u32.
        let len = self.buf.len() as u32;
        if n < self.buf.len() {
            self.inner.write_all(TAG_LZ4)?;
            self.inner.write_all(&len.to_le_bytes())?;
            self.inner.write_all(&(n as u32).to_le_bytes())?;
            self.inner.write_all(&self.enc[..n])?;
        } else {
            self.inner.write_all(TAG_RAW)?;
            self.inner.write_all(&len.to_le_bytes())?;
            self.inner.write_all(&self.buf)?;
        }
        std::mem::swap(&mut self.prev, &mut self.buf);
        self.buf.clear();
        Ok(())
    }

    /// Write the last block and the end tag; returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.flush_block()?;
        self.inner.write_all(TAG_END)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for AppleLz4Writer<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = (self.block - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.block {
            self.flush_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Encode `data` in Apple LZ4 framing with `block`-sized blocks (see [`AppleLz4Writer`]).
pub fn apple_lz4_encode(data: &[u8], block: usize) -> Vec<u8> {
    let mut w = AppleLz4Writer::new(Vec::new(), block);
    // Writing to a Vec cannot fail, nor can LZ4 compression into a buffer of the maximum
    // output size.
    match w.write_all(data).and_then(|()| w.finish()) {
        Ok(v) => v,
        Err(e) => unreachable!("Apple LZ4 into memory: {e}"),
    }
}

/// Tart's `config.json` for an image of ours: what `tart` needs to run it (`version`,
/// `os`, `arch`, CPU and memory with their minimums, a random locally administered
/// `macAddress`, `display`; for macOS `ecid` and `hardwareModel`).
pub fn tart_config(c: &VmConfig) -> Result<serde_json::Value, String> {
    let cpus = c.cpus.or(c.min_cpus).unwrap_or(2);
    let memory = c.memory_bytes.or(c.min_memory_bytes).unwrap_or(4 << 30);
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfe) | 0x02; // unicast, locally administered
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut v = serde_json::json!({
        "version": 1,
        "os": c.os.as_str(),
        "arch": c.arch_or_default(),
        "cpuCountMin": c.min_cpus.unwrap_or(cpus).min(cpus),
        "cpuCount": cpus,
        "memorySizeMin": c.min_memory_bytes.unwrap_or(memory).min(memory),
        "memorySize": memory,
        "macAddress": mac,
        "display": {"width": 1024, "height": 768},
    });
    if c.os == GuestOs::Darwin {
        let (Some(hw), Some(id)) = (&c.hardware_model_data, &c.machine_id_data) else {
            return Err(
                "a macOS image needs hardwareModelData and machineIdData for Tart's config".into(),
            );
        };
        v["hardwareModel"] = hw.clone().into();
        v["ecid"] = id.clone().into();
    }
    Ok(v)
}

/// Convert Tart's `config.json` to ours (`ecid` → `machineIdData`, `hardwareModel` →
/// `hardwareModelData`, `cpuCount` → `cpus`, `memorySize` → `memoryBytes`,
/// `cpuCountMin` → `minCpus`, `memorySizeMin` → `minMemoryBytes`).
pub fn convert_config(bytes: &[u8]) -> Result<VmConfig, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("Tart config.json: {e}"))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let os = match s("os").as_deref() {
        None | Some("darwin") => GuestOs::Darwin,
        Some("linux") => GuestOs::Linux,
        Some(o) => return Err(format!("Tart config.json: unknown os {o:?}")),
    };
    Ok(VmConfig {
        mediatype: crate::media_types::TART_CONFIG.to_string(),
        os,
        arch: s("arch"),
        hardware_model_data: s("hardwareModel"),
        machine_id_data: s("ecid"),
        kernel_cmdline: None,
        // A count past u32 is not a count (it was truncated: 2^32 + 2 read as 2).
        cpus: v
            .get("cpuCount")
            .and_then(|x| x.as_u64())
            .and_then(|c| u32::try_from(c).ok()),
        memory_bytes: v.get("memorySize").and_then(|x| x.as_u64()),
        min_cpus: v
            .get("cpuCountMin")
            .and_then(|x| x.as_u64())
            .and_then(|c| u32::try_from(c).ok()),
        min_memory_bytes: v.get("memorySizeMin").and_then(|x| x.as_u64()),
        storage: Vec::new(),
        extra: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_back_references_across_blocks() {
        // Block 2 repeats block 1, so its LZ4 data refers back into block 1's output.
        let mut data = Vec::new();
        let text: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        data.extend_from_slice(&text[..65536]);
        data.extend_from_slice(&text[..65536]);
        data.extend((0..1000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)); // stored-ish tail
        let enc = apple_lz4_encode(&data, 65536);
        assert_eq!(&enc[..4], b"bv41");
        // The second block must be tiny: it is all back-references into block 1.
        let second = 12 + u32::from_le_bytes(enc[8..12].try_into().expect("4")) as usize;
        assert_eq!(&enc[second..second + 4], b"bv41");
        let second_len = u32::from_le_bytes(enc[second + 8..second + 12].try_into().expect("4"));
        assert!(
            second_len < 1024,
            "second block uses the dictionary ({second_len} bytes)"
        );
        let mut out = Vec::new();
        AppleLz4Reader::new(&enc[..])
            .read_to_end(&mut out)
            .expect("decodes");
        assert_eq!(out, data);
    }

    #[test]
    fn the_writer_frames_the_same_whatever_the_write_sizes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i / 3 % 97) as u8).collect();
        let whole = apple_lz4_encode(&data, BLOCK);
        let mut w = AppleLz4Writer::new(Vec::new(), BLOCK);
        for piece in data.chunks(7_777) {
            w.write_all(piece).expect("write");
        }
        assert_eq!(w.finish().expect("finish"), whole);
        // An empty stream is just the end tag.
        assert_eq!(apple_lz4_encode(&[], BLOCK), b"bv4$");
    }

    #[test]
    fn our_config_becomes_a_config_tart_decodes() {
        let c = VmConfig {
            os: GuestOs::Darwin,
            hardware_model_data: Some("aHc=".into()),
            machine_id_data: Some("aWQ=".into()),
            cpus: Some(4),
            min_cpus: Some(2),
            memory_bytes: Some(8 << 30),
            ..Default::default()
        };
        let t = tart_config(&c).expect("converts");
        // The keys Tart's VMConfig decoder requires, with Tart's names.
        for k in [
            "version",
            "cpuCountMin",
            "cpuCount",
            "memorySizeMin",
            "memorySize",
            "macAddress",
            "ecid",
            "hardwareModel",
        ] {
            assert!(t.get(k).is_some(), "{k} missing from {t}");
        }
        assert_eq!(
            (t["cpuCount"].as_u64(), t["cpuCountMin"].as_u64()),
            (Some(4), Some(2))
        );
        assert_eq!(t["memorySizeMin"].as_u64(), Some(8 << 30));
        let mac = t["macAddress"].as_str().expect("mac");
        let first = u8::from_str_radix(&mac[..2], 16).expect("hex");
        assert_eq!((mac.len(), first & 0x03), (17, 0x02), "{mac}");
        // And back: ours again, but for what Tart does not carry.
        let back = convert_config(&serde_json::to_vec(&t).expect("json")).expect("back");
        assert_eq!(
            (
                back.cpus,
                back.min_cpus,
                back.memory_bytes,
                back.machine_id_data
            ),
            (Some(4), Some(2), Some(8 << 30), Some("aWQ=".into()))
        );
        // A macOS config without its platform data cannot be run by Tart.
        let bare = VmConfig::default();
        assert!(tart_config(&bare).is_err());
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let mut out = Vec::new();
        assert!(
            AppleLz4Reader::new(&b"xxxx"[..])
                .read_to_end(&mut out)
                .is_err()
        );
        let enc = apple_lz4_encode(b"hello hello hello hello", 8);
        assert!(
            AppleLz4Reader::new(&enc[..enc.len() - 4])
                .read_to_end(&mut out)
                .is_err()
        );
    }

    #[test]
    fn converts_tart_minimums() {
        // As `tart create --from-ipsw` writes them: the restore image's requirements.
        let c = convert_config(br#"{"version":1,"os":"darwin","arch":"arm64","cpuCountMin":4,"cpuCount":4,"memorySizeMin":8589934592,"memorySize":8589934592,"ecid":"AA==","hardwareModel":"AA=="}"#)
            .expect("converts");
        assert_eq!((c.min_cpus, c.min_memory_bytes), (Some(4), Some(8 << 30)));
        let c = convert_config(br#"{"version":1,"os":"linux","cpuCount":2}"#).expect("converts");
        assert_eq!((c.min_cpus, c.min_memory_bytes), (None, None));
    }

    #[test]
    fn converts_tart_config() {
        let c = convert_config(br#"{"version":1,"os":"linux","arch":"arm64","cpuCount":4,"memorySize":4294967296,"ecid":"AA=="}"#)
            .expect("converts");
        assert_eq!(
            (c.os, c.cpus, c.memory_bytes),
            (GuestOs::Linux, Some(4), Some(4 << 30))
        );
        assert_eq!(c.machine_id_data.as_deref(), Some("AA=="));
    }

    #[test]
    fn a_cpu_count_past_u32_is_not_truncated() {
        let c = convert_config(br#"{"os":"linux","cpuCount":4294967298}"#).expect("converts");
        assert_eq!(c.cpus, None);
    }
}
