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

/// The host's memory, if it can be read (`/proc/meminfo`, through procfs).
#[cfg(target_os = "linux")]
pub fn memory() -> Option<MemoryInfo> {
    use procfs::Current as _;
    memory_info(&procfs::Meminfo::current().ok()?)
}

/// The host's memory: not known off Linux (there is no `/proc/meminfo`).
#[cfg(not(target_os = "linux"))]
pub fn memory() -> Option<MemoryInfo> {
    None
}

/// `MemTotal` and `MemAvailable` (procfs gives bytes); `None` before Linux 3.14, which
/// has no `MemAvailable`.
#[cfg(target_os = "linux")]
fn memory_info(m: &procfs::Meminfo) -> Option<MemoryInfo> {
    Some(MemoryInfo {
        total: m.mem_total,
        available: m.mem_available?,
    })
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

    /// `/proc/meminfo` of a Linux 6.18 host (a VM with 24 GiB), as recorded.
    #[cfg(target_os = "linux")]
    const MEMINFO: &str = include_str!("../../../testdata/proc/meminfo");

    #[cfg(target_os = "linux")]
    fn parse_meminfo(text: &str) -> Option<MemoryInfo> {
        use procfs::FromRead as _;
        memory_info(&procfs::Meminfo::from_read(text.as_bytes()).ok()?)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn meminfo_parses() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            Some(MemoryInfo {
                total: 24_683_784 * 1024,
                available: 23_590_400 * 1024
            })
        );
        let malformed = MEMINFO.replace("MemTotal:       24683784 kB", "MemTotal: x kB");
        assert_ne!(malformed, MEMINFO);
        assert_eq!(parse_meminfo(&malformed), None);
        // Before Linux 3.14 there is no MemAvailable.
        let old_kernel = MEMINFO.replace("MemAvailable:   23590400 kB\n", "");
        assert_ne!(old_kernel, MEMINFO);
        assert_eq!(parse_meminfo(&old_kernel), None);
    }

    #[test]
    fn os_release_parses() {
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
