//! Fuzz target: the text files IP discovery reads: macOS bootpd's
//! `/var/db/dhcpd_leases` and `arp -an` output (`vzk_vz::discovery::{leases, arp}`), and
//! Linux's `/proc/net/arp` (`vzk_vm::net::discovery::parse_proc_arp`). First six bytes:
//! the guest's MAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_vm::MacAddr;
use vzk_vz::discovery::{arp, leases};

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, e, f, rest @ ..] = data else {
        return;
    };
    let mac = MacAddr([*a, *b, *c, *d, *e, *f]);
    let text = String::from_utf8_lossy(rest);
    let _ = leases::parse(&text);
    let _ = leases::ip_for_mac(&text, mac);
    let _ = arp::parse(&text);
    let _ = arp::ip_for_mac(&text, mac, Some("bridge100"));
    let _ = arp::ip_for_mac(&text, mac, None);
    let _ = vzk_vm::net::discovery::parse_proc_arp(&text, mac, Some("vzkbr0"));
    let _ = vzk_vm::net::discovery::parse_proc_arp(&text, mac, None);
});
