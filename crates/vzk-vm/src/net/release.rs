//! Giving back the DHCP leases of removed VMs to the NAT network's dnsmasq.
//!
//! Every VM gets a fresh MAC, so every VM takes a new lease from the NAT network's pool;
//! left alone, the lease outlives the VM by the lease time and a host running many short
//! VMs exhausts the pool. When a VM is removed, [`LeaseReleaser::release`] looks up the
//! leases of its MACs in dnsmasq's lease file and sends a DHCPRELEASE for each, the way
//! dnsmasq's own `dhcp_release` utility does: a UDP datagram to the server's port 67 from
//! a socket bound to the bridge (`SO_BINDTODEVICE`), which Linux delivers to dnsmasq as
//! if it came in on the bridge, so dnsmasq finds the right DHCP range. dnsmasq then drops
//! the lease and rewrites its lease file.
//!
//! * [`parse_lease_line`] / [`leases_of`]: dnsmasq's lease file
//!   (`expiry mac ip hostname client-id` per line), outside input: a line that does not
//!   parse is skipped, never trusted.
//! * [`release_packet`]: the BOOTP/DHCP bytes of one DHCPRELEASE.
//!
//! dnsmasq rewrites its lease file in place (truncate, then write), so a read can see it
//! empty or cut short: such a read is repeated a few times, and the caller passes the
//! leases it knows without the file (the address IP discovery recorded), which are
//! released whatever the file says (dnsmasq ignores a release of a lease it does not
//! hold: it checks both the MAC and the address).
//!
//! Everything happens in the network namespace of the calling thread.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::mac::MacAddr;

/// The DHCP server port.
pub const DHCP_SERVER_PORT: u16 = 67;
/// The DHCP magic cookie (99.130.83.99).
pub const DHCP_MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// DHCP message type DHCPRELEASE (option 53).
pub const DHCPRELEASE: u8 = 7;
/// The size of a release packet: the 236-byte BOOTP header, the cookie, the options and
/// zero padding up to the 300-byte minimum of a BOOTP message (RFC 1542).
pub const RELEASE_PACKET_LEN: usize = 300;

/// How often a lease file caught mid-rewrite (empty, or not ending in a newline) is read.
const READ_ATTEMPTS: u32 = 3;
/// The pause between those reads.
const REREAD_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

const OPTION_MESSAGE_TYPE: u8 = 53;
const OPTION_SERVER_IDENTIFIER: u8 = 54;
const OPTION_END: u8 = 255;
const BOOTREQUEST: u8 = 1;
const HTYPE_ETHERNET: u8 = 1;

/// One lease of dnsmasq's lease file (the fields a release needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The client's hardware address.
    pub mac: MacAddr,
    /// The leased address.
    pub ip: Ipv4Addr,
}

/// A line of the lease file that is not an Ethernet IPv4 lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLineError {
    /// Fewer than the three fields `expiry mac ip`.
    #[error("a lease line needs at least 3 fields (expiry, MAC, IP), this one has {0}")]
    TooFewFields(usize),
    /// The expiry is not a number of seconds.
    #[error("invalid lease expiry {0:?}")]
    Expiry(String),
    /// The hardware address is not an Ethernet MAC (`aa:bb:cc:dd:ee:ff`).
    #[error("invalid lease MAC {0:?}")]
    Mac(String),
    /// The address is not IPv4 (a DHCPv6 lease, or garbage).
    #[error("invalid lease IPv4 address {0:?}")]
    Ip(String),
}

/// Parses one line of dnsmasq's lease file: `expiry mac ip hostname client-id` (hostname
/// and client id are not needed and may be missing).
pub fn parse_lease_line(line: &str) -> Result<Lease, LeaseLineError> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let [expiry, mac, ip, ..] = fields.as_slice() else {
        return Err(LeaseLineError::TooFewFields(fields.len()));
    };
    expiry
        .parse::<u64>()
        .map_err(|_| LeaseLineError::Expiry((*expiry).to_owned()))?;
    // dnsmasq writes Ethernet addresses as six ':'-separated two-digit octets, and other
    // hardware types (or none) behind a `tt-` type prefix: only the first form is a VM
    // NIC. The length check also refuses the short `a:1:...` form dnsmasq never writes.
    let ethernet = mac.len() == 17 && !mac.contains('-');
    let mac = ethernet
        .then(|| mac.parse::<MacAddr>().ok())
        .flatten()
        .ok_or_else(|| LeaseLineError::Mac((*mac).to_owned()))?;
    let ip = ip
        .parse::<Ipv4Addr>()
        .map_err(|_| LeaseLineError::Ip((*ip).to_owned()))?;
    Ok(Lease { mac, ip })
}

/// The leases in lease file `text` held by one of `macs`, in file order. Lines that do
/// not parse (DHCPv6 leases, the `duid` line, garbage) are skipped.
pub fn leases_of(text: &str, macs: &[MacAddr]) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| parse_lease_line(line).ok())
        .filter(|lease| macs.contains(&lease.mac))
        .collect()
}

/// The DHCPRELEASE of `lease` to the server `server`, with transaction id `xid`: BOOTP
/// request, Ethernet, `ciaddr` the leased address, `chaddr` the MAC, options 53
/// (DHCPRELEASE), 54 (server identifier) and 255, zero padding to
/// [`RELEASE_PACKET_LEN`].
pub fn release_packet(lease: &Lease, server: Ipv4Addr, xid: u32) -> [u8; RELEASE_PACKET_LEN] {
    let mut p = [0u8; RELEASE_PACKET_LEN];
    p[0] = BOOTREQUEST; // op
    p[1] = HTYPE_ETHERNET; // htype
    p[2] = 6; // hlen
    // p[3] hops, p[8..10] secs, p[10..12] flags: 0.
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[12..16].copy_from_slice(&lease.ip.octets()); // ciaddr
    // yiaddr (16..20), siaddr (20..24), giaddr (24..28): 0.
    p[28..34].copy_from_slice(&lease.mac.octets()); // chaddr (16 bytes, 6 used)
    // sname (44..108) and file (108..236): 0.
    p[236..240].copy_from_slice(&DHCP_MAGIC_COOKIE);
    p[240..243].copy_from_slice(&[OPTION_MESSAGE_TYPE, 1, DHCPRELEASE]);
    p[243..245].copy_from_slice(&[OPTION_SERVER_IDENTIFIER, 4]);
    p[245..249].copy_from_slice(&server.octets());
    p[249] = OPTION_END;
    p
}

/// Why leases could not be released (they then expire on their own).
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The lease file could not be read.
    #[error("reading the lease file {path}")]
    ReadLeases {
        /// The lease file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The UDP socket could not be created.
    #[error("creating a UDP socket")]
    Socket(#[source] std::io::Error),
    /// The socket could not be bound to the bridge.
    #[error("binding a UDP socket to {bridge}")]
    BindDevice {
        /// The bridge.
        bridge: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending the DHCPRELEASE failed.
    #[error("sending the DHCPRELEASE of {ip} ({mac}) to {server}")]
    Send {
        /// The leased address.
        ip: Ipv4Addr,
        /// The MAC holding it.
        mac: MacAddr,
        /// The DHCP server.
        server: Ipv4Addr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Releases leases of the NAT network's dnsmasq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseReleaser {
    bridge: String,
    server: Ipv4Addr,
    lease_file: PathBuf,
}

impl LeaseReleaser {
    /// The releaser for the dnsmasq serving `bridge` at `server` (its address on the
    /// bridge, the server identifier) and writing `lease_file`.
    pub fn new(
        bridge: impl Into<String>,
        server: Ipv4Addr,
        lease_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            bridge: bridge.into(),
            server,
            lease_file: lease_file.into(),
        }
    }

    /// The lease file read.
    pub fn lease_file(&self) -> &Path {
        &self.lease_file
    }

    /// Sends a DHCPRELEASE for every lease of `macs` in the lease file and for every
    /// lease of `known` (leases of these MACs known otherwise), and returns those leases
    /// (none: no lease file and nothing known). Every lease is tried; the first failure
    /// is returned after that.
    pub async fn release(
        &self,
        macs: &[MacAddr],
        known: &[Lease],
    ) -> Result<Vec<Lease>, ReleaseError> {
        let mut leases = if macs.is_empty() {
            Vec::new()
        } else {
            leases_of(&self.read_leases().await?, macs)
        };
        for lease in known {
            if !leases.contains(lease) {
                leases.push(*lease);
            }
        }
        if leases.is_empty() {
            return Ok(leases);
        }
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(ReleaseError::Socket)?;
        socket
            .bind_device(Some(self.bridge.as_bytes()))
            .map_err(|source| ReleaseError::BindDevice {
                bridge: self.bridge.clone(),
                source,
            })?;
        let to = SockAddr::from(SocketAddrV4::new(self.server, DHCP_SERVER_PORT));
        let mut first_error = None;
        for lease in &leases {
            let packet = release_packet(lease, self.server, rand::random());
            if let Err(source) = socket.send_to(&packet, &to) {
                first_error.get_or_insert(ReleaseError::Send {
                    ip: lease.ip,
                    mac: lease.mac,
                    server: self.server,
                    source,
                });
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(leases),
        }
    }

    /// The lease file's text ("" if there is none), read again while it looks caught in
    /// a rewrite.
    async fn read_leases(&self) -> Result<String, ReleaseError> {
        let mut attempt = 1;
        loop {
            let text = match std::fs::read_to_string(&self.lease_file) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
                Err(source) => {
                    return Err(ReleaseError::ReadLeases {
                        path: self.lease_file.clone(),
                        source,
                    });
                }
            };
            if text.ends_with('\n') || attempt >= READ_ATTEMPTS {
                return Ok(text);
            }
            attempt += 1;
            tokio::time::sleep(REREAD_PAUSE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xab, 0x0c, 0x01]);

    #[test]
    fn release_packet_fields() {
        let lease = Lease {
            mac: MAC,
            ip: Ipv4Addr::new(10, 213, 0, 42),
        };
        let p = release_packet(&lease, Ipv4Addr::new(10, 213, 0, 1), 0xdead_beef);
        assert_eq!(p.len(), 300);
        assert_eq!(p[0], 1, "op BOOTREQUEST");
        assert_eq!(p[1], 1, "htype Ethernet");
        assert_eq!(p[2], 6, "hlen");
        assert_eq!(p[3], 0, "hops");
        assert_eq!(p[4..8], [0xde, 0xad, 0xbe, 0xef], "xid, network order");
        assert_eq!(p[8..10], [0, 0], "secs");
        assert_eq!(p[10..12], [0, 0], "flags");
        assert_eq!(p[12..16], [10, 213, 0, 42], "ciaddr");
        assert_eq!(p[16..20], [0; 4], "yiaddr");
        assert_eq!(p[20..24], [0; 4], "siaddr");
        assert_eq!(p[24..28], [0; 4], "giaddr");
        assert_eq!(p[28..34], [0x52, 0x54, 0x00, 0xab, 0x0c, 0x01], "chaddr");
        assert_eq!(p[34..44], [0; 10], "chaddr padding");
        assert!(p[44..108].iter().all(|&b| b == 0), "sname");
        assert!(p[108..236].iter().all(|&b| b == 0), "file");
        assert_eq!(p[236..240], [99, 130, 83, 99], "magic cookie");
        assert_eq!(p[240..243], [53, 1, 7], "option 53: DHCPRELEASE");
        assert_eq!(p[243..249], [54, 4, 10, 213, 0, 1], "option 54: server id");
        assert_eq!(p[249], 255, "end");
        assert!(p[250..].iter().all(|&b| b == 0), "padding");
    }

    #[test]
    fn release_packets_differ_only_in_their_fields() {
        let a = Lease {
            mac: MAC,
            ip: Ipv4Addr::new(192, 168, 77, 2),
        };
        let b = Lease {
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            ip: Ipv4Addr::new(192, 168, 77, 14),
        };
        let server = Ipv4Addr::new(192, 168, 77, 1);
        let (pa, pb) = (release_packet(&a, server, 1), release_packet(&b, server, 2));
        let differ: Vec<usize> = (0..RELEASE_PACKET_LEN)
            .filter(|&i| pa[i] != pb[i])
            .collect();
        // xid's last byte, ciaddr's last byte, the chaddr bytes that differ (not the third).
        assert_eq!(differ, vec![7, 15, 28, 29, 31, 32, 33]);
        assert_eq!(pb[28..34], [2, 0, 0, 0, 0, 9]);
        assert_eq!(pb[245..249], [192, 168, 77, 1]);
    }

    #[test]
    fn lease_lines() {
        let ok = |mac: MacAddr, ip: [u8; 4]| {
            Ok(Lease {
                mac,
                ip: Ipv4Addr::from(ip),
            })
        };
        let table: &[(&str, Result<Lease, LeaseLineError>)] = &[
            (
                "1767225600 52:54:00:ab:0c:01 10.213.0.42 vzk-test-guest 01:52:54:00:ab:0c:01",
                ok(MAC, [10, 213, 0, 42]),
            ),
            // Upper case, no hostname/client id (`*`), infinite lease (0), tabs.
            (
                "0\t52:54:00:AB:0C:01  10.213.0.43 * *",
                ok(MAC, [10, 213, 0, 43]),
            ),
            ("1 52:54:00:ab:0c:01 10.213.0.44", ok(MAC, [10, 213, 0, 44])),
            ("", Err(LeaseLineError::TooFewFields(0))),
            ("   ", Err(LeaseLineError::TooFewFields(0))),
            (
                "duid 00:01:00:01:2c:aa:bb:cc:52:54:00:ab:0c:01",
                Err(LeaseLineError::TooFewFields(2)),
            ),
            (
                "1767225600 52:54:00:ab:0c:01",
                Err(LeaseLineError::TooFewFields(2)),
            ),
            (
                "soon 52:54:00:ab:0c:01 10.213.0.42 h *",
                Err(LeaseLineError::Expiry("soon".into())),
            ),
            (
                "-1 52:54:00:ab:0c:01 10.213.0.42 h *",
                Err(LeaseLineError::Expiry("-1".into())),
            ),
            // DHCPv6 lease: IAID in the MAC column, an IPv6 address.
            (
                "1767225600 1234567 fd00::2 h 00:01:00:01",
                Err(LeaseLineError::Mac("1234567".into())),
            ),
            // Another hardware type, and short forms dnsmasq does not write.
            (
                "1767225600 06-52-54-00-ab-0c-01 10.213.0.42 h *",
                Err(LeaseLineError::Mac("06-52-54-00-ab-0c-01".into())),
            ),
            // dnsmasq's form for other hardware types, and for no hardware address.
            (
                "1767225600 06-52:54:00:ab:0c:01 10.213.0.42 h *",
                Err(LeaseLineError::Mac("06-52:54:00:ab:0c:01".into())),
            ),
            (
                "1767225600 00- 10.213.0.42 h *",
                Err(LeaseLineError::Mac("00-".into())),
            ),
            (
                "1767225600 52-54-00-ab-0c-01 10.213.0.42 h *",
                Err(LeaseLineError::Mac("52-54-00-ab-0c-01".into())),
            ),
            (
                "1767225600 52:54:0:ab:c:1 10.213.0.42 h *",
                Err(LeaseLineError::Mac("52:54:0:ab:c:1".into())),
            ),
            (
                "1767225600 52:54:00:ab:0c:zz 10.213.0.42 h *",
                Err(LeaseLineError::Mac("52:54:00:ab:0c:zz".into())),
            ),
            (
                "1767225600 52:54:00:ab:0c:01 10.213.0.256 h *",
                Err(LeaseLineError::Ip("10.213.0.256".into())),
            ),
            (
                "1767225600 52:54:00:ab:0c:01 fd00::2 h *",
                Err(LeaseLineError::Ip("fd00::2".into())),
            ),
            (
                "1767225600 52:54:00:ab:0c:01 ™™™ h *",
                Err(LeaseLineError::Ip("™™™".into())),
            ),
        ];
        for (line, want) in table {
            assert_eq!(&parse_lease_line(line), want, "{line:?}");
        }
    }

    #[test]
    fn leases_of_picks_the_macs_leases_and_skips_the_rest() {
        let other = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        let third = MacAddr([0x02, 0, 0, 0, 0, 3]);
        let text = "\
1767225600 02:11:22:33:44:55 10.213.0.10 a 01:02:11:22:33:44:55
garbage line
1767225600 52:54:00:ab:0c:01 10.213.0.11 * *
\u{0}\u{1}\u{ff}
1767225600 52:54:00:ab:0c:01 not-an-ip * *
duid 00:01:00:01:2c:aa:bb:cc
1767225700 1234 fd00::5 * 00:01
1767225800 52:54:00:ab:0c:01 10.213.0.12 * *
";
        let ip = |d| Ipv4Addr::new(10, 213, 0, d);
        assert_eq!(
            leases_of(text, &[MAC]),
            vec![
                Lease {
                    mac: MAC,
                    ip: ip(11)
                },
                Lease {
                    mac: MAC,
                    ip: ip(12)
                }
            ]
        );
        assert_eq!(
            leases_of(text, &[other, third]),
            vec![Lease {
                mac: other,
                ip: ip(10)
            }]
        );
        assert_eq!(leases_of(text, &[third]), vec![]);
        assert_eq!(leases_of(text, &[]), vec![]);
        assert_eq!(leases_of("", &[MAC]), vec![]);
    }

    #[tokio::test]
    async fn no_lease_file_or_no_lease_releases_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let server = Ipv4Addr::new(10, 213, 0, 1);
        let r = LeaseReleaser::new("no-such-br", server, dir.path().join("missing"));
        assert_eq!(r.release(&[MAC], &[]).await.ok(), Some(vec![]));
        let file = dir.path().join("leases");
        std::fs::write(&file, "1767225600 02:11:22:33:44:55 10.213.0.10 * *\n")
            .unwrap_or_else(|e| panic!("{e}"));
        // No lease of MAC: no socket, so the missing bridge does not matter.
        let r = LeaseReleaser::new("no-such-br", server, &file);
        assert_eq!(r.release(&[MAC], &[]).await.ok(), Some(vec![]));
        assert_eq!(r.release(&[], &[]).await.ok(), Some(vec![]));
        // A lease to release on a bridge that does not exist: an error, not a panic.
        let other = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert!(matches!(
            r.release(&[other], &[]).await,
            Err(ReleaseError::BindDevice { .. })
        ));
        let known = Lease {
            mac: MAC,
            ip: Ipv4Addr::new(10, 213, 0, 99),
        };
        assert!(matches!(
            r.release(&[MAC], &[known]).await,
            Err(ReleaseError::BindDevice { .. })
        ));
    }

    #[tokio::test]
    async fn a_lease_file_caught_mid_rewrite_is_read_again() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("leases");
        let r = LeaseReleaser::new("br", Ipv4Addr::new(10, 213, 0, 1), &file);
        let full = "1767225600 52:54:00:ab:0c:01 10.213.0.11 * *\n";
        // Truncated (empty), then cut short in a line: the rewrite completes meanwhile.
        for partial in ["", "1767225600 52:54:00:ab:0c:01 10.21"] {
            std::fs::write(&file, partial).unwrap_or_else(|e| panic!("{e}"));
            let writer = {
                let file = file.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REREAD_PAUSE / 2).await;
                    std::fs::write(&file, full).unwrap_or_else(|e| panic!("{e}"));
                })
            };
            let text = r.read_leases().await.ok();
            assert_eq!(text.as_deref(), Some(full), "{partial:?}");
            writer.await.unwrap_or_else(|e| panic!("{e}"));
        }
        // One that stays so is taken as it is after the last attempt.
        std::fs::write(&file, "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.read_leases().await.ok().as_deref(), Some(""));
        std::fs::write(&file, "no newline").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.read_leases().await.ok().as_deref(), Some("no newline"));
    }
}
