//! Lazy disks: an image whose disk is served (over real NBD, read by real QEMU tools)
//! before its download ends, completed in the background into an ordinary cached image.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vzk_image::manifest::Manifest;
use vzk_image::media_types as mt;
use vzk_image::{
    Cloner, ImageStore, LazyOptions, LazyPull, LazyState, LocalImage, PushOptions, Reference, push,
};

use crate::support::*;

async fn pushed(
    reg: &TestRegistry,
    src: &Path,
    tag: &str,
    format: vzk_image::Format,
) -> (Reference, Manifest) {
    let r = Reference::parse(&format!("{}/vm/lazy:{tag}", reg.addr)).expect("ref");
    let rep = push(
        src,
        &r,
        &PushOptions {
            format,
            chunk_size: 4 << 20,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push");
    (r, serde_json::from_slice(&rep.manifest).expect("manifest"))
}

/// Background completion at `rate` bytes/s, 1 MiB at a time.
fn trickle(rate: u64) -> LazyOptions {
    LazyOptions {
        background_rate: Some(rate),
        background_request: 1 << 20,
        ..Default::default()
    }
}

/// A store in `dir/cache` and `r` pulled into it lazily.
async fn pull_lazily(dir: &Path, r: &Reference, opts: &LazyOptions) -> (ImageStore, LocalImage) {
    let store = ImageStore::open(dir.join("cache"), u64::MAX).expect("store");
    let img = lazy_image(
        store
            .pull_lazy(r, &pull_opts(), opts)
            .await
            .expect("lazy pull"),
    );
    (store, img)
}

fn lazy_image(p: LazyPull) -> LocalImage {
    match p {
        LazyPull::Lazy(img) => img,
        other => panic!("want a lazy image, got {other:?}"),
    }
}

async fn wait_state(img: &LocalImage, done: impl Fn(&LazyState) -> bool) -> LazyState {
    let lazy = img.lazy.as_ref().expect("lazy");
    let mut rx = lazy.disk().state();
    tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|s| done(s)))
        .await
        .expect("state reached in time")
        .expect("state channel")
        .clone()
}

/// The image once a completed lazy pull installed it in `store`.
async fn wait_cached(store: &ImageStore, r: &Reference) -> LocalImage {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(c) = store.get(r).expect("get") {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("installed in the cache")
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_is_served_before_the_pull_ends_and_completes_bit_identical() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 40 << 20);
    let (r, m) = pushed(&reg, &src, "v1", vzk_image::Format::Vzk).await;
    assert_eq!(
        m.layers.last().map(|l| l.media_type.as_str()),
        Some(mt::VZK_DISK_FRAMES),
        "a vzk push carries the frame index last"
    );
    // The background completion slowed to a trickle: what the reads get, they fetch.
    let opts = trickle(64 << 10);
    let (store, img) = pull_lazily(tmp.path(), &r, &opts).await;
    let lazy = img.lazy.clone().expect("lazy");
    assert!(
        img.kernel().is_some() && img.initrd().is_some(),
        "small files are local"
    );
    assert!(
        store.get(&r).expect("get").is_none(),
        "not cached before it completes"
    );
    // A pod's clone: a qcow2 overlay over the NBD export, read in full by QEMU.
    let overlay = tmp.path().join("pod-disk.qcow2");
    let cloner = Cloner::with_kind(vzk_image::CloneKind::Reflink);
    cloner.clone_image(&img, &overlay).expect("clone over NBD");
    let before = lazy.disk().stats();
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&overlay)
        .arg(src.join("disk.img")));
    let after = lazy.disk().stats();
    assert!(
        after.guest_frames > before.guest_frames,
        "QEMU's reads fetched frames on demand: {before:?} → {after:?}"
    );
    // Writes go to the overlay, never to the served disk.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 1M 64k"])
        .arg(&overlay));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0xab 1M 64k"])
        .arg(&overlay));
    // Direct reads agree with the source at odd offsets, across frame boundaries.
    let want = std::fs::read(src.join("disk.img")).expect("src");
    for (at, len) in [
        (0usize, 512usize),
        ((1 << 20) - 100, 300),
        ((7 << 20) + 5, 3 << 20),
        (want.len() - 17, 17),
    ] {
        let mut buf = vec![0u8; len];
        lazy.disk()
            .read_at(at as u64, &mut buf)
            .await
            .expect("read");
        assert!(buf == want[at..at + len], "bytes at {at}+{len}");
    }
    let mut past = [0u8; 2];
    assert!(
        lazy.disk()
            .read_at(want.len() as u64 - 1, &mut past)
            .await
            .is_err()
    );
    // Another pod of the image gets the same lazy disk.
    let again = lazy_image(
        store
            .pull_lazy(&r, &pull_opts(), &opts)
            .await
            .expect("again"),
    );
    assert_eq!(again.lazy.expect("lazy").socket(), lazy.socket());
    // Completion: an ordinary cached image, identical to a full pull.
    let state = wait_state(&img, |s| !matches!(s, LazyState::Filling { .. })).await;
    assert_eq!(state, LazyState::Complete);
    let cached = wait_cached(&store, &r).await;
    assert!(cached.lazy.is_none());
    assert_same_file(&cached.disk(), &src.join("disk.img"));
    let full = ImageStore::open(tmp.path().join("full"), u64::MAX).expect("store");
    let pulled = full.pull(&r, &pull_opts()).await.expect("full pull");
    for f in [
        "disk.img",
        "kernel",
        "initrd",
        "config.json",
        "manifest.json",
    ] {
        assert_same_file(&cached.dir.join(f), &pulled.dir.join(f));
    }
    assert!(matches!(
        store
            .pull_lazy(&r, &pull_opts(), &opts)
            .await
            .expect("cached"),
        LazyPull::Cached(_)
    ));
    // The running pod's overlay still reads through its NBD server.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0xab 1M 64k"])
        .arg(&overlay));
    let socket = lazy.socket().to_path_buf();
    drop((img, lazy));
    assert!(
        !socket.exists(),
        "the last user gone, the server and socket go"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_frame_is_never_served_and_nothing_is_cached() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 16 << 20);
    let (r, m) = pushed(&reg, &src, "bad", vzk_image::Format::Vzk).await;
    let victim = tamper_largest_disk_chunk(&reg, &m);
    let (store, img) = pull_lazily(tmp.path(), &r, &trickle(1 << 10)).await;
    let lazy = img.lazy.clone().expect("lazy");
    let want = std::fs::read(src.join("disk.img")).expect("src");
    let mut errors = Vec::new();
    for at in (0..want.len()).step_by(1 << 20) {
        let mut buf = vec![0u8; 1 << 20];
        match lazy.disk().read_at(at as u64, &mut buf).await {
            Ok(()) => assert!(
                buf == want[at..at + buf.len()],
                "a served frame is right ({at})"
            ),
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(!errors.is_empty(), "the tampered frame is refused");
    assert!(
        errors.iter().any(|e| e.contains("not served")),
        "{errors:?}"
    );
    let state = wait_state(&img, |s| matches!(s, LazyState::Failed(_))).await;
    assert!(
        matches!(&state, LazyState::Failed(r) if r.contains(&victim)),
        "{state:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(&r).expect("get").is_none(), "nothing is cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_gone_mid_boot_fails_reads_after_retries() {
    let mut reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 16 << 20);
    let (r, _) = pushed(&reg, &src, "gone", vzk_image::Format::Vzk).await;
    let opts = LazyOptions {
        attempts: 3,
        backoff: Duration::from_millis(50),
        ..trickle(1 << 10)
    };
    let (_store, img) = pull_lazily(tmp.path(), &r, &opts).await;
    let lazy = img.lazy.clone().expect("lazy");
    reg.stop();
    let mut buf = vec![0u8; 4096];
    let err = lazy
        .disk()
        .read_at(12 << 20, &mut buf)
        .await
        .expect_err("the registry is gone");
    assert!(err.to_string().contains("failed 3 times"), "{err}");
    let state = wait_state(&img, |s| matches!(s, LazyState::Failed(_))).await;
    assert!(
        matches!(&state, LazyState::Failed(r) if r.contains("failed 3 times")),
        "{state:?}"
    );
    // Later reads fail at once with the same reason, never with made-up bytes.
    let err2 = lazy
        .disk()
        .read_at(13 << 20, &mut buf)
        .await
        .expect_err("failed disk");
    assert!(
        matches!(&state, LazyState::Failed(r) if *r == err2.to_string()),
        "{err2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_without_a_frame_index_are_pulled_in_full() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    macos_image(&src, 4 << 20);
    let (r, _) = pushed(&reg, &src, "agoda", vzk_image::Format::Agoda).await;
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    match store
        .pull_lazy(&r, &pull_opts(), &LazyOptions::default())
        .await
        .expect("answer")
    {
        LazyPull::Unsupported { reason } => assert!(reason.contains("agoda"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A vzk image pushed without its index (as before it existed).
    let lsrc = tmp.path().join("linux");
    linux_image(&lsrc, 4 << 20);
    let r = Reference::parse(&format!("{}/vm/lazy:noindex", reg.addr)).expect("ref");
    let rep = push(
        &lsrc,
        &r,
        &PushOptions {
            frame_index: false,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push");
    let m: Manifest = serde_json::from_slice(&rep.manifest).expect("manifest");
    assert!(m.layers.iter().all(|l| l.media_type != mt::VZK_DISK_FRAMES));
    match store
        .pull_lazy(&r, &pull_opts(), &LazyOptions::default())
        .await
        .expect("answer")
    {
        LazyPull::Unsupported { reason } => {
            assert!(reason.contains("without a frame index"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// An agent restart: the server of a running pod's disk goes away with the first agent's
/// store; a second store on the same root serves the disk again (from the cache, the
/// image having completed) where the pod's QEMU reconnects, and its reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_serves_the_disk_again_where_qemu_reconnects() {
    use std::io::BufRead as _;
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 16 << 20);
    let (r, _) = pushed(&reg, &src, "again", vzk_image::Format::Vzk).await;
    let root = tmp.path().join("cache");
    let first = ImageStore::open(&root, u64::MAX).expect("store");
    let img = lazy_image(
        first
            .pull_lazy(&r, &pull_opts(), &LazyOptions::default())
            .await
            .expect("lazy pull"),
    );
    let overlay = tmp.path().join("pod-disk.qcow2");
    Cloner::with_kind(vzk_image::CloneKind::Reflink)
        .clone_image(&img, &overlay)
        .expect("clone over NBD");
    assert!(vzk_image::clone::is_served_over_nbd(&overlay));
    assert!(!vzk_image::clone::is_served_over_nbd(&src.join("disk.img")));
    // A long-lived reader: one read, a pause (the agent restarts), another read.
    let mut qemu = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read 0 1M",
            "-c",
            "sleep 4000",
            "-c",
            "read 9M 1M",
        ])
        .arg(&overlay)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut out = std::io::BufReader::new(qemu.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first read");
    assert!(
        line.starts_with("read 1048576/1048576 bytes at offset 0"),
        "{line}"
    );
    wait_state(&img, |s| *s == LazyState::Complete).await;
    let cached_at = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if first.get(&r).expect("get").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(cached_at.is_ok(), "installed");
    // The first agent goes: its server and socket with it.
    let socket = img.lazy.as_ref().expect("lazy").socket().to_path_buf();
    drop(img);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!socket.exists());
    // The second agent serves it again, at the same place.
    let second = ImageStore::open(&root, u64::MAX).expect("store");
    let again = second
        .reserve_lazy(&r, &pull_opts(), &LazyOptions::default())
        .await
        .expect("served again");
    let lazy = again.lazy.as_ref().expect("served");
    assert_eq!(lazy.socket(), socket);
    assert_eq!(*lazy.disk().state().borrow(), LazyState::Complete);
    let status = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).expect("output");
        (qemu.wait().expect("qemu-io"), rest)
    })
    .await
    .expect("join");
    assert!(status.0.success(), "{status:?}");
    assert!(
        status
            .1
            .contains("read 1048576/1048576 bytes at offset 9437184"),
        "the read after the restart: {}",
        status.1
    );
}

/// Two pods asking for one image at once share one lazy disk (one server, one download).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pods_share_one_lazy_disk() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 8 << 20);
    let (r, _) = pushed(&reg, &src, "both", vzk_image::Format::Vzk).await;
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let (opts, po) = (LazyOptions::default(), pull_opts());
    let (a, b) = tokio::join!(
        store.pull_lazy(&r, &po, &opts),
        store.pull_lazy(&r, &po, &opts)
    );
    let (a, b) = (lazy_image(a.expect("a")), lazy_image(b.expect("b")));
    assert_eq!(
        a.lazy.as_ref().expect("a").socket(),
        b.lazy.as_ref().expect("b").socket()
    );
    assert_eq!(a.dir, b.dir);
}

/// A pod's writable NBD disk (for backends without an overlay format): what the pod
/// writes, at any alignment, it reads back; bytes around a partial write come from the
/// image; another pod of the image sees none of it; the served image and the completed
/// cache are never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_writable_nbd_disk_keeps_its_writes_to_itself() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 24 << 20);
    let (r, _) = pushed(&reg, &src, "cow", vzk_image::Format::Vzk).await;
    // Slow enough that the writes below meet frames not yet fetched.
    let (store, img) = pull_lazily(tmp.path(), &r, &trickle(4 << 20)).await;
    let lazy = img.lazy.clone().expect("lazy");
    let a = lazy
        .serve_writable(&tmp.path().join("a.disk"))
        .expect("pod a");
    let b = lazy
        .serve_writable(&tmp.path().join("b.disk"))
        .expect("pod b");
    assert_ne!(a.socket(), b.socket());
    let source = std::fs::read(src.join("disk.img")).expect("src");
    let mut want = source.clone();
    // QEMU's NBD client writes: unaligned (partial first and last blocks), aligned,
    // one byte, the last bytes of the disk, then a flush.
    let end = source.len();
    let writes: [(usize, usize, u8); 4] = [
        ((1 << 20) + 100, 9000, 0xab),
        (3 << 20, 64 << 10, 0xcd),
        ((17 << 20) + 4095, 1, 0xef),
        (end - 700, 700, 0x11),
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for (at, len, p) in writes {
        cmd.args(["-c", &format!("write -P {p:#x} {at} {len}")]);
        want[at..at + len].fill(p);
    }
    cmd.args(["-c", "flush"]).arg(a.nbd_url());
    run(&mut cmd);
    // Read back through a new connection, whole: the writes and the image around them.
    let out_a = tmp.path().join("a.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(a.nbd_url())
        .arg(&out_a));
    assert!(
        std::fs::read(&out_a).expect("a") == want,
        "pod a reads its writes and the image"
    );
    assert!(
        a.disk().written_bytes() >= 4 * 4096,
        "{}",
        a.disk().written_bytes()
    );
    let out_b = tmp.path().join("b.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(b.nbd_url())
        .arg(&out_b));
    assert!(
        std::fs::read(&out_b).expect("b") == source,
        "pod b sees none of a's writes"
    );
    assert_eq!(b.disk().written_bytes(), 0);
    // Writes into two halves of one block no pod wrote yet, at once: both stay.
    let c = vzk_image::CowDisk::create(lazy.disk().clone(), &tmp.path().join("c.disk"))
        .expect("layer c");
    let at = 9 << 20;
    let (x, y) = (vec![0x21u8; 2048], vec![0x42u8; 2048]);
    let (rx, ry) = tokio::join!(c.write_at(at, &x), c.write_at(at + 2048, &y));
    rx.expect("write x");
    ry.expect("write y");
    let mut back = vec![0u8; 8192];
    c.read_at(at - 2048, &mut back).await.expect("read back");
    assert!(back[..2048] == source[(at - 2048) as usize..at as usize]);
    assert!(back[2048..4096].iter().all(|b| *b == 0x21));
    assert!(back[4096..6144].iter().all(|b| *b == 0x42));
    assert!(back[6144..] == source[(at + 4096) as usize..(at + 6144) as usize]);
    assert!(
        c.write_at(source.len() as u64 - 1, &[0, 0]).await.is_err(),
        "a write past the end is refused"
    );
    // The image completes, bit-identical: no pod's write reached it.
    assert_eq!(
        wait_state(&img, |s| !matches!(s, LazyState::Filling { .. })).await,
        LazyState::Complete
    );
    let cached = wait_cached(&store, &r).await;
    assert_same_file(&cached.disk(), &src.join("disk.img"));
    // A pod's layer still reads right over the completed image; dropped, its socket goes.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("read -P 0xcd {} 65536", 3 << 20))
        .arg(a.nbd_url()));
    let socket = a.socket().to_path_buf();
    drop(a);
    assert!(!socket.exists());
}
