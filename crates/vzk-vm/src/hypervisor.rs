//! The hypervisor boundary: the [`Hypervisor`] factory, the [`Vm`] handle, VM states and
//! backend capabilities. Every backend (QEMU on Linux in [`crate::qemu`], the
//! Virtualization.framework backend in `vzk-vz`) implements these two traits; the pod
//! provider uses only them.
//!
//! # Contract
//! * [`Hypervisor::create`] validates a [`VmSpec`] (against [`Capabilities`]) and prepares
//!   the VM without running it; the new VM is [`VmState::Created`].
//! * [`Vm::start`] returns once the guest has been launched (state `Starting` or
//!   `Running`); it does not wait for the guest OS. States then flow on the
//!   [`Vm::state`] watch channel, in order `Created → Starting → Running → Stopping →
//!   Stopped`, or to `Failed { reason }` from any state. `Stopped` and `Failed` are final.
//! * [`Vm::request_stop`] asks the guest to power off (ACPI power button) and returns at
//!   once; [`Vm::force_stop`] ends the VM now. [`stop_gracefully`] combines both with a
//!   deadline.
//! * [`Vm::ip_address`] publishes the guest's IPv4 address once the backend has observed
//!   it (event-driven; never by polling the guest).
//! * Operations a backend cannot do return [`VmError::Unsupported`] /
//!   [`HypervisorError::Unsupported`], never panic.
//! * A backend whose VMs outlive the agent (QEMU) re-finds them with
//!   [`Hypervisor::adopt_existing`]; others return an empty list.
//!
//! All methods are `Send` futures (boxed by `async-trait`) so handles can be used from
//! any task; backends with thread-bound state (Virtualization.framework) keep it behind
//! an actor and send commands to it.

use std::error::Error as StdError;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::spec::{
    BootKind, DiskFormat, NetworkAttachment, SNAPSHOT_HOTPLUG_PORTS, SnapshotSpec, VmSpec,
};

/// A boxed error cause from a backend.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Which backend runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendKind {
    /// `qemu-system-*` (Linux hosts).
    Qemu,
    /// Apple Virtualization.framework (macOS hosts).
    Vz,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Qemu => "qemu",
            Self::Vz => "vz",
        })
    }
}

/// The lifecycle state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum VmState {
    /// Prepared by [`Hypervisor::create`], not started.
    Created,
    /// Launched; the guest is booting (firmware/kernel), or resuming after adoption.
    Starting,
    /// The virtual machine is running (says nothing about the guest OS being ready).
    Running,
    /// A stop was requested or is in progress.
    Stopping,
    /// The VM ended normally (guest power-off, or a stop we asked for). Final.
    Stopped,
    /// The VM ended abnormally or could not be run. Final.
    Failed {
        /// Why, for the pod status message.
        reason: String,
    },
}

impl VmState {
    /// Whether no further transition can happen.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Stopped | Self::Failed { .. })
    }
}

/// What a backend can do on this host, and its resource bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend.
    pub backend: BackendKind,
    /// Human-readable accelerator in use (`kvm`, `tcg`, `vz`).
    pub accelerator: String,
    /// Whether the accelerator is hardware-assisted.
    pub hardware_accelerated: bool,
    /// Minimum and maximum vCPUs per VM.
    pub cpus: (u32, u32),
    /// Minimum and maximum memory per VM, in bytes.
    pub memory_bytes: (u64, u64),
    /// Boot methods supported.
    pub boot_kinds: Vec<BootKind>,
    /// Disk formats supported.
    pub disk_formats: Vec<DiskFormat>,
    /// Whether NAT attachments are supported.
    pub nat: bool,
    /// Whether bridged attachments are supported.
    pub bridged: bool,
    /// Whether shared directories are supported.
    pub shared_dirs: bool,
    /// How many VMs may run at once (`None`: no backend limit).
    pub max_running_vms: Option<u32>,
    /// Whether VMs keep running when the agent exits (and can be adopted again).
    pub vms_outlive_agent: bool,
    /// Whether VMs can be saved as templates ([`Vm::save_state`]) and started by restoring
    /// one ([`SnapshotSpec`]).
    pub snapshots: bool,
    /// How a VM restored from a template gets devices of its own (when [`Self::snapshots`]).
    pub snapshot_devices: SnapshotDevices,
    /// The backend's own version (`QEMU emulator version 7.2.22`, the macOS build): a
    /// saved machine state is only restored by the version that wrote it.
    pub version: String,
}

impl Capabilities {
    /// Checks a spec against these capabilities; the error names the first violation.
    pub fn check(&self, spec: &VmSpec) -> Result<(), HypervisorError> {
        let invalid = |message: String| {
            Err(HypervisorError::InvalidSpec {
                id: spec.id.clone(),
                message,
            })
        };
        let unsupported = |feature: String| {
            Err(HypervisorError::Unsupported {
                backend: self.backend,
                feature,
            })
        };
        if !VmSpec::is_valid_id(&spec.id) {
            return invalid(format!(
                "id {:?} is not 1-64 characters of [A-Za-z0-9._-]",
                spec.id
            ));
        }
        let (lo, hi) = self.cpus;
        if spec.cpus < lo || spec.cpus > hi {
            return invalid(format!("{} CPUs is outside [{lo}, {hi}]", spec.cpus));
        }
        let (lo, hi) = self.memory_bytes;
        if spec.memory_bytes < lo || spec.memory_bytes > hi {
            return invalid(format!(
                "{} bytes of memory is outside [{lo}, {hi}]",
                spec.memory_bytes
            ));
        }
        if !self.boot_kinds.contains(&spec.boot.kind()) {
            return unsupported(format!("boot {}", spec.boot.kind()));
        }
        for d in &spec.disks {
            if !self.disk_formats.contains(&d.format) {
                return unsupported(format!("disk format {}", d.format));
            }
        }
        for n in &spec.nics {
            let ok = match n.attachment {
                NetworkAttachment::Nat => self.nat,
                NetworkAttachment::Bridged { .. } => self.bridged,
            };
            if !ok {
                return unsupported(format!("network attachment {}", n.attachment));
            }
            if !n.mac.is_unicast() {
                return invalid(format!("MAC {} is multicast", n.mac));
            }
        }
        if !spec.shared_dirs.is_empty() && !self.shared_dirs {
            return unsupported("shared directories".into());
        }
        if let Some(snapshot) = &spec.snapshot {
            if !self.snapshots {
                return unsupported("machine-state snapshots".into());
            }
            let plugged = spec.nics.len() + spec.shared_dirs.len();
            if plugged > SNAPSHOT_HOTPLUG_PORTS {
                return invalid(format!(
                    "{plugged} NICs and shared directories exceed the snapshot layout's \
                     {SNAPSHOT_HOTPLUG_PORTS} hot-plug ports"
                ));
            }
            if self.snapshot_devices == SnapshotDevices::Kept && !spec.shared_dirs.is_empty() {
                return unsupported(
                    "shared directories in a saved or restored VM (its devices are part of \
                     the saved machine)"
                        .into(),
                );
            }
            if let SnapshotSpec::Restore { state } = snapshot
                && !state.is_file()
            {
                return invalid(format!("saved state {} is not a file", state.display()));
            }
        }
        Ok(())
    }
}

/// How a backend gives a VM restored from a template devices of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnapshotDevices {
    /// NICs and shared directories sit on hot-plug ports: a template unplugs them before
    /// its state is saved, and a restored VM plugs in its own (any MAC) after the state is
    /// loaded (QEMU).
    #[default]
    HotPlug,
    /// NICs are part of the saved machine: a VM restored from a template must have the
    /// template's NICs, with the same MACs, and neither has shared directories
    /// (Virtualization.framework refuses a restore whose MAC differs, and plugs nothing
    /// into a running VM). The caller keeps two VMs of one MAC from running at once.
    Kept,
}

/// Why a backend is or is not usable on this host: each backend has a run-time probe
/// returning this (e.g. `QemuBackend::probe`), so the agent picks what the host supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The backend probed.
    pub backend: BackendKind,
    /// Whether it can run VMs here.
    pub available: bool,
    /// What was found (binary path and version, accelerator, or why not).
    pub detail: String,
}

/// Errors of the [`Hypervisor`] factory.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The backend cannot run on this host at all.
    #[error("the {backend} backend is not available on this host: {detail}")]
    Unavailable {
        /// The backend.
        backend: BackendKind,
        /// Why.
        detail: String,
    },
    /// The spec asks for something this backend does not implement.
    #[error("the {backend} backend does not support {feature}")]
    Unsupported {
        /// The backend.
        backend: BackendKind,
        /// What was asked for.
        feature: String,
    },
    /// The spec is invalid (bounds, identifiers, missing files).
    #[error("invalid VM spec {id}: {message}")]
    InvalidSpec {
        /// The VM id.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A VM with that id already exists.
    #[error("VM {id} already exists")]
    AlreadyExists {
        /// The VM id.
        id: String,
    },
    /// Preparing the VM failed.
    #[error("creating VM {id} failed")]
    Create {
        /// The VM id.
        id: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Scanning for VMs left by a previous agent failed.
    #[error("looking for existing VMs failed")]
    Adopt {
        /// The cause.
        #[source]
        source: BoxError,
    },
}

/// Errors of a [`Vm`] handle's operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The backend does not implement this operation.
    #[error("the {backend} backend does not support {operation}")]
    Unsupported {
        /// The backend.
        backend: BackendKind,
        /// The operation.
        operation: &'static str,
    },
    /// The operation is not possible in the VM's current state.
    #[error("cannot {operation} VM {id} in state {state:?}")]
    InvalidState {
        /// The VM id.
        id: String,
        /// The operation.
        operation: &'static str,
        /// The state it was in.
        state: VmState,
    },
    /// Starting the VM failed.
    #[error("starting VM {id} failed")]
    Start {
        /// The VM id.
        id: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The hypervisor refuses to run another VM: its limit of concurrently running VMs
    /// is reached (Virtualization.framework allows two macOS VMs per host).
    #[error(
        "the hypervisor refuses to start VM {id}: its limit of running VMs is reached ({detail})"
    )]
    LimitReached {
        /// The VM id.
        id: String,
        /// What the hypervisor said.
        detail: String,
    },
    /// Asking the guest to stop failed.
    #[error("requesting VM {id} to stop failed")]
    RequestStop {
        /// The VM id.
        id: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Forcing the VM off failed.
    #[error("force-stopping VM {id} failed")]
    ForceStop {
        /// The VM id.
        id: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Saving or restoring the machine state failed.
    #[error("{operation} of VM {id} failed")]
    Snapshot {
        /// The VM id.
        id: String,
        /// `saving the state` or `restoring the state`.
        operation: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Removing the VM's state failed.
    #[error("removing VM {id} failed")]
    Remove {
        /// The VM id.
        id: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The VM ended before the awaited condition was met.
    #[error("VM {id} ended ({state:?}) while waiting for {waiting_for}")]
    Ended {
        /// The VM id.
        id: String,
        /// The final state.
        state: VmState,
        /// What was awaited.
        waiting_for: &'static str,
    },
    /// The awaited condition was not met in time.
    #[error("VM {id}: timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// The VM id.
        id: String,
        /// The budget.
        after: Duration,
        /// What was awaited.
        waiting_for: &'static str,
    },
}

/// Host-side resource use of one VM: the host process that runs it (QEMU, or the VM host
/// process on macOS), seen from outside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    /// User + system CPU time, nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// A VM backend: creates VMs and re-finds those it left running.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// What this backend can do here.
    fn capabilities(&self) -> &Capabilities;

    /// Validates `spec` and prepares the VM (state dir, disks, network plumbing) without
    /// starting it.
    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError>;

    /// Finds VMs a previous agent process left running and attaches to them. VMs whose
    /// process died meanwhile are returned in state [`VmState::Failed`] with a reason.
    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError>;

    /// Whether the backend can still start VMs (its binary, its network services); `Err`
    /// says what is wrong in words an operator can act on. Cheap: called every 10 s.
    async fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A handle on one VM. Cheap to share (`Arc<dyn Vm>`).
#[async_trait]
pub trait Vm: Send + Sync + 'static {
    /// The spec the VM was created from.
    fn spec(&self) -> &VmSpec;

    /// The VM id (`spec().id`).
    fn id(&self) -> &str {
        &self.spec().id
    }

    /// The current state and all future changes.
    fn state(&self) -> watch::Receiver<VmState>;

    /// The guest's IPv4 address on its first NIC once observed (`None` until then).
    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>>;

    /// The file the serial console is written to, if any.
    fn console_log(&self) -> Option<PathBuf> {
        self.spec().console_log.clone()
    }

    /// Launches the VM. Valid only in [`VmState::Created`].
    async fn start(&self) -> Result<(), VmError>;

    /// Asks the guest to power off (ACPI power button) and returns without waiting.
    async fn request_stop(&self) -> Result<(), VmError>;

    /// Ends the VM now. A no-op once the VM is in a final state.
    async fn force_stop(&self) -> Result<(), VmError>;

    /// Saves the running machine as a template, to the `state` file its
    /// [`SnapshotSpec::Template`] names, and ends the VM (state
    /// `Stopped`). Valid only for a VM created with [`SnapshotSpec::Template`] and running:
    /// its NICs and shared directories are unplugged first (the guest sees them go), the
    /// vCPUs stopped, the disks flushed, then the memory and device state written. The
    /// disks must be kept unchanged beside the file: a restore needs both.
    async fn save_state(&self) -> Result<(), VmError> {
        Err(VmError::Snapshot {
            id: self.id().to_owned(),
            operation: "saving the state",
            source: "this backend cannot save machine state".into(),
        })
    }

    /// Releases everything the VM holds on the host (state dir, TAP, leases). The VM must
    /// be in a final state; call [`Vm::force_stop`] first otherwise.
    async fn remove(&self) -> Result<(), VmError>;

    /// Opens a TCP connection to `addr` (normally the guest's address) from the network
    /// the VM lives in: the guest's SSH, probes and port-forwards all go through here, so
    /// a backend whose VMs sit in a network namespace of their own opens it there and no
    /// caller ever enters that namespace.
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        tokio::net::TcpStream::connect(addr).await
    }

    /// CPU time and memory of the host process running the VM (`None` when not running or
    /// not known).
    fn host_usage(&self) -> Option<HostUsage> {
        None
    }
}

/// Waits until `vm`'s state satisfies `pred`, up to `timeout`.
///
/// Fails with [`VmError::Ended`] if the VM reaches a final state that does not satisfy
/// `pred`, and with [`VmError::Timeout`] when the budget is spent.
pub async fn wait_for_state(
    vm: &dyn Vm,
    timeout: Duration,
    waiting_for: &'static str,
    pred: impl Fn(&VmState) -> bool,
) -> Result<VmState, VmError> {
    let mut rx = vm.state();
    let id = vm.id().to_owned();
    let fut = async {
        loop {
            let s = rx.borrow_and_update().clone();
            if pred(&s) {
                return Ok(s);
            }
            if s.is_final() {
                return Err(VmError::Ended {
                    id: id.clone(),
                    state: s,
                    waiting_for,
                });
            }
            if rx.changed().await.is_err() {
                let s = rx.borrow().clone();
                return Err(VmError::Ended {
                    id: id.clone(),
                    state: s,
                    waiting_for,
                });
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(VmError::Timeout {
            id,
            after: timeout,
            waiting_for,
        }),
    }
}

/// Waits for the VM's IPv4 address, up to `timeout`.
pub async fn wait_for_ip(vm: &dyn Vm, timeout: Duration) -> Result<Ipv4Addr, VmError> {
    let mut ip = vm.ip_address();
    let mut state = vm.state();
    let id = vm.id().to_owned();
    let fut = async {
        loop {
            if let Some(a) = *ip.borrow_and_update() {
                return Ok(a);
            }
            let s = state.borrow_and_update().clone();
            if s.is_final() {
                return Err(VmError::Ended {
                    id: id.clone(),
                    state: s,
                    waiting_for: "an IP address",
                });
            }
            tokio::select! {
                r = ip.changed() => if r.is_err() { return Err(VmError::Ended { id: id.clone(), state: s, waiting_for: "an IP address" }) },
                _ = state.changed() => {}
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(VmError::Timeout {
            id,
            after: timeout,
            waiting_for: "an IP address",
        }),
    }
}

/// How a [`stop_gracefully`] call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Already in a final state.
    AlreadyStopped,
    /// The guest powered off within the grace period.
    Graceful,
    /// The grace period passed (or the request failed); the VM was forced off.
    Forced,
}

/// Requests a stop, waits up to `grace` for the VM to end, then forces it off.
pub async fn stop_gracefully(vm: &dyn Vm, grace: Duration) -> Result<StopOutcome, VmError> {
    if vm.state().borrow().is_final() {
        return Ok(StopOutcome::AlreadyStopped);
    }
    if !grace.is_zero() {
        match vm.request_stop().await {
            Ok(()) => {
                if wait_for_state(vm, grace, "power-off", VmState::is_final)
                    .await
                    .is_ok()
                {
                    return Ok(StopOutcome::Graceful);
                }
            }
            Err(e) => {
                tracing::warn!(vm.id = vm.id(), error = %e, "graceful stop request failed; forcing")
            }
        }
    }
    vm.force_stop().await?;
    Ok(StopOutcome::Forced)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::mac::MacAddr;
    use crate::spec::{BootSpec, DiskSpec, NicSpec};

    fn caps() -> Capabilities {
        Capabilities {
            backend: BackendKind::Qemu,
            accelerator: "tcg".into(),
            hardware_accelerated: false,
            cpus: (1, 8),
            memory_bytes: (64 << 20, 8 << 30),
            boot_kinds: vec![BootKind::LinuxKernel],
            disk_formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
            nat: true,
            bridged: true,
            shared_dirs: false,
            max_running_vms: None,
            vms_outlive_agent: true,
            snapshots: false,
            snapshot_devices: SnapshotDevices::HotPlug,
            version: String::new(),
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            id: "vm-1".into(),
            cpus: 1,
            memory_bytes: 256 << 20,
            boot: BootSpec::LinuxKernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            disks: vec![DiskSpec {
                path: "/d".into(),
                read_only: false,
                format: DiskFormat::Qcow2,
            }],
            nics: vec![NicSpec {
                mac: MacAddr::random(),
                attachment: NetworkAttachment::Nat,
            }],
            shared_dirs: vec![],
            console_log: None,
            snapshot: None,
        }
    }

    #[test]
    fn capability_check_names_the_violation() {
        let c = caps();
        assert!(c.check(&spec()).is_ok());
        let mut s = spec();
        s.cpus = 9;
        assert!(
            matches!(c.check(&s), Err(HypervisorError::InvalidSpec { message, .. }) if message.contains("9 CPUs"))
        );
        let mut s = spec();
        s.boot = BootSpec::Efi {
            variable_store: "/v".into(),
        };
        assert!(
            matches!(c.check(&s), Err(HypervisorError::Unsupported { feature, .. }) if feature == "boot efi")
        );
        let mut s = spec();
        s.shared_dirs.push(crate::spec::SharedDirSpec {
            tag: "t".into(),
            host_path: "/".into(),
            read_only: true,
        });
        assert!(matches!(
            c.check(&s),
            Err(HypervisorError::Unsupported { .. })
        ));
        let mut s = spec();
        s.snapshot = Some(SnapshotSpec::Template {
            state: "/t/state".into(),
        });
        assert!(
            matches!(c.check(&s), Err(HypervisorError::Unsupported { feature, .. }) if feature == "machine-state snapshots")
        );
        let c2 = Capabilities {
            snapshots: true,
            shared_dirs: true,
            ..caps()
        };
        assert!(c2.check(&s).is_ok());
        for i in 0..SNAPSHOT_HOTPLUG_PORTS {
            s.shared_dirs.push(crate::spec::SharedDirSpec {
                tag: format!("t{i}"),
                host_path: "/".into(),
                read_only: true,
            });
        }
        assert!(
            matches!(c2.check(&s), Err(HypervisorError::InvalidSpec { message, .. }) if message.contains("hot-plug ports"))
        );
        // A backend that keeps a template's devices takes its NICs but no shared dirs.
        let kept = Capabilities {
            snapshot_devices: SnapshotDevices::Kept,
            ..c2.clone()
        };
        s.shared_dirs.truncate(1);
        assert!(c2.check(&s).is_ok());
        assert!(
            matches!(kept.check(&s), Err(HypervisorError::Unsupported { feature, .. }) if feature.starts_with("shared directories in a saved"))
        );
        s.shared_dirs.clear();
        assert!(kept.check(&s).is_ok());
        s.snapshot = None;
        s.shared_dirs.push(crate::spec::SharedDirSpec {
            tag: "t".into(),
            host_path: "/".into(),
            read_only: true,
        });
        assert!(
            kept.check(&s).is_ok(),
            "an ordinary VM keeps its shared dirs"
        );
        let mut s = spec();
        s.snapshot = Some(SnapshotSpec::Restore {
            state: "/nonexistent/state".into(),
        });
        assert!(
            matches!(c2.check(&s), Err(HypervisorError::InvalidSpec { message, .. }) if message.contains("not a file"))
        );
        let mut s = spec();
        s.nics[0].mac = MacAddr([0x03, 0, 0, 0, 0, 1]);
        assert!(matches!(
            c.check(&s),
            Err(HypervisorError::InvalidSpec { .. })
        ));
    }

    /// An in-memory VM whose guest either honours or ignores the power button.
    struct FakeVm {
        spec: VmSpec,
        state: watch::Sender<VmState>,
        ip: watch::Sender<Option<Ipv4Addr>>,
        honours_acpi: bool,
        calls: Mutex<Vec<&'static str>>,
    }

    #[async_trait]
    impl Vm for FakeVm {
        fn spec(&self) -> &VmSpec {
            &self.spec
        }
        fn state(&self) -> watch::Receiver<VmState> {
            self.state.subscribe()
        }
        fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
            self.ip.subscribe()
        }
        async fn start(&self) -> Result<(), VmError> {
            self.state.send_replace(VmState::Running);
            Ok(())
        }
        async fn request_stop(&self) -> Result<(), VmError> {
            self.calls.lock().map(|mut c| c.push("request_stop")).ok();
            if self.honours_acpi {
                let tx = self.state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    tx.send_replace(VmState::Stopped);
                });
            }
            Ok(())
        }
        async fn force_stop(&self) -> Result<(), VmError> {
            self.calls.lock().map(|mut c| c.push("force_stop")).ok();
            self.state.send_replace(VmState::Stopped);
            Ok(())
        }
        async fn remove(&self) -> Result<(), VmError> {
            Ok(())
        }
    }

    fn fake(honours_acpi: bool) -> FakeVm {
        FakeVm {
            spec: spec(),
            state: watch::channel(VmState::Created).0,
            ip: watch::channel(None).0,
            honours_acpi,
            calls: Mutex::new(vec![]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stop_gracefully_forces_only_when_the_guest_ignores_acpi() {
        let vm = fake(true);
        vm.start().await.ok();
        assert_eq!(
            stop_gracefully(&vm, Duration::from_secs(5)).await.ok(),
            Some(StopOutcome::Graceful)
        );
        assert_eq!(
            *vm.calls.lock().map(|c| c.clone()).unwrap_or_default(),
            vec!["request_stop"]
        );
        assert_eq!(
            stop_gracefully(&vm, Duration::from_secs(5)).await.ok(),
            Some(StopOutcome::AlreadyStopped)
        );

        let vm = fake(false);
        vm.start().await.ok();
        assert_eq!(
            stop_gracefully(&vm, Duration::from_secs(5)).await.ok(),
            Some(StopOutcome::Forced)
        );
        assert_eq!(
            *vm.calls.lock().map(|c| c.clone()).unwrap_or_default(),
            vec!["request_stop", "force_stop"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_an_ip_ends_with_the_vm() {
        let vm = fake(true);
        vm.start().await.ok();
        let ip = vm.ip.clone();
        tokio::spawn(async move { ip.send_replace(Some(Ipv4Addr::new(10, 0, 0, 2))) });
        assert_eq!(
            wait_for_ip(&vm, Duration::from_secs(1)).await.ok(),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        let vm = fake(true);
        vm.state.send_replace(VmState::Failed {
            reason: "boom".into(),
        });
        assert!(matches!(
            wait_for_ip(&vm, Duration::from_secs(1)).await,
            Err(VmError::Ended { .. })
        ));
        let vm = fake(true);
        assert!(matches!(
            wait_for_ip(&vm, Duration::from_secs(1)).await,
            Err(VmError::Timeout { .. })
        ));
    }
}
