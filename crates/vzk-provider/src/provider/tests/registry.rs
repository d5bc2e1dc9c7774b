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
