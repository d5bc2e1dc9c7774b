//! This host's hypervisor backend, chosen once by the binary and handed to the provider
//! as an `Arc<dyn Hypervisor>`: QEMU on Linux (KVM when it really works, else TCG; the
//! VMs optionally in a network namespace of their own), Apple's Virtualization.framework
//! on macOS. Nothing downstream names a backend.
//!
//! [`BackendArgs`] are the backend's flags, flattened into `vz-kubelet run`; [`open`]
//! builds the backend from them under the agent's data directory.
//!
//! # One host process per VM on macOS
//! Virtualization.framework runs a VM inside the process that created it, so on macOS
//! [`open`] returns [`vzk_vm::hosted::Hosted`]: every VM runs in a host process of its
//! own, this very binary's hidden `vm host` subcommand ([`host_args`]), which opens
//! [`open_in_process`] (the framework in-process) and serves the VM on a socket under
//! `<state dir>/hosts/` ([`hosts_dir`]). The agent can then restart (upgrade, crash)
//! without killing its VMs, re-adopting them on start, and a crash inside the framework
//! takes down one VM. On Linux [`open`] is [`open_in_process`]: QEMU VMs are processes of
//! their own already and outlive the agent.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vzk_vm::{Hypervisor, HypervisorError, ProbeReport};

/// Flags of the hypervisor backend.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// Run the VMs (their NAT network, TAP devices, hypervisor processes and the guests'
    /// SSH connections) inside this existing network namespace (`ip netns` name).
    /// Default: the agent's own. Linux only.
    #[arg(long, env = "VZK_VM_NETNS", global = true)]
    pub vm_netns: Option<String>,
    /// QEMU system emulator binary (Linux).
    #[arg(
        long,
        env = "VZK_QEMU",
        default_value = "qemu-system-x86_64",
        global = true
    )]
    pub qemu: PathBuf,
    /// Accelerator (Linux): `auto` uses KVM only when it really works (a probe VM boots to
    /// long mode), else TCG; `kvm` or `tcg` force one.
    #[arg(long, env = "VZK_ACCEL", default_value = "auto", value_parser = ["auto", "kvm", "tcg"], global = true)]
    pub accel: String,
    /// Give every macOS VM a new machine identifier instead of its image's (as Tart's
    /// `--random-serial`), so clones do not look like one machine to iCloud or MDM. macOS.
    #[arg(long, env = "VZK_FRESH_MACHINE_IDENTIFIER", global = true)]
    pub fresh_machine_identifier: bool,
    /// Set up no NAT network: bridged NICs only (Linux; the NAT network is a bridge,
    /// dnsmasq and masquerade rules the backend owns).
    #[arg(long, env = "VZK_NO_NAT", global = true)]
    pub no_nat: bool,
}

impl Default for BackendArgs {
    fn default() -> Self {
        Self {
            vm_netns: None,
            qemu: "qemu-system-x86_64".into(),
            accel: "auto".into(),
            fresh_machine_identifier: false,
            no_nat: false,
        }
    }
}

/// Where the VM host processes keep their files (sockets, state files, logs) under the
/// backend's state dir.
pub fn hosts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("hosts")
}

/// The arguments that make this binary a VM host process for this backend:
/// `vm host --state-dir DIR` and every backend flag that is set (the host then adds
/// `--dir` and `--spec`).
pub fn host_args(args: &BackendArgs, state_dir: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec![
        "vm".into(),
        "host".into(),
        "--state-dir".into(),
        state_dir.into(),
        "--qemu".into(),
        args.qemu.clone().into(),
        "--accel".into(),
        args.accel.clone().into(),
    ];
    if let Some(ns) = &args.vm_netns {
        out.extend(["--vm-netns".into(), ns.into()]);
    }
    if args.fresh_machine_identifier {
        out.push("--fresh-machine-identifier".into());
    }
    if args.no_nat {
        out.push("--no-nat".into());
    }
    out
}

/// Opens this host's backend with its state under `state_dir` (the agent's data dir
/// `qemu/` on Linux): QEMU, whose VMs are processes of their own.
#[cfg(target_os = "linux")]
pub async fn open(
    args: &BackendArgs,
    state_dir: &Path,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    open_in_process(args, state_dir).await
}

/// The backend that runs VMs from this process: QEMU (each VM a child process).
#[cfg(target_os = "linux")]
pub async fn open_in_process(
    args: &BackendArgs,
    state_dir: &Path,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    use vzk_vm::qemu::{Accel, AccelChoice, QemuConfig};
    let config = QemuConfig {
        binary: args.qemu.clone(),
        accel: match args.accel.as_str() {
            "kvm" => AccelChoice::Force(Accel::Kvm),
            "tcg" => AccelChoice::Force(Accel::Tcg),
            _ => AccelChoice::Auto,
        },
        netns: args.vm_netns.clone(),
        ..QemuConfig::new(state_dir)
    };
    let config = QemuConfig {
        nat: if args.no_nat { None } else { config.nat },
        ..config
    };
    vzk_vm::qemu::open(config).await
}

/// Whether this host's backend can run VMs, and why not.
#[cfg(target_os = "linux")]
pub async fn probe(args: &BackendArgs) -> ProbeReport {
    vzk_vm::qemu::QemuBackend::probe(&args.qemu).await
}

/// Whether this host's backend can run VMs, and why not.
#[cfg(target_os = "macos")]
pub async fn probe(_args: &BackendArgs) -> ProbeReport {
    vzk_vz::macos::VzHypervisor::probe()
}

/// No backend exists for this operating system.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub async fn probe(_args: &BackendArgs) -> ProbeReport {
    ProbeReport {
        backend: vzk_vm::BackendKind::Qemu,
        available: false,
        detail: "no VM backend for this operating system".into(),
    }
}

/// Opens this host's backend: Virtualization.framework, each VM in a host process of
/// its own (see the crate docs) whose files live in [`hosts_dir`].
#[cfg(target_os = "macos")]
pub async fn open(
    args: &BackendArgs,
    state_dir: &Path,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    let local = open_in_process(args, state_dir).await?;
    let launcher =
        vzk_vm::hosted::Launcher::current_exe(host_args(args, state_dir)).map_err(|e| {
            HypervisorError::Unavailable {
                backend: vzk_vm::BackendKind::Vz,
                detail: format!("cannot find this executable to start VM host processes: {e}"),
            }
        })?;
    let hosted = vzk_vm::hosted::Hosted::new(local, hosts_dir(state_dir), launcher)?;
    Ok(Arc::new(hosted))
}

/// The backend that runs VMs inside this process: Virtualization.framework (what a VM
/// host process runs).
#[cfg(target_os = "macos")]
pub async fn open_in_process(
    args: &BackendArgs,
    state_dir: &Path,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    let _ = state_dir;
    if args.vm_netns.is_some() {
        return Err(HypervisorError::Unsupported {
            backend: vzk_vm::BackendKind::Vz,
            feature: "--vm-netns (network namespaces are Linux only)".into(),
        });
    }
    let options = vzk_vz::config::VzOptions {
        fresh_machine_identifier: args.fresh_machine_identifier,
        linux_display: None,
    };
    Ok(Arc::new(vzk_vz::macos::VzHypervisor::new(options)?))
}

/// No backend exists for this operating system.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub async fn open(
    args: &BackendArgs,
    state_dir: &Path,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    open_in_process(args, state_dir).await
}

/// No backend exists for this operating system.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub async fn open_in_process(
    _args: &BackendArgs,
    _state_dir: &Path,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    Err(HypervisorError::Unavailable {
        backend: vzk_vm::BackendKind::Qemu,
        detail: "vz-kubelet runs VMs on Linux (QEMU) and macOS (Virtualization.framework) only"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        backend: BackendArgs,
    }

    #[test]
    fn flags_parse_and_unknown_accelerators_are_refused() {
        // (The defaults come from VZK_* env vars too, which the test script sets: not asserted.)
        assert_eq!(BackendArgs::default().accel, "auto");
        assert!(Cli::try_parse_from(["x", "--accel", "hvf"]).is_err());
        let cli = Cli::try_parse_from(["x", "--vm-netns", "ns1", "--accel", "tcg"]).expect("flags");
        assert_eq!(cli.backend.vm_netns.as_deref(), Some("ns1"));
    }

    #[test]
    fn host_args_carry_the_flags_that_are_set() {
        let cli = Cli::try_parse_from(["x", "--fresh-machine-identifier", "--accel", "tcg"])
            .expect("flags");
        let args = host_args(&cli.backend, Path::new("/data/qemu"));
        let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(
            args,
            [
                "vm",
                "host",
                "--state-dir",
                "/data/qemu",
                "--qemu",
                "qemu-system-x86_64",
                "--accel",
                "tcg",
                "--fresh-machine-identifier"
            ]
        );
        // The host's own parser takes them back (as `vz-kubelet vm` flattens them).
        let back = Cli::try_parse_from(["x"].into_iter().chain(args[4..].iter().copied()))
            .expect("parse back");
        assert!(back.backend.fresh_machine_identifier);
        assert_eq!(back.backend.accel, "tcg");
        assert_eq!(hosts_dir(Path::new("/d")), Path::new("/d/hosts"));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_missing_namespace_is_a_clear_start_up_error() {
        let dir = std::env::temp_dir().join(format!("vzk-backend-{}", std::process::id()));
        let args = BackendArgs {
            vm_netns: Some("vzk-no-such-ns".into()),
            ..BackendArgs::default()
        };
        let err = open(&args, &dir).await.err().expect("must fail");
        let text = err.to_string();
        assert!(text.contains("vzk-no-such-ns"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
