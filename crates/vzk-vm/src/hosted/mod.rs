//! One VM host process per VM: the VM runs in a small process of its own (as Tart runs
//! one process per VM) instead of inside the agent, so an agent restart (upgrade, crash)
//! leaves the VM running and a crash of the hypervisor library takes down one VM, not
//! the node. Generic over the backend: the host process runs any in-process
//! [`Hypervisor`] (Virtualization.framework on macOS, where this is wired by
//! `vzk-backend`; a fake in tests; QEMU works too).
//!
//! * [`client::Hosted`]: the agent's [`Hypervisor`]. [`Hypervisor::create`] spawns
//!   `<program> <args…> --dir D --spec FILE` (normally `vz-kubelet vm host …`, see
//!   [`client::Launcher`]), waits until its socket answers and returns a [`Vm`] proxy;
//!   [`Hypervisor::adopt_existing`] re-attaches to the host processes left running in `D`
//!   and reports dead ones as [`VmState::Failed`] (removing their files).
//! * [`server::serve`]: the host process. It detaches from the agent (new session, stdio
//!   to its log file), creates the VM with the inner backend, writes its state file and
//!   answers on its socket until the VM has been removed (or SIGTERM: force-stop, remove).
//! * [`protocol`]: the wire format (versioned hello; JSON lines).
//! * [`files`]: the files of a hosted VM ([`VmFiles`]) and the formats of the state and
//!   error files.
//! * [`fake`]: an in-memory backend for tests of this machinery.
//!
//! # Files
//! All of a VM's files sit in the hosts directory `D` (mode 0700), named by the VM id:
//!
//! | file | written by | content |
//! |---|---|---|
//! | `<id>.spec.json` | agent, before spawning | the [`VmSpec`] (`--spec`) |
//! | `<id>.log` | host (stdout, stderr) | the host's log |
//! | `<id>.sock` | host | the Unix socket of [`protocol`] |
//! | `<id>.state.json` | host, once it answers | [`StateFile`]: pid, socket, spec |
//! | `<id>.error.json` | host, when creating failed | [`CreateFailure`] |
//!
//! A VM is live when its state file exists and its socket answers the hello. The host
//! removes everything when the VM is removed; the agent removes the files of dead hosts.
//!
//! # Guest connections and usage
//! Guest TCP connections are opened by the agent directly ([`Vm::connect`]'s default: a
//! macOS VM's address is reachable from the host). [`Vm::host_usage`] of a proxy is what
//! the host process reads about itself (CPU time, RSS) plus what the inner backend
//! reports for the VM (e.g. a QEMU child); on macOS the guest's memory lives in
//! Virtualization.framework's own XPC service process, which neither figure includes.
//!
//! # Tests
//! The unit tests (`cargo test -p vzk-vm --lib hosted`) run hosts in-process with the
//! [`fake`] backend: garbage frames, the hello, events, removal, SIGTERM-style shutdown,
//! hosts that vanish, misbehave or speak another version, launchers that fail. In
//! `vz-kubelet`, `tests/hosted.rs` spawns the real `vz-kubelet vm --fake-backend host`
//! processes (client restart, SIGKILLed agent process group, SIGKILLed host) and
//! `tests/hosted_qemu.rs` runs QEMU behind a host process (Linux, root, test guest).

pub mod client;
mod connection;
pub mod fake;
pub mod files;
pub mod protocol;
mod proxy;
pub mod server;

use std::io;
use std::path::Path;

pub use client::{Hosted, HostedError, Launcher};
pub use files::{CreateFailure, FilesError, StateFile, VmFiles};
pub use proxy::HostedVm;
pub use server::{HostError, serve};

use crate::hypervisor::HostUsage;
#[cfg(doc)]
use crate::hypervisor::{Hypervisor, Vm, VmState};
use crate::spec::VmSpec;

/// Reads the spec file a host process is started with (`--spec`).
pub fn read_spec_file(path: &Path) -> io::Result<VmSpec> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a VM spec: {e}", path.display()),
        )
    })
}

/// This process's CPU time (user + system) and resident set size.
///
/// Linux: `/proc/self`. Elsewhere the `sysinfo` crate (on macOS `proc_pidinfo`: the current
/// resident size, not getrusage's peak). On macOS this is the host process only: the guest's
/// memory lives in Virtualization.framework's XPC service process, which no public API
/// ties to the process that started it.
pub fn own_usage() -> Option<HostUsage> {
    #[cfg(target_os = "linux")]
    {
        crate::procinfo::usage(i32::try_from(std::process::id()).ok()?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
        let pid = Pid::from_u32(std::process::id());
        let mut sys = System::new().ok()?;
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let p = sys.process(pid)?;
        Some(HostUsage {
            // accumulated_cpu_time is in milliseconds.
            cpu_ns: p.accumulated_cpu_time().saturating_mul(1_000_000),
            rss_bytes: p.memory(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_reads_this_process() {
        let u = own_usage().expect("usage");
        assert!(u.rss_bytes > 1 << 20, "{u:?}");
    }
}
