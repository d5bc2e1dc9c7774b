//! The discovery loop: waits until the host has seen a MAC get an IPv4 address.
//!
//! Sources, checked in this order whenever the lease file's directory reports a change
//! (file-system events: kqueue on macOS, inotify on Linux) and on every tick (the
//! fallback when events cannot be had):
//! 1. the lease file (`/var/db/dhcpd_leases` on macOS), re-read only when its
//!    modification time or size changed — bootpd rewrites it on every ACK, so this
//!    sees the address as soon as the event for the guest's DHCP ACK arrives;
//! 2. the ARP table, by running a command (`/usr/sbin/arp -an`), at most once per
//!    [`Sources::arp_every`] — the fallback for guests that keep a static or
//!    pre-existing address, and for bridged NICs whose DHCP server is elsewhere.
//!
//! Contract: [`discover`] returns the first address found, or `None` when `stop`
//! completes first. A missing or unreadable lease file and a failing ARP command are
//! logged at debug level and retried on the next tick, never fatal: bootpd creates the
//! file only on its first lease.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::process::Command;
use vzk_vm::MacAddr;

/// Where to look and how often.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The bootpd lease file, if any.
    pub leases_file: Option<PathBuf>,
    /// The ARP command's argv (program first), if any.
    pub arp_command: Option<Vec<String>>,
    /// Only accept ARP entries on this host interface.
    pub arp_interface: Option<String>,
    /// How often the sources are checked without a file event.
    pub tick: Duration,
    /// Minimum interval between two ARP command runs.
    pub arp_every: Duration,
}

impl Sources {
    /// The macOS defaults: `/var/db/dhcpd_leases` on every change of `/var/db` (and
    /// every second regardless), `arp -an` every second.
    pub fn macos() -> Self {
        Self {
            leases_file: Some("/var/db/dhcpd_leases".into()),
            arp_command: Some(vec!["/usr/sbin/arp".into(), "-an".into()]),
            arp_interface: None,
            tick: Duration::from_secs(1),
            arp_every: Duration::from_secs(1),
        }
    }
}

/// Waits until `mac` has an address, or `stop` completes.
pub async fn discover(
    mac: MacAddr,
    sources: &Sources,
    stop: impl Future<Output = ()>,
) -> Option<Ipv4Addr> {
    tokio::pin!(stop);
    let mut last_leases: Option<(SystemTime, u64)> = None;
    let mut last_arp: Option<Instant> = None;
    let mut tick = tokio::time::interval(sources.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Kept alive for the loop: dropping the watcher ends the events.
    let (_watcher, mut changed) = match sources.leases_file.as_deref().map(watch_dir) {
        Some(Ok((w, rx))) => (Some(w), Some(rx)),
        Some(Err(error)) => {
            tracing::debug!(%error, "no file events for the lease file; polling it");
            (None, None)
        }
        None => (None, None),
    };
    loop {
        tokio::select! {
            () = &mut stop => return None,
            _ = tick.tick() => {}
            Some(()) = async {
                match changed.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        if let Some(ip) = check_leases(mac, sources, &mut last_leases).await {
            tracing::debug!(%mac, %ip, source = "leases", "guest address discovered");
            return Some(ip);
        }
        if last_arp.is_none_or(|t| t.elapsed() >= sources.arp_every) {
            last_arp = Some(Instant::now());
            if let Some(ip) = check_arp(mac, sources).await {
                tracing::debug!(%mac, %ip, source = "arp", "guest address discovered");
                return Some(ip);
            }
        }
    }
}

/// Events on the directory of `file` (the file itself may not exist yet, and bootpd
/// replaces it): one wake-up per burst of changes.
fn watch_dir(
    file: &Path,
) -> notify::Result<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>)> {
    use notify::Watcher as _;
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a wake-up.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

async fn check_leases(
    mac: MacAddr,
    sources: &Sources,
    last: &mut Option<(SystemTime, u64)>,
) -> Option<Ipv4Addr> {
    let path = sources.leases_file.as_ref()?;
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(error) => {
            tracing::trace!(path = %path.display(), %error, "lease file not readable yet");
            return None;
        }
    };
    let stamp = (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
    );
    if *last == Some(stamp) {
        return None;
    }
    match tokio::fs::read_to_string(path).await {
        Ok(text) => {
            *last = Some(stamp);
            super::leases::ip_for_mac(&text, mac)
        }
        Err(error) => {
            tracing::debug!(path = %path.display(), %error, "reading lease file failed");
            None
        }
    }
}

async fn check_arp(mac: MacAddr, sources: &Sources) -> Option<Ipv4Addr> {
    let (program, args) = sources.arp_command.as_ref()?.split_first()?;
    match Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
    {
        Ok(out) if out.status.success() => super::arp::ip_for_mac(
            &String::from_utf8_lossy(&out.stdout),
            mac,
            sources.arp_interface.as_deref(),
        ),
        Ok(out) => {
            tracing::debug!(%program, status = %out.status, "ARP command failed");
            None
        }
        Err(error) => {
            tracing::debug!(%program, %error, "running the ARP command failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn mac() -> MacAddr {
        MacAddr([0x0a, 0x01, 0x02, 0x03, 0x04, 0x05])
    }

    fn sources(dir: &std::path::Path) -> Sources {
        Sources {
            leases_file: Some(dir.join("dhcpd_leases")),
            arp_command: None,
            arp_interface: None,
            tick: Duration::from_millis(10),
            arp_every: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn lease_written_after_start_is_seen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let src = sources(dir.path());
        let file = dir.path().join("dhcpd_leases");
        let writer = async {
            // First an unrelated lease, then (file rewritten) ours.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let other =
                "{\n\tip_address=192.168.64.2\n\thw_address=1,a:1:2:3:4:50\n\tlease=0x1\n}\n";
            tokio::fs::write(&file, other)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(Duration::from_millis(30)).await;
            let ours = format!(
                "{other}{{\n\tip_address=192.168.64.9\n\thw_address=1,a:1:2:3:4:5\n\tlease=0x2\n}}\n"
            );
            tokio::fs::write(&file, ours)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            std::future::pending::<()>().await;
        };
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                ip = discover(mac(), &src, std::future::pending()) => ip,
                () = writer => None,
            }
        })
        .await;
        assert_eq!(found, Ok(Some(Ipv4Addr::new(192, 168, 64, 9))));
    }

    #[tokio::test]
    async fn a_lease_is_seen_on_the_file_event_not_the_next_tick() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut src = sources(dir.path());
        src.tick = Duration::from_secs(3600); // only the first, immediate tick
        let file = dir.path().join("dhcpd_leases");
        let writer = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let ours = "{\n\tip_address=192.168.64.7\n\thw_address=1,a:1:2:3:4:5\n\tlease=0x2\n}\n";
            tokio::fs::write(&file, ours)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            std::future::pending::<()>().await;
        };
        let t0 = Instant::now();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                ip = discover(mac(), &src, std::future::pending()) => ip,
                () = writer => None,
            }
        })
        .await;
        assert_eq!(found, Ok(Some(Ipv4Addr::new(192, 168, 64, 7))));
        // Woken by the event: well before a second tick (an hour) could come.
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn arp_command_output_is_the_fallback() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let table = dir.path().join("arp.txt");
        std::fs::write(
            &table,
            "? (192.168.64.4) at a:1:2:3:4:50 on bridge100 ifscope [bridge]\n\
             ? (192.168.64.5) at a:1:2:3:4:5 on bridge100 ifscope [bridge]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut src = sources(dir.path()); // lease file never appears
        src.arp_command = Some(vec!["cat".into(), table.display().to_string()]);
        src.arp_interface = Some("bridge100".into());
        let found = tokio::time::timeout(
            Duration::from_secs(10),
            discover(mac(), &src, std::future::pending()),
        )
        .await;
        assert_eq!(found, Ok(Some(Ipv4Addr::new(192, 168, 64, 5))));
    }

    #[tokio::test]
    async fn stop_ends_the_wait_and_failing_sources_are_not_fatal() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut src = sources(dir.path());
        src.arp_command = Some(vec!["false".into()]);
        let stop = tokio::time::sleep(Duration::from_millis(200));
        let found =
            tokio::time::timeout(Duration::from_secs(10), discover(mac(), &src, stop)).await;
        assert_eq!(found, Ok(None));
    }
}
