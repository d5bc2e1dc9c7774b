//! VM images as OCI artifacts: formats, streaming verified pulls, a content-addressed
//! cache, copy-on-write clones, and pushes.
//!
//! * [`media_types`]: every media type and annotation we read and write: the
//!   macOS-vz-kubelet ("agoda") format (read/write, byte-compatible), our chunked "vzk"
//!   format with a macOS and a Linux flavour (read/write), and Tart's format (read/write).
//! * [`config`]: the VM `config.json` ([`VmConfig`]).
//! * [`store`]: [`ImageStore`], the cache, [`ImageStore::pull`] and pull policies.
//! * [`clone`]: [`Cloner`], per-pod copy-on-write disks (reflink or qcow2 overlay).
//! * [`push()`]: packing an image directory and pushing it (agoda, vzk or Tart).
//! * [`convert`]: an image copied between references and formats, and checked.
//! * [`layout`]: OCI image layouts, as a push destination and an unpack source.
//! * [`create`]: a macOS image from a restore image: fetching, planning, staging.
//! * [`import`]: image directories from Tart VMs, macosvm bundles and raw disks.
//! * [`hosts`]: registry mirrors and TLS per registry, in containerd's `hosts.toml` layout.
//! * [`keyring`]: credentials from `imagePullSecrets` and docker `config.json`.
//! * [`registry`]: the OCI distribution client (auth, manifests, blobs with `Range`).
//! * [`tart`]: Apple LZ4 framing and Tart's config.
//!
//! # How a pull works
//!
//! The manifest is fetched (and checked by [`manifest::plan`]: known media types,
//! one format, safe titles, required annotations, contiguous chunks), then every blob
//! is streamed — several at once — through a pipeline that hashes the compressed bytes,
//! decompresses, hashes the content, and writes only non-zero 64 KiB blocks at the
//! part's offset of a sparse file. Dropped connections resume with `Range`. Chunks
//! whose declared content is all zeros are not downloaded. Nothing is kept in memory
//! beyond a few 4 MiB buffers per blob, and nothing enters the cache before every
//! digest matched (see [`store`] for the crash-safety guarantees).
//!
//! # Registries, mirrors and TLS
//!
//! A pull talks to the hosts [`hosts::RegistryHosts`] lists for the image's registry
//! (containerd's `hosts.toml` layout, [`PullOptions::hosts`]): mirrors in order, then the
//! upstream, falling back past a host that is down, refuses us or lacks the content;
//! whatever a host sends is verified against its digest, and a mismatch is an error
//! naming that host. Credentials for the image's registry ([`PullOptions::credentials`])
//! go only to it; mirrors get what [`PullOptions::keyring`] holds under their own names.
//!
//! # Use from the provider
//!
//! ```no_run
//! # async fn f() -> vzk_image::Result<()> {
//! use vzk_image::{ImageStore, PullOptions, PullPolicy, Reference, Cloner};
//! let store = ImageStore::open("/var/lib/vz-kubelet/images", 200 << 30)?;
//! let r = Reference::parse("registry.local:5000/macos:sonoma")?;
//! let image = store.pull(&r, &PullOptions { policy: PullPolicy::IfNotPresent, ..Default::default() }).await?;
//! let _pin = store.pin(&image)?; // keep it while the pod runs
//! let cloner = Cloner::detect("/var/lib/vz-kubelet/pods")?;
//! let kind = cloner.clone_disk(&image.disk(), "/var/lib/vz-kubelet/pods/uid/disk".as_ref())?;
//! # let _ = kind; Ok(()) }
//! ```

pub mod clone;
pub mod config;
pub mod content_digest;
pub mod convert;
pub mod cow;
pub mod create;
pub mod error;
mod fetch;
pub mod frame_index;
pub mod hosts;
pub mod import;
pub mod keyring;
pub mod layout;
pub mod lazy;
pub mod mac_platform;
pub mod manifest;
pub mod media_types;
pub mod progress;
mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod store;
pub mod tart;
mod zstd_frames;

/// Re-exported for the CLI's JSON output.
#[doc(hidden)]
pub use serde_json;

pub use clone::{CloneKind, Cloner};
pub use config::{GuestOs, VmConfig};
pub use cow::CowDisk;
pub use error::{ImageError, Result};
pub use fetch::{decode_gzip_members, is_zero};
pub use hosts::{HostDefaults, HostsError, RegistryHosts};
pub use keyring::{Credentials, Keyring, PullSecret};
pub use lazy::{LazyDisk, LazyOptions, LazyState, LazyStats};
pub use mac_platform::{ImageConfigError, MacImageConfig};
pub use manifest::Format;
pub use progress::{LogProgress, NoProgress, Progress};
pub use push::{PushOptions, PushReport, push};
pub use reference::Reference;
pub use registry::RegistryOptions;
pub use store::{
    ImageInfo, ImageStore, LazyImage, LazyPull, LocalImage, NBD_EXPORT, PinGuard, PodDisk,
    PullOptions, PullPolicy,
};
#[doc(hidden)]
pub use zstd_frames::decode_zstd_frames;
