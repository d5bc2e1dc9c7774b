//! The QEMU backend (Linux hosts): [`QemuBackend`] implements [`Hypervisor`].
//!
//! * [`probe`]: binary, version and the KVM-really-works probe (TCG otherwise).
//! * [`command`]: spec → command line.
//! * [`qmp`]: the QMP client.
//! * [`statedir`]: the per-VM state directory used for re-adoption.
//! * [`vm`]: [`QemuVm`], the supervised VM.
//!
//! # Guarantees
//! * VMs outlive the agent: each QEMU runs in its own process group, logs to its state
//!   dir and holds its TAP; [`Hypervisor::adopt_existing`] finds them again.
//! * With a [`NatConfig`], the backend owns the NAT network (bridge, dnsmasq,
//!   masquerade) for as long as it lives; removing a VM releases its NICs' DHCP leases
//!   on that network ([`crate::net::release`]), so a host running many short-lived VMs
//!   does not exhaust the DHCP pool (a failed release is logged; the lease then expires).
//!
//! # Assumptions
//! Runs as root (or with `CAP_NET_ADMIN` and access to `/dev/net/tun`); `ip`, `nft`
//! (NAT), `dnsmasq` (NAT) and `qemu-system-x86_64` are installed.

pub mod command;
pub mod probe;
pub mod qmp;
pub mod statedir;
pub mod vm;

use std::collections::HashMap;
use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;

pub use probe::{Accel, AccelChoice};
pub use vm::{QemuVm, StartTimings};

use crate::hypervisor::{
    BackendKind, Capabilities, Hypervisor, HypervisorError, ProbeReport, Vm, VmState,
};
use crate::net::nat::{NatConfig, NatNetwork};
use crate::net::release::LeaseReleaser;
use crate::spec::{BootKind, BootSpec, DiskFormat, NetworkAttachment, VmSpec};
use statedir::StateDir;

/// Settings of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Root of the backend's state (`vms/<id>/`, `nat/`).
    pub state_dir: PathBuf,
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Accelerator selection.
    pub accel: AccelChoice,
    /// The NAT network to own; `None`: only bridged NICs are supported.
    pub nat: Option<NatConfig>,
    /// Upper bound on vCPUs per VM.
    pub max_cpus: u32,
    /// Upper bound on memory per VM, in bytes.
    pub max_memory_bytes: u64,
    /// The `ip netns` namespace the VMs (and the NAT network) live in, for [`open`];
    /// `None`: the agent's own.
    pub netns: Option<String>,
}

impl QemuConfig {
    /// Defaults under `state_dir`: `qemu-system-x86_64` from `PATH`, accelerator probed,
    /// the default NAT network.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            binary: "qemu-system-x86_64".into(),
            accel: AccelChoice::Auto,
            nat: Some(NatConfig::default()),
            max_cpus: 64,
            max_memory_bytes: 256 << 30,
            netns: None,
        }
    }
}

/// The QEMU backend as the node runs it: built, and every VM operated and connected to,
/// inside the namespace [`QemuConfig::netns`] when one is given (see [`crate::netns`]),
/// else in the caller's own.
pub async fn open(config: QemuConfig) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    let Some(name) = config.netns.clone() else {
        return Ok(Arc::new(QemuBackend::new(config).await?));
    };
    let rt =
        crate::netns::NetnsRuntime::enter(&name).map_err(|e| HypervisorError::Unavailable {
            backend: BackendKind::Qemu,
            detail: format!(
                "{e}: {}",
                e.source().map_or_else(String::new, ToString::to_string)
            ),
        })?;
    let backend = crate::netns::InNetns::build(rt, move || QemuBackend::new(config)).await?;
    Ok(Arc::new(backend))
}

/// What every VM of one backend shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) binary: PathBuf,
    pub(crate) accel: Accel,
    pub(crate) nat_bridge: Option<String>,
    /// Gives back the NAT leases of removed VMs (with a NAT network).
    pub(crate) nat_leases: Option<LeaseReleaser>,
    pub(crate) ovmf: Option<Ovmf>,
    /// What makes this backend's TAP names its own: its state dir (see
    /// [`crate::net::tap::tap_name`]).
    pub(crate) tap_scope: String,
}

/// The QEMU backend.
#[derive(Debug)]
pub struct QemuBackend {
    root: PathBuf,
    shared: Arc<Shared>,
    caps: Capabilities,
    nat: Option<NatNetwork>,
    vms: Mutex<HashMap<String, Weak<QemuVm>>>,
}

/// UEFI firmware for QEMU: OVMF's code image and the template of its variable store,
/// as Debian's `ovmf` package installs them (a pair must match in size).
const OVMF_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// OVMF's code image and variable-store template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ovmf {
    pub(crate) code: PathBuf,
    pub(crate) vars_template: PathBuf,
}

impl Ovmf {
    /// The first installed pair of `candidates`.
    fn find(candidates: &[(&str, &str)]) -> Option<Ovmf> {
        candidates
            .iter()
            .map(|(c, v)| Ovmf {
                code: PathBuf::from(c),
                vars_template: PathBuf::from(v),
            })
            .find(|o| o.code.is_file() && o.vars_template.is_file())
    }

    /// Makes a VM's variable store from the template unless it exists (a VM's EFI
    /// variables, boot entries included, outlive a restart of the same VM).
    pub(crate) fn ensure_variable_store(&self, store: &std::path::Path) -> std::io::Result<()> {
        if store.exists() {
            return Ok(());
        }
        let tmp = store.with_extension("fd.tmp");
        std::fs::copy(&self.vars_template, &tmp)?;
        std::fs::rename(&tmp, store)
    }
}

impl QemuBackend {
    /// Checks whether QEMU can run here, and with which accelerator.
    pub async fn probe(binary: &Path) -> ProbeReport {
        match probe::qemu_version(binary).await {
            Err(e) => ProbeReport {
                backend: BackendKind::Qemu,
                available: false,
                detail: e.to_string(),
            },
            Ok(version) => {
                let accel = probe::select_accel(binary, AccelChoice::Auto)
                    .await
                    .unwrap_or(Accel::Tcg);
                ProbeReport {
                    backend: BackendKind::Qemu,
                    available: true,
                    detail: format!("{version}; accelerator {}", accel.as_str()),
                }
            }
        }
    }

    /// Probes the accelerator, creates the state root and brings up the NAT network.
    pub async fn new(config: QemuConfig) -> Result<Self, HypervisorError> {
        let unavailable = |detail: String| HypervisorError::Unavailable {
            backend: BackendKind::Qemu,
            detail,
        };
        std::fs::create_dir_all(config.state_dir.join("vms"))
            .map_err(|e| unavailable(format!("creating {}: {e}", config.state_dir.display())))?;
        // The three are independent and each waits on child processes (QEMU's start-up,
        // `ip`/`nft`/dnsmasq): run them at once.
        let probe_file = config.state_dir.join("kvm-probe.json");
        let nat_dir = config.state_dir.join("nat");
        let (version, accel, nat) = tokio::join!(
            probe::qemu_version(&config.binary),
            probe::select_accel_cached(&config.binary, config.accel, &probe_file),
            async {
                match config.nat.clone() {
                    Some(c) => NatNetwork::start(c, &nat_dir).await.map(Some),
                    None => Ok(None),
                }
            }
        );
        let version = version.map_err(|e| unavailable(e.to_string()))?;
        let accel = accel.map_err(|e| unavailable(e.to_string()))?;
        // The whole cause in the message: it is what an operator reads at start-up
        // (an overlapping subnet, a busy bridge name, dnsmasq failing).
        let nat = nat.map_err(|e| {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            unavailable(format!("its NAT network: {text}"))
        })?;
        let ovmf = Ovmf::find(OVMF_CANDIDATES);
        let mut boot_kinds = vec![BootKind::LinuxKernel];
        if ovmf.is_some() {
            boot_kinds.push(BootKind::Efi);
        }
        let caps = Capabilities {
            backend: BackendKind::Qemu,
            accelerator: accel.as_str().into(),
            hardware_accelerated: accel == Accel::Kvm,
            cpus: (1, config.max_cpus),
            memory_bytes: (32 << 20, config.max_memory_bytes),
            boot_kinds,
            disk_formats: vec![DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Nbd],
            nat: nat.is_some(),
            bridged: true,
            shared_dirs: true,
            max_running_vms: None,
            vms_outlive_agent: true,
            snapshots: true,
            snapshot_devices: crate::SnapshotDevices::HotPlug,
            version: version.to_string(),
        };
        tracing::info!(backend = "qemu", version = %version, accel = accel.as_str(), nat = nat.is_some(), "hypervisor ready");
        let tap_scope = config
            .state_dir
            .canonicalize()
            .unwrap_or_else(|_| config.state_dir.clone())
            .display()
            .to_string();
        let shared = Arc::new(Shared {
            binary: config.binary.clone(),
            accel,
            nat_bridge: nat.as_ref().map(|n| n.bridge().to_owned()),
            nat_leases: nat.as_ref().map(|n| {
                LeaseReleaser::new(
                    n.bridge(),
                    n.config().gateway,
                    NatConfig::lease_file(&nat_dir),
                )
            }),
            ovmf,
            tap_scope,
        });
        Ok(Self {
            root: config.state_dir,
            shared,
            caps,
            nat,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.shared.accel
    }

    /// Where the last [`Vm::start`] of VM `id` (created or adopted by this backend and
    /// still alive) spent its time.
    pub fn start_timings(&self, id: &str) -> Option<StartTimings> {
        let vm = self.vms.lock().ok()?.get(id)?.upgrade()?;
        vm.start_timings()
    }

    /// The handle of VM `id` (created or adopted by this backend and still alive), for
    /// what only QEMU has (its QMP connection, its state dir).
    pub fn handle(&self, id: &str) -> Option<Arc<QemuVm>> {
        self.vms.lock().ok()?.get(id)?.upgrade()
    }

    /// The NAT network, if configured.
    pub fn nat(&self) -> Option<&NatNetwork> {
        self.nat.as_ref()
    }

    fn remember(&self, vm: &Arc<QemuVm>) {
        if let Ok(mut m) = self.vms.lock() {
            m.retain(|_, w| w.strong_count() > 0);
            m.insert(vm.spec().id.clone(), Arc::downgrade(vm));
        }
    }

    fn known(&self, id: &str) -> bool {
        self.vms
            .lock()
            .map(|m| m.get(id).is_some_and(|w| w.strong_count() > 0))
            .unwrap_or(false)
    }

    fn check_files(spec: &VmSpec) -> Result<(), HypervisorError> {
        let mut files: Vec<&Path> = spec.disks.iter().map(|d| d.path.as_path()).collect();
        if let BootSpec::LinuxKernel { kernel, initrd, .. } = &spec.boot {
            files.push(kernel);
            files.extend(initrd.as_deref());
        }
        files.extend(spec.shared_dirs.iter().map(|s| s.host_path.as_path()));
        match files.into_iter().find(|p| !p.exists()) {
            Some(p) => Err(HypervisorError::InvalidSpec {
                id: spec.id.clone(),
                message: format!("{} does not exist", p.display()),
            }),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Hypervisor for QemuBackend {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn health(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let binary = &self.shared.binary;
        let resolved = if binary.components().count() > 1 {
            Some(binary.clone())
        } else {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(binary))
                    .find(|p| p.is_file())
            })
        };
        match resolved.as_ref().map(std::fs::metadata) {
            Some(Ok(m)) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            _ => {
                return Err(format!(
                    "the QEMU binary {} is missing or not executable",
                    binary.display()
                ));
            }
        }
        match &self.nat {
            Some(nat) => nat.health(),
            None => Ok(()),
        }
    }

    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.caps.check(&spec)?;
        if spec
            .nics
            .iter()
            .any(|n| n.attachment == NetworkAttachment::Nat)
            && self.nat.is_none()
        {
            return Err(HypervisorError::Unsupported {
                backend: BackendKind::Qemu,
                feature: "nat without a configured NAT network".into(),
            });
        }
        Self::check_files(&spec)?;
        let dir = StateDir::new(&self.root, &spec.id);
        if self.known(&spec.id) || dir.path().exists() {
            return Err(HypervisorError::AlreadyExists { id: spec.id });
        }
        dir.create(&spec).map_err(|e| HypervisorError::Create {
            id: spec.id.clone(),
            source: Box::new(e),
        })?;
        let vm = Arc::new(QemuVm::new(
            spec,
            dir,
            self.shared.clone(),
            VmState::Created,
        ));
        self.remember(&vm);
        Ok(vm)
    }

    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        let entries = match std::fs::read_dir(self.root.join("vms")) {
            Ok(e) => e,
            Err(e) => {
                return Err(HypervisorError::Adopt {
                    source: Box::new(e),
                });
            }
        };
        let mut out: Vec<Arc<dyn Vm>> = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if self.known(&id) || !entry.path().join("spec.json").exists() {
                continue;
            }
            match QemuVm::adopt(StateDir::at(entry.path()), self.shared.clone()).await {
                Ok(vm) => {
                    let vm = Arc::new(vm);
                    self.remember(&vm);
                    out.push(vm);
                }
                Err(e) => {
                    tracing::warn!(vm.id = %id, error = %e, "skipping unreadable VM state dir")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ovmf_is_a_code_and_template_pair_and_a_vm_gets_its_own_variable_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).display().to_string();
        std::fs::write(p("CODE_4M.fd"), b"code").unwrap();
        std::fs::write(p("CODE.fd"), b"code").unwrap();
        std::fs::write(p("VARS.fd"), b"template").unwrap();
        // The first pair lacks its template: the second is taken.
        let (c4, v4, c, v) = (p("CODE_4M.fd"), p("VARS_4M.fd"), p("CODE.fd"), p("VARS.fd"));
        let ovmf = Ovmf::find(&[(&c4, &v4), (&c, &v)]).unwrap();
        assert_eq!(ovmf.code, dir.path().join("CODE.fd"));
        assert_eq!(Ovmf::find(&[(&c4, &v4)]), None);

        let store = dir.path().join("vm/efi-vars.fd");
        std::fs::create_dir_all(store.parent().unwrap()).unwrap();
        ovmf.ensure_variable_store(&store).unwrap();
        assert_eq!(std::fs::read(&store).unwrap(), b"template");
        // The guest's writes stay: an existing store is never replaced.
        std::fs::write(&store, b"boot entries").unwrap();
        ovmf.ensure_variable_store(&store).unwrap();
        assert_eq!(std::fs::read(&store).unwrap(), b"boot entries");
        assert!(!dir.path().join("vm/efi-vars.fd.tmp").exists());
    }
}
