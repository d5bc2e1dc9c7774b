//! Host-side facts: node capacity and per-VM usage read from `/proc` (no guest agent).
//!
//! # Contract
//! * [`host_memory_bytes`] is `MemTotal` of `/proc/meminfo`.
//! * [`ProcUsage::read`] reads a process's CPU time (`utime + stime` of
//!   `/proc/<pid>/stat`, converted with `_SC_CLK_TCK`) and RSS (`VmRSS` of
//!   `/proc/<pid>/status`). `None` if the process is gone.

use std::path::Path;

/// `MemTotal` in bytes, if readable.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemTotal:")
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Bytes available to unprivileged users on the filesystem of `path`, and its size.
pub fn fs_bytes(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = s.fragment_size();
    Some((s.blocks_available() * frag, s.blocks() * frag))
}

/// CPU time and memory of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcUsage {
    /// User + system CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Parses `utime + stime` (in clock ticks) from a `/proc/<pid>/stat` line.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15 (1-based).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

impl ProcUsage {
    /// Reads the usage of `pid`.
    pub fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ticks = parse_stat_ticks(&stat)?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(100);
        Some(Self {
            cpu_ns: ticks * (1_000_000_000 / hz),
            rss_bytes: kib_field(&status, "VmRSS:").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_spaces_in_the_name() {
        let line =
            "1234 (qemu system x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_ticks(line), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_usage_and_the_host_has_memory() {
        let me = ProcUsage::read(std::process::id() as i32);
        assert!(me.is_some_and(|u| u.rss_bytes > 0), "{me:?}");
        assert!(host_memory_bytes().is_some_and(|m| m > 1 << 20));
    }
}
