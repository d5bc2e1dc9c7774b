//! Push → pull round trips per format, the reference agoda manifest, auth, skopeo.

use std::collections::BTreeMap;
use std::process::Command;

use vzk_image::manifest::{Descriptor, Manifest, Platform};
use vzk_image::media_types as mt;
use vzk_image::push::AgodaLayout;
use vzk_image::registry::{Registry, RegistryOptions, sha256_digest};
use vzk_image::{
    Credentials, Format, GuestOs, ImageError, ImageStore, PullOptions, PullPolicy, PushOptions,
    Reference, push,
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vzk_linux_image_round_trips_bit_identical() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, (9 << 20) + 12345);
    let r = Reference::parse(&format!("{}/vm/linux:v1", reg.addr)).expect("ref");
    let opts = PushOptions {
        chunk_size: 2 << 20,
        registry: plain(),
        ..Default::default()
    };
    let report = push(&src, &r, &opts).await.expect("push");
    assert!(report.uploaded_blobs >= 5, "{report:?}");
    // Pushing again uploads nothing.
    let again = push(&src, &r, &opts).await.expect("push again");
    assert_eq!(again.uploaded_blobs, 0, "{again:?}");

    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store.pull(&r, &pull_opts()).await.expect("pull");
    assert_eq!(img.format, Format::Vzk);
    // The second push wrote a new manifest (new creation time) for the same blobs.
    assert_eq!(img.digest, again.digest);
    assert_eq!(report.compressed_bytes, again.compressed_bytes);
    assert_eq!(img.config.os, GuestOs::Linux);
    assert_eq!(
        img.config.kernel_cmdline.as_deref(),
        Some("console=ttyS0 root=/dev/vda rw")
    );
    for f in ["kernel", "initrd", "disk.img", "config.json"] {
        assert_same_file(&src.join(f), &img.dir.join(f));
    }
    // Zero blocks stay holes.
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(img.disk()).expect("stat");
    assert!(
        m.blocks() * 512 < m.len() * 8 / 10,
        "disk.img is sparse: {} of {}",
        m.blocks() * 512,
        m.len()
    );
    // IfNotPresent with the registry gone still works; Never too.
    drop(reg);
    let again = store
        .pull(
            &r,
            &PullOptions {
                policy: PullPolicy::Never,
                ..pull_opts()
            },
        )
        .await
        .expect("never");
    assert_eq!(again.dir, img.dir);
    let again = store.pull(&r, &pull_opts()).await.expect("if-not-present");
    assert_eq!(again.digest, img.digest);
    let err = store
        .pull(
            &r,
            &PullOptions {
                policy: PullPolicy::Always,
                ..pull_opts()
            },
        )
        .await
        .expect_err("always");
    assert!(err.to_string().contains(&r.registry), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agoda_both_layouts_round_trip_with_auth() {
    let reg = registry(true);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    macos_image(&src, 6 << 20);
    let creds = vec![Credentials::basic(USER, PASS)];
    let regopts = RegistryOptions {
        credentials: creds.clone(),
        ..plain()
    };
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    for (tag, layout) in [
        ("a", AgodaLayout::EmptyConfig),
        ("b", AgodaLayout::ConfigAsConfig),
    ] {
        let r = Reference::parse(&format!("{}/macos:{tag}", reg.addr)).expect("ref");
        let opts = PushOptions {
            format: Format::Agoda,
            agoda_layout: layout,
            registry: regopts.clone(),
            ..Default::default()
        };
        let rep = push(&src, &r, &opts).await.expect("push");
        let m: Manifest = serde_json::from_slice(&rep.manifest).expect("manifest");
        match layout {
            AgodaLayout::EmptyConfig => {
                assert_eq!(m.artifact_type.as_deref(), Some(mt::AGODA_ARTIFACT));
                assert_eq!(m.config.digest, mt::OCI_EMPTY_DIGEST);
                let types: Vec<_> = m.layers.iter().map(|l| l.media_type.as_str()).collect();
                assert_eq!(types, [mt::AGODA_DISK, mt::AGODA_AUX, mt::AGODA_CONFIG]);
                let disk = &m.layers[0];
                assert_eq!(
                    disk.annotation(mt::AGODA_UNCOMPRESSED_SIZE),
                    Some("6291456")
                );
                assert_eq!(
                    disk.annotation(mt::AGODA_UNCOMPRESSED_DIGEST)
                        .map(str::to_string),
                    Some(format!("sha256:{}", sha256_file(&src.join("disk.img"))))
                );
            }
            AgodaLayout::ConfigAsConfig => {
                assert_eq!(m.config.media_type, mt::AGODA_CONFIG);
                assert_eq!(m.layers.len(), 2);
            }
        }
        // The disk blob is a plain gzip stream any gzip reads.
        let blob = reg.blob_path(
            &m.layers
                .iter()
                .find(|l| l.media_type == mt::AGODA_DISK)
                .expect("disk")
                .digest,
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc < {} | sha256sum", blob.display()))
            .output()
            .expect("gzip");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&sha256_file(&src.join("disk.img")))
        );
        let img = store
            .pull(
                &r,
                &PullOptions {
                    credentials: creds.clone(),
                    ..pull_opts()
                },
            )
            .await
            .expect("pull");
        assert_eq!(img.format, Format::Agoda);
        for f in ["disk.img", "aux.img", "config.json"] {
            assert_same_file(&src.join(f), &img.dir.join(f));
        }
        assert!(img.config.hardware_model_data.is_some());
    }
    // Wrong credentials: a clear error naming the registry.
    let r = Reference::parse(&format!("{}/macos:a", reg.addr)).expect("ref");
    let store2 = ImageStore::open(tmp.path().join("cache2"), u64::MAX).expect("store");
    let err = store2
        .pull(
            &r,
            &PullOptions {
                credentials: vec![Credentials::basic(USER, "wrong")],
                ..pull_opts()
            },
        )
        .await
        .expect_err("wrong password");
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains(&reg.addr), "{err}");
    let err = store2.pull(&r, &pull_opts()).await.expect_err("anonymous");
    assert!(
        err.to_string().contains(&reg.addr) && err.to_string().contains("credentials"),
        "{err}"
    );
}

/// Build a manifest exactly like the reference example (same media types, annotations,
/// config descriptor, layer order, created annotation) around small blobs, and pull it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_example_manifest_is_pulled_and_laid_out() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/macos:example", reg.addr)).expect("ref");
    let client = Registry::new(&r, &plain(), true).expect("client");
    let disk = [
        random_bytes(4, 1 << 20),
        vec![0u8; 3 << 20],
        text_bytes(1 << 20),
    ]
    .concat();
    let aux = [random_bytes(5, 8192), vec![0u8; 33570816 - 8192]].concat();
    let gz = |data: &[u8]| {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gz");
        e.finish().expect("gz")
    };
    let mut layers = Vec::new();
    for (media, title, data) in [
        (mt::AGODA_DISK, "disk.img", &disk),
        (mt::AGODA_AUX, "aux.img", &aux),
    ] {
        let blob = gz(data);
        let d = sha256_digest(&blob);
        let size = blob.len() as u64;
        client
            .put_blob(&d, size, move || blob.into())
            .await
            .expect("blob");
        layers.push(Descriptor {
            media_type: media.into(),
            digest: d,
            size,
            data: None,
            platform: None,
            annotations: Some(BTreeMap::from([
                (mt::AGODA_UNCOMPRESSED_DIGEST.into(), sha256_digest(data)),
                (mt::AGODA_UNCOMPRESSED_SIZE.into(), data.len().to_string()),
                (mt::ANNOTATION_TITLE.into(), title.into()),
            ])),
        });
    }
    let cfg = MACOS_CONFIG.as_bytes().to_vec();
    let cd = sha256_digest(&cfg);
    let cl = cfg.len() as u64;
    client
        .put_blob(&cd, cl, move || cfg.into())
        .await
        .expect("config blob");
    client
        .put_blob(mt::OCI_EMPTY_DIGEST, 2, || (&b"{}"[..]).into())
        .await
        .expect("empty");
    layers.push(Descriptor {
        media_type: mt::AGODA_CONFIG.into(),
        digest: cd,
        size: cl,
        data: None,
        platform: None,
        annotations: Some(BTreeMap::from([(
            mt::ANNOTATION_TITLE.into(),
            "config.json".into(),
        )])),
    });
    let m = Manifest {
        schema_version: 2,
        media_type: Some(mt::OCI_MANIFEST.into()),
        artifact_type: Some(mt::AGODA_ARTIFACT.into()),
        config: Descriptor::empty_config(Platform {
            architecture: "arm64".into(),
            os: "darwin".into(),
        }),
        layers,
        annotations: Some(BTreeMap::from([(
            mt::ANNOTATION_CREATED.into(),
            "2024-04-26T11:30:28Z".into(),
        )])),
    };
    let text = serde_json::to_string_pretty(&m).expect("json");
    client
        .put_manifest("example", text.as_bytes(), mt::OCI_MANIFEST)
        .await
        .expect("manifest");

    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store.pull(&r, &pull_opts()).await.expect("pull");
    let mut names: Vec<_> = std::fs::read_dir(&img.dir)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "aux.img",
            "config.json",
            "disk.img",
            "manifest.json",
            "meta.json"
        ]
    );
    assert_eq!(std::fs::read(img.disk()).expect("disk"), disk);
    assert_eq!(std::fs::read(img.aux().expect("aux")).expect("aux"), aux);
    assert_eq!(
        std::fs::read_to_string(img.dir.join("config.json")).expect("cfg"),
        MACOS_CONFIG
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_accepts_what_we_push() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 3 << 20);
    macos_image(&tmp.path().join("mac"), 2 << 20);
    for (tag, format, dir) in [
        ("vzk", Format::Vzk, src.clone()),
        ("agoda", Format::Agoda, tmp.path().join("mac")),
    ] {
        let r = Reference::parse(&format!("{}/vm/img:{tag}", reg.addr)).expect("ref");
        let rep = push(
            &dir,
            &r,
            &PushOptions {
                format,
                chunk_size: 1 << 20,
                registry: plain(),
                ..Default::default()
            },
        )
        .await
        .expect("push");
        let out = Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{r}"),
            ])
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.stdout, rep.manifest,
            "skopeo sees the manifest we pushed"
        );
        let dest = tmp.path().join(format!("oci-{tag}"));
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{r}"),
                &format!("oci:{}", dest.display()),
            ])
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Manifest = serde_json::from_slice(&rep.manifest).expect("m");
        for l in &m.layers {
            let p = dest
                .join("blobs/sha256")
                .join(l.digest.trim_start_matches("sha256:"));
            assert_eq!(std::fs::metadata(&p).expect("blob copied").len(), l.size);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_share_one_download_and_gc_keeps_pinned() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 8 << 20);
    let proxy = DropProxy::start(reg.addr.clone(), None).await;
    let r1 = Reference::parse(&format!("{}/vm/a:1", proxy.addr)).expect("ref");
    let rep = push(
        &src,
        &r1,
        &PushOptions {
            chunk_size: 1 << 20,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push");
    std::fs::write(src.join("kernel"), random_bytes(77, 400_000)).expect("kernel2");
    let r2 = Reference::parse(&format!("{}/vm/a:2", proxy.addr)).expect("ref");
    push(
        &src,
        &r2,
        &PushOptions {
            chunk_size: 1 << 20,
            registry: plain(),
            ..Default::default()
        },
    )
    .await
    .expect("push 2");

    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let before = proxy
        .response_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    let o = pull_opts();
    let (a, b) = tokio::join!(store.pull(&r1, &o), store.pull(&r1, &o));
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert_eq!(a.dir, b.dir);
    let moved = proxy
        .response_bytes
        .load(std::sync::atomic::Ordering::SeqCst)
        - before;
    let m: Manifest = serde_json::from_slice(&rep.manifest).expect("m");
    let unique: std::collections::BTreeSet<_> =
        m.layers.iter().map(|l| (&l.digest, l.size)).collect();
    let once: u64 = unique.iter().map(|(_, s)| *s).sum();
    assert!(
        moved < once * 3 / 2 + 200_000,
        "one download: moved {moved}, image {once}"
    );

    // GC never removes a pinned image.
    let pin = store.pin(&a).expect("pin");
    let img_b = store.pull(&r2, &pull_opts()).await.expect("pull b");
    let rep = store.gc_to(1).expect("gc");
    assert_eq!(
        rep.removed,
        vec![img_b.digest.clone()],
        "only the unpinned image goes"
    );
    assert!(a.disk().exists());
    // LRU: with room for one image, the least recently used one goes.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let img_b = store.pull(&r2, &pull_opts()).await.expect("pull b again");
    drop(pin);
    let usage_b = store
        .list()
        .expect("list")
        .iter()
        .find(|i| i.digest == img_b.digest)
        .expect("b")
        .disk_usage;
    let rep = store.gc_to(usage_b + 4096).expect("gc");
    assert_eq!(rep.removed, vec![a.digest.clone()]);
    assert!(!a.dir.exists());
    assert!(img_b.disk().exists());
    assert!(store.get(&r1).expect("get").is_none());
    let listed = store.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].references, vec![format!("{}/vm/a:2", proxy.addr)]);
}

/// A Tart-format image (config, `disk.v2` chunks in Apple LZ4 framing, NVRAM), built the
/// way `tart push` lays it out, is pulled into disk.img + aux.img + config.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tart_image_is_pulled() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let r = Reference::parse(&format!("{}/tart/vm:1", reg.addr)).expect("ref");
    let client = Registry::new(&r, &plain(), true).expect("client");
    let disk = [
        text_bytes(3 << 20),
        vec![0u8; 2 << 20],
        random_bytes(8, 1 << 20),
        text_bytes(1 << 20),
    ]
    .concat();
    let nvram = [random_bytes(9, 4096), vec![0u8; 60_000]].concat();
    let config = br#"{"version":1,"os":"darwin","arch":"arm64","cpuCount":4,"memorySize":8589934592,"ecid":"YnBsaXN0MDA=","hardwareModel":"YnBsaXN0MDDT","macAddress":"7e:00:00:00:00:01","display":{"width":1024,"height":768}}"#;
    async fn put(client: &Registry, bytes: Vec<u8>) -> (String, u64) {
        let d = sha256_digest(&bytes);
        let n = bytes.len() as u64;
        client
            .put_blob(&d, n, move || bytes.into())
            .await
            .expect("blob");
        (d, n)
    }
    let desc = |media: &str, (digest, size): (String, u64), ann: Vec<(&str, String)>| Descriptor {
        media_type: media.into(),
        digest,
        size,
        data: None,
        platform: None,
        annotations: (!ann.is_empty())
            .then(|| ann.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
    };
    let mut layers = vec![desc(
        mt::TART_CONFIG,
        put(&client, config.to_vec()).await,
        vec![],
    )];
    // Tart cuts 512 MiB chunks; 3 MiB here, so one chunk ends mid-way through the zeros.
    for chunk in disk.chunks(3 << 20) {
        let blob = vzk_image::tart::apple_lz4_encode(chunk, 64 << 10);
        layers.push(desc(
            mt::TART_DISK_V2,
            put(&client, blob).await,
            vec![
                (mt::TART_UNCOMPRESSED_SIZE, chunk.len().to_string()),
                (mt::TART_UNCOMPRESSED_DIGEST, sha256_digest(chunk)),
            ],
        ));
    }
    layers.push(desc(
        mt::TART_NVRAM,
        put(&client, nvram.clone()).await,
        vec![],
    ));
    let stub = br#"{"architecture":"arm64","os":"darwin","config":{"Labels":{"org.cirruslabs.tart.disk.format":"raw"}}}"#;
    let m = Manifest {
        schema_version: 2,
        media_type: Some(mt::OCI_MANIFEST.into()),
        artifact_type: None,
        config: desc(
            mt::OCI_IMAGE_CONFIG,
            put(&client, stub.to_vec()).await,
            vec![],
        ),
        layers,
        annotations: Some(BTreeMap::from([(
            mt::TART_UNCOMPRESSED_DISK_SIZE.into(),
            disk.len().to_string(),
        )])),
    };
    client
        .put_manifest(
            "1",
            &serde_json::to_vec(&m).expect("json"),
            mt::OCI_MANIFEST,
        )
        .await
        .expect("manifest");
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store.pull(&r, &pull_opts()).await.expect("pull tart");
    assert_eq!(img.format, Format::Tart);
    assert_eq!(std::fs::read(img.disk()).expect("disk"), disk);
    assert_eq!(std::fs::read(img.aux().expect("aux")).expect("aux"), nvram);
    assert_eq!(img.config.os, GuestOs::Darwin);
    assert_eq!(img.config.cpus, Some(4));
    assert_eq!(img.config.machine_id_data.as_deref(), Some("YnBsaXN0MDA="));
    assert!(img.dir.join("tart-config.json").exists());
}

/// A sparse disk's large holes are pushed as all-zero chunks of their own, in a few
/// power-of-two sizes, and a pull never fetches them: it works with those blobs gone
/// from the registry, and lays the disk out bit-identical and sparse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_become_zero_chunks_that_pulls_never_fetch() {
    use std::os::unix::fs::FileExt as _;
    const MIB: u64 = 1 << 20;
    let reg = registry(false);
    let tmp = tempfile::tempdir_in("/var/tmp")
        .or_else(|_| tempfile::tempdir())
        .expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 4 * MIB);
    // A 40 MiB disk: data, a 28 MiB hole, data, a 4 MiB hole (too short), data.
    let disk = std::fs::File::create(src.join("disk.img")).expect("disk");
    disk.set_len(40 * MIB).expect("len");
    for (at, seed) in [(0, 1u64), (30 * MIB, 2), (36 * MIB, 3)] {
        disk.write_all_at(&random_bytes(seed, 2 * MIB as usize), at)
            .expect("write");
    }
    disk.sync_all().expect("sync");
    drop(disk);
    let r = Reference::parse(&format!("{}/vm/sparse:v1", reg.addr)).expect("ref");
    let opts = PushOptions {
        chunk_size: 16 * MIB,
        registry: plain(),
        ..Default::default()
    };
    let report = push(&src, &r, &opts).await.expect("push");
    let m: Manifest = serde_json::from_slice(&report.manifest).expect("manifest");
    let disk_chunks: Vec<(u64, u64, &str)> = m
        .layers
        .iter()
        .filter(|l| l.media_type == mt::VZK_DISK)
        .map(|l| {
            let n = |k: &str| l.annotation(k).expect(k).parse::<u64>().expect("number");
            (
                n(mt::VZK_CHUNK_OFFSET),
                n(mt::VZK_UNCOMPRESSED_SIZE),
                l.digest.as_str(),
            )
        })
        .collect();
    // The hole 2..30 MiB (28 MiB) is cut as 16 + 8 + 4 MiB zero chunks.
    let holes: Vec<(u64, u64)> = disk_chunks
        .iter()
        .filter(|c| (2 * MIB..30 * MIB).contains(&c.0))
        .map(|c| (c.0, c.1))
        .collect();
    if holes
        != vec![
            (2 * MIB, 16 * MIB),
            (18 * MIB, 8 * MIB),
            (26 * MIB, 4 * MIB),
        ]
    {
        // A filesystem that does not report holes: the fixed grid, nothing more to check.
        assert_eq!(disk_chunks.len(), 3, "{disk_chunks:?}");
        return;
    }
    // Remove the zero chunks' blobs from the registry: a pull that fetched one would fail.
    for &(off, _, digest) in &disk_chunks {
        if (2 * MIB..30 * MIB).contains(&off) {
            let _ = std::fs::remove_file(reg.blob_path(digest));
        }
    }
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store.pull(&r, &pull_opts()).await.expect("pull");
    assert_same_file(&src.join("disk.img"), &img.disk());
    use std::os::unix::fs::MetadataExt as _;
    let blocks = std::fs::metadata(img.disk()).expect("stat").blocks() * 512;
    assert!(blocks < 12 * MIB, "pulled disk.img holds {blocks} bytes");
}

/// A new version of an image reuses the chunks it shares with a version already in the
/// cache: copied and verified locally instead of downloaded (the test deletes those blobs
/// from the registry), and a damaged cached chunk is downloaded instead of trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_reuses_cached_chunks_and_never_a_damaged_one() {
    use std::collections::HashSet;
    use std::os::unix::fs::FileExt as _;
    const MIB: u64 = 1 << 20;
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, 4 * MIB);
    std::fs::write(src.join("disk.img"), random_bytes(7, 12 * MIB as usize)).expect("disk");
    let opts = PushOptions {
        chunk_size: 2 * MIB,
        registry: plain(),
        ..Default::default()
    };
    let v1 = Reference::parse(&format!("{}/vm/reuse:v1", reg.addr)).expect("ref");
    let m1: Manifest =
        serde_json::from_slice(&push(&src, &v1, &opts).await.expect("push v1").manifest)
            .expect("manifest");
    let store_a = ImageStore::open(tmp.path().join("a"), u64::MAX).expect("store");
    store_a.pull(&v1, &pull_opts()).await.expect("pull v1");
    let store_b = ImageStore::open(tmp.path().join("b"), u64::MAX).expect("store");
    let b_v1 = store_b
        .pull(&v1, &pull_opts())
        .await
        .expect("pull v1 into b");

    // v2: one 4 KiB write in the third disk chunk.
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(src.join("disk.img"))
        .expect("open");
    disk.write_all_at(&[0xEE; 4096], 5 * MIB).expect("write");
    drop(disk);
    let v2 = Reference::parse(&format!("{}/vm/reuse:v2", reg.addr)).expect("ref");
    let m2: Manifest =
        serde_json::from_slice(&push(&src, &v2, &opts).await.expect("push v2").manifest)
            .expect("manifest");
    let old: HashSet<&str> = m1.layers.iter().map(|l| l.digest.as_str()).collect();
    let shared: Vec<&str> = m2
        .layers
        .iter()
        .filter(|l| l.media_type == mt::VZK_DISK && old.contains(l.digest.as_str()))
        .map(|l| l.digest.as_str())
        .collect();
    assert_eq!(shared.len(), 5, "6 disk chunks, one changed");

    // A damaged cached chunk (store b) is not trusted: it is downloaded.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(b_v1.disk())
        .expect("open cached disk");
    f.write_all_at(b"damaged", 100).expect("damage");
    drop(f);
    let b_v2 = store_b
        .pull(&v2, &pull_opts())
        .await
        .expect("pull v2 into b");
    assert_same_file(&src.join("disk.img"), &b_v2.disk());

    // With the shared blobs gone from the registry, store a can only have them locally.
    for d in &shared {
        std::fs::remove_file(reg.blob_path(d)).expect("delete blob");
    }
    let a_v2 = store_a
        .pull(&v2, &pull_opts())
        .await
        .expect("pull v2 into a");
    assert_same_file(&src.join("disk.img"), &a_v2.disk());
    // And a store without v1 cannot: the blobs are really gone.
    let store_c = ImageStore::open(tmp.path().join("c"), u64::MAX).expect("store");
    store_c
        .pull(&v2, &pull_opts())
        .await
        .expect_err("shared blobs were deleted");
}
