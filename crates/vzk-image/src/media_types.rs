//! Every media type, artifact type and annotation this crate reads or writes.
//!
//! Three families of VM image are understood. All are OCI image manifests
//! (`application/vnd.oci.image.manifest.v1+json`, schemaVersion 2) whose layers are the
//! files of a VM directory; the layer media type says which file (its *role*) and how it
//! is encoded, the `org.opencontainers.image.title` annotation names the file.
//!
//! # 1. macOS-vz-kubelet ("agoda") format: read and write, byte-compatible
//!
//! | what | value |
//! |---|---|
//! | manifest `artifactType` | `application/vnd.agoda.macosvz.artifact` ([`AGODA_ARTIFACT`]) |
//! | manifest `config` | layout A (push tool): the OCI empty descriptor ([`OCI_EMPTY`], digest [`OCI_EMPTY_DIGEST`], size 2, `data: "e30="`) with `platform {architecture: arm64, os: darwin}`; layout B (e2e helper): the `config.json` blob itself |
//! | disk layer | `application/vnd.agoda.macosvz.disk.image.v1` ([`AGODA_DISK`]), title `disk.img`, one gzip stream |
//! | aux (NVRAM) layer | `application/vnd.agoda.macosvz.aux.image.v1` ([`AGODA_AUX`]), title `aux.img`, one gzip stream |
//! | config layer | `application/vnd.agoda.macosvz.config.v1+json` ([`AGODA_CONFIG`]), title `config.json`, stored uncompressed |
//! | uncompressed digest | annotation `com.agoda.macosvz.content.uncompressed-digest` ([`AGODA_UNCOMPRESSED_DIGEST`]) |
//! | uncompressed size | annotation `com.agoda.macosvz.content.uncompressed-size` ([`AGODA_UNCOMPRESSED_SIZE`]), decimal string |
//!
//! Layer `digest`/`size` are those of the gzip blob; the annotations those of the file.
//! We write gzip as a sequence of gzip *members* (compressed in parallel); every gzip
//! decoder, including Go's `compress/gzip` used by macOS-vz-kubelet, reads concatenated
//! members as one stream.
//!
//! # 2. vz-kubelet format ("vzk"): read and write; macOS and Linux flavours
//!
//! Our own format. Every file is cut into fixed-size chunks (default
//! [`DEFAULT_CHUNK_SIZE`], 64 MiB; the last chunk may be shorter); each chunk is one
//! layer, compressed on its own with zstd, so a pull downloads and decompresses chunks in
//! parallel, resumes per chunk, writes all-zero blocks as holes, and reuses chunks it
//! already has by their uncompressed digest. Identical chunks (e.g. all-zero ones) have
//! identical blobs and are uploaded once.
//!
//! | what | value |
//! |---|---|
//! | manifest `artifactType` | `application/vnd.vz-kubelet.vm.v1` ([`VZK_ARTIFACT`]) |
//! | manifest `config` | the OCI empty descriptor ([`OCI_EMPTY`]) with `platform {architecture, os}` of the guest |
//! | config layer | `application/vnd.vz-kubelet.vm.config.v1+json` ([`VZK_CONFIG`]), title `config.json`, uncompressed, **must be the first layer** |
//! | disk chunks | `application/vnd.vz-kubelet.vm.disk.v1+zstd` ([`VZK_DISK`]), title `disk.img` |
//! | aux/NVRAM chunks (macOS; EFI vars) | `application/vnd.vz-kubelet.vm.aux.v1+zstd` ([`VZK_AUX`]), title `aux.img` |
//! | kernel chunks (Linux) | `application/vnd.vz-kubelet.vm.kernel.v1+zstd` ([`VZK_KERNEL`]), title `kernel` |
//! | initrd chunks (Linux, optional) | `application/vnd.vz-kubelet.vm.initrd.v1+zstd` ([`VZK_INITRD`]), title `initrd` |
//!
//! | disk frame index (optional; lazy disks) | `application/vnd.vz-kubelet.vm.disk.frames.v1` ([`VZK_DISK_FRAMES`]), title `disk.frames`, binary, see [`crate::frame_index`]; at most one, the last layer |
//!
//! Annotations on every chunk layer (all required, decimal strings for numbers):
//!
//! | annotation | meaning |
//! |---|---|
//! | `io.github.vz-kubelet.chunk.offset` ([`VZK_CHUNK_OFFSET`]) | byte offset of the chunk in the file; a multiple of the chunk size |
//! | `io.github.vz-kubelet.content.uncompressed-size` ([`VZK_UNCOMPRESSED_SIZE`]) | bytes of the chunk once decompressed |
//! | `io.github.vz-kubelet.content.uncompressed-digest` ([`VZK_UNCOMPRESSED_DIGEST`]) | `blake3:<hex>` (BLAKE3-256) of the decompressed chunk as we push it; `sha256:<hex>` is read too (see [`crate::content_digest`]) |
//! | `io.github.vz-kubelet.file.size` ([`VZK_FILE_SIZE`]) | size of the whole file; the same on every chunk of a file |
//! | `org.opencontainers.image.title` | the file name (see table above) |
//!
//! Chunks of one file are listed in offset order, contiguous, covering the whole file
//! (a zero-length file has one empty chunk). The manifest carries the annotation
//! `io.github.vz-kubelet.vm.os` ([`VZK_OS`], `darwin` or `linux`) and
//! `org.opencontainers.image.created`.
//!
//! The config layer (`config.json`) is a JSON object ([`crate::config::VmConfig`]):
//!
//! | field | flavour | meaning |
//! |---|---|---|
//! | `mediatype` | both | [`VZK_CONFIG`] (or [`AGODA_CONFIG`] in the agoda format) |
//! | `os` | both | `darwin` or `linux` |
//! | `arch` | both | `arm64` or `amd64` (optional; default `arm64` for darwin, `amd64` for linux) |
//! | `hardwareModelData`, `machineIdData` | macOS | base64 `VZMacHardwareModel` / `VZMacMachineIdentifier` data, as in the agoda format |
//! | `kernelCmdline` | Linux | the kernel command line, e.g. `console=ttyS0 root=/dev/vda rw` |
//! | `cpus` | both (optional) | default vCPU count |
//! | `memoryBytes` | both (optional) | default memory in bytes |
//! | `minCpus` | both (optional) | fewest vCPUs the guest runs with (Tart's `cpuCountMin`); a smaller request is refused |
//! | `minMemoryBytes` | both (optional) | least memory in bytes (Tart's `memorySizeMin`) |
//! | `storage` | both | `[{"mediatype": <layer media type>, "file": <title>}]`, informational |
//!
//! A macOS image has `disk.img`, `aux.img`, `config.json`; a Linux image has `kernel`,
//! `disk.img`, `config.json` and optionally `initrd` (and `aux.img` for an EFI variable
//! store). Unknown fields in `config.json` are kept and ignored.
//!
//! # 3. Tart format: read and write
//!
//! | what | value |
//! |---|---|
//! | manifest `config` | `application/vnd.oci.image.config.v1+json` stub (ignored on pull; a push writes `architecture`, `os` and the label `org.cirruslabs.tart.disk.format` = `raw`, as Tart does) |
//! | VM config layer | `application/vnd.cirruslabs.tart.config.v1` ([`TART_CONFIG`]) → `config.json` |
//! | disk layers | `application/vnd.cirruslabs.tart.disk.v2` ([`TART_DISK_V2`]), 512 MiB chunks in disk order, Apple LZ4 block framing (`bv41`/`bv4-`/`bv4$`) → `disk.img` |
//! | NVRAM layer | `application/vnd.cirruslabs.tart.nvram.v1` ([`TART_NVRAM`]) → `aux.img` |
//! | per-disk-layer annotations | `org.cirruslabs.tart.uncompressed-size` ([`TART_UNCOMPRESSED_SIZE`]), `org.cirruslabs.tart.uncompressed-content-digest` ([`TART_UNCOMPRESSED_DIGEST`]) |
//! | manifest annotations | `org.cirruslabs.tart.uncompressed-disk-size` ([`TART_UNCOMPRESSED_DISK_SIZE`]), `org.cirruslabs.tart.upload-time` ([`TART_UPLOAD_TIME`], written on push) |
//!
//! # Local layout of a pulled image
//!
//! Whatever the format, a pulled image is a directory holding `config.json` plus
//! `disk.img` and `aux.img` (macOS) or `kernel`, optional `initrd`, `disk.img` (Linux),
//! and `manifest.json` (the manifest bytes as pulled).

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type (a multi-platform list; we pick a platform from it).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest (accepted only to give a clear "not a VM image" error).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The OCI empty descriptor's media type.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Digest of the two bytes `{}`.
pub const OCI_EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Base64 of `{}`, the `data` field of the empty descriptor.
pub const OCI_EMPTY_DATA: &str = "e30=";
/// OCI image config (Tart's stub config).
pub const OCI_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Standard file-name annotation.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// Standard creation-time annotation.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// agoda: manifest artifact type.
pub const AGODA_ARTIFACT: &str = "application/vnd.agoda.macosvz.artifact";
/// agoda: raw boot disk, gzip.
pub const AGODA_DISK: &str = "application/vnd.agoda.macosvz.disk.image.v1";
/// agoda: auxiliary storage (NVRAM), gzip.
pub const AGODA_AUX: &str = "application/vnd.agoda.macosvz.aux.image.v1";
/// agoda: VM config, uncompressed JSON.
pub const AGODA_CONFIG: &str = "application/vnd.agoda.macosvz.config.v1+json";
/// agoda: digest of the uncompressed file.
pub const AGODA_UNCOMPRESSED_DIGEST: &str = "com.agoda.macosvz.content.uncompressed-digest";
/// agoda: size of the uncompressed file (decimal).
pub const AGODA_UNCOMPRESSED_SIZE: &str = "com.agoda.macosvz.content.uncompressed-size";
/// agoda: declared by macOS-vz-kubelet but never used; ignored.
pub const AGODA_CONTENT_DIGEST: &str = "com.agoda.macosvz.content.digest";

/// vzk: manifest artifact type.
pub const VZK_ARTIFACT: &str = "application/vnd.vz-kubelet.vm.v1";
/// vzk: VM config, uncompressed JSON.
pub const VZK_CONFIG: &str = "application/vnd.vz-kubelet.vm.config.v1+json";
/// vzk: a zstd chunk of `disk.img`.
pub const VZK_DISK: &str = "application/vnd.vz-kubelet.vm.disk.v1+zstd";
/// vzk: a zstd chunk of `aux.img` (macOS auxiliary storage or EFI variable store).
pub const VZK_AUX: &str = "application/vnd.vz-kubelet.vm.aux.v1+zstd";
/// vzk: a zstd chunk of `kernel` (Linux flavour).
pub const VZK_KERNEL: &str = "application/vnd.vz-kubelet.vm.kernel.v1+zstd";
/// vzk: a zstd chunk of `initrd` (Linux flavour, optional).
pub const VZK_INITRD: &str = "application/vnd.vz-kubelet.vm.initrd.v1+zstd";
/// vzk: the disk's frame index (see [`crate::frame_index`]); not a file of the image.
pub const VZK_DISK_FRAMES: &str = "application/vnd.vz-kubelet.vm.disk.frames.v1";
/// vzk: title of the frame-index layer.
pub const VZK_DISK_FRAMES_TITLE: &str = "disk.frames";
/// vzk: chunk offset in the file (decimal).
pub const VZK_CHUNK_OFFSET: &str = "io.github.vz-kubelet.chunk.offset";
/// vzk: uncompressed chunk size (decimal).
pub const VZK_UNCOMPRESSED_SIZE: &str = "io.github.vz-kubelet.content.uncompressed-size";
/// vzk: `sha256:<hex>` of the uncompressed chunk.
pub const VZK_UNCOMPRESSED_DIGEST: &str = "io.github.vz-kubelet.content.uncompressed-digest";
/// vzk: size of the whole file (decimal), on every chunk.
pub const VZK_FILE_SIZE: &str = "io.github.vz-kubelet.file.size";
/// vzk: manifest annotation naming the guest OS (`darwin` or `linux`).
pub const VZK_OS: &str = "io.github.vz-kubelet.vm.os";
/// vzk: default chunk size (64 MiB).
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;

/// Tart: VM config layer.
pub const TART_CONFIG: &str = "application/vnd.cirruslabs.tart.config.v1";
/// Tart: a disk chunk, Apple LZ4 framing.
pub const TART_DISK_V2: &str = "application/vnd.cirruslabs.tart.disk.v2";
/// Tart: legacy single-stream disk layers; refused.
pub const TART_DISK_V1: &str = "application/vnd.cirruslabs.tart.disk.v1";
/// Tart: NVRAM layer.
pub const TART_NVRAM: &str = "application/vnd.cirruslabs.tart.nvram.v1";
/// Tart: uncompressed size of a disk layer.
pub const TART_UNCOMPRESSED_SIZE: &str = "org.cirruslabs.tart.uncompressed-size";
/// Tart: sha256 of the uncompressed disk layer.
pub const TART_UNCOMPRESSED_DIGEST: &str = "org.cirruslabs.tart.uncompressed-content-digest";
/// Tart: manifest annotation, total disk size.
pub const TART_UNCOMPRESSED_DISK_SIZE: &str = "org.cirruslabs.tart.uncompressed-disk-size";
/// Tart: manifest annotation, when the image was pushed (RFC 3339).
pub const TART_UPLOAD_TIME: &str = "org.cirruslabs.tart.upload-time";
/// Tart: label of the stub image config, `raw` or `asif`.
pub const TART_DISK_FORMAT_LABEL: &str = "org.cirruslabs.tart.disk.format";
/// Tart: the uncompressed size of its disk chunks.
pub const TART_CHUNK_SIZE: u64 = 512 << 20;

/// The file a layer holds, whatever the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `config.json`.
    Config,
    /// `disk.img`, the boot disk.
    Disk,
    /// `aux.img`: macOS auxiliary storage, or an EFI variable store.
    Aux,
    /// `kernel` (Linux direct boot).
    Kernel,
    /// `initrd` (Linux direct boot).
    Initrd,
}

impl Role {
    /// The file name of this role in a pulled image directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Role::Config => "config.json",
            Role::Disk => "disk.img",
            Role::Aux => "aux.img",
            Role::Kernel => "kernel",
            Role::Initrd => "initrd",
        }
    }

    /// The vzk media type of this role's layers.
    pub fn vzk_media_type(self) -> &'static str {
        match self {
            Role::Config => VZK_CONFIG,
            Role::Disk => VZK_DISK,
            Role::Aux => VZK_AUX,
            Role::Kernel => VZK_KERNEL,
            Role::Initrd => VZK_INITRD,
        }
    }

    /// The role of a file name in an image directory, if it is one.
    pub fn from_file_name(name: &str) -> Option<Role> {
        [
            Role::Config,
            Role::Disk,
            Role::Aux,
            Role::Kernel,
            Role::Initrd,
        ]
        .into_iter()
        .find(|r| r.file_name() == name)
    }
}

/// How a layer's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Stored as is.
    Raw,
    /// One gzip stream (possibly several members) for the whole file.
    Gzip,
    /// One zstd frame (or several) per chunk.
    ZstdChunk,
    /// Apple `COMPRESSION_LZ4` block framing, one per chunk (Tart).
    AppleLz4Chunk,
}

impl Encoding {
    /// One of several independently compressed chunks of a file (vzk, Tart), as opposed
    /// to one blob for the whole file.
    pub fn is_chunk(self) -> bool {
        matches!(self, Encoding::ZstdChunk | Encoding::AppleLz4Chunk)
    }
}

/// The role and encoding of a layer media type, or `None` for a media type we do not know.
pub fn classify(media_type: &str) -> Option<(Role, Encoding)> {
    Some(match media_type {
        AGODA_DISK => (Role::Disk, Encoding::Gzip),
        AGODA_AUX => (Role::Aux, Encoding::Gzip),
        AGODA_CONFIG => (Role::Config, Encoding::Raw),
        VZK_CONFIG => (Role::Config, Encoding::Raw),
        VZK_DISK => (Role::Disk, Encoding::ZstdChunk),
        VZK_AUX => (Role::Aux, Encoding::ZstdChunk),
        VZK_KERNEL => (Role::Kernel, Encoding::ZstdChunk),
        VZK_INITRD => (Role::Initrd, Encoding::ZstdChunk),
        TART_CONFIG => (Role::Config, Encoding::Raw),
        TART_DISK_V2 => (Role::Disk, Encoding::AppleLz4Chunk),
        TART_NVRAM => (Role::Aux, Encoding::Raw),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vzk_role_round_trips() {
        for role in [Role::Disk, Role::Aux, Role::Kernel, Role::Initrd] {
            assert_eq!(
                classify(role.vzk_media_type()),
                Some((role, Encoding::ZstdChunk))
            );
            assert_eq!(Role::from_file_name(role.file_name()), Some(role));
        }
        assert_eq!(classify("application/octet-stream"), None);
    }
}
