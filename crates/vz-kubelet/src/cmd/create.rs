//! `vz-kubelet image create macos`: a macOS image directory from a restore image.
//!
//! Everything but the installation is platform-independent (`vzk_image::create`); the
//! installation runs Apple's installer in Virtualization.framework, so on other hosts
//! the command stops before fetching anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vzk_image::Progress;
use vzk_image::create::MacosRequest;

/// What `image create macos` was given.
#[derive(Debug)]
pub(crate) struct CreateMacos<'a> {
    pub(crate) ipsw: &'a str,
    pub(crate) dest: &'a Path,
    /// Read by the installation, on macOS only.
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    pub(crate) request: MacosRequest,
    /// The image cache (restore images are downloaded under it); macOS only.
    #[cfg_attr(not(target_os = "macos"), allow(dead_code))]
    pub(crate) cache: &'a Path,
}

/// What was made.
#[derive(Debug)]
pub(crate) struct Created {
    pub(crate) dir: PathBuf,
    pub(crate) version: String,
    pub(crate) config: vzk_image::VmConfig,
}

#[cfg(target_os = "macos")]
pub(crate) async fn macos(
    c: CreateMacos<'_>,
    progress: Arc<dyn Progress>,
) -> anyhow::Result<Created> {
    use anyhow::Context as _;
    use vzk_image::create::{
        HostLimits, IpswSource, RestoreRequirements, StagedImage, fetch_ipsw, plan_macos,
    };
    use vzk_vm::{MacAddr, NetworkAttachment};
    use vzk_vz::config::{Disk, DiskSource, Graphics, MachineIdentifier, Nic, Platform, VzConfig};
    use vzk_vz::macos::install;

    let ipsw = fetch_ipsw(&IpswSource::parse(c.ipsw), c.cache, &*progress)
        .await
        .context("fetching the restore image")?;
    let info = install::restore_info(&ipsw)
        .await
        .with_context(|| format!("reading {}", ipsw.display()))?;
    let bounds = vzk_vz::macos::build::host_bounds();
    let plan = plan_macos(
        &c.request,
        &RestoreRequirements {
            hardware_model: info.hardware_model,
            host_supported: info.host_supported,
            min_cpus: info.min_cpus,
            min_memory_bytes: info.min_memory_bytes,
            version: info.version,
        },
        HostLimits {
            max_cpus: u32::try_from(bounds.max_cpus).unwrap_or(u32::MAX),
            max_memory_bytes: bounds.max_memory,
        },
    )?;
    let staged = StagedImage::begin(c.dest)?;
    staged.create_disk(plan.disk_bytes)?;
    let machine_id = install::create_platform(&staged.aux(), &plan.hardware_model)?;
    let config = VzConfig {
        cpus: u64::from(plan.cpus),
        memory_bytes: plan.memory_bytes,
        platform: Platform::Mac {
            aux_storage: staged.aux(),
            hardware_model: plan.hardware_model.clone(),
            machine_identifier: MachineIdentifier::FromImage(machine_id.clone()),
        },
        disks: vec![Disk {
            source: DiskSource::Image(staged.disk()),
            read_only: false,
        }],
        nics: vec![Nic {
            mac: MacAddr::random(),
            attachment: NetworkAttachment::Nat,
        }],
        shares: Vec::new(),
        graphics: Some(Graphics::Mac {
            width: 1920,
            height: 1080,
            ppi: 80,
        }),
        serial_log: None,
        input_devices: true,
        entropy: false,
        save_restore: false,
    };
    const STEPS: u64 = 1000;
    progress.begin(&format!("install macOS {}", plan.version), STEPS);
    let p = progress.clone();
    let last = std::sync::atomic::AtomicU64::new(0);
    let installed = install::install("image-create", config, &ipsw, move |f| {
        let now = (f.clamp(0.0, 1.0) * STEPS as f64) as u64;
        let before = last.swap(now, std::sync::atomic::Ordering::Relaxed);
        p.advance(now.saturating_sub(before));
    })
    .await;
    progress.finish();
    installed.context("installing macOS")?;
    let config = staged.write_config(&plan, &machine_id)?;
    let dir = staged.commit()?;
    Ok(Created {
        dir,
        version: plan.version,
        config,
    })
}

#[cfg(not(target_os = "macos"))]
pub(crate) async fn macos(
    c: CreateMacos<'_>,
    _progress: Arc<dyn Progress>,
) -> anyhow::Result<Created> {
    anyhow::bail!(
        "image create macos needs a Mac with Apple silicon: it runs Apple's installer in Virtualization.framework (asked to make {} from {})",
        c.dest.display(),
        c.ipsw
    )
}
