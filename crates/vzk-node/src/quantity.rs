//! Kubernetes resource quantities (`500m`, `2`, `1Gi`, `129e6`) as floats, for ratios
//! (env `resourceFieldRef` divisors, pressure thresholds). The parser is
//! [`vzk_core::quantity`].

/// The quantity's numeric value (cores for CPU, bytes for memory); `None` when malformed.
pub fn parse(s: &str) -> Option<f64> {
    vzk_core::quantity::as_f64(s).ok()
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn quantities() {
        let cases = [
            ("500m", 0.5),
            ("2", 2.0),
            ("1Gi", 1073741824.0),
            ("128974848", 128974848.0),
            ("129e6", 129e6),
            ("123Mi", 123.0 * 1048576.0),
            ("1.5", 1.5),
            ("100k", 1e5),
        ];
        for (s, v) in cases {
            let got = parse(s).unwrap_or(f64::NAN);
            assert!((got - v).abs() < 1e-6, "{s}: {got} != {v}");
        }
        for bad in ["", "abc", "1Qi", "1e", "--1"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
