//! Lookups in the cache (by tag or digest), tags, the listing, pins, and the chunks of
//! cached images a pull can reuse.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::gc::usage;
use super::{ImageStore, LocalImage, Meta};
use crate::error::{ImageError, IoContext as _, Result};
use crate::manifest::Format;
use crate::reference::Reference;

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

impl ImageStore {
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

    pub(super) fn load(&self, digest: &str, reference: &str) -> Result<Option<LocalImage>> {
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
        let config = super::read_config(&dir)?;
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
            lazy: None,
        }))
    }

    pub(super) fn write_ref(&self, reference: &Reference, digest: &str) -> Result<()> {
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

    pub(super) fn refs(&self) -> Result<Vec<(String, PathBuf, String)>> {
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

    /// Chunks (zstd or Tart LZ4) of the images in the cache, by content digest: a new
    /// version of an image mostly shares them, and a pull copies those instead of
    /// downloading them. Unreadable entries are skipped.
    pub(super) fn local_chunks(&self) -> HashMap<String, crate::fetch::LocalChunk> {
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
}

pub(super) fn touch(dir: &Path) {
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
