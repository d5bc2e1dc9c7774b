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

/// `p` with a hostPath volume `init` (the directory `dir`) and these annotations.
fn with_volume_and_annotations(
    mut p: Pod,
    dir: &std::path::Path,
    annotations: &[(&str, &str)],
) -> Pod {
    p.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
    );
    let spec = p.spec.as_mut().unwrap();
    spec.volumes = Some(vec![
        serde_json::from_value(serde_json::json!({
            "name": "init", "hostPath": {"path": dir.display().to_string(), "type": "Directory"}
        }))
        .unwrap(),
    ]);
    p
}

#[tokio::test(start_paused = true)]
async fn user_data_comes_from_a_file_of_a_pod_volume() {
    let h = harness(Opts::default()).await;
    let src = h.dir.path().join("init-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("user-data"),
        "#cloud-config\nruncmd: [[touch, /from-volume]]\n",
    )
    .unwrap();
    std::fs::write(src.join("other"), "#!/bin/sh\necho other-key\n").unwrap();
    let from = crate::identity::USER_DATA_FROM_ANNOTATION;
    let a = with_volume_and_annotations(pod("vol-a", "Always"), &src, &[(from, "init")]);
    let b = with_volume_and_annotations(pod("vol-b", "Always"), &src, &[(from, "init/other")]);
    for p in [&a, &b] {
        h.provider.create_pod(p).await.unwrap();
        h.until(p, "VM running", running).await;
    }
    for (p, want) in [
        (&a, "runcmd: [[touch, /from-volume]]"),
        (&b, "echo other-key"),
    ] {
        let vm = h.hv.vm(&vm_id(p)).unwrap();
        let spec = vm.spec();
        let (_, user) = seed_files(&spec.disks[1].path);
        assert!(user.contains(want), "{want} in {user}");
    }
}

/// A pod's annotations, as (key, value) pairs.
type Annotations<'a> = Vec<(&'a str, &'a str)>;

#[tokio::test(start_paused = true)]
async fn bad_user_data_sources_fail_the_pod_with_a_message_naming_them() {
    let h = harness(Opts::default()).await;
    let src = h.dir.path().join("init-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("user-data"), "#cloud-config\n").unwrap();
    std::fs::write(
        src.join("huge"),
        vec![b'#'; (crate::identity::USER_DATA_MAX_BYTES + 1) as usize],
    )
    .unwrap();
    std::fs::write(src.join("binary"), [0xff, 0xfe, 0x00]).unwrap();
    let from = crate::identity::USER_DATA_FROM_ANNOTATION;
    let inline = crate::identity::USER_DATA_ANNOTATION;
    let cases: [(&str, Annotations, &str); 6] = [
        (
            "no-vol",
            vec![(from, "nope")],
            "the pod has no volume named \"nope\"",
        ),
        (
            "no-key",
            vec![(from, "init/missing")],
            "has no readable key \"missing\"",
        ),
        (
            "both",
            vec![(from, "init"), (inline, "#cloud-config\n")],
            "are both set",
        ),
        (
            "escape",
            vec![(from, "init/../etc")],
            "expected VOLUME or VOLUME/KEY",
        ),
        (
            "huge",
            vec![(from, "init/huge")],
            "larger than 1048576 bytes",
        ),
        (
            "binary",
            vec![(from, "init/binary")],
            "reading key \"binary\"",
        ),
    ];
    for (name, annotations, _) in &cases {
        let p = with_volume_and_annotations(pod(name, "Always"), &src, annotations);
        h.provider.create_pod(&p).await.unwrap();
        h.until(&p, "CreateContainerError", |s| {
            waiting_reason(s).as_deref() == Some("CreateContainerError")
        })
        .await;
        assert!(h.hv.vm(&vm_id(&p)).is_none(), "{name}: no VM");
    }
    let failed: Vec<String> = h
        .events("Failed")
        .into_iter()
        .map(|(_, e)| e.message)
        .collect();
    for (name, _, want) in &cases {
        assert!(
            failed.iter().any(|m| m.contains(want)),
            "{name}: {want:?} in {failed:#?}"
        );
    }
}
