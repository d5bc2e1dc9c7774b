//! Lazy disks end to end (issue 19): a node started with `--lazy-disks on` boots a pod
//! whose image has no local copy, its disk served over NBD from the registry frame by
//! frame while the rest downloads (slowed to a trickle here); the guest reads its disk
//! through it; the download completes into an ordinary cached image, bit-identical to
//! the pushed disk. A pod whose image has a tampered frame fails with `LazyDiskFailed`
//! naming the frame's chunk, and an image pushed without a frame index is pulled in full
//! first, with an event saying so.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use vzk_image::{PushOptions, Reference, RegistryOptions};
use vzk_vm::{Capabilities, DiskFormat, DiskSpec, Hypervisor, HypervisorError, Vm, VmSpec};

use super::support::*;
use super::{BOOT, exec, is_ready, vm_pod};

/// A disk of `mib` MiB: pseudo-random MiBs with every third one zero.
fn disk_bytes(mib: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; mib << 20];
    for (i, block) in v.chunks_mut(1 << 20).enumerate() {
        if i % 3 == 2 {
            continue;
        }
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

async fn push_image(
    env: &TestNode,
    name: &str,
    disk: &[u8],
    frame_index: bool,
) -> (String, serde_json::Value) {
    let dir = env.tmp.path().join("images").join(name);
    guest_image_dir(&dir);
    std::fs::write(dir.join("disk.img"), disk).unwrap();
    let image = format!("{}/vzk/{name}:v1", env.registry.addr);
    let rep = vzk_image::push(
        &dir,
        &Reference::parse(&image).unwrap(),
        &PushOptions {
            chunk_size: 4 << 20,
            frame_index,
            registry: RegistryOptions {
                plain_http: true,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (image, serde_json::from_slice(&rep.manifest).unwrap())
}

/// Creates pod `name` of `image` and waits until it is Ready, having been told its disk
/// is served on demand.
async fn ready_served_on_demand(env: &TestNode, name: &str, image: &str) {
    env.pods
        .create(&PostParams::default(), &vm_pod(name, &env.node, image))
        .await
        .unwrap();
    let pulled = wait_event(&env.events, name, "Pulled", BOOT).await;
    assert!(pulled.contains("on demand"), "{pulled}");
    wait_for(BOOT, &format!("{name} Ready"), || async {
        env.pods.get(name).await.ok().filter(is_ready)
    })
    .await;
}

fn never_restart(mut p: Pod) -> Pod {
    if let Some(s) = p.spec.as_mut() {
        s.restart_policy = Some("Never".into());
    }
    p
}

fn terminated(p: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStateTerminated> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_boots_before_its_image_is_downloaded_and_the_image_completes() {
    let env = TestNode::start("lazy", |a| {
        a.lazy_disks = vzk_provider::args::LazyDisks::On;
        // 8 MiB of data at 256 KiB/s: the download outlasts the boot by far.
        a.lazy_background_rate = 256 << 10;
        a.max_vms = 2;
    })
    .await;
    let disk = disk_bytes(12, 7);
    let (image, _) = push_image(&env, "lazy-guest", &disk, true).await;
    let bad_disk = disk_bytes(12, 9);
    let (bad_image, bad_manifest) = push_image(&env, "lazy-bad", &bad_disk, true).await;
    // An image as pushed before frame indexes.
    let (old_image, _) = push_image(&env, "lazy-old", &disk_bytes(4, 11), false).await;
    let TestNode {
        ns,
        pods,
        events,
        provider,
        node,
        data,
        registry,
        ..
    } = &env;

    // 1. The pod boots with its disk served on demand.
    ready_served_on_demand(&env, "a", &image).await;
    let cached = || walk(&data.join("images/images/sha256"), "disk.img");
    eprintln!("a Ready; cached images now: {:?}", cached());
    // The guest reads its disk (through NBD, fetched and verified frame by frame).
    for (skip, count) in [(0usize, 1usize), (4, 3), (11, 1)] {
        let want = sha256_hex(&disk[skip << 20..(skip + count) << 20]);
        let (code, out) = exec(
            provider,
            ns,
            "a",
            &format!("dd if=/dev/vda bs=1048576 skip={skip} count={count} 2>/dev/null | sha256sum"),
        )
        .await;
        assert_eq!(code, 0, "{out}");
        assert_eq!(
            out.split_whitespace().next(),
            Some(want.as_str()),
            "MiB {skip}+{count}"
        );
    }
    // 2. The download completes into an ordinary cached image, identical to the push.
    let done = wait_for(
        Duration::from_secs(120),
        "the image in the cache",
        || async { cached().into_iter().next() },
    )
    .await;
    assert_eq!(
        sha256_of(&done),
        sha256_hex(&disk),
        "the cached disk is the pushed one"
    );
    // The running guest still reads through its server.
    let (code, out) = exec(
        provider,
        ns,
        "a",
        "dd if=/dev/vda bs=1048576 skip=1 count=1 2>/dev/null | sha256sum",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().next(),
        Some(sha256_hex(&disk[1 << 20..2 << 20]).as_str())
    );

    // 3. A tampered frame: never served, the pod fails with the reason.
    let victim = bad_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == vzk_image::media_types::VZK_DISK)
        .max_by_key(|l| l["size"].as_u64())
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = registry.blob_path(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    pods.create(
        &PostParams::default(),
        &never_restart(vm_pod("bad", node, &bad_image)),
    )
    .await
    .unwrap();
    // The background download may meet the tampered frame before the guest is Ready
    // (a slow boot): either way the pod must fail with the reason.
    let ready = wait_for(BOOT, "bad Ready or terminated", || async {
        let p = pods.get("bad").await.ok()?;
        if is_ready(&p) {
            Some(true)
        } else {
            terminated(&p).map(|_| false)
        }
    })
    .await;
    if ready {
        // Reading the whole disk meets the tampered frame (if the background did not
        // first). The exec may end with the VM (stopped for the failed disk): its result
        // is moot.
        let dd = ["sh", "-c", "dd if=/dev/vda of=/dev/null bs=1048576"];
        let _ = exec_argv(provider, &super::container(ns, "bad"), &dd).await;
    }
    let t = wait_for(Duration::from_secs(60), "bad terminated", || async {
        pods.get("bad").await.ok().as_ref().and_then(terminated)
    })
    .await;
    assert_eq!(t.reason.as_deref(), Some("LazyDiskFailed"), "{t:?}");
    let msg = t.message.unwrap_or_default();
    assert!(msg.contains(&victim) && msg.contains("not served"), "{msg}");
    let ev = wait_event(events, "bad", "LazyDiskFailed", Duration::from_secs(10)).await;
    assert!(ev.contains(&victim), "{ev}");
    assert_eq!(
        cached().len(),
        1,
        "the tampered image never enters the cache"
    );
    delete_pod(pods, "bad", 0, Duration::from_secs(60)).await;
    delete_pod(pods, "a", 0, Duration::from_secs(60)).await;

    // 4. An image without a frame index is pulled in full first, with an event.
    pods.create(&PostParams::default(), &vm_pod("old", node, &old_image))
        .await
        .unwrap();
    let why = wait_event(events, "old", "LazyDiskUnavailable", BOOT).await;
    assert!(why.contains("without a frame index"), "{why}");
    let pulled = wait_event(events, "old", "Pulled", BOOT).await;
    assert!(pulled.contains("Successfully pulled"), "{pulled}");
    assert_eq!(cached().len(), 2, "the full pull is cached");
    delete_pod(pods, "old", 0, Duration::from_secs(60)).await;
    wait_all_released(provider, Duration::from_secs(60)).await;
}

/// QEMU seen as a Virtualization.framework host sees disks: raw files and NBD, no
/// overlay format. The VMs it makes are QEMU's; the disk specs they got are kept.
struct NoOverlayFormat {
    qemu: Arc<dyn Hypervisor>,
    caps: Capabilities,
    disks: Mutex<Vec<DiskSpec>>,
}

#[async_trait::async_trait]
impl Hypervisor for NoOverlayFormat {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn create(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, HypervisorError> {
        self.caps.check(&spec)?;
        self.disks
            .lock()
            .unwrap()
            .extend(spec.disks.iter().cloned());
        self.qemu.create(spec).await
    }
    async fn adopt_existing(&self) -> Result<Vec<Arc<dyn Vm>>, HypervisorError> {
        self.qemu.adopt_existing().await
    }
    async fn health(&self) -> Result<(), String> {
        self.qemu.health().await
    }
}

/// On a backend with no overlay format (Virtualization.framework), a pod's disk served
/// on demand is the pod's own writable NBD export: the guest boots, reads the image,
/// writes that persist in the pod's layer alone; the image completes unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_overlay_format_the_pod_writes_its_own_nbd_layer() {
    let seen: Arc<OnceLock<Arc<NoOverlayFormat>>> = Arc::new(OnceLock::new());
    let keep = seen.clone();
    let env = TestNode::start_on(
        "lazyvz",
        |a| {
            a.lazy_disks = vzk_provider::args::LazyDisks::On;
            a.lazy_background_rate = 256 << 10;
        },
        move |qemu| {
            let mut caps = qemu.capabilities().clone();
            caps.disk_formats = vec![DiskFormat::Raw, DiskFormat::Nbd];
            let hv = Arc::new(NoOverlayFormat {
                qemu,
                caps,
                disks: Mutex::new(Vec::new()),
            });
            let _ = keep.set(hv.clone());
            hv
        },
    )
    .await;
    let disk = disk_bytes(12, 5);
    let (image, _) = push_image(&env, "lazy-vz", &disk, true).await;
    let TestNode {
        ns,
        pods,
        provider,
        data,
        ..
    } = &env;
    ready_served_on_demand(&env, "v", &image).await;
    let hv = seen.get().expect("the provider's hypervisor");
    let vda = hv.disks.lock().unwrap()[0].clone();
    assert_eq!(vda.format, DiskFormat::Nbd, "{vda:?}");
    assert!(!vda.read_only);
    // The guest reads the image through the pod's layer.
    let mib = |skip: usize, count: usize| sha256_hex(&disk[skip << 20..(skip + count) << 20]);
    let read = |skip: usize, count: usize| {
        format!("dd if=/dev/vda bs=1048576 skip={skip} count={count} 2>/dev/null | sha256sum")
    };
    let (code, out) = exec(provider, ns, "v", &read(4, 3)).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.split_whitespace().next(), Some(mib(4, 3).as_str()));
    // It writes into its disk (mid-block, so the layer completes the block from the
    // image), syncs, drops its cache and reads the write back.
    let mark = "pod-v-was-here";
    let at = (5 << 20) + 1000;
    let script = format!(
        "printf {mark} | dd of=/dev/vda bs=1 seek={at} conv=notrunc 2>/dev/null && sync && \
         echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1 skip={at} count={} 2>/dev/null",
        mark.len()
    );
    let (code, out) = exec(provider, ns, "v", &script).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, mark);
    let (code, out) = exec(provider, ns, "v", &read(5, 1)).await;
    assert_eq!(code, 0, "{out}");
    let mut want = disk[5 << 20..6 << 20].to_vec();
    want[1000..1000 + mark.len()].copy_from_slice(mark.as_bytes());
    assert_eq!(
        out.split_whitespace().next(),
        Some(sha256_hex(&want).as_str()),
        "the block around the write is the image's"
    );
    // The write is in the pod's own data file; the image completes without it.
    let layer = walk(&data.join("pods"), "disk");
    assert_eq!(layer.len(), 1, "{layer:?}");
    let bytes = std::fs::read(&layer[0]).unwrap();
    assert_eq!(&bytes[at..at + mark.len()], mark.as_bytes());
    let cached = || walk(&data.join("images/images/sha256"), "disk.img");
    let done = wait_for(
        Duration::from_secs(120),
        "the image in the cache",
        || async { cached().into_iter().next() },
    )
    .await;
    assert_eq!(
        sha256_of(&done),
        sha256_hex(&disk),
        "no pod write in the image"
    );
    // The pod's write outlives the image's completion.
    let (code, out) = exec(provider, ns, "v", &read(5, 1)).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().next(),
        Some(sha256_hex(&want).as_str())
    );
    delete_pod(pods, "v", 0, Duration::from_secs(60)).await;
    wait_all_released(provider, Duration::from_secs(60)).await;
    let sockets: Vec<_> = std::fs::read_dir(data.join("images/tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nbd-pod-"))
        .collect();
    assert!(
        sockets.is_empty(),
        "the pod's server is gone with it: {sockets:?}"
    );
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}
