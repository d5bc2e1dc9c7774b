//! When to renew a certificate: like the kubelet's certificate manager, at a jittered point
//! between 70 % and 90 % of its lifetime, so a fleet of nodes that joined together does not
//! renew together.

use std::time::{Duration, SystemTime};

/// Earliest point of the lifetime at which a certificate is renewed.
pub const MIN_FRACTION: f64 = 0.7;
/// Latest point of the lifetime at which a certificate is renewed.
pub const MAX_FRACTION: f64 = 0.9;

/// A random fraction in `[MIN_FRACTION, MAX_FRACTION)`.
pub fn jittered_fraction() -> f64 {
    MIN_FRACTION + (MAX_FRACTION - MIN_FRACTION) * rand::random::<f64>()
}

/// `not_before + fraction × (not_after − not_before)`; `fraction` is clamped to
/// [`MIN_FRACTION`, `MAX_FRACTION`]. A certificate with no lifetime is due at once
/// (`not_before`).
pub fn rotation_deadline(
    not_before: SystemTime,
    not_after: SystemTime,
    fraction: f64,
) -> SystemTime {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    let f = fraction.clamp(MIN_FRACTION, MAX_FRACTION);
    not_before + lifetime.mul_f64(f)
}

/// How long to wait from `now` until `deadline` (zero once it has passed).
pub fn until(deadline: SystemTime, now: SystemTime) -> Duration {
    deadline.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Back-off after a failed renewal: 2 s doubling to at most 5 min, but never past the point
/// where a tenth of the time left to `not_after` remains, and at least 1 s.
pub fn retry_delay(attempt: u32, now: SystemTime, not_after: SystemTime) -> Duration {
    let exp = Duration::from_secs(2u64.saturating_pow(attempt.min(16)).min(300));
    let left = until(not_after, now) / 10;
    exp.min(left.max(Duration::from_secs(1)))
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_lies_within_70_to_90_percent_of_the_lifetime() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for lifetime in [
            Duration::from_secs(600),
            Duration::from_secs(3600),
            Duration::from_secs(365 * 24 * 3600),
        ] {
            let na = nb + lifetime;
            let (mut lo, mut hi) = (f64::MAX, f64::MIN);
            for _ in 0..2000 {
                let d = rotation_deadline(nb, na, jittered_fraction());
                let at =
                    d.duration_since(nb).unwrap_or_default().as_secs_f64() / lifetime.as_secs_f64();
                assert!((0.7..=0.9).contains(&at), "{at} of {lifetime:?}");
                lo = lo.min(at);
                hi = hi.max(at);
            }
            // Jittered: the points spread over the window, not one fixed fraction.
            assert!(lo < 0.72 && hi > 0.88, "spread {lo}..{hi}");
        }
        // The bounds themselves, and clamping of out-of-range fractions.
        let na = nb + Duration::from_secs(1000);
        assert_eq!(
            rotation_deadline(nb, na, 0.0),
            nb + Duration::from_secs(700)
        );
        assert_eq!(
            rotation_deadline(nb, na, 1.0),
            nb + Duration::from_secs(900)
        );
        // No lifetime (or an inverted one): due at once.
        assert_eq!(rotation_deadline(na, nb, 0.8), na);
    }

    #[test]
    fn retries_back_off_but_stay_well_before_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let far = now + Duration::from_secs(365 * 24 * 3600);
        assert_eq!(retry_delay(0, now, far), Duration::from_secs(1));
        assert_eq!(retry_delay(3, now, far), Duration::from_secs(8));
        assert_eq!(retry_delay(30, now, far), Duration::from_secs(300));
        // 100 s left: at most 10 s between tries.
        assert_eq!(
            retry_delay(30, now, now + Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        // Expired: still 1 s, never zero (no busy loop).
        assert_eq!(retry_delay(30, now, now), Duration::from_secs(1));
    }
}
