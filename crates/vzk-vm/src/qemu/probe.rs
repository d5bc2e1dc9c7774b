//! Run-time probe of the QEMU backend: the binary, its version, and whether KVM *really*
//! runs guests.
//!
//! `/dev/kvm` existing is not enough, and neither is QEMU's firmware running: with broken
//! nested or software KVM (seen here: a `kvm-pvm` host module), SeaBIOS runs to "No
//! bootable device" in real mode, and then a Linux kernel hangs right after "Probing EDD",
//! where it leaves real mode. So the probe boots a tiny payload of its own
//! ([`probe_bios`], source in `probe_payload.S`) as the machine's firmware: it goes from
//! the reset vector through protected mode and PAE paging into long mode, the path every
//! kernel takes, printing a progress letter per stage and [`PROBE_MARKER`] at the end to
//! the ISA debug console. KVM counts as working only if the marker comes back within
//! [`KVM_PROBE_TIMEOUT`], on the same machine type and CPU model real VMs get; QEMU
//! aborting (e.g. the `kvm_buf_set_msrs` assertion) counts as not working. Otherwise TCG
//! is used.
//!
//! The verdict is cached per process and, with [`select_accel_cached`], in a file keyed by
//! the host's boot id, the binary and its version, so an agent restart does not pay for a
//! failing probe again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// How long the probe payload may take to print its marker under KVM.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the probe payload prints when it reached long mode.
pub const PROBE_MARKER: &str = "VZK-PROBE-OK";

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// The CPU model real VMs get with this accelerator (see `command.rs`).
    pub fn cpu_model(self) -> &'static str {
        match self {
            Self::Kvm => "host",
            Self::Tcg => "max",
        }
    }
}

/// What to use: probe, or force one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if the probe passes, else TCG.
    #[default]
    Auto,
    /// Always this one.
    Force(Accel),
}

/// Errors of the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The QEMU binary could not be run.
    #[error("running {binary} failed")]
    Binary {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The probe payload could not be written.
    #[error("writing the probe payload {path}")]
    Payload {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The outcome of booting the probe payload once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeVerdict {
    /// The accelerator tried.
    pub accel: Accel,
    /// Whether the payload printed [`PROBE_MARKER`] in time.
    pub works: bool,
    /// The progress letters seen (`R` real mode, `P` protected mode, `L` long mode
    /// enabled, `G` paging on), then the marker.
    pub progress: String,
    /// Why it failed: timeout, QEMU's exit and the last line of its stderr.
    pub detail: String,
}

/// The payload's code, assembled from `probe_payload.S` (offsets 0.. of the image).
const PROBE_CODE: [u8; 237] = [
    0xfa, 0xfc, 0xba, 0x02, 0x04, 0xb0, 0x52, 0xee, 0x8c, 0xc8, 0x8e, 0xd8, 0x66, 0x0f, 0x01, 0x16,
    0xe8, 0x00, 0x0f, 0x20, 0xc0, 0x66, 0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x24, 0x00,
    0x0f, 0x00, 0x08, 0x00, 0x66, 0xb8, 0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0x66, 0xba,
    0x02, 0x04, 0xb0, 0x50, 0xee, 0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xc0, 0xb9, 0x00, 0x0c, 0x00,
    0x00, 0xf3, 0xab, 0xc7, 0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00, 0xc7, 0x05, 0x00,
    0x20, 0x00, 0x00, 0x03, 0x30, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x30, 0x00, 0x00, 0x83, 0x00, 0x00,
    0x00, 0x0f, 0x20, 0xe0, 0x83, 0xc8, 0x20, 0x0f, 0x22, 0xe0, 0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f,
    0x22, 0xd8, 0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00, 0x00, 0x0f, 0x30,
    0xb0, 0x4c, 0x66, 0xba, 0x02, 0x04, 0xee, 0x0f, 0x20, 0xc0, 0x0d, 0x00, 0x00, 0x00, 0x80, 0x0f,
    0x22, 0xc0, 0xb0, 0x47, 0xee, 0xea, 0x9c, 0x00, 0x0f, 0x00, 0x18, 0x00, 0x66, 0xba, 0x02, 0x04,
    0x48, 0x8d, 0x35, 0x12, 0x00, 0x00, 0x00, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0x66,
    0xba, 0xf4, 0x00, 0xb0, 0x00, 0xee, 0xf4, 0xeb, 0xfd, 0x56, 0x5a, 0x4b, 0x2d, 0x50, 0x52, 0x4f,
    0x42, 0x45, 0x2d, 0x4f, 0x4b, 0x0a, 0x00, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00, 0x1f, 0x00, 0xc8, 0x00, 0x0f,
];

/// `ljmp $0xf000, $0` at the reset vector (offset 0xFFF0 of the image).
const RESET_VECTOR: [u8; 5] = [0xea, 0x00, 0x00, 0x00, 0xf0];

/// The 64 KiB firmware image QEMU loads with `-bios` for the probe.
pub fn probe_bios() -> Vec<u8> {
    let mut image = vec![0u8; 0x10000];
    image[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    image[0xfff0..0xfff0 + RESET_VECTOR.len()].copy_from_slice(&RESET_VECTOR);
    image
}

/// The QEMU version line (`QEMU emulator version 7.2.22 ...`).
pub async fn qemu_version(binary: &Path) -> Result<String, ProbeError> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| ProbeError::Binary {
            binary: binary.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether KVM runs the probe payload to its marker; `Err` only if QEMU cannot run.
/// Cached per binary for the life of the process.
pub async fn kvm_works(binary: &Path) -> Result<bool, ProbeError> {
    // A failing probe costs KVM_PROBE_TIMEOUT, and every backend instance would pay it again.
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(known) = cache.lock().ok().and_then(|c| c.get(binary).copied()) {
        return Ok(known);
    }
    let works = if kvm_device_usable() {
        let verdict = payload_runs(binary, Accel::Kvm, KVM_PROBE_TIMEOUT).await?;
        tracing::info!(
            kvm = verdict.works,
            progress = %verdict.progress,
            detail = %verdict.detail,
            "KVM probe"
        );
        verdict.works
    } else {
        tracing::info!(kvm = false, "KVM probe: /dev/kvm cannot be opened");
        false
    };
    if let Ok(mut c) = cache.lock() {
        c.insert(binary.to_owned(), works);
    }
    Ok(works)
}

/// Boots the probe payload ([`probe_bios`]) under `accel` on the machine type and CPU model
/// real VMs use; returns within about `timeout` whatever the guest does.
pub async fn payload_runs(
    binary: &Path,
    accel: Accel,
    timeout: Duration,
) -> Result<ProbeVerdict, ProbeError> {
    let path = std::env::temp_dir().join(format!(
        "vzk-kvm-probe-{}-{:016x}.bin",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&path, probe_bios()).map_err(|source| ProbeError::Payload {
        path: path.clone(),
        source,
    })?;
    let verdict = run_payload(binary, accel, timeout, &path).await;
    let _ = std::fs::remove_file(&path);
    verdict
}

async fn run_payload(
    binary: &Path,
    accel: Accel,
    timeout: Duration,
    bios: &Path,
) -> Result<ProbeVerdict, ProbeError> {
    let mut child = Command::new(binary)
        .args(["-machine", &format!("q35,accel={}", accel.as_str())])
        .args(["-cpu", accel.cpu_model(), "-smp", "2", "-m", "16"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-bios")
        .arg(bios)
        .args([
            "-chardev",
            "stdio,id=dbg",
            "-device",
            "isa-debugcon,iobase=0x402,chardev=dbg",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProbeError::Binary {
            binary: binary.to_owned(),
            source,
        })?;
    let mut seen = Vec::new();
    let outcome = match child.stdout.take() {
        None => Some("no stdout".to_owned()),
        Some(mut out) => tokio::time::timeout(timeout, async {
            let mut buf = [0u8; 256];
            loop {
                match out.read(&mut buf).await {
                    Ok(0) | Err(_) => return Some("QEMU exited before the marker".to_owned()),
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                if String::from_utf8_lossy(&seen).contains(PROBE_MARKER) {
                    return None;
                }
            }
        })
        .await
        .unwrap_or_else(|_| Some(format!("no marker within {timeout:?}"))),
    };
    let _ = child.start_kill();
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let mut bytes = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_end(&mut bytes)).await;
        stderr = String::from_utf8_lossy(&bytes).into_owned();
    }
    let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    let works = outcome.is_none();
    let progress = text.trim().to_owned();
    let detail = match outcome {
        None => String::new(),
        Some(why) => {
            let mut d = why;
            if let Ok(Ok(s)) = status
                && s.code().is_some()
            {
                d.push_str(&format!(" ({s})"));
            }
            if let Some(last) = stderr
                .lines()
                .rev()
                .find(|l| !l.contains("terminating on signal") && !l.trim().is_empty())
            {
                d.push_str(&format!("; qemu: {}", last.trim()));
            }
            d
        }
    };
    tracing::debug!(accel = accel.as_str(), works, %progress, %detail, "probe payload");
    Ok(ProbeVerdict {
        accel,
        works,
        progress,
        detail,
    })
}

/// Boots QEMU's firmware with no devices under `accel`; true if it reaches its boot stage.
///
/// Kept for callers that only want to know whether SeaBIOS runs; it is **not** a KVM
/// check (broken KVM passes it, see the module docs): use [`payload_runs`].
pub async fn firmware_boots(
    binary: &Path,
    accel: Accel,
    timeout: Duration,
) -> Result<bool, ProbeError> {
    let mut child = Command::new(binary)
        .args(["-machine", &format!("pc,accel={}", accel.as_str())])
        .args([
            "-m",
            "32",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args([
            "-chardev",
            "stdio,id=dbg",
            "-device",
            "isa-debugcon,iobase=0x402,chardev=dbg",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProbeError::Binary {
            binary: binary.to_owned(),
            source,
        })?;
    let Some(mut out) = child.stdout.take() else {
        return Ok(false);
    };
    let reached = tokio::time::timeout(timeout, async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&seen);
            if text.contains("Booting from") || text.contains("No bootable device") {
                return true;
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    tracing::debug!(accel = accel.as_str(), reached, "firmware probe");
    Ok(reached)
}

/// The KVM verdict as stored by [`select_accel_cached`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachedVerdict {
    /// `/proc/sys/kernel/random/boot_id` when the probe ran.
    pub boot_id: String,
    /// The QEMU binary probed.
    pub binary: PathBuf,
    /// Its version line.
    pub version: String,
    /// Whether KVM works.
    pub kvm: bool,
}

/// The host's boot id (changes at every boot, so a cached verdict dies with the boot).
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Reads a cached verdict from `file` if it was made in this boot for this binary/version.
pub fn read_cached_verdict(
    file: &Path,
    boot_id: &str,
    binary: &Path,
    version: &str,
) -> Option<bool> {
    let bytes = std::fs::read(file).ok()?;
    let v: CachedVerdict = serde_json::from_slice(&bytes).ok()?;
    (v.boot_id == boot_id && v.binary == binary && v.version == version).then_some(v.kvm)
}

/// Stores a verdict in `file` (temp file + rename, so readers never see half of it).
pub fn write_cached_verdict(file: &Path, verdict: &CachedVerdict) -> std::io::Result<()> {
    let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(verdict).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, file)
}

fn env_override() -> Option<Accel> {
    match std::env::var("VZK_ACCEL").as_deref() {
        Ok("tcg") => Some(Accel::Tcg),
        Ok("kvm") => Some(Accel::Kvm),
        _ => None,
    }
}

/// Picks the accelerator for `choice`.
///
/// With `Auto`, the environment variable `VZK_ACCEL=tcg` (or `kvm`) overrides the probe
/// (operators pin an accelerator; the test suite pins TCG for speed of start-up);
/// otherwise [`kvm_works`] decides.
pub async fn select_accel(binary: &Path, choice: AccelChoice) -> Result<Accel, ProbeError> {
    match (choice, env_override()) {
        (AccelChoice::Force(a), _) => Ok(a),
        (AccelChoice::Auto, Some(a)) => Ok(a),
        (AccelChoice::Auto, None) => Ok(if kvm_works(binary).await? {
            Accel::Kvm
        } else {
            Accel::Tcg
        }),
    }
}

/// [`select_accel`] with the KVM verdict cached by [`kvm_works_cached`] in `cache_file`.
pub async fn select_accel_cached(
    binary: &Path,
    choice: AccelChoice,
    cache_file: &Path,
) -> Result<Accel, ProbeError> {
    if choice != AccelChoice::Auto || env_override().is_some() {
        return select_accel(binary, choice).await;
    }
    Ok(if kvm_works_cached(binary, cache_file).await? {
        Accel::Kvm
    } else {
        Accel::Tcg
    })
}

/// [`kvm_works`] with the verdict cached in `cache_file` for the host's boot id, the
/// binary and its version. An unreadable or stale cache means probing again; a cache
/// that cannot be written is logged and otherwise ignored.
pub async fn kvm_works_cached(binary: &Path, cache_file: &Path) -> Result<bool, ProbeError> {
    let version = qemu_version(binary).await?;
    let Some(boot) = boot_id() else {
        return kvm_works(binary).await;
    };
    if let Some(kvm) = read_cached_verdict(cache_file, &boot, binary, &version) {
        tracing::debug!(kvm, file = %cache_file.display(), "KVM probe verdict from this boot's cache");
        return Ok(kvm);
    }
    let kvm = kvm_works(binary).await?;
    let verdict = CachedVerdict {
        boot_id: boot,
        binary: binary.to_owned(),
        version,
        kvm,
    };
    if let Err(e) = write_cached_verdict(cache_file, &verdict) {
        tracing::warn!(file = %cache_file.display(), error = %e, "cannot cache the KVM probe verdict");
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bios_image_is_64k_with_the_reset_vector_in_place() {
        let img = probe_bios();
        assert_eq!(img.len(), 0x10000);
        assert_eq!(&img[0xfff0..0xfff5], &RESET_VECTOR);
        assert_eq!(&img[..2], &[0xfa, 0xfc], "cli; cld first");
        let text = String::from_utf8_lossy(&img);
        assert!(
            text.contains(PROBE_MARKER),
            "the marker string is in the image"
        );
    }

    /// Keeps `PROBE_CODE` in sync with `probe_payload.S` where binutils is installed.
    #[test]
    fn payload_matches_its_assembly_source() {
        let has = |t: &str| {
            std::process::Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !has("as") || !has("ld") {
            eprintln!("binutils (as, ld) not installed: cannot re-assemble probe_payload.S");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/qemu/probe_payload.S");
        let obj = dir.path().join("p.o");
        let bin = dir.path().join("p.bin");
        let ok = std::process::Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&obj)
            .arg(&src)
            .status()
            .unwrap();
        assert!(ok.success());
        let ok = std::process::Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-Ttext",
                "0",
                "-e",
                "0",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&bin)
            .arg(&obj)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(std::fs::read(&bin).unwrap(), probe_bios());
    }

    #[test]
    fn cached_verdict_is_used_only_for_the_same_boot_binary_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvm-probe.json");
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        assert_eq!(read_cached_verdict(&file, "b1", qemu, "v1"), None);
        let v = CachedVerdict {
            boot_id: "b1".into(),
            binary: qemu.to_owned(),
            version: "v1".into(),
            kvm: true,
        };
        write_cached_verdict(&file, &v).unwrap();
        assert_eq!(read_cached_verdict(&file, "b1", qemu, "v1"), Some(true));
        assert_eq!(
            read_cached_verdict(&file, "b2", qemu, "v1"),
            None,
            "new boot"
        );
        assert_eq!(
            read_cached_verdict(&file, "b1", qemu, "v2"),
            None,
            "new QEMU"
        );
        assert_eq!(
            read_cached_verdict(&file, "b1", Path::new("/other/qemu"), "v1"),
            None
        );
        std::fs::write(&file, b"{not json").unwrap();
        assert_eq!(
            read_cached_verdict(&file, "b1", qemu, "v1"),
            None,
            "garbage"
        );
    }

    /// A QEMU that dies at start (like the `kvm_buf_set_msrs` abort) is a clear "no", with
    /// the reason, not a hang until the time limit.
    #[test]
    fn a_qemu_that_dies_at_start_is_a_no_with_its_reason() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu-that-aborts");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'kvm_buf_set_msrs: Assertion failed' >&2\nexit 134\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let v = rt
            .block_on(payload_runs(&fake, Accel::Kvm, Duration::from_secs(600)))
            .unwrap();
        assert!(!v.works);
        assert_eq!(v.progress, "");
        assert!(v.detail.contains("exited before the marker"), "{v:?}");
        assert!(v.detail.contains("134"), "{v:?}");
        assert!(v.detail.contains("kvm_buf_set_msrs"), "{v:?}");
        let missing = rt.block_on(payload_runs(
            &dir.path().join("no-such-qemu"),
            Accel::Kvm,
            Duration::from_secs(1),
        ));
        assert!(matches!(missing, Err(ProbeError::Binary { .. })));
    }

    #[test]
    fn boot_id_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let id = boot_id().unwrap();
            assert_eq!(id.len(), 36, "{id}");
        }
    }
}
