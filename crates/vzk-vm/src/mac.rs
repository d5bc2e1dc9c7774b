//! MAC addresses for VM NICs: random, locally administered, unicast.
//!
//! [`MacAddr::random`] draws 6 bytes from the OS CSPRNG, sets the locally-administered
//! bit (0x02) and clears the multicast bit (0x01) of the first octet, as the reference
//! implementation does. Text form is the canonical lowercase `aa:bb:cc:dd:ee:ff`;
//! [`MacAddr::to_short_string`] gives the macOS `arp`/`dhcpd_leases` form without leading
//! zeros (`a:1:...`), and parsing accepts both.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six ':'-separated hex octets")]
pub struct ParseMacError(String);

impl MacAddr {
    /// A random locally-administered unicast address.
    pub fn random() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] | 0x02) & !0x01;
        Self(b)
    }

    /// The octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Whether the locally-administered bit is set.
    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Whether the address is unicast (multicast bit clear).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    /// The macOS `arp -an` / `dhcpd_leases` form: lowercase, leading zeros dropped.
    pub fn to_short_string(&self) -> String {
        self.0
            .iter()
            .map(|b| format!("{b:x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for slot in &mut out {
            let part = parts.next().ok_or_else(|| ParseMacError(s.to_owned()))?;
            if part.is_empty() || part.len() > 2 {
                return Err(ParseMacError(s.to_owned()));
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| ParseMacError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(ParseMacError(s.to_owned()));
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast_and_distinct() {
        let macs: Vec<MacAddr> = (0..64).map(|_| MacAddr::random()).collect();
        for m in &macs {
            assert!(m.is_local() && m.is_unicast(), "{m}");
        }
        let mut uniq = macs.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), macs.len());
    }

    #[test]
    fn text_forms_round_trip() {
        let m = MacAddr([0x0a, 0x01, 0xbc, 0x00, 0xff, 0x10]);
        assert_eq!(m.to_string(), "0a:01:bc:00:ff:10");
        assert_eq!(m.to_short_string(), "a:1:bc:0:ff:10");
        assert_eq!("0a:01:bc:00:ff:10".parse::<MacAddr>().ok(), Some(m));
        assert_eq!("A:1:BC:0:FF:10".parse::<MacAddr>().ok(), Some(m));
        for bad in [
            "",
            "0a:01:bc:00:ff",
            "0a:01:bc:00:ff:10:11",
            "0g:01:bc:00:ff:10",
            "100:1:1:1:1:1",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
    }
}
