//! Fuzz target: an image's VM `config.json` in each format: ours/agoda's (`VmConfig`,
//! with its macOS platform data decoded and checked), Tart's (`tart::convert_config`)
//! and the raw macOS platform check (`MacImageConfig::parse`). A config that parses must
//! serialize to one that parses again (a pull → push round trip keeps it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_image::{MacImageConfig, VmConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<VmConfig>(data) {
        let _ = c.mac_platform();
        let _ = c.arch_or_default();
        let out = serde_json::to_vec(&c).expect("a parsed config serializes");
        serde_json::from_slice::<VmConfig>(&out).expect("a serialized config parses");
    }
    if let Ok(c) = vzk_image::tart::convert_config(data) {
        let _ = c.mac_platform();
        let out = serde_json::to_vec(&c).expect("a converted config serializes");
        serde_json::from_slice::<VmConfig>(&out).expect("a converted config parses");
    }
    let _ = MacImageConfig::parse(data);
});
