//! A macOS image through `create_pod` on a Virtualization.framework-like fake backend
//! (what a Mac host runs), and on a QEMU-like one (what it must refuse). The image's
//! `config.json` is the reference's recorded example (macOS-vz-kubelet's media type and
//! platform fields), so the decoding a Mac relies on runs here.

use vzk_vm::{BootSpec, Vm as _};

use super::*;

/// The reference's `example/config.json` (macOS-vz-kubelet), platform fields as recorded.
fn reference_config() -> serde_json::Value {
    serde_json::json!({
        "mediatype": "application/vnd.agoda.macosvz.config.v1+json",
        "os": "darwin",
        "hardwareModelData": "YnBsaXN0MDDTAQIDBAUGXxAZRGF0YVJlcHJlc2VudGF0aW9uVmVyc2lvbl8QD1BsYXRmb3JtVmVyc2lvbl8QEk1pbmltdW1TdXBwb3J0ZWRPUxQAAAAAAAAAAAAAAAAAAAABEAKjBwgIEA0QAAgPKz1SY2VpawAAAAAAAAEBAAAAAAAAAAkAAAAAAAAAAAAAAAAAAABt",
        "machineIdData": "YnBsaXN0MDDRAQJURUNJRBMWYaHTD7Jo1QgLEAAAAAAAAAEBAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAZ"
    })
}

#[tokio::test(start_paused = true)]
async fn a_macos_pod_boots_the_mac_loader_from_its_own_aux_and_disk_clones() {
    let h = harness(Opts {
        mac_host: true,
        mac_image: Some(reference_config()),
        ..Opts::default()
    })
    .await;
    let p = pod("mac", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let vm = h.hv.vm(&vm_id(&p)).unwrap();
    let spec = vm.spec();
    let pod_dir = h
        .dir
        .path()
        .join("data/pods")
        .join(p.metadata.uid.as_deref().unwrap());
    let BootSpec::MacOs {
        aux_storage,
        hardware_model,
        machine_id,
    } = &spec.boot
    else {
        panic!("not a macOS boot: {spec:?}")
    };
    // Per-pod copies: the image's files are never written by a VM.
    assert_eq!(aux_storage, &pod_dir.join("aux.img"));
    assert_eq!(
        std::fs::read(aux_storage).unwrap(),
        b"aux storage of the image"
    );
    assert!(hardware_model.starts_with(b"bplist00"), "decoded plist");
    assert!(
        machine_id.windows(4).any(|w| w == b"ECID"),
        "the image's machine identifier"
    );
    assert_eq!(spec.disks.len(), 1);
    assert_eq!(spec.disks[0].path, pod_dir.join("disk"));
    assert!(!spec.disks[0].read_only);
    assert_eq!(std::fs::read(&spec.disks[0].path).unwrap(), b"apfs disk");
}

#[tokio::test(start_paused = true)]
async fn a_macos_image_on_a_linux_host_waits_naming_the_host_it_needs() {
    let h = harness(Opts {
        mac_image: Some(reference_config()),
        ..Opts::default()
    })
    .await;
    let p = pod("mac-on-linux", "Always");
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "refused", |s| {
            waiting_reason(s).is_some_and(|r| r != "ContainerCreating")
        })
        .await;
    let w = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    let msg = w.message.as_deref().unwrap_or_default();
    assert!(msg.contains("macOS"), "{w:?}");
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert!(
        !h.hv.log.calls().iter().any(|c| c.starts_with("create ")),
        "no VM was created"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_below_the_images_minimum_is_refused_naming_it() {
    let mut config = reference_config();
    config["minCpus"] = 4.into();
    config["minMemoryBytes"] = (8u64 << 30).into();
    let h = harness(Opts {
        mac_host: true,
        mac_image: Some(config),
        ..Opts::default()
    })
    .await;
    let mut p = pod("too-small", "Always");
    p.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({"requests": {"cpu": "2", "memory": "8Gi"}}))
            .unwrap(),
    );
    h.provider.create_pod(&p).await.unwrap();
    let s = h
        .until(&p, "refused", |s| {
            waiting_reason(s).as_deref() == Some("InvalidCPU")
        })
        .await;
    let w = c0(&s).state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(
        w.message.as_deref(),
        Some("the image needs at least 4 vCPUs; 2 asked")
    );
    assert!(!h.hv.log.calls().iter().any(|c| c.starts_with("create ")));
    // Without a request the VM gets the image's minimums.
    let q = pod("defaults", "Always");
    h.provider.create_pod(&q).await.unwrap();
    h.until(&q, "VM running", running).await;
    let vm = h.hv.vm(&vm_id(&q)).unwrap();
    assert_eq!((vm.spec().cpus, vm.spec().memory_bytes), (4, 8 << 30));
}

/// On a Mac whose framework cannot attach NBD disks (before macOS 14) `--lazy-disks on`
/// pulls in full, and says so; where it can, the pod asks for a disk served on demand.
#[tokio::test(start_paused = true)]
async fn lazy_disks_on_a_mac_need_nbd_attachments() {
    for nbd in [false, true] {
        let h = harness(Opts {
            mac_host: true,
            mac_nbd: nbd,
            mac_image: Some(reference_config()),
            extra_args: vec!["--lazy-disks".into(), "on".into()],
            ..Opts::default()
        })
        .await;
        let p = pod("mac", "Always");
        h.provider.create_pod(&p).await.unwrap();
        h.until(&p, "VM running", running).await;
        let calls = h.hv.log.calls();
        assert_eq!(
            calls.iter().any(|c| c.starts_with("pull_lazy")),
            nbd,
            "nbd {nbd}: {calls:?}"
        );
        let said = h.events("LazyDiskUnavailable");
        assert_eq!(said.len(), 1, "{said:?}");
        let why = &said[0].1.message;
        if nbd {
            // The fake image source serves nothing on demand; it says so.
            assert!(why.contains("serves no disk on demand"), "{why}");
        } else {
            assert!(
                why.contains("attach no disk served over NBD") && why.contains("macOS 14"),
                "{why}"
            );
        }
    }
}

/// The image store's NBD servers serve the export the VM runtime's NBD disks name.
#[test]
fn the_store_serves_the_export_vm_nbd_disks_name() {
    assert_eq!(vzk_image::NBD_EXPORT, vzk_vm::NBD_EXPORT);
}
