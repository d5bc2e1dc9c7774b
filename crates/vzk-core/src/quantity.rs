//! Kubernetes resource quantities (`2`, `1500m`, `4Gi`, `4G`, `1e3`) as numbers: the one
//! parser of the workspace (node capacity, env `resourceFieldRef`, downward API volumes,
//! VM sizing for QEMU and Virtualization.framework).
//!
//! Contract: the grammar is Kubernetes' (`<number><suffix>`, suffix one of the binary
//! `Ki Mi Gi Ti Pi Ei`, the decimal `n u m k M G T P E` or none, or an exponent
//! `e<int>`/`E<int>`); negative values are rejected; an integer result with a
//! fractional part is rounded **up**, as `Quantity.Value()`/`MilliValue()` do; values
//! beyond `u64` are an error.

/// A malformed or out-of-range quantity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    /// Not a Kubernetes quantity.
    #[error("{text:?} is not a Kubernetes quantity")]
    Parse {
        /// The text.
        text: String,
    },
    /// Negative.
    #[error("{text:?} is negative")]
    Negative {
        /// The text.
        text: String,
    },
    /// Too large.
    #[error("{text:?} is too large")]
    Overflow {
        /// The text.
        text: String,
    },
}

/// The quantity in millicores (CPU), rounded up.
pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    value(text, 3)
}

/// The quantity in bytes (memory), rounded up.
pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    value(text, 0)
}

/// The quantity as a float (cores for CPU, bytes for memory), exact to the nano unit.
pub fn as_f64(text: &str) -> Result<f64, QuantityError> {
    // Nano units as u128 cover every u64 byte count.
    Ok(scaled(text, 9)? as f64 / 1e9)
}

/// `text × 10^extra_exp10`, rounded up.
fn value(text: &str, extra_exp10: i32) -> Result<u64, QuantityError> {
    u64::try_from(scaled(text, extra_exp10)?).map_err(|_| QuantityError::Overflow {
        text: text.to_owned(),
    })
}

/// `text × 10^extra_exp10`, rounded up, as `u128`.
fn scaled(text: &str, extra_exp10: i32) -> Result<u128, QuantityError> {
    let parse = || QuantityError::Parse {
        text: text.to_owned(),
    };
    let overflow = || QuantityError::Overflow {
        text: text.to_owned(),
    };
    let t = text.trim();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let number_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(number_end);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() || frac_part.contains('.') {
        return Err(parse());
    }
    let (pow2, pow10) = match suffix {
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "" => (0, 0),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        s if s.starts_with(['e', 'E']) => (0, s[1..].parse::<i32>().map_err(|_| parse())?),
        _ => return Err(parse()),
    };
    let digits: String = int_part.chars().chain(frac_part.chars()).collect();
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Ok(0);
    }
    if negative {
        return Err(QuantityError::Negative {
            text: text.to_owned(),
        });
    }
    if digits.len() > 38 {
        return Err(overflow());
    }
    let mut mantissa: u128 = digits.parse().map_err(|_| parse())?;
    mantissa = mantissa.checked_mul(1u128 << pow2).ok_or_else(overflow)?;
    let frac_len = i32::try_from(frac_part.len()).map_err(|_| overflow())?;
    let exp10 = pow10 + extra_exp10 - frac_len;
    let result = if exp10 >= 0 {
        let scale = 10u128
            .checked_pow(exp10.unsigned_abs())
            .ok_or_else(overflow)?;
        mantissa.checked_mul(scale).ok_or_else(overflow)?
    } else {
        match 10u128.checked_pow(exp10.unsigned_abs()) {
            Some(scale) => mantissa.div_ceil(scale),
            None => 1, // smaller than one unit, rounded up
        }
    };
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_for_ratios_and_display() {
        for (text, want) in [
            ("500m", 0.5),
            ("1Gi", 1073741824.0),
            ("129e6", 129e6),
            ("1.5", 1.5),
            ("64Ei", 64.0 * 1024f64.powi(6)),
        ] {
            assert_eq!(as_f64(text), Ok(want), "{text}");
        }
        assert!(as_f64("12Qi").is_err());
    }

    #[test]
    fn cpu_quantities_in_millicores() {
        for (text, want) in [
            ("2", 2000),
            ("1500m", 1500),
            ("0.5", 500),
            ("1.5", 1500),
            ("100m", 100),
            ("1e3", 1_000_000),
            ("+3", 3000),
        ] {
            assert_eq!(cpu_millis(text), Ok(want), "{text}");
        }
        // Sub-millicore precision rounds up, as Kubernetes does.
        assert_eq!(cpu_millis("1.0001"), Ok(1001));
        assert_eq!(cpu_millis("1n"), Ok(1));
    }

    #[test]
    fn memory_quantities_in_bytes() {
        for (text, want) in [
            ("4Gi", 4u64 << 30),
            ("512Mi", 512 << 20),
            ("4G", 4_000_000_000),
            ("1.5Gi", 3 << 29),
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("1Ki", 1024),
            ("0", 0),
            ("0.0Gi", 0),
        ] {
            assert_eq!(bytes(text), Ok(want), "{text}");
        }
        assert_eq!(bytes("1500m"), Ok(2), "fractional bytes round up");
    }

    #[test]
    fn malformed_negative_and_huge_values_are_errors() {
        for bad in ["", "Gi", "1.2.3", "1 Gi", "1gi", "abc", "1e", "1ee3", "."] {
            assert_eq!(
                bytes(bad),
                Err(QuantityError::Parse { text: bad.into() }),
                "{bad:?}"
            );
        }
        assert_eq!(
            bytes("-1Gi"),
            Err(QuantityError::Negative {
                text: "-1Gi".into()
            })
        );
        assert_eq!(
            bytes("20Ei"),
            Err(QuantityError::Overflow {
                text: "20Ei".into()
            })
        );
        assert_eq!(
            bytes("1e40"),
            Err(QuantityError::Overflow {
                text: "1e40".into()
            })
        );
    }
}
