//! The operator's settings of the QEMU backend's NAT network (`--nat-subnet`,
//! `--nat-bridge`, `--guest-dns`), parsed and validated on every platform so the flags
//! exist everywhere; on Linux `net::nat::NatConfig::from_settings` turns them into the
//! network the backend owns. (On macOS NAT is Apple's and these settings are unused.)
//!
//! # Derivation
//! From a subnet `N/p` (RFC 1918, `16 ≤ p ≤ 29`, host bits zero):
//! * the gateway (the host's address on the bridge) is the first host, `N+1`;
//! * DHCP hands out `N+10 ..= broadcast-5` when the subnet has at least 64 addresses
//!   (the gateway's neighbours stay free for static use, as in the default
//!   `10.213.0.10 ..= 10.213.0.250`), else every host after the gateway;
//! * guests get the gateway as their DNS server unless `--guest-dns` names others.
//!
//! Every host-global name of a network derives from its bridge name (the nftables table
//! `vzk_<bridge>`), everything on disk lives in the agent's data dir: two agents with
//! their own data dirs, bridges and subnets share a host without touching each other.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The default subnet of the NAT network.
pub const DEFAULT_SUBNET: &str = "10.213.0.0/24";
/// The default bridge of the NAT network.
pub const DEFAULT_BRIDGE: &str = "vzkbr0";

/// A refused NAT setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatSettingsError {
    /// Not `a.b.c.d/len`.
    #[error("{0:?} is not an IPv4 subnet (expected a.b.c.d/len, e.g. {DEFAULT_SUBNET})")]
    Syntax(String),
    /// The prefix length is outside 16..=29.
    #[error("{subnet}: the prefix length must be 16 to 29 (/29 leaves 5 guest addresses)")]
    PrefixLength {
        /// What was given.
        subnet: String,
    },
    /// The subnet is not inside a private range.
    #[error(
        "{subnet} is not a private range (10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16): guests would shadow public addresses"
    )]
    NotPrivate {
        /// What was given.
        subnet: String,
    },
    /// Host bits are set.
    #[error("{subnet} has host bits set: did you mean {network}?")]
    HostBits {
        /// What was given.
        subnet: String,
        /// The network it lies in.
        network: String,
    },
    /// Not a usable Linux interface name.
    #[error(
        "{0:?} is not a valid bridge name: 1 to 15 characters of A-Z a-z 0-9 _ . -, not \".\" or \"..\""
    )]
    BridgeName(String),
}

/// A validated NAT subnet: RFC 1918, prefix 16..=29, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatSubnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl NatSubnet {
    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The dotted netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix_len))
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix_len))
    }

    /// The gateway: the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The first and last address DHCP hands out (see the module docs).
    pub fn dhcp_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let net = u32::from(self.network);
        let bcast = u32::from(self.broadcast());
        if bcast - net + 1 >= 64 {
            (Ipv4Addr::from(net + 10), Ipv4Addr::from(bcast - 5))
        } else {
            (Ipv4Addr::from(net + 2), Ipv4Addr::from(bcast - 1))
        }
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// Whether the subnet shares an address with `addr/prefix_len` (an interface's
    /// address and its prefix).
    pub fn overlaps(&self, addr: Ipv4Addr, prefix_len: u8) -> bool {
        let common = mask(self.prefix_len.min(prefix_len.min(32)));
        u32::from(self.network) & common == u32::from(addr) & common
    }
}

impl fmt::Display for NatSubnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for NatSubnet {
    type Err = NatSettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NatSettingsError::Syntax(s.to_owned());
        let (addr, len) = s.trim().split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix_len: u8 = len.parse().map_err(|_| syntax())?;
        if prefix_len > 32 {
            return Err(syntax());
        }
        if !(16..=29).contains(&prefix_len) {
            return Err(NatSettingsError::PrefixLength {
                subnet: s.to_owned(),
            });
        }
        if !addr.is_private() {
            return Err(NatSettingsError::NotPrivate {
                subnet: s.to_owned(),
            });
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix_len));
        if network != addr {
            return Err(NatSettingsError::HostBits {
                subnet: s.to_owned(),
                network: format!("{network}/{prefix_len}"),
            });
        }
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

impl Default for NatSubnet {
    fn default() -> Self {
        Self {
            network: Ipv4Addr::new(10, 213, 0, 0),
            prefix_len: 24,
        }
    }
}

/// Checks a bridge name: what Linux accepts as an interface name (at most 15 bytes, not
/// `.`/`..`), restricted to `A-Z a-z 0-9 _ . -` so it is also safe in file names and
/// nftables identifiers.
pub fn parse_bridge_name(s: &str) -> Result<String, NatSettingsError> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(NatSettingsError::BridgeName(s.to_owned()))
    }
}

/// The NAT network an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSettings {
    /// The subnet (gateway and DHCP range derive from it).
    pub subnet: NatSubnet,
    /// The bridge (created if missing; its name also names the nftables table).
    pub bridge: String,
    /// DNS servers handed to guests; empty: the gateway (dnsmasq answers there).
    pub guest_dns: Vec<Ipv4Addr>,
}

impl Default for NatSettings {
    fn default() -> Self {
        Self {
            subnet: NatSubnet::default(),
            bridge: DEFAULT_BRIDGE.into(),
            guest_dns: Vec::new(),
        }
    }
}

impl NatSettings {
    /// The DNS servers guests get: `guest_dns`, or the gateway.
    pub fn dns_servers(&self) -> Vec<Ipv4Addr> {
        if self.guest_dns.is_empty() {
            vec![self.subnet.gateway()]
        } else {
            self.guest_dns.clone()
        }
    }
}

/// The nftables table of the NAT network on `bridge`: `vzk_` and the name, every byte
/// other than a letter or digit written `_xx` (hex), so distinct bridges never share a
/// table (`br-x` and `br_x` differ) and the default `vzkbr0` keeps `vzk_vzkbr0`.
pub fn nft_table(bridge: &str) -> String {
    let mut out = String::from("vzk_");
    for b in bridge.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    #[test]
    fn subnets_derive_gateway_and_dhcp_range() {
        // (subnet, gateway, first, last, netmask)
        let table = [
            (
                "10.213.0.0/24",
                "10.213.0.1",
                "10.213.0.10",
                "10.213.0.250",
                "255.255.255.0",
            ),
            (
                "10.9.0.0/16",
                "10.9.0.1",
                "10.9.0.10",
                "10.9.255.250",
                "255.255.0.0",
            ),
            (
                "172.20.4.0/22",
                "172.20.4.1",
                "172.20.4.10",
                "172.20.7.250",
                "255.255.252.0",
            ),
            (
                "192.168.50.64/26",
                "192.168.50.65",
                "192.168.50.74",
                "192.168.50.122",
                "255.255.255.192",
            ),
            (
                "192.168.50.32/27",
                "192.168.50.33",
                "192.168.50.34",
                "192.168.50.62",
                "255.255.255.224",
            ),
            (
                "10.0.0.8/29",
                "10.0.0.9",
                "10.0.0.10",
                "10.0.0.14",
                "255.255.255.248",
            ),
        ];
        for (s, gw, lo, hi, netmask) in table {
            let n: NatSubnet = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(n.to_string(), s);
            assert_eq!(n.gateway(), ip(gw), "{s}");
            assert_eq!(n.dhcp_range(), (ip(lo), ip(hi)), "{s}");
            assert_eq!(n.netmask(), ip(netmask), "{s}");
            let (lo, hi) = n.dhcp_range();
            assert!(n.contains(lo) && n.contains(hi) && n.contains(n.gateway()));
            assert!(lo > n.gateway() && hi < n.broadcast(), "{s}");
        }
        assert_eq!(NatSubnet::default().to_string(), DEFAULT_SUBNET);
    }

    #[test]
    fn bad_subnets_are_refused_with_the_reason() {
        let kind = |s: &str| match s.parse::<NatSubnet>() {
            Ok(_) => "accepted",
            Err(NatSettingsError::Syntax(_)) => "syntax",
            Err(NatSettingsError::PrefixLength { .. }) => "prefix",
            Err(NatSettingsError::NotPrivate { .. }) => "public",
            Err(NatSettingsError::HostBits { .. }) => "host bits",
            Err(NatSettingsError::BridgeName(_)) => "bridge",
        };
        let table = [
            ("10.213.0.0", "syntax"),
            ("10.213.0/24", "syntax"),
            ("10.213.0.0/", "syntax"),
            ("10.213.0.0/+8", "syntax"),
            ("10.213.0.0/33", "syntax"),
            ("fd00::/64", "syntax"),
            ("10.0.0.0/8", "prefix"),
            ("10.213.0.0/30", "prefix"),
            ("8.8.8.0/24", "public"),
            ("172.32.0.0/16", "public"),
            ("100.64.0.0/16", "public"),
            ("10.213.0.1/24", "host bits"),
            ("172.31.0.0/16", "accepted"),
            (" 10.213.0.0/24 ", "accepted"),
        ];
        for (s, want) in table {
            assert_eq!(kind(s), want, "{s:?}");
        }
        let msg = "10.213.0.1/24"
            .parse::<NatSubnet>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("did you mean 10.213.0.0/24"), "{msg}");
    }

    #[test]
    fn overlap_with_interface_addresses() {
        let n: NatSubnet = "10.213.0.0/24".parse().unwrap_or_default();
        // (interface address, prefix, overlaps)
        let table = [
            ("10.213.0.1", 24, true),
            ("10.213.0.77", 32, true),
            ("10.213.1.1", 24, false),
            ("10.0.0.5", 8, true),
            ("10.212.255.1", 24, false),
            ("192.168.1.2", 24, false),
            ("10.213.0.130", 25, true),
            ("127.0.0.1", 8, false),
        ];
        for (a, p, want) in table {
            assert_eq!(n.overlaps(ip(a), p), want, "{a}/{p}");
        }
    }

    #[test]
    fn bridge_names_and_their_tables() {
        for ok in ["vzkbr0", "vzk-a", "br_1.2", "a", "fifteen-chars15"] {
            assert_eq!(parse_bridge_name(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-16",
            "br 0",
            "br/0",
            "br:0",
            "brü",
        ] {
            assert!(parse_bridge_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(nft_table("vzkbr0"), "vzk_vzkbr0");
        assert_eq!(nft_table("br-x"), "vzk_br_2dx");
        assert_ne!(nft_table("br-x"), nft_table("br_x"));
        assert_ne!(nft_table("br.x"), nft_table("br_2ex"));
    }

    #[test]
    fn guests_get_the_gateway_as_dns_unless_told_otherwise() {
        let mut s = NatSettings::default();
        assert_eq!(s.dns_servers(), vec![ip("10.213.0.1")]);
        s.guest_dns = vec![ip("10.0.0.53"), ip("10.0.0.54")];
        assert_eq!(s.dns_servers(), s.guest_dns);
    }
}
