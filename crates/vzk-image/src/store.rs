//! The local image cache: content-addressed by manifest digest, tags as references,
//! LRU garbage collection under a size budget that never removes a pinned image, and
//! crash safety.
//!
//! ```text
//! <root>/images/sha256/<hex>/   a verified, ready-to-boot image directory:
//!                               config.json, disk.img, aux.img | kernel, initrd,
//!                               manifest.json, meta.json, .pin (lock file), .last-used
//! <root>/refs/<registry>/<repository>/<tag>   "sha256:<hex>" of the manifest
//! <root>/tmp/                    pulls in progress and directories being deleted
//! ```
//!
//! # Guarantees
//! * A directory under `images/` only ever appears by `rename` of a fully downloaded and
//!   verified pull directory, so a crash (even `kill -9`) mid-pull leaves nothing that is
//!   later trusted: `tmp/` is emptied by [`ImageStore::open`] of whatever no live process
//!   holds locked.
//! * Power loss: the pull does not wait for the disk (fsync would put the disk's write
//!   bandwidth on the critical path); the installed files are fsynced in the background
//!   and then marked `.synced`. An image found without `.synced` that was installed in an
//!   earlier boot (Linux `boot_id`) may have lost data and is discarded by `open`. Where
//!   no boot id exists (macOS), the fsync happens before the install.
//! * Pulls of the same reference in one process share one download; pulls of the same
//!   manifest in different processes serialise on a lock file and the second one finds
//!   the image installed.
//! * An image is pinned while a [`PinGuard`] lives (a shared `flock` on its `.pin`,
//!   so pins hold across processes); GC and `remove` skip pinned images.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::error::{ImageError, IoContext as _, Result};
use crate::keyring::Credentials;
use crate::manifest::{self, Descriptor, Format, Index};
use crate::media_types::{self as mt, Role};
use crate::progress::{NoProgress, Progress};
use crate::reference::Reference;
use crate::registry::{Registry, RegistryOptions};

/// Kubernetes `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Ask the registry for the tag's digest every time; download only what is missing.
    Always,
    /// Use the cached image for the tag if there is one.
    #[default]
    IfNotPresent,
    /// Only ever use the cache.
    Never,
}

impl PullPolicy {
    /// Parse `Always`/`IfNotPresent`/`Never`; Kubernetes' default applies to `None`/empty:
    /// `Always` for `:latest` or untagged, else `IfNotPresent`.
    pub fn from_k8s(policy: Option<&str>, reference: &Reference) -> PullPolicy {
        match policy {
            Some("Always") => PullPolicy::Always,
            Some("Never") => PullPolicy::Never,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            _ if reference.digest.is_none()
                && reference.tag.as_deref().is_none_or(|t| t == "latest") =>
            {
                PullPolicy::Always
            }
            _ => PullPolicy::IfNotPresent,
        }
    }
}

/// How to pull.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Credentials to try in order (e.g. from [`crate::Keyring::lookup`]).
    pub credentials: Vec<Credentials>,
    /// Pull policy.
    pub policy: PullPolicy,
    /// Talk plain HTTP to the registry.
    pub plain_http: bool,
    /// Accept any TLS certificate.
    pub insecure: bool,
    /// Parts downloaded at once (0: default 4).
    pub concurrency: usize,
    /// Progress sink (default: none).
    pub progress: Option<Arc<dyn Progress>>,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("credentials", &self.credentials)
            .field("policy", &self.policy)
            .field("plain_http", &self.plain_http)
            .field("insecure", &self.insecure)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl PullOptions {
    fn registry_options(&self) -> RegistryOptions {
        RegistryOptions {
            credentials: self.credentials.clone(),
            plain_http: self.plain_http,
            insecure: self.insecure,
        }
    }
}

/// What `meta.json` records about a cached image.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    reference: String,
    format: Format,
    pulled_at: String,
    /// The kernel boot in which the image was installed (Linux `boot_id`).
    #[serde(default)]
    boot_id: Option<String>,
}

/// A verified image directory in the cache.
#[derive(Debug, Clone)]
pub struct LocalImage {
    /// Manifest digest (`sha256:<hex>`): the image's identity.
    pub digest: String,
    /// The reference it was pulled as.
    pub reference: String,
    /// The directory (do not modify its files: clone them).
    pub dir: PathBuf,
    /// The format it was pulled in.
    pub format: Format,
    /// Its `config.json`.
    pub config: VmConfig,
}

impl LocalImage {
    /// Path of one file, if the image has it.
    pub fn file(&self, role: Role) -> Option<PathBuf> {
        let p = self.dir.join(role.file_name());
        p.exists().then_some(p)
    }
    /// `disk.img`.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(Role::Disk.file_name())
    }
    /// `aux.img` (macOS auxiliary storage / NVRAM), if present.
    pub fn aux(&self) -> Option<PathBuf> {
        self.file(Role::Aux)
    }
    /// `kernel` (Linux), if present.
    pub fn kernel(&self) -> Option<PathBuf> {
        self.file(Role::Kernel)
    }
    /// `initrd` (Linux), if present.
    pub fn initrd(&self) -> Option<PathBuf> {
        self.file(Role::Initrd)
    }
}

/// One row of [`ImageStore::list`].
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// Tag references pointing at it (empty if pulled by digest only).
    pub references: Vec<String>,
    /// Manifest digest.
    pub digest: String,
    /// Format.
    pub format: Format,
    /// Bytes allocated on disk (sparse files count what they use).
    pub disk_usage: u64,
    /// Apparent size of its files.
    pub size: u64,
    /// Whether a pod uses it now.
    pub pinned: bool,
    /// Last use (pull or pin), milliseconds since the epoch.
    pub last_used: u64,
}

/// Keeps an image from being garbage-collected or removed while alive.
#[derive(Debug)]
pub struct PinGuard {
    _file: File,
    /// The pinned image's digest.
    pub digest: String,
}

type SharedPull = Shared<BoxFuture<'static, std::result::Result<LocalImage, Arc<ImageError>>>>;

struct Inner {
    root: PathBuf,
    budget: u64,
    inflight: Mutex<HashMap<String, (u64, SharedPull)>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// The image cache. Cheap to clone.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.root)
            .field("budget", &self.inner.budget)
            .finish()
    }
}

/// What a prune removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    /// Digests removed.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub freed: u64,
    /// Bytes still used.
    pub remaining: u64,
}

impl ImageStore {
    /// Open (creating) a store at `root` with a size budget in bytes (`u64::MAX`: none).
    /// Removes pull leftovers that no live process holds.
    pub fn open(root: impl Into<PathBuf>, budget: u64) -> Result<ImageStore> {
        let root = root.into();
        for d in ["images/sha256", "refs", "tmp"] {
            std::fs::create_dir_all(root.join(d)).io("create", root.join(d))?;
        }
        let store = ImageStore {
            inner: Arc::new(Inner {
                root,
                budget,
                inflight: Mutex::new(HashMap::new()),
                next_id: Default::default(),
            }),
        };
        store.clean_tmp()?;
        store.discard_unsynced_from_earlier_boots()?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The size budget.
    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    fn tmp(&self) -> PathBuf {
        self.inner.root.join("tmp")
    }

    /// Chunks (zstd or Tart LZ4) of the images in the cache, by content digest: a new
    /// version of an image mostly shares them, and a pull copies those instead of
    /// downloading them. Unreadable entries are skipped.
    fn local_chunks(&self) -> HashMap<String, crate::fetch::LocalChunk> {
        let mut out = HashMap::new();
        let Ok(dirs) = std::fs::read_dir(self.inner.root.join("images/sha256")) else {
            return out;
        };
        for dir in dirs.flatten().map(|e| e.path()) {
            let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<crate::manifest::Manifest>(&bytes) else {
                continue;
            };
            let Ok(plan) = crate::manifest::plan(&m, "cache") else {
                continue;
            };
            for f in &plan.files {
                for p in &f.parts {
                    if p.encoding.is_chunk() {
                        out.entry(p.digest.clone())
                            .or_insert_with(|| crate::fetch::LocalChunk {
                                path: dir.join(f.role.file_name()),
                                offset: p.offset,
                            });
                    }
                }
            }
        }
        out
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.inner.root.join("images/sha256").join(hex)
    }

    fn ref_path(&self, r: &Reference) -> Option<PathBuf> {
        let tag = r.tag.as_ref()?;
        Some(
            self.inner
                .root
                .join("refs")
                .join(&r.registry)
                .join(&r.repository)
                .join(tag),
        )
    }

    /// Turns a "no space left on device" anywhere in `e` into [`ImageError::NoSpace`]
    /// (with the free space of the cache's filesystem); other errors pass unchanged.
    fn no_space(&self, e: ImageError, reference: &str, needed: u64) -> ImageError {
        if !e.is_no_space() {
            return e;
        }
        let root = self.inner.root.clone();
        // The field types differ by OS (u64 on Linux; a u32 block count on macOS).
        #[allow(clippy::useless_conversion)]
        let available = nix::sys::statvfs::statvfs(&root)
            .ok()
            .map(|s| u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())));
        tracing::warn!(%reference, path = %root.display(), needed, ?available, "image pull ran out of disk space; partial files removed");
        ImageError::NoSpace {
            reference: reference.to_owned(),
            path: root,
            needed,
            available,
            detail: e.to_string(),
        }
    }

    /// Delete everything in `tmp/` not locked by a live pull.
    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.tmp();
        for e in std::fs::read_dir(&tmp).io("list", &tmp)? {
            let e = e.io("list", &tmp)?;
            let p = e.path();
            if p.extension().is_some_and(|x| x == "lock") {
                continue;
            }
            let lock = p.join(".lock");
            let stale = match File::options().read(true).write(true).open(&lock) {
                Ok(f) => f.try_lock().is_ok(),
                Err(_) => true,
            };
            if stale {
                tracing::info!(path = %p.display(), "removing leftover of an interrupted pull");
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).io("remove", &p)?;
                } else {
                    std::fs::remove_file(&p).io("remove", &p)?;
                }
            }
        }
        Ok(())
    }

    /// Images whose background fsync never finished before a reboot are not trusted.
    fn discard_unsynced_from_earlier_boots(&self) -> Result<()> {
        let Some(boot) = boot_id() else { return Ok(()) };
        let dir = self.inner.root.join("images/sha256");
        for e in std::fs::read_dir(&dir).io("list", &dir)?.flatten() {
            let p = e.path();
            if p.join(".synced").exists() {
                continue;
            }
            let meta: Option<Meta> = std::fs::read(p.join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if meta.and_then(|m| m.boot_id).as_deref() != Some(boot.as_str()) {
                tracing::warn!(path = %p.display(), "discarding an image whose data may not have reached the disk before a reboot");
                let trash = self.tmp().join(format!("trash-{}", rand::random::<u64>()));
                std::fs::rename(&p, &trash).io("remove", &p)?;
                std::fs::remove_dir_all(&trash).io("remove", &trash)?;
            }
        }
        Ok(())
    }

    /// Look an image up locally (by digest if the reference has one, else by tag).
    pub fn get(&self, reference: &Reference) -> Result<Option<LocalImage>> {
        let digest = match &reference.digest {
            Some(d) => d.clone(),
            None => match self
                .ref_path(reference)
                .map(|p| std::fs::read_to_string(&p))
            {
                Some(Ok(d)) => d.trim().to_string(),
                _ => return Ok(None),
            },
        };
        self.load(&digest, &reference.to_string())
    }

    fn load(&self, digest: &str, reference: &str) -> Result<Option<LocalImage>> {
        if crate::reference::validate_digest(digest).is_err() {
            return Ok(None);
        }
        let dir = self.image_dir(digest);
        let meta_path = dir.join("meta.json");
        let meta: Meta = match std::fs::read(&meta_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Io {
                op: "parse",
                path: meta_path.clone(),
                source: std::io::Error::other(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).io("read", meta_path),
        };
        let cfg_path = dir.join("config.json");
        let config: VmConfig = serde_json::from_slice(
            &std::fs::read(&cfg_path).io("read", &cfg_path)?,
        )
        .map_err(|e| ImageError::Io {
            op: "parse",
            path: cfg_path,
            source: std::io::Error::other(e),
        })?;
        let reference = if reference.is_empty() {
            meta.reference
        } else {
            reference.to_string()
        };
        Ok(Some(LocalImage {
            digest: digest.to_string(),
            reference,
            dir,
            format: meta.format,
            config,
        }))
    }

    /// Pull (or find) an image according to `opts.policy`; returns a verified directory.
    ///
    /// Concurrent calls for the same reference share one download (the first caller's
    /// options win, as in macOS-vz-kubelet). The download goes on if callers go away.
    pub async fn pull(&self, reference: &Reference, opts: &PullOptions) -> Result<LocalImage> {
        if opts.policy != PullPolicy::Always
            && let Some(img) = self.get(reference)?
        {
            touch(&img.dir);
            return Ok(img);
        }
        if opts.policy == PullPolicy::Never {
            return Err(ImageError::NotPresent {
                reference: reference.to_string(),
            });
        }
        let key = reference.to_string();
        let (id, fut) = {
            let mut map = self
                .inner
                .inflight
                .lock()
                .map_err(|_| ImageError::Cancelled)?;
            if let Some((id, f)) = map.get(&key) {
                (*id, f.clone())
            } else {
                let id = self
                    .inner
                    .next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let store = self.clone();
                let r = reference.clone();
                let o = opts.clone();
                let task = tokio::spawn(async move { store.pull_now(&r, &o).await });
                let fut: SharedPull = async move {
                    match task.await {
                        Ok(r) => r.map_err(Arc::new),
                        Err(_) => Err(Arc::new(ImageError::Cancelled)),
                    }
                }
                .boxed()
                .shared();
                map.insert(key.clone(), (id, fut.clone()));
                (id, fut)
            }
        };
        let res = fut.await;
        if let Ok(mut map) = self.inner.inflight.lock()
            && map.get(&key).is_some_and(|(i, _)| *i == id)
        {
            map.remove(&key);
        }
        res.map_err(|e| match Arc::try_unwrap(e) {
            Ok(e) => e,
            Err(shared) => ImageError::Shared(shared),
        })
    }

    async fn pull_now(&self, reference: &Reference, opts: &PullOptions) -> Result<LocalImage> {
        let progress: Arc<dyn Progress> = opts
            .progress
            .clone()
            .unwrap_or_else(|| Arc::new(NoProgress));
        let reg = Arc::new(Registry::new(reference, &opts.registry_options(), false)?);
        let name = reference.to_string();
        let mut fetched = reg.get_manifest(reference.manifest_ref()).await?;
        let is_index = fetched.media_type.starts_with(mt::OCI_INDEX)
            || fetched.media_type.starts_with(mt::DOCKER_MANIFEST_LIST)
            || serde_json::from_slice::<serde_json::Value>(&fetched.bytes)
                .is_ok_and(|v| v.get("manifests").is_some());
        if is_index {
            let index: Index = serde_json::from_slice(&fetched.bytes).map_err(|e| {
                ImageError::InvalidManifest {
                    reference: name.clone(),
                    reason: format!("not a valid index: {e}"),
                }
            })?;
            let chosen =
                pick_platform(&index.manifests).ok_or_else(|| ImageError::InvalidManifest {
                    reference: name.clone(),
                    reason: "the index lists no manifest for a VM platform".into(),
                })?;
            fetched = reg.get_manifest(&chosen.digest).await?;
        }
        let digest = fetched.digest.clone();
        if let Some(img) = self.load(&digest, &name)? {
            self.write_ref(reference, &digest)?;
            touch(&img.dir);
            return Ok(img);
        }
        let m = manifest::parse_manifest(&fetched.bytes, &name)?;
        let plan = manifest::plan(&m, &name)?;
        // Make room first (pinned images stay).
        if self.inner.budget != u64::MAX {
            self.gc_to(self.inner.budget.saturating_sub(plan.uncompressed_size()))?;
        }
        // One pull per manifest across processes.
        let hex = digest.trim_start_matches("sha256:").to_string();
        let lock_path = self.tmp().join(format!("{hex}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .io("create", &lock_path)?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock))
            .await
            .map_err(|_| ImageError::Cancelled)?
            .io("lock", &lock_path)?;
        if let Some(img) = self.load(&digest, &name)? {
            self.write_ref(reference, &digest)?;
            return Ok(img);
        }
        let work = self.tmp().join(format!("{hex}.{}", rand::random::<u32>()));
        std::fs::create_dir(&work).io("create", &work)?;
        let work_lock = File::create(work.join(".lock")).io("create", work.join(".lock"))?;
        work_lock.lock().io("lock", work.join(".lock"))?;
        progress.begin(&name, plan.compressed_size());
        let started = std::time::Instant::now();
        // Only chunked formats can reuse chunks: no manifests are read for the others.
        let local = if plan
            .files
            .iter()
            .flat_map(|f| &f.parts)
            .any(|p| p.encoding.is_chunk())
        {
            self.local_chunks()
        } else {
            HashMap::new()
        };
        let res = crate::pull::pull_into(
            reg,
            &plan,
            &work,
            if opts.concurrency == 0 {
                crate::pull::default_concurrency()
            } else {
                opts.concurrency
            },
            progress.clone(),
            &local,
        )
        .await;
        progress.finish();
        let config = match res {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(self.no_space(e, &name, plan.uncompressed_size()));
            }
        };
        let install = || -> Result<()> {
            std::fs::write(work.join("manifest.json"), &fetched.bytes)
                .io("write", work.join("manifest.json"))?;
            let meta = Meta {
                reference: name.clone(),
                format: plan.format,
                pulled_at: chrono::Utc::now().to_rfc3339(),
                boot_id: boot_id(),
            };
            let meta_bytes = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Io {
                op: "serialise",
                path: work.join("meta.json"),
                source: std::io::Error::other(e),
            })?;
            std::fs::write(work.join("meta.json"), meta_bytes)
                .io("write", work.join("meta.json"))?;
            File::create(work.join(".pin")).io("create", work.join(".pin"))?;
            if boot_id().is_none() {
                persist(&work)?;
            }
            let dest = self.image_dir(&digest);
            std::fs::rename(&work, &dest).io("install", &dest)?;
            let parent = dest.parent().unwrap_or(&dest);
            File::open(parent)
                .and_then(|f| f.sync_all())
                .io("fsync", parent)?;
            if boot_id().is_some() {
                let dest = dest.clone();
                std::thread::spawn(move || {
                    if let Err(e) = persist(&dest) {
                        tracing::warn!(path = %dest.display(), error = %e, "background fsync of a pulled image failed");
                    }
                });
            }
            Ok(())
        };
        if let Err(e) = install() {
            let _ = std::fs::remove_dir_all(&work);
            return Err(self.no_space(e, &name, plan.uncompressed_size()));
        }
        drop(work_lock);
        drop(lock);
        let _ = std::fs::remove_file(&lock_path);
        self.write_ref(reference, &digest)?;
        tracing::info!(
            reference = %name,
            %digest,
            format = plan.format.as_str(),
            bytes = plan.compressed_size(),
            seconds = started.elapsed().as_secs_f64(),
            "image pulled"
        );
        let dir = self.image_dir(&digest);
        touch(&dir);
        Ok(LocalImage {
            digest,
            reference: name,
            dir,
            format: plan.format,
            config,
        })
    }

    fn write_ref(&self, reference: &Reference, digest: &str) -> Result<()> {
        let Some(path) = self.ref_path(reference) else {
            return Ok(());
        };
        let parent = path.parent().unwrap_or(&path).to_path_buf();
        std::fs::create_dir_all(&parent).io("create", &parent)?;
        let tmp = parent.join(format!(
            ".{}.tmp{}",
            reference.tag.as_deref().unwrap_or("x"),
            rand::random::<u32>()
        ));
        std::fs::write(&tmp, digest).io("write", &tmp)?;
        std::fs::rename(&tmp, &path).io("write", &path)
    }

    /// Pin an image so GC and `remove` leave it alone while the guard lives.
    pub fn pin(&self, image: &LocalImage) -> Result<PinGuard> {
        let path = self.image_dir(&image.digest).join(".pin");
        let f = File::open(&path).io("pin", &path)?;
        f.lock_shared().io("pin", &path)?;
        // A GC may have moved the directory away between open and lock.
        let same =
            std::fs::metadata(&path).is_ok_and(|m| f.metadata().is_ok_and(|o| o.ino() == m.ino()));
        if !same {
            return Err(ImageError::Io {
                op: "pin",
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "the image was removed"),
            });
        }
        touch(&image.dir);
        Ok(PinGuard {
            _file: f,
            digest: image.digest.clone(),
        })
    }

    fn refs(&self) -> Result<Vec<(String, PathBuf, String)>> {
        let mut out = Vec::new();
        let root = self.inner.root.join("refs");
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(_) => continue,
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    let rel = p
                        .strip_prefix(&root)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .to_string();
                    let (name, tag) = rel.rsplit_once('/').unwrap_or(("", &rel));
                    let digest = std::fs::read_to_string(&p)
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    out.push((format!("{name}:{tag}"), p, digest));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every cached image.
    pub fn list(&self) -> Result<Vec<ImageInfo>> {
        let refs = self.refs()?;
        let dir = self.inner.root.join("images/sha256");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).io("list", &dir)?.flatten() {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            let Some(img) = self.load(&digest, "")? else {
                continue;
            };
            let (disk_usage, size) = usage(&img.dir);
            out.push(ImageInfo {
                references: refs
                    .iter()
                    .filter(|r| r.2 == digest)
                    .map(|r| r.0.clone())
                    .collect(),
                digest,
                format: img.format,
                disk_usage,
                size,
                pinned: is_pinned(&img.dir),
                last_used: last_used(&img.dir),
            });
        }
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        Ok(out)
    }

    /// Remove a tag (and the image, unless another tag points to it or it is pinned).
    /// Returns whether anything was removed.
    pub fn remove(&self, reference: &Reference) -> Result<bool> {
        let digest = match &reference.digest {
            Some(d) => Some(d.clone()),
            None => match self.ref_path(reference) {
                Some(p) if p.exists() => {
                    let d = std::fs::read_to_string(&p)
                        .io("read", &p)?
                        .trim()
                        .to_string();
                    std::fs::remove_file(&p).io("remove", &p)?;
                    Some(d)
                }
                _ => None,
            },
        };
        let Some(digest) = digest else {
            return Ok(false);
        };
        let still_tagged = self.refs()?.iter().any(|r| r.2 == digest);
        if !still_tagged || reference.digest.is_some() {
            self.delete_image(&digest)?;
        }
        Ok(true)
    }

    /// Delete one image unless pinned; returns whether it was deleted.
    fn delete_image(&self, digest: &str) -> Result<bool> {
        let dir = self.image_dir(digest);
        if !dir.exists() {
            return Ok(false);
        }
        let pin_path = dir.join(".pin");
        let pin = File::open(&pin_path).io("open", &pin_path)?;
        if pin.try_lock().is_err() {
            tracing::info!(%digest, "image is in use; not removing it");
            return Ok(false);
        }
        let trash = self.tmp().join(format!("trash-{}", rand::random::<u64>()));
        std::fs::rename(&dir, &trash).io("remove", &dir)?;
        drop(pin);
        std::fs::remove_dir_all(&trash).io("remove", &trash)?;
        for (_, p, d) in self.refs()? {
            if d == digest {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(true)
    }

    /// Remove least-recently-used unpinned images until usage is at most `target` bytes.
    pub fn gc_to(&self, target: u64) -> Result<PruneReport> {
        let mut images = self.list()?;
        images.sort_by_key(|i| i.last_used);
        let mut used: u64 = images.iter().map(|i| i.disk_usage).sum();
        let mut report = PruneReport::default();
        for img in images {
            if used <= target {
                break;
            }
            if img.pinned {
                continue;
            }
            if self.delete_image(&img.digest)? {
                used -= img.disk_usage;
                report.freed += img.disk_usage;
                report.removed.push(img.digest);
            }
        }
        report.remaining = used;
        Ok(report)
    }

    /// GC to the budget, and remove untagged images.
    pub fn prune(&self) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        for img in self.list()? {
            if img.references.is_empty() && !img.pinned && self.delete_image(&img.digest)? {
                report.freed += img.disk_usage;
                report.removed.push(img.digest);
            }
        }
        let r = self.gc_to(self.inner.budget)?;
        report.freed += r.freed;
        report.removed.extend(r.removed);
        report.remaining = r.remaining;
        Ok(report)
    }
}

/// The current kernel boot's id (Linux), if there is one.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// fsync every file of an image directory, then mark it `.synced`.
fn persist(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).io("list", dir)?.flatten() {
        let p = e.path();
        if p.is_file() {
            File::open(&p).and_then(|f| f.sync_all()).io("fsync", &p)?;
        }
    }
    File::create(dir.join(".synced"))
        .and_then(|f| f.sync_all())
        .io("fsync", dir.join(".synced"))?;
    File::open(dir).and_then(|f| f.sync_all()).io("fsync", dir)
}

fn pick_platform(ms: &[Descriptor]) -> Option<&Descriptor> {
    let host_arch = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    };
    let host_os = if cfg!(target_os = "macos") {
        "darwin"
    } else {
        "linux"
    };
    let score = |d: &Descriptor| match &d.platform {
        Some(p) if p.os == host_os && p.architecture == host_arch => 3,
        Some(p) if p.os == "darwin" && p.architecture == "arm64" => 2,
        Some(p) if p.architecture == host_arch => 1,
        _ => 0,
    };
    ms.iter()
        .max_by_key(|d| score(d))
        .filter(|_| !ms.is_empty())
}

fn touch(dir: &Path) {
    let p = dir.join(".last-used");
    let _ = File::create(&p).and_then(|f| f.set_modified(SystemTime::now()));
}

fn last_used(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(".last-used"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn is_pinned(dir: &Path) -> bool {
    File::open(dir.join(".pin")).is_ok_and(|f| f.try_lock().is_err())
}

/// (allocated bytes, apparent bytes) of a directory's files.
fn usage(dir: &Path) -> (u64, u64) {
    let mut a = 0;
    let mut s = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                a += m.blocks() * 512;
                s += m.len();
            }
        }
    }
    (a, s)
}
