//! OCI manifest types, and the checks that turn a manifest into a pull plan.
//!
//! [`plan`] is where every rule about a manifest lives: known media types only, one
//! family per image, safe titles, required annotations, contiguous chunks, size limits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, Result};
use crate::media_types::{self as mt, Encoding, Role};
use crate::reference::validate_digest;

/// Largest manifest we read (registries cap manifests at 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest config blob we read into memory.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest file we accept (16 TiB).
pub const MAX_FILE_BYTES: u64 = 16 << 40;

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`arm64`, `amd64`).
    pub architecture: String,
    /// OS (`darwin`, `linux`).
    pub os: String,
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// Embedded base64 data (the empty descriptor carries `e30=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Platform (on the config descriptor of our manifests and in indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations, sorted by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// One annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// The OCI empty descriptor, with a platform.
    pub fn empty_config(platform: Platform) -> Descriptor {
        Descriptor {
            media_type: mt::OCI_EMPTY.to_string(),
            digest: mt::OCI_EMPTY_DIGEST.to_string(),
            size: 2,
            data: Some(mt::OCI_EMPTY_DATA.to_string()),
            platform: Some(platform),
            annotations: None,
        }
    }
}

/// An OCI image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// `application/vnd.oci.image.manifest.v1+json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The artifact type (OCI 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Config descriptor.
    pub config: Descriptor,
    /// Layers.
    pub layers: Vec<Descriptor>,
    /// Manifest annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An OCI image index (we only pick a manifest from it).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

/// Which format an image is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// macOS-vz-kubelet: one gzip layer per file.
    Agoda,
    /// Ours: zstd chunks.
    Vzk,
    /// Tart: Apple-LZ4 disk chunks.
    Tart,
}

impl Format {
    /// `agoda`, `vzk` or `tart`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Agoda => "agoda",
            Format::Vzk => "vzk",
            Format::Tart => "tart",
        }
    }
}

/// One blob to fetch and where its decoded bytes go in a file.
#[derive(Debug, Clone)]
pub struct Part {
    /// The blob.
    pub desc: Descriptor,
    /// How it is encoded.
    pub encoding: Encoding,
    /// Offset of its decoded bytes in the file.
    pub offset: u64,
    /// Decoded size.
    pub size: u64,
    /// Digest of the decoded bytes: `sha256:<hex>`, or in the vzk format also
    /// `blake3:<hex>` (see [`crate::content_digest`]); for `Raw`, the blob digest.
    pub digest: String,
}

/// One file of the image.
#[derive(Debug, Clone)]
pub struct FilePlan {
    /// Which file.
    pub role: Role,
    /// Total size.
    pub size: u64,
    /// Its parts, in offset order, contiguous.
    pub parts: Vec<Part>,
}

/// Everything a pull needs to know, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Format.
    pub format: Format,
    /// The blob holding `config.json`.
    pub config: Descriptor,
    /// The other files (disk, aux, kernel, initrd), config excluded.
    pub files: Vec<FilePlan>,
    /// The disk's frame index (vzk images pushed with one), for lazy disks.
    pub frame_index: Option<Descriptor>,
}

impl Plan {
    /// Sum of compressed blob sizes (what a pull downloads at most).
    pub fn compressed_size(&self) -> u64 {
        self.config.size
            + self
                .files
                .iter()
                .flat_map(|f| &f.parts)
                .map(|p| p.desc.size)
                .sum::<u64>()
    }

    /// Sum of file sizes.
    pub fn uncompressed_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// One file's plan.
    pub fn file(&self, role: Role) -> Option<&FilePlan> {
        self.files.iter().find(|f| f.role == role)
    }
}

/// Parse manifest bytes, refusing anything that is not an OCI image manifest.
pub fn parse_manifest(bytes: &[u8], reference: &str) -> Result<Manifest> {
    let invalid = |reason: String| ImageError::InvalidManifest {
        reference: reference.to_string(),
        reason,
    };
    let m: Manifest =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a valid manifest: {e}")))?;
    if m.schema_version != 2 {
        return Err(invalid(format!(
            "schemaVersion {} (want 2)",
            m.schema_version
        )));
    }
    match m.media_type.as_deref() {
        None | Some(mt::OCI_MANIFEST) => {}
        Some(other) => {
            return Err(invalid(format!(
                "manifest media type {other:?} is not an OCI image manifest"
            )));
        }
    }
    Ok(m)
}

/// Is a layer title safe to use as a file name in one directory?
pub fn check_title(title: &str) -> std::result::Result<(), String> {
    if title.is_empty()
        || title == "."
        || title == ".."
        || title.contains(['/', '\\', '\0'])
        || title.len() > 255
    {
        return Err(format!("layer title {title:?} is not a plain file name"));
    }
    Ok(())
}

fn parse_u64(d: &Descriptor, key: &str) -> std::result::Result<u64, String> {
    let v = d
        .annotation(key)
        .ok_or_else(|| format!("layer {} lacks the annotation {key}", d.digest))?;
    v.parse::<u64>()
        .map_err(|_| format!("layer {}: annotation {key}={v:?} is not a number", d.digest))
}

/// Check a manifest and derive the pull plan.
pub fn plan(m: &Manifest, reference: &str) -> Result<Plan> {
    let invalid = |reason: String| ImageError::InvalidManifest {
        reference: reference.to_string(),
        reason,
    };
    if m.layers.len() > 100_000 {
        return Err(invalid(format!("{} layers is too many", m.layers.len())));
    }
    for d in m.layers.iter().chain(std::iter::once(&m.config)) {
        validate_digest(&d.digest).map_err(&invalid)?;
        if let Some(t) = d.annotation(mt::ANNOTATION_TITLE) {
            check_title(t).map_err(&invalid)?;
        }
    }
    // The family: from the artifact type, the config, or the layers.
    let mut format = match m.artifact_type.as_deref() {
        Some(mt::AGODA_ARTIFACT) => Some(Format::Agoda),
        Some(mt::VZK_ARTIFACT) => Some(Format::Vzk),
        _ => None,
    };
    let mut config: Option<Descriptor> = None;
    if m.config.media_type == mt::AGODA_CONFIG {
        // Layout B: the config blob is the manifest config.
        config = Some(m.config.clone());
        format.get_or_insert(Format::Agoda);
    }
    let mut by_role: BTreeMap<Role, Vec<(Encoding, &Descriptor)>> = BTreeMap::new();
    let mut frame_index: Option<Descriptor> = None;
    for d in &m.layers {
        if d.media_type == mt::VZK_DISK_FRAMES {
            if frame_index.is_some() {
                return Err(invalid("more than one frame-index layer".into()));
            }
            if d.size > crate::frame_index::MAX_INDEX_BYTES {
                return Err(invalid(format!(
                    "a frame index of {} bytes is too large",
                    d.size
                )));
            }
            frame_index = Some(d.clone());
            continue;
        }
        let (role, enc) =
            mt::classify(&d.media_type).ok_or_else(|| ImageError::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: d.media_type.clone(),
            })?;
        let family = if d.media_type.starts_with("application/vnd.agoda.") {
            Format::Agoda
        } else if d.media_type.starts_with("application/vnd.vz-kubelet.") {
            Format::Vzk
        } else {
            Format::Tart
        };
        match format {
            None => format = Some(family),
            Some(f) if f != family => {
                return Err(invalid(format!(
                    "layer media type {} does not belong to the {} format",
                    d.media_type,
                    f.as_str()
                )));
            }
            Some(_) => {}
        }
        if role == Role::Config {
            if config.is_some() {
                return Err(invalid("more than one config.json layer".into()));
            }
            config = Some(d.clone());
        } else {
            by_role.entry(role).or_default().push((enc, d));
        }
    }
    let format = format.ok_or_else(|| invalid("no VM image layers".into()))?;
    let config = config.ok_or_else(|| invalid("no config.json layer".into()))?;
    if config.size > MAX_CONFIG_BYTES {
        return Err(invalid(format!(
            "config.json of {} bytes is too large",
            config.size
        )));
    }
    let mut files = Vec::new();
    for (role, layers) in by_role {
        let file = match format {
            Format::Agoda => agoda_file(role, &layers).map_err(&invalid)?,
            Format::Vzk => vzk_file(role, &layers).map_err(&invalid)?,
            Format::Tart => tart_file(role, &layers).map_err(&invalid)?,
        };
        if file.size > MAX_FILE_BYTES {
            return Err(invalid(format!(
                "{} of {} bytes is too large",
                role.file_name(),
                file.size
            )));
        }
        files.push(file);
    }
    if !files.iter().any(|f| f.role == Role::Disk) {
        return Err(invalid("no disk layer".into()));
    }
    if format == Format::Agoda && !files.iter().any(|f| f.role == Role::Aux) {
        return Err(invalid("no aux.img layer".into()));
    }
    if frame_index.is_some() && format != Format::Vzk {
        return Err(invalid(format!(
            "a frame index in an image of the {} format",
            format.as_str()
        )));
    }
    Ok(Plan {
        format,
        config,
        files,
        frame_index,
    })
}

fn agoda_file(
    role: Role,
    layers: &[(Encoding, &Descriptor)],
) -> std::result::Result<FilePlan, String> {
    let [(enc, d)] = layers else {
        return Err(format!(
            "{} layers for {} (want one)",
            layers.len(),
            role.file_name()
        ));
    };
    let digest = d.annotation(mt::AGODA_UNCOMPRESSED_DIGEST);
    let size = d.annotation(mt::AGODA_UNCOMPRESSED_SIZE);
    let part = match (digest, size) {
        (Some(digest), Some(_)) => {
            validate_digest(digest)?;
            let size = parse_u64(d, mt::AGODA_UNCOMPRESSED_SIZE)?;
            Part {
                desc: (*d).clone(),
                encoding: *enc,
                offset: 0,
                size,
                digest: digest.to_string(),
            }
        }
        // macOS-vz-kubelet's "plain path": a blob without the annotations is the file itself.
        (None, None) => Part {
            desc: (*d).clone(),
            encoding: Encoding::Raw,
            offset: 0,
            size: d.size,
            digest: d.digest.clone(),
        },
        _ => {
            return Err(format!(
                "layer {} has only one of the uncompressed-* annotations",
                d.digest
            ));
        }
    };
    Ok(FilePlan {
        role,
        size: part.size,
        parts: vec![part],
    })
}

fn vzk_file(
    role: Role,
    layers: &[(Encoding, &Descriptor)],
) -> std::result::Result<FilePlan, String> {
    let name = role.file_name();
    let mut parts = Vec::with_capacity(layers.len());
    let mut file_size = None;
    let mut next = 0u64;
    for (enc, d) in layers {
        if d.annotation(mt::ANNOTATION_TITLE) != Some(name) {
            return Err(format!(
                "chunk {} of {name} must have the title {name:?}",
                d.digest
            ));
        }
        let fs = parse_u64(d, mt::VZK_FILE_SIZE)?;
        if *file_size.get_or_insert(fs) != fs {
            return Err(format!("chunks of {name} disagree on the file size"));
        }
        let offset = parse_u64(d, mt::VZK_CHUNK_OFFSET)?;
        let size = parse_u64(d, mt::VZK_UNCOMPRESSED_SIZE)?;
        let digest = d
            .annotation(mt::VZK_UNCOMPRESSED_DIGEST)
            .ok_or_else(|| format!("chunk {} lacks {}", d.digest, mt::VZK_UNCOMPRESSED_DIGEST))?;
        crate::content_digest::Algorithm::of(digest)?;
        if offset != next {
            return Err(format!(
                "chunk of {name} at offset {offset}, expected {next} (chunks must be contiguous, in order)"
            ));
        }
        next = offset.checked_add(size).ok_or("chunk offset overflows")?;
        parts.push(Part {
            desc: (*d).clone(),
            encoding: *enc,
            offset,
            size,
            digest: digest.to_string(),
        });
    }
    let size = file_size.unwrap_or(0);
    if next != size {
        return Err(format!(
            "chunks of {name} cover {next} bytes, the file has {size}"
        ));
    }
    Ok(FilePlan { role, size, parts })
}

fn tart_file(
    role: Role,
    layers: &[(Encoding, &Descriptor)],
) -> std::result::Result<FilePlan, String> {
    let mut parts = Vec::with_capacity(layers.len());
    let mut offset = 0u64;
    for (enc, d) in layers {
        let part = match enc {
            Encoding::AppleLz4Chunk => {
                let size = parse_u64(d, mt::TART_UNCOMPRESSED_SIZE)?;
                let digest = d.annotation(mt::TART_UNCOMPRESSED_DIGEST).ok_or_else(|| {
                    format!(
                        "disk layer {} lacks {}",
                        d.digest,
                        mt::TART_UNCOMPRESSED_DIGEST
                    )
                })?;
                validate_digest(digest)?;
                Part {
                    desc: (*d).clone(),
                    encoding: *enc,
                    offset,
                    size,
                    digest: digest.to_string(),
                }
            }
            _ => {
                if layers.len() != 1 {
                    return Err(format!("{} layers for {}", layers.len(), role.file_name()));
                }
                Part {
                    desc: (*d).clone(),
                    encoding: *enc,
                    offset,
                    size: d.size,
                    digest: d.digest.clone(),
                }
            }
        };
        offset = offset.checked_add(part.size).ok_or("disk size overflows")?;
        parts.push(part);
    }
    Ok(FilePlan {
        role,
        size: offset,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference example manifest, verbatim.
    pub(crate) const AGODA_EXAMPLE: &str = r#"{
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "artifactType": "application/vnd.agoda.macosvz.artifact",
    "config": {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2,
        "data": "e30=",
        "platform": { "architecture": "arm64", "os": "darwin" }
    },
    "layers": [
        {
            "mediaType": "application/vnd.agoda.macosvz.disk.image.v1",
            "digest": "sha256:b925c33d73f29ec2875a9e0019623baddfa42737d33033502b77981cd53a77b4",
            "size": 16910689013,
            "annotations": {
                "com.agoda.macosvz.content.uncompressed-digest": "sha256:8989efbfa94a0f7bd956c84a4b907eec187c1576703ad7232b99272392202b93",
                "com.agoda.macosvz.content.uncompressed-size": "137438953472",
                "org.opencontainers.image.title": "disk.img"
            }
        },
        {
            "mediaType": "application/vnd.agoda.macosvz.aux.image.v1",
            "digest": "sha256:eed3927d4d07a5f9407141d3d9ef3138c2c8390333ee4579f4d64ac4fe22c0c3",
            "size": 422272,
            "annotations": {
                "com.agoda.macosvz.content.uncompressed-digest": "sha256:25ada7e013410ce7d66d287c243167ab597a91cb51a275108cc54bc57c9242ba",
                "com.agoda.macosvz.content.uncompressed-size": "33570816",
                "org.opencontainers.image.title": "aux.img"
            }
        },
        {
            "mediaType": "application/vnd.agoda.macosvz.config.v1+json",
            "digest": "sha256:f3175f197a96effb29cc535ebb3b4e2953802af5988fb918aa9ca69096accf68",
            "size": 562,
            "annotations": { "org.opencontainers.image.title": "config.json" }
        }
    ],
    "annotations": { "org.opencontainers.image.created": "2024-04-26T11:30:28Z" }
}"#;

    #[test]
    fn plans_the_reference_example() {
        let m = parse_manifest(AGODA_EXAMPLE.as_bytes(), "ex").expect("parses");
        let p = plan(&m, "ex").expect("plans");
        assert_eq!(p.format, Format::Agoda);
        assert_eq!(p.config.size, 562);
        let disk = p.file(Role::Disk).expect("disk");
        assert_eq!(disk.size, 137438953472);
        assert_eq!(disk.parts[0].encoding, Encoding::Gzip);
        assert_eq!(p.file(Role::Aux).expect("aux").size, 33570816);
        // Re-serialising keeps every field (byte-compatible writer).
        let again: serde_json::Value = serde_json::to_value(&m).expect("ser");
        let orig: serde_json::Value = serde_json::from_str(AGODA_EXAMPLE).expect("json");
        assert_eq!(again, orig);
    }

    #[test]
    fn refuses_bad_manifests() {
        let cases: &[(&str, &str, &str)] = &[
            ("disk.img\"", "../disk.img\"", "not a plain file name"),
            (
                "application/vnd.agoda.macosvz.aux.image.v1",
                "application/x-unknown",
                "unsupported layer media type",
            ),
            (
                "\"schemaVersion\": 2",
                "\"schemaVersion\": 1",
                "schemaVersion 1",
            ),
            ("\"137438953472\"", "\"lots\"", "is not a number"),
        ];
        for (from, to, want) in cases {
            let text = AGODA_EXAMPLE.replacen(from, to, 1);
            let err = parse_manifest(text.as_bytes(), "ex")
                .and_then(|m| plan(&m, "ex"))
                .expect_err(to);
            assert!(err.to_string().contains(want), "{to}: {err}");
        }
        let truncated = &AGODA_EXAMPLE[..AGODA_EXAMPLE.len() / 2];
        let err = parse_manifest(truncated.as_bytes(), "ex").expect_err("truncated");
        assert!(err.to_string().contains("not a valid manifest"), "{err}");
    }
}
