//! OCI image layouts (a directory with `oci-layout`, `index.json` and
//! `blobs/sha256/…`, as `skopeo`, `oras` and `crane` read and write them): a push
//! destination, and a source that [`unpack`] turns into an image directory with every
//! digest checked, so that images move between a registry and a directory (air-gapped
//! sites, archives) in any of the formats.
//!
//! On the command line a layout is `oci:PATH[:TAG]` (TAG defaults to `latest`); the tag
//! is the `org.opencontainers.image.ref.name` annotation of its entry in `index.json`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt as _;

use crate::error::{ImageError, IoContext as _, Result};
use crate::fetch::{BlobReader, Target, create_sparse, decode_part};
use crate::manifest::{Descriptor, Format, Manifest, parse_manifest, plan};
use crate::media_types as mt;

/// The annotation naming an index entry.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

/// A layout and a tag in it, as `oci:PATH[:TAG]` names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    /// The layout directory.
    pub path: PathBuf,
    /// The tag (`latest` when not given).
    pub tag: String,
}

impl LayoutRef {
    /// `oci:PATH[:TAG]`, or `None` when `s` does not start with `oci:`. A last `:` part
    /// that holds no `/` is the tag.
    pub fn parse(s: &str) -> Option<LayoutRef> {
        let rest = s.strip_prefix("oci:")?;
        let (path, tag) = match rest.rsplit_once(':') {
            Some((p, t)) if !t.is_empty() && !t.contains('/') && !p.is_empty() => (p, t),
            _ => (rest, "latest"),
        };
        Some(LayoutRef {
            path: PathBuf::from(path),
            tag: tag.to_string(),
        })
    }
}

impl std::fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci:{}:{}", self.path.display(), self.tag)
    }
}

fn invalid(root: &Path, reason: String) -> ImageError {
    ImageError::InvalidImageDir {
        path: root.to_path_buf(),
        reason,
    }
}

fn hex_of(root: &Path, digest: &str) -> Result<String> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h.to_string())
        }
        _ => Err(invalid(root, format!("invalid blob digest {digest:?}"))),
    }
}

/// Write `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.io("write", path)
}

impl OciLayout {
    /// Open the layout at `root`, creating it (`oci-layout`, an empty `index.json`) if
    /// the directory is missing or empty.
    pub fn create(root: &Path) -> Result<OciLayout> {
        std::fs::create_dir_all(root.join("blobs/sha256")).io("create", root)?;
        let marker = root.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            write_atomic(
                &index,
                serde_json::json!({"schemaVersion": 2, "mediaType": mt::OCI_INDEX, "manifests": []})
                    .to_string()
                    .as_bytes(),
            )?;
        }
        Self::open(root)
    }

    /// Open an existing layout.
    pub fn open(root: &Path) -> Result<OciLayout> {
        let marker = std::fs::read(root.join("oci-layout"))
            .map_err(|e| invalid(root, format!("not an OCI image layout (oci-layout: {e})")))?;
        let v: serde_json::Value = serde_json::from_slice(&marker)
            .map_err(|e| invalid(root, format!("oci-layout: {e}")))?;
        if v.get("imageLayoutVersion").and_then(|x| x.as_str()) != Some("1.0.0") {
            return Err(invalid(
                root,
                format!("unsupported image layout version in oci-layout: {v}"),
            ));
        }
        Ok(OciLayout {
            root: root.to_path_buf(),
        })
    }

    /// Where a blob lives (the digest checked, so no path leaves the layout).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("blobs/sha256")
            .join(hex_of(&self.root, digest)?))
    }

    /// Whether the layout holds a blob.
    pub fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self.blob_path(digest)?.is_file())
    }

    /// Add a blob from a file whose digest the caller computed; `movable` files (staged
    /// by a push) are renamed in, others copied.
    pub fn put_file(&self, digest: &str, src: &Path, movable: bool) -> Result<()> {
        let dst = self.blob_path(digest)?;
        if dst.is_file() {
            return Ok(());
        }
        if movable && std::fs::rename(src, &dst).is_ok() {
            return Ok(());
        }
        let tmp = dst.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
        let res = std::fs::copy(src, &tmp).and_then(|_| std::fs::rename(&tmp, &dst));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.io("write", &dst)
    }

    /// Add a blob held in memory.
    pub fn put_bytes(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.blob_path(digest)?;
        if dst.is_file() {
            return Ok(());
        }
        write_atomic(&dst, bytes)
    }

    fn index(&self) -> Result<serde_json::Value> {
        let p = self.root.join("index.json");
        let bytes = std::fs::read(&p).io("read", &p)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(&self.root, format!("index.json: {e}")))?;
        if !v.get("manifests").is_some_and(|m| m.is_array()) {
            return Err(invalid(&self.root, "index.json has no manifests".into()));
        }
        Ok(v)
    }

    /// Store a manifest and point `tag` at it (replacing the tag's earlier entry).
    pub fn put_manifest(&self, tag: &str, bytes: &[u8], media_type: &str) -> Result<String> {
        let digest = crate::registry::sha256_digest(bytes);
        self.put_bytes(&digest, bytes)?;
        let mut index = self.index()?;
        let entry = serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": bytes.len(),
            "annotations": {REF_NAME: tag},
        });
        if let Some(list) = index["manifests"].as_array_mut() {
            list.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag));
            list.push(entry);
        }
        write_atomic(&self.root.join("index.json"), index.to_string().as_bytes())?;
        Ok(digest)
    }

    /// The manifest `tag` names: its bytes (checked against their digest) and digest.
    pub fn manifest(&self, tag: &str) -> Result<(Vec<u8>, String)> {
        let index = self.index()?;
        let entries: Vec<&serde_json::Value> = index["manifests"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|m| m["annotations"][REF_NAME].as_str() == Some(tag))
                    .collect()
            })
            .unwrap_or_default();
        let [entry] = entries.as_slice() else {
            return Err(invalid(
                &self.root,
                format!("{} entries of index.json are tagged {tag:?}", entries.len()),
            ));
        };
        let digest = entry["digest"]
            .as_str()
            .ok_or_else(|| invalid(&self.root, "an index entry without digest".into()))?;
        let path = self.blob_path(digest)?;
        let meta = std::fs::metadata(&path).io("stat", &path)?;
        if meta.len() > 4 << 20 {
            return Err(invalid(
                &self.root,
                format!("manifest {digest} is {} bytes", meta.len()),
            ));
        }
        let bytes = std::fs::read(&path).io("read", &path)?;
        if crate::registry::sha256_digest(&bytes) != digest {
            return Err(ImageError::DigestMismatch {
                digest: digest.to_string(),
                file: "manifest".into(),
                reason: "the layout's copy hashes differently".into(),
            });
        }
        Ok((bytes, digest.to_string()))
    }
}

/// What [`unpack`] made.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The manifest's digest.
    pub digest: String,
    /// The image's format.
    pub format: Format,
    /// The manifest.
    pub manifest: Manifest,
}

/// Decode the image `tag` of the layout at `root` into the image directory `out`
/// (`config.json`, the files, `manifest.json`; Tart's config as `tart-config.json`),
/// checking every blob digest and every part's content digest as a pull does.
pub async fn unpack(root: &Path, tag: &str, out: &Path) -> Result<Unpacked> {
    let layout = OciLayout::open(root)?;
    let name = format!("oci:{}:{tag}", root.display());
    let (bytes, digest) = layout.manifest(tag)?;
    let manifest = parse_manifest(&bytes, &name)?;
    let plan = plan(&manifest, &name)?;
    std::fs::create_dir_all(out).io("create", out)?;
    // config.json
    let cfg = read_small(&layout, &plan.config)?;
    let cfg_file = if plan.format == Format::Tart {
        let ours = crate::tart::convert_config(&cfg).map_err(|e| invalid(root, e))?;
        let ours = serde_json::to_vec_pretty(&ours).map_err(|e| invalid(root, e.to_string()))?;
        write_atomic(&out.join("config.json"), &ours)?;
        crate::push::TART_CONFIG_FILE
    } else {
        "config.json"
    };
    write_atomic(&out.join(cfg_file), &cfg)?;
    for f in &plan.files {
        let path = out.join(f.role.file_name());
        let file = Arc::new(create_sparse(&path, f.size)?);
        for part in &f.parts {
            let target = Target {
                file: file.clone(),
                direct: None,
                name: f.role.file_name().to_string(),
                cancel: Arc::default(),
            };
            let blob = layout.blob_path(&part.desc.digest)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(4);
            let reader = BlobReader::new(rx, &part.desc.digest, part.desc.size, &target.name);
            let feeder = tokio::spawn(async move {
                let mut f = match tokio::fs::File::open(&blob).await.io("open", &blob) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                loop {
                    let mut buf = vec![0u8; 1 << 20];
                    match f.read(&mut buf).await.io("read", &blob) {
                        Ok(0) => return,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            });
            let part = part.clone();
            let decoded =
                tokio::task::spawn_blocking(move || decode_part(reader, &part, &target)).await;
            feeder.abort();
            decoded.map_err(|_| ImageError::Cancelled)??;
        }
        file.sync_all().io("sync", &path)?;
    }
    write_atomic(&out.join("manifest.json"), &bytes)?;
    Ok(Unpacked {
        digest,
        format: plan.format,
        manifest,
    })
}

/// A small blob (a config), checked against its descriptor.
fn read_small(layout: &OciLayout, d: &Descriptor) -> Result<Vec<u8>> {
    let path = layout.blob_path(&d.digest)?;
    if d.size > 4 << 20 {
        return Err(invalid(
            &layout.root,
            format!("config blob {} claims {} bytes", d.digest, d.size),
        ));
    }
    let bytes = std::fs::read(&path).io("read", &path)?;
    if bytes.len() as u64 != d.size || crate::registry::sha256_digest(&bytes) != d.digest {
        return Err(ImageError::DigestMismatch {
            digest: d.digest.clone(),
            file: "config.json".into(),
            reason: "the layout's copy does not match its descriptor".into(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn layout_references_parse() {
        let r = LayoutRef::parse("oci:/srv/images:sonoma").unwrap();
        assert_eq!(
            (r.path.to_str(), r.tag.as_str()),
            (Some("/srv/images"), "sonoma")
        );
        let r = LayoutRef::parse("oci:./out").unwrap();
        assert_eq!((r.path.to_str(), r.tag.as_str()), (Some("./out"), "latest"));
        assert_eq!(LayoutRef::parse("registry:5000/a:b"), None);
    }

    #[test]
    fn tags_are_replaced_and_digests_cannot_escape() {
        let d = tempfile::tempdir().unwrap();
        let l = OciLayout::create(d.path()).unwrap();
        let a = l
            .put_manifest("v1", b"{\"a\":1}", mt::OCI_MANIFEST)
            .unwrap();
        let b = l
            .put_manifest("v1", b"{\"b\":2}", mt::OCI_MANIFEST)
            .unwrap();
        l.put_manifest("v2", b"{\"a\":1}", mt::OCI_MANIFEST)
            .unwrap();
        assert_eq!(l.manifest("v1").unwrap().1, b);
        assert_eq!(l.manifest("v2").unwrap().1, a);
        assert!(l.manifest("v3").is_err());
        assert!(l.blob_path("sha256:../../etc/passwd").is_err());
        // A manifest changed on disk is caught.
        std::fs::write(l.blob_path(&b).unwrap(), b"{\"b\":3}").unwrap();
        assert!(l.manifest("v1").is_err());
        // Reopening finds it; a directory without oci-layout is not a layout.
        assert!(OciLayout::open(d.path()).is_ok());
        assert!(OciLayout::open(&d.path().join("blobs")).is_err());
    }
}
