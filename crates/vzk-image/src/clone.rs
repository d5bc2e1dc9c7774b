//! Per-pod copy-on-write copies of a cached disk, which never modify the base.
//!
//! [`Cloner::detect`] finds what works where pod disks live: a reflink (`FICLONE` on
//! btrfs/XFS/bcachefs, `clonefile` on APFS), else a qcow2 overlay backed by the raw base
//! (`qemu-img create -f qcow2 -F raw -b base overlay`, for the QEMU backend). When
//! neither works it fails: we never fall back to copying a 100 GB disk.
//!
//! With an overlay the base must stay while the pod runs: pin the image
//! ([`crate::ImageStore::pin`]). A reflink is independent of the base once made.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, IoContext as _, Result};
use crate::store::LocalImage;

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    /// A reflink: a raw file sharing blocks with the base.
    Reflink,
    /// A qcow2 file whose backing file is the raw base.
    Qcow2Overlay,
}

impl CloneKind {
    /// The disk format of the clone as QEMU names it (`raw` or `qcow2`).
    pub fn qemu_format(self) -> &'static str {
        match self {
            CloneKind::Reflink => "raw",
            CloneKind::Qcow2Overlay => "qcow2",
        }
    }
}

/// Makes copy-on-write clones with the mechanism detected for a directory.
#[derive(Debug, Clone)]
pub struct Cloner {
    kind: CloneKind,
    qemu_img: PathBuf,
}

/// How long QEMU waits for a lazily served disk's server to come back (an agent
/// restarting) before a read fails.
pub const LAZY_RECONNECT_SECS: u32 = 60;

/// Whether the qcow2 file at `path` is backed by a disk served over NBD
/// ([`Cloner::clone_image`] of a lazy image): read from its header.
pub fn is_served_over_nbd(path: &Path) -> bool {
    use std::io::Read as _;
    let mut head = vec![0u8; 64 << 10];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let head = &head[..n];
    if head.len() < 20 || &head[..4] != b"QFI\xfb" {
        return false;
    }
    let at = u64::from_be_bytes(head[8..16].try_into().unwrap_or_default()) as usize;
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or_default()) as usize;
    let Some(name) = head.get(at..at.saturating_add(len)) else {
        return false;
    };
    let name = String::from_utf8_lossy(name);
    name.starts_with("nbd") || (name.starts_with("json:") && name.contains("\"driver\":\"nbd\""))
}

/// Small files (e.g. a 32 MiB `aux.img`) may be copied outright when reflinks are
/// unavailable; anything larger must be cloned.
pub const MAX_COPY_BYTES: u64 = 256 << 20;

impl Cloner {
    /// Probe `dir` (created if missing): reflink first, then `qemu-img`.
    pub fn detect(dir: impl AsRef<Path>) -> Result<Cloner> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).io("create", dir)?;
        let src = dir.join(format!(".reflink-probe-{}", rand::random::<u32>()));
        let dst = src.with_extension("clone");
        std::fs::write(&src, [1u8; 4096]).io("write", &src)?;
        let reflink = reflink_copy::reflink(&src, &dst);
        let _ = std::fs::remove_file(&src);
        let _ = std::fs::remove_file(&dst);
        let qemu_img =
            PathBuf::from(std::env::var_os("VZK_QEMU_IMG").unwrap_or_else(|| "qemu-img".into()));
        match reflink {
            Ok(()) => Ok(Cloner {
                kind: CloneKind::Reflink,
                qemu_img,
            }),
            Err(reflink_err) => {
                let qemu = Command::new(&qemu_img).arg("--version").output();
                match qemu {
                    Ok(o) if o.status.success() && !cfg!(target_os = "macos") => Ok(Cloner {
                        kind: CloneKind::Qcow2Overlay,
                        qemu_img,
                    }),
                    other => Err(ImageError::CloneUnsupported {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "reflink: {reflink_err}; qcow2 overlay: {}",
                            match other {
                                Ok(o) => format!("qemu-img --version exited with {}", o.status),
                                Err(e) => format!("{}: {e}", qemu_img.display()),
                            }
                        ),
                    }),
                }
            }
        }
    }

    /// A cloner of a given kind, without probing (tests; callers that know).
    pub fn with_kind(kind: CloneKind) -> Cloner {
        Cloner {
            kind,
            qemu_img: "qemu-img".into(),
        }
    }

    /// The mechanism in use.
    pub fn kind(&self) -> CloneKind {
        self.kind
    }

    /// Clone a raw disk to `dest` (replaced if it exists). The base is only read; on
    /// failure nothing is left at `dest`.
    pub fn clone_disk(&self, base: &Path, dest: &Path) -> Result<CloneKind> {
        self.clone_layer(base, "raw", dest).map(|(kind, _)| kind)
    }

    /// Clone `image`'s disk to `dest`: [`Cloner::clone_disk`] of the cached file, or for
    /// an image whose disk is still served on demand ([`LocalImage::lazy`]), a qcow2
    /// overlay backed by its NBD export (whatever the detected mechanism: a reflink of
    /// a file still being filled would copy its holes).
    pub fn clone_image(&self, image: &LocalImage, dest: &Path) -> Result<CloneKind> {
        let Some(lazy) = &image.lazy else {
            return self.clone_disk(&image.disk(), dest);
        };
        remove_if_exists(dest)?;
        if cfg!(target_os = "macos") {
            return Err(ImageError::CloneUnsupported {
                path: dest.to_path_buf(),
                reason: "a disk served on demand needs the QEMU backend".into(),
            });
        }
        let out = Command::new(&self.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
            .arg(lazy.qemu_backing(LAZY_RECONNECT_SECS))
            .arg(dest)
            .arg(lazy.disk().size().to_string())
            .output()
            .io("run qemu-img for", dest)?;
        if !out.status.success() {
            let _ = std::fs::remove_file(dest);
            return Err(ImageError::CloneUnsupported {
                path: dest.to_path_buf(),
                reason: format!(
                    "qemu-img create over {} failed ({}): {}",
                    lazy.nbd_url(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(CloneKind::Qcow2Overlay)
    }

    /// Clone a disk of format `base_format` (`raw` or `qcow2`, e.g. a template's own
    /// clone) to `dest`, replaced if it exists: a reflink keeps the format, an overlay is
    /// qcow2 backed by `base`. Returns how, and the clone's format. The base is only
    /// read; on failure nothing is left at `dest`.
    pub fn clone_layer(
        &self,
        base: &Path,
        base_format: &str,
        dest: &Path,
    ) -> Result<(CloneKind, &'static str)> {
        if !matches!(base_format, "raw" | "qcow2") {
            return Err(ImageError::CloneUnsupported {
                path: dest.to_path_buf(),
                reason: format!("a base disk in format {base_format:?}"),
            });
        }
        remove_if_exists(dest)?;
        let made = self.make_clone(base, base_format, dest).map(|kind| {
            let format = match kind {
                CloneKind::Reflink if base_format == "qcow2" => "qcow2",
                k => k.qemu_format(),
            };
            (kind, format)
        });
        if made.is_err() {
            // Nothing half-made stays behind (a disk that filled up mid-way, say).
            let _ = std::fs::remove_file(dest);
        }
        made
    }

    fn make_clone(&self, base: &Path, base_format: &str, dest: &Path) -> Result<CloneKind> {
        match self.kind {
            CloneKind::Reflink => {
                reflink_copy::reflink(base, dest).map_err(|e| ImageError::CloneUnsupported {
                    path: dest.to_path_buf(),
                    reason: format!("reflink of {}: {e}", base.display()),
                })?;
            }
            CloneKind::Qcow2Overlay => {
                let base_abs = std::fs::canonicalize(base).io("resolve", base)?;
                let out = Command::new(&self.qemu_img)
                    .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
                    .arg(&base_abs)
                    .arg(dest)
                    .output()
                    .io("run qemu-img for", dest)?;
                if !out.status.success() {
                    return Err(ImageError::CloneUnsupported {
                        path: dest.to_path_buf(),
                        reason: format!(
                            "qemu-img create failed ({}): {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    });
                }
            }
        }
        Ok(self.kind)
    }

    /// Make a writable private copy of a small raw file (e.g. `aux.img`): a reflink when
    /// possible, else a plain copy if it is at most [`MAX_COPY_BYTES`].
    pub fn clone_small_file(&self, base: &Path, dest: &Path) -> Result<()> {
        remove_if_exists(dest)?;
        if reflink_copy::reflink(base, dest).is_ok() {
            return Ok(());
        }
        let len = std::fs::metadata(base).io("stat", base)?.len();
        if len > MAX_COPY_BYTES {
            return Err(ImageError::CloneUnsupported {
                path: dest.to_path_buf(),
                reason: format!("{} is {len} bytes; refusing a full copy", base.display()),
            });
        }
        std::fs::copy(base, dest).io("copy to", dest)?;
        Ok(())
    }
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).io("remove", p),
    }
}
