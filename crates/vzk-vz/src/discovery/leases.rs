//! Parser for macOS `bootpd`'s lease database, `/var/db/dhcpd_leases`.
//!
//! The file is a sequence of brace-delimited records, one `key=value` per line:
//!
//! ```text
//! {
//!     name=debian
//!     ip_address=192.168.64.5
//!     hw_address=1,a:1:2:3:4:5
//!     identifier=1,a:1:2:3:4:5
//!     lease=0x6566e2a8
//! }
//! ```
//!
//! `hw_address` is `<ARP hardware type>,<MAC in macOS form>` (type 1 is Ethernet);
//! `lease` is the expiry as hexadecimal Unix seconds. Contract: [`parse`] keeps every
//! record that has an IPv4 `ip_address` and skips the others (a torn write while bootpd
//! rewrites the file must not fail discovery); [`ip_for_mac`] returns the address of the
//! Ethernet record for the MAC with the latest expiry.

use std::net::Ipv4Addr;

use vzk_vm::MacAddr;

/// One lease record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The `name` the client sent (its hostname), if any.
    pub name: Option<String>,
    /// The leased address.
    pub ip: Ipv4Addr,
    /// The client's MAC, when `hw_address` is an Ethernet (`1,`) address.
    pub mac: Option<MacAddr>,
    /// Expiry in Unix seconds, when present and well formed.
    pub expires: Option<u64>,
}

/// Parses the whole file; malformed records are skipped.
pub fn parse(text: &str) -> Vec<Lease> {
    let mut leases = Vec::new();
    let mut record: Option<Vec<(&str, &str)>> = None;
    for line in text.lines().map(str::trim) {
        match line {
            "{" => record = Some(Vec::new()),
            "}" => {
                if let Some(fields) = record.take()
                    && let Some(lease) = lease_of(&fields)
                {
                    leases.push(lease);
                }
            }
            _ => {
                if let (Some(fields), Some((key, value))) = (record.as_mut(), line.split_once('='))
                {
                    fields.push((key.trim(), value.trim()));
                }
            }
        }
    }
    leases
}

fn lease_of(fields: &[(&str, &str)]) -> Option<Lease> {
    let get = |k: &str| fields.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let ip = get("ip_address")?.parse().ok()?;
    let mac = get("hw_address").and_then(|hw| {
        let (htype, mac) = hw.split_once(',')?;
        if htype.trim() != "1" {
            return None;
        }
        mac.trim().parse().ok()
    });
    let expires = get("lease").and_then(|l| {
        let hex = l.strip_prefix("0x").or_else(|| l.strip_prefix("0X"))?;
        u64::from_str_radix(hex, 16).ok()
    });
    Some(Lease {
        name: get("name").map(str::to_owned),
        ip,
        mac,
        expires,
    })
}

/// The address leased to `mac`: the matching record with the latest expiry (bootpd keeps
/// old records of a MAC when it hands out a new address).
pub fn ip_for_mac(text: &str, mac: MacAddr) -> Option<Ipv4Addr> {
    parse(text)
        .into_iter()
        .filter(|l| l.mac == Some(mac))
        .max_by_key(|l| l.expires.unwrap_or(0))
        .map(|l| l.ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "{\n\tname=old\n\tip_address=192.168.64.2\n\thw_address=1,a:1:2:3:4:5\n\t\
        identifier=1,a:1:2:3:4:5\n\tlease=0x65000000\n}\n\
        {\n\tname=other\n\tip_address=192.168.64.3\n\thw_address=1,a:1:2:3:4:50\n\t\
        identifier=1,a:1:2:3:4:50\n\tlease=0x66000000\n}\n\
        {\n\tname=debian\n\tip_address=192.168.64.7\n\thw_address=1,a:1:2:3:4:5\n\t\
        identifier=ff,1,2,3\n\tlease=0x65f1d2a3\n}\n";

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_every_record_with_its_fields() {
        let leases = parse(FILE);
        assert_eq!(leases.len(), 3);
        assert_eq!(
            leases[2],
            Lease {
                name: Some("debian".into()),
                ip: Ipv4Addr::new(192, 168, 64, 7),
                mac: Some(mac("0a:01:02:03:04:05")),
                expires: Some(0x65f1_d2a3),
            }
        );
    }

    #[test]
    fn latest_lease_of_the_exact_mac_wins() {
        assert_eq!(
            ip_for_mac(FILE, mac("0a:01:02:03:04:05")),
            Some(Ipv4Addr::new(192, 168, 64, 7))
        );
        // Prefix of another MAC in text form, but a different address.
        assert_eq!(
            ip_for_mac(FILE, mac("0a:01:02:03:04:50")),
            Some(Ipv4Addr::new(192, 168, 64, 3))
        );
        assert_eq!(ip_for_mac(FILE, mac("0a:01:02:03:04:06")), None);
    }

    #[test]
    fn torn_and_malformed_records_are_skipped() {
        let text = "{\n\tip_address=not-an-ip\n\thw_address=1,a:1:2:3:4:5\n}\n\
            {\n\tname=no-ip\n\thw_address=1,a:1:2:3:4:5\n}\n\
            {\n\tip_address=192.168.64.9\n\thw_address=6,a:1:2:3:4:5\n\tlease=zz\n}\n\
            {\n\tip_address=192.168.64.10\n\thw_address=1,a:1:2:3:4:5";
        let leases = parse(text);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].mac, None, "non-Ethernet hardware type");
        assert_eq!(leases[0].expires, None);
        assert_eq!(ip_for_mac(text, mac("0a:01:02:03:04:05")), None);
    }

    #[test]
    fn empty_file_has_no_leases() {
        assert!(parse("").is_empty());
    }
}
