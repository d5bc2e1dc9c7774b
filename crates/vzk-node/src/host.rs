//! Facts about the host read from the OS: memory, disk, kernel, OS image, boot id.
//! Linux reads `/proc`; other Unix hosts fall back to what `uname`/`statvfs` give.

use std::path::Path;

/// Memory of the host in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Total memory.
    pub total: u64,
    /// Available memory (`MemAvailable`).
    pub available: u64,
}

/// Parses `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Option<MemoryInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            kib.checked_mul(1024)
        })
    };
    Some(MemoryInfo {
        total: field("MemTotal")?,
        available: field("MemAvailable")?,
    })
}

/// The host's memory, if it can be read.
pub fn memory() -> Option<MemoryInfo> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// Filesystem space in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Total size.
    pub total: u64,
    /// Available to unprivileged users.
    pub available: u64,
}

/// Space on the filesystem holding `path`.
// statvfs field widths differ between Linux (u64) and macOS (u32/u64).
#[allow(clippy::useless_conversion)]
pub fn disk(path: &Path) -> Option<DiskInfo> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = u64::from(st.fragment_size());
    Some(DiskInfo {
        total: u64::from(st.blocks()).saturating_mul(frag),
        available: u64::from(st.blocks_available()).saturating_mul(frag),
    })
}

/// Number of CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Kernel release (`uname -r`).
pub fn kernel_version() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `PRETTY_NAME` from os-release text.
pub fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

/// The host's OS image, e.g. `Debian GNU/Linux 12 (bookworm)`.
pub fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| parse_os_release(&t))
        .unwrap_or_else(|| std::env::consts::OS.to_owned())
}

/// Boot id (changes on every reboot), if known.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Machine id, if known.
pub fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `kubernetes.io/arch` value for this build (`amd64`, `arm64`).
pub fn k8s_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `kubernetes.io/os` value for this build (`linux`, `darwin`).
pub fn k8s_os() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_os_release_parse() {
        let m =
            parse_meminfo("MemTotal:       16384 kB\nMemFree: 1 kB\nMemAvailable:    2048 kB\n");
        assert_eq!(
            m,
            Some(MemoryInfo {
                total: 16384 * 1024,
                available: 2048 * 1024
            })
        );
        assert_eq!(parse_meminfo("MemTotal: x kB\n"), None);
        let os =
            parse_os_release("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n");
        assert_eq!(os.as_deref(), Some("Debian GNU/Linux 12 (bookworm)"));
    }

    #[test]
    fn host_facts_are_real() {
        let m = memory().expect("/proc/meminfo is readable on Linux");
        assert!(m.total > 0 && m.available <= m.total);
        let d = disk(Path::new("/")).expect("statvfs /");
        assert!(d.total > 0 && d.available <= d.total);
        assert!(!kernel_version().is_empty());
        assert!(cpus() >= 1);
    }
}
