//! Start by restore (issue 18): a booted, SSH-ready VM saved once per image and VM shape
//! (a *template*), and each later pod of that image and shape restored from it instead of
//! booted.
//!
//! * **Where:** `<image dir>/templates/<id>/` in the image cache: `state` (the saved
//!   machine), `disk` (the template's disk clone, frozen at the save: each restored pod
//!   gets a copy-on-write clone of it), `console.log` (the template's boot), `ssh_ed25519`
//!   (the template's login key, the node's only), `ssh_host_key` (the host key its guest
//!   showed) and `template.json` (what it was made from, the state's size and SHA-256),
//!   written last. A template lives and dies with its image: pinned while a pod uses the
//!   image, removed with it.
//! * **When it is valid:** `template.json` must name the same image digest, backend and
//!   version, accelerator, CPUs, memory, boot and layout ([`TemplateKey`]); the state file
//!   must have its recorded size and digest (checked once per agent process). Anything
//!   else is a broken template: the pod boots cold with a `RestoreFailed` event and the
//!   template is removed (then rebuilt).
//! * **Kept NICs:** a backend that keeps the NIC in the saved machine
//!   ([`vzk_vm::SnapshotDevices::Kept`], Virtualization.framework) restores only with the
//!   template's MAC. There an image of one shape has up to [`kept_slots`] templates, each
//!   with its own MAC ([`KeptNic`], [`TemplateMeta::macs`]); a pod takes the first whose
//!   MAC no other pod holds ([`Templates::pick_kept`]) until it is deleted, and a pod
//!   finding all held boots cold while the next template is made.
//! * **What makes a restored VM its own:** its NIC is plugged in after the state is
//!   loaded, with a new MAC (so a new DHCP lease; with kept NICs, the template's MAC); QEMU gives it a new VM generation ID
//!   (the guest kernel reseeds its RNG); then, over SSH with the template's key and its
//!   pinned host key, [`reidentify_script`] sets the clock, the host name, a new machine
//!   id, mixes fresh host randomness into the RNG, swaps the template's login key for the
//!   pod's and makes new SSH host keys. The pod's seed disk (its own host name and key)
//!   takes the template's place, so a reboot of the pod comes up as the pod.
//! * **macOS guests** (Virtualization.framework): no seed; the template runs on its own
//!   copy of the image's auxiliary storage (`aux.img`, kept beside the state and copied
//!   into each restored pod), is keyed by the image's ([`key_boot`]), and is logged into
//!   with the image's own user; [`reidentify_script_macos`] sets the clock, the `scutil`
//!   names and new SSH host keys.
//! * **Who is restored:** pods of a node started with `--snapshot-start`, whose backend can
//!   ([`vzk_vm::Capabilities::snapshots`]), that boot a Linux kernel and give no cloud-init
//!   user-data of their own (it would not run: the template's cloud-init has run), or that
//!   boot macOS. The annotation `vz-kubelet.io/snapshot-start: "false"` boots a pod cold.
//!   A template's VM takes one of the node's VM slots while it is made (none free: no
//!   build now; a later pod tries again).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use vzk_guest::{HostKeyStore, PodIdentity};
use vzk_image::LocalImage;
use vzk_vm::cloud_init::NoCloudSeed;
use vzk_vm::{
    BootSpec, Capabilities, DiskFormat, DiskSpec, MacAddr, NetworkAttachment, NicSpec,
    SnapshotDevices, SnapshotSpec, Vm, VmSpec,
};

use crate::identity::{CLOUD_INIT_ANNOTATION, USER_DATA_ANNOTATION, USER_DATA_FROM_ANNOTATION};

/// `"false"`: this pod boots cold even where the node starts pods by restore.
pub const SNAPSHOT_ANNOTATION: &str = "vz-kubelet.io/snapshot-start";

/// The VM id of a template build is this and the template's id.
pub const VM_ID_PREFIX: &str = "tmpl-";

/// After a failed build, the same template is not tried again for this long (a guest that
/// cannot be saved would otherwise cost a boot per pod).
const RETRY_AFTER: Duration = Duration::from_secs(30 * 60);

/// Bumped when what a template holds or how it is laid out changes: older templates are
/// then rebuilt, never restored.
const LAYOUT: u32 = 1;

const META: &str = "template.json";
const STATE: &str = "state";
const DISK: &str = "disk";
const SEED: &str = "cidata.img";
const KEY: &str = "ssh_ed25519";
const HOST_KEY: &str = "ssh_host_key";
const CONSOLE: &str = "console.log";
const AUX: &str = "aux.img";

/// What a template was made from: a template is restored only where all of it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateKey {
    /// The image's manifest digest.
    pub image_digest: String,
    /// `qemu` / `vz`.
    pub backend: String,
    /// The backend's version (a saved state is only loaded by the version that wrote it).
    pub backend_version: String,
    /// `kvm`, `tcg`, `vz`.
    pub accelerator: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory.
    pub memory_bytes: u64,
    /// How the guest booted.
    pub boot: BootSpec,
    /// The user the agent logs in as (the template's key is that user's).
    pub ssh_user: String,
    /// [`LAYOUT`].
    pub layout: u32,
    /// On a backend that keeps a template's NIC in its saved machine
    /// ([`vzk_vm::SnapshotDevices::Kept`]): the NIC's attachment and which of the image's
    /// templates this is (each has its own MAC, and a MAC runs in one VM at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_nic: Option<KeptNic>,
}

/// The part of a [`TemplateKey`] for a backend that keeps the NIC in the saved machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptNic {
    /// The NIC's attachment (part of the saved machine).
    pub network: NetworkAttachment,
    /// 0, 1, …: the template's place among the image's templates of this shape.
    pub slot: u32,
}

impl TemplateKey {
    /// The key of `image` booted with `boot` at `cpus`/`memory_bytes` on `caps`.
    pub fn new(
        image: &LocalImage,
        caps: &Capabilities,
        cpus: u32,
        memory_bytes: u64,
        boot: &BootSpec,
        ssh_user: &str,
    ) -> Self {
        Self {
            image_digest: image.digest.clone(),
            backend: caps.backend.to_string(),
            backend_version: caps.version.clone(),
            accelerator: caps.accelerator.clone(),
            cpus,
            memory_bytes,
            boot: boot.clone(),
            ssh_user: ssh_user.to_owned(),
            layout: LAYOUT,
            kept_nic: None,
        }
    }

    /// This key for template `slot` of a backend that keeps the NIC, attached to
    /// `network`, in the saved machine.
    pub fn kept(&self, network: &NetworkAttachment, slot: u32) -> Self {
        Self {
            kept_nic: Some(KeptNic {
                network: network.clone(),
                slot,
            }),
            ..self.clone()
        }
    }

    /// The template's directory name: 16 hex digits of the key's SHA-256.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&Sha256::digest(&json)[..8])
    }
}

/// `template.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMeta {
    /// What it was made from.
    pub key: TemplateKey,
    /// The size of `state`.
    pub state_bytes: u64,
    /// `sha256:<hex>` of `state`.
    pub state_digest: String,
    /// The format of `disk`.
    pub disk_format: DiskFormat,
    /// When it was saved (RFC 3339).
    pub created: String,
    /// How long its guest took from launch to SSH (what a restore saves), ms.
    pub boot_ms: u64,
    /// The MACs of the NICs saved in the machine, which a VM restored from it must have
    /// ([`KeptNic`]; empty where NICs are plugged in after the restore).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<MacAddr>,
}

/// A valid template on disk.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its directory.
    pub dir: PathBuf,
    /// Its `template.json`.
    pub meta: TemplateMeta,
}

impl Template {
    /// The template at `dir` as its `template.json` describes it (`Ok(None)`: none there).
    pub fn load(dir: &Path) -> Result<Option<Template>, String> {
        let meta_path = dir.join(META);
        let text = match std::fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", meta_path.display())),
        };
        let meta = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a template description: {e}", meta_path.display()))?;
        Ok(Some(Template {
            dir: dir.to_path_buf(),
            meta,
        }))
    }

    /// The saved machine state.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    /// The disk a pod's clone is made from.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }
    /// The template guest's host key, pinned for the re-identification login.
    pub fn host_key(&self) -> PathBuf {
        self.dir.join(HOST_KEY)
    }
    /// The template's login key.
    pub fn identity(&self) -> Result<PodIdentity, String> {
        PodIdentity::load_or_create(&self.dir.join(KEY), "")
            .map_err(|e| format!("the template's SSH key: {}", crate::pod::error_chain(&e)))
    }
    /// A macOS template's auxiliary storage (NVRAM) as it was at the save: a pod restored
    /// from it gets a copy.
    pub fn aux(&self) -> PathBuf {
        self.dir.join(AUX)
    }
    /// The template's boot console.
    pub fn console(&self) -> PathBuf {
        self.dir.join(CONSOLE)
    }
    /// The template a restored VM's state file belongs to.
    pub fn dir_of_state(state: &Path) -> Option<&Path> {
        state.parent()
    }
}

/// The templates of this node: lookups (with the state digest checked once per process)
/// and the builds under way.
#[derive(Debug, Default)]
pub struct Templates {
    building: Mutex<HashSet<PathBuf>>,
    failed: Mutex<std::collections::HashMap<PathBuf, std::time::Instant>>,
    verified: Mutex<HashSet<(PathBuf, u64, SystemTime)>>,
    /// MACs of templates with kept NICs, by the pod restored with each: a MAC runs in
    /// one VM at a time.
    claims: Mutex<std::collections::HashMap<MacAddr, String>>,
}

/// What [`Templates::pick_kept`] found among an image's templates with kept NICs.
#[derive(Debug, Default)]
pub struct KeptPick {
    /// The template to restore from, its MAC now claimed for the pod.
    pub restore: Option<Template>,
    /// The first slot with no template, to build (only when nothing can be restored).
    pub build: Option<usize>,
    /// Slots whose template is broken (removed here), and why.
    pub broken: Vec<(usize, String)>,
}

/// Where `image`'s template with `key` lives.
pub fn dir_for(image: &LocalImage, key: &TemplateKey) -> PathBuf {
    image.dir.join("templates").join(key.id())
}

/// How many templates with kept NICs ([`KeptNic`]) an image of one shape may have: one
/// per VM that may run at once on this node (`node_vms`, and the backend's own limit),
/// since each restored VM holds its template's MAC; at most 4.
pub fn kept_slots(caps: &Capabilities, node_vms: u32) -> u32 {
    node_vms
        .min(caps.max_running_vms.unwrap_or(u32::MAX))
        .clamp(1, 4)
}

/// The boot a template is keyed by (and built with) for a pod planned as `plan`: a
/// macOS guest's auxiliary storage is the image's, not the pod's copy of it.
pub fn key_boot(plan: &crate::boot::BootPlan) -> BootSpec {
    match (&plan.spec, &plan.clone) {
        (
            BootSpec::MacOs {
                hardware_model,
                machine_id,
                ..
            },
            Some((image_aux, _)),
        ) => BootSpec::MacOs {
            aux_storage: image_aux.clone(),
            hardware_model: hardware_model.clone(),
            machine_id: machine_id.clone(),
        },
        (spec, _) => spec.clone(),
    }
}

/// How many disks a VM of `boot` restored from a template has, in the template's order:
/// the disk, and for a Linux guest its NoCloud seed.
pub fn disk_count(boot: &BootSpec) -> usize {
    match boot {
        BootSpec::MacOs { .. } => 1,
        _ => 2,
    }
}

/// Why a pod boots cold on a node that starts pods by restore (`None`: it may restore).
/// `devices` is the backend's [`SnapshotDevices`]; `shares`: whether the pod's VM gets
/// shared directories (its volumes), which a backend that keeps the template's devices
/// cannot give a restored VM.
pub fn ineligible(
    pod: &k8s_openapi::api::core::v1::Pod,
    boot: &BootSpec,
    devices: SnapshotDevices,
    shares: bool,
) -> Option<String> {
    if devices == SnapshotDevices::Kept && shares {
        return Some("this backend cannot give a restored VM shared directories".into());
    }
    let annotations = pod.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k));
    if get(SNAPSHOT_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Some(format!(
            "the pod opts out ({SNAPSHOT_ANNOTATION}: \"false\")"
        ));
    }
    match boot {
        // Logged into with the image's own user; nothing of cloud-init applies.
        BootSpec::MacOs { .. } => return None,
        BootSpec::Efi { .. } => {
            return Some("guests booted by EFI firmware are not restored so far".into());
        }
        BootSpec::LinuxKernel { .. } => {}
    }
    if get(CLOUD_INIT_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Some(format!(
            "the pod has no cloud-init seed ({CLOUD_INIT_ANNOTATION}: \"false\")"
        ));
    }
    for a in [USER_DATA_ANNOTATION, USER_DATA_FROM_ANNOTATION] {
        if get(a).is_some() {
            return Some(format!(
                "the pod gives cloud-init user-data ({a}), which runs only in a first boot"
            ));
        }
    }
    None
}

impl Templates {
    /// The valid template at `dir` for `key`: `Ok(None)` when there is none, `Err` (with
    /// why) when one is there but broken or made for something else.
    pub fn lookup(&self, dir: &Path, key: &TemplateKey) -> Result<Option<Template>, String> {
        let Some(t) = Template::load(dir)? else {
            return Ok(None);
        };
        if t.meta.key != *key {
            return Err(format!(
                "template {} was made for another image, backend or VM shape",
                dir.display()
            ));
        }
        self.verify_state(&t)?;
        if !t.disk().is_file() {
            return Err(format!("{} is missing", t.disk().display()));
        }
        if matches!(key.boot, BootSpec::MacOs { .. }) && !t.aux().is_file() {
            return Err(format!("{} is missing", t.aux().display()));
        }
        Ok(Some(t))
    }

    /// On a backend that keeps NICs in saved machines: the first valid template of
    /// `slots` (`(dir, key)` in slot order) whose MAC no other pod holds and no VM in
    /// `running` has (VMs adopted after an agent restart hold no claim), its MAC claimed
    /// for pod `uid` until [`Templates::release`]. Broken templates are removed; when
    /// none can be restored, the first slot without a template is named for a build.
    pub fn pick_kept(
        &self,
        slots: &[(PathBuf, TemplateKey)],
        running: &HashSet<MacAddr>,
        uid: &str,
    ) -> KeptPick {
        let mut pick = KeptPick::default();
        let mut missing = None;
        for (i, (dir, key)) in slots.iter().enumerate() {
            match self.lookup(dir, key) {
                Ok(Some(t)) => {
                    let Some(mac) = t.meta.macs.first().copied() else {
                        pick.broken
                            .push((i, "it records no MAC for its kept NIC".into()));
                        self.discard(dir);
                        missing = missing.or(Some(i));
                        continue;
                    };
                    let mut claims = crate::pod::lock(&self.claims);
                    if claims.contains_key(&mac) || running.contains(&mac) {
                        continue;
                    }
                    claims.insert(mac, uid.to_owned());
                    pick.restore = Some(t);
                    return pick;
                }
                Ok(None) => missing = missing.or(Some(i)),
                Err(why) => {
                    pick.broken.push((i, why));
                    self.discard(dir);
                    missing = missing.or(Some(i));
                }
            }
        }
        pick.build = missing;
        pick
    }

    /// Gives back the template MACs pod `uid` holds (its VM is gone, or it boots cold).
    pub fn release(&self, uid: &str) {
        crate::pod::lock(&self.claims).retain(|_, holder| holder != uid);
    }

    /// Checks `t`'s saved state against its recorded size and SHA-256; the digest is
    /// computed once per state file (path, size, mtime) and process.
    pub fn verify_state(&self, t: &Template) -> Result<(), String> {
        let state = t.state();
        let m = std::fs::metadata(&state).map_err(|e| format!("{}: {e}", state.display()))?;
        if m.len() != t.meta.state_bytes {
            return Err(format!(
                "{} has {} bytes, the template recorded {}",
                state.display(),
                m.len(),
                t.meta.state_bytes
            ));
        }
        let stamp = (
            state.clone(),
            m.len(),
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        if !crate::pod::lock(&self.verified).contains(&stamp) {
            let digest = file_digest(&state)?;
            if digest != t.meta.state_digest {
                return Err(format!(
                    "{} has digest {digest}, the template recorded {}",
                    state.display(),
                    t.meta.state_digest
                ));
            }
            crate::pod::lock(&self.verified).insert(stamp);
        }
        Ok(())
    }

    /// Records the state of a template this process has just made (and hashed) as
    /// verified, so its first restore does not hash it again.
    pub fn trust(&self, t: &Template) {
        let state = t.state();
        if let Ok(m) = std::fs::metadata(&state)
            && m.len() == t.meta.state_bytes
        {
            let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            crate::pod::lock(&self.verified).insert((state, m.len(), mtime));
        }
    }

    /// Verifies, ahead of the pods, the saved states of every template in the image
    /// cache at `images_dir` (a state of several GiB takes seconds to hash, which the
    /// first restore after an agent start would otherwise wait for). Broken ones are
    /// only logged: their first lookup refuses and removes them.
    pub fn verify_all(&self, images_dir: &Path) {
        for dir in template_dirs(images_dir, 5) {
            match Template::load(&dir) {
                Ok(Some(t)) => match self.verify_state(&t) {
                    Ok(()) => tracing::debug!(template = %dir.display(), "template state verified"),
                    Err(why) => {
                        tracing::warn!(template = %dir.display(), %why, "template state does not match its record")
                    }
                },
                Ok(None) => {}
                Err(why) => tracing::warn!(template = %dir.display(), %why, "unreadable template"),
            }
        }
    }

    /// Removes a broken template (a later pod rebuilds it).
    pub fn discard(&self, dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a broken template");
        }
    }

    /// Marks a build of `dir` as under way; `None` when one already is. The build ends
    /// when the returned guard drops.
    pub fn begin_build(self: &Arc<Self>, dir: &Path) -> Option<BuildGuard> {
        if crate::pod::lock(&self.failed)
            .get(dir)
            .is_some_and(|t| t.elapsed() < RETRY_AFTER)
        {
            return None;
        }
        let mut b = crate::pod::lock(&self.building);
        if !b.insert(dir.to_path_buf()) {
            return None;
        }
        Some(BuildGuard {
            templates: self.clone(),
            dir: dir.to_path_buf(),
        })
    }
}

impl BuildGuard {
    /// The build failed: the same template is not built again for a while.
    pub fn failed(&self) {
        crate::pod::lock(&self.templates.failed)
            .insert(self.dir.clone(), std::time::Instant::now());
    }
}

/// A template build under way (see [`Templates::begin_build`]).
#[derive(Debug)]
pub struct BuildGuard {
    templates: Arc<Templates>,
    dir: PathBuf,
}

impl Drop for BuildGuard {
    fn drop(&mut self) {
        crate::pod::lock(&self.templates.building).remove(&self.dir);
    }
}

/// The directories of templates (`templates/<id>`) under `root`, looked for at most
/// `depth` directories down (the image cache's layout is its own).
fn template_dirs(root: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if entry.file_name() == "templates" {
            let children = std::fs::read_dir(&path).into_iter().flatten().flatten();
            found.extend(
                children
                    .map(|c| c.path())
                    .filter(|p| p.join(META).is_file()),
            );
        } else if depth > 1 {
            found.extend(template_dirs(&path, depth - 1));
        }
    }
    found
}

/// `sha256:<hex>` of a file.
fn file_digest(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// What building a template needs from the provider.
pub struct BuildInput<'a> {
    /// The hypervisor.
    pub hv: Arc<dyn vzk_vm::Hypervisor>,
    /// The image.
    pub image: &'a LocalImage,
    /// The template's key.
    pub key: TemplateKey,
    /// Makes the template's disk: a copy-on-write clone of the image's disk at the path.
    pub clone_disk: &'a (dyn Fn(&Path) -> Result<DiskFormat, String> + Sync),
    /// The NIC's attachment.
    pub network: vzk_vm::NetworkAttachment,
    /// The node's SSH credentials (the template's key is tried first).
    pub creds: vzk_guest::Credentials,
    /// Launch → SSH budget.
    pub ready_timeout: Duration,
}

/// Boots the image, waits for its SSH, saves the machine and keeps it as `dir_for(key)`.
/// On failure nothing is left behind.
pub async fn build(input: BuildInput<'_>) -> Result<Template, String> {
    let final_dir = dir_for(input.image, &input.key);
    // What an interrupted build (an agent that died) left.
    if let (Some(parent), Some(name)) = (final_dir.parent(), final_dir.file_name()) {
        let stale = format!("{}.partial-", name.to_string_lossy());
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&stale) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let work = final_dir.with_extension(format!("partial-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let result = build_in(&input, &work).await;
    match result {
        Ok(meta) => {
            let _ = std::fs::remove_dir_all(&final_dir);
            std::fs::rename(&work, &final_dir).map_err(|e| {
                let _ = std::fs::remove_dir_all(&work);
                format!("keeping the template at {}: {e}", final_dir.display())
            })?;
            Ok(Template {
                dir: final_dir,
                meta,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

async fn build_in(input: &BuildInput<'_>, work: &Path) -> Result<TemplateMeta, String> {
    let id = input.key.id();
    let key = PodIdentity::load_or_create(&work.join(KEY), &format!("vz-kubelet template {id}"))
        .map_err(|e| format!("the template's SSH key: {}", crate::pod::error_chain(&e)))?;
    let disk = work.join(DISK);
    let disk_format = (input.clone_disk)(&disk)?;
    let mut disks = vec![DiskSpec {
        path: disk,
        read_only: false,
        format: disk_format,
    }];
    let boot = match &input.key.boot {
        // A macOS guest writes its auxiliary storage: the template runs on its own copy
        // of the image's, kept beside the state.
        BootSpec::MacOs {
            aux_storage,
            hardware_model,
            machine_id,
        } => {
            let aux = work.join(AUX);
            std::fs::copy(aux_storage, &aux)
                .map_err(|e| format!("copying {}: {e}", aux_storage.display()))?;
            BootSpec::MacOs {
                aux_storage: aux,
                hardware_model: hardware_model.clone(),
                machine_id: machine_id.clone(),
            }
        }
        // A Linux guest takes the template's login key and name from a NoCloud seed.
        other => {
            let seed = NoCloudSeed {
                instance_id: format!("vzk-template-{id}"),
                hostname: "vzk-template".into(),
                user: input.creds.user().to_string(),
                authorized_keys: vec![key.public_openssh().to_string()],
                user_data: None,
            };
            let seed_path = work.join(SEED);
            seed.write(&seed_path)
                .map_err(|e| format!("writing the template's seed: {e}"))?;
            disks.push(DiskSpec {
                path: seed_path,
                read_only: true,
                format: DiskFormat::Raw,
            });
            other.clone()
        }
    };
    let mac = MacAddr::random();
    let spec = VmSpec {
        id: format!("{VM_ID_PREFIX}{id}"),
        cpus: input.key.cpus,
        memory_bytes: input.key.memory_bytes,
        boot,
        disks,
        nics: vec![NicSpec {
            mac,
            attachment: input.network.clone(),
        }],
        shared_dirs: vec![],
        console_log: Some(work.join(CONSOLE)),
        snapshot: Some(SnapshotSpec::Template {
            state: work.join(STATE),
        }),
    };
    let vm = input
        .hv
        .create(spec)
        .await
        .map_err(|e| format!("creating the template VM: {}", crate::pod::error_chain(&e)))?;
    let saved = boot_and_save(input, &vm, &key, work).await;
    if saved.is_err() {
        let _ = vm.force_stop().await;
    }
    if let Err(e) = vm.remove().await {
        tracing::warn!(vm = vm.id(), error = %e, "removing the template VM");
    }
    let boot_ms = saved?;
    let state = work.join(STATE);
    let state_bytes = std::fs::metadata(&state)
        .map_err(|e| format!("{}: {e}", state.display()))?
        .len();
    let meta = TemplateMeta {
        key: input.key.clone(),
        state_bytes,
        state_digest: file_digest(&state)?,
        disk_format,
        created: chrono::Utc::now().to_rfc3339(),
        boot_ms,
        macs: if input.key.kept_nic.is_some() {
            vec![mac]
        } else {
            Vec::new()
        },
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
    std::fs::write(work.join(META), json).map_err(|e| format!("writing {META}: {e}"))?;
    Ok(meta)
}

async fn boot_and_save(
    input: &BuildInput<'_>,
    vm: &Arc<dyn Vm>,
    key: &PodIdentity,
    work: &Path,
) -> Result<u64, String> {
    let t0 = tokio::time::Instant::now();
    vm.start()
        .await
        .map_err(|e| format!("starting the template VM: {}", crate::pod::error_chain(&e)))?;
    let ip = vzk_vm::wait_for_ip(vm.as_ref(), input.ready_timeout)
        .await
        .map_err(|e| format!("the template VM's address: {}", crate::pod::error_chain(&e)))?;
    let session = crate::pod::guest_session(
        vm,
        ip,
        input.creds.clone().with_first_key(key.private_key()),
        HostKeyStore::file(work.join(HOST_KEY)),
    );
    let left = input.ready_timeout.saturating_sub(t0.elapsed());
    session
        .wait_ready(left)
        .await
        .map_err(|e| format!("the template VM's SSH: {}", vzk_guest::ErrorChain(&e)))?;
    let boot_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    // What the guest has written reaches the disk before the disk is frozen.
    let argv = vec!["sync".to_owned()];
    let out = session
        .output(&argv)
        .await
        .map_err(|e| format!("sync in the template VM: {}", vzk_guest::ErrorChain(&e)))?;
    if !out.status.success() {
        return Err(format!(
            "sync in the template VM exited {}",
            out.status.code
        ));
    }
    session.close();
    vm.save_state()
        .await
        .map_err(|e| crate::pod::error_chain(&e))?;
    Ok(boot_ms)
}

/// What makes a restored guest the pod's own: the shell script run (as the SSH user
/// `user`, privileged steps through `sudo -n` when that is not root) right after the
/// restore.
///
/// Every guest process start costs tens of milliseconds under emulation, on the path a
/// pod waits on: the script uses shell built-ins where it can (files written by
/// redirection when root, `/proc/uptime` and keys read with `read`, the login key
/// filtered by a `case` loop and written in place, running servers found in
/// `/proc/*/comm`), and starts three
/// processes on a guest logged into as root (`date`, `rm`, `dropbearkey`; `sed`
/// too where `/etc/hosts` names the template).
pub fn reidentify_script(user: &str, hostname: &str, pod_key: &str, template_key: &str) -> String {
    let q = |s: &str| vzk_guest::quote::quote_word(s);
    // The template key's base64 body identifies its authorized_keys line.
    let template_body = template_key
        .split_whitespace()
        .nth(1)
        .unwrap_or(template_key);
    let machine_id = hex::encode(rand::random::<[u8; 16]>());
    let seed = hex::encode(rand::random::<[u8; 64]>());
    format!(
        r#"{PROLOGUE}
put() {{ if [ -z "$S" ]; then printf '%s\n' "$2" > "$1"; else printf '%s\n' "$2" | $S tee "$1" >/dev/null; fi; }}
running() {{ for c in /proc/[0-9]*/comm; do read -r n < "$c" 2>/dev/null && [ "$n" = "$1" ] && return 0; done; return 1; }}
has() {{ while read -r l; do case $l in *"$1"*) return 0 ;; esac; done < "$2"; return 1; }}
read -r t0 _ < /proc/uptime
echo {CLOCK_ASK}
read -r now rounded || fail "reading the clock"
$S date -s "@$now" >/dev/null 2>&1 || $S date -s "@$rounded" >/dev/null || fail "setting the clock"
if [ -z "$S" ]; then put /proc/sys/kernel/hostname {host}; else $S hostname {host}; fi || fail "setting the host name"
put /etc/hostname {host} || fail "writing /etc/hostname"
[ -f /etc/hosts ] && has vzk-template /etc/hosts && $S sed -i 's/\bvzk-template\b/'{host}'/g' /etc/hosts
put /dev/urandom {seed}
[ -f /etc/machine-id ] && put /etc/machine-id {machine_id}
if [ -d /etc/dropbear ]; then
  $S rm -f /etc/dropbear/dropbear_*_host_key
  if command -v dropbearkey >/dev/null && running dropbear; then
    k=$($S dropbearkey -t ed25519 -f /etc/dropbear/dropbear_ed25519_host_key 2>/dev/null)
    mark <<VZK_KEY
$k
VZK_KEY
  fi
fi
if [ -f /etc/ssh/sshd_config ] && command -v ssh-keygen >/dev/null; then
  for t in ed25519 ecdsa; do
    if [ -f /etc/ssh/ssh_host_${{t}}_key ]; then
      $S rm -f /etc/ssh/ssh_host_${{t}}_key /etc/ssh/ssh_host_${{t}}_key.pub
      $S ssh-keygen -q -t $t -N '' -f /etc/ssh/ssh_host_${{t}}_key
    fi
  done
  if [ -f /etc/ssh/ssh_host_rsa_key ]; then
    $S rm -f /etc/ssh/ssh_host_rsa_key /etc/ssh/ssh_host_rsa_key.pub
    ( $S ssh-keygen -q -t rsa -N '' -f /etc/ssh/ssh_host_rsa_key && $S kill -HUP $(cat /run/sshd.pid 2>/dev/null) ) >/dev/null 2>&1 </dev/null &
  fi
  $S systemctl reload ssh 2>/dev/null || $S kill -HUP $(cat /run/sshd.pid 2>/dev/null) 2>/dev/null || true
  if running sshd && [ -f /etc/ssh/ssh_host_ed25519_key.pub ]; then
    mark < /etc/ssh/ssh_host_ed25519_key.pub
  fi
fi
{KEYS_PART}
put /dev/kmsg "vz-kubelet: re-identified as "{host}" (uptime $t0 s)" 2>/dev/null || true
"#,
        PROLOGUE = prologue(user),
        CLOCK_ASK = CLOCK_ASK,
        KEYS_PART = login_key_swap(template_body, pod_key),
        host = q(hostname),
        seed = q(&seed),
        machine_id = q(&machine_id),
    )
}

/// The shell function `mark` of [`reidentify_script`]: prints [`HOST_KEY_MARK`] + type +
/// key for each ed25519 public-key line on its input (the comment dropped).
fn mark_fn() -> String {
    format!(
        r#"mark() {{ while read -r t b _ || [ -n "$t" ]; do if [ "$t" = ssh-ed25519 ]; then echo "{HOST_KEY_MARK}$t $b"; fi; done; }}"#
    )
}

/// The part of [`reidentify_script`] that swaps the template's login key (the line
/// holding `template_body`) for `pod_key` in `~/.ssh/authorized_keys`, as the SSH user:
/// the other lines are read into the shell first, then the file is rewritten in place
/// (no `mv`: one process fewer; the guest is this pod's own clone and nothing else logs
/// in meanwhile). A file it makes is 0600 (and `~/.ssh` 0700, if it is made).
fn login_key_swap(template_body: &str, pod_key: &str) -> String {
    let q = |s: &str| vzk_guest::quote::quote_word(s);
    format!(
        r#"umask 077
[ -d ~/.ssh ] || mkdir ~/.ssh || fail "making ~/.ssh"
k=
if [ -f ~/.ssh/authorized_keys ]; then
  while IFS= read -r l || [ -n "$l" ]; do case $l in *{template_body}*) ;; *) k="$k$l
" ;; esac; done < ~/.ssh/authorized_keys
fi
printf '%s%s\n' "$k" {pod_key} > ~/.ssh/authorized_keys || fail "installing the pod's key""#,
        template_body = q(template_body),
        pod_key = q(pod_key),
    )
}

/// [`reidentify_script`] for a macOS guest (logged into with the image's own user, so
/// no login key is swapped): the clock (BSD `date`, whole seconds), the three names
/// `scutil` keeps, fresh randomness for the kernel's pool, and new SSH host keys (the
/// next connection's `sshd`, started per connection by launchd, uses them; the new
/// ed25519 key is printed for the agent to pin).
pub fn reidentify_script_macos(user: &str, hostname: &str) -> String {
    let q = |s: &str| vzk_guest::quote::quote_word(s);
    let seed = hex::encode(rand::random::<[u8; 64]>());
    format!(
        r#"{PROLOGUE}
echo {CLOCK_ASK}
read -r now rounded || fail "reading the clock"
$S date -f %s "$rounded" >/dev/null || fail "setting the clock"
for n in HostName LocalHostName ComputerName; do
  $S scutil --set $n {host} || fail "setting the $n"
done
printf '%s\n' {seed} | $S tee /dev/random >/dev/null
for t in ed25519 ecdsa rsa; do
  $S rm -f /etc/ssh/ssh_host_${{t}}_key /etc/ssh/ssh_host_${{t}}_key.pub
done
$S ssh-keygen -A >/dev/null || fail "making new SSH host keys"
mark < /etc/ssh/ssh_host_ed25519_key.pub
$S logger "vz-kubelet: re-identified as "{host} || true
"#,
        PROLOGUE = prologue(user),
        CLOCK_ASK = CLOCK_ASK,
        host = q(hostname),
        seed = q(&seed),
    )
}

/// The start of both re-identification scripts: `fail`, `S` (`sudo -n` unless root; a
/// root login needs no `id` to know it) and [`mark_fn`].
fn prologue(user: &str) -> String {
    let who = if user == "root" {
        "S="
    } else {
        r#"S=; [ "$(id -u)" = 0 ] || S="sudo -n""#
    };
    format!(
        "fail() {{ echo \"re-identification: $1\" >&2; exit 1; }}\n{who}\n{}",
        mark_fn()
    )
}

/// The line [`reidentify_script`] prints once it runs, asking for the host's clock: the
/// agent answers on its stdin with [`clock_answer`], read at that moment, so the time set
/// is not stale by however long the command took to start (over a second for a first
/// command on OpenSSH with PAM under emulation).
pub const CLOCK_ASK: &str = "vzk-clock?";

/// The answer to [`CLOCK_ASK`]: `secs.nanos rounded-secs` (the second for a `date` that
/// takes whole seconds only) and a newline.
pub fn clock_answer(now: SystemTime) -> String {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:09} {}\n",
        since.as_secs(),
        since.subsec_nanos(),
        (since + Duration::from_millis(500)).as_secs()
    )
}

/// What [`reidentify_script`] prints before each new ed25519 host key of the SSH server
/// it found running (dropbear's, made at once instead of on the next connection, or
/// OpenSSH's).
pub const HOST_KEY_MARK: &str = "vzk-host-key: ";

/// The guest's new host key from the re-identification's output, if it printed exactly
/// one (none: an SSH server the script does not know; two: it cannot tell which answers).
pub fn new_host_key(stdout: &str) -> Option<&str> {
    let mut keys = stdout.lines().filter_map(|l| l.strip_prefix(HOST_KEY_MARK));
    let first = keys.next()?;
    keys.all(|k| k == first).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> LocalImage {
        LocalImage {
            digest: "sha256:abc".into(),
            reference: "r/i:1".into(),
            dir: dir.to_path_buf(),
            format: vzk_image::Format::Vzk,
            config: serde_json::from_str(r#"{"os":"linux","cpuCount":1,"memorySize":268435456}"#)
                .unwrap_or_default(),
            lazy: None,
        }
    }

    fn caps() -> Capabilities {
        Capabilities {
            backend: vzk_vm::BackendKind::Qemu,
            accelerator: "tcg".into(),
            hardware_accelerated: false,
            cpus: (1, 4),
            memory_bytes: (1, u64::MAX),
            boot_kinds: vec![vzk_vm::BootKind::LinuxKernel],
            disk_formats: vec![DiskFormat::Qcow2],
            nat: true,
            bridged: true,
            shared_dirs: true,
            max_running_vms: None,
            vms_outlive_agent: true,
            snapshots: true,
            snapshot_devices: vzk_vm::SnapshotDevices::HotPlug,
            version: "QEMU emulator version 7.2.22".into(),
        }
    }

    fn boot() -> BootSpec {
        BootSpec::LinuxKernel {
            kernel: "/img/kernel".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn the_key_changes_with_whatever_a_saved_state_depends_on() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = image(dir.path());
        let k = TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "root");
        assert_eq!(k.id().len(), 16);
        assert_eq!(
            k.id(),
            TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "root").id()
        );
        let mut other_version = caps();
        other_version.version = "QEMU emulator version 8.2.0".into();
        let variants = [
            TemplateKey::new(&img, &caps(), 2, 256 << 20, &boot(), "root"),
            TemplateKey::new(&img, &caps(), 1, 512 << 20, &boot(), "root"),
            TemplateKey::new(&img, &other_version, 1, 256 << 20, &boot(), "root"),
            TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "admin"),
            TemplateKey {
                image_digest: "sha256:def".into(),
                ..k.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.id(), k.id(), "{v:?}");
        }
        assert!(dir_for(&img, &k).starts_with(dir.path().join("templates")));
    }

    fn write_template(dir: &Path, key: &TemplateKey, state: &[u8]) {
        write_template_with(dir, key, state, Vec::new());
    }

    fn write_template_with(dir: &Path, key: &TemplateKey, state: &[u8], macs: Vec<MacAddr>) {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join(STATE), state).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join(DISK), b"disk").unwrap_or_else(|e| panic!("{e}"));
        let meta = TemplateMeta {
            key: key.clone(),
            state_bytes: state.len() as u64,
            state_digest: format!("sha256:{}", hex::encode(Sha256::digest(state))),
            disk_format: DiskFormat::Qcow2,
            created: "2026-12-07T00:00:00Z".into(),
            boot_ms: 10_000,
            macs,
        };
        std::fs::write(
            dir.join(META),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_template_is_used_only_when_whole_and_made_for_this_key() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = image(tmp.path());
        let key = TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "root");
        let dir = dir_for(&img, &key);
        let t = Templates::default();
        assert!(matches!(t.lookup(&dir, &key), Ok(None)));
        write_template(&dir, &key, b"machine state");
        let found = t.lookup(&dir, &key);
        assert!(
            matches!(&found, Ok(Some(x)) if x.state() == dir.join(STATE)),
            "{found:?}"
        );

        // Another shape: refused, saying so.
        let other = TemplateKey::new(&img, &caps(), 2, 256 << 20, &boot(), "root");
        let err = t.lookup(&dir, &other).err().unwrap_or_default();
        assert!(err.contains("another image, backend or VM shape"), "{err}");

        // Same size, other bytes: the digest catches it (a fresh process, nothing verified).
        std::fs::write(dir.join(STATE), b"machine-state").unwrap_or_else(|e| panic!("{e}"));
        let err = Templates::default()
            .lookup(&dir, &key)
            .err()
            .unwrap_or_default();
        assert!(err.contains("digest"), "{err}");
        // Truncated: the size catches it.
        std::fs::write(dir.join(STATE), b"machine").unwrap_or_else(|e| panic!("{e}"));
        let err = t.lookup(&dir, &key).err().unwrap_or_default();
        assert!(err.contains("bytes"), "{err}");
        // Not JSON.
        std::fs::write(dir.join(META), b"{").unwrap_or_else(|e| panic!("{e}"));
        let err = t.lookup(&dir, &key).err().unwrap_or_default();
        assert!(err.contains("not a template description"), "{err}");
        t.discard(&dir);
        assert!(!dir.exists());
    }

    #[test]
    fn kept_nic_keys_differ_by_slot_and_network_and_leave_hot_plug_keys_as_they_were() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = image(tmp.path());
        let k = TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "root");
        // A hot-plug key's JSON has no trace of the new field: existing templates keep
        // their ids.
        let json = serde_json::to_string(&k).unwrap_or_default();
        assert!(!json.contains("keptNic"), "{json}");
        let back: TemplateKey = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, k);
        let nat = NetworkAttachment::Nat;
        let bridged = NetworkAttachment::Bridged {
            interface: "en0".into(),
        };
        let ids = [
            k.id(),
            k.kept(&nat, 0).id(),
            k.kept(&nat, 1).id(),
            k.kept(&bridged, 0).id(),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(k.kept(&nat, 1).id(), k.kept(&nat, 1).id());
    }

    #[test]
    fn a_kept_nic_template_serves_one_pod_at_a_time_and_the_next_slot_is_built() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = image(tmp.path());
        let base = TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "root");
        let slots: Vec<_> = (0..2)
            .map(|i| {
                let k = base.kept(&NetworkAttachment::Nat, i);
                (dir_for(&img, &k), k)
            })
            .collect();
        let t = Templates::default();
        let none = HashSet::new();
        // Nothing there: build slot 0, restore nothing.
        let p = t.pick_kept(&slots, &none, "pod-a");
        assert!(p.restore.is_none());
        assert_eq!(p.build, Some(0));
        let mac0 = MacAddr([2, 0, 0, 0, 0, 0xa0]);
        write_template_with(&slots[0].0, &slots[0].1, b"state 0", vec![mac0]);
        // Pod A gets slot 0 and its MAC.
        let p = t.pick_kept(&slots, &none, "pod-a");
        let got = p.restore.map(|x| (x.dir, x.meta.macs));
        assert_eq!(got, Some((slots[0].0.clone(), vec![mac0])));
        assert_eq!(p.build, None);
        // Pod B: slot 0's MAC is A's, so B boots cold and slot 1 is built.
        let p = t.pick_kept(&slots, &none, "pod-b");
        assert!(p.restore.is_none());
        assert_eq!(p.build, Some(1));
        let mac1 = MacAddr([2, 0, 0, 0, 0, 0xa1]);
        write_template_with(&slots[1].0, &slots[1].1, b"state 1", vec![mac1]);
        let p = t.pick_kept(&slots, &none, "pod-b");
        assert_eq!(p.restore.map(|x| x.meta.macs), Some(vec![mac1]));
        // Both held: C boots cold and nothing more is built (one per VM slot).
        let p = t.pick_kept(&slots, &none, "pod-c");
        assert!(p.restore.is_none() && p.build.is_none() && p.broken.is_empty());
        // A is deleted: its MAC is free again, for C, unless a running VM (adopted after
        // an agent restart, so without a claim) has it.
        t.release("pod-a");
        let adopted: HashSet<MacAddr> = [mac0].into_iter().collect();
        let p = t.pick_kept(&slots, &adopted, "pod-c");
        assert!(p.restore.is_none() && p.build.is_none());
        let p = t.pick_kept(&slots, &none, "pod-c");
        assert_eq!(p.restore.map(|x| x.meta.macs), Some(vec![mac0]));
        // A template that records no MAC (or is broken) is removed and rebuilt.
        t.release("pod-b");
        write_template_with(&slots[1].0, &slots[1].1, b"state 1", Vec::new());
        let p = t.pick_kept(&slots, &none, "pod-d");
        assert!(p.restore.is_none());
        assert_eq!(p.broken.len(), 1);
        assert_eq!(p.broken[0].0, 1);
        assert_eq!(p.build, Some(1));
        assert!(!slots[1].0.exists());
    }

    #[test]
    fn one_kept_nic_template_per_vm_that_may_run() {
        let mut c = caps();
        assert_eq!(kept_slots(&c, 2), 2);
        assert_eq!(kept_slots(&c, 0), 1);
        assert_eq!(kept_slots(&c, 64), 4);
        c.max_running_vms = Some(2);
        assert_eq!(kept_slots(&c, 10), 2);
    }

    #[test]
    fn states_are_verified_ahead_of_the_pods_and_a_fresh_build_is_trusted() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // The cache's own layout, a few directories down.
        let img = image(&tmp.path().join("images/sha256/abc"));
        let good = TemplateKey::new(&img, &caps(), 1, 256 << 20, &boot(), "root");
        let bad = TemplateKey::new(&img, &caps(), 2, 256 << 20, &boot(), "root");
        write_template(&dir_for(&img, &good), &good, b"good state");
        write_template(&dir_for(&img, &bad), &bad, b"bad state");
        std::fs::write(dir_for(&img, &bad).join(STATE), b"bad STATE")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(template_dirs(tmp.path(), 5).len(), 2);
        assert!(template_dirs(tmp.path(), 2).is_empty(), "deeper than 2");
        let t = Templates::default();
        t.verify_all(tmp.path());
        let verified = crate::pod::lock(&t.verified).clone();
        assert_eq!(verified.len(), 1, "{verified:?}");
        assert!(
            verified
                .iter()
                .any(|(p, ..)| p.starts_with(dir_for(&img, &good)))
        );
        // A build this process made is trusted without hashing.
        let fresh = Templates::default();
        let made = Template::load(&dir_for(&img, &good))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the template"));
        fresh.trust(&made);
        assert_eq!(*crate::pod::lock(&fresh.verified), verified);
    }

    #[test]
    fn only_one_build_per_template_at_a_time() {
        let t = Arc::new(Templates::default());
        let g = t.begin_build(Path::new("/x"));
        assert!(g.is_some());
        assert!(t.begin_build(Path::new("/x")).is_none());
        assert!(t.begin_build(Path::new("/y")).is_some());
        drop(g);
        let g = t.begin_build(Path::new("/x"));
        assert!(g.is_some());
        // A failed build is not retried at once.
        if let Some(g) = g {
            g.failed();
        }
        assert!(t.begin_build(Path::new("/x")).is_none());
        assert!(t.begin_build(Path::new("/y")).is_some());
    }

    #[test]
    fn who_is_restored() {
        let pod = |ann: &[(&str, &str)]| k8s_openapi::api::core::v1::Pod {
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        const HOT: SnapshotDevices = SnapshotDevices::HotPlug;
        assert_eq!(ineligible(&pod(&[]), &boot(), HOT, false), None);
        for (a, want) in [
            ((SNAPSHOT_ANNOTATION, "false"), "opts out"),
            ((CLOUD_INIT_ANNOTATION, "false"), "no cloud-init seed"),
            ((USER_DATA_ANNOTATION, "#cloud-config\n"), "user-data"),
            ((USER_DATA_FROM_ANNOTATION, "cfg"), "user-data"),
        ] {
            let why = ineligible(&pod(&[a]), &boot(), HOT, false).unwrap_or_default();
            assert!(why.contains(want), "{a:?}: {why}");
        }
        assert_eq!(
            ineligible(&pod(&[(SNAPSHOT_ANNOTATION, "true")]), &boot(), HOT, false),
            None
        );
        let efi = BootSpec::Efi {
            variable_store: "/v".into(),
        };
        assert!(ineligible(&pod(&[]), &efi, HOT, false).is_some());
        // A macOS guest is restored (cloud-init's annotations do not concern it) unless
        // the pod opts out.
        let mac = mac_boot("/img/aux.img");
        assert_eq!(ineligible(&pod(&[]), &mac, HOT, false), None);
        assert_eq!(
            ineligible(&pod(&[(CLOUD_INIT_ANNOTATION, "false")]), &mac, HOT, false),
            None
        );
        assert!(ineligible(&pod(&[(SNAPSHOT_ANNOTATION, "false")]), &mac, HOT, false).is_some());
        // Shared directories: hot-plugged into a restored VM, or (kept devices) not at all.
        assert_eq!(ineligible(&pod(&[]), &boot(), HOT, true), None);
        assert_eq!(
            ineligible(&pod(&[]), &mac, SnapshotDevices::Kept, false),
            None
        );
        let why = ineligible(&pod(&[]), &mac, SnapshotDevices::Kept, true).unwrap_or_default();
        assert!(why.contains("shared directories"), "{why}");
    }

    fn mac_boot(aux: &str) -> BootSpec {
        BootSpec::MacOs {
            aux_storage: aux.into(),
            hardware_model: b"hw".to_vec(),
            machine_id: b"id".to_vec(),
        }
    }

    #[test]
    fn a_macos_template_is_keyed_by_the_images_aux_storage_not_the_pods_copy() {
        let plan = |pod: &str| crate::boot::BootPlan {
            spec: mac_boot(&format!("/pods/{pod}/aux.img")),
            clone: Some(("/img/aux.img".into(), format!("/pods/{pod}/aux.img").into())),
        };
        assert_eq!(key_boot(&plan("a")), mac_boot("/img/aux.img"));
        assert_eq!(key_boot(&plan("a")), key_boot(&plan("b")));
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let img = image(tmp.path());
        let key = |p: &crate::boot::BootPlan| {
            TemplateKey::new(&img, &caps(), 1, 256 << 20, &key_boot(p), "admin").id()
        };
        assert_eq!(key(&plan("a")), key(&plan("b")));
        let linux = crate::boot::BootPlan {
            spec: boot(),
            clone: None,
        };
        assert_eq!(key_boot(&linux), boot());
        assert_eq!(disk_count(&boot()), 2, "disk and seed");
        assert_eq!(disk_count(&mac_boot("/a")), 1, "no seed");
        // A macOS template without its aux storage is broken.
        let k = TemplateKey::new(
            &img,
            &caps(),
            1,
            256 << 20,
            &mac_boot("/img/aux.img"),
            "admin",
        );
        let dir = dir_for(&img, &k);
        write_template(&dir, &k, b"state");
        let t = Templates::default();
        let err = t.lookup(&dir, &k).err().unwrap_or_default();
        assert!(err.contains("aux.img is missing"), "{err}");
        std::fs::write(dir.join(AUX), b"nvram").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(t.lookup(&dir, &k), Ok(Some(_))));
    }

    #[test]
    fn the_macos_reidentify_script_sets_clock_names_and_new_host_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        // Run with stand-ins for the macOS commands (each logs its arguments) and the
        // SSH directory in a temporary one.
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bin = tmp.path().join("bin");
        let ssh = tmp.path().join("ssh");
        std::fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(&ssh).unwrap_or_else(|e| panic!("{e}"));
        let log = tmp.path().join("calls");
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFreshKey";
        for (cmd, body) in [
            ("date", String::new()),
            ("scutil", String::new()),
            ("tee", "cat > /dev/null".to_owned()),
            ("logger", String::new()),
            ("id", "echo 501".to_owned()),
            ("sudo", r#"[ "$1" = -n ] && shift; "$@""#.to_owned()),
            (
                "ssh-keygen",
                format!(
                    "echo '{key} root@mac' > {}/ssh_host_ed25519_key.pub",
                    ssh.display()
                ),
            ),
        ] {
            let path = bin.join(cmd);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho \"{cmd} $*\" >> {}\n{body}\n",
                    log.display()
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(
            ssh.join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAAold t\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let script = reidentify_script_macos("admin", "pod-m")
            .replace("/etc/ssh", &ssh.display().to_string());
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                if let Some(mut i) = c.stdin.take() {
                    i.write_all(b"1765000000.600000000 1765000001\n")?;
                }
                c.wait_with_output()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with(CLOCK_ASK), "{stdout}");
        assert_eq!(new_host_key(&stdout), Some(key), "{stdout}");
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        let expected = [
            "id -u",
            "sudo -n date -f %s 1765000001",
            "date -f %s 1765000001",
            "sudo -n scutil --set HostName pod-m",
            "scutil --set HostName pod-m",
            "sudo -n scutil --set LocalHostName pod-m",
            "scutil --set LocalHostName pod-m",
            "sudo -n scutil --set ComputerName pod-m",
            "scutil --set ComputerName pod-m",
            "sudo -n tee /dev/random",
            "tee /dev/random",
        ];
        let got: Vec<&str> = calls.lines().collect();
        assert_eq!(&got[..expected.len()], expected, "{calls}");
        assert!(calls.contains("ssh-keygen -A"), "{calls}");
        assert!(
            calls.contains("logger vz-kubelet: re-identified as pod-m"),
            "{calls}"
        );
        // The old keys were removed before the new ones were made.
        assert!(!ssh.join("ssh_host_rsa_key").exists());
    }

    #[test]
    fn the_reidentify_script_sets_clock_name_keys_and_quotes_what_it_is_given() {
        let now = SystemTime::UNIX_EPOCH + Duration::new(1_765_000_000, 623_000_000);
        let s = reidentify_script(
            "root",
            "pod-a",
            "ssh-ed25519 AAAApod pod",
            "ssh-ed25519 AAAAtemplate vz-kubelet template",
        );
        assert_eq!(clock_answer(now), "1765000000.623000000 1765000001\n");
        // It asks for the clock, reads the answer and sets it (with whole seconds if the
        // guest's date takes no fraction).
        assert!(
            s.contains(&format!("echo {CLOCK_ASK}\nread -r now rounded")),
            "{s}"
        );
        assert!(s.contains(r#"date -s "@$now""#), "{s}");
        assert!(s.contains(r#"date -s "@$rounded""#), "{s}");
        // Root needs no `id` and writes files by redirection; another user asks `id`.
        assert!(s.starts_with("fail() {") && s.contains("\nS=\n"), "{s}");
        assert!(!s.contains("id -u"), "{s}");
        assert!(s.contains("put /proc/sys/kernel/hostname 'pod-a'"), "{s}");
        assert!(s.contains("put /etc/hostname 'pod-a'"), "{s}");
        let admin = reidentify_script("admin", "pod-a", "k", "t");
        assert!(
            admin.contains(r#"[ "$(id -u)" = 0 ] || S="sudo -n""#),
            "{admin}"
        );
        assert!(s.contains("*'AAAAtemplate'*) ;;"), "{s}");
        assert!(
            s.contains("printf '%s%s\\n' \"$k\" 'ssh-ed25519 AAAApod pod'"),
            "{s}"
        );
        assert!(s.contains("rm -f /etc/dropbear/dropbear_*_host_key"), "{s}");
        assert!(s.contains("|| fail \"setting the clock\""), "{s}");
        // It parses as a POSIX shell script.
        for script in [&s, &admin] {
            let parsed = std::process::Command::new("sh")
                .args(["-n", "-c", script])
                .status()
                .is_ok_and(|st| st.success());
            assert!(parsed, "{script}");
        }
        // A hostile host name stays one word.
        let s = reidentify_script("root", "a'; rm -rf /", "k", "t");
        assert!(s.contains(r"put /etc/hostname 'a'\''; rm -rf /'"), "{s}");
    }

    /// Runs `script` with `sh` in `home` (as HOME), returning its stdout.
    fn run_sh(script: &str, home: &Path, stdin: &str) -> String {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sh")
            .args(["-c", script])
            .env("HOME", home)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_scripts_helpers_find_running_servers_and_words_in_files() {
        let home = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = reidentify_script("root", "p", "k", "t");
        // The helpers as the script defines them, run on this host's /proc.
        let helpers: String = s
            .lines()
            .filter(|l| l.starts_with("running() ") || l.starts_with("has() "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(helpers.lines().count(), 2, "{s}");
        let hosts = home.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.1.1 vzk-template\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let out = run_sh(
            &format!(
                "{helpers}running sh && echo sh; running no-such-server-x || echo none; \
                 has vzk-template {h} && echo named; has pod-z {h} || echo unnamed",
                h = hosts.display()
            ),
            home.path(),
            "",
        );
        assert_eq!(out, "sh\nnone\nnamed\nunnamed\n");
    }

    #[test]
    fn the_login_key_swap_keeps_other_keys_and_makes_private_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let home = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let fail = "fail() { echo \"$1\" >&2; exit 1; }\n";
        let swap = login_key_swap("AAAAtemplate", "ssh-ed25519 AAAApod pod");
        // No ~/.ssh yet: made 0700, the file 0600 with the pod's key alone.
        run_sh(&format!("{fail}{swap}"), home.path(), "");
        let ssh = home.path().join(".ssh");
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0)
        };
        assert_eq!(mode(&ssh), 0o700);
        let keys = ssh.join("authorized_keys");
        assert_eq!(mode(&keys), 0o600);
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap_or_default(),
            "ssh-ed25519 AAAApod pod\n"
        );
        // The template's line goes; others stay, the last one even without a newline.
        std::fs::write(
            &keys,
            "ssh-rsa AAAAother ops@x\nssh-ed25519 AAAAtemplate vz-kubelet template\n# note\nssh-ed25519 AAAAlast",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        run_sh(&format!("{fail}{swap}"), home.path(), "");
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap_or_default(),
            "ssh-rsa AAAAother ops@x\n# note\nssh-ed25519 AAAAlast\nssh-ed25519 AAAApod pod\n"
        );
        // A file of another mode keeps it (rewritten in place).
        std::fs::write(&keys, "ssh-ed25519 AAAAtemplate t\n").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o640))
            .unwrap_or_else(|e| panic!("{e}"));
        run_sh(&format!("{fail}{swap}"), home.path(), "");
        assert_eq!(mode(&keys), 0o640);
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap_or_default(),
            "ssh-ed25519 AAAApod pod\n"
        );
    }

    #[test]
    fn the_new_host_key_is_read_from_what_the_script_printed() {
        // The script's `mark`, on dropbearkey's output and on an OpenSSH .pub line.
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDyaEAu08gM4PmoDQTTuT5hMvg8s4xfSTCrFECp5Thng";
        let home = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for text in [
            format!("Public key portion is:\n{key} root@vm\nFingerprint: SHA256:h0w5\n"),
            format!("{key} root@debian\n"),
            key.to_string(),
        ] {
            let out = run_sh(&format!("{}\nmark", mark_fn()), home.path(), &text);
            assert_eq!(out, format!("{HOST_KEY_MARK}{key}\n"), "{text:?}");
            assert_eq!(new_host_key(&format!("other\n{out}")), Some(key));
        }
        assert_eq!(new_host_key("nothing\n"), None);
        let two = format!("{HOST_KEY_MARK}ssh-ed25519 AAAA1\n{HOST_KEY_MARK}ssh-ed25519 AAAA2\n");
        assert_eq!(
            new_host_key(&two),
            None,
            "two servers: which one answers is unknown"
        );
        let same = format!("{HOST_KEY_MARK}ssh-ed25519 AAAA1\n{HOST_KEY_MARK}ssh-ed25519 AAAA1\n");
        assert_eq!(new_host_key(&same), Some("ssh-ed25519 AAAA1"));
    }
}
