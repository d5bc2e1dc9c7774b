//! Fuzz target: the Ethernet frames a VM sends that IP discovery reads (ARP, DHCP
//! ACKs): the QEMU backend's sniffer (`vzk_vm::net::discovery::parse_frame`) and the VZ
//! backend's BPF buffer scanner (`vzk_vz::discovery::frames`: `bpf_frames`, `scan`,
//! `guest_ipv4`). First six bytes: the guest's MAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vzk_vm::MacAddr;
use vzk_vz::discovery::frames;

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, e, f, rest @ ..] = data else {
        return;
    };
    let mac = MacAddr([*a, *b, *c, *d, *e, *f]);
    let _ = vzk_vm::net::discovery::parse_frame(rest, mac);
    let _ = frames::guest_ipv4(rest, mac);
    let _ = frames::scan(rest, mac);
    for frame in frames::bpf_frames(rest).take(100_000) {
        let _ = frames::guest_ipv4(frame, mac);
    }
});
