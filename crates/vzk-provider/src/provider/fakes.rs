//! In-test fakes of the provider's backends: a hypervisor whose VMs the test drives
//! (fail, ignore ACPI) and which records every call, an image source over a local
//! directory, and a container engine whose containers exit as the test scripts. The fake VMs refuse every connection, so no guest ever answers SSH and no
//! traffic leaves the process.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use vzk_image::{Format, LocalImage, PullOptions, Reference, VmConfig};
use vzk_vm::{
    BackendKind, BootKind, Capabilities, DiskFormat, Hypervisor, HypervisorError, Vm, VmError,
    VmSpec, VmState,
};

use k8s_openapi::jiff::Timestamp;
use vzk_core::stats::ContainerStats;
use vzk_core::streams::{AttachIo, ExitStatus, LogOptions, LogStream, PortStream};
use vzk_docker::{
    DockerError, OwnedContainer, PullOutcome, PullPolicy, RegistryAuth, RunState, SidecarSpec,
    SidecarState,
};

use crate::engine::ContainerEngine;
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
                disk_formats: vec![DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Nbd],
                nat: true,
                bridged: false,
                shared_dirs: true,
                max_running_vms: None,
                vms_outlive_agent: true,
                snapshots: false,
                snapshot_devices: vzk_vm::SnapshotDevices::HotPlug,
                version: String::new(),
            },
            log: Arc::new(CallLog::default()),
            vms: Mutex::new(Vec::new()),
            acpi,
        }
    }

    /// A Virtualization.framework-like backend: macOS, Linux kernel and EFI boots; raw
    /// disks, and with `nbd` (macOS 14+) NBD disks.
    pub(super) fn mac(nbd: bool) -> Self {
        let mut hv = Self::new(true);
        hv.caps.disk_formats = vec![DiskFormat::Raw];
        if nbd {
            hv.caps.disk_formats.push(DiskFormat::Nbd);
        }
        hv.caps.backend = BackendKind::Vz;
        hv.caps.boot_kinds = vec![BootKind::MacOs, BootKind::LinuxKernel, BootKind::Efi];
        hv.caps.max_running_vms = Some(2);
        hv
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

/// An image laid out in a directory (Linux by default); pulls can be made to fail.
pub(super) struct TestImages {
    dir: PathBuf,
    log: Arc<CallLog>,
    config: serde_json::Value,
    /// How many pulls fail before one succeeds.
    pub(super) failing_pulls: AtomicU32,
    /// The options of every pull, in order.
    pub(super) pulls: Mutex<Vec<PullOptions>>,
}

impl TestImages {
    /// A Linux image: a kernel and a disk.
    pub(super) fn new(dir: &Path, log: Arc<CallLog>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("kernel"), b"kernel").unwrap();
        std::fs::write(dir.join("disk.img"), b"disk").unwrap();
        Self {
            dir: dir.to_owned(),
            log,
            config: serde_json::json!({
                "mediatype": "application/vnd.vz-kubelet.vm.config.v1+json",
                "os": "linux", "cpus": 1, "memoryBytes": 134217728
            }),
            failing_pulls: AtomicU32::new(0),
            pulls: Mutex::new(Vec::new()),
        }
    }

    /// A macOS image as macOS-vz-kubelet pushes it: `config` (its `config.json`), a disk
    /// and the auxiliary storage `aux.img`.
    pub(super) fn mac(dir: &Path, log: Arc<CallLog>, config: serde_json::Value) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("disk.img"), b"apfs disk").unwrap();
        std::fs::write(dir.join("aux.img"), b"aux storage of the image").unwrap();
        Self {
            dir: dir.to_owned(),
            log,
            config,
            failing_pulls: AtomicU32::new(0),
            pulls: Mutex::new(Vec::new()),
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
        opts: &PullOptions,
    ) -> Result<LocalImage, ImageSourceError> {
        self.log.push(format!("pull {reference}"));
        self.pulls.lock().unwrap().push(opts.clone());
        let failing = self.failing_pulls.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_pulls.store(failing - 1, Ordering::SeqCst);
            return Err("registry unavailable".into());
        }
        let config: VmConfig = serde_json::from_value(self.config.clone())?;
        Ok(LocalImage {
            digest: format!("sha256:{}", "0".repeat(64)),
            reference: reference.to_string(),
            dir: self.dir.clone(),
            format: Format::Vzk,
            config,
            lazy: None,
        })
    }

    async fn pull_lazy(
        &self,
        reference: &Reference,
        _opts: &PullOptions,
        _lazy: &vzk_image::LazyOptions,
    ) -> Result<vzk_image::LazyPull, ImageSourceError> {
        self.log.push(format!("pull_lazy {reference}"));
        Ok(vzk_image::LazyPull::Unsupported {
            reason: "the test image source serves no disk on demand".into(),
        })
    }

    async fn reserve_lazy(
        &self,
        reference: &Reference,
        _opts: &PullOptions,
        _lazy: &vzk_image::LazyOptions,
    ) -> Result<LocalImage, ImageSourceError> {
        self.log.push(format!("reserve_lazy {reference}"));
        Err("the test image source serves no disk on demand".into())
    }

    fn pin(&self, _image: &LocalImage) -> Result<ImagePin, ImageSourceError> {
        Ok(Box::new(()))
    }

    fn clone_disk(
        &self,
        image: &LocalImage,
        dest: &Path,
        _formats: &[DiskFormat],
    ) -> Result<crate::images::PodDisk, ImageSourceError> {
        std::fs::copy(image.disk(), dest)?;
        Ok(crate::images::PodDisk {
            path: dest.to_path_buf(),
            format: DiskFormat::Raw,
            server: None,
        })
    }

    fn clone_file(
        &self,
        base: &Path,
        format: DiskFormat,
        dest: &Path,
    ) -> Result<DiskFormat, ImageSourceError> {
        std::fs::copy(base, dest)?;
        Ok(format)
    }
}

/// A container engine in memory. Each start of a container pops the next scripted
/// outcome for its name: `Some(code)` exits at once with `code`, `None` (or nothing
/// scripted) runs until stopped (exit 143).
#[derive(Default)]
pub(super) struct TestEngine {
    log: Arc<CallLog>,
    next: AtomicU32,
    containers: Mutex<std::collections::BTreeMap<String, FakeContainer>>,
    changed: watch::Sender<u64>,
    script: Mutex<std::collections::HashMap<String, std::collections::VecDeque<Option<i32>>>>,
}

#[derive(Debug, Clone)]
struct FakeContainer {
    name: String,
    pod: vzk_core::PodKey,
    attempt: u32,
    state: RunState,
}

impl TestEngine {
    pub(super) fn new(log: Arc<CallLog>) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }

    /// The outcomes of the next starts of container `name`.
    pub(super) fn script(&self, name: &str, outcomes: &[Option<i32>]) {
        self.script
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .extend(outcomes.iter().copied());
    }

    fn set(&self, id: &str, state: RunState) {
        if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
            c.state = state;
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn state(&self, id: &str) -> Result<SidecarState, DockerError> {
        let cs = self.containers.lock().unwrap();
        let c = cs
            .get(id)
            .ok_or_else(|| DockerError::NotFound(id.to_owned()))?;
        Ok(SidecarState {
            id: id.to_owned(),
            image_id: "sha256:fake".into(),
            status: c.state.clone(),
        })
    }

    fn exited(code: i32) -> RunState {
        RunState::Exited {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: Some(Timestamp::now()),
            finished_at: Some(Timestamp::now()),
        }
    }

    fn unsupported(what: &str) -> DockerError {
        DockerError::NotRunning(format!("{what} is not faked"))
    }
}

#[async_trait]
impl ContainerEngine for TestEngine {
    async fn ping(&self) -> Result<(), DockerError> {
        Ok(())
    }
    async fn ensure_image(
        &self,
        image: &str,
        _policy: PullPolicy,
        _credentials: &[RegistryAuth],
    ) -> Result<PullOutcome, DockerError> {
        self.log.push(format!("ensure_image {image}"));
        Ok(PullOutcome::AlreadyPresent)
    }
    async fn image_present(&self, _image: &str) -> Result<bool, DockerError> {
        Ok(true)
    }
    async fn create(&self, spec: &SidecarSpec<'_>) -> Result<String, DockerError> {
        let id = format!("c{}", self.next.fetch_add(1, Ordering::SeqCst));
        self.log
            .push(format!("create {} {}", spec.container.name, spec.attempt));
        self.containers.lock().unwrap().insert(
            id.clone(),
            FakeContainer {
                name: spec.container.name.clone(),
                pod: spec.pod.clone(),
                attempt: spec.attempt,
                state: RunState::Created,
            },
        );
        Ok(id)
    }
    async fn start(&self, id: &str) -> Result<(), DockerError> {
        let name = self
            .containers
            .lock()
            .unwrap()
            .get(id)
            .map(|c| c.name.clone())
            .ok_or_else(|| DockerError::NotFound(id.to_owned()))?;
        self.log.push(format!("start {name}"));
        let outcome = self
            .script
            .lock()
            .unwrap()
            .get_mut(&name)
            .and_then(|q| q.pop_front())
            .flatten();
        self.set(
            id,
            match outcome {
                Some(code) => Self::exited(code),
                None => RunState::Running {
                    started_at: Some(Timestamp::now()),
                },
            },
        );
        Ok(())
    }
    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), DockerError> {
        let running = matches!(self.state(id)?.status, RunState::Running { .. });
        if running {
            let name = self.containers.lock().unwrap()[id].name.clone();
            self.log.push(format!("stop {name}"));
            self.set(id, Self::exited(143));
        }
        Ok(())
    }
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        self.containers.lock().unwrap().remove(id);
        Ok(())
    }
    async fn inspect(&self, id: &str) -> Result<SidecarState, DockerError> {
        self.state(id)
    }
    async fn wait(&self, id: &str) -> Result<SidecarState, DockerError> {
        let mut rx = self.changed.subscribe();
        loop {
            let st = self.state(id)?;
            if !matches!(st.status, RunState::Running { .. } | RunState::Created) {
                return Ok(st);
            }
            if rx.changed().await.is_err() {
                return Ok(st);
            }
        }
    }
    async fn list_ours(&self, pod_uid: Option<&str>) -> Result<Vec<OwnedContainer>, DockerError> {
        Ok(self
            .containers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| pod_uid.is_none_or(|u| u == c.pod.uid))
            .map(|(id, c)| OwnedContainer {
                id: id.clone(),
                name: vzk_docker::container_name(&c.pod, &c.name, c.attempt),
                pod_uid: c.pod.uid.clone(),
                namespace: c.pod.namespace.clone(),
                pod: c.pod.name.clone(),
                container: c.name.clone(),
                attempt: c.attempt,
                running: matches!(c.state, RunState::Running { .. }),
            })
            .collect())
    }
    async fn find(
        &self,
        pod: &vzk_core::PodKey,
        container: &str,
    ) -> Result<Option<OwnedContainer>, DockerError> {
        Ok(self
            .list_ours(Some(&pod.uid))
            .await?
            .into_iter()
            .filter(|c| c.container == container)
            .max_by_key(|c| c.attempt))
    }
    async fn cleanup(&self, _keep: &[String]) -> Result<Vec<String>, DockerError> {
        Ok(Vec::new())
    }
    async fn exec(
        &self,
        _id: &str,
        _command: Vec<String>,
        _io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        Err(Self::unsupported("exec"))
    }
    async fn exec_probe(
        &self,
        _id: &str,
        _command: Vec<String>,
        _io: AttachIo,
    ) -> Result<ExitStatus, DockerError> {
        Err(Self::unsupported("exec"))
    }
    async fn attach(&self, _id: &str, _io: AttachIo) -> Result<ExitStatus, DockerError> {
        Err(Self::unsupported("attach"))
    }
    async fn logs(&self, _id: &str, _opts: &LogOptions) -> Result<LogStream, DockerError> {
        Err(Self::unsupported("logs"))
    }
    async fn port_forward(
        &self,
        _id: &str,
        _port: u16,
        _stream: PortStream,
    ) -> Result<(), DockerError> {
        Err(Self::unsupported("port-forward"))
    }
    async fn connect_in(
        &self,
        _id: &str,
        _addr: SocketAddr,
        _timeout: Duration,
    ) -> Result<tokio::net::TcpStream, DockerError> {
        Err(Self::unsupported("connect"))
    }
    async fn stats(&self, _id: &str, _name: &str) -> Result<ContainerStats, DockerError> {
        Err(Self::unsupported("stats"))
    }
}
