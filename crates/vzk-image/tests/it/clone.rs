//! Copy-on-write clones of multi-GiB sparse disks.

use std::process::Command;
use std::time::Instant;

use vzk_image::{CloneKind, Cloner, ImageError};

use crate::support::*;

#[test]
fn clone_of_sparse_multi_gib_disk_is_instant_and_leaves_the_base_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path().join("base.img");
    let f = std::fs::File::create(&base).expect("create");
    f.set_len(4 << 30).expect("sparse 4 GiB");
    use std::os::unix::fs::FileExt as _;
    f.write_all_at(&random_bytes(1, 1 << 20), 0).expect("write");
    f.write_all_at(&text_bytes(1 << 20), 3 << 30)
        .expect("write");
    drop(f);
    let before = sha256_file(&base);

    let cloner = Cloner::detect(tmp.path().join("pods")).expect("some CoW mechanism");
    let dest = tmp.path().join("pods").join(match cloner.kind() {
        CloneKind::Reflink => "disk.img",
        CloneKind::Qcow2Overlay => "disk.qcow2",
    });
    let t = Instant::now();
    let kind = cloner.clone_disk(&base, &dest).expect("clone");
    // Not a timed assertion (speed is the bench's business): the clone must be a CoW
    // reference to the base, never a copy of its 4 GiB.
    eprintln!("clone kind {kind:?} took {:?}", t.elapsed());
    if kind == CloneKind::Qcow2Overlay {
        use std::os::unix::fs::MetadataExt as _;
        let allocated = std::fs::metadata(&dest).expect("stat clone").blocks() * 512;
        assert!(allocated < 1 << 20, "overlay holds {allocated} bytes");
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&dest)
            .output()
            .expect("qemu-img info");
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains(&*base.to_string_lossy()),
            "the overlay's backing file is the base: {info}"
        );
    }
    // Write into the clone.
    match kind {
        CloneKind::Qcow2Overlay => {
            let out = Command::new("qemu-io")
                .args([
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0xab 0 1M",
                    "-c",
                    "write -P 0xcd 3G 64k",
                ])
                .arg(&dest)
                .output()
                .expect("qemu-io");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "read -P 0xab 0 1M"])
                .arg(&dest)
                .output()
                .expect("qemu-io");
            assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"));
        }
        CloneKind::Reflink => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&dest)
                .expect("open clone");
            f.write_all_at(&[0xab; 1 << 20], 0).expect("write clone");
        }
    }
    assert_eq!(sha256_file(&base), before, "base unchanged");
}

#[test]
fn reflink_is_never_replaced_by_a_copy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path().join("base.img");
    std::fs::write(&base, vec![1u8; 1 << 20]).expect("base");
    let dest = tmp.path().join("clone.img");
    match Cloner::with_kind(CloneKind::Reflink).clone_disk(&base, &dest) {
        Ok(_) => assert_eq!(sha256_file(&dest), sha256_file(&base)), // a reflink-capable FS
        Err(e) => {
            assert!(matches!(e, ImageError::CloneUnsupported { .. }), "{e:?}");
            assert!(!dest.exists(), "no silent full copy");
        }
    }
}
