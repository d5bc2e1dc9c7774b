//! Host-side usage of a process from `/proc` (Linux), through the procfs crate.

use crate::hypervisor::HostUsage;

/// CPU time (`utime + stime`) and resident memory (`VmRSS`) of process `pid`; `None` if
/// it is gone or unreadable.
pub fn usage(pid: i32) -> Option<HostUsage> {
    let p = procfs::process::Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    let rss_kib = p.status().ok()?.vmrss?;
    let ticks = u128::from(stat.utime) + u128::from(stat.stime);
    let tps = u128::from(procfs::ticks_per_second().max(1));
    Some(HostUsage {
        cpu_ns: u64::try_from(ticks * 1_000_000_000 / tps).unwrap_or(u64::MAX),
        rss_bytes: rss_kib.saturating_mul(1024),
    })
}

#[cfg(test)]
mod tests {
    use super::usage as proc_usage;

    #[test]
    fn reads_this_processes_cpu_time_and_rss() {
        // Burn a little CPU so utime is not zero on a coarse clock.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        std::hint::black_box(x);
        let pid = i32::try_from(std::process::id()).expect("pid fits");
        let u = proc_usage(pid).expect("our own /proc entry");
        assert!(u.rss_bytes > 1 << 20, "rss {}", u.rss_bytes);
        assert!(u.cpu_ns > 0, "cpu {}", u.cpu_ns);
        assert!(proc_usage(i32::MAX).is_none(), "no such process");
    }
}
