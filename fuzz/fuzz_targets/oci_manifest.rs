//! Fuzz target: OCI image manifests and indexes as a registry serves them: an index is
//! decoded as the pull does, a manifest checked (`parse_manifest`) and planned
//! (`plan`: the agoda, vzk and Tart layouts). Any input gives a plan or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_image::manifest::{self, Index};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Index>(data);
    let Ok(m) = manifest::parse_manifest(data, "fuzz/manifest:latest") else {
        return;
    };
    if let Ok(plan) = manifest::plan(&m, "fuzz/manifest:latest") {
        let _ = (plan.compressed_size(), plan.uncompressed_size());
        // As documented: each file's parts are in offset order, contiguous, and add up
        // to its size.
        for f in &plan.files {
            let mut end = 0u64;
            for p in &f.parts {
                assert_eq!(p.offset, end, "{:?}: parts not contiguous", f.role);
                end = end.checked_add(p.size).expect("part sizes overflow");
            }
            assert_eq!(end, f.size, "{:?}: parts do not add up to the size", f.role);
        }
    }
});
