//! Each pod's own SSH identity (issue 17, item 5): at admission the agent makes an
//! Ed25519 key pair for the pod, keeps its private half in the pod's state directory
//! (`ssh_ed25519`, mode 0600, gone with the pod) and tries it before the node's key; a
//! Linux guest receives the public half and the pod's host name through cloud-init's
//! NoCloud seed (`cidata.img`, a read-only disk). A guest without cloud-init (macOS, or
//! an image that ignores the seed) is entered with the node's key as before, so one
//! pod's key never opens another pod's guest.
//!
//! Annotations: `vz-kubelet.io/cloud-init: "false"` attaches no seed;
//! `vz-kubelet.io/cloud-init-user-data` is user-data of the pod's own (a
//! `#cloud-config` or a `#!` script), merged with ours;
//! `vz-kubelet.io/cloud-init-user-data-from: VOLUME[/KEY]` takes it instead from a file
//! of one of the pod's volumes (key `user-data` unless named), typically a configMap or
//! secret the pod lists but need not mount: the Node authorizer lets the agent read
//! what its pods reference, and a Secret keeps credentials out of the pod's
//! annotations. The file is read when the VM is made (a restart reads it again).

use std::path::Path;

use vzk_core::PodKey;
use vzk_guest::{Credentials, PodIdentity};
use vzk_node::volumes::PodVolumes;
use vzk_vm::cloud_init::{NoCloudSeed, hostname_of};
use vzk_vm::{BootSpec, DiskFormat, DiskSpec};

use crate::pod::PodEntry;

/// The private key's file in the pod's state directory.
pub const KEY_FILE: &str = "ssh_ed25519";
/// The seed volume's file in the pod's state directory.
pub const SEED_FILE: &str = "cidata.img";
/// `"false"`: no seed for this pod.
pub const CLOUD_INIT_ANNOTATION: &str = "vz-kubelet.io/cloud-init";
/// The pod's own user-data.
pub const USER_DATA_ANNOTATION: &str = "vz-kubelet.io/cloud-init-user-data";
/// `VOLUME[/KEY]`: the pod's user-data is that file of one of its volumes.
pub const USER_DATA_FROM_ANNOTATION: &str = "vz-kubelet.io/cloud-init-user-data-from";
/// The file read from the volume [`USER_DATA_FROM_ANNOTATION`] names, unless it names one.
pub const USER_DATA_KEY: &str = "user-data";
/// The most user-data read from a volume (the seed is a small FAT disk; cloud-init's
/// own NoCloud datasource reads far less in practice).
pub const USER_DATA_MAX_BYTES: u64 = 1 << 20;

/// `creds` with the pod's identity tried first: made now when `create` (a new pod),
/// else only read when a previous agent made one.
pub(crate) fn with_identity(
    creds: Credentials,
    dir: &Path,
    key: &PodKey,
    create: bool,
) -> Result<Credentials, String> {
    let path = dir.join(KEY_FILE);
    if !create && !path.exists() {
        return Ok(creds);
    }
    let id = PodIdentity::load_or_create(&path, &format!("{}/{}", key.namespace, key.name))
        .map_err(|e| crate::pod::error_chain(&e))?;
    Ok(creds.with_first_key(id.private_key()))
}

/// The seed disk for a pod about to boot `boot`: `None` for macOS guests, pods that
/// opted out, and pods without an identity (recorded before identities existed).
pub(crate) fn seed_disk(
    e: &PodEntry,
    boot: &BootSpec,
    volumes: Option<&PodVolumes>,
) -> Result<Option<DiskSpec>, String> {
    if matches!(boot, BootSpec::MacOs { .. }) {
        return Ok(None);
    }
    let annotations = e.pod.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k));
    if get(CLOUD_INIT_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Ok(None);
    }
    let key_path = e.dir.join(KEY_FILE);
    if !key_path.exists() {
        return Ok(None);
    }
    let id = PodIdentity::load_or_create(&key_path, "")
        .map_err(|err| format!("the pod's SSH key: {}", crate::pod::error_chain(&err)))?;
    let seed = NoCloudSeed {
        instance_id: e.key.uid.clone(),
        hostname: hostname_of(&e.key.name),
        user: e.creds.user().to_string(),
        authorized_keys: vec![id.public_openssh().to_string()],
        user_data: user_data(
            get(USER_DATA_ANNOTATION),
            get(USER_DATA_FROM_ANNOTATION),
            volumes,
        )?,
    };
    let path = e.dir.join(SEED_FILE);
    seed.write(&path)
        .map_err(|err| format!("writing the cloud-init seed {}: {err}", path.display()))?;
    Ok(Some(DiskSpec {
        path,
        read_only: true,
        format: DiskFormat::Raw,
    }))
}

/// The pod's user-data: inline, or the file of a volume `from` names; not both.
fn user_data(
    inline: Option<&String>,
    from: Option<&String>,
    volumes: Option<&PodVolumes>,
) -> Result<Option<String>, String> {
    let Some(from) = from else {
        return Ok(inline.cloned());
    };
    if inline.is_some() {
        return Err(format!(
            "{USER_DATA_ANNOTATION} and {USER_DATA_FROM_ANNOTATION} are both set: give the user-data one way"
        ));
    }
    let (volume, key) = match from.split_once('/') {
        Some((v, k)) => (v, k),
        None => (from.as_str(), USER_DATA_KEY),
    };
    let bad = |why: String| format!("{USER_DATA_FROM_ANNOTATION}={from:?}: {why}");
    // A key is one file name of the volume, as configMap and secret keys are.
    if volume.is_empty() || key.is_empty() || key == "." || key == ".." || key.contains('/') {
        return Err(bad("expected VOLUME or VOLUME/KEY".into()));
    }
    let Some(v) = volumes.and_then(|vs| vs.volumes.get(volume)) else {
        return Err(bad(format!("the pod has no volume named {volume:?}")));
    };
    if !v.kind.is_dir() {
        return Err(bad(format!(
            "volume {volume:?} is a single file, not a directory"
        )));
    }
    let path = v.host_path.join(key);
    let file = std::fs::File::open(&path).map_err(|err| {
        bad(format!(
            "volume {volume:?} has no readable key {key:?}: {err}"
        ))
    })?;
    let mut text = String::new();
    use std::io::Read as _;
    file.take(USER_DATA_MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|err| bad(format!("reading key {key:?} of volume {volume:?}: {err}")))?;
    if text.len() as u64 > USER_DATA_MAX_BYTES {
        return Err(bad(format!(
            "key {key:?} of volume {volume:?} is larger than {USER_DATA_MAX_BYTES} bytes"
        )));
    }
    Ok(Some(text))
}
