//! VM images as OCI artifacts: formats, streaming verified pulls, a content-addressed
//! cache, copy-on-write clones, and pushes.
//!
//! * [`media_types`]: every media type and annotation we read and write (agoda, vzk, Tart).
//! * [`config`]: the VM `config.json` ([`VmConfig`]), macOS and Linux flavours.
//! * [`store`]: [`ImageStore`], the cache, and [`ImageStore::pull`].
//! * [`clone`]: [`Cloner`], per-pod copy-on-write disks.
//! * [`push`]: packing an image directory and pushing it.
//! * [`keyring`]: credentials from `imagePullSecrets` and docker `config.json`.
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
pub mod error;
mod fetch;
pub mod keyring;
pub mod manifest;
pub mod media_types;
pub mod progress;
mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod store;
pub mod tart;

/// Re-exported for the CLI's JSON output.
#[doc(hidden)]
pub use serde_json;

pub use clone::{CloneKind, Cloner};
pub use config::{GuestOs, VmConfig};
pub use error::{ImageError, Result};
pub use fetch::is_zero;
pub use keyring::{Credentials, Keyring, PullSecret};
pub use manifest::Format;
pub use progress::{LogProgress, NoProgress, Progress};
pub use push::{PushOptions, PushReport, push};
pub use reference::Reference;
pub use registry::RegistryOptions;
pub use store::{ImageInfo, ImageStore, LocalImage, PinGuard, PullOptions, PullPolicy};
