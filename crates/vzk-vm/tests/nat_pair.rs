//! Two agents' NAT networks on one host: two QEMU backends with their own state dirs,
//! bridges and subnets in one test network namespace, a VM on each (the same VM id on
//! both), each VM leased an address from its own subnet; a third network overlapping the
//! first is refused; tearing the first down leaves the second's bridge, dnsmasq,
//! nftables table and VM working. Needs root, QEMU (TCG), dnsmasq, nft and the test guest.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use support::{Netns, guest_spec, ssh, wait_ssh};
use vzk_vm::nat_settings::NatSettings;
use vzk_vm::net::link;
use vzk_vm::net::nat::{NatConfig, NatNetwork};
use vzk_vm::qemu::{Accel, AccelChoice, QemuBackend, QemuConfig};
use vzk_vm::{Hypervisor, NetworkAttachment, wait_for_ip};

const BOOT: Duration = Duration::from_secs(180);

fn settings(subnet: &str, bridge: &str, dns: &[&str]) -> NatSettings {
    NatSettings {
        subnet: subnet.parse().unwrap(),
        bridge: bridge.into(),
        guest_dns: dns.iter().map(|d| d.parse().unwrap()).collect(),
    }
}

fn backend_config(state: &Path, s: &NatSettings) -> QemuConfig {
    QemuConfig {
        accel: AccelChoice::Force(Accel::Tcg),
        nat: Some(NatConfig::from_settings(s)),
        ..QemuConfig::new(state)
    }
}

/// Whether `pid` runs (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        !matches!(state, Some("Z" | "X") | None)
    })
}

async fn nft_table(table: &str) -> Option<String> {
    let out = tokio::process::Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .await
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

async fn ip_out(args: &[&str]) -> String {
    link::ip(args).await.unwrap_or_default()
}

#[test]
fn two_nat_networks_run_side_by_side_and_removing_one_leaves_the_other() {
    support::guest(); // built outside the namespace: the first build downloads the kernel
    let ns = Netns::new();
    let (dir_a, dir_b, dir_c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (state_a, state_b, state_c) = (
        dir_a.path().to_owned(),
        dir_b.path().to_owned(),
        dir_c.path().to_owned(),
    );
    ns.run(move || async move {
        // Agent A keeps today's defaults; agent B has its own bridge, subnet and guest DNS.
        let a_set = NatSettings::default();
        let b_set = settings("192.168.77.0/28", "vzk-b", &["192.168.77.1", "10.213.0.1"]);
        let (a_cfg, b_cfg) = (
            NatConfig::from_settings(&a_set),
            NatConfig::from_settings(&b_set),
        );
        let a = QemuBackend::new(backend_config(&state_a, &a_set))
            .await
            .unwrap();
        let b = QemuBackend::new(backend_config(&state_b, &b_set))
            .await
            .unwrap();

        // A third agent asking for a subnet inside A's is refused before it creates
        // anything, and the message names what is in the way.
        let c_set = settings("10.213.0.0/25", "vzk-c", &[]);
        let err = QemuBackend::new(backend_config(&state_c, &c_set))
            .await
            .err()
            .map(|e| chain(&e))
            .unwrap_or_default();
        assert!(
            err.contains("10.213.0.0/25") && err.contains("vzkbr0") && err.contains("--nat-subnet"),
            "{err}"
        );
        assert!(
            !link::exists("vzk-c").await,
            "a refused network creates no bridge"
        );

        // Each network its own bridge address, table and dnsmasq.
        let pid_a = a.nat().and_then(|n| n.dnsmasq_pid()).unwrap();
        let pid_b = b.nat().and_then(|n| n.dnsmasq_pid()).unwrap();
        assert_ne!(pid_a, pid_b);
        assert!(
            ip_out(&["-4", "-o", "addr", "show", "dev", "vzkbr0"])
                .await
                .contains("10.213.0.1/24")
        );
        assert!(
            ip_out(&["-4", "-o", "addr", "show", "dev", "vzk-b"])
                .await
                .contains("192.168.77.1/28")
        );
        let table_b = nft_table(&b_cfg.nft_table()).await.unwrap();
        assert!(table_b.contains("192.168.77.0/28"), "{table_b}");
        assert!(
            nft_table(&a_cfg.nft_table())
                .await
                .unwrap()
                .contains("10.213.0.0/24")
        );

        // One VM on each, both called "vm": their TAPs differ (scoped by state dir).
        let va = a
            .create(guest_spec("vm", &state_a, NetworkAttachment::Nat, ""))
            .await
            .unwrap();
        let vb = b
            .create(guest_spec("vm", &state_b, NetworkAttachment::Nat, ""))
            .await
            .unwrap();
        va.start().await.unwrap();
        vb.start().await.unwrap();
        let (ip_a, ip_b) = tokio::join!(
            wait_for_ip(va.as_ref(), BOOT),
            wait_for_ip(vb.as_ref(), BOOT)
        );
        let (ip_a, ip_b) = (ip_a.unwrap(), ip_b.unwrap());
        eprintln!("VM on A: {ip_a}, VM on B: {ip_b}");
        let within = |ip: Ipv4Addr, (lo, hi): (Ipv4Addr, Ipv4Addr)| (lo..=hi).contains(&ip);
        assert!(within(ip_a, a_set.subnet.dhcp_range()), "{ip_a}");
        assert!(within(ip_b, b_set.subnet.dhcp_range()), "{ip_b}");
        let tap = |state: &Path| {
            vzk_vm::qemu::statedir::StateDir::new(state, "vm")
                .read_taps()
                .first()
                .cloned()
                .unwrap()
        };
        let (tap_a, tap_b) = (tap(&state_a), tap(&state_b));
        assert_ne!(tap_a, tap_b);
        assert!(
            ip_out(&["-o", "link", "show", "master", "vzkbr0"])
                .await
                .contains(&tap_a)
        );
        assert!(
            ip_out(&["-o", "link", "show", "master", "vzk-b"])
                .await
                .contains(&tap_b)
        );

        // B's guest got B's gateway and DNS servers.
        wait_ssh(ip_b, BOOT).await;
        let out = ssh(ip_b, "ip route show default; cat /etc/resolv.conf").await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("via 192.168.77.1"), "{text}");
        assert!(
            text.contains("nameserver 192.168.77.1\nnameserver 10.213.0.1"),
            "{text}"
        );

        // Tear A down: its VM, its agent (dnsmasq goes with the backend), its network.
        va.force_stop().await.unwrap();
        va.remove().await.unwrap();
        drop(va);
        drop(a);
        NatNetwork::remove(&a_cfg, &state_a.join("nat"))
            .await
            .unwrap();
        assert!(!link::exists("vzkbr0").await, "A's bridge removed");
        assert!(
            nft_table(&a_cfg.nft_table()).await.is_none(),
            "A's table removed"
        );
        for _ in 0..50 {
            if !alive(pid_a) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid_a), "A's dnsmasq stopped");

        // B is untouched: bridge and address, table, dnsmasq, and its VM answers and
        // renews its lease from B's dnsmasq.
        assert!(
            ip_out(&["-4", "-o", "addr", "show", "dev", "vzk-b"])
                .await
                .contains("192.168.77.1/28")
        );
        assert_eq!(
            nft_table(&b_cfg.nft_table()).await.as_deref(),
            Some(table_b.as_str())
        );
        assert!(alive(pid_b), "B's dnsmasq runs");
        assert_eq!(b.nat().map(NatNetwork::health), Some(Ok(())));
        let renew = ssh(ip_b, "udhcpc -n -q -i eth0 -s /bin/true -t 5 -T 1 -A 1").await;
        assert!(renew.status.success(), "{renew:?}");
        assert!(
            ip_out(&["-o", "link", "show", "master", "vzk-b"])
                .await
                .contains(&tap_b)
        );

        vb.force_stop().await.unwrap();
        vb.remove().await.unwrap();
    });
}
