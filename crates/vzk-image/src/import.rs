//! Importing VMs made elsewhere into an image directory that [`crate::push()`] takes:
//! a Tart VM directory, a macosvm bundle, or a raw disk with the rest given.
//!
//! | source | what is read | becomes |
//! |---|---|---|
//! | Tart VM (`~/.tart/vms/NAME`) | `config.json`, `disk.img`, `nvram.bin` | `config.json` (ours, [`crate::tart::convert_config`]), `tart-config.json` (Tart's, kept so a Tart push sends it unchanged), `disk.img`, `aux.img` |
//! | macosvm (its JSON spec, e.g. `vm.json`) | `hardwareModel`, `machineId`, `cpus`, `ram`, the `disk` and `aux` entries of `storage` (paths relative to the spec) | `config.json`, `disk.img`, `aux.img` |
//! | raw disk | the disk and what [`RawImport`] gives | `config.json`, `disk.img`, and `aux.img`, `kernel`, `initrd` when given |
//!
//! Files are reflinked where the filesystem can, else copied sparsely (all-zero 1 MiB
//! blocks stay holes), so the source is never modified. The directory is made beside its
//! destination under a temporary name and renamed into place at the end: a failed import
//! leaves nothing behind.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{GuestOs, VmConfig};
use crate::error::{ImageError, IoContext as _, Result};
use crate::media_types as mt;
use crate::progress::Progress;
use crate::push::TART_CONFIG_FILE;

/// What to import.
#[derive(Debug, Clone)]
pub enum ImportSource {
    /// A Tart VM directory (`config.json`, `disk.img`, `nvram.bin`).
    Tart(PathBuf),
    /// A macosvm JSON spec; its `storage` paths are relative to the spec's directory.
    Macosvm(PathBuf),
    /// A raw disk and the rest of the image, given by hand.
    Raw(RawImport),
}

/// A raw disk image and what a `config.json` needs besides it.
#[derive(Debug, Clone, Default)]
pub struct RawImport {
    /// The raw disk.
    pub disk: PathBuf,
    /// Guest OS.
    pub os: GuestOs,
    /// `arm64` or `amd64` (default per OS).
    pub arch: Option<String>,
    /// macOS auxiliary storage, or a Linux EFI variable store.
    pub aux: Option<PathBuf>,
    /// Linux: a kernel for direct boot.
    pub kernel: Option<PathBuf>,
    /// Linux: an initrd for direct boot.
    pub initrd: Option<PathBuf>,
    /// Linux: the kernel command line.
    pub kernel_cmdline: Option<String>,
    /// Default vCPUs.
    pub cpus: Option<u32>,
    /// Default memory in bytes.
    pub memory_bytes: Option<u64>,
    /// macOS: base64 of the hardware model's data representation.
    pub hardware_model_data: Option<String>,
    /// macOS: base64 of the machine identifier's data representation.
    pub machine_id_data: Option<String>,
}

impl ImportSource {
    /// Tell a Tart VM directory from a macosvm bundle (a directory holding one JSON spec
    /// with a `storage` list, or the spec itself). A raw disk is never guessed.
    pub fn detect(path: &Path) -> Result<ImportSource> {
        let bad = |reason: String| ImageError::InvalidImageDir {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.is_file() {
            if is_macosvm_spec(path) {
                return Ok(ImportSource::Macosvm(path.to_path_buf()));
            }
            return Err(bad(
                "neither a Tart VM directory nor a macosvm spec (a raw disk is imported with --raw and its flags)".into(),
            ));
        }
        if path.join("nvram.bin").is_file() && path.join("config.json").is_file() {
            return Ok(ImportSource::Tart(path.to_path_buf()));
        }
        let specs: Vec<PathBuf> = std::fs::read_dir(path)
            .io("read", path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json") && is_macosvm_spec(p))
            .collect();
        match specs.as_slice() {
            [one] => Ok(ImportSource::Macosvm(one.clone())),
            [] => Err(bad(
                "neither a Tart VM directory (config.json, disk.img, nvram.bin) nor a macosvm bundle (a JSON spec with `storage`)".into(),
            )),
            many => Err(bad(format!(
                "{} macosvm specs ({}): name the one to import",
                many.len(),
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// `tart`, `macosvm` or `raw`.
    pub fn kind(&self) -> &'static str {
        match self {
            ImportSource::Tart(_) => "tart",
            ImportSource::Macosvm(_) => "macosvm",
            ImportSource::Raw(_) => "raw",
        }
    }
}

fn is_macosvm_spec(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    // A spec is small; a disk image named *.json is not read whole.
    let mut bytes = Vec::new();
    if f.take(1 << 20).read_to_end(&mut bytes).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .is_some_and(|v| v.get("storage").is_some_and(|s| s.is_array()))
}

/// One file of an imported image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportedFile {
    /// Its name in the image directory.
    pub name: String,
    /// Where it came from.
    pub source: PathBuf,
    /// Bytes.
    pub size: u64,
    /// `reflink` or `copy`.
    pub how: &'static str,
}

/// What an import made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    /// The image directory.
    pub dir: PathBuf,
    /// `tart`, `macosvm` or `raw`.
    pub kind: &'static str,
    /// Its `config.json`.
    pub config: VmConfig,
    /// Its files besides the configs.
    pub files: Vec<ImportedFile>,
}

/// macosvm's spec, the fields we use.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MacosvmSpec {
    hardware_model: Option<String>,
    machine_id: Option<String>,
    #[serde(default)]
    storage: Vec<MacosvmStorage>,
    ram: Option<u64>,
    cpus: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct MacosvmStorage {
    #[serde(rename = "type")]
    kind: String,
    file: PathBuf,
}

/// What goes into the image directory.
struct Plan {
    config: VmConfig,
    /// Tart's own config, kept beside ours.
    tart_config: Option<Vec<u8>>,
    /// (name in the image, source file)
    files: Vec<(&'static str, PathBuf)>,
}

fn plan(src: &ImportSource) -> Result<Plan> {
    match src {
        ImportSource::Tart(dir) => {
            let bad = |reason: String| ImageError::InvalidImageDir {
                path: dir.clone(),
                reason,
            };
            let cfg_path = dir.join("config.json");
            let bytes = std::fs::read(&cfg_path).map_err(|e| bad(format!("config.json: {e}")))?;
            let raw: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("config.json: {e}")))?;
            if let Some(f) = raw.get("diskFormat").and_then(|f| f.as_str())
                && f != "raw"
            {
                return Err(bad(format!(
                    "its disk is in the {f:?} format; vz-kubelet images carry a raw disk (convert it first, e.g. `diskutil image convert --format RAW`)"
                )));
            }
            let mut config = crate::tart::convert_config(&bytes).map_err(&bad)?;
            config.mediatype = mt::VZK_CONFIG.to_string();
            Ok(Plan {
                config,
                tart_config: Some(bytes),
                files: vec![
                    ("disk.img", dir.join("disk.img")),
                    ("aux.img", dir.join("nvram.bin")),
                ],
            })
        }
        ImportSource::Macosvm(spec_path) => {
            let bad = |reason: String| ImageError::InvalidImageDir {
                path: spec_path.clone(),
                reason,
            };
            let bytes = std::fs::read(spec_path).map_err(|e| bad(e.to_string()))?;
            let spec: MacosvmSpec = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("not a macosvm spec: {e}")))?;
            let base = spec_path.parent().unwrap_or(Path::new("."));
            let of = |kind: &str| -> Vec<PathBuf> {
                spec.storage
                    .iter()
                    .filter(|s| s.kind == kind)
                    .map(|s| base.join(&s.file))
                    .collect()
            };
            let (disks, auxes) = (of("disk"), of("aux"));
            let disk = match disks.as_slice() {
                [one] => one.clone(),
                [] => return Err(bad("its storage has no disk".into())),
                many => {
                    return Err(bad(format!(
                        "its storage has {} disks; an image carries one (the boot disk)",
                        many.len()
                    )));
                }
            };
            let [aux] = auxes.as_slice() else {
                return Err(bad(format!(
                    "its storage has {} aux entries; a macOS VM has exactly one",
                    auxes.len()
                )));
            };
            if spec.machine_id.is_none() || spec.hardware_model.is_none() {
                return Err(bad(
                    "it lacks machineId or hardwareModel (the VM cannot boot without the identifier it was installed with)".into(),
                ));
            }
            Ok(Plan {
                config: VmConfig {
                    mediatype: mt::VZK_CONFIG.to_string(),
                    os: GuestOs::Darwin,
                    arch: Some("arm64".into()),
                    hardware_model_data: spec.hardware_model,
                    machine_id_data: spec.machine_id,
                    cpus: spec.cpus,
                    memory_bytes: spec.ram,
                    ..Default::default()
                },
                tart_config: None,
                files: vec![("disk.img", disk), ("aux.img", aux.clone())],
            })
        }
        ImportSource::Raw(r) => {
            let mut files = vec![("disk.img", r.disk.clone())];
            for (name, p) in [
                ("aux.img", &r.aux),
                ("kernel", &r.kernel),
                ("initrd", &r.initrd),
            ] {
                if let Some(p) = p {
                    files.push((name, p.clone()));
                }
            }
            let bad = |reason: &str| ImageError::InvalidImageDir {
                path: r.disk.clone(),
                reason: reason.to_string(),
            };
            match r.os {
                GuestOs::Darwin if r.aux.is_none() => {
                    return Err(bad("a macOS image needs its auxiliary storage (--aux)"));
                }
                GuestOs::Darwin if r.kernel.is_some() || r.initrd.is_some() => {
                    return Err(bad("a macOS image has no kernel or initrd"));
                }
                GuestOs::Linux if r.initrd.is_some() && r.kernel.is_none() => {
                    return Err(bad("an initrd without a kernel"));
                }
                _ => {}
            }
            Ok(Plan {
                config: VmConfig {
                    mediatype: mt::VZK_CONFIG.to_string(),
                    os: r.os,
                    arch: r.arch.clone(),
                    hardware_model_data: r.hardware_model_data.clone(),
                    machine_id_data: r.machine_id_data.clone(),
                    kernel_cmdline: r.kernel_cmdline.clone(),
                    cpus: r.cpus,
                    memory_bytes: r.memory_bytes,
                    ..Default::default()
                },
                tart_config: None,
                files,
            })
        }
    }
}

/// Import `src` into a new image directory `out` (which must not exist, or be empty).
pub fn import(src: &ImportSource, out: &Path, progress: &dyn Progress) -> Result<ImportReport> {
    let plan = plan(src)?;
    let bad_src = |path: &Path, reason: String| ImageError::InvalidImageDir {
        path: path.to_path_buf(),
        reason,
    };
    if plan.config.os == GuestOs::Darwin {
        plan.config
            .mac_platform()
            .map_err(|e| bad_src(out, format!("its macOS platform data: {e}")))?;
    }
    let mut sizes = Vec::with_capacity(plan.files.len());
    for (_, p) in &plan.files {
        let m = std::fs::metadata(p).map_err(|e| bad_src(p, e.to_string()))?;
        if !m.is_file() {
            return Err(bad_src(p, "not a regular file".into()));
        }
        sizes.push(m.len());
    }
    match std::fs::read_dir(out).map(|mut d| d.next().is_some()) {
        Ok(true) => return Err(bad_src(out, "exists and is not empty".into())),
        Ok(false) => std::fs::remove_dir(out).io("remove", out)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad_src(out, e.to_string())),
    }
    let staging = crate::create::staging_beside(out, "import")?;
    progress.begin(&format!("import {}", out.display()), sizes.iter().sum());
    let made = fill(&plan, &sizes, &staging, progress);
    progress.finish();
    let files =
        match made.and_then(|f| std::fs::rename(&staging, out).io("rename", out).map(|()| f)) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
    Ok(ImportReport {
        dir: out.to_path_buf(),
        kind: src.kind(),
        config: plan.config,
        files,
    })
}

fn fill(
    plan: &Plan,
    sizes: &[u64],
    dir: &Path,
    progress: &dyn Progress,
) -> Result<Vec<ImportedFile>> {
    let mut files = Vec::new();
    for ((name, src), &size) in plan.files.iter().zip(sizes) {
        let dst = dir.join(name);
        let how = if reflink_copy::reflink(src, &dst).is_ok() {
            progress.advance(size);
            "reflink"
        } else {
            let _ = std::fs::remove_file(&dst);
            sparse_copy(src, &dst, progress)?;
            "copy"
        };
        files.push(ImportedFile {
            name: (*name).to_string(),
            source: src.clone(),
            size,
            how,
        });
    }
    let cfg = serde_json::to_vec_pretty(&plan.config).map_err(|e| ImageError::InvalidImageDir {
        path: dir.to_path_buf(),
        reason: format!("config.json: {e}"),
    })?;
    let p = dir.join("config.json");
    std::fs::write(&p, cfg).io("write", &p)?;
    if let Some(t) = &plan.tart_config {
        let p = dir.join(TART_CONFIG_FILE);
        std::fs::write(&p, t).io("write", &p)?;
    }
    for f in std::fs::read_dir(dir).io("read", dir)? {
        let p = f.io("read", dir)?.path();
        File::open(&p).and_then(|f| f.sync_all()).io("sync", &p)?;
    }
    Ok(files)
}

/// Copy `src` to `dst` leaving all-zero 1 MiB blocks as holes.
fn sparse_copy(src: &Path, dst: &Path, progress: &dyn Progress) -> Result<()> {
    const BLOCK: usize = 1 << 20;
    let mut input = File::open(src).io("open", src)?;
    let out = File::create(dst).io("create", dst)?;
    let mut buf = vec![0u8; BLOCK];
    let mut pos = 0u64;
    loop {
        // Fill the block (a short read is not the end).
        let mut n = 0;
        while n < BLOCK {
            match input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).io("read", src),
            }
        }
        if n == 0 {
            break;
        }
        if !crate::fetch::is_zero(&buf[..n]) {
            out.write_all_at(&buf[..n], pos).io("write", dst)?;
        }
        pos += n as u64;
        progress.advance(n as u64);
        if n < BLOCK {
            break;
        }
    }
    out.set_len(pos).io("write", dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::progress::NoProgress;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    #[test]
    fn a_sparse_copy_is_identical_and_keeps_holes() {
        let d = tmp();
        let src = d.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(9 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (9 << 20) - 4).unwrap();
        let dst = d.path().join("dst");
        sparse_copy(&src, &dst, &NoProgress).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt as _;
        // 7 of its 9 MiB are holes (filesystems that allocate them anyway aside).
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks <= 4 << 20 || blocks >= 9 << 20, "{blocks}");
    }

    #[test]
    fn macosvm_specs_are_read_and_checked() {
        let d = tmp();
        std::fs::write(d.path().join("disk.img"), b"disk").unwrap();
        std::fs::write(d.path().join("aux.img"), b"aux").unwrap();
        let spec = d.path().join("vm.json");
        std::fs::write(&spec, br#"{"hardwareModel":"aHc=","machineId":"aWQ=","storage":[{"type":"disk","file":"disk.img","readOnly":false},{"type":"aux","file":"aux.img"}],"ram":4294967296,"cpus":3,"displays":[{"dpi":200,"width":2560,"height":1600}],"version":1,"networks":[{"type":"nat"}],"audio":false}"#).unwrap();
        let src = ImportSource::detect(d.path()).unwrap();
        assert_eq!(src.kind(), "macosvm");
        let p = plan(&src).unwrap();
        assert_eq!(
            (p.config.cpus, p.config.memory_bytes),
            (Some(3), Some(4 << 30))
        );
        assert_eq!(p.config.machine_id_data.as_deref(), Some("aWQ="));
        assert_eq!(p.files[0], ("disk.img", d.path().join("disk.img")));
        assert_eq!(p.files[1], ("aux.img", d.path().join("aux.img")));
        // Two disks, or no machine identifier: refused with the reason.
        std::fs::write(&spec, br#"{"hardwareModel":"aHc=","machineId":"aWQ=","storage":[{"type":"disk","file":"a"},{"type":"disk","file":"b"},{"type":"aux","file":"aux.img"}]}"#).unwrap();
        let e = plan(&ImportSource::Macosvm(spec.clone()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("2 disks"), "{e}");
        std::fs::write(&spec, br#"{"hardwareModel":"aHc=","storage":[{"type":"disk","file":"disk.img"},{"type":"aux","file":"aux.img"}]}"#).unwrap();
        let e = plan(&ImportSource::Macosvm(spec))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("machineId"), "{e}");
    }

    #[test]
    fn a_tart_vm_in_asif_is_refused_and_nothing_is_left() {
        let d = tmp();
        let vm = d.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        std::fs::write(vm.join("config.json"), br#"{"version":1,"os":"linux","arch":"arm64","cpuCountMin":2,"cpuCount":2,"memorySizeMin":1,"memorySize":1,"macAddress":"02:00:00:00:00:01","diskFormat":"asif"}"#).unwrap();
        std::fs::write(vm.join("disk.img"), b"x").unwrap();
        std::fs::write(vm.join("nvram.bin"), b"y").unwrap();
        let src = ImportSource::detect(&vm).unwrap();
        assert_eq!(src.kind(), "tart");
        let out = d.path().join("out");
        let e = import(&src, &out, &NoProgress).err().unwrap().to_string();
        assert!(e.contains("asif"), "{e}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "only vm/");
    }

    #[test]
    fn raw_imports_check_what_the_os_needs() {
        let d = tmp();
        let disk = d.path().join("d.raw");
        std::fs::write(&disk, b"x").unwrap();
        let r = RawImport {
            disk: disk.clone(),
            os: GuestOs::Darwin,
            ..Default::default()
        };
        let e = import(&ImportSource::Raw(r), &d.path().join("o"), &NoProgress)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--aux"), "{e}");
        let r = RawImport {
            disk,
            os: GuestOs::Linux,
            kernel_cmdline: Some("console=ttyS0".into()),
            cpus: Some(2),
            ..Default::default()
        };
        let rep = import(&ImportSource::Raw(r), &d.path().join("o"), &NoProgress).unwrap();
        assert_eq!(rep.files.len(), 1);
        let cfg: VmConfig =
            serde_json::from_slice(&std::fs::read(d.path().join("o/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg.kernel_cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(cfg.os, GuestOs::Linux);
        // An existing, non-empty destination is refused.
        let r = RawImport {
            disk: d.path().join("d.raw"),
            os: GuestOs::Linux,
            ..Default::default()
        };
        let e = import(&ImportSource::Raw(r), &d.path().join("o"), &NoProgress)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not empty"), "{e}");
    }
}
