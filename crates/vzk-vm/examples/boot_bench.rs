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
//!
//! A second table splits the agent's own cost, in milliseconds (the guest's boot is not
//! in it): `backend` (`QemuBackend::new`: probe, NAT bridge, nft, dnsmasq; once per agent,
//! shown on run 0), then per VM from `QemuBackend::start_timings`: `create` (state dir),
//! `plug` (TAPs on the bridge), `spawn` (fork/exec), `qmp` (QEMU start-up to a negotiated
//! QMP), `run` (query-status), `start` (all of `start()`), and `ip lag`: the IP known
//! minus dnsmasq's lease-file write for that ACK.
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

    use vzk_vm::qemu::{AccelChoice, QemuBackend, QemuConfig, StartTimings};
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

    #[derive(Debug, Clone, Copy)]
    struct Agent {
        create: f64,
        t: StartTimings,
        ip_lag: f64,
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
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
        let (backend_ms, rows, agent) = ns.run(move || async move {
            let config = QemuConfig {
                accel: AccelChoice::Auto,
                ..QemuConfig::new(&state_path)
            };
            let b0 = Instant::now();
            let backend = QemuBackend::new(config).await.expect("backend");
            let backend_ms = ms(b0.elapsed());
            eprintln!("accelerator: {}", backend.accel().as_str());
            let leases = state_path.join("nat/dnsmasq.leases");
            let mut rows = Vec::new();
            let mut agent = Vec::new();
            for i in 0..runs {
                let spec = support::guest_spec(
                    &format!("bench-{i}"),
                    &state_path,
                    NetworkAttachment::Nat,
                    "",
                );
                let console = spec.console_log.clone().expect("console");
                let c0 = Instant::now();
                let vm = backend.create(spec).await.expect("create");
                let create = ms(c0.elapsed());
                let t0 = Instant::now();
                vm.start().await.expect("start");
                wait_for_state(vm.as_ref(), TIMEOUT, "running", |s| *s == VmState::Running)
                    .await
                    .expect("running");
                let running = t0.elapsed();
                let ip_fut = async {
                    let ip = wait_for_ip(vm.as_ref(), TIMEOUT).await.expect("ip");
                    let known = std::time::SystemTime::now();
                    let acked = std::fs::metadata(&leases).and_then(|m| m.modified());
                    let lag = acked
                        .ok()
                        .and_then(|a| known.duration_since(a).ok())
                        .map_or(f64::NAN, ms);
                    (ip, t0.elapsed(), lag)
                };
                let sshd_fut = async {
                    support::wait_file_contains(&console, "VZK-SSHD-START", TIMEOUT).await;
                    t0.elapsed()
                };
                let ((ip, t_ip, ip_lag), t_sshd) = tokio::join!(ip_fut, sshd_fut);
                agent.push(Agent {
                    create,
                    t: backend.start_timings(vm.id()).expect("timings"),
                    ip_lag,
                });
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
            (backend_ms, rows, agent)
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
        println!();
        println!("| run | backend | create | plug | spawn | qmp | run | start | ip lag |");
        println!("|----:|--------:|-------:|-----:|------:|----:|----:|------:|-------:|");
        for (i, a) in agent.iter().enumerate() {
            let backend = if i == 0 {
                format!("{backend_ms:.0}")
            } else {
                "-".into()
            };
            println!(
                "| {i} | {backend} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                a.create,
                ms(a.t.plug_nics),
                ms(a.t.spawn),
                ms(a.t.qmp_connect),
                ms(a.t.running),
                ms(a.t.total),
                a.ip_lag
            );
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "(milliseconds; load average {})",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}
