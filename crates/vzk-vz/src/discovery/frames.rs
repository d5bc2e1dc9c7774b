//! Sniffed-frame parsing for bridged macOS guests: which IPv4 address does a MAC use?
//!
//! macOS exposes a host interface's traffic through BPF devices (`/dev/bpfN`); a
//! `read` returns a buffer of records, each a `struct bpf_hdr` followed by the captured
//! Ethernet frame, padded to `BPF_ALIGNMENT` (4). [`bpf_frames`] walks such a buffer;
//! [`guest_ipv4`] applies the reference implementation's rule — *a frame whose Ethernet
//! source is the guest's MAC, carrying IPv4 with a non-zero source address* — and also
//! accepts ARP frames whose sender is the guest (a guest announces its address with ARP
//! right after its DHCP ACK). 802.1Q-tagged frames are looked into.
//!
//! Contract: pure and total — truncated or malformed records end the walk, malformed
//! frames yield `None`, nothing panics on any input.

use std::net::Ipv4Addr;

use vzk_vm::MacAddr;

/// `BPF_ALIGNMENT` on macOS (`sizeof(int32_t)`).
pub const BPF_ALIGNMENT: usize = 4;

/// Offsets in macOS's `struct bpf_hdr` (a 32-bit `timeval` first).
const CAPLEN: usize = 8;
const HDRLEN: usize = 16;
const MIN_HDR: usize = 18;

/// Iterator over the frames of a BPF read buffer.
#[derive(Debug, Clone)]
pub struct BpfFrames<'a> {
    buf: &'a [u8],
    offset: usize,
}

/// The frames of a buffer returned by `read` on a macOS BPF device.
pub fn bpf_frames(buf: &[u8]) -> BpfFrames<'_> {
    BpfFrames { buf, offset: 0 }
}

impl<'a> Iterator for BpfFrames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rec = self.buf.get(self.offset..)?;
        if rec.len() < MIN_HDR {
            return None;
        }
        let caplen = u32::from_ne_bytes([
            rec[CAPLEN],
            rec[CAPLEN + 1],
            rec[CAPLEN + 2],
            rec[CAPLEN + 3],
        ]) as usize;
        let hdrlen = usize::from(u16::from_ne_bytes([rec[HDRLEN], rec[HDRLEN + 1]]));
        if hdrlen < MIN_HDR {
            return None;
        }
        let end = hdrlen.checked_add(caplen)?;
        let frame = rec.get(hdrlen..end)?;
        self.offset = self
            .offset
            .checked_add(end.next_multiple_of(BPF_ALIGNMENT))?;
        Some(frame)
    }
}

/// The IPv4 address `frame` shows `mac` using, if any.
pub fn guest_ipv4(frame: &[u8], mac: MacAddr) -> Option<Ipv4Addr> {
    if frame.get(6..12)? != mac.0 {
        return None;
    }
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut payload = frame.get(14..)?;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*payload.get(2)?, *payload.get(3)?]);
        payload = payload.get(4..)?;
    }
    let ip = match ethertype {
        0x0800 => {
            // Version 4, source address at bytes 12..16 of the header.
            if payload.first()? >> 4 != 4 {
                return None;
            }
            let s = payload.get(12..16)?;
            Ipv4Addr::new(s[0], s[1], s[2], s[3])
        }
        0x0806 => {
            // Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4; sha, spa.
            if payload.get(0..6)? != [0, 1, 8, 0, 6, 4] || payload.get(8..14)? != mac.0 {
                return None;
            }
            let s = payload.get(14..18)?;
            Ipv4Addr::new(s[0], s[1], s[2], s[3])
        }
        _ => return None,
    };
    (!ip.is_unspecified()).then_some(ip)
}

/// The first address of `mac` in a BPF read buffer.
pub fn scan(buf: &[u8], mac: MacAddr) -> Option<Ipv4Addr> {
    bpf_frames(buf).find_map(|f| guest_ipv4(f, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: MacAddr = MacAddr([0x0a, 0x01, 0x02, 0x03, 0x04, 0x05]);
    const OTHER: MacAddr = MacAddr([0x0a, 0x01, 0x02, 0x03, 0x04, 0x50]);

    fn eth(src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(src: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&[192, 168, 1, 1]);
        h.extend_from_slice(&[0; 8]); // UDP header
        h
    }

    fn arp(sha: MacAddr, spa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sha.0);
        a.extend_from_slice(&spa);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&[192, 168, 1, 1]);
        a
    }

    /// A macOS BPF read buffer: 20-byte headers (18 used + padding), aligned records.
    fn bpf_buffer(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for f in frames {
            let mut hdr = vec![0u8; 20];
            hdr[CAPLEN..CAPLEN + 4].copy_from_slice(&(f.len() as u32).to_ne_bytes());
            hdr[12..16].copy_from_slice(&(f.len() as u32).to_ne_bytes());
            hdr[HDRLEN..HDRLEN + 2].copy_from_slice(&20u16.to_ne_bytes());
            buf.extend_from_slice(&hdr);
            buf.extend_from_slice(f);
            while buf.len() % BPF_ALIGNMENT != 0 {
                buf.push(0);
            }
        }
        buf
    }

    #[test]
    fn ipv4_from_the_guest_gives_its_source_address() {
        assert_eq!(
            guest_ipv4(&eth(GUEST, 0x0800, &ipv4([192, 168, 1, 42])), GUEST),
            Some(Ipv4Addr::new(192, 168, 1, 42))
        );
        // DHCP DISCOVER/REQUEST come from 0.0.0.0: not an answer yet.
        assert_eq!(
            guest_ipv4(&eth(GUEST, 0x0800, &ipv4([0, 0, 0, 0])), GUEST),
            None
        );
        // Someone else's frame.
        assert_eq!(
            guest_ipv4(&eth(OTHER, 0x0800, &ipv4([192, 168, 1, 7])), GUEST),
            None
        );
    }

    #[test]
    fn arp_from_the_guest_and_vlan_tags_are_understood() {
        assert_eq!(
            guest_ipv4(&eth(GUEST, 0x0806, &arp(GUEST, [10, 0, 0, 9])), GUEST),
            Some(Ipv4Addr::new(10, 0, 0, 9))
        );
        // ARP probe (sender IP 0.0.0.0).
        assert_eq!(
            guest_ipv4(&eth(GUEST, 0x0806, &arp(GUEST, [0, 0, 0, 0])), GUEST),
            None
        );
        let mut tagged = vec![0x00, 0x64, 0x08, 0x00];
        tagged.extend_from_slice(&ipv4([172, 16, 0, 5]));
        assert_eq!(
            guest_ipv4(&eth(GUEST, 0x8100, &tagged), GUEST),
            Some(Ipv4Addr::new(172, 16, 0, 5))
        );
        // IPv6 is ignored.
        assert_eq!(guest_ipv4(&eth(GUEST, 0x86dd, &[0x60; 40]), GUEST), None);
    }

    #[test]
    fn bpf_buffer_records_are_walked_with_alignment() {
        // 42-byte ARP frame (not a multiple of 4) before ours, to exercise the padding.
        let frames = vec![
            eth(OTHER, 0x0806, &arp(OTHER, [192, 168, 1, 7])),
            eth(OTHER, 0x0800, &ipv4([192, 168, 1, 8])),
            eth(GUEST, 0x0800, &ipv4([192, 168, 1, 42])),
        ];
        let buf = bpf_buffer(&frames);
        let walked: Vec<&[u8]> = bpf_frames(&buf).collect();
        assert_eq!(walked.len(), 3);
        assert_eq!(walked[0], frames[0].as_slice());
        assert_eq!(scan(&buf, GUEST), Some(Ipv4Addr::new(192, 168, 1, 42)));
        assert_eq!(scan(&buf, MacAddr([2, 0, 0, 0, 0, 1])), None);
    }

    #[test]
    fn truncated_and_garbage_input_never_panics() {
        let frame = eth(GUEST, 0x0800, &ipv4([192, 168, 1, 42]));
        let buf = bpf_buffer(std::slice::from_ref(&frame));
        let complete = 20 + frame.len(); // header + frame, before padding
        for cut in 0..=buf.len() {
            let frames: Vec<&[u8]> = bpf_frames(&buf[..cut]).collect();
            assert_eq!(frames.len(), usize::from(cut >= complete), "cut at {cut}");
        }
        for junk in [&[0xffu8; 64][..], &[0u8; 64][..], &[1, 2, 3]] {
            let _ = scan(junk, GUEST);
            let _ = guest_ipv4(junk, GUEST);
        }
    }
}
