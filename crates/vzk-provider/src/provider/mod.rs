//! [`VmProvider`]: the pod backend that runs container 0 of each pod as a VM on the
//! injected [`Backends`] (hypervisor, image source, whether Docker runs side-cars).
//!
//! # Contract
//! * `create_pod` validates what can be validated without the image (container 0
//!   exists, resources are whole vCPUs within the backend's bounds, SSH credentials
//!   load) and returns `Invalid` otherwise; the rest runs in a per-pod task
//!   ([`crate::pod`]) that reports through the notifier.
//! * `delete_pod` cancels that task, runs the preStop exec hook over SSH (bounded by
//!   the grace period), asks the guest to power off (ACPI), forces it off when the
//!   grace is spent, removes the VM (state dir, TAP) and the pod directory (disk
//!   clone, console log), and frees the VM slot.
//! * At start-up the VMs of a previous agent are re-adopted (the backend's VMs keep running
//!   across agent restarts) and listed by `list_pods`; VMs with our id prefix but no
//!   pod record are stopped and removed (our leftovers only).
//! * Streams: exec/attach/port-forward go over the guest's SSH (exit codes kept),
//!   logs are the serial console, host-side stats come from the `Vm` handle.
//! * Every pod's tasks (lifecycle, side-car and init supervisors) run in its span, in its
//!   task tracker, under its cancellation token: deletion cancels and waits for them
//!   before stopping anything; [`VmProvider::shutdown`] does the same for every pod and
//!   leaves VMs and containers running for the next agent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tracing::{Instrument, info, warn};
use vzk_core::streams::ContainerRef;
use vzk_core::{PodEvent, PodKey, PodLifecycle, PodNotifier, ProviderError};
use vzk_guest::GuestSession;
use vzk_image::{ImageStore, Keyring, RegistryHosts};
use vzk_vm::{Hypervisor, Vm, VmState};

use crate::args::ProviderArgs;
use crate::error::ProviderInitError;
use crate::images::{ImageSource, StoreSource};
use crate::pod::{self, PodEntry, detached, error_chain, lock, uid_of};
use crate::record::PodRecord;
use crate::resources::{ResourcePolicy, vm_resources};
use crate::sidecars::Containers;
use crate::slots::Slots;

/// The extended resource counting VM slots.
pub const VM_RESOURCE: &str = "vz-kubelet.io/vm";

/// State shared by the provider and its pod tasks.
pub(crate) struct Inner {
    pub(crate) args: ProviderArgs,
    pub(crate) client: kube::Client,
    pub(crate) hv: Arc<dyn Hypervisor>,
    pub(crate) pods_dir: PathBuf,
    pub(crate) images: Arc<dyn ImageSource>,
    pub(crate) slots: Slots,
    pub(crate) policy: ResourcePolicy,
    pub(crate) node_keyring: Keyring,
    /// Mirrors and TLS per registry for VM images (`--registry-config-dir`).
    pub(crate) registry_hosts: RegistryHosts,
    pub(crate) ready_timeout: Duration,
    pub(crate) notifier: Mutex<Option<PodNotifier>>,
    /// Pod volumes (host side, refresh) and each pod's guest mounts.
    pub(crate) volumes: crate::volumes::VmVolumes,
    pub(crate) pods: Mutex<HashMap<String, Arc<PodEntry>>>,
    cpu_samples: Mutex<HashMap<String, (Instant, u64)>>,
    /// The last health checks (`ping`), reported as node conditions.
    health: Mutex<Vec<crate::health::Check>>,
    /// The hypervisor's limit of running VMs and its leak ([`crate::vm_limit`]).
    pub(crate) vm_limit: Mutex<crate::vm_limit::VmLimit>,
    /// Docker side-cars (containers 1..N).
    pub(crate) sidecars: crate::sidecars::Sidecars,
    /// Pulls, start phases, boots ([`crate::metrics`]).
    pub(crate) metrics: crate::metrics::ProviderMetrics,
    /// Templates for start by restore ([`crate::templates`]).
    pub(crate) templates: Arc<crate::templates::Templates>,
    /// Stops the provider's own background work (templates made ahead of time) when it
    /// goes.
    pub(crate) background: tokio_util::sync::CancellationToken,
}

/// Written into a pod's dir when its deletion begins: a pod dir holding it is never
/// booted again after an agent restart, its deletion is finished instead.
const DELETING: &str = "deleting";

/// Why a recorded pod's VM ended when the agent found it gone at start-up.
pub(crate) const LOST_VM_MESSAGE: &str =
    "the VM was gone when the agent started (the host or the hypervisor restarted)";

/// The VM pod provider. Implements `PodLifecycle`, `NodeProvider` and
/// `StreamingRuntime`.
pub struct VmProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmProvider")
            .field("data_dir", &self.inner.args.data_dir)
            .field("max_vms", &self.inner.slots.capacity())
            .finish_non_exhaustive()
    }
}

fn mkdir(path: PathBuf) -> Result<PathBuf, ProviderInitError> {
    std::fs::create_dir_all(&path).map_err(|source| ProviderInitError::CreateDir {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The backends a provider runs pods on (see [`VmProvider::with_backends`]).
pub struct Backends {
    /// This host's hypervisor (`vzk_backend::open`), or a fake.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// VM images and disk clones ([`StoreSource`]), or a fake.
    pub images: Arc<dyn ImageSource>,
    /// What runs side-car and init containers (the local dockerd, a given engine, or
    /// none).
    pub containers: Containers,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("hypervisor", &self.hypervisor.capabilities().backend)
            .field("containers", &self.containers)
            .finish_non_exhaustive()
    }
}

impl VmProvider {
    /// Brings the provider up on `hv`, this host's hypervisor backend (chosen by the
    /// caller, e.g. `vzk_backend::open`), the image cache in the data dir and the local
    /// dockerd; see [`VmProvider::with_backends`].
    pub async fn new(
        args: ProviderArgs,
        node_name: &str,
        node_ip: IpAddr,
        client: kube::Client,
        hv: Arc<dyn Hypervisor>,
    ) -> Result<Arc<VmProvider>, ProviderInitError> {
        let pods_dir = mkdir(mkdir(args.data_dir.clone())?.join("pods"))?;
        let images_dir = mkdir(args.data_dir.join("images"))?;
        let store = ImageStore::open(&images_dir, args.image_cache_bytes)
            .map_err(ProviderInitError::OpenImageStore)?;
        let images = StoreSource::new(store, &pods_dir).map_err(ProviderInitError::DetectCloner)?;
        let backends = Backends {
            hypervisor: hv,
            images: Arc::new(images),
            containers: Containers::Docker,
        };
        Self::with_backends(args, node_name, node_ip, client, backends).await
    }

    /// Brings the provider up on `backends` and re-adopts the VMs a previous agent left
    /// running. `client` is the node's own client, used only to read the Secrets and
    /// ConfigMaps a pod references.
    pub async fn with_backends(
        args: ProviderArgs,
        node_name: &str,
        node_ip: IpAddr,
        client: kube::Client,
        backends: Backends,
    ) -> Result<Arc<VmProvider>, ProviderInitError> {
        // A bad hosts.toml stops the agent at start-up, before any pod is handled.
        let registry_hosts = args
            .registry_hosts()
            .map_err(ProviderInitError::RegistryConfig)?;
        if let Some(dir) = registry_hosts.dir() {
            info!(dir = %dir.display(), registries = ?registry_hosts.namespaces(), "registry hosts configuration loaded");
        }
        let data = mkdir(args.data_dir.clone())?;
        let pods_dir = mkdir(data.join("pods"))?;
        let Backends {
            hypervisor: hv,
            images,
            containers,
        } = backends;
        let node_keyring = match &args.docker_config {
            Some(p) => {
                Keyring::from_docker_config_file(p).map_err(ProviderInitError::ReadDockerConfig)?
            }
            None => Keyring::new(),
        };
        let caps = hv.capabilities().clone();
        let policy = ResourcePolicy {
            default_cpus: args.default_cpus,
            default_memory_bytes: args.default_memory_mib << 20,
            cpus: caps.cpus,
            memory_bytes: caps.memory_bytes,
        };
        let slots = Slots::new(args.max_vms);
        info!(node = node_name, node_ip = %node_ip, accel = %caps.accelerator, max_vms = args.max_vms, data_dir = %data.display(), "VM provider starting");
        let volumes = crate::volumes::VmVolumes::new(client.clone(), &pods_dir);
        let sidecars = crate::sidecars::Sidecars::new(node_name, containers).await;
        let inner = Arc::new(Inner {
            ready_timeout: Duration::from_secs(args.ready_timeout_secs),
            args,
            client,
            hv: hv.clone(),
            pods_dir,
            images,
            slots,
            policy,
            node_keyring,
            registry_hosts,
            notifier: Mutex::new(None),
            volumes,
            pods: Mutex::new(HashMap::new()),
            cpu_samples: Mutex::new(HashMap::new()),
            health: Mutex::new(Vec::new()),
            vm_limit: Mutex::new(crate::vm_limit::VmLimit::default()),
            sidecars,
            metrics: crate::metrics::ProviderMetrics::default(),
            templates: Arc::default(),
            background: tokio_util::sync::CancellationToken::new(),
        });
        let h = hv.clone();
        let adopted = detached(async move { h.adopt_existing().await })
            .await
            .map_err(ProviderInitError::Adopt)?;
        for vm in adopted {
            inner.adopt(vm).await;
        }
        // Pods whose VM is gone (the host or hypervisor restarted): their VM ended.
        inner.adopt_lost().await;
        // Side-cars of pods no re-adopted VM belongs to are leftovers.
        crate::sidecars::cleanup_leftovers(&inner).await;
        if inner.args.snapshot_start {
            let (templates, images_dir) =
                (inner.templates.clone(), inner.args.data_dir.join("images"));
            tokio::task::spawn_blocking(move || templates.verify_all(&images_dir));
        }
        tokio::spawn(crate::pod::prepare_ahead(
            inner.clone(),
            inner.background.clone(),
        ));
        Ok(Arc::new(VmProvider { inner }))
    }

    fn entry(&self, target: &ContainerRef) -> Result<Arc<PodEntry>, ProviderError> {
        let pods = lock(&self.inner.pods);
        let e = pods
            .values()
            .find(|e| {
                e.key.namespace == target.namespace
                    && e.key.name == target.pod
                    && target.uid.as_ref().is_none_or(|u| *u == e.key.uid)
            })
            .cloned()
            .ok_or_else(|| {
                ProviderError::NotFound(format!("pod {}/{}", target.namespace, target.pod))
            })?;
        if e.container != target.container {
            return Err(ProviderError::NotFound(format!(
                "container {:?} of pod {}: only the VM container {:?} is run by this provider",
                target.container, e.key, e.container
            )));
        }
        Ok(e)
    }

    /// The pod of `target` when `target.container` is one of its side-cars.
    fn sidecar_entry(&self, target: &ContainerRef) -> Option<Arc<PodEntry>> {
        lock(&self.inner.pods)
            .values()
            .find(|e| {
                e.key.namespace == target.namespace
                    && e.key.name == target.pod
                    && target.uid.as_ref().is_none_or(|u| *u == e.key.uid)
            })
            .filter(|e| crate::sidecars::is_sidecar(e, &target.container))
            .cloned()
    }

    fn session(e: &PodEntry) -> Result<GuestSession, ProviderError> {
        e.session().ok_or_else(|| ProviderError::Unavailable {
            message: format!("the VM of pod {} has no address yet", e.key),
            retry_after: Some(Duration::from_secs(2)),
        })
    }
}

impl VmProvider {
    /// Registers the provider's metrics ([`crate::metrics`]) into the agent's registry,
    /// which the kubelet API serves on `/metrics`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
        registry.register_collector(Box::new(crate::metrics::StateCollector {
            inner: Arc::downgrade(&self.inner),
        }));
    }

    /// The agent is going away: stops every pod's tasks and waits for them (at most
    /// `timeout`), leaving VMs and side-car containers running for the next agent to
    /// re-adopt. Returns whether every task returned in time.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.inner.background.cancel();
        let entries: Vec<_> = lock(&self.inner.pods).values().cloned().collect();
        let all = futures::future::join_all(entries.iter().map(|e| e.cancel_tasks()));
        let done = tokio::time::timeout(timeout, all).await.is_ok();
        if !done {
            warn!(
                timeout_secs = timeout.as_secs(),
                "pod tasks did not stop in time"
            );
        }
        done
    }
}

impl Drop for VmProvider {
    /// Without [`VmProvider::shutdown`] (a test dropping the provider): cancels the pods'
    /// tasks without waiting; VMs keep running.
    fn drop(&mut self) {
        self.inner.background.cancel();
        for e in lock(&self.inner.pods).values() {
            e.cancel.cancel();
        }
    }
}

impl Inner {
    /// This node's VMs that are starting, running or stopping.
    pub(crate) fn running_vms(&self) -> u32 {
        let n = lock(&self.pods)
            .values()
            .filter_map(|e| e.vm())
            .filter(|vm| {
                matches!(
                    *vm.state().borrow(),
                    VmState::Starting | VmState::Running | VmState::Stopping
                )
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The hypervisor refused to start `e`'s VM for its limit: a pod event, and the
    /// node condition when the refusal is a leak. Returns the status message.
    pub(crate) fn vm_limit_refused(&self, e: &PodEntry, detail: &str) -> String {
        let running = self.running_vms();
        let limit = self.hv.capabilities().max_running_vms;
        let msg = crate::vm_limit::event_message(detail, running, limit);
        self.event(e, PodEvent::warning("VMLimitReached", msg.clone()));
        if let Some(r) = lock(&self.vm_limit).refused(running, limit) {
            warn!(pod = %e.key, running = r.running, limit = r.limit, "the hypervisor refuses VMs below its limit: leaked limit or another program's VMs");
        }
        msg
    }

    /// Checks the backends (at once, each bounded) and keeps the verdicts for
    /// [`NodeProvider::conditions`].
    async fn check_health(&self) -> Vec<crate::health::Check> {
        use crate::health::{Check, MIN_FREE_BYTES, bounded};
        let data_dir = self.args.data_dir.clone();
        let (vm, docker, data) = tokio::join!(
            bounded("the VM backend", self.hv.health()),
            bounded("dockerd", async {
                let rt = self.sidecars.runtime().await?;
                rt.ping().await.map_err(|e| error_chain(&e))
            }),
            bounded("the data directory", async move {
                tokio::task::spawn_blocking(move || {
                    crate::health::data_dir(&data_dir, MIN_FREE_BYTES)
                })
                .await
                .unwrap_or_else(|e| Err(format!("data directory check: {e}")))
            }),
        );
        let checks = vec![
            Check::new("VMBackendReady", vm),
            Check::new("DockerReady", docker),
            Check::new("DataDirReady", data),
        ];
        lock(&self.health).clone_from(&checks);
        checks
    }

    /// Takes back the pods a previous agent recorded whose VM no longer exists (a host
    /// reboot, a hypervisor crash while no agent ran): for the kubelet their container
    /// ended. Under `Never` the pod fails with that as the reason; otherwise the VM boots
    /// again as a restart (restartCount + 1, `lastState` saying why). A directory without
    /// a readable record is a leftover and is removed.
    async fn adopt_lost(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(&self.pods_dir) else {
            return;
        };
        for d in dirs.filter_map(Result::ok) {
            let uid = d.file_name().to_string_lossy().into_owned();
            if lock(&self.pods).contains_key(&uid) || !d.path().is_dir() {
                continue;
            }
            let dir = d.path();
            let Some(e) = self.recorded_entry(&dir) else {
                warn!(dir = %dir.display(), "removing a leftover pod directory");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            let ended = ContainerStateTerminated {
                exit_code: 137,
                reason: Some("Error".into()),
                message: Some(LOST_VM_MESSAGE.into()),
                finished_at: Some(crate::pod::now()),
                ..Default::default()
            };
            let never = e
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.as_deref())
                == Some("Never");
            let mut history = crate::record::load_history(&e.dir);
            lock(&self.pods).insert(uid, e.clone());
            if dir.join(DELETING).exists() {
                // A previous agent was deleting this pod: the pod controller finishes the
                // deletion; nothing is booted for a pod on its way out.
                info!(pod = %e.key, "finishing the deletion a previous agent began");
                *lock(&e.history) = history;
                self.set_phase(
                    &e,
                    crate::status::VmPhase::Terminated {
                        exit_code: ended.exit_code,
                        reason: "Error".into(),
                        message: Some("the agent stopped while it was deleting the pod".into()),
                        started_at: None,
                        finished_at: crate::pod::now(),
                    },
                );
                e.ended.cancel();
            } else if never {
                warn!(pod = %e.key, "the pod's VM is gone and restartPolicy is Never: the pod failed");
                *lock(&e.history) = history;
                self.set_phase(
                    &e,
                    crate::status::VmPhase::Terminated {
                        exit_code: ended.exit_code,
                        reason: "Error".into(),
                        message: ended.message.clone(),
                        started_at: None,
                        finished_at: crate::pod::now(),
                    },
                );
                self.event(&e, PodEvent::warning("Failed", LOST_VM_MESSAGE));
                e.ended.cancel();
            } else {
                history.restart_count += 1;
                history.last_state = Some(ended);
                if let Err(err) = crate::record::save_history(&e.dir, &history) {
                    warn!(pod = %e.key, error = %err, "keeping the VM's restart count on disk");
                }
                *lock(&e.history) = history;
                // A new VM from a fresh disk clone: a new guest host key, and the lost
                // boot's console is the previous one (`kubectl logs --previous`).
                let _ = std::fs::remove_file(e.dir.join(crate::pod::HOST_KEY_FILE));
                let _ = std::fs::rename(e.console_log(), e.previous_console_log());
                warn!(pod = %e.key, "the pod's VM is gone: booting it again");
                self.event(
                    &e,
                    PodEvent::warning("Failed", format!("{LOST_VM_MESSAGE}; booting it again")),
                );
                e.spawn(pod::run_new(self.clone(), e.clone()));
            }
            crate::sidecars::start(self, &e, true);
        }
    }

    /// The pod a previous agent recorded in `dir`, as an entry (not yet listed): `None`
    /// when the record is missing or unreadable or the node's credentials cannot be set up.
    fn recorded_entry(&self, dir: &std::path::Path) -> Option<Arc<PodEntry>> {
        let record = PodRecord::load(&dir.join("pod.json")).ok()?;
        let creds = match self.credentials(&record.pod) {
            Ok(c) => c,
            Err(err) => {
                warn!(dir = %dir.display(), error = %err, "the recorded pod's guest credentials");
                return None;
            }
        };
        // A pod recorded before per-pod identities has none: it keeps the node's key. So
        // does one whose key file cannot be read: the pod and its VM stay the agent's
        // (dropping the entry would orphan them), entered with the node's key if the
        // guest still takes it.
        let node_creds = creds.clone();
        let creds = match crate::identity::with_identity(creds, dir, &record.key(), false) {
            Ok(c) => c,
            Err(err) => {
                warn!(dir = %dir.display(), error = %err, "the recorded pod's SSH identity is unreadable; trying the node's key");
                node_creds
            }
        };
        let start = record
            .start_time
            .parse::<Timestamp>()
            .map(Time)
            .unwrap_or_else(|_| Time(Timestamp::now()));
        Some(Arc::new(PodEntry::new(
            record.key(),
            record.pod.clone(),
            dir.to_owned(),
            start,
            creds,
        )))
    }

    /// Re-adopts a VM a previous agent left.
    async fn adopt(self: &Arc<Self>, vm: Arc<dyn Vm>) {
        let id = vm.id().to_owned();
        if id.starts_with(crate::templates::VM_ID_PREFIX) {
            // A template build the previous agent did not finish: its files are gone with
            // it (a later pod starts the build again).
            warn!(vm.id = %id, "removing the VM of an unfinished template build");
            let v = vm.clone();
            let _ = detached(async move {
                let _ = v.force_stop().await;
                v.remove().await
            })
            .await;
            return;
        }
        let Some(uid) = uid_of(&id).map(str::to_owned) else {
            return;
        };
        let dir = self.pods_dir.join(&uid);
        let e = match self.recorded_entry(&dir) {
            Some(e) if !vm.state().borrow().is_final() => e,
            Some(_) => {
                // Its process is gone: the pod's VM ended; [`Inner::adopt_lost`] says so.
                warn!(vm.id = %id, "the VM of a recorded pod is no longer running");
                let v = vm.clone();
                let _ = detached(async move { v.remove().await }).await;
                return;
            }
            None => {
                warn!(vm.id = %id, "removing a leftover VM that cannot be re-adopted");
                let v = vm.clone();
                let _ = detached(async move {
                    let _ = v.force_stop().await;
                    v.remove().await
                })
                .await;
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
        };
        *lock(&e.vm) = Some(vm.clone());
        *lock(&e.history) = crate::record::load_history(&e.dir);
        *lock(&e.slot) = self.slots.try_acquire();
        crate::volumes::readopt(self, &e.pod).await;
        info!(pod = %e.key, vm.id = %id, "re-adopted a running VM");
        lock(&self.pods).insert(uid, e.clone());
        // A disk the agent before this one served on demand is served again (where its
        // QEMU reconnects) before the pod is watched.
        let lazy = vzk_image::clone::is_served_over_nbd(&e.dir.join("disk"));
        let (inner, entry) = (self.clone(), e.clone());
        e.spawn(async move {
            if lazy {
                pod::reserve_lazy_disk(inner.clone(), entry.clone()).await;
            }
            pod::run_adopted(inner, entry, vm).await;
        });
        crate::init::adopt(self, &e);
        crate::sidecars::start(self, &e, true);
    }
}

#[async_trait]
impl PodLifecycle for VmProvider {
    async fn create_pod(&self, pod: &Pod) -> Result<(), ProviderError> {
        let key = PodKey::of(pod).ok_or_else(|| {
            ProviderError::invalid("InvalidPod", "pod lacks namespace, name or uid")
        })?;
        let c0 = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .ok_or_else(|| ProviderError::invalid("InvalidPod", "pod has no containers"))?;
        // Check what the pod itself asks for now (image defaults cannot be wrong here).
        if c0.resources.is_some() {
            vm_resources(
                c0.resources.as_ref(),
                Some(self.inner.policy.default_cpus.max(self.inner.policy.cpus.0)),
                Some(
                    self.inner
                        .policy
                        .default_memory_bytes
                        .max(self.inner.policy.memory_bytes.0),
                ),
                &self.inner.policy,
            )
            .map_err(|e| ProviderError::invalid(e.reason(), e.to_string()))?;
        }
        crate::probes::ContainerProbes::from_container(c0)
            .map_err(|e| ProviderError::invalid("InvalidProbe", e.to_string()))?;
        crate::sidecars::validate(pod)?;
        crate::init::validate(pod)?;
        let creds = self.inner.credentials(pod)?;
        if lock(&self.inner.pods).contains_key(&key.uid) {
            return Ok(());
        }
        let dir = self.inner.pods_dir.join(&key.uid);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ProviderError::failed("CreatePodDirFailed", e.to_string()))?;
        let creds = crate::identity::with_identity(creds, &dir, &key, true)
            .map_err(|msg| ProviderError::failed("CreatePodDirFailed", msg))?;
        let start = Time(Timestamp::now());
        PodRecord::new(&key, pod, start.0.to_string())
            .save(&dir.join("pod.json"))
            .map_err(|e| ProviderError::failed("CreatePodDirFailed", e.to_string()))?;
        crate::crash::point("create:recorded");
        let e = Arc::new(PodEntry::new(key.clone(), pod.clone(), dir, start, creds));
        lock(&self.inner.pods).insert(key.uid.clone(), e.clone());
        self.inner.push_status(&e);
        e.spawn(pod::run_new(self.inner.clone(), e.clone()));
        crate::sidecars::start(&self.inner, &e, false);
        Ok(())
    }

    async fn update_pod(&self, pod: &Pod) -> Result<(), ProviderError> {
        // The only mutable fields of a running pod (image, activeDeadlineSeconds,
        // tolerations) need no action for a VM; an image change takes effect on re-creation.
        // Side-cars keep the resolved spec (env) in memory for their re-creations.
        crate::sidecars::set_resolved(&self.inner, pod);
        Ok(())
    }

    async fn delete_pod(&self, pod: &Pod, grace: Duration) -> Result<(), ProviderError> {
        let key = PodKey::of(pod).ok_or_else(|| {
            ProviderError::invalid("InvalidPod", "pod lacks namespace, name or uid")
        })?;
        let e = lock(&self.inner.pods)
            .get(&key.uid)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound(key.to_string()))?;
        let deadline = tokio::time::Instant::now() + grace;
        // A deletion under way outlives a crash of the agent: the next one finishes it
        // rather than booting the pod again (see `adopt_lost`).
        if let Err(err) = std::fs::write(e.dir.join(DELETING), b"") {
            warn!(pod = %e.key, error = %err, "marking the pod as being deleted");
        }
        // The lifecycle, side-car and init supervisors return first: nothing restarts
        // what is being stopped.
        e.cancel_tasks().await;
        // Side-cars stop in parallel with the VM, within the same grace period.
        let sidecars = tokio::spawn(
            crate::sidecars::stop_all(self.inner.clone(), e.clone(), deadline)
                .instrument(e.span().clone()),
        );
        // Wait for a create in flight to finish storing its VM.
        let _created = e.create_lock.lock().await;
        if let Some(vm) = e.vm() {
            self.inner.event(
                &e,
                PodEvent::normal(
                    "Killing",
                    format!("Stopping VM {} (grace {}s)", vm.id(), grace.as_secs()),
                ),
            );
            let pre_stop = e
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.lifecycle.as_ref())
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|x| x.command.clone());
            if let (Some(cmd), Some(session)) = (pre_stop, e.session()) {
                let s = session.clone();
                let run = detached(async move { s.output(&cmd).await });
                match tokio::time::timeout_at(deadline, run).await {
                    Ok(Ok(o)) if o.status.success() => {}
                    Ok(Ok(o)) => self.inner.event(
                        &e,
                        PodEvent::warning(
                            "FailedPreStopHook",
                            format!("PreStopHook exited with {}", o.status.code),
                        ),
                    ),
                    Ok(Err(err)) => self.inner.event(
                        &e,
                        PodEvent::warning(
                            "FailedPreStopHook",
                            vzk_guest::ErrorChain(&err).to_string(),
                        ),
                    ),
                    Err(_) => self.inner.event(
                        &e,
                        PodEvent::warning(
                            "FailedPreStopHook",
                            "PreStopHook did not finish within the grace period",
                        ),
                    ),
                }
            }
            // ACPI, then the shutdown command over SSH, then force (issue 5).
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let path = pod::stop_vm(&self.inner, &e, vm.clone(), remaining).await;
            if let Some(s) = e.session() {
                s.close();
            }
            let v = vm.clone();
            let removed = detached(async move {
                let _ = vzk_vm::wait_for_state(
                    v.as_ref(),
                    Duration::from_secs(10),
                    "stop",
                    vzk_vm::VmState::is_final,
                )
                .await;
                crate::crash::point("delete:vm-stopped");
                v.remove().await
            })
            .await;
            crate::crash::point("delete:vm-removed");
            match removed {
                Ok(()) => info!(pod = %e.key, ?path, "VM stopped and removed"),
                Err(err) => {
                    let msg = format!("removing VM: {}", error_chain(&err));
                    warn!(pod = %e.key, error = %msg, "VM cleanup incomplete");
                    self.inner
                        .event(&e, PodEvent::warning("FailedKillPod", msg));
                }
            }
        }
        let _ = sidecars.await;
        e.ended.cancel();
        // The VM is gone: stop refreshing its volumes and remove them.
        self.inner.volumes.teardown(&key.uid).await;
        lock(&e.slot).take();
        self.inner.templates.release(&key.uid);
        lock(&e.disk_server).take();
        lock(&e.pin).take();
        if let Err(err) = std::fs::remove_dir_all(&e.dir) {
            warn!(pod = %e.key, error = %err, "removing the pod directory");
        }
        lock(&self.inner.pods).remove(&key.uid);
        lock(&self.inner.cpu_samples).remove(&key.uid);
        Ok(())
    }

    async fn pod_status(&self, key: &PodKey) -> Result<Option<PodStatus>, ProviderError> {
        Ok(lock(&self.inner.pods).get(&key.uid).map(|e| e.status()))
    }

    async fn list_pods(&self) -> Result<Vec<PodKey>, ProviderError> {
        Ok(lock(&self.inner.pods)
            .values()
            .map(|e| e.key.clone())
            .collect())
    }

    fn set_notifier(&self, notifier: PodNotifier) {
        *lock(&self.inner.notifier) = Some(notifier);
        let entries: Vec<_> = lock(&self.inner.pods).values().cloned().collect();
        for e in entries {
            self.inner.push_status(&e);
        }
    }
}

mod credentials;
#[cfg(test)]
mod fakes;
mod node;
mod streams;
#[cfg(test)]
mod tests;
