//! Pulling an image's files into a directory: config first, then every part of every
//! file in parallel (bounded), each streamed, decoded and verified by [`crate::fetch`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::config::VmConfig;
use crate::content_digest::{self, Algorithm};
use crate::error::{ImageError, IoContext as _, Result};
use crate::fetch::{self, BlobReader, LocalChunk, Target};
use crate::manifest::{Format, MAX_CONFIG_BYTES, Plan};
use crate::progress::Progress;
use crate::registry::Registry;

/// Bytes of network data buffered per part (in ~16-64 KiB frames).
const CHANNEL_FRAMES: usize = 64;

/// Download, decode and verify every file of `plan` into `dir` (which must exist).
/// Writes `config.json`; returns the parsed config. Files are not fsynced.
///
/// A chunk whose content digest is in `local` (chunks of images pulled before) is copied
/// from there, verified, instead of downloaded; if that fails it is downloaded after all.
pub(crate) async fn pull_into(
    reg: Arc<Registry>,
    plan: &Plan,
    dir: &Path,
    concurrency: usize,
    progress: Arc<dyn Progress>,
    local: &HashMap<String, LocalChunk>,
) -> Result<VmConfig> {
    let config_bytes = fetch::fetch_small(
        &reg,
        &plan.config.digest,
        plan.config.size,
        MAX_CONFIG_BYTES,
    )
    .await?;
    progress.advance(plan.config.size);
    let config: VmConfig = match plan.format {
        Format::Tart => {
            std::fs::write(dir.join("tart-config.json"), &config_bytes)
                .io("write", dir.join("tart-config.json"))?;
            crate::tart::convert_config(&config_bytes).map_err(|reason| {
                ImageError::InvalidManifest {
                    reference: reg.registry().to_string(),
                    reason,
                }
            })?
        }
        _ => serde_json::from_slice(&config_bytes).map_err(|e| ImageError::InvalidManifest {
            reference: reg.registry().to_string(),
            reason: format!("config.json: {e}"),
        })?,
    };
    let config_path = dir.join("config.json");
    if plan.format == Format::Tart {
        let text = serde_json::to_vec_pretty(&config).map_err(|e| ImageError::InvalidManifest {
            reference: reg.registry().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::write(&config_path, text).io("write", &config_path)?;
    } else {
        std::fs::write(&config_path, &config_bytes).io("write", &config_path)?;
    }

    let cancel = Arc::new(AtomicBool::new(false));
    let mut targets = HashMap::new();
    for f in &plan.files {
        let path = dir.join(f.role.file_name());
        let file = fetch::create_sparse(&path, f.size)?;
        let direct = if opts_direct() {
            fetch::open_direct(&path).map(Arc::new)
        } else {
            None
        };
        targets.insert(
            f.role,
            Arc::new(Target {
                file: Arc::new(file),
                direct,
                name: f.role.file_name().to_string(),
                cancel: cancel.clone(),
            }),
        );
    }
    // Largest parts first, so the long tail is short.
    let mut jobs: Vec<_> = plan
        .files
        .iter()
        .flat_map(|f| f.parts.iter().map(move |p| (f.role, p.clone())))
        .collect();
    jobs.sort_by_key(|(_, p)| std::cmp::Reverse(p.desc.size));
    // A chunk whose declared content is all zeros needs no download: the sparse file
    // already reads as zeros there, which is exactly the declared content.
    let mut zero_digests: HashMap<(u64, Algorithm), String> = HashMap::new();
    let before = jobs.len();
    jobs.retain(|(_, p)| {
        if !p.encoding.is_chunk() {
            return true;
        }
        // Only a chunk that compresses more than 64:1 can be all zeros worth checking
        // (LZ4 tops out near 255:1); others are not hashed here.
        if p.desc.size.saturating_mul(64) >= p.size {
            return true;
        }
        let Ok(alg) = Algorithm::of(&p.digest) else {
            return true; // decoding reports the bad digest
        };
        let zd = zero_digests
            .entry((p.size, alg))
            .or_insert_with(|| content_digest::zeros(alg, p.size));
        if *zd == p.digest {
            progress.advance(p.desc.size);
            false
        } else {
            true
        }
    });
    if jobs.len() < before {
        tracing::debug!(
            skipped = before - jobs.len(),
            "all-zero chunks need no download"
        );
    }
    // Every started part runs to its end (or notices `cancel`) before this returns, so a
    // failed pull leaves no thread writing into files the caller is about to delete, and
    // the space they held is free when the error is reported.
    let first_error: Mutex<Option<ImageError>> = Mutex::new(None);
    let reused = std::sync::atomic::AtomicU64::new(0);
    let reused_bytes = std::sync::atomic::AtomicU64::new(0);
    futures::stream::iter(jobs)
        .for_each_concurrent(concurrency.max(1), |(role, part)| {
            let reg = reg.clone();
            let target = targets[&role].clone();
            let progress = progress.clone();
            let cancel = cancel.clone();
            let first_error = &first_error;
            let (reused, reused_bytes) = (&reused, &reused_bytes);
            let source = part
                .encoding
                .is_chunk()
                .then(|| local.get(&part.digest).cloned())
                .flatten();
            async move {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(src) = source {
                    let (p, t) = (part.clone(), target.clone());
                    let copied =
                        tokio::task::spawn_blocking(move || fetch::copy_local(&src, &p, &t)).await;
                    match copied {
                        Ok(Ok(())) => {
                            reused.fetch_add(1, Ordering::Relaxed);
                            reused_bytes.fetch_add(part.size, Ordering::Relaxed);
                            progress.advance(part.desc.size);
                            return;
                        }
                        Ok(Err(e)) => tracing::warn!(
                            file = %target.name,
                            offset = part.offset,
                            error = %e,
                            "could not reuse a cached chunk; downloading it"
                        ),
                        Err(e) => tracing::warn!(error = %e, "chunk copy task failed; downloading"),
                    }
                }
                let blob = part.desc.digest.clone();
                let reg2 = reg.clone();
                let res: Result<()> = async move {
                    let started = std::time::Instant::now();
                    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
                    let dl = tokio::spawn(fetch::download(
                        reg,
                        part.desc.digest.clone(),
                        part.desc.size,
                        tx,
                        progress,
                    ));
                    let reader =
                        BlobReader::new(rx, &part.desc.digest, part.desc.size, &target.name);
                    let (target_name, part_offset, part_size) =
                        (target.name.clone(), part.offset, part.desc.size);
                    let res = tokio::task::spawn_blocking(move || {
                        fetch::decode_part(reader, &part, &target)
                    })
                    .await
                    .map_err(|e| ImageError::Io {
                        op: "decode",
                        path: "part".into(),
                        source: std::io::Error::other(e),
                    })?;
                    dl.abort();
                    tracing::debug!(
                        file = %target_name,
                        offset = part_offset,
                        compressed = part_size,
                        ms = started.elapsed().as_millis() as u64,
                        "part done"
                    );
                    res
                }
                .await
                .map_err(|e| served_by(e, &blob, &reg2));
                if let Err(e) = res {
                    cancel.store(true, Ordering::Relaxed);
                    if let Ok(mut first) = first_error.lock()
                        && (first.is_none()
                            || matches!(first.as_ref(), Some(ImageError::Cancelled)))
                    {
                        *first = Some(e);
                    }
                }
            }
        })
        .await;
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let reused = reused.into_inner();
    if reused > 0 {
        tracing::info!(
            chunks = reused,
            bytes = reused_bytes.into_inner(),
            "chunks reused from images already in the cache"
        );
    }
    // Durability is the store's business (see `store::pull::persist`): fsync here would put
    // the disk's write bandwidth on the pull's critical path.
    Ok(config)
}

/// A blob or content digest that does not match names the host that sent the bytes
/// (a mirror's bad content is an error, never a reason to try elsewhere).
fn served_by(e: ImageError, blob: &str, reg: &Registry) -> ImageError {
    match e {
        ImageError::DigestMismatch {
            digest,
            file,
            reason,
        } => {
            let reason = match reg.served_by(blob) {
                Some(host) if digest == blob => format!("{reason} (served by {host})"),
                Some(host) => format!("{reason} (blob {blob} served by {host})"),
                None => reason,
            };
            ImageError::DigestMismatch {
                digest,
                file,
                reason,
            }
        }
        other => other,
    }
}

/// Whether pulls write through `O_DIRECT` (default yes; `VZK_PULL_DIRECT=0` turns it
/// off, for comparing in the benchmark).
fn opts_direct() -> bool {
    std::env::var("VZK_PULL_DIRECT").map_or(true, |v| v != "0")
}

/// Parts downloaded at once unless the caller says otherwise.
pub(crate) fn default_concurrency() -> usize {
    4
}
