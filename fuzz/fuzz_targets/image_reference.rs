//! Fuzz target: image references as a pod spec or the CLI names them
//! (`Reference::parse`), digests and layer titles. A reference that parses must print
//! to one that parses to the same reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_image::Reference;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(text) {
        let _ = (r.api_host(), r.manifest_ref(), r.name());
        let printed = r.to_string();
        let again = Reference::parse(&printed)
            .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which fails: {e}"));
        assert_eq!(again.to_string(), printed, "from {text:?}");
    }
    let _ = vzk_image::reference::validate_digest(text);
    let _ = vzk_image::manifest::check_title(text);
});
