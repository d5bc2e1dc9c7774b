//! Pulling an image into the store: pull policies, one shared download per reference,
//! one pull per manifest across processes, and the install into the cache.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt as _;

use super::cache::touch;
use super::{ImageStore, LocalImage, Meta, SharedPull, boot_id};
use crate::error::{ImageError, IoContext as _, Result};
use crate::hosts::RegistryHosts;
use crate::keyring::{Credentials, Keyring};
use crate::manifest::{self, Descriptor, Index};
use crate::media_types as mt;
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
    /// Credentials for the image's registry, tried in order (e.g. from
    /// [`crate::Keyring::lookup`]).
    pub credentials: Vec<Credentials>,
    /// Pull policy.
    pub policy: PullPolicy,
    /// Talk plain HTTP to the registry (unless its `hosts.toml` names a `server`).
    pub plain_http: bool,
    /// Accept any TLS certificate (where `hosts.toml` does not set `skip_verify`).
    pub insecure: bool,
    /// Mirrors and TLS per registry (`hosts.toml`, see [`crate::hosts`]).
    pub hosts: RegistryHosts,
    /// Credentials for mirrors (and another `server`), by their own host names.
    pub keyring: Keyring,
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
            .field("hosts", &self.hosts.namespaces())
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl PullOptions {
    pub(super) fn registry_options(&self) -> RegistryOptions {
        RegistryOptions {
            credentials: self.credentials.clone(),
            plain_http: self.plain_http,
            insecure: self.insecure,
            hosts: self.hosts.clone(),
            keyring: self.keyring.clone(),
        }
    }
}

impl ImageStore {
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
        if reg.host_urls().len() > 1 {
            tracing::debug!(reference = %reference, hosts = ?reg.host_urls(), "hosts to try, in order");
        }
        let name = reference.to_string();
        let fetched = self.resolve(&reg, reference).await?;
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
        let (lock, lock_path) = self.manifest_lock(&hex)?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock))
            .await
            .map_err(|_| ImageError::Cancelled)?
            .io("lock", &lock_path)?;
        if let Some(img) = self.load(&digest, &name)? {
            self.write_ref(reference, &digest)?;
            return Ok(img);
        }
        let (work, work_lock) = self.work_dir(&hex)?;
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
            reg.clone(),
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
        if let Err(e) = self.install(&work, &fetched.bytes, &name, plan.format, &digest) {
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
            served_by = %reg.served_summary(),
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
            lazy: None,
        })
    }

    /// The file whose lock makes one pull per manifest (`hex`) across processes, and its
    /// path; not locked yet.
    pub(super) fn manifest_lock(&self, hex: &str) -> Result<(File, PathBuf)> {
        let path = self.tmp().join(format!("{hex}.lock"));
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .io("create", &path)?;
        Ok((f, path))
    }

    /// A new pull directory for manifest `hex` under `tmp/`, locked (so that a store
    /// opened meanwhile leaves it alone) while the returned file lives.
    pub(super) fn work_dir(&self, hex: &str) -> Result<(PathBuf, File)> {
        let work = self.tmp().join(format!("{hex}.{}", rand::random::<u32>()));
        std::fs::create_dir(&work).io("create", &work)?;
        let lock = File::create(work.join(".lock")).io("create", work.join(".lock"))?;
        lock.lock().io("lock", work.join(".lock"))?;
        Ok((work, lock))
    }

    /// The manifest `reference` names; from an index, the one for this host's platform.
    pub(super) async fn resolve(
        &self,
        reg: &Registry,
        reference: &Reference,
    ) -> Result<crate::registry::FetchedManifest> {
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
        Ok(fetched)
    }

    /// Move a complete, verified pull directory `work` into the cache as the image
    /// `digest` (with its manifest bytes and metadata), durably.
    pub(super) fn install(
        &self,
        work: &Path,
        manifest: &[u8],
        name: &str,
        format: crate::manifest::Format,
        digest: &str,
    ) -> Result<()> {
        std::fs::write(work.join("manifest.json"), manifest)
            .io("write", work.join("manifest.json"))?;
        let meta = Meta {
            reference: name.to_owned(),
            format,
            pulled_at: chrono::Utc::now().to_rfc3339(),
            boot_id: boot_id(),
        };
        let meta_bytes = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Io {
            op: "serialise",
            path: work.join("meta.json"),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(work.join("meta.json"), meta_bytes).io("write", work.join("meta.json"))?;
        File::create(work.join(".pin")).io("create", work.join(".pin"))?;
        if boot_id().is_none() {
            persist(work)?;
        }
        let dest = self.image_dir(digest);
        std::fs::rename(work, &dest).io("install", &dest)?;
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
