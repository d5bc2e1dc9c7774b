//! Making a macOS image from a restore image (IPSW): fetching it, planning the VM from
//! its requirements and the host, and laying out the image directory. Installing needs
//! Virtualization.framework (`vzk_vz::macos::install`, on a Mac); every decision it acts
//! on is made here, where it is tested.
//!
//! The steps of `vz-kubelet image create macos`:
//! 1. [`fetch_ipsw`]: a local file as is; a URL downloaded once into the cache's `ipsw/`
//!    directory (resumed with `Range` after a dropped connection).
//! 2. The framework loads it and reports [`RestoreRequirements`].
//! 3. [`plan_macos`]: CPUs, memory and disk from the request, the image's minimums and
//!    the host's limits, or a clear refusal.
//! 4. [`StagedImage`]: a directory beside the destination with a sparse `disk.img`;
//!    the framework creates `aux.img` and a machine identifier there, installs, and
//!    [`StagedImage::write_config`] + [`StagedImage::commit`] make it an image directory
//!    that `image push` takes. Anything that fails leaves nothing behind.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures::StreamExt as _;
use tokio::io::AsyncWriteExt as _;

use crate::config::{GuestOs, VmConfig};
use crate::error::{ImageError, IoContext as _, Result};
use crate::media_types as mt;
use crate::progress::Progress;

/// The smallest disk we create: a macOS install alone takes about 25 GB.
pub const MIN_DISK_BYTES: u64 = 32 << 30;
/// The disk size when none is asked for (Tart's default is 50 GB; Xcode needs more).
pub const DEFAULT_DISK_BYTES: u64 = 80 << 30;

/// What a restore image asks of the VM, as Virtualization.framework reports it
/// (`mostFeaturefulSupportedConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreRequirements {
    /// `VZMacHardwareModel.dataRepresentation`; `None` when no configuration of the
    /// image is supported on this host.
    pub hardware_model: Option<Vec<u8>>,
    /// Whether this host can run that hardware model (`isSupported`).
    pub host_supported: bool,
    /// `minimumSupportedCPUCount`.
    pub min_cpus: u32,
    /// `minimumSupportedMemorySize`, bytes.
    pub min_memory_bytes: u64,
    /// The macOS version and build, e.g. `15.3 (24D60)`.
    pub version: String,
}

/// What the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacosRequest {
    /// Disk size in bytes ([`DEFAULT_DISK_BYTES`] when `None`).
    pub disk_bytes: Option<u64>,
    /// vCPUs (the image's minimum when `None`).
    pub cpus: Option<u32>,
    /// Memory in bytes (the image's minimum when `None`).
    pub memory_bytes: Option<u64>,
}

/// What the framework allows on this host (`VZVirtualMachineConfiguration`'s bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// `maximumAllowedCPUCount`.
    pub max_cpus: u32,
    /// `maximumAllowedMemorySize`.
    pub max_memory_bytes: u64,
}

/// The VM to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacosPlan {
    /// Disk size in bytes.
    pub disk_bytes: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// The hardware model to create the auxiliary storage and platform with.
    pub hardware_model: Vec<u8>,
    /// The image's minimums, kept in the config (a pod asking for less is refused).
    pub min_cpus: u32,
    /// The image's minimum memory.
    pub min_memory_bytes: u64,
    /// The macOS version installed.
    pub version: String,
}

fn refuse(reason: String) -> ImageError {
    ImageError::InvalidImageDir {
        path: PathBuf::from("restore image"),
        reason,
    }
}

/// Decide the VM for a restore image, or say why it cannot be made here.
pub fn plan_macos(
    req: &MacosRequest,
    image: &RestoreRequirements,
    host: HostLimits,
) -> Result<MacosPlan> {
    let hardware_model = match (&image.hardware_model, image.host_supported) {
        (Some(m), true) => m.clone(),
        _ => {
            return Err(refuse(format!(
                "macOS {} needs a hardware model this Mac does not support: install it on a Mac whose macOS is at least as new",
                image.version
            )));
        }
    };
    let cpus = req.cpus.unwrap_or(image.min_cpus).max(1);
    if cpus < image.min_cpus {
        return Err(refuse(format!(
            "macOS {} needs at least {} CPUs, {cpus} asked",
            image.version, image.min_cpus
        )));
    }
    if cpus > host.max_cpus {
        return Err(refuse(format!(
            "{cpus} CPUs asked, this Mac allows a VM at most {}",
            host.max_cpus
        )));
    }
    let memory_bytes = req.memory_bytes.unwrap_or(image.min_memory_bytes);
    if memory_bytes < image.min_memory_bytes {
        return Err(refuse(format!(
            "macOS {} needs at least {} MiB of memory, {} MiB asked",
            image.version,
            image.min_memory_bytes >> 20,
            memory_bytes >> 20
        )));
    }
    if memory_bytes > host.max_memory_bytes {
        return Err(refuse(format!(
            "{} MiB of memory asked, this Mac allows a VM at most {} MiB",
            memory_bytes >> 20,
            host.max_memory_bytes >> 20
        )));
    }
    let disk_bytes = req.disk_bytes.unwrap_or(DEFAULT_DISK_BYTES);
    if disk_bytes < MIN_DISK_BYTES {
        return Err(refuse(format!(
            "a {} GiB disk is too small for macOS (at least {} GiB)",
            disk_bytes >> 30,
            MIN_DISK_BYTES >> 30
        )));
    }
    Ok(MacosPlan {
        disk_bytes,
        cpus,
        memory_bytes,
        hardware_model,
        min_cpus: image.min_cpus,
        min_memory_bytes: image.min_memory_bytes,
        version: image.version.clone(),
    })
}

/// A new empty directory beside `out` (same filesystem, so a rename moves it into place),
/// named `.<out's name>.<what>-<random>`.
pub(crate) fn staging_beside(out: &Path, what: &str) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| ImageError::InvalidImageDir {
        path: out.to_path_buf(),
        reason: "has no file name".into(),
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).io("create", &parent)?;
    let staging = parent.join(format!(
        ".{}.{what}-{:08x}",
        name.to_string_lossy(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&staging).io("create", &staging)?;
    Ok(staging)
}

/// An image directory being made beside its destination; removed unless committed.
#[derive(Debug)]
pub struct StagedImage {
    staging: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl StagedImage {
    /// Start making `out`, which must not exist yet.
    pub fn begin(out: &Path) -> Result<StagedImage> {
        let bad = |reason: &str| ImageError::InvalidImageDir {
            path: out.to_path_buf(),
            reason: reason.to_string(),
        };
        if out.exists() {
            return Err(bad("already exists"));
        }
        let staging = staging_beside(out, "create")?;
        Ok(StagedImage {
            staging,
            out: out.to_path_buf(),
            committed: false,
        })
    }

    /// Where the disk goes.
    pub fn disk(&self) -> PathBuf {
        self.staging.join("disk.img")
    }

    /// Where the framework creates the auxiliary storage.
    pub fn aux(&self) -> PathBuf {
        self.staging.join("aux.img")
    }

    /// Create the sparse disk of `bytes`.
    pub fn create_disk(&self, bytes: u64) -> Result<()> {
        let p = self.disk();
        let f = std::fs::File::create(&p).io("create", &p)?;
        f.set_len(bytes).io("create", &p)
    }

    /// Write `config.json` for the installed VM.
    pub fn write_config(&self, plan: &MacosPlan, machine_id: &[u8]) -> Result<VmConfig> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut config = VmConfig {
            mediatype: mt::VZK_CONFIG.to_string(),
            os: GuestOs::Darwin,
            arch: Some("arm64".into()),
            hardware_model_data: Some(b64.encode(&plan.hardware_model)),
            machine_id_data: Some(b64.encode(machine_id)),
            cpus: Some(plan.cpus),
            memory_bytes: Some(plan.memory_bytes),
            min_cpus: Some(plan.min_cpus),
            min_memory_bytes: Some(plan.min_memory_bytes),
            ..Default::default()
        };
        config.extra.insert(
            "macosVersion".into(),
            serde_json::Value::String(plan.version.clone()),
        );
        let bytes =
            serde_json::to_vec_pretty(&config).map_err(|e| ImageError::InvalidImageDir {
                path: self.staging.clone(),
                reason: format!("config.json: {e}"),
            })?;
        let p = self.staging.join("config.json");
        std::fs::write(&p, bytes).io("write", &p)?;
        Ok(config)
    }

    /// Move the finished directory into place; it must hold a disk, the auxiliary
    /// storage and the config.
    pub fn commit(mut self) -> Result<PathBuf> {
        for f in ["disk.img", "aux.img", "config.json"] {
            if !self.staging.join(f).is_file() {
                return Err(ImageError::InvalidImageDir {
                    path: self.staging.clone(),
                    reason: format!("{f} was not made"),
                });
            }
        }
        std::fs::rename(&self.staging, &self.out).io("rename", &self.out)?;
        self.committed = true;
        Ok(self.out.clone())
    }
}

impl Drop for StagedImage {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Where a restore image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpswSource {
    /// A local file.
    Path(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
}

impl IpswSource {
    /// A URL when `s` starts with `http://` or `https://`, else a path.
    pub fn parse(s: &str) -> IpswSource {
        if s.starts_with("https://") || s.starts_with("http://") {
            IpswSource::Url(s.to_string())
        } else {
            IpswSource::Path(PathBuf::from(s))
        }
    }
}

/// Attempts per download (each resumes where the last stopped).
const ATTEMPTS: u32 = 5;

/// The local restore image for `src`: a path as is (it must be a file); a URL from
/// `cache_dir/ipsw/` when downloaded before, else downloaded there (a `.part` file,
/// resumed with `Range` across dropped connections, renamed when complete and as long as
/// the server said).
pub async fn fetch_ipsw(
    src: &IpswSource,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let url = match src {
        IpswSource::Path(p) => {
            let m = std::fs::metadata(p).map_err(|e| ImageError::InvalidImageDir {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            if !m.is_file() {
                return Err(ImageError::InvalidImageDir {
                    path: p.clone(),
                    reason: "not a file".into(),
                });
            }
            return Ok(p.clone());
        }
        IpswSource::Url(u) => u,
    };
    let dir = cache_dir.join("ipsw");
    std::fs::create_dir_all(&dir).io("create", &dir)?;
    let digest = crate::registry::sha256_digest(url.as_bytes());
    let key = digest.get(7..23).unwrap_or("ipsw");
    let base = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && n.len() < 200)
        .map(|n| {
            n.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        })
        .unwrap_or_else(|| "restore.ipsw".into());
    let done = dir.join(format!("{key}-{base}"));
    if done.is_file() {
        return Ok(done);
    }
    let part = dir.join(format!("{key}-{base}.part"));
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| download_error(url, &e.to_string()))?;
    let mut last = String::new();
    let mut begun = false;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(4))).await;
        }
        match download_once(&client, url, &part, progress, &mut begun).await {
            Ok(()) => {
                progress.finish();
                std::fs::rename(&part, &done).io("rename", &done)?;
                return Ok(done);
            }
            Err(Attempt::Fatal(e)) => {
                progress.finish();
                return Err(e);
            }
            Err(Attempt::Retry(e)) => {
                tracing::warn!(url, attempt, error = %e, "restore image download interrupted; resuming");
                last = e;
            }
        }
    }
    progress.finish();
    Err(download_error(
        url,
        &format!("gave up after {ATTEMPTS} attempts: {last}"),
    ))
}

fn download_error(url: &str, detail: &str) -> ImageError {
    ImageError::Registry {
        registry: url.to_string(),
        what: "download the restore image".into(),
        detail: detail.to_string(),
    }
}

enum Attempt {
    Retry(String),
    Fatal(ImageError),
}

async fn download_once(
    client: &reqwest::Client,
    url: &str,
    part: &Path,
    progress: &dyn Progress,
    begun: &mut bool,
) -> std::result::Result<(), Attempt> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    let status = resp.status();
    let (offset, total) = match status.as_u16() {
        206 => {
            let total = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok());
            (have, total)
        }
        200 => (0, resp.content_length()),
        416 if have > 0 => {
            // Our partial file is longer than the resource: start again.
            let _ = std::fs::remove_file(part);
            return Err(Attempt::Retry("range not satisfiable; restarting".into()));
        }
        s if (500..600).contains(&s) || s == 429 => {
            return Err(Attempt::Retry(format!("HTTP {status}")));
        }
        _ => {
            return Err(Attempt::Fatal(download_error(
                url,
                &format!("HTTP {status}"),
            )));
        }
    };
    if !*begun {
        progress.begin("download restore image", total.unwrap_or(0));
        *begun = true;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .open(part)
        .await
        .map_err(|e| {
            Attempt::Fatal(ImageError::Io {
                op: "open",
                path: part.to_path_buf(),
                source: e,
            })
        })?;
    let io_fatal = |e: std::io::Error| {
        Attempt::Fatal(ImageError::Io {
            op: "write",
            path: part.to_path_buf(),
            source: e,
        })
    };
    if offset > 0 {
        use tokio::io::AsyncSeekExt as _;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_fatal)?;
    }
    let mut got = offset;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Attempt::Retry(e.to_string()))?;
        file.write_all(&chunk).await.map_err(io_fatal)?;
        got += chunk.len() as u64;
        progress.advance(chunk.len() as u64);
    }
    file.flush().await.map_err(io_fatal)?;
    file.sync_all().await.map_err(io_fatal)?;
    match total {
        Some(t) if got < t => Err(Attempt::Retry(format!("got {got} of {t} bytes"))),
        Some(t) if got > t => {
            let _ = std::fs::remove_file(part);
            Err(Attempt::Fatal(download_error(
                url,
                &format!("got {got} bytes, the server announced {t}"),
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sonoma() -> RestoreRequirements {
        RestoreRequirements {
            hardware_model: Some(vec![1, 2, 3]),
            host_supported: true,
            min_cpus: 2,
            min_memory_bytes: 4 << 30,
            version: "14.6.1 (23G93)".into(),
        }
    }

    const HOST: HostLimits = HostLimits {
        max_cpus: 8,
        max_memory_bytes: 16 << 30,
    };

    #[test]
    fn defaults_are_the_images_minimums_and_an_80_gib_disk() {
        let p = plan_macos(&MacosRequest::default(), &sonoma(), HOST).unwrap();
        assert_eq!(
            (p.cpus, p.memory_bytes, p.disk_bytes),
            (2, 4 << 30, 80 << 30)
        );
        assert_eq!(p.hardware_model, vec![1, 2, 3]);
        let p = plan_macos(
            &MacosRequest {
                cpus: Some(6),
                memory_bytes: Some(12 << 30),
                disk_bytes: Some(120 << 30),
            },
            &sonoma(),
            HOST,
        )
        .unwrap();
        assert_eq!(
            (p.cpus, p.memory_bytes, p.disk_bytes),
            (6, 12 << 30, 120 << 30)
        );
    }

    #[test]
    fn what_cannot_be_made_is_refused_with_the_reason() {
        let cases: [(MacosRequest, RestoreRequirements, &str); 6] = [
            (
                MacosRequest::default(),
                RestoreRequirements {
                    host_supported: false,
                    ..sonoma()
                },
                "does not support",
            ),
            (
                MacosRequest::default(),
                RestoreRequirements {
                    hardware_model: None,
                    ..sonoma()
                },
                "does not support",
            ),
            (
                MacosRequest {
                    cpus: Some(1),
                    ..Default::default()
                },
                sonoma(),
                "at least 2 CPUs",
            ),
            (
                MacosRequest {
                    cpus: Some(9),
                    ..Default::default()
                },
                sonoma(),
                "at most 8",
            ),
            (
                MacosRequest {
                    memory_bytes: Some(2 << 30),
                    ..Default::default()
                },
                sonoma(),
                "at least 4096 MiB",
            ),
            (
                MacosRequest {
                    disk_bytes: Some(20 << 30),
                    ..Default::default()
                },
                sonoma(),
                "too small",
            ),
        ];
        for (req, img, want) in cases {
            let e = plan_macos(&req, &img, HOST).unwrap_err().to_string();
            assert!(e.contains(want), "{req:?}: {e}");
        }
    }

    #[test]
    fn a_staged_image_is_committed_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("sonoma");
        let plan = plan_macos(&MacosRequest::default(), &sonoma(), HOST).unwrap();
        // Dropped before commit: nothing left.
        {
            let s = StagedImage::begin(&out).unwrap();
            s.create_disk(1 << 30).unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // Committed without the auxiliary storage: refused, nothing left.
        let s = StagedImage::begin(&out).unwrap();
        s.create_disk(1 << 30).unwrap();
        s.write_config(&plan, b"id").unwrap();
        assert!(s.commit().unwrap_err().to_string().contains("aux.img"));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // Whole: an image directory `image push` takes.
        let s = StagedImage::begin(&out).unwrap();
        s.create_disk(1 << 30).unwrap();
        std::fs::write(s.aux(), b"aux").unwrap();
        let cfg = s.write_config(&plan, b"id").unwrap();
        assert_eq!(s.commit().unwrap(), out);
        assert_eq!(
            std::fs::metadata(out.join("disk.img")).unwrap().len(),
            1 << 30
        );
        let back: VmConfig =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.machine_id_data.as_deref(), Some("aWQ="));
        assert_eq!((back.min_cpus, back.cpus), (Some(2), Some(2)));
        // An existing destination is refused.
        assert!(StagedImage::begin(&out).is_err());
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            IpswSource::parse(
                "https://updates.cdn-apple.com/x/UniversalMac_14.6.1_23G93_Restore.ipsw"
            ),
            IpswSource::Url(
                "https://updates.cdn-apple.com/x/UniversalMac_14.6.1_23G93_Restore.ipsw".into()
            )
        );
        assert_eq!(
            IpswSource::parse("./r.ipsw"),
            IpswSource::Path("./r.ipsw".into())
        );
    }
}
