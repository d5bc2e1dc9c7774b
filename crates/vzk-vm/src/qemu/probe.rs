//! Run-time probe of the QEMU backend: the binary, its version, and whether KVM *really*
//! runs guests.
//!
//! `/dev/kvm` existing is not enough: with broken nested virtualisation, QEMU starts and
//! then the guest hangs early (seen on CI machines: SeaBIOS stops before its boot stage,
//! a Linux kernel after "Probing EDD"). So the probe boots QEMU's own firmware with no
//! devices and the ISA debug console on stdout, and KVM counts as working only if the
//! firmware reaches its boot stage ("Booting from" / "No bootable device") within
//! [`KVM_PROBE_TIMEOUT`]. Otherwise TCG is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// How long the firmware may take to reach its boot stage under KVM.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Whether KVM runs a guest to its firmware's boot stage; `Err` only if QEMU cannot run.
pub async fn kvm_works(binary: &Path) -> Result<bool, ProbeError> {
    // Cached per binary for the life of the process: a failing probe costs
    // KVM_PROBE_TIMEOUT, and every backend instance would pay it again.
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(known) = cache.lock().ok().and_then(|c| c.get(binary).copied()) {
        return Ok(known);
    }
    let works = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && firmware_boots(binary, Accel::Kvm, KVM_PROBE_TIMEOUT).await?;
    if let Ok(mut c) = cache.lock() {
        c.insert(binary.to_owned(), works);
    }
    tracing::info!(kvm = works, "KVM probe");
    Ok(works)
}

/// Boots QEMU's firmware with no devices under `accel`; true if it reaches its boot stage.
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

/// Picks the accelerator for `choice`.
///
/// With `Auto`, the environment variable `VZK_ACCEL=tcg` (or `kvm`) overrides the probe:
/// on hosts with nested KVM the probe VM can run while real guests crash QEMU
/// (`kvm_buf_set_msrs` assertion), so operators and the test suite pin TCG there.
pub async fn select_accel(binary: &Path, choice: AccelChoice) -> Result<Accel, ProbeError> {
    let from_env = match std::env::var("VZK_ACCEL").as_deref() {
        Ok("tcg") => Some(Accel::Tcg),
        Ok("kvm") => Some(Accel::Kvm),
        _ => None,
    };
    match choice {
        AccelChoice::Force(a) => Ok(a),
        AccelChoice::Auto if from_env.is_some() => Ok(from_env.unwrap_or(Accel::Tcg)),
        AccelChoice::Auto => Ok(if kvm_works(binary).await? {
            Accel::Kvm
        } else {
            Accel::Tcg
        }),
    }
}
