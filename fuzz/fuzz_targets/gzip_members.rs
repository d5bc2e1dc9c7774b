//! Fuzz target: gzip streams of one or more members (agoda's disk layers), decoded as the
//! pull does: input served in pieces that split member headers, reads of varying size.
//! First two bytes: the input piece size and the read size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [step, out, rest @ ..] = data else {
        return;
    };
    let step = usize::from(*step).max(1) * 8;
    let out = (usize::from(*out) + 1) * 4096;
    let _ = vzk_image::decode_gzip_members(rest, step, out, 256 << 20);
});
