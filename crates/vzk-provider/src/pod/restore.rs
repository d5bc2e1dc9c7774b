//! The pod side of start by restore ([`crate::templates`]): which template a new pod is
//! restored from (or why it boots cold), the template made in the background by the
//! first pod of an image and shape, and the re-identification of a restored guest.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use vzk_core::PodEvent;
use vzk_guest::{HostKeyStore, PodIdentity};
use vzk_image::LocalImage;
use vzk_vm::{BootSpec, Vm};

use crate::provider::Inner;
use crate::templates::{self, BuildInput, Template, TemplateKey};

use super::{PodEntry, error_chain};

/// The template `e` is restored from, if the node starts pods by restore and a valid
/// one is there; else `None` (a cold boot), after starting a build where there is none.
pub(super) fn choose(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    image: &LocalImage,
    image_name: &str,
    boot: &BootSpec,
    cpus: u32,
    memory_bytes: u64,
) -> Option<Template> {
    let caps = inner.hv.capabilities();
    if !inner.args.snapshot_start || !caps.snapshots {
        return None;
    }
    if image.lazy.is_some() {
        info!(pod = %e.key, "booting cold: the image's disk is served on demand while it downloads");
        return None;
    }
    if let Some(why) = templates::ineligible(&e.pod, boot) {
        info!(pod = %e.key, %why, "booting cold");
        return None;
    }
    let key = TemplateKey::new(image, caps, cpus, memory_bytes, boot, e.creds.user());
    let dir = templates::dir_for(image, &key);
    match inner.templates.lookup(&dir, &key) {
        Ok(Some(t)) => Some(t),
        Ok(None) => {
            spawn_build(inner, e, image, image_name, key);
            None
        }
        Err(why) => {
            inner.event(
                e,
                PodEvent::warning(
                    "RestoreFailed",
                    format!(
                        "Not restoring from template {}: {why}; booting cold",
                        key.id()
                    ),
                ),
            );
            inner.templates.discard(&dir);
            spawn_build(inner, e, image, image_name, key);
            None
        }
    }
}

/// A restore that failed: the template is dropped (a later pod rebuilds it).
pub(super) fn restore_failed(inner: &Inner, e: &PodEntry, t: &Template, why: &str) {
    inner.event(
        e,
        PodEvent::warning(
            "RestoreFailed",
            format!(
                "Restoring from template {} failed: {why}; booting cold",
                t.meta.key.id()
            ),
        ),
    );
    inner.templates.discard(&t.dir);
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
        let _pin = pin;
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
        let id = key.id();
        let built = templates::build(BuildInput {
            hv: inner.hv.clone(),
            image: &image,
            key,
            clone_disk: &clone,
            network: inner.args.network.clone(),
            creds,
            ready_timeout: inner.ready_timeout,
        })
        .await;
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

/// Makes the restored guest the pod's own ([`templates::reidentify_script`]), logging in
/// with the template's key and pinning the template guest's host key.
pub(super) async fn reidentify(
    e: &PodEntry,
    vm: &Arc<dyn Vm>,
    ip: Ipv4Addr,
    state: &Path,
    timeout: Duration,
) -> Result<(), String> {
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
    let s = session.clone();
    super::detached(async move { s.wait_ready(timeout).await })
        .await
        .map_err(|err| format!("its SSH (as the template): {}", vzk_guest::ErrorChain(&err)))?;
    let script = templates::reidentify_script(
        &vzk_vm::cloud_init::hostname_of(&e.key.name),
        pod_key.public_openssh(),
        template_key.public_openssh(),
        std::time::SystemTime::now(),
    );
    let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
    let s = session.clone();
    let out = super::detached(async move { s.output(&argv).await })
        .await
        .map_err(|err| {
            format!(
                "running the re-identification: {}",
                vzk_guest::ErrorChain(&err)
            )
        });
    session.close();
    let out = out?;
    if !out.status.success() {
        return Err(format!(
            "the re-identification exited {}: {}",
            out.status.code,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    info!(pod = %e.key, uid = %e.key.uid, "restored guest re-identified");
    Ok(())
}
