//! macOS VM IP discovery: parsers for what the host knows about a guest's MAC.
//!
//! For NAT guests macOS's vmnet runs `bootpd`, which records every lease in
//! `/var/db/dhcpd_leases` ([`leases`]); the host ARP table (`arp -an`, [`arp`]) is the
//! fallback. Both print MACs in the leading-zero-stripped form (`a:1:…`); matching here
//! is on parsed [`MacAddr`](vzk_vm::MacAddr) values, so `a:1:2:3:4:5` never matches
//! `a:1:2:3:4:50` (the reference's substring match could).
//!
//! Bridged guests (whose DHCP server is elsewhere) are also found by sniffing the host
//! interface through BPF: [`frames`] parses what a BPF device returns.
//!
//! [`leases`], [`arp`] and [`frames`] are pure functions; [`watch`] is the loop that
//! re-reads the file when it changes and runs `arp`, until the MAC shows up.

pub mod arp;
pub mod frames;
pub mod leases;
pub mod watch;
