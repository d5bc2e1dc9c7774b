//! Pod volumes for the VM (and, through [`VmVolumes::binds_for`], the side-cars).
//!
//! The volumes themselves are materialised on the host by
//! [`vzk_node::volumes::VolumeManager`] under `<data-dir>/pods/<uid>/volumes/<name>`
//! (configMap, secret, downwardAPI and projected service-account tokens kept current
//! by its refresh task). Here each `volumeMount` of container 0 becomes:
//!
//! * **Linux guests (QEMU)**: one 9p share (`virtio-9p-pci`, mount tag `vzk<i>`,
//!   read-only when the mount is or the volume type always is), mounted over SSH at its
//!   `mountPath` after the guest answers and before the pod is Ready:
//!   `mkdir -p P && mount -t 9p -o trans=virtio,version=9p2000.L[,ro] vzk<i> P`.
//!   A `subPath` naming a directory shares that directory; one naming a file (a
//!   configMap key, say) shares the volume at `/run/vzk/volumes/vzk<i>` and bind-mounts
//!   the file at `mountPath` (like the kubelet, such a mount does not see later updates).
//!   Mounting is idempotent (a path already in `/proc/mounts` is skipped), so a
//!   re-adopted VM is handled too.
//! * **macOS guests (Virtualization.framework)**: every share is an entry of the one
//!   virtio-fs automount device, which macOS mounts itself under
//!   `/Volumes/My Shared Files/<tag>`; once the guest answers, `mountPath` is linked
//!   to its entry over SSH ([`crate::guest_mounts`], which also has Linux guests on
//!   Virtualization.framework mount virtio-fs). [`macos_shares`] names entries by volume
//!   for a future share map.
//!
//! A hostPath volume that is a single file cannot be shared with a VM (9p and virtio-fs
//! share directories); such a mount is refused with a message naming it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use tracing::{info, warn};
use vzk_core::PodEvent;
use vzk_guest::GuestSession;
use vzk_node::volumes::{Bind, PodVolumes, VolumeError, VolumeKind, VolumeManager, binds_for};
use vzk_vm::SharedDirSpec;

pub use crate::guest_mounts::{ShareFs, mount_script};
use crate::pod::{PodEntry, lock};
use crate::provider::Inner;
use crate::status::VmPhase;

/// Where file sub-path shares are mounted in a Linux guest before the bind mount.
pub const GUEST_STAGING_DIR: &str = "/run/vzk/volumes";
/// Where macOS guests mount the automount share's entries.
pub const MACOS_AUTOMOUNT_DIR: &str = "/Volumes/My Shared Files";

/// One mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    /// The share's mount tag.
    pub tag: String,
    /// Where the container (the VM) wants it.
    pub mount_path: String,
    /// Read-only.
    pub read_only: bool,
    /// For a file: its path relative to the share, bind-mounted at `mount_path`.
    pub file: Option<PathBuf>,
}

/// The shares of a VM and how the guest mounts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmShares {
    /// For the VM spec.
    pub shared_dirs: Vec<SharedDirSpec>,
    /// For the guest, in `volumeMounts` order.
    pub mounts: Vec<GuestMount>,
}

fn unsupported(b: &Bind) -> VolumeError {
    VolumeError::Unsupported {
        volume: b.volume.clone(),
        what: format!(
            "mounting a single file ({}) into a VM (only directories can be shared)",
            b.host_path.display()
        ),
    }
}

/// The volume root (canonical) and the bind's path relative to it, for file binds.
fn split_file(vols: &PodVolumes, b: &Bind) -> Result<(PathBuf, PathBuf), VolumeError> {
    let v = vols.volumes.get(&b.volume).ok_or_else(|| unsupported(b))?;
    if matches!(v.kind, VolumeKind::HostPath { is_dir: false }) {
        return Err(unsupported(b));
    }
    let root = v.host_path.canonicalize().map_err(|_| unsupported(b))?;
    let rel = b
        .host_path
        .strip_prefix(&root)
        .map_err(|_| unsupported(b))?
        .to_owned();
    Ok((root, rel))
}

/// Shares and guest mounts for `container`'s `volumeMounts` (pure apart from resolving
/// sub-paths inside the volumes).
pub fn vm_shares(vols: &PodVolumes, container: &Container) -> Result<VmShares, VolumeError> {
    let mut out = VmShares::default();
    for (i, b) in binds_for(vols, container)?.into_iter().enumerate() {
        let tag = format!("vzk{i}");
        let (host_path, file) = if b.is_dir {
            (b.host_path.clone(), None)
        } else {
            let (root, rel) = split_file(vols, &b)?;
            (root, Some(rel))
        };
        out.shared_dirs.push(SharedDirSpec {
            tag: tag.clone(),
            host_path,
            read_only: b.read_only,
        });
        out.mounts.push(GuestMount {
            tag,
            mount_path: b.container_path.clone(),
            read_only: b.read_only,
            file,
        });
    }
    Ok(out)
}

/// One entry of the macOS automount share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacShare {
    /// The entry name (the `SharedDirSpec` tag).
    pub name: String,
    /// The host directory.
    pub host_path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Where macOS shows it: `/Volumes/My Shared Files/<name>[/<file>]`.
    pub guest_path: String,
    /// Where the pod asked for it (reached only if a guest agent mounts or links it).
    pub mount_path: String,
}

/// The macOS share map of `container`'s mounts: entry names are the volume names
/// (`<volume>-<n>` for a volume mounted more than once), valid automount entry names.
pub fn macos_shares(
    vols: &PodVolumes,
    container: &Container,
) -> Result<Vec<MacShare>, VolumeError> {
    let shares = vm_shares(vols, container)?;
    let binds = binds_for(vols, container)?;
    let mut used: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for ((dir, m), b) in shares.shared_dirs.iter().zip(&shares.mounts).zip(&binds) {
        let n = used.entry(b.volume.clone()).or_insert(0);
        let name = if *n == 0 {
            b.volume.clone()
        } else {
            format!("{}-{n}", b.volume)
        };
        *n += 1;
        let mut guest_path = format!("{MACOS_AUTOMOUNT_DIR}/{name}");
        if let Some(f) = &m.file {
            guest_path = format!("{guest_path}/{}", f.display());
        }
        out.push(MacShare {
            name,
            host_path: dir.host_path.clone(),
            read_only: dir.read_only,
            guest_path,
            mount_path: m.mount_path.clone(),
        });
    }
    Ok(out)
}

/// The provider's volumes: the node's volume manager plus each pod's guest mounts.
/// Side-cars get their Docker binds from [`VmVolumes::binds_for`]
/// (`inner.volumes.binds_for(uid, container)`, then [`Bind::docker_spec`]).
pub struct VmVolumes {
    manager: Arc<VolumeManager>,
    mounts: Mutex<HashMap<String, Vec<GuestMount>>>,
}

impl VmVolumes {
    pub(crate) fn new(client: kube::Client, pods_dir: &Path) -> Self {
        Self {
            manager: VolumeManager::new(client, pods_dir),
            mounts: Mutex::new(HashMap::new()),
        }
    }

    /// Sets up `pod`'s volumes; returns the shares of container 0.
    pub(crate) async fn prepare(&self, pod: &Pod) -> Result<Vec<SharedDirSpec>, VolumeError> {
        let vols = self.manager.setup(pod).await?;
        let uid = vols.uid.clone();
        let Some(c0) = pod.spec.as_ref().and_then(|s| s.containers.first()) else {
            return Ok(Vec::new());
        };
        let shares = vm_shares(&vols, c0)?;
        lock(&self.mounts).insert(uid, shares.mounts);
        Ok(shares.shared_dirs)
    }

    /// Host binds of a pod's container (for Docker side-cars), in `volumeMounts` order,
    /// once the pod's volumes are set up (before: an error naming the first volume).
    pub fn binds_for(&self, uid: &str, container: &Container) -> Result<Vec<Bind>, VolumeError> {
        let vols = self.manager.volumes(uid).unwrap_or_default();
        binds_for(&vols, container)
    }

    /// A pod's volumes on the host, once set up.
    pub(crate) fn pod_volumes(&self, uid: &str) -> Option<PodVolumes> {
        self.manager.volumes(uid)
    }

    fn mounts(&self, uid: &str) -> Vec<GuestMount> {
        lock(&self.mounts).get(uid).cloned().unwrap_or_default()
    }

    /// Stops the refresh and removes the pod's volume directory (after the VM is gone).
    pub(crate) async fn teardown(&self, uid: &str) {
        lock(&self.mounts).remove(uid);
        if let Err(e) = self.manager.teardown(uid).await {
            warn!(pod.uid = uid, error = %vzk_core::error_chain(&e), "removing pod volumes");
        }
    }
}

/// Sets up the volumes of a new pod, retrying with `FailedMount` events like the
/// kubelet; returns the VM's shares.
pub(crate) async fn prepare_with_retry(inner: &Inner, e: &PodEntry) -> Vec<SharedDirSpec> {
    let mut backoff = Duration::from_secs(2);
    loop {
        match inner.volumes.prepare(&e.pod).await {
            Ok(dirs) => return dirs,
            Err(err) => {
                let msg = format!("MountVolume.SetUp failed: {}", vzk_core::error_chain(&err));
                warn!(pod = %e.key, error = %msg, "volume set-up failed");
                inner.event(e, PodEvent::warning("FailedMount", msg.clone()));
                inner.set_phase(
                    e,
                    VmPhase::Waiting {
                        reason: "ContainerCreating".into(),
                        message: msg,
                    },
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Re-establishes a re-adopted pod's volumes (refresh task, guest mounts).
pub(crate) async fn readopt(inner: &Inner, pod: &Pod) {
    if let Err(err) = inner.volumes.prepare(pod).await {
        warn!(error = %vzk_core::error_chain(&err), "re-adopted pod: volume set-up failed");
    }
}

/// Mounts the pod's shares in the guest over SSH (before the pod is Ready).
pub(crate) async fn mount_in_guest(
    inner: &Inner,
    e: &PodEntry,
    session: &GuestSession,
    fs: ShareFs,
) -> Result<(), String> {
    let mounts = inner.volumes.mounts(&e.key.uid);
    if mounts.is_empty() {
        return Ok(());
    }
    let script = crate::guest_mounts::script(fs, &mounts, MACOS_AUTOMOUNT_DIR);
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
    let s = session.clone();
    let out = crate::pod::detached(async move { s.output(&argv).await }).await;
    match out {
        Ok(o) if o.status.success() => {
            info!(pod = %e.key, mounts = mounts.len(), "volumes mounted in the guest");
            Ok(())
        }
        Ok(o) => Err(format!(
            "mounting volumes in the guest exited with {}: {}",
            o.status.code,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(err) => Err(format!(
            "mounting volumes in the guest: {}",
            vzk_guest::ErrorChain(&err)
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vzk_node::volumes::{FileData, MountedVolume, Payload, atomic};

    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vzkp-vol-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    fn fixture(tag: &str) -> (PathBuf, PodVolumes, Container) {
        let base = tmp(tag);
        let cfg = base.join("cfg");
        let mut p = Payload::new();
        p.insert(
            "app.conf".into(),
            FileData {
                data: b"x".to_vec(),
                mode: 0o644,
            },
        );
        assert!(atomic::write(&cfg, &p).is_ok());
        let data = base.join("data");
        let _ = std::fs::create_dir_all(data.join("sub"));
        let hostfile = base.join("host.sock");
        let _ = std::fs::write(&hostfile, "");
        let vol = |name: &str, kind, host_path: &Path| {
            (
                name.to_owned(),
                MountedVolume {
                    name: name.into(),
                    kind,
                    host_path: host_path.to_owned(),
                },
            )
        };
        let vols = PodVolumes {
            uid: "u".into(),
            volumes: BTreeMap::from([
                vol("cfg", VolumeKind::ConfigMap, &cfg),
                vol("data", VolumeKind::EmptyDir, &data),
                vol("file", VolumeKind::HostPath { is_dir: false }, &hostfile),
            ]),
        };
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "vm",
            "volumeMounts": [
                {"name": "data", "mountPath": "/data"},
                {"name": "data", "mountPath": "/sub", "subPath": "sub", "readOnly": true},
                {"name": "cfg", "mountPath": "/etc/app/app.conf", "subPath": "app.conf"},
                {"name": "cfg", "mountPath": "/etc/it's"}
            ]
        }))
        .unwrap_or_default();
        (base, vols, c)
    }

    #[test]
    fn mounts_become_tagged_shares_with_read_only_and_sub_paths() {
        let (base, vols, c) = fixture("shares");
        let s = vm_shares(&vols, &c).unwrap_or_default();
        let tags: Vec<_> = s.shared_dirs.iter().map(|d| d.tag.as_str()).collect();
        assert_eq!(tags, ["vzk0", "vzk1", "vzk2", "vzk3"]);
        assert_eq!(s.shared_dirs[0].host_path, base.join("data"));
        assert!(!s.shared_dirs[0].read_only);
        let canon = base.canonicalize().unwrap_or_default();
        assert_eq!(s.shared_dirs[1].host_path, canon.join("data/sub"));
        assert!(s.shared_dirs[1].read_only);
        // A configMap key: the volume is shared, the file bind-mounted.
        assert_eq!(s.shared_dirs[2].host_path, canon.join("cfg"));
        assert!(s.shared_dirs[2].read_only);
        let f = s.mounts[2].file.clone().unwrap_or_default();
        assert!(
            f.to_string_lossy().starts_with("..") && f.ends_with("app.conf"),
            "{f:?}"
        );
        assert_eq!(s.mounts[3].mount_path, "/etc/it's");
        assert!(s.mounts[3].read_only);

        let script = mount_script(&s.mounts);
        assert!(script.contains(
            "mounted '/data' || { { [ -d '/data' ] || mkdir -p '/data'; } && mount -t 9p -o trans=virtio,version=9p2000.L 'vzk0' '/data'; }"
        ), "{script}");
        assert!(script.contains("-o trans=virtio,version=9p2000.L,ro 'vzk1' '/sub'"));
        assert!(script.contains(
            "mount -t 9p -o trans=virtio,version=9p2000.L,ro 'vzk2' '/run/vzk/volumes/vzk2'"
        ));
        assert!(script.contains("mkdir -p '/etc/app'; } && { [ -e '/etc/app/app.conf' ] || touch '/etc/app/app.conf'; } && mount --bind '/run/vzk/volumes/vzk2/.."), "{script}");
        assert!(script.contains("'/etc/it'\\''s'"), "quoted: {script}");

        // A hostPath that is a single file cannot go into a VM.
        let c2: Container = serde_json::from_value(serde_json::json!({
            "name": "vm", "volumeMounts": [{"name": "file", "mountPath": "/run/x.sock"}]
        }))
        .unwrap_or_default();
        let e = vm_shares(&vols, &c2)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("volume \"file\": mounting a single file"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn macos_share_map_names_and_guest_paths() {
        let (base, vols, c) = fixture("macos");
        let m = macos_shares(&vols, &c).unwrap_or_default();
        let names: Vec<_> = m.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["data", "data-1", "cfg", "cfg-1"]);
        assert_eq!(m[0].guest_path, "/Volumes/My Shared Files/data");
        assert_eq!(m[0].mount_path, "/data");
        assert!(
            m[2].guest_path
                .starts_with("/Volumes/My Shared Files/cfg/..")
        );
        assert!(m[2].guest_path.ends_with("/app.conf"));
        assert!(m[3].read_only);
        // Every name is a valid automount entry (no '/', not '.' or '..').
        assert!(
            m.iter()
                .all(|s| !s.name.contains('/') && s.name != "." && s.name != "..")
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
