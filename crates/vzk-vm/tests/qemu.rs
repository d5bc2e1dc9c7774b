//! The QEMU backend against real QEMU (TCG), real dnsmasq, real dropbear, each test in a
//! network namespace it creates. Needs root; the test guest is built (and cached) by
//! scripts/build-test-guest.sh on first use.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Netns, guest_spec, ssh, wait_file_contains, wait_ssh};
use vzk_vm::net::nat::NatConfig;
use vzk_vm::qemu::{Accel, AccelChoice, QemuBackend, QemuConfig};
use vzk_vm::{
    Hypervisor, NetworkAttachment, StopOutcome, Vm, VmState, stop_gracefully, wait_for_ip,
    wait_for_state,
};

const BOOT: Duration = Duration::from_secs(180);

fn nat_config(state: &std::path::Path) -> QemuConfig {
    QemuConfig {
        nat: Some(NatConfig {
            bridge: "vzkbr0".into(),
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            prefix_len: 24,
            dhcp_range: (
                Ipv4Addr::new(10, 213, 0, 10),
                Ipv4Addr::new(10, 213, 0, 250),
            ),
            ..NatConfig::default()
        }),
        ..QemuConfig::new(state)
    }
}

fn in_range(ip: Ipv4Addr, lo: Ipv4Addr, hi: Ipv4Addr) -> bool {
    (u32::from(lo)..=u32::from(hi)).contains(&u32::from(ip))
}

#[test]
fn probe_finds_qemu_and_a_working_accelerator() {
    let ns = Netns::new();
    ns.run(|| async {
        let report = QemuBackend::probe("qemu-system-x86_64".as_ref()).await;
        assert!(report.available, "{report:?}");
        assert!(
            report.detail.contains("QEMU emulator version"),
            "{report:?}"
        );
        // Whatever KVM does here, TCG must pass the same firmware probe the KVM check uses.
        let tcg = vzk_vm::qemu::probe::firmware_boots(
            "qemu-system-x86_64".as_ref(),
            Accel::Tcg,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert!(tcg, "SeaBIOS under TCG must reach its boot stage");
        let missing = QemuBackend::probe("/nonexistent/qemu".as_ref()).await;
        assert!(!missing.available);
    });
}

/// The KVM probe's payload is proven right under TCG (it must print every stage and the
/// marker); under KVM the verdict is whatever this host gives, but the probe returns.
#[test]
fn kvm_probe_payload_reaches_long_mode_under_tcg_and_the_kvm_verdict_returns() {
    use vzk_vm::qemu::probe::{PROBE_MARKER, payload_runs};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let qemu: &std::path::Path = "qemu-system-x86_64".as_ref();
        let tcg = payload_runs(qemu, Accel::Tcg, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(tcg.works, "{tcg:?}");
        assert_eq!(tcg.progress, format!("RPLG{PROBE_MARKER}"), "{tcg:?}");
        assert!(tcg.detail.is_empty(), "{tcg:?}");

        // A hang guard, not a timing assertion: the probe must come back on its own.
        let kvm = tokio::time::timeout(
            Duration::from_secs(120),
            payload_runs(qemu, Accel::Kvm, vzk_vm::qemu::probe::KVM_PROBE_TIMEOUT),
        )
        .await
        .expect("the KVM probe must not hang past its time limit")
        .unwrap();
        eprintln!("KVM verdict on this host: {kvm:?}");
        if kvm.works {
            assert_eq!(kvm.progress, format!("RPLG{PROBE_MARKER}"));
        } else {
            assert!(!kvm.progress.contains(PROBE_MARKER), "{kvm:?}");
            assert!(!kvm.detail.is_empty(), "a failed verdict says why: {kvm:?}");
        }

        // The backend caches the verdict for this boot in its state dir.
        let state = tempfile::tempdir().unwrap();
        let file = state.path().join("kvm-probe.json");
        let kvm_cached = vzk_vm::qemu::probe::kvm_works_cached(qemu, &file)
            .await
            .unwrap();
        let cached: vzk_vm::qemu::probe::CachedVerdict =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(cached.kvm, kvm_cached);
        assert_eq!(cached.kvm, kvm.works, "the cached verdict is the probe's");
        assert_eq!(Some(cached.boot_id), vzk_vm::qemu::probe::boot_id());
    });
}

/// Boot on `nat`, find the IP from DHCP, SSH in, re-adopt from a fresh backend (agent
/// restart), SSH again, then stop gracefully within the grace period.
#[test]
fn nat_vm_boots_answers_ssh_survives_agent_restart_and_stops_gracefully() {
    support::guest(); // built outside the namespace: the first build downloads the kernel
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().to_owned();
    ns.run(move || async move {
        let backend = QemuBackend::new(nat_config(&state_path)).await.unwrap();
        // Where nested KVM hangs guests, the probe must pick TCG; either way, the boot below
        // would time out if the probe had picked an accelerator that does not run guests.
        eprintln!("accelerator: {}", backend.accel().as_str());
        let mut spec = guest_spec("nat-vm", &state_path, NetworkAttachment::Nat, "");
        let share = state_path.join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("hello"), "from the host\n").unwrap();
        spec.shared_dirs.push(vzk_vm::SharedDirSpec { tag: "share".into(), host_path: share, read_only: true });
        let mac = spec.nics[0].mac;
        let vm = backend.create(spec).await.unwrap();
        assert!(matches!(
            backend
                .create(guest_spec(
                    "nat-vm",
                    &state_path,
                    NetworkAttachment::Nat,
                    ""
                ))
                .await,
            Err(vzk_vm::HypervisorError::AlreadyExists { .. })
        ));
        let t0 = Instant::now();
        vm.start().await.unwrap();
        wait_for_state(vm.as_ref(), Duration::from_secs(30), "running", |s| {
            *s == VmState::Running
        })
        .await
        .unwrap();
        let ip = wait_for_ip(vm.as_ref(), BOOT).await.unwrap();
        let t_ip = t0.elapsed();
        assert!(
            in_range(
                ip,
                Ipv4Addr::new(10, 213, 0, 10),
                Ipv4Addr::new(10, 213, 0, 250)
            ),
            "{ip}"
        );
        // The lease dnsmasq granted is the address we found.
        let lease_file = state_path.join("nat/dnsmasq.leases");
        wait_file_contains(&lease_file, &mac.to_string(), Duration::from_secs(10)).await;
        let leases = std::fs::read_to_string(&lease_file).unwrap();
        assert!(
            leases
                .lines()
                .any(|l| l.contains(&mac.to_string()) && l.contains(&ip.to_string())),
            "{leases}"
        );
        wait_ssh(ip, BOOT).await;
        eprintln!("nat: IP {ip} after {t_ip:?}, SSH after {:?}", t0.elapsed());

        let out = ssh(ip, "uname -a; echo to-stderr >&2").await;
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Linux vzk-test-guest"), "{stdout}");
        assert!(
            !stdout.contains("to-stderr"),
            "stderr must stay apart: {stdout}"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
        assert_eq!(ssh(ip, "sh -c 'exit 7'").await.status.code(), Some(7));
        // The guest sees its virtio-blk disk (16 MiB = 32768 sectors).
        let size = ssh(ip, "cat /sys/block/vda/size").await;
        assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "32768");

        // The shared directory (virtio-9p), read-only.
        let out = ssh(ip, "mkdir -p /mnt/s && mount -t 9p -o trans=virtio,version=9p2000.L share /mnt/s && cat /mnt/s/hello && ! touch /mnt/s/new").await;
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "from the host\n");

        // Agent restart: drop every handle (QEMU keeps running), start a new backend.
        let pid = std::fs::read_to_string(state_path.join("vms/nat-vm/qemu.pid")).unwrap();
        drop(vm);
        drop(backend);
        let backend = QemuBackend::new(nat_config(&state_path)).await.unwrap();
        let adopted = backend.adopt_existing().await.unwrap();
        assert_eq!(adopted.len(), 1);
        let vm = adopted.into_iter().next().unwrap();
        assert_eq!(vm.id(), "nat-vm");
        assert_eq!(*vm.state().borrow(), VmState::Running);
        assert_eq!(
            *vm.ip_address().borrow(),
            Some(ip),
            "same IP after re-adoption"
        );
        assert_eq!(
            std::fs::read_to_string(state_path.join("vms/nat-vm/qemu.pid")).unwrap(),
            pid
        );
        let out = ssh(ip, "cat /proc/uptime").await;
        assert!(out.status.success(), "SSH after re-adoption: {out:?}");

        let t = Instant::now();
        let grace = Duration::from_secs(60);
        assert_eq!(
            stop_gracefully(vm.as_ref(), grace).await.unwrap(),
            StopOutcome::Graceful
        );
        assert_eq!(*vm.state().borrow(), VmState::Stopped);
        eprintln!("graceful stop took {:?}", t.elapsed());
        let console = std::fs::read_to_string(state_path.join("nat-vm.console.log")).unwrap();
        assert!(console.contains("power button pressed"), "{console}");
        vm.remove().await.unwrap();
        assert!(!state_path.join("vms/nat-vm").exists());
    });
}

/// A guest that ignores the power button is forced off after the grace period; a VM
/// whose QEMU is killed while no agent runs is re-adopted as Failed with a reason.
#[test]
fn force_stop_when_acpi_is_ignored_and_dead_vm_is_failed_on_adoption() {
    support::guest(); // built outside the namespace: the first build downloads the kernel
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().to_owned();
    ns.run(move || async move {
        let backend = QemuBackend::new(QemuConfig {
            accel: AccelChoice::Force(Accel::Tcg),
            ..nat_config(&state_path)
        })
        .await
        .unwrap();
        let spec = guest_spec(
            "deaf-vm",
            &state_path,
            NetworkAttachment::Nat,
            "vzk.ignore_acpi=1",
        );
        let console = spec.console_log.clone().unwrap();
        let vm = backend.create(spec).await.unwrap();
        vm.start().await.unwrap();
        wait_file_contains(&console, "ignoring the ACPI power button", BOOT).await;
        let t = Instant::now();
        assert_eq!(
            stop_gracefully(vm.as_ref(), Duration::from_secs(3))
                .await
                .unwrap(),
            StopOutcome::Forced
        );
        assert!(t.elapsed() >= Duration::from_secs(3));
        assert_eq!(*vm.state().borrow(), VmState::Stopped);
        vm.remove().await.unwrap();

        // A VM killed while the agent is away.
        let vm = backend
            .create(guest_spec(
                "doomed-vm",
                &state_path,
                NetworkAttachment::Nat,
                "",
            ))
            .await
            .unwrap();
        vm.start().await.unwrap();
        let pid: i32 = std::fs::read_to_string(state_path.join("vms/doomed-vm/qemu.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(vm);
        drop(backend);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Let the old child be reaped (it was our child; it must not count as alive).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let backend = QemuBackend::new(QemuConfig {
            accel: AccelChoice::Force(Accel::Tcg),
            ..nat_config(&state_path)
        })
        .await
        .unwrap();
        let adopted = backend.adopt_existing().await.unwrap();
        assert_eq!(adopted.len(), 1);
        let state = adopted[0].state().borrow().clone();
        match state {
            VmState::Failed { reason } => assert!(
                reason.contains("exited while the agent was not running"),
                "{reason}"
            ),
            other => panic!("expected Failed, got {other:?}"),
        }
        adopted[0].remove().await.unwrap();
    });
}

/// `bridged`: the TAP joins an existing bridge served by its own DHCP server; the VM gets
/// that network's lease and we find it by sniffing.
#[test]
fn bridged_vm_gets_the_networks_lease_found_by_sniffing() {
    support::guest(); // built outside the namespace: the first build downloads the kernel
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().to_owned();
    ns.run(move || async move {
        support::run(&[
            "ip",
            "link",
            "add",
            "lan0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        support::run(&["ip", "addr", "add", "192.168.77.1/24", "dev", "lan0"]);
        support::run(&["ip", "link", "set", "lan0", "up"]);
        let leases = state_path.join("lan.leases");
        let mut dnsmasq = tokio::process::Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",
                "--port=0",
                "--bind-interfaces",
            ])
            .args([
                "--interface=lan0",
                "--except-interface=lo",
                "--dhcp-range=192.168.77.50,192.168.77.60,255.255.255.0,600s",
            ])
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .args(["--user=root", "--log-facility=-"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let backend = QemuBackend::new(QemuConfig {
            nat: None,
            accel: AccelChoice::Force(Accel::Tcg),
            ..QemuConfig::new(&state_path)
        })
        .await
        .unwrap();
        assert!(!backend.capabilities().nat && backend.capabilities().bridged);
        let attachment = NetworkAttachment::Bridged {
            interface: "lan0".into(),
        };
        let spec = guest_spec("lan-vm", &state_path, attachment, "");
        let mac = spec.nics[0].mac;
        let vm: Arc<dyn Vm> = backend.create(spec).await.unwrap();
        vm.start().await.unwrap();
        let ip = wait_for_ip(vm.as_ref(), BOOT).await.unwrap();
        assert!(
            in_range(
                ip,
                Ipv4Addr::new(192, 168, 77, 50),
                Ipv4Addr::new(192, 168, 77, 60)
            ),
            "{ip}"
        );
        // Discovery reported the lease the network's own server granted (we see the ACK
        // on the wire before dnsmasq writes its lease file, hence the wait).
        wait_file_contains(&leases, &mac.to_string(), Duration::from_secs(10)).await;
        let text = std::fs::read_to_string(&leases).unwrap_or_default();
        assert!(
            text.lines()
                .any(|l| l.contains(&mac.to_string()) && l.contains(&ip.to_string())),
            "{text}"
        );
        wait_ssh(ip, BOOT).await;
        let out = ssh(ip, "ip -4 addr show eth0").await;
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("{ip}/24")),
            "{out:?}"
        );
        assert_eq!(
            stop_gracefully(vm.as_ref(), Duration::ZERO).await.unwrap(),
            StopOutcome::Forced
        );
        assert_eq!(*vm.state().borrow(), VmState::Stopped);
        vm.remove().await.unwrap();
        let _ = dnsmasq.kill().await;
    });
}
