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
//!
//! The code: this module has the store's layout and [`ImageStore::open`]; `cache`
//! looks images up, lists them and pins them; `pull` fetches an image into the store;
//! `gc` removes images and collects garbage under the budget.

mod cache;
mod gc;
mod lazy;
mod pull;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::error::{ImageError, IoContext as _, Result};
use crate::manifest::Format;
use crate::media_types::Role;
use crate::reference::Reference;

pub use cache::{ImageInfo, PinGuard};
pub use gc::PruneReport;
pub use lazy::{LazyImage, LazyPull, NBD_EXPORT, PodDisk};
pub use pull::{PullOptions, PullPolicy};

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
    /// Set while its disk is still being fetched ([`ImageStore::pull_lazy`]): the disk is
    /// served over NBD, and `dir` holds every other file.
    pub lazy: Option<Arc<LazyImage>>,
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

type SharedPull = Shared<BoxFuture<'static, std::result::Result<LocalImage, Arc<ImageError>>>>;

struct Inner {
    root: PathBuf,
    budget: u64,
    inflight: Mutex<HashMap<String, (u64, SharedPull)>>,
    /// Images whose disks are served while they download, by digest.
    lazy: Mutex<HashMap<String, std::sync::Weak<LazyImage>>>,
    /// Held while a lazy disk is being started, so that pods asking for one image at
    /// once share one.
    lazy_start: tokio::sync::Mutex<()>,
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
                lazy: Mutex::new(HashMap::new()),
                lazy_start: tokio::sync::Mutex::new(()),
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
}

/// The `config.json` of an image directory.
fn read_config(dir: &Path) -> Result<VmConfig> {
    let path = dir.join(Role::Config.file_name());
    let bytes = std::fs::read(&path).io("read", &path)?;
    serde_json::from_slice(&bytes).map_err(|e| ImageError::Io {
        op: "parse",
        path,
        source: std::io::Error::other(e),
    })
}

/// The current kernel boot's id (Linux), if there is one.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}
