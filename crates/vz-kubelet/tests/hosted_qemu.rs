//! The real QEMU backend behind a VM host process (`vz-kubelet vm host`), proving the
//! host-process machinery is generic: the host runs QEMU (its NAT network, dnsmasq, the
//! IP discovery) in-process; the agent side only talks to the host's socket and dials
//! the guest's SSH directly. Boot → IP → SSH; the client dropped and a new one adopts the
//! VM (same IP, SSH again); graceful stop → the host exits, its files are gone.
//!
//! Like vzk-vm's QEMU tests (whose support module this reuses): Linux, root, QEMU,
//! dnsmasq, dropbear; the test guest is built and cached by scripts/build-test-guest.sh.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

#[path = "../../vzk-vm/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Netns, guest_spec, ssh};
use vzk_vm::hosted::fake::FakeHypervisor;
use vzk_vm::hosted::{Hosted, Launcher, VmFiles};
use vzk_vm::{Hypervisor, NetworkAttachment, StopOutcome, VmState, stop_gracefully, wait_for_ip};

const BOOT: Duration = Duration::from_secs(180);
const BIN: &str = env!("CARGO_BIN_EXE_vz-kubelet");

/// The agent side: capabilities from the fake backend (generous; QEMU in the host checks
/// the spec itself), hosts running `vz-kubelet vm host` with QEMU.
fn backend(hosts: &std::path::Path, qemu_state: &std::path::Path) -> Hosted {
    let launcher = Launcher::new(
        BIN,
        [
            "vm".as_ref(),
            "--state-dir".as_ref(),
            qemu_state.as_os_str(),
            "host".as_ref(),
        ],
    );
    Hosted::new(Arc::new(FakeHypervisor::new()), hosts, launcher)
        .unwrap()
        .with_start_timeout(BOOT)
}

async fn ssh_ok(ip: std::net::Ipv4Addr) -> String {
    let out = ssh(ip, "cat /proc/sys/kernel/hostname").await;
    assert!(
        out.status.success(),
        "ssh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn qemu_runs_behind_a_host_process_and_survives_its_client() {
    support::guest(); // built outside the namespace: the first build downloads the kernel
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().to_owned();
    ns.run(move || async move {
        let hosts = root.join("hosts");
        let qemu_state = root.join("qemu");
        let spec = guest_spec("hq", &root, NetworkAttachment::Nat, "");

        let hv = backend(&hosts, &qemu_state);
        let vm = match hv.create(spec).await {
            Ok(vm) => vm,
            Err(e) => panic!(
                "create: {e:?}; host log: {:?}",
                std::fs::read_to_string(hosts.join("hq.log"))
            ),
        };
        vm.start().await.unwrap();
        let ip = wait_for_ip(vm.as_ref(), BOOT).await.unwrap();
        assert_eq!(*vm.state().borrow(), VmState::Running);
        let name = ssh_ok(ip).await;
        assert!(!name.is_empty());
        // The host reports QEMU's usage (the inner backend's) with its own.
        let mut usage = None;
        for _ in 0..100 {
            usage = vm.host_usage();
            if usage.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let usage = usage.unwrap();
        assert!(usage.rss_bytes > 64 << 20, "{usage:?}");
        assert!(usage.cpu_ns > 0, "{usage:?}");
        let console = vm.console_log().unwrap();
        assert!(console.starts_with(&root), "{}", console.display());

        // The agent restarts: a new client adopts the running VM.
        drop(vm);
        drop(hv);
        let hv = backend(&hosts, &qemu_state);
        let vms = hv.adopt_existing().await.unwrap();
        assert_eq!(vms.len(), 1);
        let vm = vms[0].clone();
        assert_eq!(*vm.state().borrow(), VmState::Running);
        assert_eq!(*vm.ip_address().borrow(), Some(ip));
        assert_eq!(ssh_ok(ip).await, name);

        let outcome = stop_gracefully(vm.as_ref(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::Graceful);
        vm.remove().await.unwrap();
        let files = VmFiles::new(&hosts, "hq").unwrap();
        assert!(!files.state.exists() && !files.socket.exists());
        // QEMU's own state dir for the VM is gone too (the host removed the VM).
        assert!(!qemu_state.join("vms").join("hq").exists());
    });
}
