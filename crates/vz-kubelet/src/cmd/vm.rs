//! `vz-kubelet vm`: drive the VM runtime by hand (debugging, benchmarks, CI smoke).
//!
//! * `vm probe`: which backend runs here and with which accelerator.
//! * `vm run`: boot a Linux-kernel VM, print its IP, stop it gracefully on Ctrl-C.
//! * `vm list`: re-adopt the VMs of a state dir and print their state and IP.
//! * `vm stop ID`: re-adopt one VM and stop it (ACPI, then force after `--grace`).
//! * `vm host --dir D --spec FILE` (hidden): the VM host process, one per VM, that the
//!   agent's backend starts on macOS (`vzk_backend::open`): it detaches, runs the VM with
//!   the in-process backend (`vzk_backend::open_in_process`) and serves it on
//!   `D/<id>.sock` until it is removed (`vzk_vm::hosted::serve`).
//!
//! All of it goes through the same `Hypervisor`/`Vm` traits the pod provider uses.
//! `--fake-backend` (hidden, for tests) swaps the backend for `vzk_vm::hosted::fake`
//! VMs, each in a `vm host --fake-backend` process, so the host-process machinery can be
//! exercised end to end on any machine.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use vzk_vm::hosted::fake::FakeHypervisor;
use vzk_vm::hosted::{Hosted, Launcher};
use vzk_vm::{
    BootSpec, DiskFormat, DiskSpec, Hypervisor, MacAddr, NetworkAttachment, NicSpec, Vm, VmSpec,
    stop_gracefully, wait_for_ip,
};

/// Flags of `vz-kubelet vm`.
#[derive(Debug, Args)]
pub(crate) struct VmArgs {
    /// Where VM state lives (`vms/<id>/`, `nat/`).
    #[arg(
        long,
        env = "VZK_VM_STATE_DIR",
        default_value = "/var/lib/vz-kubelet/vm",
        global = true
    )]
    state_dir: PathBuf,
    #[command(flatten)]
    backend: vzk_backend::BackendArgs,
    /// Test only: in-memory fake VMs, each in a `vm host` process of this binary (in
    /// `<state-dir>/hosts/`), instead of this host's backend.
    #[arg(long, hide = true, global = true)]
    fake_backend: bool,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Print which backend runs here and with which accelerator.
    Probe,
    /// Boot a Linux-kernel VM, print its IP, stop it gracefully on Ctrl-C.
    Run(RunVm),
    /// Re-adopt the VMs of the state dir and print them.
    List,
    /// Re-adopt a VM and stop it.
    Stop {
        /// The VM id.
        id: String,
        /// Grace period for the ACPI power-off before forcing.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        grace: Duration,
    },
    /// Run one VM in this process until it is removed (started by the agent).
    #[command(hide = true)]
    Host {
        /// The hosts directory (socket, state file and log of the VM).
        #[arg(long)]
        dir: PathBuf,
        /// The VM spec (JSON) written by the agent.
        #[arg(long)]
        spec: PathBuf,
    },
}

#[derive(Debug, Args)]
struct RunVm {
    /// VM id (file-name safe).
    #[arg(long, default_value = "manual")]
    id: String,
    /// Kernel image.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Disk image (repeatable); qcow2 if it ends in .qcow2, else raw.
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// `nat` or `bridged:<bridge>`.
    #[arg(long, default_value = "nat")]
    network: String,
    /// Serial console log file.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Grace period on Ctrl-C.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    }
}

fn parse_network(s: &str) -> anyhow::Result<NetworkAttachment> {
    match s.split_once(':') {
        None if s == "nat" => Ok(NetworkAttachment::Nat),
        Some(("bridged", iface)) if !iface.is_empty() => Ok(NetworkAttachment::Bridged {
            interface: iface.into(),
        }),
        _ => bail!("--network must be `nat` or `bridged:<bridge>`, got {s:?}"),
    }
}

impl VmArgs {
    /// This host's backend (the one `vz-kubelet run` uses) on the state dir; without
    /// `with_nat` no NAT network is set up (listing and stopping need none).
    async fn backend(&self, with_nat: bool) -> anyhow::Result<Arc<dyn Hypervisor>> {
        if self.fake_backend {
            let launcher = Launcher::current_exe([
                OsString::from("vm"),
                "--fake-backend".into(),
                "--state-dir".into(),
                self.state_dir.clone().into(),
                "host".into(),
            ])
            .context("finding this executable")?;
            let dir = vzk_backend::hosts_dir(&self.state_dir);
            let hosted = Hosted::new(Arc::new(FakeHypervisor::new()), dir, launcher)?;
            return Ok(Arc::new(hosted));
        }
        let mut args = self.backend.clone();
        args.no_nat |= !with_nat;
        vzk_backend::open(&args, &self.state_dir)
            .await
            .context("starting the VM backend")
    }
}

/// `vm host`: serves one VM, then ends the process (without waiting for blocking
/// threads a backend may have left behind).
async fn host(args: &VmArgs, dir: &Path, spec: &Path) -> anyhow::Result<()> {
    let spec = vzk_vm::hosted::read_spec_file(spec)?;
    let hv: Arc<dyn Hypervisor> = if args.fake_backend {
        Arc::new(FakeHypervisor::new())
    } else {
        vzk_backend::open_in_process(&args.backend, &args.state_dir)
            .await
            .context("starting the VM backend")?
    };
    let id = spec.id.clone();
    match vzk_vm::hosted::serve(hv, spec, dir).await {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let e = anyhow::Error::from(e).context(format!("hosting VM {id}"));
            tracing::error!(error = format!("{e:#}"), "VM host exiting");
            eprintln!("error: {e:#}");
            std::process::exit(1)
        }
    }
}

/// Runs `vz-kubelet vm ...`.
pub(crate) async fn run(args: VmArgs) -> anyhow::Result<()> {
    match &args.command {
        VmCommand::Host { dir, spec } => host(&args, dir, spec).await,
        VmCommand::Probe => {
            let report = vzk_backend::probe(&args.backend).await;
            println!(
                "backend: {}\navailable: {}\ndetail: {}",
                report.backend, report.available, report.detail
            );
            if !report.available {
                bail!("no usable VM backend");
            }
            Ok(())
        }
        VmCommand::List => {
            let backend = args.backend(false).await?;
            for vm in backend.adopt_existing().await.context("re-adopting VMs")? {
                let ip = vm
                    .ip_address()
                    .borrow()
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "-".into());
                println!("{}\t{:?}\t{ip}", vm.id(), *vm.state().borrow());
            }
            Ok(())
        }
        VmCommand::Stop { id, grace } => {
            let backend = args.backend(false).await?;
            let vms = backend.adopt_existing().await.context("re-adopting VMs")?;
            let Some(vm) = vms.into_iter().find(|v| v.id() == id) else {
                bail!("no VM {id:?} in {}", args.state_dir.display());
            };
            let outcome = stop_gracefully(vm.as_ref(), *grace).await?;
            vm.remove().await?;
            println!("{id}: {outcome:?}");
            Ok(())
        }
        VmCommand::Run(r) => {
            let attachment = parse_network(&r.network)?;
            let backend = args.backend(attachment == NetworkAttachment::Nat).await?;
            let spec = VmSpec {
                id: r.id.clone(),
                cpus: r.cpus,
                memory_bytes: r.memory_mib << 20,
                boot: BootSpec::LinuxKernel {
                    kernel: r.kernel.clone(),
                    initrd: r.initrd.clone(),
                    cmdline: r.cmdline.clone(),
                },
                disks: r
                    .disk
                    .iter()
                    .map(|p| DiskSpec {
                        path: p.clone(),
                        read_only: false,
                        format: if p.extension().is_some_and(|e| e == "qcow2") {
                            DiskFormat::Qcow2
                        } else {
                            DiskFormat::Raw
                        },
                    })
                    .collect(),
                nics: vec![NicSpec {
                    mac: MacAddr::random(),
                    attachment,
                }],
                shared_dirs: vec![],
                console_log: r.console.clone(),
                snapshot: None,
            };
            let vm: Arc<dyn Vm> = backend.create(spec).await.context("creating the VM")?;
            vm.start().await.context("starting the VM")?;
            tokio::select! {
                ip = wait_for_ip(vm.as_ref(), Duration::from_secs(300)) => {
                    println!("{}: ip {}", r.id, ip.context("waiting for the VM's address")?);
                }
                _ = tokio::signal::ctrl_c() => {}
            }
            let mut state = vm.state();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    let outcome = stop_gracefully(vm.as_ref(), r.grace).await?;
                    println!("{}: {outcome:?}", r.id);
                }
                _ = state.wait_for(|s| s.is_final()) => {
                    println!("{}: {:?}", r.id, *vm.state().borrow());
                }
            }
            vm.remove().await.context("removing the VM")?;
            Ok(())
        }
    }
}
