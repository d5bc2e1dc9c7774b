//! [`ImageSource`]: where the provider gets VM images and per-pod disk clones from. The
//! binary uses [`StoreSource`] (the image crate's cache, registry pulls and
//! copy-on-write clones); tests pass a fake.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use vzk_image::{Cloner, ImageStore, LazyOptions, LazyPull, LocalImage, PullOptions, Reference};
use vzk_vm::DiskFormat;

/// An error of an image source (its chain is reported in events and statuses).
pub type ImageSourceError = Box<dyn std::error::Error + Send + Sync>;

/// Keeps a pinned image from eviction while alive.
pub type ImagePin = Box<dyn std::any::Any + Send + Sync>;

/// VM images for pods.
#[async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// The image `reference` names, if it is in the local cache.
    fn cached(&self, reference: &Reference) -> Option<LocalImage>;
    /// The image, pulled per `opts` (policy, credentials) or found in the cache.
    async fn pull(
        &self,
        reference: &Reference,
        opts: &PullOptions,
    ) -> Result<LocalImage, ImageSourceError>;
    /// The image with its disk served on demand while it downloads, or from the cache;
    /// [`LazyPull::Unsupported`] says why not (then [`ImageSource::pull`] it).
    async fn pull_lazy(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        lazy: &LazyOptions,
    ) -> Result<LazyPull, ImageSourceError>;
    /// Serve `reference`'s disk again for a pod whose disk a previous agent served on
    /// demand (its QEMU reconnects to the same socket): the image, its `lazy` set.
    async fn reserve_lazy(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        lazy: &LazyOptions,
    ) -> Result<LocalImage, ImageSourceError>;
    /// Keeps `image` from being evicted while the pin lives (a pod uses it); for an
    /// image whose disk is served on demand, keeps its server running.
    fn pin(&self, image: &LocalImage) -> Result<ImagePin, ImageSourceError>;
    /// A writable copy-on-write clone of `image`'s disk at `dest` (the base is never
    /// written), in one of the `formats` the VM's backend attaches.
    fn clone_disk(
        &self,
        image: &LocalImage,
        dest: &Path,
        formats: &[DiskFormat],
    ) -> Result<PodDisk, ImageSourceError>;
    /// A writable copy-on-write clone at `dest` of `base`, a disk of `format` that is no
    /// image's (a template's disk), and the clone's format.
    fn clone_file(
        &self,
        base: &Path,
        format: DiskFormat,
        dest: &Path,
    ) -> Result<DiskFormat, ImageSourceError>;
}

/// A pod's clone of an image's disk, as its VM attaches it.
pub struct PodDisk {
    /// The file (or, for [`DiskFormat::Nbd`], the server's socket).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// What serves it, where it is served rather than a file: the pod keeps it while
    /// its VM may run.
    pub server: Option<ImagePin>,
}

impl std::fmt::Debug for PodDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDisk")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("served", &self.server.is_some())
            .finish()
    }
}

fn disk_format(name: &str) -> DiskFormat {
    if name == "qcow2" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// The image crate's store: a digest-verified cache pulled from registries, disks cloned
/// with the mechanism the pods' file system supports (reflink, else a qcow2 overlay).
#[derive(Debug)]
pub struct StoreSource {
    store: ImageStore,
    cloner: Cloner,
}

impl StoreSource {
    /// A source over `store`, cloning into `pods_dir`'s file system.
    pub fn new(store: ImageStore, pods_dir: &Path) -> Result<Self, vzk_image::ImageError> {
        Ok(Self {
            store,
            cloner: Cloner::detect(pods_dir)?,
        })
    }
}

#[async_trait]
impl ImageSource for StoreSource {
    fn cached(&self, reference: &Reference) -> Option<LocalImage> {
        self.store.get(reference).ok().flatten()
    }

    async fn pull(
        &self,
        reference: &Reference,
        opts: &PullOptions,
    ) -> Result<LocalImage, ImageSourceError> {
        Ok(self.store.pull(reference, opts).await?)
    }

    async fn pull_lazy(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        lazy: &LazyOptions,
    ) -> Result<LazyPull, ImageSourceError> {
        Ok(self.store.pull_lazy(reference, opts, lazy).await?)
    }

    async fn reserve_lazy(
        &self,
        reference: &Reference,
        opts: &PullOptions,
        lazy: &LazyOptions,
    ) -> Result<LocalImage, ImageSourceError> {
        Ok(self.store.reserve_lazy(reference, opts, lazy).await?)
    }

    fn pin(&self, image: &LocalImage) -> Result<ImagePin, ImageSourceError> {
        if let Some(lazy) = &image.lazy {
            return Ok(Box::new(lazy.clone()));
        }
        Ok(Box::new(self.store.pin(image)?))
    }

    fn clone_disk(
        &self,
        image: &LocalImage,
        dest: &Path,
        formats: &[DiskFormat],
    ) -> Result<PodDisk, ImageSourceError> {
        // A disk served on demand: QEMU reads a qcow2 overlay over the image's export;
        // a backend without an overlay format (Virtualization.framework) attaches the
        // pod's own writable export.
        if let Some(lazy) = &image.lazy
            && !formats.contains(&DiskFormat::Qcow2)
        {
            if !formats.contains(&DiskFormat::Nbd) {
                return Err(
                    "the VM backend attaches neither a qcow2 overlay nor an NBD disk, \
                    so it cannot boot a disk served on demand"
                        .into(),
                );
            }
            let served = lazy.serve_writable(dest)?;
            return Ok(PodDisk {
                path: served.socket().to_path_buf(),
                format: DiskFormat::Nbd,
                server: Some(Box::new(served)),
            });
        }
        let kind = self.cloner.clone_image(image, dest)?;
        Ok(PodDisk {
            path: dest.to_path_buf(),
            format: disk_format(kind.qemu_format()),
            server: None,
        })
    }

    fn clone_file(
        &self,
        base: &Path,
        format: DiskFormat,
        dest: &Path,
    ) -> Result<DiskFormat, ImageSourceError> {
        let (_, made) = self.cloner.clone_layer(base, &format.to_string(), dest)?;
        Ok(disk_format(made))
    }
}
