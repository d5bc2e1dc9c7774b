//! Removing images and garbage collection: least-recently-used images go first, pinned
//! ones never; disk usage of an image directory.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::Serialize;

use super::ImageStore;
use crate::error::{IoContext as _, Result};
use crate::reference::Reference;

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

/// (allocated bytes, apparent bytes) of a directory's files, those of its directories
/// included (an image's start-by-restore templates count against the cache budget).
pub(super) fn usage(dir: &Path) -> (u64, u64) {
    let mut a = 0;
    let mut s = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    let (da, ds) = usage(&e.path());
                    a += da;
                    s += ds;
                }
                Ok(t) if t.is_file() => {
                    if let Ok(m) = e.metadata() {
                        a += m.blocks() * 512;
                        s += m.len();
                    }
                }
                _ => {}
            }
        }
    }
    (a, s)
}

#[cfg(test)]
mod tests {
    use super::usage;

    #[test]
    fn usage_counts_the_files_of_subdirectories_too() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(d.path().join("disk.img"), vec![1u8; 1000])
            .unwrap_or_else(|e| panic!("{e}"));
        let t = d.path().join("templates").join("abc");
        std::fs::create_dir_all(&t).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(t.join("state"), vec![2u8; 500]).unwrap_or_else(|e| panic!("{e}"));
        let (allocated, apparent) = usage(d.path());
        assert_eq!(apparent, 1500);
        assert!(allocated >= 1500, "{allocated}");
    }
}
