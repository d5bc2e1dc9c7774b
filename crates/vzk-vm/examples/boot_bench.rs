//! Benchmark (not a test): time from `Vm::start` to SSH-ready for the test guest on the
//! `nat` network, split into the guest's own boot and our overhead.
//!
//! Run as root: `cargo run -p vzk-vm --example boot_bench [-- RUNS]` (default 3 runs).
//! Everything runs in a network namespace the benchmark creates.
//!
//! Columns (seconds since `start()` unless noted):
//! * `running`: QMP reports the VM running.
//! * `ip`: the guest's address discovered (its DHCP ACK / ARP seen on the TAP).
//! * `sshd`: the guest's init printed `VZK-SSHD-START` on the serial console.
//! * `uptime`: the guest's own `/proc/uptime` at that moment (its boot, kernel → sshd).
//! * `port`: TCP port 22 accepted a connection.
//! * `ssh`: the first SSH command (`dbclient ... true`) succeeded.
//! * `ours`: `port - max(ip, sshd)`: what we add after the guest is ready (IP discovery
//!   lag plus readiness polling).
//! * `handshake`: `ssh - port`: the SSH handshake and command, mostly guest-side crypto
//!   (and dropbear's first-connection host key generation) under emulation.
#![allow(clippy::unwrap_used)]

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("boot_bench needs the QEMU backend (Linux)");
}

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(target_os = "linux")]
#[path = "../tests/support/mod.rs"]
mod support;

#[cfg(target_os = "linux")]
mod linux {
    use super::support;

    use std::time::{Duration, Instant};

    use vzk_vm::qemu::{AccelChoice, QemuBackend, QemuConfig};
    use vzk_vm::{
        Hypervisor, NetworkAttachment, VmState, stop_gracefully, wait_for_ip, wait_for_state,
    };

    const TIMEOUT: Duration = Duration::from_secs(300);

    #[derive(Debug, Clone, Copy)]
    struct Row {
        running: f64,
        ip: f64,
        sshd: f64,
        uptime: f64,
        port: f64,
        ssh: f64,
    }

    pub(super) fn main() {
        let runs: usize = std::env::args()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(3);
        support::guest();
        let ns = support::Netns::new();
        let state = tempfile::tempdir().expect("tempdir");
        let state_path = state.path().to_owned();
        let rows = ns.run(move || async move {
            let config = QemuConfig {
                accel: AccelChoice::Auto,
                ..QemuConfig::new(&state_path)
            };
            let backend = QemuBackend::new(config).await.expect("backend");
            eprintln!("accelerator: {}", backend.accel().as_str());
            let mut rows = Vec::new();
            for i in 0..runs {
                let spec = support::guest_spec(
                    &format!("bench-{i}"),
                    &state_path,
                    NetworkAttachment::Nat,
                    "",
                );
                let console = spec.console_log.clone().expect("console");
                let vm = backend.create(spec).await.expect("create");
                let t0 = Instant::now();
                vm.start().await.expect("start");
                wait_for_state(vm.as_ref(), TIMEOUT, "running", |s| *s == VmState::Running)
                    .await
                    .expect("running");
                let running = t0.elapsed();
                let ip_fut = async {
                    let ip = wait_for_ip(vm.as_ref(), TIMEOUT).await.expect("ip");
                    (ip, t0.elapsed())
                };
                let sshd_fut = async {
                    support::wait_file_contains(&console, "VZK-SSHD-START", TIMEOUT).await;
                    t0.elapsed()
                };
                let ((ip, t_ip), t_sshd) = tokio::join!(ip_fut, sshd_fut);
                support::wait_port(ip, TIMEOUT).await;
                let t_port = t0.elapsed();
                support::wait_ssh(ip, TIMEOUT).await;
                let t_ssh = t0.elapsed();
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                let uptime = text
                    .lines()
                    .find_map(|l| l.split("VZK-SSHD-START uptime=").nth(1))
                    .and_then(|u| u.trim().parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                rows.push(Row {
                    running: running.as_secs_f64(),
                    ip: t_ip.as_secs_f64(),
                    sshd: t_sshd.as_secs_f64(),
                    uptime,
                    port: t_port.as_secs_f64(),
                    ssh: t_ssh.as_secs_f64(),
                });
                let _ = stop_gracefully(vm.as_ref(), Duration::ZERO).await;
                let _ = vm.remove().await;
            }
            rows
        });
        println!(
            "| run | running | ip | sshd (console) | guest uptime at sshd | port | ssh ready | ours | handshake |"
        );
        println!(
            "|----:|--------:|---:|---------------:|---------------------:|-----:|----------:|-----:|----------:|"
        );
        for (i, r) in rows.iter().enumerate() {
            println!(
                "| {i} | {:.3} | {:.3} | {:.3} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} |",
                r.running,
                r.ip,
                r.sshd,
                r.uptime,
                r.port,
                r.ssh,
                r.port - r.ip.max(r.sshd),
                r.ssh - r.port
            );
        }
    }
}
