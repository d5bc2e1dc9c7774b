//! Faults: corrupt blobs, dropped connections, bombs, bad manifests. Nothing bad is cached.

use std::path::Path;

use vzk_image::manifest::Manifest;
use vzk_image::media_types as mt;
use vzk_image::registry::Registry;
use vzk_image::{ImageError, ImageStore, PushOptions, Reference, push};

use crate::support::*;

/// The cache holds no image and no leftovers.
fn assert_nothing_cached(root: &Path) {
    let images: Vec<_> = std::fs::read_dir(root.join("images/sha256"))
        .expect("ls")
        .flatten()
        .collect();
    assert!(images.is_empty(), "no image installed: {images:?}");
    let tmp: Vec<_> = std::fs::read_dir(root.join("tmp"))
        .expect("ls")
        .flatten()
        .filter(|e| e.path().extension().is_none_or(|x| x != "lock"))
        .collect();
    assert!(tmp.is_empty(), "no leftovers: {tmp:?}");
}

async fn pushed(reg: &TestRegistry, src: &Path, tag: &str) -> (Reference, Manifest) {
    let r = Reference::parse(&format!("{}/vm/f:{tag}", reg.addr)).expect("ref");
    let rep = push(
        src,
        &r,
        &PushOptions {
            chunk_size: 2 << 20,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push");
    (r, serde_json::from_slice(&rep.manifest).expect("manifest"))
}

async fn put_variant(reg: &TestRegistry, m: &Manifest, tag: &str) -> Reference {
    let r = Reference::parse(&format!("{}/vm/f:{tag}", reg.addr)).expect("ref");
    let client = Registry::new(&r, &plain(), true).expect("client");
    client
        .put_manifest(tag, &serde_json::to_vec(m).expect("json"), mt::OCI_MANIFEST)
        .await
        .expect("put manifest");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_is_rejected_and_nothing_cached() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 6 << 20);
    let (r, m) = pushed(&reg, &src, "good").await;
    let victim = tamper_largest_disk_chunk(&reg, &m);
    let root = tmp.path().join("cache");
    let store = ImageStore::open(&root, u64::MAX).expect("store");
    let err = store
        .pull(&r, &pull_opts())
        .await
        .expect_err("corrupt blob");
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&victim), "{err}");
    assert_nothing_cached(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_mid_blob_resumes() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    // One big incompressible chunk so the cut lands inside a blob body.
    std::fs::write(src.join("disk.img"), random_bytes(11, 8 << 20)).expect("disk");
    std::fs::write(src.join("kernel"), random_bytes(12, 1000)).expect("kernel");
    std::fs::write(
        src.join("config.json"),
        r#"{"os":"linux","kernelCmdline":"console=ttyS0"}"#,
    )
    .expect("cfg");
    let proxy = DropProxy::start(reg.addr.clone(), Some(3 << 20)).await;
    let r = Reference::parse(&format!("{}/vm/resume:1", proxy.addr)).expect("ref");
    // Push directly (not through the cutting proxy).
    let direct = Reference::parse(&format!("{}/vm/resume:1", reg.addr)).expect("ref");
    push(
        &src,
        &direct,
        &PushOptions {
            chunk_size: 16 << 20,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push");
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store.pull(&r, &pull_opts()).await.expect("pull resumes");
    assert_eq!(
        proxy.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy cut one connection"
    );
    assert_same_file(&src.join("disk.img"), &img.disk());
    // The resume fetched the rest, not the whole blob again.
    let moved = proxy
        .response_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        moved < (8 << 20) + (4 << 20),
        "resumed with Range: {moved} bytes moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_unknown_types_and_bad_titles_are_refused() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 5 << 20);
    let (_, m) = pushed(&reg, &src, "good").await;
    let root = tmp.path().join("cache");
    let store = ImageStore::open(&root, u64::MAX).expect("store");

    // Decompression bomb: the last disk chunk declares fewer bytes than it holds.
    let mut bomb = m.clone();
    let disk: Vec<usize> = (0..bomb.layers.len())
        .filter(|&i| bomb.layers[i].media_type == mt::VZK_DISK)
        .collect();
    let last = *disk.last().expect("disk chunks");
    for &i in &disk {
        let a = bomb.layers[i].annotations.as_mut().expect("ann");
        let fs: u64 = a[mt::VZK_FILE_SIZE].parse().expect("n");
        a.insert(mt::VZK_FILE_SIZE.into(), (fs - 1000).to_string());
        if i == last {
            let us: u64 = a[mt::VZK_UNCOMPRESSED_SIZE].parse().expect("n");
            a.insert(mt::VZK_UNCOMPRESSED_SIZE.into(), (us - 1000).to_string());
        }
    }
    let r = put_variant(&reg, &bomb, "bomb").await;
    let err = store.pull(&r, &pull_opts()).await.expect_err("bomb");
    assert!(
        matches!(err, ImageError::DecompressionBomb { .. }),
        "{err:?}"
    );

    // Unknown layer media type.
    let mut unknown = m.clone();
    unknown.layers[1].media_type = "application/vnd.example.mystery.v1".into();
    let r = put_variant(&reg, &unknown, "unknown").await;
    let err = store.pull(&r, &pull_opts()).await.expect_err("unknown");
    assert!(
        err.to_string()
            .contains("application/vnd.example.mystery.v1"),
        "{err}"
    );

    // A title that escapes the directory.
    let mut evil = m.clone();
    evil.layers[0]
        .annotations
        .as_mut()
        .expect("ann")
        .insert(mt::ANNOTATION_TITLE.into(), "../config.json".into());
    let r = put_variant(&reg, &evil, "evil").await;
    let err = store.pull(&r, &pull_opts()).await.expect_err("evil");
    assert!(
        err.to_string().contains("../config.json") && err.to_string().contains("plain file name"),
        "{err}"
    );
    assert_nothing_cached(&root);
    assert!(!tmp.path().join("config.json").exists());
}

/// A one-route HTTP server answering every request with the same manifest bytes.
async fn fake_registry(body: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
                        mt::OCI_MANIFEST,
                        body.len()
                    );
                    if s.write_all(head.as_bytes()).await.is_err()
                        || s.write_all(body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_malformed_manifests_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("cache");
    let store = ImageStore::open(&root, u64::MAX).expect("store");
    for (body, want) in [
        (&br#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"#[..], "not a valid manifest"),
        (&br#"{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}, "layers": []}"#[..], "invalid digest"),
        (&b"\x00\x01garbage"[..], "not a valid manifest"),
    ] {
        let addr = fake_registry(body).await;
        let r = Reference::parse(&format!("{addr}/vm/x:1")).expect("ref");
        let err = store.pull(&r, &pull_opts()).await.expect_err("bad manifest");
        assert!(matches!(err, ImageError::InvalidManifest { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "{err}");
    }
    assert_nothing_cached(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_pull_leftovers_are_never_trusted() {
    // What a kill -9 mid-pull leaves: an unlocked work directory with partial files.
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().join("cache");
    drop(ImageStore::open(&root, u64::MAX).expect("store"));
    let work = root.join("tmp").join(format!("{}.123", "ab".repeat(32)));
    std::fs::create_dir_all(&work).expect("mkdir");
    std::fs::write(work.join("disk.img"), b"partial").expect("partial");
    std::fs::write(work.join(".lock"), b"").expect("lock");
    let store = ImageStore::open(&root, u64::MAX).expect("reopen");
    assert!(!work.exists(), "leftover removed on open");
    assert!(store.list().expect("list").is_empty());
}

/// Run by `kill_9_mid_pull_leaves_nothing_trusted` in a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of kill_9_mid_pull_leaves_nothing_trusted"]
async fn helper_pull_in_child_process() {
    let (Ok(root), Ok(r)) = (
        std::env::var("VZK_HELPER_ROOT"),
        std::env::var("VZK_HELPER_REF"),
    ) else {
        return;
    };
    let store = ImageStore::open(root, u64::MAX).expect("store");
    let _ = store
        .pull(&Reference::parse(&r).expect("ref"), &pull_opts())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_pull_leaves_nothing_trusted() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("disk.img"), random_bytes(21, 24 << 20)).expect("disk");
    std::fs::write(src.join("kernel"), random_bytes(22, 1000)).expect("kernel");
    std::fs::write(src.join("config.json"), r#"{"os":"linux"}"#).expect("cfg");
    let direct = Reference::parse(&format!("{}/vm/kill:1", reg.addr)).expect("ref");
    push(
        &src,
        &direct,
        &PushOptions {
            chunk_size: 4 << 20,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push");
    // A slow path to the registry (about 8 MB/s) so the child is mid-pull when killed.
    let proxy = DropProxy::start_with(
        reg.addr.clone(),
        None,
        Some(std::time::Duration::from_millis(2)),
    )
    .await;
    let r = format!("{}/vm/kill:1", proxy.addr);
    let root = tmp.path().join("cache");
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "faults::helper_pull_in_child_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("VZK_HELPER_ROOT", &root)
        .env("VZK_HELPER_REF", &r)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn helper");
    // Wait until the child has written part of the disk, then kill -9.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let written = std::fs::read_dir(root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::metadata(e.path().join("disk.img")).ok())
            .any(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.blocks() > 0
            });
        if written {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    // The leftovers are not trusted: reopening removes them, and the image is absent.
    let store = ImageStore::open(&root, u64::MAX).expect("reopen");
    assert_nothing_cached(&root);
    assert!(
        store
            .get(&Reference::parse(&r).expect("ref"))
            .expect("get")
            .is_none()
    );
    // And a new pull completes.
    let img = store
        .pull(&Reference::parse(&r).expect("ref"), &pull_opts())
        .await
        .expect("pull after kill");
    assert_same_file(&src.join("disk.img"), &img.disk());
}

/// Chunk contents are identified by BLAKE3 as we push them; images whose chunks carry
/// SHA-256 content digests (pushed before) still pull; either digest is really checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_content_digests_are_verified_as_blake3_or_sha256() {
    use sha2::Digest as _;
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 5 << 20);
    let (_, m) = pushed(&reg, &src, "good").await;
    let chunk_digests: Vec<&str> = m
        .layers
        .iter()
        .filter_map(|l| l.annotation(mt::VZK_UNCOMPRESSED_DIGEST))
        .collect();
    assert!(chunk_digests.len() >= 4, "{chunk_digests:?}");
    assert!(
        chunk_digests.iter().all(|d| d.starts_with("blake3:")),
        "{chunk_digests:?}"
    );
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");

    // The same chunks declared by their SHA-256.
    let mut old = m.clone();
    for l in &mut old.layers {
        let Some(a) = l.annotations.as_mut() else {
            continue;
        };
        let (Some(title), Some(off), Some(size)) = (
            a.get(mt::ANNOTATION_TITLE),
            a.get(mt::VZK_CHUNK_OFFSET),
            a.get(mt::VZK_UNCOMPRESSED_SIZE),
        ) else {
            continue;
        };
        let (off, size): (usize, usize) = (off.parse().expect("n"), size.parse().expect("n"));
        let content = std::fs::read(src.join(title)).expect("src file");
        let sha = hex::encode(sha2::Sha256::digest(&content[off..off + size]));
        a.insert(mt::VZK_UNCOMPRESSED_DIGEST.into(), format!("sha256:{sha}"));
    }
    let r = put_variant(&reg, &old, "sha256").await;
    let img = store.pull(&r, &pull_opts()).await.expect("sha256 variant");
    for f in ["kernel", "initrd", "disk.img"] {
        assert_same_file(&src.join(f), &img.dir.join(f));
    }

    // A content digest that does not match, under either algorithm, fails the pull.
    for (tag, variant) in [("bad-blake3", m.clone()), ("bad-sha256", old.clone())] {
        let mut bad = variant;
        let layer = bad
            .layers
            .iter_mut()
            .find(|l| l.media_type == mt::VZK_DISK)
            .expect("disk chunk");
        let a = layer.annotations.as_mut().expect("ann");
        let d = a[mt::VZK_UNCOMPRESSED_DIGEST].clone();
        let flipped = if d.ends_with('0') { "1" } else { "0" };
        a.insert(
            mt::VZK_UNCOMPRESSED_DIGEST.into(),
            format!("{}{flipped}", &d[..d.len() - 1]),
        );
        let r = put_variant(&reg, &bad, tag).await;
        let root = tmp.path().join(tag);
        let fresh = ImageStore::open(&root, u64::MAX).expect("store");
        let err = fresh.pull(&r, &pull_opts()).await.expect_err(tag);
        assert!(
            matches!(err, ImageError::DigestMismatch { .. })
                && err.to_string().contains("uncompressed content hashes to"),
            "{tag}: {err}"
        );
        assert_nothing_cached(&root);
    }

    // An algorithm we do not know is refused before anything is downloaded.
    let mut md5 = m.clone();
    md5.layers
        .iter_mut()
        .find(|l| l.media_type == mt::VZK_DISK)
        .and_then(|l| l.annotations.as_mut())
        .expect("ann")
        .insert(
            mt::VZK_UNCOMPRESSED_DIGEST.into(),
            format!("md5:{}", "0".repeat(32)),
        );
    let r = put_variant(&reg, &md5, "md5").await;
    let err = store.pull(&r, &pull_opts()).await.expect_err("md5");
    assert!(err.to_string().contains("invalid content digest"), "{err}");
}
