//! Digests of decoded (uncompressed) content.
//!
//! Blob digests are always `sha256:` (the registry addresses blobs by them). The digest
//! of a part's *decoded* bytes is ours to choose in the vzk chunked format: we write
//! `blake3:<64 hex>` (BLAKE3-256, about 3.5× faster than SHA-256 with SHA-NI on the
//! machines we measured, and the uncompressed side is most of the bytes a pull hashes),
//! and read both `blake3:` and `sha256:` (images pushed before the switch, and the agoda
//! and Tart formats, which are `sha256:` only).

use sha2::Digest as _;

/// The algorithms a decoded-content digest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `sha256:<64 hex>`.
    Sha256,
    /// `blake3:<64 hex>` (BLAKE3 with its default 32-byte output).
    Blake3,
}

impl Algorithm {
    fn prefix(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256:",
            Algorithm::Blake3 => "blake3:",
        }
    }

    /// The algorithm of a well-formed digest string (`<alg>:<64 lower-case hex>`).
    pub fn of(digest: &str) -> Result<Algorithm, String> {
        let (alg, hex) = match digest.split_once(':') {
            Some(("sha256", hex)) => (Algorithm::Sha256, hex),
            Some(("blake3", hex)) => (Algorithm::Blake3, hex),
            _ => {
                return Err(format!(
                    "invalid content digest {digest:?} (want sha256:<64 hex digits> or blake3:<64 hex digits>)"
                ));
            }
        };
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(alg)
        } else {
            Err(format!(
                "invalid content digest {digest:?} (want {}<64 lower-case hex digits>)",
                alg.prefix()
            ))
        }
    }
}

/// A streaming hasher for one of the [`Algorithm`]s.
#[derive(Clone)]
pub enum ContentHasher {
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// BLAKE3 (boxed: its state is ~1.9 KiB).
    Blake3(Box<blake3::Hasher>),
}

impl ContentHasher {
    /// A fresh hasher.
    pub fn new(alg: Algorithm) -> ContentHasher {
        match alg {
            Algorithm::Sha256 => ContentHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Blake3 => ContentHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ContentHasher::Sha256(h) => h.update(data),
            ContentHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// `<alg>:<hex>` of everything fed.
    pub fn finish(self) -> String {
        match self {
            ContentHasher::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            ContentHasher::Blake3(h) => format!("blake3:{}", h.finalize().to_hex()),
        }
    }
}

/// The digest of `n` zero bytes under `alg`.
pub fn zeros(alg: Algorithm, n: u64) -> String {
    let block = vec![0u8; 1 << 20];
    let mut h = ContentHasher::new(alg);
    let mut left = n;
    while left > 0 {
        let k = left.min(block.len() as u64) as usize;
        h.update(&block[..k]);
        left -= k as u64;
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("abc") and BLAKE3("abc") from their specifications' test vectors.
        let mut s = ContentHasher::new(Algorithm::Sha256);
        s.update(b"abc");
        assert_eq!(
            s.finish(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut b = ContentHasher::new(Algorithm::Blake3);
        b.update(b"a");
        b.update(b"bc");
        assert_eq!(
            b.finish(),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn parses_only_well_formed_digests() {
        let h = "0".repeat(64);
        assert_eq!(Algorithm::of(&format!("sha256:{h}")), Ok(Algorithm::Sha256));
        assert_eq!(Algorithm::of(&format!("blake3:{h}")), Ok(Algorithm::Blake3));
        for bad in [
            format!("md5:{h}"),
            format!("blake3:{}", "A".repeat(64)),
            format!("blake3:{}", "0".repeat(63)),
            "blake3".to_string(),
            String::new(),
        ] {
            let e = Algorithm::of(&bad).unwrap_err();
            assert!(e.contains("invalid content digest"), "{e}");
        }
    }

    #[test]
    fn zeros_matches_hashing_zeros() {
        for alg in [Algorithm::Sha256, Algorithm::Blake3] {
            let mut h = ContentHasher::new(alg);
            h.update(&vec![0u8; 3 << 20 | 5]);
            assert_eq!(zeros(alg, 3 << 20 | 5), h.finish());
        }
        assert_ne!(zeros(Algorithm::Blake3, 10), zeros(Algorithm::Blake3, 11));
    }
}
