//! The `nat` network: an agent-owned bridge with a private subnet, DHCP by a managed
//! `dnsmasq`, and masquerading of outbound traffic (nftables).
//!
//! # Contract
//! * [`NatNetwork::start`] is idempotent across agent restarts: it (re)creates the bridge
//!   and its gateway address if missing, replaces a `dnsmasq` left by a previous agent
//!   (found by its pid file) with a fresh one reading the same lease file (so guests keep
//!   their addresses), and (re)installs the nftables table `ip vzk_<bridge>`
//!   ([`crate::nat_settings::nft_table`]).
//! * It refuses a subnet that overlaps an address on another interface (another agent's
//!   NAT network, a LAN, a VPN) and a bridge name that is an existing non-bridge
//!   interface, naming what is in the way.
//! * `dnsmasq` is a child of the agent, killed when the [`NatNetwork`] is dropped. VMs do
//!   not need it after their lease, so the agent's absence only delays renewals.
//! * Everything happens in the network namespace of the calling thread.
//!
//! # Several networks on one host
//! A network's host-global names derive from its bridge (the interface itself, the
//! nftables table) and its files live in its state dir (dnsmasq's pid, lease and log
//! files; a stale dnsmasq is replaced only if its command line names this pid file):
//! agents with their own data dirs, bridges and subnets run side by side, and
//! [`NatNetwork::remove`] of one leaves the others' bridges, dnsmasqs and tables alone.
//!
//! # Caveats
//! Masquerading needs forwarding: `net.ipv4.ip_forward` is set to 1. A host firewall
//! that drops forwarded traffic (e.g. Docker's `FORWARD` policy) still wins.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use super::link::{self, LinkError};
use crate::nat_settings::{self, NatSettings};

/// Settings of the NAT network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// The bridge to own (created if missing).
    pub bridge: String,
    /// The host's address on the bridge (the guests' gateway, and their DNS server
    /// unless `dns_servers` names others).
    pub gateway: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// First and last address DHCP hands out.
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    /// DNS servers handed to guests (DHCP option 6); empty: the gateway.
    pub dns_servers: Vec<Ipv4Addr>,
    /// Lease time.
    pub lease: Duration,
    /// Install the masquerade rule and enable forwarding.
    pub masquerade: bool,
    /// The dnsmasq binary.
    pub dnsmasq: PathBuf,
}

impl Default for NatConfig {
    /// Bridge `vzkbr0`, subnet `10.213.0.0/24` ([`NatSettings::default`]).
    fn default() -> Self {
        Self::from_settings(&NatSettings::default())
    }
}

impl NatConfig {
    /// The network an operator's settings describe: gateway, DHCP range and guest DNS
    /// derived from the subnet (see [`crate::nat_settings`]).
    pub fn from_settings(s: &NatSettings) -> Self {
        Self {
            bridge: s.bridge.clone(),
            gateway: s.subnet.gateway(),
            prefix_len: s.subnet.prefix_len(),
            dhcp_range: s.subnet.dhcp_range(),
            dns_servers: s.guest_dns.clone(),
            lease: Duration::from_secs(3600),
            masquerade: true,
            dnsmasq: "dnsmasq".into(),
        }
    }

    /// The nftables table of this network (`ip` family).
    pub fn nft_table(&self) -> String {
        nat_settings::nft_table(&self.bridge)
    }

    /// The DNS servers guests get.
    pub fn guest_dns(&self) -> Vec<Ipv4Addr> {
        if self.dns_servers.is_empty() {
            vec![self.gateway]
        } else {
            self.dns_servers.clone()
        }
    }

    /// Whether the subnet shares an address with `addr/prefix_len`.
    pub fn overlaps(&self, addr: Ipv4Addr, prefix_len: u8) -> bool {
        let common = u32::from(self.prefix_len.min(prefix_len).min(32));
        let mask = u32::MAX.checked_shl(32 - common).unwrap_or(0);
        u32::from(self.gateway) & mask == u32::from(addr) & mask
    }

    /// The first address in `addrs` (interface, address, prefix) on an interface other
    /// than this network's bridge that overlaps its subnet.
    pub fn conflict<'a>(
        &self,
        addrs: &'a [(String, Ipv4Addr, u8)],
    ) -> Option<&'a (String, Ipv4Addr, u8)> {
        addrs
            .iter()
            .find(|(iface, addr, len)| *iface != self.bridge && self.overlaps(*addr, *len))
    }

    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.gateway) & mask)
    }

    /// The dotted netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len))
                .unwrap_or(0),
        )
    }

    /// dnsmasq's lease file of a network whose files are under `dir`.
    pub fn lease_file(dir: &Path) -> PathBuf {
        dir.join("dnsmasq.leases")
    }

    /// The dnsmasq arguments for this network, with its files under `dir`.
    pub fn dnsmasq_args(&self, dir: &Path) -> Vec<String> {
        let (lo, hi) = self.dhcp_range;
        vec![
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--interface={}", self.bridge),
            "--except-interface=lo".into(),
            format!("--listen-address={}", self.gateway),
            format!(
                "--dhcp-range={lo},{hi},{},{}s",
                self.netmask(),
                self.lease.as_secs().max(120)
            ),
            format!("--dhcp-option=option:router,{}", self.gateway),
            format!(
                "--dhcp-option=option:dns-server,{}",
                self.guest_dns()
                    .iter()
                    .map(Ipv4Addr::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            "--dhcp-authoritative".into(),
            "--no-ping".into(),
            format!("--dhcp-leasefile={}", Self::lease_file(dir).display()),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            "--user=root".into(),
            // A file of dnsmasq's own, so that SIGUSR2 reopens it after a rotation
            // (NatNetwork::health keeps it within DNSMASQ_LOG_CAP).
            format!("--log-facility={}", dir.join("dnsmasq.log").display()),
            "--log-dhcp".into(),
        ]
    }

    /// The nftables script installing the masquerade table.
    pub fn nft_script(&self) -> String {
        let table = self.nft_table();
        let net = format!("{}/{}", self.network(), self.prefix_len);
        format!(
            "table ip {table} {{}}\nflush table ip {table}\n\
             table ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {net} ip daddr != {net} masquerade\n  }}\n}}\n"
        )
    }
}

/// Errors setting up the NAT network.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// Creating the bridge or its address failed.
    #[error("setting up bridge {bridge} failed")]
    Bridge {
        /// The bridge.
        bridge: String,
        /// The cause.
        #[source]
        source: LinkError,
    },
    /// Creating the state directory failed.
    #[error("creating {path} failed")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// dnsmasq could not be started.
    #[error("starting dnsmasq failed")]
    SpawnDnsmasq(#[source] std::io::Error),
    /// dnsmasq exited right after starting.
    #[error("dnsmasq exited at start ({status}); see {log}")]
    DnsmasqExited {
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
    /// Installing the masquerade rule or enabling forwarding failed.
    #[error("setting up masquerading failed: {0}")]
    Masquerade(String),
    /// The subnet overlaps an address on another interface.
    #[error(
        "the NAT subnet {subnet} overlaps {address} on interface {interface} (another agent's NAT network, a LAN or a VPN?): choose another --nat-subnet"
    )]
    SubnetOverlap {
        /// The NAT subnet.
        subnet: String,
        /// The other interface.
        interface: String,
        /// Its address and prefix.
        address: String,
    },
    /// The bridge name is taken by an interface that is not a bridge.
    #[error("interface {bridge} exists and is not a bridge: choose another --nat-bridge")]
    NotABridge {
        /// The name.
        bridge: String,
    },
    /// Removing the network failed.
    #[error("removing the NAT network on {bridge} failed: {detail}")]
    Remove {
        /// The bridge.
        bridge: String,
        /// What failed.
        detail: String,
    },
}

/// The IPv4 addresses of the calling thread's network namespace: (interface, address,
/// prefix length).
pub fn interface_addresses() -> Vec<(String, Ipv4Addr, u8)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let ip = a.address.as_ref()?.as_sockaddr_in()?.ip();
            let mask = a.netmask.as_ref()?.as_sockaddr_in()?.ip();
            let prefix = u8::try_from(u32::from(mask).count_ones()).ok()?;
            Some((a.interface_name, ip, prefix))
        })
        .collect()
}

/// A running NAT network. Dropping it stops its dnsmasq (the bridge stays).
#[derive(Debug)]
pub struct NatNetwork {
    config: NatConfig,
    dnsmasq: Child,
    /// dnsmasq's log, kept within [`DNSMASQ_LOG_CAP`] by [`NatNetwork::health`].
    log_path: PathBuf,
}

/// dnsmasq logs every DHCP exchange (~1 KiB per VM); past this size the log is moved to
/// `dnsmasq.log.1` (replacing the one before) and dnsmasq reopens a fresh one (SIGUSR2).
pub const DNSMASQ_LOG_CAP: u64 = 4 * 1024 * 1024;

/// Moves `log` to `<log>.1` when it is larger than `cap`; whether it did.
fn rotate_if_over(log: &Path, cap: u64) -> bool {
    let over = std::fs::metadata(log).is_ok_and(|m| m.len() > cap);
    if !over {
        return false;
    }
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    match std::fs::rename(log, &old) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(log = %log.display(), %error, "cannot rotate dnsmasq's log");
            false
        }
    }
}

/// How long dnsmasq may take to bind its sockets (write its pid file).
const DNSMASQ_READY_TIMEOUT: Duration = Duration::from_secs(3);

impl NatNetwork {
    /// Whether dnsmasq (the network's DHCP server) still runs: `Err` says why not.
    /// Also keeps dnsmasq's log within [`DNSMASQ_LOG_CAP`].
    pub fn health(&self) -> Result<(), String> {
        let Some(pid) = self.dnsmasq.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err("dnsmasq (the NAT network's DHCP server) has exited".into());
        };
        if rotate_if_over(&self.log_path, DNSMASQ_LOG_CAP) {
            // dnsmasq closes and reopens its --log-facility file on SIGUSR2.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGUSR2,
            );
        }
        match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
            Ok(st) if st.state != 'Z' && st.state != 'X' => Ok(()),
            _ => Err(format!(
                "dnsmasq (the NAT network's DHCP server, pid {pid}) has exited: new VMs get no address"
            )),
        }
    }

    /// Sets up (or takes over) the network; `dir` holds dnsmasq's pid, lease and log files.
    pub async fn start(config: NatConfig, dir: &Path) -> Result<Self, NatError> {
        std::fs::create_dir_all(dir).map_err(|source| NatError::StateDir {
            path: dir.to_owned(),
            source,
        })?;
        let bridge_err = |source| NatError::Bridge {
            bridge: config.bridge.clone(),
            source,
        };
        let addrs = interface_addresses();
        if let Some((interface, addr, len)) = config.conflict(&addrs) {
            return Err(NatError::SubnetOverlap {
                subnet: format!("{}/{}", config.network(), config.prefix_len),
                interface: interface.clone(),
                address: format!("{addr}/{len}"),
            });
        }
        if link::exists(&config.bridge).await && !link::is_bridge(&config.bridge).await {
            return Err(NatError::NotABridge {
                bridge: config.bridge.clone(),
            });
        }
        link::ensure_bridge(&config.bridge)
            .await
            .map_err(bridge_err)?;
        link::ensure_address(&config.bridge, config.gateway, config.prefix_len)
            .await
            .map_err(bridge_err)?;
        if config.masquerade {
            install_masquerade(&config).await?;
        }
        kill_stale_dnsmasq(&dir.join("dnsmasq.pid")).await;
        let log_path = dir.join("dnsmasq.log");
        rotate_if_over(&log_path, DNSMASQ_LOG_CAP);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| NatError::StateDir {
                path: log_path.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| NatError::StateDir {
            path: log_path.clone(),
            source,
        })?;
        let pid_file = dir.join("dnsmasq.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut child = Command::new(&config.dnsmasq)
            .args(config.dnsmasq_args(dir))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(NatError::SpawnDnsmasq)?;
        // dnsmasq fails fast on bad arguments or a busy port, and writes its pid file only
        // once its sockets are bound: wait for whichever comes first (at most
        // DNSMASQ_READY_TIMEOUT, then go on as before: a later death is still logged).
        let pid = child.id();
        let ready = async {
            loop {
                let written = std::fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                if written.is_some() && written == pid {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            status = child.wait() => {
                return Err(NatError::DnsmasqExited {
                    status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    log: log_path,
                });
            }
            () = ready => {}
            () = tokio::time::sleep(DNSMASQ_READY_TIMEOUT) => {
                tracing::warn!(pid_file = %pid_file.display(), "dnsmasq wrote no pid file in time; going on");
            }
        }
        tracing::info!(bridge = %config.bridge, gateway = %config.gateway, pid = child.id(), "NAT network up");
        Ok(Self {
            config,
            dnsmasq: child,
            log_path,
        })
    }

    /// The network's settings.
    pub fn config(&self) -> &NatConfig {
        &self.config
    }

    /// The bridge VMs' TAPs join.
    pub fn bridge(&self) -> &str {
        &self.config.bridge
    }

    /// dnsmasq's pid (while running).
    pub fn dnsmasq_pid(&self) -> Option<u32> {
        self.dnsmasq.id()
    }

    /// Removes the network `config` describes, whose files are in `dir`, in the calling
    /// thread's namespace: a dnsmasq still running from `dir` (its command line naming
    /// this pid file), the nftables table and the bridge. The lease file stays. Nothing of
    /// another network is touched: each name derives from this network's bridge or dir.
    /// What is already gone is success.
    pub async fn remove(config: &NatConfig, dir: &Path) -> Result<(), NatError> {
        kill_stale_dnsmasq(&dir.join("dnsmasq.pid")).await;
        let table = config.nft_table();
        let out = Command::new("nft")
            .args(["delete", "table", "ip", &table])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| NatError::Remove {
                bridge: config.bridge.clone(),
                detail: format!("running nft: {e}"),
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !stderr.contains("No such file or directory") {
            return Err(NatError::Remove {
                bridge: config.bridge.clone(),
                detail: format!("nft delete table ip {table}: {}", stderr.trim()),
            });
        }
        if link::exists(&config.bridge).await && !link::is_bridge(&config.bridge).await {
            return Err(NatError::NotABridge {
                bridge: config.bridge.clone(),
            });
        }
        link::delete(&config.bridge)
            .await
            .map_err(|e| NatError::Remove {
                bridge: config.bridge.clone(),
                detail: e.to_string(),
            })?;
        tracing::info!(bridge = %config.bridge, table, "NAT network removed");
        Ok(())
    }
}

async fn install_masquerade(config: &NatConfig) -> Result<(), NatError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| NatError::Masquerade(format!("enabling ip_forward: {e}")))?;
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NatError::Masquerade(format!("running nft: {e}")))?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin
            .write_all(config.nft_script().as_bytes())
            .await
            .map_err(|e| NatError::Masquerade(format!("writing to nft: {e}")))?;
    }
    let out = nft
        .wait_with_output()
        .await
        .map_err(|e| NatError::Masquerade(format!("running nft: {e}")))?;
    if !out.status.success() {
        return Err(NatError::Masquerade(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// Kills a dnsmasq a previous agent left behind (pid file + matching command line).
async fn kill_stale_dnsmasq(pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let pid_file_arg = format!("--pid-file={}", pid_file.display());
    if !String::from_utf8_lossy(&cmdline)
        .split('\0')
        .any(|a| a == pid_file_arg)
    {
        return;
    }
    tracing::info!(pid, "replacing the dnsmasq of a previous agent");
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..50 {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dnsmasq_log_is_rotated_past_its_cap_and_only_then() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = d.path().join("dnsmasq.log");
        assert!(!rotate_if_over(&log, 10), "no log yet");
        std::fs::write(&log, b"0123456789").expect("write");
        assert!(!rotate_if_over(&log, 10), "at the cap");
        std::fs::write(d.path().join("dnsmasq.log.1"), b"older").expect("write");
        std::fs::write(&log, b"0123456789A").expect("write");
        assert!(rotate_if_over(&log, 10), "over the cap");
        assert!(!log.exists(), "moved away for dnsmasq to reopen");
        assert_eq!(
            std::fs::read(d.path().join("dnsmasq.log.1")).expect("read"),
            b"0123456789A",
            "the one before is replaced"
        );
        let args = NatConfig::default().dnsmasq_args(d.path());
        assert!(
            args.contains(&format!("--log-facility={}", log.display())),
            "dnsmasq writes the log itself (SIGUSR2 reopens it): {args:?}"
        );
    }

    #[test]
    fn derived_addresses_and_rules() {
        let c = NatConfig {
            gateway: Ipv4Addr::new(10, 9, 8, 1),
            prefix_len: 24,
            bridge: "br-x".into(),
            ..NatConfig::default()
        };
        assert_eq!(c.network(), Ipv4Addr::new(10, 9, 8, 0));
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let nft = c.nft_script();
        assert!(nft.contains("table ip vzk_br_2dx"), "{nft}");
        assert!(
            nft.contains("ip saddr 10.9.8.0/24 ip daddr != 10.9.8.0/24 masquerade"),
            "{nft}"
        );
        let args = c.dnsmasq_args(Path::new("/s"));
        assert!(args.contains(&"--dhcp-leasefile=/s/dnsmasq.leases".to_string()));
        assert!(
            args.iter()
                .any(|a| a.starts_with("--dhcp-range=10.213.0.10,10.213.0.250,255.255.255.0,"))
        );
    }

    #[test]
    fn dnsmasq_args_follow_the_settings() {
        let settings = |subnet: &str, bridge: &str, dns: &[&str]| NatSettings {
            subnet: subnet.parse().unwrap_or_default(),
            bridge: bridge.into(),
            guest_dns: dns.iter().filter_map(|d| d.parse().ok()).collect(),
        };
        // (settings, dir, arguments that must be there)
        let table = [
            (
                settings("10.213.0.0/24", "vzkbr0", &[]),
                "/var/lib/vz-kubelet/qemu/nat",
                vec![
                    "--interface=vzkbr0",
                    "--listen-address=10.213.0.1",
                    "--dhcp-range=10.213.0.10,10.213.0.250,255.255.255.0,3600s",
                    "--dhcp-option=option:router,10.213.0.1",
                    "--dhcp-option=option:dns-server,10.213.0.1",
                    "--dhcp-leasefile=/var/lib/vz-kubelet/qemu/nat/dnsmasq.leases",
                    "--pid-file=/var/lib/vz-kubelet/qemu/nat/dnsmasq.pid",
                    "--bind-interfaces",
                ],
            ),
            (
                settings("192.168.77.0/28", "agent-b", &["192.168.1.53", "9.9.9.9"]),
                "/srv/b/qemu/nat",
                vec![
                    "--interface=agent-b",
                    "--listen-address=192.168.77.1",
                    "--dhcp-range=192.168.77.2,192.168.77.14,255.255.255.240,3600s",
                    "--dhcp-option=option:router,192.168.77.1",
                    "--dhcp-option=option:dns-server,192.168.1.53,9.9.9.9",
                    "--dhcp-leasefile=/srv/b/qemu/nat/dnsmasq.leases",
                    "--pid-file=/srv/b/qemu/nat/dnsmasq.pid",
                    "--bind-interfaces",
                ],
            ),
        ];
        for (s, dir, want) in table {
            let c = NatConfig::from_settings(&s);
            let args = c.dnsmasq_args(Path::new(dir));
            for w in want {
                assert!(args.iter().any(|a| a == w), "{w} missing from {args:?}");
            }
            // Exactly one DNS option and one router option.
            assert_eq!(
                args.iter()
                    .filter(|a| a.contains("option:dns-server"))
                    .count(),
                1
            );
            let nft = c.nft_script();
            assert!(
                nft.contains(&format!("table ip {} {{", c.nft_table())),
                "{nft}"
            );
            assert!(
                nft.contains(&format!(
                    "ip saddr {net} ip daddr != {net} masquerade",
                    net = s.subnet
                )),
                "{nft}"
            );
        }
        assert_eq!(NatConfig::default().nft_table(), "vzk_vzkbr0");
        assert_eq!(
            NatConfig::default(),
            NatConfig::from_settings(&NatSettings::default())
        );
    }

    #[test]
    fn another_interface_in_the_subnet_is_a_conflict_our_bridge_is_not() {
        let c = NatConfig::default();
        let addrs = |list: &[(&str, &str, u8)]| -> Vec<(String, Ipv4Addr, u8)> {
            list.iter()
                .map(|(i, a, p)| {
                    (
                        (*i).to_owned(),
                        a.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                        *p,
                    )
                })
                .collect()
        };
        let ours = addrs(&[("lo", "127.0.0.1", 8), ("vzkbr0", "10.213.0.1", 24)]);
        assert_eq!(c.conflict(&ours), None);
        let other_agent = addrs(&[("vzkbr0", "10.213.0.1", 24), ("vzkbr1", "10.213.0.1", 24)]);
        assert_eq!(
            c.conflict(&other_agent).map(|(i, _, _)| i.as_str()),
            Some("vzkbr1")
        );
        let lan = addrs(&[("eth0", "10.0.3.4", 8)]);
        assert_eq!(c.conflict(&lan).map(|(i, _, _)| i.as_str()), Some("eth0"));
        let elsewhere = addrs(&[("eth0", "10.214.0.4", 24), ("docker0", "172.17.0.1", 16)]);
        assert_eq!(c.conflict(&elsewhere), None);
    }
}
