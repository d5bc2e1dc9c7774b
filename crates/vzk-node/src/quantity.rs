//! Parsing Kubernetes resource quantities (`500m`, `2`, `1Gi`, `129e6`) into numbers.

/// Parses a quantity string into its numeric value (cores for CPU, bytes for memory).
/// Returns `None` for malformed input.
pub fn parse(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let base: f64 = num.parse().ok()?;
    if !base.is_finite() {
        return None;
    }
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp => {
            let e: i32 = exp.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(e)
        }
    };
    Some(base * mult)
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
