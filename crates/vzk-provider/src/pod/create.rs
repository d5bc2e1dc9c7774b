//! A new pod's way to a booted VM: pull (with back-off), boot plan, volumes, slot,
//! disk clone, create and start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;
use vzk_core::PodEvent;
use vzk_image::{LazyPull, PullPolicy, Reference};
use vzk_vm::{DiskFormat, DiskSpec, MacAddr, NicSpec, SnapshotSpec, VmSpec};

use crate::metrics::{StartClock, StartPhase};
use crate::provider::Inner;
use crate::resources::{ImageShape, vm_resources_for};
use crate::status::VmPhase;

use super::*;

pub(super) async fn create_and_watch(inner: Arc<Inner>, e: Arc<PodEntry>) {
    let Some(c0) = e.container0().cloned() else {
        return;
    };
    let image_name = c0.image.clone().unwrap_or_default();
    let reference = match Reference::parse(&image_name) {
        Ok(r) => r,
        Err(err) => {
            inner.event(
                &e,
                PodEvent::warning(
                    "InspectFailed",
                    format!("Failed to parse image name {image_name:?}: {err}"),
                ),
            );
            inner.waiting(&e, "InvalidImageName", err.to_string());
            return;
        }
    };

    let clock = Arc::new(StartClock::start(
        inner.metrics.clone(),
        crate::metrics::pod_start_span(&e.key, &image_name),
    ));
    *lock(&e.start_clock) = Some(clock.clone());
    // Any return before the VM runs ends this start: its later phases are not observed.
    let mut stop_on_early_return = crate::metrics::StopClock(Some(clock.clone()));

    // 1. Pull (with back-off, like the kubelet).
    let policy = PullPolicy::from_k8s(c0.image_pull_policy.as_deref(), &reference);
    // Boot before the download ends, where the node and the pod want it and the backend
    // can (QEMU: a qcow2 overlay over the image's NBD export; Virtualization.framework:
    // the pod's own writable NBD export).
    let mut lazy = policy != PullPolicy::Never
        && inner
            .args
            .lazy_disks
            .applies(e.pod.metadata.annotations.as_ref());
    let formats = &inner.hv.capabilities().disk_formats;
    if lazy && !formats.contains(&DiskFormat::Qcow2) && !formats.contains(&DiskFormat::Nbd) {
        lazy = false;
        if inner.images.cached(&reference).is_none() {
            inner.event(
                &e,
                PodEvent::normal(
                    "LazyDiskUnavailable",
                    format!(
                        "Pulling image \"{image_name}\" in full before booting: this node's {} VMs attach no disk served over NBD (Virtualization.framework needs macOS 14)",
                        inner.hv.capabilities().backend
                    ),
                ),
            );
        }
    }
    let mut backoff = Duration::from_secs(10);
    let image = loop {
        // Credentials under the image's registry are for it; mirrors get what is stored
        // under their own names (`hosts.toml`, `--registry-config-dir`).
        let (keyring, errors) = inner.pull_keyring(&e.pod).await;
        if !errors.is_empty() {
            inner.event(
                &e,
                PodEvent::warning("FailedToRetrieveImagePullSecret", errors.join("; ")),
            );
        }
        let opts = inner.pull_options(&reference, keyring, policy);
        let cached = inner.images.cached(&reference).is_some();
        if !(cached && policy == PullPolicy::IfNotPresent) {
            inner.event(
                &e,
                PodEvent::normal("Pulling", format!("Pulling image \"{image_name}\"")),
            );
        }
        let t0 = Instant::now();
        let pulled = if lazy && !(cached && policy == PullPolicy::IfNotPresent) {
            match inner
                .images
                .pull_lazy(&reference, &opts, &inner.args.lazy_options())
                .await
            {
                Ok(LazyPull::Lazy(img) | LazyPull::Cached(img)) => Ok(img),
                Ok(LazyPull::Unsupported { reason }) => {
                    inner.event(
                        &e,
                        PodEvent::normal(
                            "LazyDiskUnavailable",
                            format!(
                                "Pulling image \"{image_name}\" in full before booting: {reason}"
                            ),
                        ),
                    );
                    inner.images.pull(&reference, &opts).await
                }
                Err(err) => Err(err),
            }
        } else {
            inner.images.pull(&reference, &opts).await
        };
        match pulled {
            Ok(img) if img.lazy.is_some() => {
                inner
                    .metrics
                    .pull(img.format.as_str(), true, t0.elapsed(), dir_bytes(&img.dir));
                clock.phase(StartPhase::Pull);
                inner.event(
                    &e,
                    PodEvent::normal(
                        "Pulled",
                        format!(
                            "Serving image \"{image_name}\" on demand while it downloads (ready to boot in {:.3}s)",
                            t0.elapsed().as_secs_f64()
                        ),
                    ),
                );
                break img;
            }
            Ok(img) => {
                let fetched = !(cached && policy == PullPolicy::IfNotPresent);
                let bytes = if fetched { dir_bytes(&img.dir) } else { 0 };
                inner
                    .metrics
                    .pull(img.format.as_str(), fetched, t0.elapsed(), bytes);
                clock.phase(StartPhase::Pull);
                if !fetched {
                    inner.event(
                        &e,
                        PodEvent::normal(
                            "Pulled",
                            format!("Container image \"{image_name}\" already present on machine"),
                        ),
                    );
                } else {
                    inner.event(
                        &e,
                        PodEvent::normal(
                            "Pulled",
                            format!(
                                "Successfully pulled image \"{image_name}\" in {:.3}s",
                                t0.elapsed().as_secs_f64()
                            ),
                        ),
                    );
                }
                break img;
            }
            Err(err) => {
                inner.metrics.pull_failed();
                let msg = format!(
                    "Failed to pull image \"{image_name}\": {}",
                    error_chain(err.as_ref())
                );
                warn!(pod = %e.key, error = %msg, "pull failed");
                inner.event(&e, PodEvent::warning("Failed", msg.clone()));
                inner.waiting(&e, "ErrImagePull", msg.clone());
                tokio::time::sleep(Duration::from_secs(1)).await;
                inner.event(
                    &e,
                    PodEvent::normal(
                        "BackOff",
                        format!("Back-off pulling image \"{image_name}\""),
                    ),
                );
                inner.waiting(
                    &e,
                    "ImagePullBackOff",
                    format!("Back-off pulling image \"{image_name}\": {msg}"),
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    };
    match inner.images.pin(&image) {
        Ok(p) => *lock(&e.pin) = Some(p),
        Err(err) => warn!(pod = %e.key, error = %err, "cannot pin the image"),
    }
    if let Some(l) = &image.lazy {
        *lock(&e.lazy_disk) = Some(l.disk().state());
    }

    // 2. What to boot.
    let files = crate::boot::ImageFiles {
        kernel: image.kernel(),
        initrd: image.initrd(),
        aux: image.aux(),
    };
    let boot = match crate::boot::plan(
        &image_name,
        &image.config,
        &files,
        inner.hv.capabilities(),
        &e.dir,
    ) {
        Ok(b) => b,
        Err(err) => {
            inner.event(&e, PodEvent::warning("Failed", err.to_string()));
            inner.waiting(&e, err.reason(), err.to_string());
            return;
        }
    };
    let res = match vm_resources_for(
        c0.resources.as_ref(),
        ImageShape::from(&image.config),
        &inner.policy,
    ) {
        Ok(r) => r,
        Err(err) => {
            inner.event(&e, PodEvent::warning("Failed", err.to_string()));
            inner.waiting(&e, err.reason(), err.to_string());
            return;
        }
    };

    // 2b. Volumes (FailedMount events and retries, like the kubelet).
    let shared_dirs = crate::volumes::prepare_with_retry(&inner, &e).await;

    let key_boot = crate::templates::key_boot(&boot);
    let choose_restore = || {
        super::restore::choose(
            &inner,
            &e,
            &image,
            &image_name,
            &key_boot,
            res,
            !shared_dirs.is_empty(),
        )
    };
    let (mut restore, mut chosen) = (None, false);
    // 3. A VM slot, then 4. the disk's clone. A clone that fails (the disk full, the
    // file system refusing) is retried with back-off, the slot given back meanwhile, as
    // the kubelet retries CreateContainerError.
    let mut clone_backoff = Duration::from_secs(10);
    let (disk_path, format) = loop {
        let slot = match inner.slots.try_acquire() {
            Some(s) => s,
            None => {
                let msg = format!(
                    "all {} VM slots of this node are in use; waiting for one",
                    inner.slots.capacity()
                );
                inner.event(&e, PodEvent::normal("WaitingForVMSlot", msg.clone()));
                inner.waiting(&e, "WaitingForVMSlot", msg);
                match inner.slots.acquire().await {
                    Some(s) => s,
                    None => return,
                }
            }
        };
        *lock(&e.slot) = Some(slot);
        inner.waiting(&e, "ContainerCreating", "");
        // 2c. Start by restore, where the node does and a template is ready: chosen
        // once the VM slot is held (a template's MAC, where the backend keeps it, may
        // have been given back while this pod waited for the slot).
        if !chosen {
            chosen = true;
            restore = choose_restore();
        }
        let dest = e.dir.join("disk");
        if let Some(t) = &restore {
            // The clone's base is a hard link of the template's disk kept in the pod's
            // dir: a template removed (broken, rebuilt) while the pod runs leaves the
            // pod's disk whole.
            let base = e.dir.join("template-disk");
            let _ = std::fs::remove_file(&base);
            let base = match std::fs::hard_link(t.disk(), &base) {
                Ok(()) => base,
                Err(err) => {
                    warn!(pod = %e.key, error = %err, "linking the template's disk; using it in place");
                    t.disk()
                }
            };
            match inner.images.clone_file(&base, t.meta.disk_format, &dest) {
                Ok(format) => break (dest, format),
                Err(err) => {
                    super::restore::restore_failed(
                        &inner,
                        &e,
                        t,
                        &format!("cloning its disk: {}", error_chain(err.as_ref())),
                    );
                    restore = None;
                }
            }
        }
        match clone_pod_disk(&inner, &e, &image) {
            Ok(disk) => break disk,
            Err(err) => {
                let msg = format!(
                    "cloning the VM disk: {} (retrying in {} s)",
                    error_chain(err.as_ref()),
                    clone_backoff.as_secs()
                );
                warn!(pod = %e.key, error = %msg, "clone failed");
                inner.event(&e, PodEvent::warning("Failed", msg.clone()));
                inner.waiting(&e, "CreateContainerError", msg);
                lock(&e.slot).take();
                tokio::time::sleep(clone_backoff).await;
                clone_backoff = (clone_backoff * 2).min(Duration::from_secs(300));
            }
        }
    };
    clock.phase(StartPhase::Clone);
    crate::crash::point("create:cloned");
    // 4b. The per-pod copy the boot needs (a macOS guest writes its aux storage/NVRAM;
    // a restored one gets the template's, as it was at the save). std::fs::copy clones
    // on APFS (clonefile), so this costs no space there.
    let boot_copy = match (&restore, &boot.clone) {
        (Some(t), Some((_, to))) => Some((t.aux(), to.clone())),
        (_, copy) => copy.clone(),
    };
    if let Some((from, to)) = &boot_copy
        && let Err(err) = std::fs::copy(from, to)
    {
        let msg = format!(
            "copying {} into the pod: {err}",
            from.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
        inner.event(&e, PodEvent::warning("Failed", msg.clone()));
        inner.waiting(&e, "CreateContainerError", msg);
        lock(&e.slot).take();
        return;
    }
    let mut disks = vec![DiskSpec {
        path: disk_path,
        read_only: false,
        format,
    }];
    // 4c. A Linux guest gets cloud-init's NoCloud seed: the pod's own SSH key and host
    // name (see `crate::identity`).
    match crate::identity::seed_disk(
        &e,
        &boot.spec,
        inner.volumes.pod_volumes(&e.key.uid).as_ref(),
    ) {
        Ok(Some(seed)) => disks.push(seed),
        Ok(None) => {}
        Err(msg) => {
            inner.event(&e, PodEvent::warning("Failed", msg.clone()));
            inner.waiting(&e, "CreateContainerError", msg);
            lock(&e.slot).take();
            return;
        }
    }
    // A restore needs the template's devices: its disk and (Linux) a seed in their
    // places. A pod without a seed boots cold from the image's disk, never from the
    // template's (whose guest holds the template's login key).
    if restore.is_some() && disks.len() != crate::templates::disk_count(&boot.spec) {
        restore = None;
        inner.templates.release(&e.key.uid);
        match clone_pod_disk(&inner, &e, &image) {
            Ok((path, format)) => (disks[0].path, disks[0].format) = (path, format),
            Err(err) => {
                let msg = format!("cloning the VM disk: {}", error_chain(err.as_ref()));
                inner.event(&e, PodEvent::warning("Failed", msg.clone()));
                inner.waiting(&e, "CreateContainerError", msg);
                lock(&e.slot).take();
                return;
            }
        }
    }
    let mut spec = VmSpec {
        id: vm_id(&e.key.uid),
        cpus: res.cpus,
        memory_bytes: res.memory_bytes,
        boot: boot.spec,
        disks,
        // A template whose NIC is part of its saved machine is restored with its MAC.
        nics: vec![NicSpec {
            mac: restore
                .as_ref()
                .and_then(|t| t.meta.macs.first().copied())
                .unwrap_or_else(MacAddr::random),
            attachment: inner.args.network.clone(),
        }],
        shared_dirs,
        console_log: Some(e.console_log()),
        snapshot: restore
            .as_ref()
            .map(|t| SnapshotSpec::Restore { state: t.state() }),
    };

    // 5. Create and start, under the create lock so deletion sees the VM.
    let guard = e.create_lock.clone().lock_owned().await;
    let hv = inner.hv.clone();
    let entry = e.clone();
    let first = spec.clone();
    let mut created = detached(async move {
        let _guard = guard;
        let vm = hv
            .create(first)
            .await
            .map_err(|err| ("CreateContainerError", error_chain(&err)))?;
        *lock(&entry.vm) = Some(vm.clone());
        crate::crash::point("create:vm-created");
        vm.start().await.map_err(|err| match err {
            vzk_vm::VmError::LimitReached { detail, .. } => ("VMLimitReached", detail),
            err => ("RunContainerError", error_chain(&err)),
        })?;
        crate::crash::point("create:vm-started");
        Ok::<_, (&'static str, String)>(vm)
    })
    .await;
    // A restore that failed boots cold: the image's disk cloned again, the VM made anew.
    if let (Some(t), Err((reason, msg))) = (&restore, &created)
        && *reason != "VMLimitReached"
    {
        super::restore::restore_failed(&inner, &e, t, msg);
        spec.snapshot = None;
        // The template's MAC was given back: the cold boot gets one of its own.
        if !t.meta.macs.is_empty() {
            spec.nics[0].mac = MacAddr::random();
        }
        // And the image's aux storage, not the template's.
        if let Some((from, to)) = &boot.clone
            && let Err(err) = std::fs::copy(from, to)
        {
            warn!(pod = %e.key, error = %err, "copying the image's aux storage for the cold boot");
        }
        created = match clone_pod_disk(&inner, &e, &image) {
            Ok((path, format)) => {
                (spec.disks[0].path, spec.disks[0].format) = (path, format);
                super::supervise::reboot(&inner, &e, spec, super::supervise::Console::Discard).await
            }
            Err(err) => Err((
                "CreateContainerError",
                format!("cloning the VM disk: {}", error_chain(err.as_ref())),
            )),
        };
    }
    let vm = match created {
        Ok(vm) => {
            lock(&inner.vm_limit).started();
            inner.metrics.boot(false);
            clock.phase(StartPhase::Boot);
            vm
        }
        Err((reason, msg)) => {
            let msg = if reason == "VMLimitReached" {
                inner.vm_limit_refused(&e, &msg)
            } else {
                msg
            };
            inner.event(&e, PodEvent::warning("Failed", format!("Error: {msg}")));
            inner.set_phase(
                &e,
                VmPhase::Terminated {
                    exit_code: 128,
                    reason: reason.into(),
                    message: Some(msg),
                    started_at: None,
                    finished_at: now(),
                },
            );
            lock(&e.slot).take();
            return;
        }
    };
    inner.event(
        &e,
        PodEvent::normal(
            "Created",
            format!(
                "Created VM {} ({} vCPU, {} MiB)",
                vm.id(),
                res.cpus,
                res.memory_bytes >> 20
            ),
        ),
    );
    let started = match &vm.spec().snapshot {
        Some(SnapshotSpec::Restore { .. }) => format!(
            "Started VM {} by restoring template {}",
            vm.id(),
            restore
                .as_ref()
                .map(|t| t.meta.key.id())
                .unwrap_or_default()
        ),
        _ => format!("Started VM {}", vm.id()),
    };
    inner.event(&e, PodEvent::normal("Started", started));
    // The VM runs: the guest side observes the rest of this start.
    stop_on_early_return.0 = None;
    watch_vm(inner, e, vm, c0.lifecycle.and_then(|l| l.post_start)).await;
}

/// The bytes of the files directly in `dir` (an image's files).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|d| d.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The pod's clone of `image`'s disk at `disk` in its dir, in a format the backend
/// attaches; a server it needs is kept with the pod. Returns what the VM attaches.
fn clone_pod_disk(
    inner: &Inner,
    e: &PodEntry,
    image: &vzk_image::LocalImage,
) -> Result<(std::path::PathBuf, DiskFormat), crate::images::ImageSourceError> {
    let disk = inner.images.clone_disk(
        image,
        &e.dir.join("disk"),
        &inner.hv.capabilities().disk_formats,
    )?;
    *lock(&e.disk_server) = disk.server;
    Ok((disk.path, disk.format))
}
