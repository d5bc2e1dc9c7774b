//! The pod side of start by restore ([`crate::templates`]): which template a new pod is
//! restored from (or why it boots cold), the template made in the background by the
//! first pod of an image and shape, and the re-identification of a restored guest.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use vzk_core::PodEvent;
use vzk_guest::{GuestSession, HostKeyStore, PodIdentity};
use vzk_image::LocalImage;
use vzk_vm::{BootSpec, SnapshotDevices, Vm};

use crate::provider::Inner;
use crate::resources::VmResources;
use crate::templates::{self, BuildInput, Template, TemplateKey};

use super::{PodEntry, error_chain, lock};

/// The template `e` is restored from, if the node starts pods by restore and a valid
/// one is there; else `None` (a cold boot), after starting a build where there is none.
/// `shares`: whether the pod's VM gets shared directories.
pub(super) fn choose(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    image: &LocalImage,
    image_name: &str,
    boot: &BootSpec,
    res: VmResources,
    shares: bool,
) -> Option<Template> {
    let caps = inner.hv.capabilities();
    if !inner.args.snapshot_start || !caps.snapshots {
        return None;
    }
    if image.lazy.is_some() {
        info!(pod = %e.key, "booting cold: the image's disk is served on demand while it downloads");
        return None;
    }
    if let Some(why) = templates::ineligible(&e.pod, boot, caps.snapshot_devices, shares) {
        info!(pod = %e.key, %why, "booting cold");
        return None;
    }
    let key = TemplateKey::new(
        image,
        caps,
        res.cpus,
        res.memory_bytes,
        boot,
        e.creds.user(),
    );
    if caps.snapshot_devices == SnapshotDevices::Kept {
        return choose_kept(inner, e, image, image_name, &key);
    }
    let dir = templates::dir_for(image, &key);
    match inner.templates.lookup(&dir, &key) {
        Ok(Some(t)) => Some(t),
        Ok(None) => {
            spawn_build(inner, e, image, image_name, key);
            None
        }
        Err(why) => {
            not_restoring(inner, e, &key, &why);
            inner.templates.discard(&dir);
            spawn_build(inner, e, image, image_name, key);
            None
        }
    }
}

/// [`choose`] on a backend that keeps the NIC in the saved machine
/// ([`SnapshotDevices::Kept`]): the pod gets the first of the image's templates whose MAC
/// no running pod holds, and its VM that MAC; with none free, another template is made
/// (up to one per VM the node may run) and the pod boots cold.
fn choose_kept(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    image: &LocalImage,
    image_name: &str,
    key: &TemplateKey,
) -> Option<Template> {
    let network = &inner.args.network;
    let n = templates::kept_slots(inner.hv.capabilities(), inner.slots.capacity());
    let slots: Vec<_> = (0..n)
        .map(|i| {
            let k = key.kept(network, i);
            (templates::dir_for(image, &k), k)
        })
        .collect();
    // The MACs of the node's VMs (adopted ones hold no claim); the pods' map is not
    // held while each VM is looked at.
    let entries: Vec<Arc<PodEntry>> = lock(&inner.pods).values().cloned().collect();
    let running: std::collections::HashSet<vzk_vm::MacAddr> = entries
        .iter()
        .filter_map(|p| lock(&p.vm).clone())
        .flat_map(|vm| vm.spec().nics.iter().map(|n| n.mac).collect::<Vec<_>>())
        .collect();
    let pick = inner.templates.pick_kept(&slots, &running, &e.key.uid);
    for (i, why) in &pick.broken {
        if let Some((_, k)) = slots.get(*i) {
            not_restoring(inner, e, k, why);
        }
    }
    if pick.restore.is_none() {
        match pick.build.and_then(|i| slots.get(i)) {
            Some((_, k)) => spawn_build(inner, e, image, image_name, k.clone()),
            None => {
                info!(pod = %e.key, templates = n, "booting cold: every template's MAC is in use")
            }
        }
    }
    pick.restore
}

/// The `RestoreFailed` event: the template `id` was not restored from, and why.
fn restore_failed_event(inner: &Inner, e: &PodEntry, id: &str, why: &str) {
    inner.event(
        e,
        PodEvent::warning(
            "RestoreFailed",
            format!("Restoring from template {id} failed: {why}; booting cold"),
        ),
    );
}

/// A broken template found before a restore.
fn not_restoring(inner: &Inner, e: &PodEntry, key: &TemplateKey, why: &str) {
    restore_failed_event(inner, e, &key.id(), why);
}

/// A restore that failed: the template is dropped (a later pod rebuilds it).
pub(super) fn restore_failed(inner: &Inner, e: &PodEntry, t: &Template, why: &str) {
    restore_failed_event(inner, e, &t.meta.key.id(), why);
    inner.templates.discard(&t.dir);
    inner.templates.release(&e.key.uid);
}

/// Makes the template of `key` in the background unless one is being made.
fn spawn_build(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    image: &LocalImage,
    image_name: &str,
    key: TemplateKey,
) {
    let dir = templates::dir_for(image, &key);
    let Some(guard) = inner.templates.begin_build(&dir) else {
        return;
    };
    // The template's VM counts against the node's VMs (a Mac runs two at most).
    let Some(slot) = inner.slots.try_acquire() else {
        info!(pod = %e.key, template = %key.id(), "no VM slot free for a template build now; a later pod tries again");
        return;
    };
    // The node's own login (without the pod's key: a template never sees the pod's).
    let creds = match inner.credentials(&e.pod) {
        Ok(c) => c,
        Err(err) => {
            warn!(pod = %e.key, error = %err, "no credentials for a template build");
            return;
        }
    };
    let pin = match inner.images.pin(image) {
        Ok(p) => p,
        Err(err) => {
            warn!(pod = %e.key, error = %err, "cannot pin the image for a template build");
            return;
        }
    };
    inner.event(
        e,
        PodEvent::normal(
            "BuildingTemplate",
            format!(
                "Making template {} of image \"{image_name}\" ({} vCPU, {} MiB) in the background: \
                 later pods of this image and shape start by restore",
                key.id(),
                key.cpus,
                key.memory_bytes >> 20
            ),
        ),
    );
    let (inner, e, image) = (inner.clone(), e.clone(), image.clone());
    tokio::spawn(async move {
        let (_pin, _slot) = (pin, slot);
        let id = key.id();
        let built = build(&inner, &image, key, creds).await;
        match built {
            Ok(t) => {
                info!(template = %id, dir = %t.dir.display(), boot_ms = t.meta.boot_ms, bytes = t.meta.state_bytes, "template ready");
                inner.event(
                    &e,
                    PodEvent::normal(
                        "TemplateReady",
                        format!(
                            "Template {id} is ready ({} MiB of machine state; its boot took {:.1}s)",
                            t.meta.state_bytes >> 20,
                            t.meta.boot_ms as f64 / 1000.0
                        ),
                    ),
                );
            }
            Err(why) => {
                guard.failed();
                warn!(template = %id, error = %why, "template build failed");
                inner.event(
                    &e,
                    PodEvent::warning(
                        "TemplateFailed",
                        format!("Making template {id} failed: {why}"),
                    ),
                );
            }
        }
    });
}

/// Makes the template of `key` (the caller holds its build guard and an image pin).
async fn build(
    inner: &Arc<Inner>,
    image: &LocalImage,
    key: TemplateKey,
    creds: vzk_guest::Credentials,
) -> Result<Template, String> {
    let images = inner.images.clone();
    let base = image.clone();
    let formats = inner.hv.capabilities().disk_formats.clone();
    // Templates are made of cached images only, whose clones are files.
    let clone = move |dest: &Path| match images.clone_disk(&base, dest, &formats) {
        Ok(d) if d.server.is_none() && d.path == dest => Ok(d.format),
        Ok(d) => Err(format!(
            "the image's disk is served ({}), not a file a template can keep",
            d.path.display()
        )),
        Err(err) => Err(format!(
            "cloning the image's disk: {}",
            error_chain(err.as_ref())
        )),
    };
    let t = templates::build(BuildInput {
        hv: inner.hv.clone(),
        image,
        key,
        clone_disk: &clone,
        network: inner.args.network.clone(),
        creds,
        ready_timeout: inner.ready_timeout,
    })
    .await?;
    inner.templates.trust(&t);
    Ok(t)
}

/// Templates made ahead of time ([`crate::args::ProviderArgs::snapshot_templates`]),
/// one after another: each image pulled (retried with back-off while its registry does
/// not answer), planned as a pod asking for that shape would be, and its template made
/// unless a valid one is there. Ends when done or when `stop` fires.
pub(crate) async fn prepare_ahead(inner: Arc<Inner>, stop: tokio_util::sync::CancellationToken) {
    let asks = inner.args.snapshot_templates.clone();
    if asks.is_empty() {
        return;
    }
    if !inner.args.snapshot_start || !inner.hv.capabilities().snapshots {
        warn!(
            count = asks.len(),
            "--snapshot-template ignored: it needs --snapshot-start and a backend that saves VMs"
        );
        return;
    }
    for ask in asks {
        let mut backoff = Duration::from_secs(5);
        loop {
            let attempt = tokio::select! {
                () = stop.cancelled() => return,
                r = prepare_one(&inner, &ask) => r,
            };
            match attempt {
                Ok(()) => break,
                Err(Prepare::Retry(why)) => {
                    warn!(image = %ask.image, error = %why, retry_in_secs = backoff.as_secs(), "template ahead of time: retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                }
                Err(Prepare::GiveUp(why)) => {
                    warn!(image = %ask.image, error = %why, "template ahead of time: not made");
                    break;
                }
            }
        }
    }
}

enum Prepare {
    /// Worth another try (a pull failed).
    Retry(String),
    /// Never going to work (the image cannot start by restore, the build failed).
    GiveUp(String),
}

async fn prepare_one(inner: &Arc<Inner>, ask: &crate::args::TemplateAsk) -> Result<(), Prepare> {
    use vzk_image::{PullPolicy, Reference};
    let reference = Reference::parse(&ask.image).map_err(|e| Prepare::GiveUp(e.to_string()))?;
    // What a pod asking for this shape, and nothing else, would be.
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "template-ahead", "namespace": "vz-kubelet"},
        "spec": {"containers": [{"name": "vm", "image": ask.image, "resources": ask.resources()}]},
    }))
    .map_err(|e| Prepare::GiveUp(e.to_string()))?;
    let (keyring, errors) = inner.pull_keyring(&pod).await;
    if !errors.is_empty() {
        return Err(Prepare::Retry(errors.join("; ")));
    }
    let opts = inner.pull_options(&reference, keyring, PullPolicy::IfNotPresent);
    let image = inner
        .images
        .pull(&reference, &opts)
        .await
        .map_err(|e| Prepare::Retry(format!("pulling: {}", error_chain(e.as_ref()))))?;
    let caps = inner.hv.capabilities();
    let files = crate::boot::ImageFiles {
        kernel: image.kernel(),
        initrd: image.initrd(),
        aux: image.aux(),
    };
    let scratch = inner.pods_dir.join(".template-ahead");
    let boot = crate::boot::plan(&ask.image, &image.config, &files, caps, &scratch)
        .map_err(|e| Prepare::GiveUp(e.to_string()))?;
    // (Shares are the pods' own: a template is made without any.)
    if let Some(why) = templates::ineligible(&pod, &boot.spec, caps.snapshot_devices, false) {
        return Err(Prepare::GiveUp(why));
    }
    let res = crate::resources::vm_resources_for(
        Some(&ask.resources()),
        crate::resources::ImageShape::from(&image.config),
        &inner.policy,
    )
    .map_err(|e| Prepare::GiveUp(e.to_string()))?;
    let creds = inner
        .credentials(&pod)
        .map_err(|e| Prepare::GiveUp(e.to_string()))?;
    let mut key = TemplateKey::new(
        &image,
        caps,
        res.cpus,
        res.memory_bytes,
        &templates::key_boot(&boot),
        creds.user(),
    );
    if caps.snapshot_devices == SnapshotDevices::Kept {
        key = key.kept(&inner.args.network, 0);
    }
    let id = key.id();
    let dir = templates::dir_for(&image, &key);
    match inner.templates.lookup(&dir, &key) {
        Ok(Some(_)) => {
            info!(image = %ask.image, template = %id, "template ahead of time: already there");
            return Ok(());
        }
        Ok(None) => {}
        Err(why) => {
            warn!(image = %ask.image, template = %id, %why, "template ahead of time: the one there is broken; making it again");
            inner.templates.discard(&dir);
        }
    }
    let Some(guard) = inner.templates.begin_build(&dir) else {
        info!(image = %ask.image, template = %id, "template ahead of time: being made already, or failed lately");
        return Ok(());
    };
    let _pin = inner
        .images
        .pin(&image)
        .map_err(|e| Prepare::Retry(format!("pinning the image: {}", error_chain(e.as_ref()))))?;
    // The template's VM counts against the node's VMs.
    let Some(_slot) = inner.slots.acquire().await else {
        return Err(Prepare::GiveUp("the node is shutting down".into()));
    };
    info!(image = %ask.image, template = %id, cpus = res.cpus, memory_mib = res.memory_bytes >> 20, "template ahead of time: making it");
    match build(inner, &image, key, creds).await {
        Ok(t) => {
            info!(image = %ask.image, template = %id, boot_ms = t.meta.boot_ms, bytes = t.meta.state_bytes, "template ahead of time: ready");
            Ok(())
        }
        Err(why) => {
            guard.failed();
            Err(Prepare::GiveUp(format!("making template {id}: {why}")))
        }
    }
}

/// Makes the restored guest the pod's own ([`templates::reidentify_script`]), logging in
/// with the template's key and pinning the template guest's host key. Returns the pod's
/// session, on the connection the script ran over (no second login): later dials use
/// the pod's credentials and its own host-key pin, holding the guest's new key when the
/// script printed it.
pub(super) async fn reidentify(
    e: &PodEntry,
    vm: &Arc<dyn Vm>,
    ip: Ipv4Addr,
    state: &Path,
    timeout: Duration,
) -> Result<GuestSession, String> {
    let dir = Template::dir_of_state(state).ok_or("the saved state has no template directory")?;
    let t = Template::load(dir)?.ok_or("its template is gone")?;
    info!(pod = %e.key, uid = %e.key.uid, template = %t.meta.key.id(), "re-identifying restored guest");
    let template_key = t.identity()?;
    let pod_key = PodIdentity::load_or_create(&e.dir.join(crate::identity::KEY_FILE), "")
        .map_err(|err| format!("the pod's SSH key: {}", error_chain(&err)))?;
    let session = super::guest_session(
        vm,
        ip,
        e.creds.clone().with_first_key(template_key.private_key()),
        HostKeyStore::file(t.host_key()),
    );
    // Every failure below closes the template's session; success hands it to the pod.
    let outcome = async {
        let s = session.clone();
        let t0 = std::time::Instant::now();
        super::detached(async move { s.wait_connected(timeout).await })
            .await
            .map_err(|err| format!("its SSH (as the template): {}", vzk_guest::ErrorChain(&err)))?;
        let login = t0.elapsed();
        let hostname = vzk_vm::cloud_init::hostname_of(&e.key.name);
        let script = match vm.spec().boot {
            BootSpec::MacOs { .. } => templates::reidentify_script_macos(e.creds.user(), &hostname),
            _ => templates::reidentify_script(
                e.creds.user(),
                &hostname,
                pod_key.public_openssh(),
                template_key.public_openssh(),
            ),
        };
        let s = session.clone();
        let stdout = tokio::time::timeout(
            timeout.saturating_sub(login),
            super::detached(async move { run_reidentify(&s, script).await }),
        )
        .await
        .unwrap_or_else(|_| Err("it did not finish within the ready timeout".to_owned()))?;
        let pin = HostKeyStore::file(e.dir.join(super::HOST_KEY_FILE));
        match templates::new_host_key(&stdout) {
            Some(key) => pin.verify_or_pin_openssh(key).map_err(|err| {
                format!(
                    "pinning the guest's new host key: {}",
                    vzk_guest::ErrorChain(&err)
                )
            })?,
            None => {
                info!(pod = %e.key, uid = %e.key.uid, "the restored guest printed no new host key: the next dial pins the one it presents");
            }
        }
        info!(pod = %e.key, uid = %e.key.uid, login_ms = login.as_millis(), script_ms = (t0.elapsed() - login).as_millis(), "restored guest re-identified");
        Ok::<_, String>(pin)
    }
    .await;
    match outcome {
        Ok(pin) => Ok(session.hand_over(e.creds.clone(), pin)),
        Err(msg) => {
            session.close();
            Err(msg)
        }
    }
}

/// Runs the re-identification script, answering its [`templates::CLOCK_ASK`] with the
/// host's clock read at that moment. Its stdout (without that line) if it exited 0.
async fn run_reidentify(session: &GuestSession, script: String) -> Result<String, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (to_guest, stdin) = tokio::io::duplex(4096);
    let mut to_guest = Some(to_guest);
    let (stdout, from_guest) = tokio::io::duplex(64 * 1024);
    let (stderr, mut errors) = tokio::io::duplex(64 * 1024);
    let io = vzk_core::streams::AttachIo {
        stdin: Some(Box::pin(stdin)),
        stdout: Some(Box::pin(stdout)),
        stderr: Some(Box::pin(stderr)),
        tty: false,
        resize: None,
    };
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
    let s = session.clone();
    let exec = tokio::spawn(async move { s.exec(&argv, io).await });
    let stderr_all = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = (&mut errors).take(1 << 20).read_to_end(&mut all).await;
        all
    });
    // Bounded: past 4 MiB (a guest that never ends a line) the output is cut off, and
    // the command fails writing it.
    let mut lines = tokio::io::BufReader::new(from_guest.take(4 << 20)).lines();
    let mut out = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if line == templates::CLOCK_ASK
            && let Some(mut w) = to_guest.take()
        {
            let now = templates::clock_answer(std::time::SystemTime::now());
            // A failed write shows as the script's own failure to read the clock. Then
            // stdin ends: nothing after the clock reads it.
            let _ = w.write_all(now.as_bytes()).await;
            let _ = w.shutdown().await;
        } else if out.len() < 1 << 20 {
            out.push_str(&line);
            out.push('\n');
        }
    }
    let status = exec
        .await
        .map_err(|err| format!("running the re-identification: {err}"))?
        .map_err(|err| {
            format!(
                "running the re-identification: {}",
                vzk_guest::ErrorChain(&err)
            )
        })?;
    let errors = stderr_all.await.unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "the re-identification exited {}: {}",
            status.code,
            String::from_utf8_lossy(&errors).trim()
        ));
    }
    Ok(out)
}
