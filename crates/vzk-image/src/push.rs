//! Packing an image directory and pushing it: compress in parallel, upload only the
//! blobs the registry lacks, then the manifest.
//!
//! * agoda format: `disk.img` and `aux.img` as gzip (a series of gzip members
//!   compressed in parallel), `config.json` as is; manifest layout A (empty config,
//!   layers disk, aux, config; as `oras-macos-vz push`) or B (config.json as the config).
//! * vzk format: every file in fixed-size chunks, each an independent zstd stream of 1 MiB
//!   frames that declare their size (see `zstd_frames`).
//! * Tart format (as `tart push` writes it, so that `tart pull` takes it unchanged):
//!   Tart's `config.json` as the config layer, `disk.img` in fixed-size chunks (Tart cuts
//!   512 MiB) in Apple LZ4 framing with their uncompressed size and sha256 as annotations,
//!   `aux.img` as the NVRAM layer, a stub OCI image config with the
//!   `org.cirruslabs.tart.disk.format` label, and the disk size and upload time as
//!   manifest annotations. Tart's config is the directory's `tart-config.json` when there
//!   is one (an image pulled from Tart), else made from ours ([`crate::tart::tart_config`]).
//!
//! Compressed blobs go to temporary files (never whole into memory), are uploaded as
//! soon as they are ready, and are deleted after upload.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::{StreamExt as _, TryStreamExt as _};
use sha2::{Digest as _, Sha256};

use crate::config::{GuestOs, VmConfig};
use crate::content_digest::{Algorithm, ContentHasher};
use crate::error::{ImageError, IoContext as _, Result};
use crate::frame_index::{FrameEntry, FrameIndex};
use crate::layout::{LayoutRef, OciLayout};
use crate::manifest::{Descriptor, Format, Manifest, Platform};
use crate::media_types::{self as mt, Role};
use crate::progress::{NoProgress, Progress};
use crate::reference::Reference;
use crate::registry::{Registry, RegistryOptions, sha256_digest};

/// The two agoda manifest layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgodaLayout {
    /// `oras-macos-vz push`: empty config with platform, layers disk, aux, config.json.
    #[default]
    EmptyConfig,
    /// The e2e helper: config.json is the manifest config, layers aux, disk.
    ConfigAsConfig,
}

/// How to push.
#[derive(Clone)]
pub struct PushOptions {
    /// agoda, vzk or Tart.
    pub format: Format,
    /// agoda manifest layout.
    pub agoda_layout: AgodaLayout,
    /// Chunk size in bytes (vzk and Tart; Tart itself cuts [`mt::TART_CHUNK_SIZE`]).
    pub chunk_size: u64,
    /// Blobs compressed/uploaded at once.
    pub concurrency: usize,
    /// gzip level (agoda).
    pub gzip_level: u32,
    /// zstd level (vzk).
    pub zstd_level: i32,
    /// Registry access.
    pub registry: RegistryOptions,
    /// Where compressed blobs are staged (default: the system temp dir).
    pub work_dir: Option<PathBuf>,
    /// More tags to point at the same manifest.
    pub extra_tags: Vec<String>,
    /// Progress (uncompressed bytes processed).
    pub progress: Option<Arc<dyn Progress>>,
    /// vzk: push the disk's frame index (see [`crate::frame_index`]; default on). Agents
    /// older than it refuse an image that carries it.
    pub frame_index: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            format: Format::Vzk,
            agoda_layout: AgodaLayout::default(),
            chunk_size: mt::DEFAULT_CHUNK_SIZE,
            concurrency: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2)
                + 1,
            gzip_level: 6,
            zstd_level: 3,
            registry: RegistryOptions::default(),
            work_dir: None,
            extra_tags: Vec::new(),
            progress: None,
            frame_index: true,
        }
    }
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("format", &self.format)
            .field("chunk_size", &self.chunk_size)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    /// Manifest digest.
    pub digest: String,
    /// Manifest bytes as pushed.
    #[serde(skip)]
    pub manifest: Vec<u8>,
    /// Blobs uploaded.
    pub uploaded_blobs: usize,
    /// Blobs the registry already had (or duplicates within the image).
    pub skipped_blobs: usize,
    /// Compressed bytes uploaded.
    pub uploaded_bytes: u64,
    /// Bytes of all files.
    pub uncompressed_bytes: u64,
    /// Compressed bytes of all layers.
    pub compressed_bytes: u64,
}

struct Job {
    idx: usize,
    role: Role,
    path: PathBuf,
    offset: u64,
    len: u64,
    file_size: u64,
}

struct Prepared {
    path: PathBuf,
    digest: String,
    size: u64,
    udigest: String,
    /// A staged blob of ours, deleted after upload (not a file of the image directory).
    staged: bool,
    /// Its zstd frames (vzk chunks), for the disk's frame index.
    frames: Vec<FrameEntry>,
}

/// Where a push writes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A registry (`opts.registry` says how to reach it).
    Registry(Reference),
    /// An OCI image layout and a tag in it (created if missing).
    Layout(LayoutRef),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Registry(r) => r.fmt(f),
            Destination::Layout(l) => l.fmt(f),
        }
    }
}

/// The blob store a push writes to, and [`crate::convert::verify_at`] reads.
pub(crate) enum Sink {
    Registry(Registry),
    Layout(OciLayout),
}

impl Sink {
    /// The store `dest` names (a layout is created when `push` and it is missing), and
    /// the tag written or read there.
    pub(crate) fn open(
        dest: &Destination,
        opts: &RegistryOptions,
        push: bool,
    ) -> Result<(Sink, String)> {
        Ok(match dest {
            Destination::Registry(r) => (
                Sink::Registry(Registry::new(r, opts, push)?),
                r.tag.clone().unwrap_or_else(|| "latest".into()),
            ),
            Destination::Layout(l) => (
                Sink::Layout(if push {
                    OciLayout::create(&l.path)?
                } else {
                    OciLayout::open(&l.path)?
                }),
                l.tag.clone(),
            ),
        })
    }

    /// The manifest `dest` names: its bytes and digest.
    pub(crate) async fn manifest(&self, dest: &Destination) -> Result<(Vec<u8>, String)> {
        match (self, dest) {
            (Sink::Registry(r), Destination::Registry(reference)) => {
                let fetched = r.get_manifest(reference.manifest_ref()).await?;
                Ok((fetched.bytes.to_vec(), fetched.digest))
            }
            (Sink::Layout(l), Destination::Layout(lref)) => l.manifest(&lref.tag),
            // `Sink::open` made this store from this destination.
            _ => Err(ImageError::InvalidManifest {
                reference: dest.to_string(),
                reason: "its store is of another kind".into(),
            }),
        }
    }

    pub(crate) async fn has_blob(&self, digest: &str) -> Result<bool> {
        match self {
            Sink::Registry(r) => r.has_blob(digest).await,
            Sink::Layout(l) => l.has_blob(digest),
        }
    }

    async fn put_file(&self, p: &Prepared) -> Result<()> {
        match self {
            Sink::Registry(r) => {
                let file = tokio::fs::File::open(&p.path).await.io("open", &p.path)?;
                r.put_blob(&p.digest, p.size, move || {
                    reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                        file,
                        1 << 20,
                    ))
                })
                .await
            }
            Sink::Layout(l) => {
                let (l, p) = (l.clone(), (p.digest.clone(), p.path.clone(), p.staged));
                tokio::task::spawn_blocking(move || l.put_file(&p.0, &p.1, p.2))
                    .await
                    .map_err(|_| ImageError::Cancelled)?
            }
        }
    }

    async fn put_bytes(&self, digest: &str, bytes: &'static [u8]) -> Result<()> {
        match self {
            Sink::Registry(r) => {
                r.put_blob(digest, bytes.len() as u64, || reqwest::Body::from(bytes))
                    .await
            }
            Sink::Layout(l) => l.put_bytes(digest, bytes),
        }
    }

    async fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<String> {
        match self {
            Sink::Registry(r) => r.put_manifest(tag, bytes, mt::OCI_MANIFEST).await,
            Sink::Layout(l) => l.put_manifest(tag, bytes, mt::OCI_MANIFEST),
        }
    }
}

/// Push the image directory `dir` to `reference`.
pub async fn push(dir: &Path, reference: &Reference, opts: &PushOptions) -> Result<PushReport> {
    push_to(dir, &Destination::Registry(reference.clone()), opts).await
}

/// Push the image directory `dir` to a registry or an OCI image layout.
pub async fn push_to(dir: &Path, dest: &Destination, opts: &PushOptions) -> Result<PushReport> {
    let reference = dest;
    let bad = |reason: String| ImageError::InvalidImageDir {
        path: dir.to_path_buf(),
        reason,
    };
    let cfg_path = dir.join("config.json");
    let cfg_bytes = std::fs::read(&cfg_path).map_err(|e| bad(format!("config.json: {e}")))?;
    let config: VmConfig =
        serde_json::from_slice(&cfg_bytes).map_err(|e| bad(format!("config.json: {e}")))?;
    let mut files = Vec::new();
    for role in [Role::Kernel, Role::Initrd, Role::Disk, Role::Aux] {
        let p = dir.join(role.file_name());
        if let Ok(m) = std::fs::metadata(&p) {
            if !m.is_file() {
                return Err(bad(format!("{} is not a regular file", role.file_name())));
            }
            files.push((role, p, m.len()));
        }
    }
    let has = |r: Role| files.iter().any(|f| f.0 == r);
    if !has(Role::Disk) {
        return Err(bad("no disk.img".into()));
    }
    match opts.format {
        Format::Agoda => {
            if !has(Role::Aux)
                || has(Role::Kernel)
                || has(Role::Initrd)
                || config.os != GuestOs::Darwin
            {
                return Err(bad(
                    "the agoda format carries a macOS image: disk.img, aux.img, config.json".into(),
                ));
            }
        }
        Format::Vzk => {
            if config.os == GuestOs::Darwin && !has(Role::Aux) {
                return Err(bad("a macOS image needs aux.img".into()));
            }
        }
        Format::Tart => {
            if has(Role::Kernel) || has(Role::Initrd) {
                return Err(bad(
                    "Tart's format has no kernel or initrd (Tart boots Linux by EFI)".into(),
                ));
            }
            if !has(Role::Aux) {
                return Err(bad(
                    "Tart's format needs aux.img (Tart's nvram.bin: the macOS auxiliary storage or the EFI variable store)".into(),
                ));
            }
        }
    }
    // Tart's config, made before anything is compressed so that a config Tart cannot
    // take fails at once.
    let tart_cfg = if opts.format == Format::Tart {
        let tart_path = dir.join(TART_CONFIG_FILE);
        Some(match std::fs::read(&tart_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let v = crate::tart::tart_config(&config).map_err(&bad)?;
                serde_json::to_vec(&v).map_err(|e| bad(format!("Tart config: {e}")))?
            }
            Err(e) => return Err(bad(format!("{TART_CONFIG_FILE}: {e}"))),
        })
    } else {
        None
    };
    if opts.format == Format::Agoda {
        // agoda lists disk first, then aux.
        files.sort_by_key(|f| if f.0 == Role::Disk { 0 } else { 1 });
    }
    let total: u64 = files.iter().map(|f| f.2).sum();
    let progress: Arc<dyn Progress> = opts
        .progress
        .clone()
        .unwrap_or_else(|| Arc::new(NoProgress));
    progress.begin(&format!("push {reference}"), total);

    let mut jobs = Vec::new();
    for (role, path, size) in &files {
        let plan =
            if opts.format == Format::Agoda || *role == Role::Aux && opts.format == Format::Tart {
                vec![(0, *size)]
            } else if opts.format == Format::Tart {
                // Tart's fixed grid (its dedup between tags relies on it); an all-zero chunk
                // costs about 0.4% of its size in LZ4 framing.
                let chunk = opts.chunk_size.max(4096);
                let mut plan: Vec<(u64, u64)> = (0..size.div_ceil(chunk))
                    .map(|i| (i * chunk, chunk.min(size - i * chunk)))
                    .collect();
                if plan.is_empty() {
                    plan.push((0, 0));
                }
                plan
            } else {
                let f = File::open(path).io("open", path)?;
                let (holes, chunk) = (holes(&f, *size), opts.chunk_size.max(4096));
                let mut min_hole = MIN_HOLE;
                loop {
                    let plan = chunk_plan(&holes, *size, chunk, min_hole);
                    if plan.len() <= MAX_CHUNKS_PER_FILE || min_hole >= *size {
                        break plan;
                    }
                    min_hole *= 2;
                }
            };
        for (offset, len) in plan {
            jobs.push(Job {
                idx: jobs.len(),
                role: *role,
                path: path.clone(),
                offset,
                len,
                file_size: *size,
            });
        }
    }

    let (reg, tag) = Sink::open(dest, &opts.registry, true)?;
    let reg = Arc::new(reg);
    let work = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = work.join(format!("vzk-push-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&work).io("create", &work)?;
    let _work = RemoveOnDrop(work.clone());
    let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stats = Arc::new(Mutex::new((0usize, 0usize, 0u64)));
    let format = opts.format;
    let (gz, zs) = (opts.gzip_level, opts.zstd_level);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());

    let result = futures::stream::iter(jobs)
        .map(|job| {
            let reg = reg.clone();
            let work = work.clone();
            let seen = seen.clone();
            let stats = stats.clone();
            let progress = progress.clone();
            async move {
                let out = work.join(format!("blob-{}", job.idx));
                let (role, offset, len, file_size, idx) =
                    (job.role, job.offset, job.len, job.file_size, job.idx);
                let p = progress.clone();
                let prepared = tokio::task::spawn_blocking(move || match (format, role) {
                    (Format::Agoda, _) => gzip_file(&job.path, &out, gz, threads, &*p),
                    (Format::Tart, Role::Aux) => stored_file(&job.path, &*p),
                    (Format::Tart, _) => lz4_chunk(&job.path, job.offset, job.len, &out, &*p),
                    _ => zstd_chunk(&job.path, job.offset, job.len, &out, zs, &*p),
                })
                .await
                .map_err(|_| ImageError::Cancelled)??;
                let res = upload(&reg, &prepared, &seen, &stats).await;
                if prepared.staged {
                    let _ = std::fs::remove_file(&prepared.path);
                }
                res?;
                let desc = layer_descriptor(format, role, &prepared, offset, len, file_size);
                let frames = (role == Role::Disk).then_some(prepared.frames);
                Ok::<_, ImageError>((idx, desc, frames))
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<Vec<_>>()
        .await;
    progress.finish();
    let mut layers = result?;
    layers.sort_by_key(|(i, _, _)| *i);
    let mut disk_frames = Vec::new();
    let mut layers: Vec<Descriptor> = layers
        .into_iter()
        .map(|(_, d, frames)| {
            disk_frames.extend(frames);
            d
        })
        .collect();
    // The vzk disk's frame index (lazy disks fetch single frames by it), the last layer.
    if format == Format::Vzk && opts.frame_index {
        let bytes = FrameIndex {
            frame_size: crate::zstd_frames::FRAME as u32,
            chunks: disk_frames,
        }
        .encode();
        let path = work.join(mt::VZK_DISK_FRAMES_TITLE);
        std::fs::write(&path, &bytes).io("write", &path)?;
        let p = Prepared {
            digest: sha256_digest(&bytes),
            size: bytes.len() as u64,
            udigest: String::new(),
            path,
            staged: true,
            frames: Vec::new(),
        };
        upload(&reg, &p, &seen, &stats).await?;
        layers.push(Descriptor {
            media_type: mt::VZK_DISK_FRAMES.to_string(),
            digest: p.digest,
            size: p.size,
            data: None,
            platform: None,
            annotations: Some(BTreeMap::from([(
                mt::ANNOTATION_TITLE.to_string(),
                mt::VZK_DISK_FRAMES_TITLE.to_string(),
            )])),
        });
    }

    // config.json
    let cfg_media = match format {
        Format::Agoda => mt::AGODA_CONFIG,
        Format::Vzk => mt::VZK_CONFIG,
        Format::Tart => mt::TART_CONFIG,
    };
    let (cfg_bytes, cfg_path) = match tart_cfg {
        Some(bytes) => {
            let staged = work.join(TART_CONFIG_FILE);
            std::fs::write(&staged, &bytes).io("write", &staged)?;
            (bytes, staged)
        }
        None => (cfg_bytes, cfg_path),
    };
    let cfg_desc = Descriptor {
        media_type: cfg_media.to_string(),
        digest: sha256_digest(&cfg_bytes),
        size: cfg_bytes.len() as u64,
        data: None,
        platform: None,
        // Tart's layers carry no title.
        annotations: (format != Format::Tart).then(|| {
            BTreeMap::from([(mt::ANNOTATION_TITLE.to_string(), "config.json".to_string())])
        }),
    };
    let cfg_prepared = Prepared {
        path: cfg_path.clone(),
        digest: cfg_desc.digest.clone(),
        size: cfg_desc.size,
        udigest: cfg_desc.digest.clone(),
        staged: false,
        frames: Vec::new(),
    };
    let res = upload(&reg, &cfg_prepared, &seen, &stats).await;
    let stub = if res.is_ok() && format == Format::Tart {
        let stub = serde_json::to_vec(&serde_json::json!({
            "architecture": config.arch_or_default(),
            "os": config.os.as_str(),
            "config": {"Labels": {mt::TART_DISK_FORMAT_LABEL: "raw"}},
        }))
        .map_err(|e| bad(format!("stub config: {e}")))?;
        let path = work.join("oci-config.json");
        std::fs::write(&path, &stub).io("write", &path)?;
        let p = Prepared {
            digest: sha256_digest(&stub),
            size: stub.len() as u64,
            udigest: String::new(),
            path,
            staged: true,
            frames: Vec::new(),
        };
        upload(&reg, &p, &seen, &stats).await.map(|()| Some(p))
    } else {
        res.map(|()| None)
    };
    let stub = stub?;
    let platform = Platform {
        architecture: config.arch_or_default().to_string(),
        os: config.os.as_str().to_string(),
    };
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let manifest = match (format, opts.agoda_layout) {
        (Format::Agoda, AgodaLayout::EmptyConfig) => {
            layers.push(cfg_desc);
            Manifest {
                schema_version: 2,
                media_type: Some(mt::OCI_MANIFEST.to_string()),
                artifact_type: Some(mt::AGODA_ARTIFACT.to_string()),
                config: Descriptor::empty_config(platform),
                layers,
                annotations: Some(BTreeMap::from([(
                    mt::ANNOTATION_CREATED.to_string(),
                    created,
                )])),
            }
        }
        (Format::Agoda, AgodaLayout::ConfigAsConfig) => {
            layers.reverse(); // aux, disk
            Manifest {
                schema_version: 2,
                media_type: Some(mt::OCI_MANIFEST.to_string()),
                artifact_type: None,
                config: cfg_desc,
                layers,
                annotations: Some(BTreeMap::from([(
                    mt::ANNOTATION_CREATED.to_string(),
                    created,
                )])),
            }
        }
        (Format::Tart, _) => {
            let disk_size: u64 = files
                .iter()
                .filter(|f| f.0 == Role::Disk)
                .map(|f| f.2)
                .sum();
            layers.insert(0, cfg_desc);
            let stub = stub.ok_or_else(|| bad("no stub config".into()))?;
            Manifest {
                schema_version: 2,
                media_type: Some(mt::OCI_MANIFEST.to_string()),
                artifact_type: None,
                config: Descriptor {
                    media_type: mt::OCI_IMAGE_CONFIG.to_string(),
                    digest: stub.digest,
                    size: stub.size,
                    data: None,
                    platform: None,
                    annotations: None,
                },
                layers,
                annotations: Some(BTreeMap::from([
                    (
                        mt::TART_UNCOMPRESSED_DISK_SIZE.to_string(),
                        disk_size.to_string(),
                    ),
                    (mt::TART_UPLOAD_TIME.to_string(), created),
                ])),
            }
        }
        _ => {
            layers.insert(0, cfg_desc);
            // The empty config blob must exist for clients that fetch it.
            Manifest {
                schema_version: 2,
                media_type: Some(mt::OCI_MANIFEST.to_string()),
                artifact_type: Some(mt::VZK_ARTIFACT.to_string()),
                config: Descriptor::empty_config(platform),
                layers,
                annotations: Some(BTreeMap::from([
                    (mt::ANNOTATION_CREATED.to_string(), created),
                    (mt::VZK_OS.to_string(), config.os.as_str().to_string()),
                ])),
            }
        }
    };
    if manifest.config.media_type == mt::OCI_EMPTY && !reg.has_blob(mt::OCI_EMPTY_DIGEST).await? {
        reg.put_bytes(mt::OCI_EMPTY_DIGEST, b"{}").await?;
    }
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| bad(format!("serialise manifest: {e}")))?;
    let digest = reg.put_manifest(&tag, &bytes).await?;
    for t in &opts.extra_tags {
        reg.put_manifest(t, &bytes).await?;
    }
    let (uploaded_blobs, skipped_blobs, uploaded_bytes) =
        *stats.lock().map_err(|_| ImageError::Cancelled)?;
    let compressed_bytes = manifest.layers.iter().map(|l| l.size).sum();
    Ok(PushReport {
        digest,
        manifest: bytes,
        uploaded_blobs,
        skipped_blobs,
        uploaded_bytes,
        uncompressed_bytes: total,
        compressed_bytes,
    })
}

fn layer_descriptor(
    format: Format,
    role: Role,
    p: &Prepared,
    offset: u64,
    len: u64,
    file_size: u64,
) -> Descriptor {
    let mut ann = BTreeMap::new();
    ann.insert(
        mt::ANNOTATION_TITLE.to_string(),
        role.file_name().to_string(),
    );
    let media_type = match format {
        Format::Tart => {
            ann.clear();
            if role == Role::Aux {
                return Descriptor {
                    media_type: mt::TART_NVRAM.to_string(),
                    digest: p.digest.clone(),
                    size: p.size,
                    data: None,
                    platform: None,
                    annotations: None,
                };
            }
            ann.insert(mt::TART_UNCOMPRESSED_SIZE.to_string(), len.to_string());
            ann.insert(mt::TART_UNCOMPRESSED_DIGEST.to_string(), p.udigest.clone());
            mt::TART_DISK_V2
        }
        Format::Agoda => {
            ann.insert(mt::AGODA_UNCOMPRESSED_DIGEST.to_string(), p.udigest.clone());
            ann.insert(mt::AGODA_UNCOMPRESSED_SIZE.to_string(), len.to_string());
            if role == Role::Disk {
                mt::AGODA_DISK
            } else {
                mt::AGODA_AUX
            }
        }
        _ => {
            ann.insert(mt::VZK_CHUNK_OFFSET.to_string(), offset.to_string());
            ann.insert(mt::VZK_UNCOMPRESSED_SIZE.to_string(), len.to_string());
            ann.insert(mt::VZK_UNCOMPRESSED_DIGEST.to_string(), p.udigest.clone());
            ann.insert(mt::VZK_FILE_SIZE.to_string(), file_size.to_string());
            role.vzk_media_type()
        }
    };
    Descriptor {
        media_type: media_type.to_string(),
        digest: p.digest.clone(),
        size: p.size,
        data: None,
        platform: None,
        annotations: Some(ann),
    }
}

async fn upload(
    reg: &Sink,
    p: &Prepared,
    seen: &Mutex<HashSet<String>>,
    stats: &Mutex<(usize, usize, u64)>,
) -> Result<()> {
    let first = seen
        .lock()
        .map_err(|_| ImageError::Cancelled)?
        .insert(p.digest.clone());
    if !first || reg.has_blob(&p.digest).await? {
        if let Ok(mut s) = stats.lock() {
            s.1 += 1;
        }
        return Ok(());
    }
    reg.put_file(p).await?;
    if let Ok(mut s) = stats.lock() {
        s.0 += 1;
        s.2 += p.size;
    }
    Ok(())
}

/// Holes at least this long (after rounding inward to [`HOLE_ALIGN`]) get chunks of their
/// own, which a pull recognises as all-zero and skips without downloading or decoding.
const MIN_HOLE: u64 = 8 << 20;
const HOLE_ALIGN: u64 = 1 << 20;
/// A file is cut into at most about this many chunks when its holes allow it: the
/// minimum hole doubles until the plan fits (a manifest stays well under registries'
/// size limits).
const MAX_CHUNKS_PER_FILE: usize = 2000;

/// The holes of a sparse file, `[start, end)`, from `SEEK_DATA`/`SEEK_HOLE` (none where the
/// filesystem or platform cannot tell).
fn holes(file: &File, size: u64) -> Vec<(u64, u64)> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        use nix::unistd::{Whence, lseek};
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let Ok(at) = i64::try_from(pos) else { break };
            let data = match lseek(file, at, Whence::SeekData) {
                Ok(d) => d as u64,
                // ENXIO: no data after `pos`, the rest is a hole.
                Err(nix::errno::Errno::ENXIO) => size,
                Err(_) => break,
            };
            if data > pos {
                out.push((pos, data.min(size)));
            }
            if data >= size {
                break;
            }
            match lseek(file, data as i64, Whence::SeekHole) {
                Ok(h) if (h as u64) > data => pos = h as u64,
                _ => break,
            }
        }
        out
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = (file, size);
        Vec::new()
    }
}

/// Where the vzk format cuts a file of `size` bytes: contiguous `(offset, len)` chunks of
/// at most `chunk` bytes; every hole of at least `min_hole` (rounded inward to
/// [`HOLE_ALIGN`]) is cut out into chunks of its own, sized in powers of two MiB so that a
/// puller meets only a few distinct all-zero sizes.
fn chunk_plan(holes: &[(u64, u64)], size: u64, chunk: u64, min_hole: u64) -> Vec<(u64, u64)> {
    let mut plan = Vec::new();
    let data = |plan: &mut Vec<(u64, u64)>, from: u64, to: u64| {
        let mut off = from;
        while off < to {
            let len = chunk.min(to - off);
            plan.push((off, len));
            off += len;
        }
    };
    let mut cursor = 0u64;
    for &(s, e) in holes {
        let s = s.max(cursor).div_ceil(HOLE_ALIGN) * HOLE_ALIGN;
        let e = e.min(size) / HOLE_ALIGN * HOLE_ALIGN;
        if e < s || e - s < min_hole {
            continue;
        }
        data(&mut plan, cursor, s);
        let mut off = s;
        while off < e {
            let room = (e - off).min(chunk.max(HOLE_ALIGN));
            // The largest power-of-two MiB that fits (room is a multiple of 1 MiB).
            let len = HOLE_ALIGN << (63 - (room / HOLE_ALIGN).leading_zeros());
            plan.push((off, len));
            off += len;
        }
        cursor = e;
    }
    data(&mut plan, cursor, size);
    if plan.is_empty() {
        plan.push((0, 0)); // an empty file is one empty chunk
    }
    plan
}

/// A writer that hashes and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

const READ_BLOCK: usize = 4 << 20;

/// Read `len` bytes of `src` (the file `path`) from `offset` in [`READ_BLOCK`] pieces,
/// handing each to `f` and counting it in `progress`.
pub(crate) fn for_each_block(
    src: &File,
    path: &Path,
    offset: u64,
    len: u64,
    progress: &dyn Progress,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![
        0u8;
        READ_BLOCK
            .min(usize::try_from(len).unwrap_or(READ_BLOCK))
            .max(1)
    ];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + pos)
            .io("read", path)?;
        f(&buf[..n])?;
        pos += n as u64;
        progress.advance(n as u64);
    }
    Ok(())
}

/// Compress one chunk of a file with zstd into `out`, as independent frames of
/// [`FRAME`](crate::zstd_frames::FRAME) bytes that declare their size (a puller decodes each
/// straight into its buffer; any zstd decoder reads the concatenation as one stream).
fn zstd_chunk(
    path: &Path,
    offset: u64,
    len: u64,
    out: &Path,
    level: i32,
    progress: &dyn Progress,
) -> Result<Prepared> {
    use crate::zstd_frames::FRAME;
    let src = File::open(path).io("open", path)?;
    let dst = File::create(out).io("create", out)?;
    let mut hw = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, dst),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut enc = zstd::bulk::Compressor::new(level).io("compress", path)?;
    // Chunk contents are identified by BLAKE3 (see `content_digest`): a pull hashes every
    // decoded byte, and BLAKE3 does that at several times SHA-256's speed.
    let mut uh = ContentHasher::new(Algorithm::Blake3);
    let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(FRAME));
    let mut frames = Vec::new();
    // READ_BLOCK is a multiple of FRAME: every piece but a chunk's last is a whole frame.
    for_each_block(&src, path, offset, len, progress, |block| {
        uh.update(block);
        for piece in block.chunks(FRAME) {
            frame.clear();
            enc.compress_to_buffer(piece, &mut frame)
                .io("compress", path)?;
            hw.write_all(&frame).io("write", out)?;
            frames.push(FrameEntry {
                clen: frame.len() as u32,
                digest: *blake3::hash(piece).as_bytes(),
            });
        }
        Ok(())
    })?;
    hw.flush().io("write", out)?;
    Ok(Prepared {
        path: out.to_path_buf(),
        digest: format!("sha256:{}", hex::encode(hw.hasher.finalize())),
        size: hw.count,
        udigest: uh.finish(),
        staged: true,
        frames,
    })
}

/// Removes a temporary directory (a push's staging, a conversion's unpacked copy)
/// however the operation ends.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The name of Tart's own `config.json` in an image directory pulled from Tart (ours is
/// `config.json`); a Tart push sends it unchanged.
pub const TART_CONFIG_FILE: &str = "tart-config.json";

/// Compress one chunk of a file in Apple LZ4 framing (Tart's `disk.v2`) into `out`; the
/// content digest is sha256, as Tart checks it.
fn lz4_chunk(
    path: &Path,
    offset: u64,
    len: u64,
    out: &Path,
    progress: &dyn Progress,
) -> Result<Prepared> {
    let src = File::open(path).io("open", path)?;
    let dst = File::create(out).io("create", out)?;
    let hw = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, dst),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut enc = crate::tart::AppleLz4Writer::new(hw, crate::tart::BLOCK);
    let mut uh = Sha256::new();
    for_each_block(&src, path, offset, len, progress, |block| {
        uh.update(block);
        enc.write_all(block).io("write", out)
    })?;
    let hw = enc.finish().io("write", out)?;
    Ok(Prepared {
        path: out.to_path_buf(),
        digest: format!("sha256:{}", hex::encode(hw.hasher.finalize())),
        size: hw.count,
        udigest: format!("sha256:{}", hex::encode(uh.finalize())),
        staged: true,
        frames: Vec::new(),
    })
}

/// A file uploaded as it is (Tart's NVRAM layer): only hashed.
fn stored_file(path: &Path, progress: &dyn Progress) -> Result<Prepared> {
    let mut f = File::open(path).io("open", path)?;
    let mut h = HashingWriter {
        inner: std::io::sink(),
        hasher: Sha256::new(),
        count: 0,
    };
    std::io::copy(&mut f, &mut h).io("read", path)?;
    progress.advance(h.count);
    let digest = format!("sha256:{}", hex::encode(h.hasher.finalize()));
    Ok(Prepared {
        path: path.to_path_buf(),
        udigest: digest.clone(),
        digest,
        size: h.count,
        staged: false,
        frames: Vec::new(),
    })
}

/// Gzip a whole file as a series of members compressed on `threads` threads.
fn gzip_file(
    path: &Path,
    out: &Path,
    level: u32,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Prepared> {
    const MEMBER: usize = 4 << 20;
    let src = File::open(path).io("open", path)?;
    let size = src.metadata().io("stat", path)?.len();
    let dst = File::create(out).io("create", out)?;
    let mut hw = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, dst),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut uh = Sha256::new();
    let batch = threads.max(1) * 2;
    let mut inputs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; MEMBER]).collect();
    let mut pos = 0u64;
    loop {
        // Read a batch of members.
        let mut lens = Vec::with_capacity(batch);
        for b in inputs.iter_mut() {
            if pos >= size {
                break;
            }
            let n = (size - pos).min(MEMBER as u64) as usize;
            src.read_exact_at(&mut b[..n], pos).io("read", path)?;
            pos += n as u64;
            lens.push(n);
        }
        if lens.is_empty() && hw.count > 0 {
            break;
        }
        // Compress in parallel while this thread hashes the input.
        let outputs: Vec<std::io::Result<Vec<u8>>> = std::thread::scope(|s| {
            let per = lens.len().div_ceil(threads.max(1)).max(1);
            let handles: Vec<_> = inputs[..lens.len()]
                .chunks(per)
                .zip(lens.chunks(per))
                .map(|(ins, ls)| {
                    s.spawn(move || {
                        ins.iter()
                            .zip(ls)
                            .map(|(b, &n)| {
                                let mut e = flate2::write::GzEncoder::new(
                                    Vec::with_capacity(n / 2 + 64),
                                    flate2::Compression::new(level),
                                );
                                e.write_all(&b[..n])?;
                                e.finish()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for (b, &n) in inputs.iter().zip(&lens) {
                uh.update(&b[..n]);
            }
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![Err(std::io::Error::other("compressor panicked"))])
                })
                .collect()
        });
        if lens.is_empty() {
            // Empty file: one empty gzip member.
            let e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            hw.write_all(&e.finish().io("compress", path)?)
                .io("write", out)?;
            break;
        }
        for (o, &n) in outputs.into_iter().zip(&lens) {
            hw.write_all(&o.io("compress", path)?).io("write", out)?;
            progress.advance(n as u64);
        }
        if pos >= size {
            break;
        }
    }
    hw.flush().io("write", out)?;
    Ok(Prepared {
        path: out.to_path_buf(),
        digest: format!("sha256:{}", hex::encode(hw.hasher.finalize())),
        size: hw.count,
        udigest: format!("sha256:{}", hex::encode(uh.finalize())),
        staged: true,
        frames: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MIB: u64 = 1 << 20;

    fn assert_contiguous(plan: &[(u64, u64)], size: u64) {
        let mut next = 0;
        for &(off, len) in plan {
            assert_eq!(off, next, "{plan:?}");
            next = off + len;
        }
        assert_eq!(next, size, "{plan:?}");
    }

    #[test]
    fn holes_get_power_of_two_chunks_of_their_own() {
        // data 0..3.5M, hole 3.5M..17.2M, data ..20M, hole 20M..22M (too short), data ..30M
        let size = 30 * MIB;
        let holes = [(7 * MIB / 2, 172 * MIB / 10), (20 * MIB, 22 * MIB)];
        let plan = chunk_plan(&holes, size, 8 * MIB, 4 * MIB);
        assert_contiguous(&plan, size);
        assert_eq!(
            plan,
            vec![
                (0, 4 * MIB),       // data up to the hole, rounded up to 1 MiB
                (4 * MIB, 8 * MIB), // hole 4M..17M: 8 + 4 + 1 MiB
                (12 * MIB, 4 * MIB),
                (16 * MIB, MIB),
                (17 * MIB, 8 * MIB), // data (the short hole stays inside)
                (25 * MIB, 5 * MIB),
            ]
        );
        // No holes: the fixed grid; an empty file: one empty chunk.
        assert_eq!(
            chunk_plan(&[], 10 * MIB, 4 * MIB, MIN_HOLE),
            vec![(0, 4 * MIB), (4 * MIB, 4 * MIB), (8 * MIB, 2 * MIB)]
        );
        assert_eq!(chunk_plan(&[], 0, 4 * MIB, MIN_HOLE), vec![(0, 0)]);
        // A hole that runs to the end of the file.
        let plan = chunk_plan(&[(MIB, 12 * MIB + 5)], 12 * MIB + 5, 64 * MIB, MIN_HOLE);
        assert_contiguous(&plan, 12 * MIB + 5);
        assert_eq!(
            plan,
            vec![
                (0, MIB),
                (MIB, 8 * MIB),
                (9 * MIB, 2 * MIB),
                (11 * MIB, MIB),
                (12 * MIB, 5)
            ]
        );
    }

    #[test]
    fn holes_of_a_sparse_file_are_found() {
        let dir = tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(40 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 20 * MIB).unwrap();
        f.sync_all().unwrap();
        let h = holes(&f, 40 * MIB);
        // Filesystems without hole reporting say "all data": nothing to check there.
        if h.is_empty() {
            return;
        }
        let covered: u64 = h.iter().map(|(s, e)| e - s).sum();
        assert!(covered >= 38 * MIB, "{h:?}");
        assert!(h.iter().all(|&(s, e)| e <= 40 * MIB && s < e), "{h:?}");
        assert!(
            !h.iter()
                .any(|&(s, e)| s < 4096 || (s <= 20 * MIB && 20 * MIB < e)),
            "{h:?}"
        );
    }
}
