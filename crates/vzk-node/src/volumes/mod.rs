//! Pod volumes on the host, as the kubelet materialises them, for any runtime (VM
//! shared directories, Docker binds).
//!
//! [`VolumeManager::setup`] turns a pod's `spec.volumes` into host paths under
//! `<root>/<pod uid>/volumes/<name>`:
//!
//! | type | on the host |
//! |---|---|
//! | `emptyDir` | an empty directory (mode 0777; `medium: Memory` is a plain directory too) |
//! | `hostPath` | the host path itself, checked per `type` ([`hostpath`]) |
//! | `configMap`, `secret` | the object's keys (or `items`), `defaultMode`/`mode`, `optional`, `binaryData` |
//! | `downwardAPI` | `fieldRef` (name, namespace, uid, labels, annotations, …) and `resourceFieldRef` |
//! | `projected` | `serviceAccountToken` (TokenRequest as the node), `configMap`, `secret`, `downwardAPI` |
//!
//! The last four are written atomically ([`atomic`]: the kubelet's `..data` symlink
//! swap) and kept current by a per-pod task: every `resync_period` (60 s) the objects
//! are read again and the service-account tokens re-requested once 80% of their
//! lifetime has passed ([`token`]). [`VolumeManager::teardown`] stops that task and
//! removes the pod's volume directory (never following links, so a hostPath or a link
//! a container made is never entered).
//!
//! Other volume types (persistentVolumeClaim, csi, nfs, image, …) and the projected
//! `clusterTrustBundle`/`podCertificate` sources are refused with
//! [`VolumeError::Unsupported`] naming them.
//!
//! [`binds_for`] maps a container's `volumeMounts` (incl. `subPath`/`subPathExpr`) to
//! host paths, for Docker binds or VM shares.

pub mod atomic;
pub mod hostpath;
pub mod sources;
pub mod token;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, Volume, VolumeMount};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use atomic::{AtomicWriteError, FileData, Payload};
pub use sources::ObjectReader;
pub use token::{Clock, SystemClock};

use token::{PodRef, TokenCache};

/// Why a pod's volumes could not be set up (the pod stays `ContainerCreating` with a
/// `FailedMount` event carrying this message, as with the kubelet).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A referenced ConfigMap or Secret does not exist (and is not optional).
    #[error("volume {volume:?}: {kind} {name:?} not found")]
    ObjectNotFound {
        /// The volume.
        volume: String,
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object.
        name: String,
    },
    /// An `items` key is missing (and the source is not optional).
    #[error("volume {volume:?}: {kind} \"{namespace}/{name}\" has no key {key:?}")]
    KeyNotFound {
        /// The volume.
        volume: String,
        /// `configmap` or `secret`.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// The object.
        name: String,
        /// The key.
        key: String,
    },
    /// Reading an object failed (e.g. the API server refused: 403).
    #[error("volume {volume:?}: reading {kind} {name:?}")]
    Fetch {
        /// The volume.
        volume: String,
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object.
        name: String,
        /// The cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// The TokenRequest failed.
    #[error(
        "volume {volume:?}: requesting a token for service account \"{namespace}/{service_account}\""
    )]
    TokenRequest {
        /// The volume.
        volume: String,
        /// Namespace.
        namespace: String,
        /// The service account.
        service_account: String,
        /// The cause.
        #[source]
        source: Box<kube::Error>,
    },
    /// A downward-API item cannot be resolved.
    #[error("volume {volume:?}: downward API item {path:?}: {reason}")]
    Downward {
        /// The volume.
        volume: String,
        /// The item's path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A volume type or source this node does not support.
    #[error("volume {volume:?}: {what} is not supported by this node")]
    Unsupported {
        /// The volume.
        volume: String,
        /// What.
        what: String,
    },
    /// A hostPath is invalid or fails its type check.
    #[error("volume {volume:?}: hostPath {path:?} {reason}")]
    HostPath {
        /// The volume.
        volume: String,
        /// The host path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Writing a volume's files failed.
    #[error("volume {volume:?}: writing its files")]
    Write {
        /// The volume.
        volume: String,
        /// The cause.
        #[source]
        source: AtomicWriteError,
    },
    /// A file system operation failed.
    #[error("volume {volume:?}: {what} {}", path.display())]
    Io {
        /// The volume.
        volume: String,
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A volume name that cannot be a directory name.
    #[error("volume name {0:?} is invalid")]
    InvalidName(String),
    /// A container mounts a volume the pod does not declare.
    #[error("container {container:?} mounts volume {volume:?}, which the pod does not declare")]
    UnknownVolume {
        /// The container.
        container: String,
        /// The volume.
        volume: String,
    },
    /// A `subPath` that is not a clean relative path inside its volume.
    #[error("volume {volume:?}: subPath {sub_path:?} {reason}")]
    SubPath {
        /// The volume.
        volume: String,
        /// The sub-path.
        sub_path: String,
        /// Why.
        reason: String,
    },
    /// The pod lacks a namespace, name or uid.
    #[error("pod lacks a namespace, name or uid")]
    InvalidPod,
}

/// The type of a set-up volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// `emptyDir`.
    EmptyDir,
    /// `hostPath` (a directory, or a file/socket/device).
    HostPath {
        /// Whether the host path is a directory.
        is_dir: bool,
    },
    /// `configMap`.
    ConfigMap,
    /// `secret`.
    Secret,
    /// `downwardAPI`.
    DownwardApi,
    /// `projected`.
    Projected,
}

impl VolumeKind {
    /// configMap, secret, downwardAPI and projected volumes are always mounted
    /// read-only (the kubelet does the same), whatever the mount says.
    pub fn always_read_only(self) -> bool {
        matches!(
            self,
            Self::ConfigMap | Self::Secret | Self::DownwardApi | Self::Projected
        )
    }

    /// Whether the host path is a directory.
    pub fn is_dir(self) -> bool {
        !matches!(self, Self::HostPath { is_dir: false })
    }
}

/// One volume on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedVolume {
    /// The volume name.
    pub name: String,
    /// Its type.
    pub kind: VolumeKind,
    /// Its host path.
    pub host_path: PathBuf,
}

/// A pod's volumes on the host, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodVolumes {
    /// The pod UID.
    pub uid: String,
    /// Volume name → host side.
    pub volumes: BTreeMap<String, MountedVolume>,
}

/// Counters of a pod's background sync (for tests and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Completed sync passes (set-up included).
    pub passes: u64,
    /// Passes that changed some volume's content.
    pub changes: u64,
    /// TokenRequests made.
    pub token_requests: u64,
    /// Passes with an error.
    pub errors: u64,
}

/// Settings of a [`VolumeManager`].
#[derive(Clone)]
pub struct VolumeConfig {
    /// How often configMap/secret/downwardAPI/projected content is re-synced.
    pub resync_period: Duration,
    /// The clock token lifetimes are measured on.
    pub clock: Arc<dyn Clock>,
    /// The node's allocatable `cpu`/`memory` values (`resourceFieldRef` of `limits.*`
    /// for containers without limits).
    pub allocatable: BTreeMap<String, f64>,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            resync_period: Duration::from_secs(60),
            clock: Arc::new(SystemClock),
            allocatable: BTreeMap::new(),
        }
    }
}

impl std::fmt::Debug for VolumeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeConfig")
            .field("resync_period", &self.resync_period)
            .finish_non_exhaustive()
    }
}

struct PodState {
    pod: Pod,
    pod_ref: PodRef,
    volumes: PodVolumes,
    tokens: tokio::sync::Mutex<TokenCache>,
    stats: Mutex<SyncStats>,
    cancel: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets up, refreshes and removes pod volumes. Cheap to share (`Arc`).
pub struct VolumeManager {
    client: kube::Client,
    root: PathBuf,
    config: VolumeConfig,
    pods: Mutex<HashMap<String, Arc<PodState>>>,
}

impl std::fmt::Debug for VolumeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeManager")
            .field("root", &self.root)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VolumeManager {
    /// A manager reading objects with `client` (the node's own) and keeping volumes
    /// under `root/<uid>/volumes/`.
    pub fn new(client: kube::Client, root: impl Into<PathBuf>) -> Arc<Self> {
        Self::with_config(client, root, VolumeConfig::default())
    }

    /// [`VolumeManager::new`] with explicit settings.
    pub fn with_config(
        client: kube::Client,
        root: impl Into<PathBuf>,
        config: VolumeConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            root: root.into(),
            config,
            pods: Mutex::new(HashMap::new()),
        })
    }

    /// `root/<uid>/volumes`.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join(uid).join("volumes")
    }

    /// Materialises every volume of `pod` and starts its background refresh. Calling it
    /// again for a pod already set up re-syncs and returns the same volumes.
    pub async fn setup(&self, pod: &Pod) -> Result<PodVolumes, VolumeError> {
        let m = &pod.metadata;
        let (Some(ns), Some(name), Some(uid)) = (&m.namespace, &m.name, &m.uid) else {
            return Err(VolumeError::InvalidPod);
        };
        if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
            return Err(VolumeError::InvalidPod);
        }
        let existing = lock(&self.pods).get(uid).cloned();
        if let Some(st) = existing {
            self.sync(&st).await?;
            return Ok(st.volumes.clone());
        }
        let dir = self.pod_dir(uid);
        let mut volumes = PodVolumes {
            uid: uid.clone(),
            volumes: BTreeMap::new(),
        };
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let mv = self.prepare(&dir, v)?;
            volumes.volumes.insert(v.name.clone(), mv);
        }
        let st = Arc::new(PodState {
            pod: pod.clone(),
            pod_ref: PodRef {
                namespace: ns.clone(),
                name: name.clone(),
                uid: uid.clone(),
            },
            volumes: volumes.clone(),
            tokens: tokio::sync::Mutex::new(TokenCache::default()),
            stats: Mutex::new(SyncStats::default()),
            cancel: CancellationToken::new(),
            task: Mutex::new(None),
        });
        self.sync(&st).await?;
        let needs_refresh = volumes.volumes.values().any(|v| v.kind.always_read_only());
        if needs_refresh {
            let task = tokio::spawn(refresh_loop(
                self.client.clone(),
                self.config.clone(),
                st.clone(),
            ));
            *lock(&st.task) = Some(task);
        }
        lock(&self.pods).insert(uid.clone(), st);
        info!(pod = %format!("{ns}/{name}"), volumes = volumes.volumes.len(), "pod volumes set up");
        Ok(volumes)
    }

    /// The volumes of a pod set up earlier.
    pub fn volumes(&self, uid: &str) -> Option<PodVolumes> {
        lock(&self.pods).get(uid).map(|s| s.volumes.clone())
    }

    /// The background sync counters of a pod.
    pub fn stats(&self, uid: &str) -> Option<SyncStats> {
        lock(&self.pods).get(uid).map(|s| *lock(&s.stats))
    }

    /// One sync pass now (what the background task does every `resync_period`).
    pub async fn resync(&self, uid: &str) -> Result<(), VolumeError> {
        let st = lock(&self.pods).get(uid).cloned();
        match st {
            Some(st) => self.sync(&st).await,
            None => Ok(()),
        }
    }

    /// Stops the pod's refresh and removes `root/<uid>/volumes` (links are removed, never
    /// followed; hostPath volumes live elsewhere and are not touched).
    pub async fn teardown(&self, uid: &str) -> Result<(), VolumeError> {
        let st = lock(&self.pods).remove(uid);
        if let Some(st) = st {
            st.cancel.cancel();
            let task = lock(&st.task).take();
            if let Some(t) = task {
                let _ = t.await;
            }
        }
        if uid.is_empty() || uid.contains('/') || uid.starts_with('.') {
            return Ok(());
        }
        let dir = self.pod_dir(uid);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(VolumeError::Io {
                volume: String::new(),
                what: "removing",
                path: dir,
                source,
            }),
        }
    }

    fn prepare(&self, dir: &Path, v: &Volume) -> Result<MountedVolume, VolumeError> {
        let name = &v.name;
        if name.is_empty()
            || name.contains('/')
            || name.starts_with('.')
            || atomic::validate_path(name).is_err()
        {
            return Err(VolumeError::InvalidName(name.clone()));
        }
        let own = dir.join(name);
        let io = |what: &'static str, path: &Path| {
            let (volume, path) = (name.clone(), path.to_owned());
            move |source| VolumeError::Io {
                volume,
                what,
                path,
                source,
            }
        };
        let kind = if let Some(e) = &v.empty_dir {
            if e.medium.as_deref() == Some("Memory") {
                debug!(volume = %name, "emptyDir medium Memory is a plain directory on this node");
            }
            std::fs::create_dir_all(&own).map_err(io("creating", &own))?;
            std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o777))
                .map_err(io("setting the mode of", &own))?;
            VolumeKind::EmptyDir
        } else if let Some(h) = &v.host_path {
            let k = hostpath::prepare(name, &h.path, h.type_.as_deref())?;
            return Ok(MountedVolume {
                name: name.clone(),
                kind: VolumeKind::HostPath {
                    is_dir: k == hostpath::HostPathKind::Directory,
                },
                host_path: hostpath::host_path(&h.path),
            });
        } else if v.config_map.is_some() {
            VolumeKind::ConfigMap
        } else if v.secret.is_some() {
            VolumeKind::Secret
        } else if v.downward_api.is_some() {
            VolumeKind::DownwardApi
        } else if v.projected.is_some() {
            VolumeKind::Projected
        } else {
            return Err(VolumeError::Unsupported {
                volume: name.clone(),
                what: format!("volume type {}", volume_type(v)),
            });
        };
        if kind.always_read_only() {
            std::fs::create_dir_all(&own).map_err(io("creating", &own))?;
        }
        Ok(MountedVolume {
            name: name.clone(),
            kind,
            host_path: own,
        })
    }

    async fn sync(&self, st: &PodState) -> Result<(), VolumeError> {
        sync_pod(&self.client, &self.config, st).await
    }
}

impl Drop for VolumeManager {
    fn drop(&mut self) {
        for st in lock(&self.pods).values() {
            st.cancel.cancel();
        }
    }
}

/// The API name of a volume's type (`persistentVolumeClaim`, `nfs`, …).
fn volume_type(v: &Volume) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| {
            j.as_object()
                .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        })
        .unwrap_or_else(|| "(none)".into())
}

async fn sync_pod(
    client: &kube::Client,
    config: &VolumeConfig,
    st: &PodState,
) -> Result<(), VolumeError> {
    let mut tokens = st.tokens.lock().await;
    let mut ctx = sources::Ctx {
        client,
        clock: &config.clock,
        pod: &st.pod,
        pod_ref: &st.pod_ref,
        allocatable: &config.allocatable,
        objects: ObjectReader::new(client.clone()),
        tokens: &mut tokens,
    };
    let mut changed = false;
    let mut result = Ok(());
    for v in st.pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let Some(mv) = st.volumes.volumes.get(&v.name) else {
            continue;
        };
        let Some(payload) = sources::payload(&mut ctx, v).await else {
            continue;
        };
        let r = payload.and_then(|p| {
            atomic::write(&mv.host_path, &p).map_err(|source| VolumeError::Write {
                volume: v.name.clone(),
                source,
            })
        });
        match r {
            Ok(c) => changed |= c,
            Err(e) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
    }
    let requests = ctx.tokens.requests();
    drop(ctx);
    drop(tokens);
    let mut s = lock(&st.stats);
    s.passes += 1;
    s.changes += u64::from(changed);
    s.token_requests = requests;
    s.errors += u64::from(result.is_err());
    result
}

async fn refresh_loop(client: kube::Client, config: VolumeConfig, st: Arc<PodState>) {
    loop {
        tokio::select! {
            () = st.cancel.cancelled() => return,
            () = tokio::time::sleep(config.resync_period) => {}
        }
        let pass = sync_pod(&client, &config, &st);
        tokio::select! {
            () = st.cancel.cancelled() => return,
            r = pass => if let Err(e) = r {
                warn!(pod = %format!("{}/{}", st.pod_ref.namespace, st.pod_ref.name), error = %vzk_core::error_chain(&e), "volume refresh failed; the previous content stays");
            },
        }
    }
}

/// One volume mount of a container, resolved to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The volume.
    pub volume: String,
    /// The host path (the volume, or its `subPath`, links resolved inside the volume).
    pub host_path: PathBuf,
    /// Where the container sees it.
    pub container_path: String,
    /// Read-only (the mount says so, or the volume type is always read-only).
    pub read_only: bool,
    /// Whether `host_path` is a directory.
    pub is_dir: bool,
}

impl Bind {
    /// Docker's `host:container[:ro]` bind syntax.
    pub fn docker_spec(&self) -> String {
        format!(
            "{}:{}{}",
            self.host_path.display(),
            self.container_path,
            if self.read_only { ":ro" } else { "" }
        )
    }
}

/// Host binds of `container`'s `volumeMounts`, in order. `subPath` (or `subPathExpr`,
/// expanded with the container's resolved env) selects a path inside the volume: it must
/// be relative without `..`, is created as a directory in emptyDir/hostPath volumes when
/// absent (as the kubelet does), and after resolving links must stay inside the volume.
pub fn binds_for(vols: &PodVolumes, container: &Container) -> Result<Vec<Bind>, VolumeError> {
    let env: HashMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| bind_for(vols, &container.name, m, &env))
        .collect()
}

fn bind_for(
    vols: &PodVolumes,
    container: &str,
    m: &VolumeMount,
    env: &HashMap<String, String>,
) -> Result<Bind, VolumeError> {
    let v = vols
        .volumes
        .get(&m.name)
        .ok_or_else(|| VolumeError::UnknownVolume {
            container: container.to_owned(),
            volume: m.name.clone(),
        })?;
    let read_only = m.read_only.unwrap_or(false) || v.kind.always_read_only();
    let sub = match (&m.sub_path, &m.sub_path_expr) {
        (Some(s), _) if !s.is_empty() => Some(s.clone()),
        (_, Some(e)) if !e.is_empty() => Some(crate::env::expand(e, env)),
        _ => None,
    };
    let Some(sub) = sub else {
        return Ok(Bind {
            volume: m.name.clone(),
            host_path: v.host_path.clone(),
            container_path: m.mount_path.clone(),
            read_only,
            is_dir: v.kind.is_dir(),
        });
    };
    let (host_path, is_dir) = resolve_sub_path(v, &sub)?;
    Ok(Bind {
        volume: m.name.clone(),
        host_path,
        container_path: m.mount_path.clone(),
        read_only,
        is_dir,
    })
}

/// `subPath` inside volume `v`, created if absent (emptyDir/hostPath), links resolved and
/// checked to stay inside the volume. Returns the path and whether it is a directory.
pub fn resolve_sub_path(v: &MountedVolume, sub: &str) -> Result<(PathBuf, bool), VolumeError> {
    let err = |reason: &str| VolumeError::SubPath {
        volume: v.name.clone(),
        sub_path: sub.to_owned(),
        reason: reason.to_owned(),
    };
    let p = Path::new(sub);
    if p.is_absolute() {
        return Err(err("must be a relative path"));
    }
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(err("must not contain '..'"));
    }
    if !v.kind.is_dir() {
        return Err(err("is set but the volume is not a directory"));
    }
    let full = v.host_path.join(p);
    if std::fs::symlink_metadata(&full).is_err()
        && matches!(v.kind, VolumeKind::EmptyDir | VolumeKind::HostPath { .. })
    {
        std::fs::create_dir_all(&full).map_err(|e| err(&format!("cannot be created: {e}")))?;
    }
    let root = v
        .host_path
        .canonicalize()
        .map_err(|e| err(&format!("volume root unreadable: {e}")))?;
    let real = full
        .canonicalize()
        .map_err(|_| err("does not exist in the volume"))?;
    if !real.starts_with(&root) {
        return Err(err("resolves outside its volume"));
    }
    let is_dir = real.is_dir();
    Ok((real, is_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vzk-vol-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    fn container(mounts: serde_json::Value) -> Container {
        serde_json::from_value(serde_json::json!({
            "name": "c", "env": [{"name": "POD", "value": "p1"}], "volumeMounts": mounts
        }))
        .unwrap_or_default()
    }

    #[test]
    fn binds_honour_read_only_sub_paths_and_refuse_escapes() {
        let base = tmp("binds");
        let empty = base.join("scratch");
        let cfg = base.join("cfg");
        let _ = std::fs::create_dir_all(&empty);
        let mut p = Payload::new();
        p.insert(
            "app.conf".into(),
            FileData {
                data: b"x=1".to_vec(),
                mode: 0o644,
            },
        );
        assert!(atomic::write(&cfg, &p).is_ok());
        let _ = std::os::unix::fs::symlink("/etc", empty.join("evil"));
        let vols = PodVolumes {
            uid: "u".into(),
            volumes: BTreeMap::from([
                (
                    "scratch".to_owned(),
                    MountedVolume {
                        name: "scratch".into(),
                        kind: VolumeKind::EmptyDir,
                        host_path: empty.clone(),
                    },
                ),
                (
                    "cfg".to_owned(),
                    MountedVolume {
                        name: "cfg".into(),
                        kind: VolumeKind::ConfigMap,
                        host_path: cfg.clone(),
                    },
                ),
            ]),
        };
        let c = container(serde_json::json!([
            {"name": "scratch", "mountPath": "/work"},
            {"name": "scratch", "mountPath": "/per-pod", "subPathExpr": "logs/$(POD)"},
            {"name": "cfg", "mountPath": "/etc/app.conf", "subPath": "app.conf"},
            {"name": "cfg", "mountPath": "/cfg", "readOnly": false},
        ]));
        let binds = binds_for(&vols, &c).unwrap_or_default();
        assert_eq!(binds.len(), 4);
        assert_eq!(binds[0].docker_spec(), format!("{}:/work", empty.display()));
        assert!(!binds[0].read_only && binds[0].is_dir);
        let canon = empty.canonicalize().unwrap_or_default();
        assert_eq!(binds[1].host_path, canon.join("logs/p1"));
        assert!(
            binds[1].host_path.is_dir(),
            "subPath created in an emptyDir"
        );
        // A configMap key resolves to the real file of the current version, read-only.
        assert!(binds[2].read_only && !binds[2].is_dir);
        assert!(
            binds[2].host_path.to_string_lossy().contains("/cfg/..20"),
            "{:?}",
            binds[2].host_path
        );
        assert!(binds[3].read_only, "configMap volumes are always read-only");

        for (sub, why) in [
            ("../x", "must not contain '..'"),
            ("/abs", "must be a relative path"),
            ("evil", "resolves outside its volume"),
        ] {
            let c = container(
                serde_json::json!([{"name": "scratch", "mountPath": "/m", "subPath": sub}]),
            );
            let e = binds_for(&vols, &c)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(why), "{sub}: {e}");
        }
        let c =
            container(serde_json::json!([{"name": "cfg", "mountPath": "/m", "subPath": "absent"}]));
        assert!(binds_for(&vols, &c).is_err());
        let c = container(serde_json::json!([{"name": "nope", "mountPath": "/m"}]));
        assert!(matches!(
            binds_for(&vols, &c),
            Err(VolumeError::UnknownVolume { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn unsupported_types_are_named() {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "name": "data", "persistentVolumeClaim": {"claimName": "c"}
        }))
        .unwrap_or_default();
        assert_eq!(volume_type(&v), "persistentVolumeClaim");
    }
}
