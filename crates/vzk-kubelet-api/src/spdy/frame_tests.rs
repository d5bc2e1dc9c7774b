//! Unit and property tests of the frame codec: exact byte layouts, arbitrary splits of
//! the byte stream, round-trips through one persistent compressor, garbage input.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use super::frame::{Frame, FrameDecoder, FrameEncoder, FrameError, Setting};
use super::headers::Headers;

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut enc = FrameEncoder::new().expect("encoder");
    let mut buf = BytesMut::new();
    for f in frames {
        enc.encode(f.clone(), &mut buf).expect("encodes");
    }
    buf
}

fn decode_in_chunks(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    for cut in cuts {
        if cut < pos {
            continue;
        }
        buf.extend_from_slice(&bytes[pos..cut]);
        pos = cut;
        while let Some(f) = dec.decode(&mut buf)? {
            out.push(f);
        }
    }
    assert!(buf.is_empty(), "left-over bytes after the last frame");
    Ok(out)
}

#[test]
fn ping_and_rst_have_the_spec_layout() {
    let bytes = encode_all(&[
        Frame::Ping { id: 7 },
        Frame::RstStream {
            stream_id: 3,
            status: 5,
        },
    ]);
    assert_eq!(
        &bytes[..],
        &[
            0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x07, // PING 7
            0x80, 0x03, 0x00, 0x03, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 3, 0, 0, 0,
            5, // RST 3 CANCEL
        ][..]
    );
}

#[test]
fn data_frame_layout_and_fin_flag() {
    let f = Frame::Data {
        stream_id: 5,
        fin: true,
        data: Bytes::from_static(b"hi"),
    };
    let bytes = encode_all(std::slice::from_ref(&f));
    assert_eq!(&bytes[..], &[0, 0, 0, 5, 0x01, 0, 0, 2, b'h', b'i'][..]);
    assert_eq!(decode_in_chunks(&bytes, &[]).expect("decodes"), vec![f]);
}

#[test]
fn first_header_block_carries_the_dictionary_flag() {
    let bytes = encode_all(&[Frame::SynReply {
        stream_id: 1,
        fin: false,
        headers: Headers::new(),
    }]);
    // 8 bytes frame header, 4 bytes stream id, then zlib: CMF (deflate, a 2 KiB window:
    // 0x38), FLG with FDICT (0x20), the pair a multiple of 31.
    assert_eq!(bytes[12], 0x38, "CM 8 (deflate), CINFO 3 (2 KiB window)");
    assert_ne!(bytes[13] & 0x20, 0, "FDICT must be set");
    assert_eq!((u16::from(bytes[12]) * 256 + u16::from(bytes[13])) % 31, 0);
    // Adler-32 of the SPDY dictionary, as every SPDY/3 implementation expects.
    assert_eq!(&bytes[14..18], &[0xe3, 0xc6, 0xa7, 0xc2]);
}

#[test]
fn wrong_version_and_bad_lengths_are_errors() {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1][..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(FrameError::UnsupportedVersion(2))
    ));
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1][..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Err(FrameError::InvalidLength {
            frame_type: 6,
            len: 3
        })
    ));
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(
        &[
            0x80, 0x03, 0x00, 0x01, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
        ][..],
    );
    assert!(matches!(
        dec.decode(&mut buf),
        Err(FrameError::HeaderBlock { frame_type: 1, .. })
    ));
}

#[test]
fn unknown_control_frames_are_skipped_not_errors() {
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(
        &[
            0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 2, 9, 9, 0x80, 0x03, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1,
        ][..],
    );
    assert_eq!(
        dec.decode(&mut buf).expect("ok"),
        Some(Frame::Unknown { frame_type: 10 })
    );
    assert_eq!(
        dec.decode(&mut buf).expect("ok"),
        Some(Frame::Ping { id: 1 })
    );
}

fn header_strategy() -> impl Strategy<Value = Headers> {
    proptest::collection::vec(("[a-z][a-z0-9-]{0,15}", "[ -~]{0,40}"), 0..6).prop_map(|pairs| {
        let mut h = Headers::new();
        for (n, v) in pairs {
            h.push(&n, &v);
        }
        h
    })
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let id = 0u32..0x7fff_ffff;
    prop_oneof![
        (
            id.clone(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(stream_id, fin, d)| Frame::Data {
                stream_id,
                fin,
                data: Bytes::from(d)
            }),
        (id.clone(), id.clone(), 0u8..8, 0u8..4, header_strategy()).prop_map(
            |(stream_id, assoc_stream_id, priority, flags, headers)| {
                Frame::SynStream {
                    stream_id,
                    assoc_stream_id,
                    priority,
                    flags,
                    headers,
                }
            }
        ),
        (id.clone(), any::<bool>(), header_strategy()).prop_map(|(stream_id, fin, headers)| {
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
        }),
        (id.clone(), any::<bool>(), header_strategy()).prop_map(|(stream_id, fin, headers)| {
            Frame::Headers {
                stream_id,
                fin,
                headers,
            }
        }),
        (id.clone(), 1u32..12)
            .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
        (
            any::<bool>(),
            proptest::collection::vec((any::<u8>(), 0u32..0x00ff_ffff, any::<u32>()), 0..5)
        )
            .prop_map(|(clear, e)| Frame::Settings {
                clear,
                entries: e
                    .into_iter()
                    .map(|(flags, id, value)| Setting { flags, id, value })
                    .collect(),
            }),
        any::<u32>().prop_map(|id| Frame::Ping { id }),
        (id.clone(), any::<u32>()).prop_map(|(last_good_stream_id, status)| Frame::GoAway {
            last_good_stream_id,
            status
        }),
        (id, 0u32..0x7fff_ffff)
            .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
        prop_oneof![Just(5u16), Just(10u16), 11u16..0x7fff]
            .prop_map(|frame_type| Frame::Unknown { frame_type }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip_through_arbitrary_splits(
        frames in proptest::collection::vec(frame_strategy(), 1..20),
        cuts in proptest::collection::vec(any::<usize>(), 0..30),
    ) {
        let bytes = encode_all(&frames);
        let decoded = decode_in_chunks(&bytes, &cuts).expect("our own frames decode");
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn header_blocks_round_trip_through_one_persistent_compressor(
        blocks in proptest::collection::vec(header_strategy(), 1..40),
    ) {
        let mut c = super::headers::HeaderCompressor::new().expect("compressor");
        let mut d = super::headers::HeaderDecompressor::new();
        for h in blocks {
            let mut wire = Vec::new();
            c.compress(&h, &mut wire).expect("compresses");
            prop_assert_eq!(d.decompress(&wire).expect("decompresses"), h);
        }
    }

    #[test]
    fn garbage_is_an_error_or_frames_never_a_panic(
        garbage in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut pos = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (garbage.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(garbage.len());
        'outer: for cut in cuts {
            buf.extend_from_slice(&garbage[pos..cut.max(pos)]);
            pos = cut.max(pos);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn valid_prefix_then_garbage_never_panics(
        frames in proptest::collection::vec(frame_strategy(), 1..5),
        garbage in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = encode_all(&frames).to_vec();
        bytes.extend_from_slice(&garbage);
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut n = 0;
        while let Ok(Some(_)) = dec.decode(&mut buf) {
            n += 1;
            prop_assert!(n <= frames.len() + garbage.len());
        }
    }
}
