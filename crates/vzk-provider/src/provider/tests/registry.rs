//! `--registry-config-dir`: the hosts configuration reaches every VM image pull, with
//! credentials for the image's registry and the keyring for mirrors; a bad file stops
//! the provider at start-up, naming file and line.

use vzk_image::hosts::HostDefaults;
use vzk_image::{Credentials, Reference};

use super::*;

/// A config dir with one registry's `hosts.toml`, and a docker config with credentials
/// for the registry and for its mirror.
fn config(dir: &std::path::Path, hosts_toml: &str) -> Vec<String> {
    let certs = dir.join("certs.d");
    std::fs::create_dir_all(certs.join("registry.test")).unwrap();
    std::fs::write(certs.join("registry.test/hosts.toml"), hosts_toml).unwrap();
    let docker = dir.join("docker.json");
    std::fs::write(
        &docker,
        serde_json::json!({"auths": {
            "registry.test": {"username": "up", "password": "up-pw"},
            "mirror.test:5000": {"username": "mir", "password": "mir-pw"},
        }})
        .to_string(),
    )
    .unwrap();
    vec![
        "--registry-config-dir".into(),
        certs.display().to_string(),
        "--docker-config".into(),
        docker.display().to_string(),
    ]
}

#[tokio::test(start_paused = true)]
async fn every_vm_pull_gets_the_hosts_and_the_credentials_per_host() {
    let cfg = tempfile::tempdir().unwrap();
    let extra_args = config(
        cfg.path(),
        "[host.\"http://mirror.test:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
    );
    let h = harness(Opts {
        extra_args,
        ..Opts::default()
    })
    .await;
    let p = pod("mirrored", "Always");
    h.provider.create_pod(&p).await.unwrap();
    h.until(&p, "VM running", running).await;
    let pulls = h.images.pulls.lock().unwrap().clone();
    let opts = pulls.first().expect("one pull");
    let order: Vec<String> = opts
        .hosts
        .hosts("registry.test", HostDefaults::default())
        .iter()
        .map(vzk_image::hosts::RegistryHost::url)
        .collect();
    assert_eq!(
        order,
        ["http://mirror.test:5000/v2", "https://registry.test/v2"]
    );
    assert_eq!(opts.credentials, [Credentials::basic("up", "up-pw")]);
    let on_mirror = Reference::parse("mirror.test:5000/vm:1").unwrap();
    assert_eq!(
        opts.keyring.lookup(&on_mirror),
        [Credentials::basic("mir", "mir-pw")]
    );
}

#[tokio::test]
async fn a_bad_hosts_toml_stops_the_provider_naming_file_and_line() {
    let cfg = tempfile::tempdir().unwrap();
    let extra_args = config(
        cfg.path(),
        "[host.\"http://mirror.test:5000\"]\n  capabilities = [\"pull\", \"fetch\"]\n",
    );
    let Err(err) = try_harness(Opts {
        extra_args,
        ..Opts::default()
    })
    .await
    else {
        panic!("a bad hosts.toml must stop the provider")
    };
    let chain = crate::pod::error_chain(&err);
    let file = cfg.path().join("certs.d/registry.test/hosts.toml");
    assert!(
        chain.contains(&format!("{}:2:27", file.display())),
        "{chain}"
    );
    assert!(chain.contains("unknown capability \"fetch\""), "{chain}");
    // A named directory that does not exist is an error too (the default may be absent).
    let Err(err) = try_harness(Opts {
        extra_args: vec![
            "--registry-config-dir".into(),
            "/nonexistent/certs.d".into(),
        ],
        ..Opts::default()
    })
    .await
    else {
        panic!("a missing --registry-config-dir must stop the provider")
    };
    assert!(
        matches!(err, crate::ProviderInitError::RegistryConfig(_)),
        "{err:?}"
    );
}

/// `--lazy-disks` and the pod annotation decide who asks for a disk served on demand; an
/// image that cannot be served so is pulled in full, with an event saying why.
#[tokio::test(start_paused = true)]
async fn lazy_disks_flag_and_annotation_choose_who_asks_for_a_lazy_disk() {
    fn annotated(name: &str, value: Option<&str>) -> Pod {
        let mut p = pod(name, "Always");
        if let Some(v) = value {
            p.metadata.annotations = Some(
                [(crate::args::LAZY_DISK_ANNOTATION.to_owned(), v.to_owned())]
                    .into_iter()
                    .collect(),
            );
        }
        p
    }
    for (mode, pods) in [
        (
            "off",
            vec![("plain", None, false), ("asks", Some("true"), false)],
        ),
        (
            "opt-in",
            vec![("plain", None, false), ("asks", Some("true"), true)],
        ),
        (
            "on",
            vec![("plain", None, true), ("declines", Some("false"), false)],
        ),
    ] {
        let h = harness(Opts {
            extra_args: vec!["--lazy-disks".into(), mode.into()],
            ..Opts::default()
        })
        .await;
        for (name, value, lazy) in pods {
            let p = annotated(name, value);
            let (seen, seen_events) = (h.hv.log.calls().len(), h.events.lock().unwrap().len());
            h.provider.create_pod(&p).await.unwrap();
            h.until(&p, "VM running", running).await;
            let calls = h.hv.log.calls()[seen..].to_vec();
            let asked = calls.iter().filter(|c| c.starts_with("pull_lazy")).count();
            let pulls = calls.iter().filter(|c| c.starts_with("pull ")).count();
            assert_eq!(asked, usize::from(lazy), "{mode} {name}: {calls:?}");
            assert_eq!(
                pulls, 1,
                "{mode} {name}: always one full pull here: {calls:?}"
            );
            let said: Vec<_> = h.events.lock().unwrap()[seen_events..]
                .iter()
                .filter(|(_, e)| e.reason == "LazyDiskUnavailable")
                .cloned()
                .collect();
            assert_eq!(said.len(), usize::from(lazy), "{mode} {name}");
            if lazy {
                assert!(
                    said[0].1.message.contains("serves no disk on demand"),
                    "{:?}",
                    said[0].1
                );
            }
            h.provider
                .delete_pod(&p, Duration::from_secs(1))
                .await
                .unwrap();
        }
    }
}
