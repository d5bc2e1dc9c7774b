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
//!
//! # The NAT network (QEMU hosts)
//! `--nat-subnet`, `--nat-bridge` and `--guest-dns` configure the network the QEMU
//! backend owns ([`vzk_vm::nat_settings`]: validation, the derived gateway and DHCP
//! range; `vzk_vm::net::nat`: the bridge, dnsmasq and nftables table). On macOS NAT is
//! Apple's: the flags are accepted, logged as ignored, and not passed to VM host
//! processes.
//!
//! # Several agents on one host
//! Every host-global name an agent uses derives from one of its own settings: the bridge
//! and the nftables table from `--nat-bridge`, TAP names and dnsmasq's pid and lease files
//! from the data dir, side-car containers from the node name. Two agents with their own
//! data dirs, node names, kubelet ports, bridges and subnets run side by side;
//! [`lock_data_dir`] refuses a second agent on the same data dir, and the NAT network
//! refuses a subnet that overlaps another interface's address (another agent's bridge).

use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vzk_vm::nat_settings::{
    DEFAULT_BRIDGE, DEFAULT_SUBNET, NatSettings, NatSubnet, parse_bridge_name,
};
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
    /// Subnet of the NAT network (QEMU hosts): a private range, prefix 16 to 29. The host
    /// takes the first address (the guests' gateway), DHCP hands out the rest. Refused at
    /// start-up if it overlaps an address on another interface.
    #[arg(long, env = "VZK_NAT_SUBNET", default_value = DEFAULT_SUBNET, global = true)]
    pub nat_subnet: NatSubnet,
    /// Bridge of the NAT network (QEMU hosts; created if missing, at most 15
    /// characters); also names its nftables table. Each agent on a host needs its own.
    #[arg(long, env = "VZK_NAT_BRIDGE", default_value = DEFAULT_BRIDGE, value_parser = parse_bridge_name, global = true)]
    pub nat_bridge: String,
    /// DNS server handed to guests by DHCP (QEMU hosts; repeatable, comma-separated in the
    /// env var). Default: the gateway, where the network's dnsmasq answers.
    #[arg(long = "guest-dns", env = "VZK_GUEST_DNS", value_delimiter = ',', value_parser = parse_dns, global = true)]
    pub guest_dns: Vec<Ipv4Addr>,
}

impl Default for BackendArgs {
    fn default() -> Self {
        let nat = NatSettings::default();
        Self {
            vm_netns: None,
            qemu: "qemu-system-x86_64".into(),
            accel: "auto".into(),
            fresh_machine_identifier: false,
            no_nat: false,
            nat_subnet: nat.subnet,
            nat_bridge: nat.bridge,
            guest_dns: nat.guest_dns,
        }
    }
}

impl BackendArgs {
    /// The NAT network these flags ask for.
    pub fn nat_settings(&self) -> NatSettings {
        NatSettings {
            subnet: self.nat_subnet,
            bridge: self.nat_bridge.clone(),
            guest_dns: self.guest_dns.clone(),
        }
    }
}

/// A DNS server for guests: a unicast IPv4 address.
fn parse_dns(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(format!("{ip} cannot be a DNS server"));
    }
    Ok(ip)
}

/// Why the data dir cannot be this agent's.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another agent holds it.
    #[error(
        "another vz-kubelet{holder} already runs with data dir {}: each agent on a host needs its own --data-dir (and its own --node-name, --kubelet-port, --nat-bridge and --nat-subnet)",
        dir.display()
    )]
    Held {
        /// The data dir.
        dir: PathBuf,
        /// ` (pid N)` when the lock file names it.
        holder: String,
    },
    /// The lock file could not be created or locked.
    #[error("locking {}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The exclusive lock on a data dir, held for as long as this value lives.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Makes `dir` this agent's: an exclusive `flock` on `dir/vz-kubelet.lock` (which then
/// holds the agent's pid), so a second agent on the same data dir is refused before it
/// touches the first one's VMs, NAT network or dnsmasq. The lock goes with the process
/// (a crash releases it); VMs and dnsmasq do not inherit it (the descriptor is
/// close-on-exec), so an agent restarted while they run gets it back.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, LockError> {
    let path = dir.join("vz-kubelet.lock");
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(LockError::Held {
                dir: dir.to_owned(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file, path })
}

/// Where the VM host processes keep their files (sockets, state files, logs) under the
/// backend's state dir.
pub fn hosts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("hosts")
}

/// The arguments that make this binary a VM host process for this backend:
/// `vm host --state-dir DIR` and every backend flag that is set (the host then adds
/// `--dir` and `--spec`). The NAT flags are not passed: host processes run on macOS,
/// where NAT is Apple's.
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
        nat: if args.no_nat {
            None
        } else {
            Some(vzk_vm::net::nat::NatConfig::from_settings(
                &args.nat_settings(),
            ))
        },
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
    if args.nat_settings() != NatSettings::default() {
        tracing::info!(
            nat_subnet = %args.nat_subnet,
            nat_bridge = %args.nat_bridge,
            guest_dns = ?args.guest_dns,
            "--nat-subnet, --nat-bridge and --guest-dns apply to QEMU hosts only: Virtualization.framework's NAT is Apple's; ignored"
        );
    }
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

    #[test]
    fn nat_flags_parse_validate_and_default_to_todays_network() {
        let parse = |argv: &[&str]| {
            Cli::try_parse_from(["x"].iter().chain(argv).copied()).map(|c| c.backend)
        };
        // (The defaults also come from VZK_NAT_* env vars, which the test script does not
        // set.)
        let d = BackendArgs::default().nat_settings();
        assert_eq!(d, NatSettings::default());
        assert_eq!(d.subnet.to_string(), "10.213.0.0/24");
        assert_eq!(d.bridge, "vzkbr0");
        let b = parse(&[
            "--nat-subnet",
            "192.168.77.0/28",
            "--nat-bridge",
            "vzk-b",
            "--guest-dns",
            "192.168.1.53",
            "--guest-dns",
            "9.9.9.9,1.1.1.1",
        ])
        .expect("valid NAT flags");
        let s = b.nat_settings();
        assert_eq!(s.subnet.to_string(), "192.168.77.0/28");
        assert_eq!(s.subnet.gateway().to_string(), "192.168.77.1");
        assert_eq!(s.bridge, "vzk-b");
        let dns: Vec<String> = s.guest_dns.iter().map(ToString::to_string).collect();
        assert_eq!(dns, ["192.168.1.53", "9.9.9.9", "1.1.1.1"]);
        // (flags, what the refusal says)
        let refused = [
            (&["--nat-subnet", "8.8.8.0/24"][..], "not a private range"),
            (&["--nat-subnet", "10.0.0.0/8"][..], "prefix length"),
            (
                &["--nat-subnet", "10.213.0.5/24"][..],
                "did you mean 10.213.0.0/24",
            ),
            (&["--nat-subnet", "10.213.0.0"][..], "not an IPv4 subnet"),
            (
                &["--nat-bridge", "a-bridge-name-too-long"][..],
                "not a valid bridge name",
            ),
            (&["--nat-bridge", "br/0"][..], "not a valid bridge name"),
            (&["--guest-dns", "0.0.0.0"][..], "cannot be a DNS server"),
            (&["--guest-dns", "dns.example"][..], "not an IPv4 address"),
        ];
        for (argv, says) in refused {
            let err = parse(argv).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(says), "{argv:?}: {err}");
        }
    }

    #[test]
    fn host_args_leave_the_nat_flags_out() {
        let cli = Cli::try_parse_from(["x", "--nat-bridge", "vzk-b", "--guest-dns", "10.0.0.53"])
            .expect("flags");
        let args = host_args(&cli.backend, Path::new("/d"));
        assert!(
            !args
                .iter()
                .filter_map(|a| a.to_str())
                .any(|a| a.starts_with("--nat") || a == "--guest-dns"),
            "{args:?}"
        );
    }

    #[test]
    fn a_second_agent_on_the_same_data_dir_is_refused_until_the_first_goes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let first = lock_data_dir(&data).expect("the first agent locks");
        assert_eq!(
            std::fs::read_to_string(first.path())
                .ok()
                .map(|s| s.trim().to_owned()),
            Some(std::process::id().to_string())
        );
        let err = lock_data_dir(&data)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(&format!("(pid {})", std::process::id()))
                && err.contains(&data.display().to_string())
                && err.contains("--data-dir"),
            "{err}"
        );
        // Another data dir is another agent's.
        let other = lock_data_dir(&dir.path().join("other")).expect("another data dir");
        // A child started while the lock is held (a VM, dnsmasq) does not keep it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        drop(first);
        // (Retried briefly: a process another test thread forks in between holds a copy
        // of the descriptor until its exec closes it.)
        let mut again = lock_data_dir(&data);
        for _ in 0..100 {
            if again.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            again = lock_data_dir(&data);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(again.is_ok(), "{:?}", again.err());
        drop(other);
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
