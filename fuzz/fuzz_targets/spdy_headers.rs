//! Fuzz target: SPDY/3.1 header blocks, both the decompressed name/value block
//! (`Headers::from_block`) and the zlib-compressed one with SPDY's dictionary
//! (`HeaderDecompressor`, persistent across blocks of one session). A block that parses
//! must re-encode to one that parses to the same headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_kubelet_api::spdy::Headers;
use vzk_kubelet_api::spdy::headers::HeaderDecompressor;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Headers::from_block(data) {
        let again = Headers::from_block(&h.to_block()).expect("re-encoded block parses");
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            again.iter().collect::<Vec<_>>()
        );
    }
    // The same bytes as a run of compressed blocks: first byte = the split points.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut d = HeaderDecompressor::new();
    for block in rest.chunks(usize::from(split).max(1) * 4) {
        if d.decompress(block).is_err() {
            break;
        }
    }
});
