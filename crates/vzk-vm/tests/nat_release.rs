//! Removing a VM gives its NAT lease back to dnsmasq (a DHCPRELEASE sent on the bridge),
//! so the pool does not run dry on a host running many short-lived VMs: for a VM stopped
//! and removed by the agent, and for one whose QEMU died while no agent ran, found dead
//! on adoption and removed. Real QEMU (TCG), dnsmasq and the test guest, in a network
//! namespace the test creates. Needs root.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{Netns, guest_spec, wait_file_contains};
use vzk_vm::net::nat::NatConfig;
use vzk_vm::qemu::{Accel, AccelChoice, QemuBackend, QemuConfig};
use vzk_vm::{Hypervisor, MacAddr, NetworkAttachment, VmState, wait_for_ip};

const BOOT: Duration = Duration::from_secs(180);
/// How long dnsmasq may take to drop a released lease and rewrite its lease file.
const RELEASED: Duration = Duration::from_secs(5);

fn config(state: &Path) -> QemuConfig {
    QemuConfig {
        accel: AccelChoice::Force(Accel::Tcg),
        nat: Some(NatConfig::default()),
        ..QemuConfig::new(state)
    }
}

/// The lease file's line of `mac`, if any. dnsmasq rewrites the file in place
/// (truncate, write), so a read can miss a lease: [`wait_kept`] and [`wait_gone`] poll.
fn lease_line(file: &Path, mac: MacAddr) -> Option<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(mac.to_string().as_str()))
        .map(str::to_owned)
}

/// Waits until the lease file has a lease of `mac`; returns its line.
async fn wait_kept(file: &Path, mac: MacAddr) -> String {
    wait_file_contains(file, &mac.to_string(), Duration::from_secs(10)).await;
    let start = Instant::now();
    loop {
        if let Some(line) = lease_line(file, mac) {
            return line;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no lease of {mac}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the lease file has no lease of `mac` in three reads in a row, 50 ms apart.
async fn wait_gone(file: &Path, mac: MacAddr) {
    let start = Instant::now();
    let mut absent = 0;
    while absent < 3 {
        if lease_line(file, mac).is_some() {
            absent = 0;
            assert!(
                start.elapsed() < RELEASED,
                "the lease of {mac} is still in {} {RELEASED:?} after the VM's removal:\n{}",
                file.display(),
                std::fs::read_to_string(file).unwrap_or_default()
            );
        } else {
            absent += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn removing_a_nat_vm_releases_its_dhcp_lease() {
    support::guest(); // built outside the namespace: the first build downloads the kernel
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().to_owned();
    ns.run(move || async move {
        let leases = state_path.join("nat/dnsmasq.leases");
        let log = state_path.join("nat/dnsmasq.log");
        let backend = QemuBackend::new(config(&state_path)).await.unwrap();
        let spec_a = guest_spec("short-vm", &state_path, NetworkAttachment::Nat, "");
        let spec_b = guest_spec("lost-vm", &state_path, NetworkAttachment::Nat, "");
        let (mac_a, mac_b) = (spec_a.nics[0].mac, spec_b.nics[0].mac);
        let a = backend.create(spec_a).await.unwrap();
        let b = backend.create(spec_b).await.unwrap();
        a.start().await.unwrap();
        b.start().await.unwrap();
        let (ip_a, ip_b) =
            tokio::join!(wait_for_ip(a.as_ref(), BOOT), wait_for_ip(b.as_ref(), BOOT));
        let (ip_a, ip_b) = (ip_a.unwrap(), ip_b.unwrap());
        let line_a = wait_kept(&leases, mac_a).await;
        assert!(line_a.contains(&format!(" {ip_a} ")), "{line_a}");
        let line_b = wait_kept(&leases, mac_b).await;
        assert!(line_b.contains(&format!(" {ip_b} ")), "{line_b}");
        eprintln!(
            "leases before:\n{}",
            std::fs::read_to_string(&leases).unwrap()
        );

        // 1. The agent stops and removes a VM. `quit` (no guest shutdown), so the release
        //    cannot come from the guest's DHCP client.
        a.force_stop().await.unwrap();
        assert_eq!(*a.state().borrow(), VmState::Stopped);
        a.remove().await.unwrap();
        wait_gone(&leases, mac_a).await;
        // The other VM keeps its lease.
        wait_kept(&leases, mac_b).await;
        // dnsmasq took the release as received on the bridge (that is how it found the
        // lease's DHCP range).
        let line = format!("DHCPRELEASE(vzkbr0) {ip_a} {mac_a}");
        wait_file_contains(&log, &line, RELEASED).await;

        // 2. A VM whose QEMU dies while no agent runs: the next agent finds it dead on
        //    adoption (its dnsmasq a new one reading the same lease file) and removes it.
        let pid: i32 = std::fs::read_to_string(state_path.join("vms/lost-vm/qemu.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(b);
        drop(backend);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let backend = QemuBackend::new(config(&state_path)).await.unwrap();
        let adopted = backend.adopt_existing().await.unwrap();
        assert_eq!(adopted.len(), 1);
        let state = adopted[0].state().borrow().clone();
        assert!(matches!(state, VmState::Failed { .. }), "{state:?}");
        // The new dnsmasq has the lost VM's lease.
        wait_kept(&leases, mac_b).await;
        adopted[0].remove().await.unwrap();
        wait_gone(&leases, mac_b).await;
        let line = format!("DHCPRELEASE(vzkbr0) {ip_b} {mac_b}");
        wait_file_contains(&log, &line, RELEASED).await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!(
            "dnsmasq's releases:\n{}",
            text.lines()
                .filter(|l| l.contains("DHCPRELEASE"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}
