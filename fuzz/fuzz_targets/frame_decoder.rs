//! Fuzz target: the SPDY/3.1 frame decoder (with its persistent header zlib stream) on
//! arbitrary bytes, fed in arbitrary chunk sizes. Any input must give frames or an
//! error, never a panic, and never loop.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use vzk_kubelet_api::spdy::FrameDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
