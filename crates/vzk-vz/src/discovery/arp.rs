//! Parser for the macOS host ARP table as printed by `arp -an`.
//!
//! Lines look like
//!
//! ```text
//! ? (192.168.64.5) at a:1:2:3:4:5 on bridge100 ifscope [bridge]
//! ? (192.168.64.9) at (incomplete) on bridge100 ifscope [bridge]
//! ? (224.0.0.251) at 1:0:5e:0:0:fb on en0 ifscope permanent [ethernet]
//! ```
//!
//! Contract: [`parse`] yields one [`ArpEntry`] per line with a parsable IPv4 address and
//! MAC (incomplete entries and other lines are skipped); [`ip_for_mac`] returns the first
//! entry whose MAC equals the given one, optionally restricted to one interface.

use std::net::Ipv4Addr;

use vzk_vm::MacAddr;

/// One resolved ARP entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpEntry {
    /// The neighbour's IPv4 address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: MacAddr,
    /// The host interface it was seen on (`bridge100`), when printed.
    pub interface: Option<String>,
}

/// Parses `arp -an` output.
pub fn parse(text: &str) -> Vec<ArpEntry> {
    text.lines().filter_map(entry_of).collect()
}

fn entry_of(line: &str) -> Option<ArpEntry> {
    let mut words = line.split_whitespace();
    let _host = words.next()?;
    let ip = words
        .next()?
        .strip_prefix('(')?
        .strip_suffix(')')?
        .parse()
        .ok()?;
    if words.next()? != "at" {
        return None;
    }
    let mac = words.next()?.parse().ok()?;
    let interface = match words.next() {
        Some("on") => words.next().map(str::to_owned),
        _ => None,
    };
    Some(ArpEntry { ip, mac, interface })
}

/// The IPv4 address of `mac`, optionally only on `interface`.
pub fn ip_for_mac(text: &str, mac: MacAddr, interface: Option<&str>) -> Option<Ipv4Addr> {
    parse(text)
        .into_iter()
        .find(|e| e.mac == mac && interface.is_none_or(|i| e.interface.as_deref() == Some(i)))
        .map(|e| e.ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
? (192.168.1.1) at 0:11:22:33:44:55 on en0 ifscope [ethernet]
? (192.168.64.4) at a:1:2:3:4:50 on bridge100 ifscope [bridge]
? (192.168.64.9) at (incomplete) on bridge100 ifscope [bridge]
? (192.168.64.5) at a:1:2:3:4:5 on bridge100 ifscope [bridge]
? (224.0.0.251) at 1:0:5e:0:0:fb on en0 ifscope permanent [ethernet]
garbage line
";

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_resolved_entries_and_skips_the_rest() {
        let entries = parse(TABLE);
        assert_eq!(entries.len(), 4);
        assert_eq!(
            entries[2],
            ArpEntry {
                ip: Ipv4Addr::new(192, 168, 64, 5),
                mac: mac("0a:01:02:03:04:05"),
                interface: Some("bridge100".into()),
            }
        );
    }

    #[test]
    fn matches_the_exact_mac_not_a_longer_one_containing_it() {
        // `a:1:2:3:4:5` is a substring of `a:1:2:3:4:50`, listed first.
        let ip = ip_for_mac(TABLE, mac("0a:01:02:03:04:05"), None);
        assert_eq!(ip, Some(Ipv4Addr::new(192, 168, 64, 5)));
    }

    #[test]
    fn interface_filter_applies() {
        let m = mac("0a:01:02:03:04:05");
        assert_eq!(ip_for_mac(TABLE, m, Some("en0")), None);
        assert_eq!(
            ip_for_mac(TABLE, m, Some("bridge100")),
            Some(Ipv4Addr::new(192, 168, 64, 5))
        );
        assert_eq!(
            ip_for_mac(TABLE, mac("00:11:22:33:44:55"), Some("en0")),
            Some(Ipv4Addr::new(192, 168, 1, 1))
        );
    }
}
