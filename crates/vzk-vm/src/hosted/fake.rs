//! [`FakeHypervisor`]: an in-memory backend for tests of the VM host machinery (it is
//! selected by `vz-kubelet vm --fake-backend`, a hidden test flag). Its VMs run nothing:
//! [`Vm::start`] makes them `Running` with the address [`FAKE_IP`]; [`Vm::request_stop`]
//! makes them `Stopping`, then `Stopped` 50 ms later; [`Vm::force_stop`] `Stopped` at
//! once. [`Vm::host_usage`] is `None` (the host process's own usage is what is seen).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::hypervisor::{
    BackendKind, Capabilities, Hypervisor, HypervisorError, Vm, VmError, VmState,
};
use crate::spec::{BootKind, DiskFormat, VmSpec};

/// The address every fake VM gets on start (TEST-NET-1).
pub const FAKE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The fake backend.
#[derive(Debug)]
pub struct FakeHypervisor {
    caps: Capabilities,
}

impl Default for FakeHypervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHypervisor {
    /// A fake backend with generous capabilities (any boot, NAT and bridged NICs).
    pub fn new() -> Self {
        Self {
            caps: Capabilities {
                backend: BackendKind::Qemu,
                accelerator: "fake".into(),
                hardware_accelerated: false,
                cpus: (1, 64),
                memory_bytes: (1 << 20, 1 << 40),
                boot_kinds: vec![BootKind::LinuxKernel, BootKind::Efi, BootKind::MacOs],
                disk_formats: vec![DiskFormat::Raw, DiskFormat::Qcow2],
                nat: true,
                bridged: true,
                shared_dirs: true,
                max_running_vms: None,
                vms_outlive_agent: false,
                snapshots: false,
                snapshot_devices: crate::SnapshotDevices::HotPlug,
                version: String::new(),
            },
        }
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.caps.check(&spec)?;
        tracing::info!(vm.id = %spec.id, "fake VM created");
        Ok(Arc::new(FakeVm {
            spec,
            state: watch::Sender::new(VmState::Created),
            ip: watch::Sender::new(None),
        }))
    }

    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        Ok(Vec::new())
    }
}

/// A VM of [`FakeHypervisor`].
#[derive(Debug)]
struct FakeVm {
    spec: VmSpec,
    state: watch::Sender<VmState>,
    ip: watch::Sender<Option<Ipv4Addr>>,
}

impl FakeVm {
    fn invalid(&self, operation: &'static str) -> VmError {
        VmError::InvalidState {
            id: self.spec.id.clone(),
            operation,
            state: self.state.borrow().clone(),
        }
    }
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
        if *self.state.borrow() != VmState::Created {
            return Err(self.invalid("start"));
        }
        self.state.send_replace(VmState::Running);
        self.ip.send_replace(Some(FAKE_IP));
        tracing::info!(vm.id = %self.spec.id, "fake VM running");
        Ok(())
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        if !matches!(*self.state.borrow(), VmState::Running | VmState::Stopping) {
            return Err(self.invalid("request stop"));
        }
        self.state.send_replace(VmState::Stopping);
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            state.send_if_modified(|s| {
                let stopping = *s == VmState::Stopping;
                if stopping {
                    *s = VmState::Stopped;
                }
                stopping
            });
        });
        Ok(())
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        self.state.send_if_modified(|s| {
            let live = !s.is_final();
            if live {
                *s = VmState::Stopped;
            }
            live
        });
        Ok(())
    }

    async fn remove(&self) -> Result<(), VmError> {
        if !self.state.borrow().is_final() {
            return Err(self.invalid("remove"));
        }
        Ok(())
    }
}
