//! Tunables of guest SSH access: timeouts, keepalive, terminal defaults.
//!
//! Defaults are the reference implementation's (dial 5 s, keepalive every 30 s,
//! terminal 120×60, `xterm-256color`). [`GuestConfig::from_env`] reads
//! `VZ_SSH_DIAL_TIMEOUT` in Go duration syntax (`5s`, `1500ms`, `1m30s`); a blank,
//! unparsable or non-positive value keeps the default, as in the reference.

use std::time::Duration;

use vzk_core::streams::TermSize;

/// Environment variable: bound on TCP connect + SSH handshake + authentication.
pub const ENV_DIAL_TIMEOUT: &str = "VZ_SSH_DIAL_TIMEOUT";

/// Settings of a [`crate::GuestSession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Bound on TCP connect, handshake and authentication together; also bounds
    /// opening a channel on an established connection.
    pub dial_timeout: Duration,
    /// Send an SSH keepalive when nothing was received for this long.
    pub keepalive_interval: Duration,
    /// Close the connection after this many unanswered keepalives.
    pub keepalive_max: usize,
    /// `TERM` of a requested PTY.
    pub term: String,
    /// Terminal size used when the caller sends no resize event in time.
    pub default_size: TermSize,
    /// How long a TTY exec waits for the caller's first resize event before
    /// starting with [`Self::default_size`].
    pub initial_size_wait: Duration,
    /// After a cancel, how long the remote process has between `TERM` and `KILL`.
    pub kill_grace: Duration,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            dial_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(30),
            keepalive_max: 3,
            term: "xterm-256color".to_owned(),
            default_size: TermSize {
                width: 120,
                height: 60,
            },
            initial_size_wait: Duration::from_secs(1),
            kill_grace: Duration::from_secs(2),
        }
    }
}

impl GuestConfig {
    /// Defaults, with `VZ_SSH_DIAL_TIMEOUT` applied if set and valid.
    pub fn from_env() -> Self {
        let mut cfg = Self::default();
        if let Some(d) = std::env::var(ENV_DIAL_TIMEOUT)
            .ok()
            .as_deref()
            .and_then(parse_go_duration)
        {
            cfg.dial_timeout = d;
        }
        cfg
    }
}

/// Parses a positive Go duration (`300ms`, `5s`, `1m30s`, `1.5h`); `None` if blank,
/// malformed or not positive.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    (total > 0.0 && total.is_finite()).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_go_duration(" 1500ms "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("0s"), None);
        assert_eq!(parse_go_duration("-5s"), None);
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration("s"), None);
    }
}
