//! Fuzz target: the Apple LZ4 framing of Tart disk layers (`bv41`/`bv4-`/`bv4$` blocks,
//! each block's dictionary the previous block's output), read as the pull does. Any
//! input decodes or fails; output is bounded by the block size limit per block.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use vzk_image::tart::AppleLz4Reader;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut r = AppleLz4Reader::new(std::io::BufReader::with_capacity(
        usize::from(step).max(1) * 16,
        rest,
    ));
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0usize;
    while total < 256 << 20 {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
});
