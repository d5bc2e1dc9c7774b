//! Each pod's own SSH identity on the fake backend: the key file at admission, the seed
//! disk for a Linux guest (read-only, after the boot disk, carrying the pod's key and
//! host name and the pod's own user-data), none when the pod opts out.

use std::io::Read as _;

use vzk_vm::Vm as _;

use super::*;

fn seed_files(path: &std::path::Path) -> (String, String) {
    let f = std::fs::File::open(path).unwrap();
    let fs = fatfs::FileSystem::new(&f, fatfs::FsOptions::new()).unwrap();
    let read = |name: &str| {
        let mut s = String::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    (read("meta-data"), read("user-data"))
}

#[tokio::test(start_paused = true)]
async fn a_linux_pod_gets_its_key_and_host_name_on_a_read_only_seed() {
    let h = harness(Opts::default()).await;
    let mut p = pod("web-1", "Always");
    p.metadata.annotations = Some(
        [(
            crate::identity::USER_DATA_ANNOTATION.to_string(),
            "#cloud-config\npackages: [git]\n".to_string(),
        )]
        .into(),
    );
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let pod_dir = h.dir.path().join("data/pods/uid-web-1");
    let key = std::fs::read_to_string(pod_dir.join(crate::identity::KEY_FILE)).unwrap();
    assert!(key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let vm = h.hv.vm(&vm_id(&p)).unwrap();
    let spec = vm.spec();
    assert_eq!(spec.disks.len(), 2, "{:?}", spec.disks);
    let seed = &spec.disks[1];
    assert!(seed.read_only);
    assert_eq!(seed.path, pod_dir.join(crate::identity::SEED_FILE));
    let (meta, user) = seed_files(&seed.path);
    assert!(meta.contains("instance-id: \"uid-web-1\""), "{meta}");
    assert!(meta.contains("local-hostname: \"web-1\""), "{meta}");
    let public =
        vzk_guest::PodIdentity::load_or_create(&pod_dir.join(crate::identity::KEY_FILE), "")
            .unwrap();
    let material = public
        .public_openssh()
        .split(' ')
        .nth(1)
        .unwrap()
        .to_string();
    assert!(user.contains(&material), "the pod's key in {user}");
    assert!(
        user.contains("packages: [git]"),
        "the pod's user-data in {user}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_opts_out_gets_no_seed() {
    let h = harness(Opts::default()).await;
    let mut p = pod("plain", "Always");
    p.metadata.annotations = Some(
        [(
            crate::identity::CLOUD_INIT_ANNOTATION.to_string(),
            "false".to_string(),
        )]
        .into(),
    );
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let vm = h.hv.vm(&vm_id(&p)).unwrap();
    let spec = vm.spec();
    assert_eq!(spec.disks.len(), 1, "{:?}", spec.disks);
}
