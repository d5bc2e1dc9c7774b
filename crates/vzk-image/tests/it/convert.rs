//! Images a team brings and shares: a Tart VM imported and pushed, our Tart push read by
//! an independent decoder (PyPI's `lz4`, `tart_decode.py`), and conversions agoda → vzk →
//! Tart → agoda between two registries with the content checked at each step.

use std::path::Path;
use std::process::Command;

use vzk_image::convert::{Destination, Source, convert, verify};
use vzk_image::import::{ImportSource, import};
use vzk_image::progress::NoProgress;
use vzk_image::{Format, GuestOs, ImageStore, PushOptions, Reference, push};

use crate::support::*;

const HW: &str = "YnBsaXN0MDDTAQIDBAUGXxAZRGF0YVJlcHJlc2VudGF0aW9uVmVyc2lvbl8QD1BsYXRmb3JtVmVyc2lvbl8QEk1pbmltdW1TdXBwb3J0ZWRPUxQAAAAAAAAAAAAAAAAAAAABEAKjBwgIEA0QAAgPKz1SY2VpawAAAAAAAAEBAAAAAAAAAAkAAAAAAAAAAAAAAAAAAABt";
const ID: &str = "YnBsaXN0MDDRAQJURUNJRBMWYaHTD7Jo1QgLEAAAAAAAAAEBAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAZ";

fn push_opts(format: Format, chunk: u64) -> PushOptions {
    PushOptions {
        format,
        chunk_size: chunk,
        registry: plain(),
        ..Default::default()
    }
}

/// A Tart VM directory as `tart create` + `tart set` leave it (macOS).
fn tart_vm(dir: &Path, disk_size: u64) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write_disk(&dir.join("disk.img"), disk_size, 11);
    let mut nvram = random_bytes(21, 1 << 20);
    nvram[4096..].fill(0);
    std::fs::write(dir.join("nvram.bin"), nvram).expect("nvram");
    let cfg = serde_json::json!({
        "version": 1, "os": "darwin", "arch": "arm64",
        "cpuCountMin": 4, "cpuCount": 6, "memorySizeMin": 8u64 << 30, "memorySize": 12u64 << 30,
        "macAddress": "86:a1:3c:00:11:22", "display": {"width": 1024, "height": 768},
        "ecid": ID, "hardwareModel": HW,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg).expect("json"),
    )
    .expect("config");
}

/// What the independent decoder read of a Tart image in the registry.
fn tart_decode(addr: &str, repo: &str, tag: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/tart_decode.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([addr, repo, tag])
        .output()
        .expect("python3 runs (scripts/install-deps.sh installs it and PyPI's lz4)");
    assert!(
        out.status.success(),
        "the independent Tart decoder refused {repo}:{tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("decoder output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tart_vm_is_imported_pushed_and_pulled_byte_identical() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let vm = tmp.path().join("vms/sonoma");
    tart_vm(&vm, (13 << 20) + 4321);

    let src = ImportSource::detect(&vm).expect("a Tart VM");
    assert_eq!(src.kind(), "tart");
    let dir = tmp.path().join("image");
    let rep = import(&src, &dir, &NoProgress).expect("import");
    assert_eq!(rep.files.len(), 2, "{rep:?}");
    assert_eq!(
        (rep.config.os, rep.config.cpus, rep.config.min_cpus),
        (GuestOs::Darwin, Some(6), Some(4))
    );
    assert_eq!(rep.config.memory_bytes, Some(12 << 30));
    // The source is untouched and nothing else is left beside the destination.
    assert_eq!(
        std::fs::read_dir(tmp.path()).expect("ls").count(),
        2,
        "vms/ and image/"
    );

    // → vzk → pull: disk and NVRAM byte-identical to the Tart VM's.
    let r = Reference::parse(&format!("{}/tart/sonoma:vzk", reg.addr)).expect("ref");
    push(&dir, &r, &push_opts(Format::Vzk, 4 << 20))
        .await
        .expect("push vzk");
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let img = store.pull(&r, &pull_opts()).await.expect("pull");
    assert_same_file(&vm.join("disk.img"), &img.disk());
    assert_same_file(&vm.join("nvram.bin"), &img.aux().expect("aux.img"));
    assert_eq!(img.config.machine_id_data.as_deref(), Some(ID));

    // → Tart, read by the independent decoder as `tart pull` would.
    let push_tart = push(
        &dir,
        &Reference::parse(&format!("{}/tart/sonoma:tart", reg.addr)).expect("ref"),
        &push_opts(Format::Tart, 4 << 20),
    )
    .await
    .expect("push tart");
    let d = tart_decode(&reg.addr, "tart/sonoma", "tart");
    assert_eq!(d["disk_sha256"], sha256_file(&vm.join("disk.img")));
    assert_eq!(d["disk_size"], (13u64 << 20) + 4321);
    assert_eq!(d["nvram_sha256"], sha256_file(&vm.join("nvram.bin")));
    assert_eq!(d["disk_layers"], 4, "13 MiB in 4 MiB chunks: {d}");
    assert!(
        d["blocks"].as_u64().unwrap_or(0) >= 208,
        "64 KiB blocks: {d}"
    );
    assert_eq!(d["labels"]["org.cirruslabs.tart.disk.format"], "raw");
    assert_eq!(d["stub"]["os"], "darwin");
    assert_eq!(
        d["annotations"]["org.cirruslabs.tart.uncompressed-disk-size"],
        ((13u64 << 20) + 4321).to_string()
    );
    assert!(d["annotations"]["org.cirruslabs.tart.upload-time"].is_string());
    assert_eq!(
        d["first_layer"],
        "application/vnd.cirruslabs.tart.config.v1"
    );
    assert_eq!(d["last_layer"], "application/vnd.cirruslabs.tart.nvram.v1");
    // Tart's own config travels unchanged (its MAC address and display included).
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(d["config"], original);
    assert!(push_tart.compressed_bytes < push_tart.uncompressed_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversions_between_formats_and_registries_keep_the_content() {
    let (a, b) = (registry(false), registry(false));
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    macos_image(&src, (11 << 20) + 77);
    let disk_size = (11u64 << 20) + 77;
    let aux_size = std::fs::metadata(src.join("aux.img")).expect("aux").len();
    let at = |reg: &TestRegistry, name: &str| {
        Reference::parse(&format!("{}/{name}", reg.addr)).expect("ref")
    };
    push(&src, &at(&a, "mac:agoda"), &push_opts(Format::Agoda, 0))
        .await
        .expect("push agoda");

    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let steps = [
        (at(&a, "mac:agoda"), at(&b, "mac:vzk"), Format::Vzk),
        (at(&b, "mac:vzk"), at(&a, "mac:tart"), Format::Tart),
        (at(&a, "mac:tart"), at(&b, "mac:agoda2"), Format::Agoda),
    ];
    for (from, to, format) in &steps {
        let rep = convert(
            &store,
            &Source::Registry(from.clone()),
            &pull_opts(),
            &Destination::Registry(to.clone()),
            &push_opts(*format, 4 << 20),
            true,
        )
        .await
        .unwrap_or_else(|e| panic!("convert {from} → {to}: {e}"));
        let v = rep.verified.expect("verified");
        assert_eq!((v.format, v.files), (*format, 2), "{from} → {to}");
        assert_eq!(v.bytes, disk_size + aux_size, "{from} → {to}");
        // A fresh pull of the destination: byte-identical to the first source.
        let fresh = ImageStore::open(
            tmp.path().join(format!("fresh-{}", format.as_str())),
            u64::MAX,
        )
        .expect("store");
        let img = fresh.pull(to, &pull_opts()).await.expect("pull converted");
        assert_eq!(img.format, *format);
        assert_same_file(&src.join("disk.img"), &img.disk());
        assert_same_file(&src.join("aux.img"), &img.aux().expect("aux"));
        assert_eq!(img.config.hardware_model_data.as_deref(), Some(HW));
    }
    let d = tart_decode(&a.addr, "mac", "tart");
    assert_eq!(d["disk_sha256"], sha256_file(&src.join("disk.img")));
    assert_eq!(d["config"]["hardwareModel"], HW);
    assert_eq!(d["config"]["ecid"], ID);

    // The check catches a destination that declares other content: one byte changed
    // locally, and the part that holds it is named.
    let other = tmp.path().join("other");
    macos_image(&other, disk_size);
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(other.join("disk.img"))
            .expect("open");
        f.write_all_at(b"!", 5 << 20).expect("write");
    }
    let e = verify(&other, &at(&b, "mac:vzk"), &plain())
        .await
        .expect_err("differs")
        .to_string();
    assert!(e.contains("disk.img bytes 4194304..8388608"), "{e}");

    // A Linux image with a kernel has no agoda or Tart form: refused before anything is
    // uploaded, with the reason.
    let linux = tmp.path().join("linux");
    linux_image(&linux, 3 << 20);
    push(
        &linux,
        &at(&a, "linux:v1"),
        &push_opts(Format::Vzk, 1 << 20),
    )
    .await
    .expect("push linux");
    for format in [Format::Agoda, Format::Tart] {
        let e = convert(
            &store,
            &Source::Registry(at(&a, "linux:v1")),
            &pull_opts(),
            &Destination::Registry(at(&b, "linux:x")),
            &push_opts(format, 1 << 20),
            true,
        )
        .await
        .expect_err("no such form")
        .to_string();
        assert!(
            e.contains("kernel") || e.contains("macOS"),
            "{format:?}: {e}"
        );
    }
    let reg = vzk_image::registry::Registry::new(&at(&b, "linux:x"), &plain(), false).expect("reg");
    assert!(reg.get_manifest("x").await.is_err(), "nothing was pushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_move_through_an_oci_layout_in_any_format() {
    let reg = registry(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    linux_image(&src, (6 << 20) + 5);
    let r = |t: &str| format!("{}/vm/linux:{t}", reg.addr);
    push(
        &src,
        &Reference::parse(&r("v1")).expect("ref"),
        &push_opts(Format::Vzk, 2 << 20),
    )
    .await
    .expect("push");
    let store = ImageStore::open(tmp.path().join("cache"), u64::MAX).expect("store");
    let layout = tmp.path().join("layout");
    let lref = format!("oci:{}:v1", layout.display());

    // registry → layout (vzk) → registry, checked on both legs.
    let out = convert(
        &store,
        &Source::parse(&r("v1")).expect("src"),
        &pull_opts(),
        &Destination::parse(&lref).expect("dst"),
        &push_opts(Format::Vzk, 1 << 20),
        true,
    )
    .await
    .expect("to the layout");
    assert_eq!(out.verified.expect("verified").files, 3);
    // An independent reader takes the layout.
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw", &lref])
        .output()
        .expect("skopeo runs");
    assert!(
        inspect.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("manifest");
    assert_eq!(m["artifactType"], "application/vnd.vz-kubelet.vm.v1");
    let back = convert(
        &store,
        &Source::parse(&lref).expect("src"),
        &pull_opts(),
        &Destination::parse(&r("v2")).expect("dst"),
        &push_opts(Format::Vzk, 4 << 20),
        true,
    )
    .await
    .expect("from the layout");
    assert_eq!(back.source_format, Format::Vzk);
    let img = ImageStore::open(tmp.path().join("fresh"), u64::MAX)
        .expect("store")
        .pull(&Reference::parse(&r("v2")).expect("ref"), &pull_opts())
        .await
        .expect("pull");
    for f in ["kernel", "initrd", "disk.img"] {
        assert_same_file(&src.join(f), &img.dir.join(f));
    }
    // Nothing of the unpacked copy stays in the cache's temporary directory.
    let leftovers = std::fs::read_dir(tmp.path().join("cache/tmp"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);

    // A macOS image in Tart's format in the same layout, out to the registry as agoda.
    let mac = tmp.path().join("mac");
    macos_image(&mac, 5 << 20);
    let tart_ref = format!("oci:{}:mac-tart", layout.display());
    vzk_image::push::push_to(
        &mac,
        &Destination::parse(&tart_ref).expect("dst"),
        &push_opts(Format::Tart, 2 << 20),
    )
    .await
    .expect("push tart to the layout");
    let agoda = convert(
        &store,
        &Source::parse(&tart_ref).expect("src"),
        &pull_opts(),
        &Destination::parse(&r("mac-agoda")).expect("dst"),
        &push_opts(Format::Agoda, 0),
        true,
    )
    .await
    .expect("tart layout to agoda");
    assert_eq!(agoda.source_format, Format::Tart);
    let img = ImageStore::open(tmp.path().join("fresh2"), u64::MAX)
        .expect("store")
        .pull(
            &Reference::parse(&r("mac-agoda")).expect("ref"),
            &pull_opts(),
        )
        .await
        .expect("pull");
    assert_eq!(img.format, Format::Agoda);
    assert_same_file(&mac.join("disk.img"), &img.disk());
    assert_same_file(&mac.join("aux.img"), &img.aux().expect("aux"));

    // A blob damaged in the layout is refused when read, naming it.
    let (bytes, _) = vzk_image::layout::OciLayout::open(&layout)
        .expect("layout")
        .manifest("v1")
        .expect("manifest");
    let m: vzk_image::manifest::Manifest = serde_json::from_slice(&bytes).expect("manifest");
    let victim = m
        .layers
        .iter()
        .find(|l| l.size > 1000)
        .expect("a layer")
        .digest
        .clone();
    let path = layout
        .join("blobs/sha256")
        .join(victim.trim_start_matches("sha256:"));
    let mut blob = std::fs::read(&path).expect("blob");
    let mid = blob.len() / 2;
    blob[mid] ^= 0xff;
    std::fs::write(&path, blob).expect("damage");
    let e = convert(
        &store,
        &Source::parse(&lref).expect("src"),
        &pull_opts(),
        &Destination::parse(&r("v3")).expect("dst"),
        &push_opts(Format::Vzk, 4 << 20),
        true,
    )
    .await
    .expect_err("damaged")
    .to_string();
    assert!(e.contains(&victim[..20]), "{e}");
}
