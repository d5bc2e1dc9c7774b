//! SPDY/3.1, as spoken by Go's moby/spdystream (the peer behind every Kubernetes
//! exec/attach/port-forward): [`frame`] is the byte codec with the persistent header
//! compression of [`headers`]; [`session`] runs the server side of a connection.
mod dictionary;
pub mod frame;
pub mod headers;

pub use frame::{Frame, FrameDecoder, FrameEncoder, FrameError};
pub use headers::{HeaderError, Headers};
pub mod session;

pub use session::{BatchWriter, IncomingStream, Session, SessionConfig, SessionError, SpdyStream};

#[cfg(test)]
mod frame_tests;
