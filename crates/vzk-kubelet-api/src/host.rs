//! Node-level CPU and memory of the host, for `/stats/summary` and `/metrics/resource`.
//! Linux reads `/proc`; elsewhere the figures are absent (the summary omits them).

use chrono::{DateTime, Utc};
use vzk_core::stats::{CpuStats, MemoryStats};

/// Host CPU and memory now.
pub(crate) fn host_usage(now: DateTime<Utc>) -> (Option<CpuStats>, Option<MemoryStats>) {
    let cpu = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| cpu_from_proc_stat(&s))
        .map(|ns| CpuStats {
            time: now,
            usage_nano_cores: None,
            usage_core_nano_seconds: Some(ns),
        });
    let mem = host_memory().map(|(total, avail)| {
        let used = total.saturating_sub(avail);
        MemoryStats {
            time: now,
            available_bytes: Some(avail),
            usage_bytes: Some(used),
            working_set_bytes: Some(used),
            ..Default::default()
        }
    });
    (cpu, mem)
}

/// Busy CPU time (all but idle and iowait) in core-nanoseconds, from `/proc/stat`.
fn cpu_from_proc_stat(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: u64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| *x)
        .take(8)
        .sum();
    // USER_HZ is 100 on every Linux ABI we run on.
    Some(busy.saturating_mul(10_000_000))
}

/// `(MemTotal, MemAvailable)` in bytes, from `/proc/meminfo` through procfs.
#[cfg(target_os = "linux")]
fn host_memory() -> Option<(u64, u64)> {
    use procfs::Current as _;
    memory_from_meminfo(&procfs::Meminfo::current().ok()?)
}

/// No `/proc/meminfo` off Linux.
#[cfg(not(target_os = "linux"))]
fn host_memory() -> Option<(u64, u64)> {
    None
}

/// `(MemTotal, MemAvailable)` in bytes (procfs converts the kB of the file); `None`
/// without `MemAvailable` (before Linux 3.14).
#[cfg(target_os = "linux")]
fn memory_from_meminfo(m: &procfs::Meminfo) -> Option<(u64, u64)> {
    Some((m.mem_total, m.mem_available?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/meminfo` of a Linux 6.18 host (a VM with 24 GiB), as recorded.
    #[cfg(target_os = "linux")]
    const MEMINFO: &str = include_str!("../../../testdata/proc/meminfo");

    #[cfg(target_os = "linux")]
    fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
        use procfs::FromRead as _;
        memory_from_meminfo(&procfs::Meminfo::from_read(text.as_bytes()).ok()?)
    }

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(
            cpu_from_proc_stat(stat),
            Some((100 + 5 + 50 + 1 + 2 + 3) * 10_000_000)
        );
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                parse_meminfo(MEMINFO),
                Some((24_683_784 * 1024, 23_590_400 * 1024))
            );
            assert_eq!(parse_meminfo("garbage"), None);
        }
    }
}
