//! [`ImageStore::pull_lazy`]: an image usable before its disk is downloaded.
//!
//! The small files (config, kernel, initrd, aux) are pulled as usual; the disk becomes a
//! [`LazyDisk`] served over NBD on a Unix socket ([`LazyImage::nbd_url`]), which a pod's
//! qcow2 overlay uses as its backing file ([`crate::Cloner::clone_image`]).
//! Meanwhile the rest of the disk is fetched in the background; once every chunk matched
//! its digest the directory's files are hard-linked into the cache, which then holds an
//! ordinary image, bit-identical to a full pull's. Running pods keep their NBD server
//! (it reads the same inode) until the last of them is gone.
//!
//! Only vzk images pushed with a frame index can be served this way; for the others
//! the caller is told why ([`LazyPull::Unsupported`]) and pulls in full.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use tokio_util::sync::CancellationToken;

use super::{ImageStore, LocalImage};
use crate::cow::CowDisk;
use crate::error::{ImageError, IoContext as _, Result};
use crate::frame_index::FrameIndex;
use crate::lazy::{LazyDisk, LazyOptions, LazyState};
use crate::manifest::{self, Format};
use crate::media_types::Role;
use crate::progress::NoProgress;
use crate::reference::Reference;
use crate::registry::Registry;

use super::pull::{PullOptions, PullPolicy};

/// What [`ImageStore::pull_lazy`] gave.
#[derive(Debug)]
pub enum LazyPull {
    /// The image was in the cache already.
    Cached(LocalImage),
    /// Its disk is served on demand ([`LocalImage::lazy`] is set).
    Lazy(LocalImage),
    /// It cannot be served lazily: pull it in full.
    Unsupported {
        /// Why not.
        reason: String,
    },
}

/// An image whose disk is being fetched, and the NBD server that serves it.
pub struct LazyImage {
    disk: Arc<LazyDisk>,
    socket: PathBuf,
    /// The download's directory (removed with the image); none when serving a cached
    /// image.
    work: Option<PathBuf>,
    digest: String,
    shutdown: CancellationToken,
    _work_lock: Option<File>,
}

impl std::fmt::Debug for LazyImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyImage")
            .field("digest", &self.digest)
            .field("socket", &self.socket)
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl Drop for LazyImage {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_file(&self.socket);
        // The cache holds hard links of whatever completed; the rest goes.
        if let Some(w) = &self.work {
            let _ = std::fs::remove_dir_all(w);
        }
    }
}

impl LazyImage {
    /// The disk.
    pub fn disk(&self) -> &Arc<LazyDisk> {
        &self.disk
    }
    /// Where QEMU reads the disk: `nbd+unix:///disk?socket=<path>`.
    pub fn nbd_url(&self) -> String {
        nbd_url(&self.socket)
    }
    /// The disk as a QEMU block spec (a `json:` file name) that reconnects for up to
    /// `reconnect_secs` when the server goes away (an agent restarting).
    pub fn qemu_backing(&self, reconnect_secs: u32) -> String {
        let spec = serde_json::json!({
            "driver": "raw",
            "file": {
                "driver": "nbd",
                "server": {"type": "unix", "path": self.socket},
                "export": NBD_EXPORT,
                "reconnect-delay": reconnect_secs,
            },
        });
        format!("json:{spec}")
    }
    /// The NBD server's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A pod's own writable disk over this image's, its data in `data` (created, or
    /// emptied), served over NBD on a socket of its own beside the image's (see
    /// [`crate::cow`]). Needs a Tokio runtime.
    pub fn serve_writable(self: &Arc<Self>, data: &Path) -> Result<PodDisk> {
        let disk = Arc::new(CowDisk::create(self.disk.clone(), data).io("create", data)?);
        let tag = blake3::hash(data.as_os_str().as_encoded_bytes()).to_hex();
        let socket = self
            .socket
            .with_file_name(format!("nbd-pod-{}.sock", &tag[..16]));
        let shutdown = CancellationToken::new();
        serve_at(&socket, Arc::new(CowExport(disk.clone())), shutdown.clone())?;
        Ok(PodDisk {
            disk,
            socket,
            shutdown,
            _image: self.clone(),
        })
    }
}

/// A pod's writable disk over a lazily served image ([`LazyImage::serve_writable`]):
/// its own NBD server on a Unix socket, for backends with no overlay format
/// (Virtualization.framework). Serving stops when this is dropped.
pub struct PodDisk {
    disk: Arc<CowDisk>,
    socket: PathBuf,
    shutdown: CancellationToken,
    _image: Arc<LazyImage>,
}

impl std::fmt::Debug for PodDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDisk")
            .field("socket", &self.socket)
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl Drop for PodDisk {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl PodDisk {
    /// The pod's layer.
    pub fn disk(&self) -> &Arc<CowDisk> {
        &self.disk
    }
    /// The NBD server's socket (export [`NBD_EXPORT`]).
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    /// `nbd+unix:///disk?socket=<path>`, as Virtualization.framework and QEMU take it.
    pub fn nbd_url(&self) -> String {
        nbd_url(&self.socket)
    }
}

/// The name of the export every NBD server of the store serves (the server's default).
pub const NBD_EXPORT: &str = vzk_nbd::DEFAULT_EXPORT;

fn nbd_url(socket: &Path) -> String {
    format!("nbd+unix:///{NBD_EXPORT}?socket={}", socket.display())
}

/// Serve `export` at `socket` until `shutdown`; a socket left there (by an agent before
/// this one) is replaced.
fn serve_at(
    socket: &Path,
    export: Arc<dyn vzk_nbd::Export>,
    shutdown: CancellationToken,
) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).io("listen", socket)?;
    let socket = socket.to_path_buf();
    tokio::spawn(async move {
        let opts = vzk_nbd::ServerOptions::default();
        if let Err(e) = vzk_nbd::serve(listener, export, opts, shutdown).await {
            tracing::warn!(socket = %socket.display(), error = %e, "NBD server ended");
        }
    });
    Ok(())
}

struct CowExport(Arc<CowDisk>);

#[async_trait::async_trait]
impl vzk_nbd::Export for CowExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf).await
    }
    fn writable(&self) -> bool {
        true
    }
    async fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_at(offset, buf).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.0.flush().await
    }
}

struct DiskExport(Arc<LazyDisk>);

#[async_trait::async_trait]
impl vzk_nbd::Export for DiskExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf).await
    }
}

/// The Unix socket of image `hex`'s NBD server in the store at `root`: under the root
/// when short enough for `sun_path` (108 bytes), else the temp dir (named after the root
/// too). The same for every agent on that store, so that an agent started after
/// another serves its pods' disks where their QEMU reconnects to.
fn socket_path(root: &Path, hex: &str) -> PathBuf {
    let store = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
    let name = format!("nbd-{}-{}.sock", &hex[..hex.len().min(16)], &store[..8]);
    let p = root.join("tmp").join(&name);
    if p.as_os_str().len() < 100 {
        p
    } else {
        std::env::temp_dir().join(name)
    }
}

impl ImageStore {
    /// The image, from the cache if it is there, else with its disk served on demand
    /// while the rest downloads (see the module docs). Concurrent calls for one image
    /// share one lazy disk.
    pub async fn pull_lazy(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        lazy: &LazyOptions,
    ) -> Result<LazyPull> {
        if opts.policy != PullPolicy::Always
            && let Some(img) = self.get(reference)?
        {
            return Ok(LazyPull::Cached(img));
        }
        if opts.policy == PullPolicy::Never {
            return Err(ImageError::NotPresent {
                reference: reference.to_string(),
            });
        }
        let name = reference.to_string();
        let reg = Arc::new(Registry::new(reference, &opts.registry_options(), false)?);
        let fetched = self.resolve(&reg, reference).await?;
        let digest = fetched.digest.clone();
        if let Some(img) = self.load(&digest, &name)? {
            self.write_ref(reference, &digest)?;
            return Ok(LazyPull::Cached(img));
        }
        let m = manifest::parse_manifest(&fetched.bytes, &name)?;
        let plan = manifest::plan(&m, &name)?;
        let unsupported = |reason: &str| {
            Ok(LazyPull::Unsupported {
                reason: reason.to_owned(),
            })
        };
        if plan.format != Format::Vzk {
            return unsupported(&format!(
                "an image of the {} format has no frame index",
                plan.format.as_str()
            ));
        }
        let Some(index_desc) = plan.frame_index.clone() else {
            return unsupported("the image was pushed without a frame index");
        };
        let Some(disk_plan) = plan.file(Role::Disk).cloned() else {
            return unsupported("the image has no disk");
        };
        // One lazy disk per image in this process: starts are one at a time (they take a
        // manifest, an index and the small files), and a start finds the one before.
        let _starting = self.inner.lazy_start.lock().await;
        let live = self.live_lazy(&digest)?;
        if let Some(l) = live
            && !matches!(&*l.disk.state().borrow(), LazyState::Failed(_))
            && let Some(work) = l.work.clone()
        {
            let config = super::read_config(&work)?;
            return Ok(LazyPull::Lazy(LocalImage {
                digest,
                reference: name,
                dir: work,
                format: plan.format,
                config,
                lazy: Some(l),
            }));
        }
        if self.inner.budget != u64::MAX {
            self.gc_to(self.inner.budget.saturating_sub(plan.uncompressed_size()))?;
        }
        // The manifest's pull lock, held until the image is installed: a full pull of
        // it (here or in another process) waits for this one.
        let hex = digest.trim_start_matches("sha256:").to_string();
        let (lock, lock_path) = self.manifest_lock(&hex)?;
        if lock.try_lock().is_err() {
            return unsupported("another pull of this image is under way");
        }
        let (work, work_lock) = self.work_dir(&hex)?;
        let cleanup = |e: ImageError| {
            let _ = std::fs::remove_dir_all(&work);
            e
        };
        // The index, verified against the manifest.
        let index_bytes = crate::fetch::fetch_small(
            &reg,
            &index_desc.digest,
            index_desc.size,
            crate::frame_index::MAX_INDEX_BYTES,
        )
        .await
        .map_err(cleanup)?;
        let frames = FrameIndex::decode(&index_bytes)
            .and_then(|idx| idx.map(&disk_plan))
            .map_err(|reason| {
                cleanup(ImageError::InvalidManifest {
                    reference: name.clone(),
                    reason: format!("frame index {}: {reason}", index_desc.digest),
                })
            })?;
        // Everything but the disk, in full.
        let mut small = plan.clone();
        small.files.retain(|f| f.role != Role::Disk);
        let config = crate::pull::pull_into(
            reg.clone(),
            &small,
            &work,
            crate::pull::default_concurrency(),
            Arc::new(NoProgress),
            &Default::default(),
        )
        .await
        .map_err(cleanup)?;
        let disk_path = work.join(Role::Disk.file_name());
        let disk = LazyDisk::create(
            reg.clone(),
            disk_plan.parts.clone(),
            frames,
            &disk_path,
            disk_plan.size,
            lazy.clone(),
        )
        .io("create", &disk_path)
        .map_err(cleanup)?;
        let disk = Arc::new(disk);
        // The registry must serve byte ranges: one read of the first frame with data.
        if let Some(at) = disk.first_data_offset() {
            let mut b = [0u8; 1];
            if let Err(e) = disk.read_at(at, &mut b).await {
                let _ = std::fs::remove_dir_all(&work);
                return unsupported(&format!("a first ranged read failed: {e}"));
            }
        }
        let image = self
            .start_serving(disk.clone(), &digest, Some(work.clone()), Some(work_lock))
            .map_err(cleanup)?;
        tracing::info!(reference = %name, %digest, nbd = %image.nbd_url(), size = disk_plan.size, "serving the image's disk on demand while it downloads");
        // The background completion keeps the image alive until it is installed.
        {
            let store = self.clone();
            let image = image.clone();
            let reference = reference.clone();
            let work = work.clone();
            let (manifest_bytes, name, digest) =
                (fetched.bytes.to_vec(), name.clone(), digest.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let res = match image.disk.complete().await {
                    Ok(()) => store
                        .install_lazy(&work, &manifest_bytes, &name, &digest)
                        .and_then(|()| store.write_ref(&reference, &digest)),
                    Err(reason) => Err(ImageError::InvalidManifest {
                        reference: name.clone(),
                        reason,
                    }),
                };
                drop(lock);
                let _ = std::fs::remove_file(&lock_path);
                match res {
                    Ok(()) => {
                        let st = image.disk.stats();
                        tracing::info!(
                            reference = %name,
                            %digest,
                            seconds = started.elapsed().as_secs_f64(),
                            guest_bytes = st.guest_bytes,
                            guest_frames = st.guest_frames,
                            background_bytes = st.background_bytes,
                            "lazily served image complete and in the cache"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(reference = %name, %digest, error = %e, "lazily served image did not complete")
                    }
                }
            });
        }
        Ok(LazyPull::Lazy(LocalImage {
            digest,
            reference: name,
            dir: work,
            format: plan.format,
            config,
            lazy: Some(image),
        }))
    }

    /// The image `digest` whose disk this store serves now, if any.
    fn live_lazy(&self, digest: &str) -> Result<Option<Arc<LazyImage>>> {
        let mut map = self.inner.lazy.lock().map_err(|_| ImageError::Cancelled)?;
        map.retain(|_, w| w.strong_count() > 0);
        Ok(map.get(digest).and_then(Weak::upgrade))
    }

    /// Serve `disk` over NBD at the image's socket; the image is registered as live.
    fn start_serving(
        &self,
        disk: Arc<LazyDisk>,
        digest: &str,
        work: Option<PathBuf>,
        work_lock: Option<File>,
    ) -> Result<Arc<LazyImage>> {
        let hex = digest.trim_start_matches("sha256:");
        let socket = socket_path(self.root(), hex);
        let shutdown = CancellationToken::new();
        serve_at(
            &socket,
            Arc::new(DiskExport(disk.clone())),
            shutdown.clone(),
        )?;
        let image = Arc::new(LazyImage {
            disk,
            socket,
            work,
            digest: digest.to_owned(),
            shutdown,
            _work_lock: work_lock,
        });
        if let Ok(mut map) = self.inner.lazy.lock() {
            map.insert(digest.to_owned(), Arc::downgrade(&image));
        }
        Ok(image)
    }

    /// Serve the disk of `reference` again for pods a previous agent served it to (their
    /// QEMU reconnects to the same socket): from the cache when the image completed,
    /// else on demand again ([`ImageStore::pull_lazy`]). Returns the image, `lazy` set.
    pub async fn reserve_lazy(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        lazy: &LazyOptions,
    ) -> Result<LocalImage> {
        let opts = PullOptions {
            policy: PullPolicy::IfNotPresent,
            ..opts.clone()
        };
        let mut img = match self.pull_lazy(reference, &opts, lazy).await? {
            LazyPull::Lazy(img) => return Ok(img),
            LazyPull::Cached(img) => img,
            LazyPull::Unsupported { reason } => {
                return Err(ImageError::InvalidManifest {
                    reference: reference.to_string(),
                    reason: format!("cannot serve its disk on demand again: {reason}"),
                });
            }
        };
        let live = self.live_lazy(&img.digest)?;
        let served = match live {
            Some(l) => l,
            None => {
                let reg = Arc::new(Registry::new(reference, &opts.registry_options(), false)?);
                let disk = LazyDisk::local(reg, &img.disk()).io("open", img.disk())?;
                self.start_serving(Arc::new(disk), &img.digest, None, None)?
            }
        };
        img.lazy = Some(served);
        Ok(img)
    }

    /// Install the files of a completed lazy image: hard links in a new pull directory,
    /// moved into the cache (the lazy directory stays for the pods that use it).
    fn install_lazy(&self, work: &Path, manifest: &[u8], name: &str, digest: &str) -> Result<()> {
        let (dir, _lock) = self.work_dir(digest.trim_start_matches("sha256:"))?;
        let res = (|| {
            for role in [
                Role::Config,
                Role::Kernel,
                Role::Initrd,
                Role::Aux,
                Role::Disk,
            ] {
                let from = work.join(role.file_name());
                if from.exists() {
                    let to = dir.join(role.file_name());
                    std::fs::hard_link(&from, &to).io("link", &to)?;
                }
            }
            self.install(&dir, manifest, name, Format::Vzk, digest)
        })();
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        res
    }
}
