//! Start by restore against real QEMU (TCG), dnsmasq and dropbear, in a network namespace
//! of the test's own: a template VM is booted, saved once its guest answers SSH, and two
//! VMs are restored from it at the same time, each with its own MAC address, disk clone
//! and VM generation ID. Needs root; the test guest is built by
//! scripts/build-test-guest.sh on first use.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{Netns, guest_spec, ssh, wait_ssh};
use vzk_vm::net::nat::NatConfig;
use vzk_vm::qemu::{QemuBackend, QemuConfig};
use vzk_vm::{
    DiskFormat, Hypervisor, MacAddr, NetworkAttachment, SnapshotSpec, VmError, VmState,
    wait_for_ip, wait_for_state,
};

const BOOT: Duration = Duration::from_secs(180);

fn config(state: &Path) -> QemuConfig {
    QemuConfig {
        nat: Some(NatConfig {
            bridge: "vzkbr0".into(),
            gateway: Ipv4Addr::new(10, 214, 0, 1),
            prefix_len: 24,
            dhcp_range: (
                Ipv4Addr::new(10, 214, 0, 10),
                Ipv4Addr::new(10, 214, 0, 250),
            ),
            ..NatConfig::default()
        }),
        ..QemuConfig::new(state)
    }
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

fn sha256(path: &Path) -> String {
    support::run(&["sha256sum", path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

async fn generation_id(backend: &QemuBackend, id: &str) -> String {
    let qmp = backend.handle(id).unwrap().qmp().unwrap();
    let v = qmp.execute("query-vm-generation-id", None).await.unwrap();
    v["guid"].as_str().unwrap().to_owned()
}

#[test]
fn two_vms_restored_from_one_template_at_once_have_their_own_identity() {
    support::guest();
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_owned();
    ns.run(move || async move {
        let backend = QemuBackend::new(config(&dir)).await.unwrap();
        assert!(backend.capabilities().snapshots);

        // 1. The template: booted, SSH answers, a file left on its disk, saved.
        let state_file = dir.join("tmpl.state");
        let mut t = guest_spec("tmpl", &dir, NetworkAttachment::Nat, "");
        t.snapshot = Some(SnapshotSpec::Template {
            state: state_file.clone(),
        });
        let template_disk = t.disks[0].path.clone();
        let template_mac = t.nics[0].mac;
        let vm = backend.create(t).await.unwrap();
        let t0 = Instant::now();
        vm.start().await.unwrap();
        let ip = wait_for_ip(vm.as_ref(), BOOT).await.unwrap();
        wait_ssh(ip, BOOT).await;
        let boot = t0.elapsed();
        let out = ssh(ip, "echo template > /root/made-in; sync").await;
        assert!(out.status.success(), "{out:?}");
        let template_gen = generation_id(&backend, "tmpl").await;
        let t1 = Instant::now();
        vm.save_state().await.unwrap();
        eprintln!(
            "template: booted to SSH in {boot:?}, saved in {:?} ({} bytes)",
            t1.elapsed(),
            std::fs::metadata(&state_file).unwrap().len()
        );
        assert_eq!(*vm.state().borrow(), VmState::Stopped);
        vm.remove().await.unwrap();
        let template_sum = sha256(&template_disk);
        // A second save of a VM that is no template is refused, not attempted.
        let plain = backend
            .create(guest_spec("plain", &dir, NetworkAttachment::Nat, ""))
            .await
            .unwrap();
        assert!(matches!(
            plain.save_state().await,
            Err(VmError::InvalidState { .. })
        ));
        plain.remove().await.unwrap();

        // 2. Two restores at once, each on a qcow2 clone of the template's disk.
        let restore_spec = |id: &str| {
            let mut s = guest_spec(id, &dir, NetworkAttachment::Nat, "");
            let clone = dir.join(format!("{id}.clone.qcow2"));
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                template_disk.to_str().unwrap(),
                clone.to_str().unwrap(),
            ]);
            s.disks[0].path = clone;
            s.disks[0].format = DiskFormat::Qcow2;
            s.snapshot = Some(SnapshotSpec::Restore {
                state: state_file.clone(),
            });
            s
        };
        let (a, b) = (restore_spec("ra"), restore_spec("rb"));
        let (mac_a, mac_b): (MacAddr, MacAddr) = (a.nics[0].mac, b.nics[0].mac);
        let a = backend.create(a).await.unwrap();
        let b = backend.create(b).await.unwrap();
        let t2 = Instant::now();
        let (ra, rb) = tokio::join!(a.start(), b.start());
        ra.unwrap();
        rb.unwrap();
        let started = t2.elapsed();
        for vm in [&a, &b] {
            wait_for_state(vm.as_ref(), Duration::from_secs(10), "running", |s| {
                *s == VmState::Running
            })
            .await
            .unwrap();
        }
        let (ip_a, ip_b) = tokio::join!(
            wait_for_ip(a.as_ref(), Duration::from_secs(60)),
            wait_for_ip(b.as_ref(), Duration::from_secs(60))
        );
        let (ip_a, ip_b) = (ip_a.unwrap(), ip_b.unwrap());
        let to_ip = t2.elapsed();
        let (sa, sb) = tokio::join!(
            wait_ssh(ip_a, Duration::from_secs(60)),
            wait_ssh(ip_b, Duration::from_secs(60))
        );
        eprintln!(
            "restore: both started in {started:?}, addresses after {to_ip:?}, SSH after {:?} / {:?} \
             (timings a: {:?})",
            sa,
            sb,
            backend.start_timings("ra")
        );
        assert_ne!(ip_a, ip_b);
        assert_ne!(ip_a, ip);
        // Each guest has its own MAC, not the template's.
        for (ip, mac) in [(ip_a, mac_a), (ip_b, mac_b)] {
            let out = ssh(ip, "cat /sys/class/net/eth0/address; cat /root/made-in").await;
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(text, format!("{mac}\ntemplate\n"), "{out:?}");
            assert_ne!(mac, template_mac);
        }
        // The guest kept running from where the template stopped: no second boot.
        let log_a = std::fs::read_to_string(dir.join("ra.console.log")).unwrap();
        assert!(!log_a.contains("Linux version"), "{log_a}");
        // A new VM generation ID each (the guest kernel reseeds its RNG from it).
        let (ga, gb) = (generation_id(&backend, "ra").await, generation_id(&backend, "rb").await);
        assert_ne!(ga, gb);
        assert_ne!(ga, template_gen);
        // Writes stay in each VM's own clone.
        assert!(ssh(ip_a, "echo a > /root/only-a; sync").await.status.success());
        let out = ssh(ip_b, "test -e /root/only-a").await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        for vm in [a, b] {
            vm.force_stop().await.unwrap();
            vm.remove().await.unwrap();
        }
        assert_eq!(sha256(&template_disk), template_sum, "the template's disk is untouched");

        // 3. A state file that is not one fails the start with QEMU's reason.
        let bad = dir.join("bad.state");
        std::fs::write(&bad, b"not a migration stream").unwrap();
        let mut s = restore_spec("rbad");
        s.snapshot = Some(SnapshotSpec::Restore { state: bad });
        let vm = backend.create(s).await.unwrap();
        let err = vm.start().await.unwrap_err();
        let text = vzk_vm_error_chain(&err);
        assert!(text.contains("restoring"), "{text}");
        assert!(matches!(*vm.state().borrow(), VmState::Failed { .. }));
        vm.remove().await.unwrap();
    });
}

fn vzk_vm_error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s.push_str(": ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}
