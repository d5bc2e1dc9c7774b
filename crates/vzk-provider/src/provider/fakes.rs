//! In-test fakes of the provider's backends: a hypervisor whose VMs the test drives
//! (fail, ignore ACPI) and which records every call, and an image source over a local
//! directory. The fake VMs refuse every connection, so no guest ever answers SSH and no
//! traffic leaves the process.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use vzk_image::{Format, LocalImage, PullOptions, Reference, VmConfig};
use vzk_vm::{
    BackendKind, BootKind, Capabilities, DiskFormat, Hypervisor, HypervisorError, Vm, VmError,
    VmSpec, VmState,
};

use crate::images::{ImagePin, ImageSource, ImageSourceError};

/// What the backends were asked to do, in order (`"start vzk-<uid>"`, `"pull ..."`).
#[derive(Debug, Default)]
pub(super) struct CallLog(Mutex<Vec<(tokio::time::Instant, String)>>);

impl CallLog {
    fn push(&self, what: String) {
        self.0
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), what));
    }

    /// The calls so far.
    pub(super) fn calls(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// When each call starting with `prefix` was made.
    pub(super) fn times(&self, prefix: &str) -> Vec<tokio::time::Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| c.starts_with(prefix))
            .map(|(t, _)| *t)
            .collect()
    }
}

pub(super) struct TestHv {
    caps: Capabilities,
    pub(super) log: Arc<CallLog>,
    vms: Mutex<Vec<Arc<TestVm>>>,
    /// Whether new VMs power off on ACPI.
    pub(super) acpi: bool,
}

impl TestHv {
    pub(super) fn new(acpi: bool) -> Self {
        Self {
            caps: Capabilities {
                backend: BackendKind::Qemu,
                accelerator: "fake".into(),
                hardware_accelerated: false,
                cpus: (1, 8),
                memory_bytes: (64 << 20, 8 << 30),
                boot_kinds: vec![BootKind::LinuxKernel],
                disk_formats: vec![DiskFormat::Raw],
                nat: true,
                bridged: false,
                shared_dirs: true,
                max_running_vms: None,
                vms_outlive_agent: true,
            },
            log: Arc::new(CallLog::default()),
            vms: Mutex::new(Vec::new()),
            acpi,
        }
    }

    /// The VM created last for `id`.
    pub(super) fn vm(&self, id: &str) -> Option<Arc<TestVm>> {
        let vms = self.vms.lock().unwrap();
        vms.iter().rev().find(|v| v.spec.id == id).cloned()
    }
}

#[async_trait]
impl Hypervisor for TestHv {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.caps.check(&spec)?;
        self.log.push(format!("create {}", spec.id));
        let vm = Arc::new(TestVm {
            spec,
            state: watch::Sender::new(VmState::Created),
            ip: watch::Sender::new(None),
            log: self.log.clone(),
            acpi: self.acpi,
        });
        self.vms.lock().unwrap().push(vm.clone());
        Ok(vm)
    }

    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        Ok(Vec::new())
    }
}

pub(super) struct TestVm {
    spec: VmSpec,
    state: watch::Sender<VmState>,
    ip: watch::Sender<Option<Ipv4Addr>>,
    log: Arc<CallLog>,
    acpi: bool,
}

impl TestVm {
    /// The hypervisor reports the VM failed (as QEMU dying would).
    pub(super) fn fail(&self, reason: &str) {
        self.state.send_replace(VmState::Failed {
            reason: reason.into(),
        });
    }

    pub(super) fn current(&self) -> VmState {
        self.state.borrow().clone()
    }
}

#[async_trait]
impl Vm for TestVm {
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
        self.log.push(format!("start {}", self.spec.id));
        self.state.send_replace(VmState::Running);
        // TEST-NET-1, never dialled: `connect` below refuses.
        self.ip.send_replace(Some(Ipv4Addr::new(192, 0, 2, 10)));
        Ok(())
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        self.log.push(format!("request_stop {}", self.spec.id));
        if self.acpi {
            self.state.send_replace(VmState::Stopped);
        }
        Ok(())
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        self.log.push(format!("force_stop {}", self.spec.id));
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
        self.log.push(format!("remove {}", self.spec.id));
        Ok(())
    }

    async fn connect(&self, _addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        Err(std::io::ErrorKind::ConnectionRefused.into())
    }
}

/// A Linux image laid out in a directory; pulls can be made to fail.
pub(super) struct TestImages {
    dir: PathBuf,
    log: Arc<CallLog>,
    /// How many pulls fail before one succeeds.
    pub(super) failing_pulls: AtomicU32,
}

impl TestImages {
    pub(super) fn new(dir: &Path, log: Arc<CallLog>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("kernel"), b"kernel").unwrap();
        std::fs::write(dir.join("disk.img"), b"disk").unwrap();
        Self {
            dir: dir.to_owned(),
            log,
            failing_pulls: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl ImageSource for TestImages {
    fn cached(&self, _reference: &Reference) -> Option<LocalImage> {
        None
    }

    async fn pull(
        &self,
        reference: &Reference,
        _opts: &PullOptions,
    ) -> Result<LocalImage, ImageSourceError> {
        self.log.push(format!("pull {reference}"));
        let failing = self.failing_pulls.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_pulls.store(failing - 1, Ordering::SeqCst);
            return Err("registry unavailable".into());
        }
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "mediatype": "application/vnd.vz-kubelet.vm.config.v1+json",
            "os": "linux", "cpus": 1, "memoryBytes": 134217728
        }))?;
        Ok(LocalImage {
            digest: format!("sha256:{}", "0".repeat(64)),
            reference: reference.to_string(),
            dir: self.dir.clone(),
            format: Format::Vzk,
            config,
        })
    }

    fn pin(&self, _image: &LocalImage) -> Result<ImagePin, ImageSourceError> {
        Ok(Box::new(()))
    }

    fn clone_disk(&self, image: &LocalImage, dest: &Path) -> Result<DiskFormat, ImageSourceError> {
        std::fs::copy(image.disk(), dest)?;
        Ok(DiskFormat::Raw)
    }
}
