//! Fuzz target: what decides a pull's credentials: a registry's `WWW-Authenticate`
//! challenge (`registry::parse_challenge`) and a pod's pull secrets (`.dockerconfigjson`
//! and legacy `.dockercfg`, `Keyring`), looked up for an image reference. First byte:
//! bit 0 = legacy format; the rest up to the first newline is the challenge, after it
//! the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_image::{Keyring, Reference};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (challenge, secret) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let _ = vzk_image::registry::parse_challenge(&String::from_utf8_lossy(challenge));
    let mut k = Keyring::new();
    let parsed = if mode & 1 == 0 {
        k.add_docker_config_json(secret, "fuzz/secret")
    } else {
        k.add_dockercfg(secret, "fuzz/secret")
    };
    if parsed.is_ok() {
        for image in [
            "ubuntu",
            "registry.example.com:5000/team/vm:1",
            "ghcr.io/org/img",
        ] {
            if let Ok(r) = Reference::parse(image) {
                let _ = k.lookup(&r);
            }
        }
    }
});
