//! Disk full during a pull: a small tmpfs in a private mount namespace holds the cache.
//! The pull fails with a clear "no space" error, nothing partial is left, the cache still
//! serves the image it had, and the same pull succeeds once space is freed.

use std::path::Path;

use vzk_image::registry::RegistryOptions;
use vzk_image::{ImageError, ImageStore, PullOptions, PushOptions, Reference, push};

use crate::support::*;

async fn pushed(reg: &TestRegistry, src: &Path, tag: &str) -> Reference {
    let r = Reference::parse(&format!("{}/vm/full:{tag}", reg.addr)).expect("ref");
    push(
        src,
        &r,
        &PushOptions {
            chunk_size: 2 << 20,
            registry: RegistryOptions {
                plain_http: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("push");
    r
}

/// Runs `f` on a thread of its own in a private mount namespace (so the tmpfs mounted
/// there is invisible to, and vanishes with, nothing but this test), on a current-thread
/// runtime: every thread the pull spawns inherits the namespace.
fn in_private_mount_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        use nix::mount::{MsFlags, mount};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .expect("unshare(CLONE_NEWNS): the disk-full test needs root");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        f()
    })
    .join()
    .expect("test thread")
}

#[test]
fn disk_full_fails_clearly_keeps_the_cache_and_a_retry_after_freeing_space_succeeds() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let (small_src, big_src) = (tmp.path().join("small"), tmp.path().join("big"));
    linux_image(&small_src, 2 << 20);
    // 24 MiB disk, ~60% non-zero: ~15 MiB of data to write.
    linux_image(&big_src, 24 << 20);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let small = rt.block_on(pushed(&reg, &small_src, "small"));
    let big = rt.block_on(pushed(&reg, &big_src, "big"));
    drop(rt);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");

    in_private_mount_ns(move || {
        use nix::mount::{MsFlags, mount};
        mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=32m"),
        )
        .expect("mount a 32 MiB tmpfs");
        // A filler leaves about 10 MiB free: enough for the small image, not the big one.
        let filler = mnt.join("filler");
        std::fs::write(&filler, vec![0xa5u8; 20 << 20]).expect("filler");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let root = mnt.join("cache");
            let store = ImageStore::open(&root, u64::MAX).expect("store");
            let small_img = store.pull(&small, &pull_opts()).await.expect("small pull");
            assert_same_file(&small_img.disk(), &small_src.join("disk.img"));

            let err = store
                .pull(&big, &pull_opts())
                .await
                .expect_err("the big image cannot fit");
            let msg = err.to_string();
            eprintln!("disk-full error: {msg}");
            assert!(matches!(err, ImageError::NoSpace { .. }), "{err:?}");
            assert!(err.is_no_space());
            // Reported after the cleanup: the partial files' space is free again (about
            // 10 MiB here; a leftover or a still-writing part would hold it).
            let ImageError::NoSpace { available, .. } = &err else {
                unreachable!()
            };
            assert!(available.is_some_and(|a| a > 8 << 20), "{err:?}");
            assert!(msg.contains("no space left on device"), "{msg}");
            assert!(msg.contains(&big.to_string()), "names the image: {msg}");
            assert!(
                msg.contains(&root.display().to_string()),
                "names the cache: {msg}"
            );

            // Nothing partial: only the small image is installed, tmp/ holds no work dir.
            let installed: Vec<_> = std::fs::read_dir(root.join("images/sha256"))
                .expect("ls")
                .flatten()
                .collect();
            assert_eq!(installed.len(), 1, "only the small image: {installed:?}");
            let leftovers: Vec<_> = std::fs::read_dir(root.join("tmp"))
                .expect("ls")
                .flatten()
                .filter(|e| e.path().extension().is_none_or(|x| x != "lock"))
                .collect();
            assert!(leftovers.is_empty(), "no partial files: {leftovers:?}");
            assert!(store.get(&big).expect("get").is_none());

            // The cache still serves what it had, bit-identical, even from a fresh handle.
            let reopened = ImageStore::open(&root, u64::MAX).expect("reopen");
            let again = reopened
                .pull(
                    &small,
                    &PullOptions {
                        policy: vzk_image::PullPolicy::Never,
                        ..pull_opts()
                    },
                )
                .await
                .expect("small image still cached");
            assert_same_file(&again.disk(), &small_src.join("disk.img"));
            assert_same_file(&again.kernel().expect("kernel"), &small_src.join("kernel"));

            // Free space, retry: the same pull now succeeds and is bit-identical.
            std::fs::remove_file(&filler).expect("free space");
            let big_img = reopened.pull(&big, &pull_opts()).await.expect("retry");
            assert_same_file(&big_img.disk(), &big_src.join("disk.img"));
            assert_same_file(&big_img.initrd().expect("initrd"), &big_src.join("initrd"));
            assert_eq!(reopened.list().expect("ls").len(), 2);
        });
    });
}
