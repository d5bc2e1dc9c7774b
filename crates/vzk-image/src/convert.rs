//! Converting an image between formats and references, and checking that a pushed
//! image declares exactly the content of a local one.

use std::fs::File;
use std::path::Path;

use crate::content_digest::{Algorithm, ContentHasher};
use crate::error::{ImageError, IoContext as _, Result};
use crate::layout::LayoutRef;
use crate::manifest::Format;
use crate::media_types::{self as mt, Role};
use crate::progress::NoProgress;
pub use crate::push::Destination;
use crate::push::{PushOptions, PushReport, RemoveOnDrop, Sink, for_each_block, push_to};
use crate::reference::Reference;
use crate::registry::RegistryOptions;
use crate::store::{ImageStore, PullOptions};

/// Where a conversion reads.
#[derive(Debug, Clone)]
pub enum Source {
    /// A registry (pulled into the cache).
    Registry(Reference),
    /// An OCI image layout (unpacked into a temporary directory of the cache).
    Layout(LayoutRef),
}

impl Source {
    /// `oci:PATH[:TAG]` is a layout, anything else a registry reference.
    pub fn parse(s: &str) -> Result<Source> {
        Ok(match LayoutRef::parse(s) {
            Some(l) => Source::Layout(l),
            None => Source::Registry(Reference::parse(s)?),
        })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Registry(r) => r.fmt(f),
            Source::Layout(l) => l.fmt(f),
        }
    }
}

impl Destination {
    /// `oci:PATH[:TAG]` is a layout, anything else a registry reference.
    pub fn parse(s: &str) -> Result<Destination> {
        Ok(match LayoutRef::parse(s) {
            Some(l) => Destination::Layout(l),
            None => Destination::Registry(Reference::parse(s)?),
        })
    }
}

/// What [`convert`] did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConvertReport {
    /// The source's manifest digest.
    pub source_digest: String,
    /// The source's format.
    pub source_format: Format,
    /// The push to the destination.
    pub push: PushReport,
    /// The check of the destination against the content (unless skipped).
    pub verified: Option<Verified>,
}

/// Copy the image `src` to `dst` in `push.format`: pull it into `store` (verified
/// against its own digests, kept pinned meanwhile), push the cached directory, then
/// (when `check`) [`verify`] the destination against the same files. The decoded
/// content of every file is the same on both sides; only `config.json` is rewritten for
/// the target format (Tart's own config is kept when the source was Tart).
pub async fn convert(
    store: &ImageStore,
    src: &Source,
    pull: &PullOptions,
    dst: &Destination,
    push: &PushOptions,
    check: bool,
) -> Result<ConvertReport> {
    let (dir, digest, format, _pin, _tmp) = match src {
        Source::Registry(r) => {
            let pulled = store.pull(r, pull).await?;
            let pin = store.pin(&pulled)?;
            (pulled.dir, pulled.digest, pulled.format, Some(pin), None)
        }
        Source::Layout(l) => {
            let tmp = store
                .root()
                .join("tmp")
                .join(format!("unpack-{:08x}", rand::random::<u32>()));
            let guard = RemoveOnDrop(tmp.clone());
            let u = crate::layout::unpack(&l.path, &l.tag, &tmp).await?;
            (tmp, u.digest, u.format, None, Some(guard))
        }
    };
    let report = push_to(&dir, dst, push).await?;
    let verified = if check {
        Some(verify_at(&dir, dst, &push.registry).await?)
    } else {
        None
    };
    Ok(ConvertReport {
        source_digest: digest,
        source_format: format,
        push: report,
        verified,
    })
}

/// What [`verify`] checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    /// The manifest digest checked.
    pub digest: String,
    /// The image's format there.
    pub format: Format,
    /// Files compared (disk, aux, kernel, initrd).
    pub files: usize,
    /// Parts whose declared content digest was recomputed from the local file.
    pub parts: usize,
    /// Bytes hashed.
    pub bytes: u64,
}

/// Check that the image at `reference` declares exactly the content of the image
/// directory `dir`: the same files with the same sizes, and every part's declared
/// content digest (sha256 or BLAKE3, whatever the format uses) equal to the digest of the
/// local bytes at that part's offset. The registry must also hold every blob the
/// manifest names. Used after a push or a conversion: what a puller of `reference`
/// verifies against is then what `dir` holds. (`config.json` is left out: a conversion
/// rewrites it by design.)
pub async fn verify(dir: &Path, reference: &Reference, opts: &RegistryOptions) -> Result<Verified> {
    verify_at(dir, &Destination::Registry(reference.clone()), opts).await
}

/// [`verify`] for a registry or an OCI image layout.
pub async fn verify_at(dir: &Path, dest: &Destination, opts: &RegistryOptions) -> Result<Verified> {
    let name = dest.to_string();
    let mismatch = move |reason: String| ImageError::InvalidManifest {
        reference: name.clone(),
        reason,
    };
    let name = dest.to_string();
    let (store, _) = Sink::open(dest, opts, false)?;
    let (bytes, digest) = store.manifest(dest).await?;
    let m = crate::manifest::parse_manifest(&bytes, &name)?;
    let plan = crate::manifest::plan(&m, &name)?;
    let mut blobs: Vec<&str> = plan
        .files
        .iter()
        .flat_map(|f| f.parts.iter().map(|p| p.desc.digest.as_str()))
        .chain([plan.config.digest.as_str(), m.config.digest.as_str()])
        .collect();
    blobs.sort_unstable();
    blobs.dedup();
    for b in blobs {
        if b != mt::OCI_EMPTY_DIGEST && !store.has_blob(b).await? {
            return Err(mismatch(format!("it lacks blob {b}")));
        }
    }
    let mut local: Vec<Role> = [Role::Disk, Role::Aux, Role::Kernel, Role::Initrd]
        .into_iter()
        .filter(|r| dir.join(r.file_name()).is_file())
        .collect();
    local.sort_by_key(|r| r.file_name());
    let mut remote: Vec<Role> = plan.files.iter().map(|f| f.role).collect();
    remote.sort_by_key(|r| r.file_name());
    if local != remote {
        return Err(mismatch(format!(
            "it holds {remote:?}, the local image {local:?}"
        )));
    }
    let files = plan.files.clone();
    let dir = dir.to_path_buf();
    let (parts, bytes) = tokio::task::spawn_blocking(move || -> Result<(usize, u64)> {
        let (mut parts, mut bytes) = (0usize, 0u64);
        for f in &files {
            let path = dir.join(f.role.file_name());
            let file = File::open(&path).io("open", &path)?;
            let size = file.metadata().io("stat", &path)?.len();
            if size != f.size {
                return Err(mismatch(format!(
                    "{} is {} bytes there, {size} here",
                    f.role.file_name(),
                    f.size
                )));
            }
            for p in &f.parts {
                let alg = Algorithm::of(&p.digest).map_err(&mismatch)?;
                let mut h = ContentHasher::new(alg);
                for_each_block(&file, &path, p.offset, p.size, &NoProgress, |block| {
                    h.update(block);
                    Ok(())
                })?;
                let got = h.finish();
                if got != p.digest {
                    return Err(mismatch(format!(
                        "{} bytes {}..{} are {got} here, {} there",
                        f.role.file_name(),
                        p.offset,
                        p.offset + p.size,
                        p.digest
                    )));
                }
                parts += 1;
                bytes += p.size;
            }
        }
        Ok((parts, bytes))
    })
    .await
    .map_err(|_| ImageError::Cancelled)??;
    Ok(Verified {
        digest,
        format: plan.format,
        files: remote.len(),
        parts,
        bytes,
    })
}
