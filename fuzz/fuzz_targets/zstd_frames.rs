//! Fuzz target: zstd-compressed disk chunks (vzk format), decoded as the pull does:
//! frames with a declared content size straight into the caller's buffer, others
//! streamed; input served in pieces that split frame headers, reads of varying size.
//! First two bytes: the input piece size and the read size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [step, out, rest @ ..] = data else {
        return;
    };
    let step = usize::from(*step).max(1) * 8;
    let out = (usize::from(*out) + 1) * 4096;
    let _ = vzk_image::decode_zstd_frames(rest, step, out, 256 << 20);
});
