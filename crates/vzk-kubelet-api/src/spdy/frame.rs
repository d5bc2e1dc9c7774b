//! SPDY/3.1 frames and their byte codec.
//!
//! [`FrameDecoder`] and [`FrameEncoder`] are the `tokio_util` [`Decoder`] and [`Encoder`]
//! of the two directions of a connection: each owns its direction's persistent header
//! zlib stream, so one instance must see every frame of its direction in order. Decoding never panics on any input: a bad frame is
//! a [`FrameError`], after which the connection must be dropped (the zlib state is lost).
//!
//! Layout (big-endian): a control frame is `1|version(15)=3|type(16)|flags(8)|len(24)|
//! payload`; a data frame is `0|stream-id(31)|flags(8)|len(24)|data`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::headers::{HeaderCompressor, HeaderDecompressor, HeaderError, Headers};

/// FIN flag (data, SYN_STREAM, SYN_REPLY, HEADERS).
pub const FLAG_FIN: u8 = 0x01;
/// UNIDIRECTIONAL flag (SYN_STREAM).
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// CLEAR_SETTINGS flag (SETTINGS).
pub const FLAG_CLEAR_SETTINGS: u8 = 0x01;
/// Largest payload a frame can carry (24-bit length).
pub const MAX_PAYLOAD: usize = 0x00ff_ffff;
const VERSION: u16 = 3;

/// RST_STREAM status codes.
pub mod rst {
    /// Generic protocol error.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// Frame for a stream that is not active.
    pub const INVALID_STREAM: u32 = 2;
    /// Stream refused before any processing.
    pub const REFUSED_STREAM: u32 = 3;
    /// Unsupported SPDY version.
    pub const UNSUPPORTED_VERSION: u32 = 4;
    /// The stream is no longer needed.
    pub const CANCEL: u32 = 5;
    /// Internal error.
    pub const INTERNAL_ERROR: u32 = 6;
    /// Flow-control violation.
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    /// Stream ID reused.
    pub const STREAM_IN_USE: u32 = 8;
    /// Data after half-close.
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    /// Frame too large.
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Per-entry flags.
    pub flags: u8,
    /// Setting ID (24 bits; 7 = INITIAL_WINDOW_SIZE).
    pub id: u32,
    /// Value.
    pub value: u32,
}

/// A decoded SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// DATA.
    Data {
        /// Stream (31 bits).
        stream_id: u32,
        /// Last frame of the sender on this stream.
        fin: bool,
        /// Payload.
        data: Bytes,
    },
    /// SYN_STREAM (type 1): the peer opens a stream.
    SynStream {
        /// New stream ID.
        stream_id: u32,
        /// Associated stream ID (server push; unused here).
        assoc_stream_id: u32,
        /// Priority, 0–7.
        priority: u8,
        /// Raw flags (FIN, UNIDIRECTIONAL).
        flags: u8,
        /// Request headers.
        headers: Headers,
    },
    /// SYN_REPLY (type 2): the receiver accepts a stream.
    SynReply {
        /// Stream being accepted.
        stream_id: u32,
        /// Also half-close.
        fin: bool,
        /// Reply headers.
        headers: Headers,
    },
    /// RST_STREAM (type 3).
    RstStream {
        /// Stream being reset.
        stream_id: u32,
        /// Status code (see [`rst`]).
        status: u32,
    },
    /// SETTINGS (type 4).
    Settings {
        /// CLEAR_SETTINGS flag.
        clear: bool,
        /// Entries.
        entries: Vec<Setting>,
    },
    /// PING (type 6).
    Ping {
        /// Ping ID (peer-initiated pings are odd when the peer is the client).
        id: u32,
    },
    /// GOAWAY (type 7).
    GoAway {
        /// Last stream the sender processed.
        last_good_stream_id: u32,
        /// Status code.
        status: u32,
    },
    /// HEADERS (type 8).
    Headers {
        /// Stream.
        stream_id: u32,
        /// Also half-close.
        fin: bool,
        /// Extra headers.
        headers: Headers,
    },
    /// WINDOW_UPDATE (type 9).
    WindowUpdate {
        /// Stream (0 = the whole session).
        stream_id: u32,
        /// Window increment.
        delta: u32,
    },
    /// A control frame type this codec does not know (ignored by the session).
    Unknown {
        /// Control frame type.
        frame_type: u16,
    },
}

/// A frame that could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Control frame with a version other than 3.
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    /// A known control frame with a payload length that does not fit its type.
    #[error("control frame type {frame_type} has invalid length {len}")]
    InvalidLength {
        /// Frame type.
        frame_type: u16,
        /// Payload length.
        len: usize,
    },
    /// Header block of a SYN_STREAM, SYN_REPLY or HEADERS frame.
    #[error("header block of control frame type {frame_type}")]
    HeaderBlock {
        /// Frame type.
        frame_type: u16,
        /// Cause.
        #[source]
        source: HeaderError,
    },
    /// A frame to encode is larger than 2^24 − 1 bytes.
    #[error("frame payload of {0} bytes exceeds the 24-bit length")]
    TooLarge(usize),
    /// Reading or writing the transport.
    #[error("transport")]
    Io(#[source] std::io::Error),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Decoder of the frames a peer sends (owns the receiving zlib stream).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    inflate: HeaderDecompressor,
}

/// Encoder of the frames we send (owns the sending zlib stream).
#[derive(Debug)]
pub struct FrameEncoder {
    deflate: HeaderCompressor,
}

impl FrameEncoder {
    /// An encoder for a new connection.
    pub fn new() -> Result<Self, HeaderError> {
        Ok(Self {
            deflate: HeaderCompressor::new()?,
        })
    }
}

impl FrameDecoder {
    /// A decoder for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    fn headers(&mut self, frame_type: u16, block: &[u8]) -> Result<Headers, FrameError> {
        self.inflate
            .decompress(block)
            .map_err(|source| FrameError::HeaderBlock { frame_type, source })
    }

    fn control(&mut self, frame_type: u16, flags: u8, mut p: Bytes) -> Result<Frame, FrameError> {
        let len = p.len();
        let bad = || FrameError::InvalidLength { frame_type, len };
        let frame = match frame_type {
            1 => {
                if len < 10 {
                    return Err(bad());
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let assoc_stream_id = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = self.headers(frame_type, &p)?;
                Frame::SynStream {
                    stream_id,
                    assoc_stream_id,
                    priority,
                    flags,
                    headers,
                }
            }
            2 | 8 => {
                if len < 4 {
                    return Err(bad());
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let headers = self.headers(frame_type, &p)?;
                let fin = flags & FLAG_FIN != 0;
                if frame_type == 2 {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            3 | 7 | 9 => {
                if len != 8 {
                    return Err(bad());
                }
                let a = p.get_u32() & 0x7fff_ffff;
                let b = p.get_u32();
                match frame_type {
                    3 => Frame::RstStream {
                        stream_id: a,
                        status: b,
                    },
                    7 => Frame::GoAway {
                        last_good_stream_id: a,
                        status: b,
                    },
                    _ => Frame::WindowUpdate {
                        stream_id: a,
                        delta: b & 0x7fff_ffff,
                    },
                }
            }
            4 => {
                if len < 4 {
                    return Err(bad());
                }
                let count = p.get_u32() as usize;
                if count.saturating_mul(8) != p.len() {
                    return Err(bad());
                }
                let entries = (0..count)
                    .map(|_| {
                        let head = p.get_u32();
                        Setting {
                            flags: (head >> 24) as u8,
                            id: head & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_CLEAR_SETTINGS != 0,
                    entries,
                }
            }
            6 => {
                if len != 4 {
                    return Err(bad());
                }
                Frame::Ping { id: p.get_u32() }
            }
            other => Frame::Unknown { frame_type: other },
        };
        Ok(frame)
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(head) = src.first_chunk::<8>() else {
            src.reserve(8);
            return Ok(None);
        };
        let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        let len = (u32::from_be_bytes([0, head[5], head[6], head[7]])) as usize;
        if src.len() < 8 + len {
            src.reserve(8 + len - src.len());
            return Ok(None);
        }
        src.advance(8);
        let payload = src.split_to(len).freeze();
        if word & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: word,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }));
        }
        let version = ((word >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        self.control((word & 0xffff) as u16, flags, payload)
            .map(Some)
    }
}

/// Writes the 8-byte header of a DATA frame of `len` bytes (at most [`MAX_PAYLOAD`]).
pub fn put_data_header<B: BufMut>(dst: &mut B, stream_id: u32, fin: bool, len: usize) {
    dst.put_u32(stream_id & 0x7fff_ffff);
    dst.put_u32((u32::from(u8::from(fin)) << 24) | (len & MAX_PAYLOAD) as u32);
}

/// Sets the length of the DATA frame whose 8-byte header starts `header` (at most
/// [`MAX_PAYLOAD`]; the flags are kept).
pub(crate) fn set_data_len(header: &mut [u8], len: usize) {
    if let Some(l) = header.get_mut(5..8) {
        l.copy_from_slice(&((len & MAX_PAYLOAD) as u32).to_be_bytes()[1..]);
    }
}

impl FrameEncoder {
    fn put_control<B: BufMut>(
        dst: &mut B,
        frame_type: u16,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(payload.len()));
        }
        dst.put_u16(0x8000 | VERSION);
        dst.put_u16(frame_type);
        dst.put_u32((u32::from(flags) << 24) | payload.len() as u32);
        dst.put_slice(payload);
        Ok(())
    }

    fn put_headers<B: BufMut>(
        &mut self,
        frame_type: u16,
        flags: u8,
        prefix: &[u8],
        headers: &Headers,
        dst: &mut B,
    ) -> Result<(), FrameError> {
        let mut payload = prefix.to_vec();
        self.deflate
            .compress(headers, &mut payload)
            .map_err(|source| FrameError::HeaderBlock { frame_type, source })?;
        Self::put_control(dst, frame_type, flags, &payload)
    }
}

impl Encoder<Frame> for FrameEncoder {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        if let Frame::Data { data, .. } = &frame {
            dst.reserve(8 + data.len());
        }
        self.encode_into(frame, dst)
    }
}

impl FrameEncoder {
    /// Appends `frame` to `dst` (any buffer: the session encodes into a `Vec<u8>` it
    /// reuses).
    pub fn encode_into<B: BufMut>(&mut self, frame: Frame, dst: &mut B) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(FrameError::TooLarge(data.len()));
                }
                put_data_header(dst, stream_id, fin, data.len());
                dst.put_slice(&data);
                Ok(())
            }
            Frame::SynStream {
                stream_id,
                assoc_stream_id,
                priority,
                flags,
                headers,
            } => {
                let mut prefix = [0u8; 10];
                prefix[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                prefix[4..8].copy_from_slice(&(assoc_stream_id & 0x7fff_ffff).to_be_bytes());
                prefix[8] = (priority & 0x07) << 5;
                self.put_headers(1, flags, &prefix, &headers, dst)
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => self.put_headers(
                2,
                u8::from(fin),
                &(stream_id & 0x7fff_ffff).to_be_bytes(),
                &headers,
                dst,
            ),
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => self.put_headers(
                8,
                u8::from(fin),
                &(stream_id & 0x7fff_ffff).to_be_bytes(),
                &headers,
                dst,
            ),
            Frame::RstStream { stream_id, status } => {
                Self::put_control(dst, 3, 0, &pair(stream_id, status))
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => Self::put_control(dst, 7, 0, &pair(last_good_stream_id, status)),
            Frame::WindowUpdate { stream_id, delta } => {
                Self::put_control(dst, 9, 0, &pair(stream_id, delta))
            }
            Frame::Ping { id } => Self::put_control(dst, 6, 0, &id.to_be_bytes()),
            Frame::Settings { clear, entries } => {
                let mut p = Vec::with_capacity(4 + 8 * entries.len());
                p.extend_from_slice(
                    &u32::try_from(entries.len())
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
                for e in entries {
                    p.extend_from_slice(
                        &((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff)).to_be_bytes(),
                    );
                    p.extend_from_slice(&e.value.to_be_bytes());
                }
                Self::put_control(dst, 4, u8::from(clear), &p)
            }
            Frame::Unknown { frame_type } => Self::put_control(dst, frame_type, 0, &[]),
        }
    }
}

fn pair(a: u32, b: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&(a & 0x7fff_ffff).to_be_bytes());
    out[4..].copy_from_slice(&b.to_be_bytes());
    out
}
