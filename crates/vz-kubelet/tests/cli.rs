//! The binary's start-up checks, run as a user would run it.

use std::process::Command;

fn vz_kubelet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vz-kubelet"))
}

#[test]
fn a_label_node_restriction_forbids_stops_the_agent_at_start_up_naming_it() {
    let out = vz_kubelet()
        .args([
            "run",
            "--node-name",
            "n1",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "--client-ca-file",
            "/nonexistent/ca.crt",
            "--label",
            "node-role.kubernetes.io/ci=true",
        ])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("running vz-kubelet: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse to start: {stderr}");
    assert!(stderr.contains("node-role.kubernetes.io/ci"), "{stderr}");
    assert!(stderr.contains("NodeRestriction"), "{stderr}");
    // It failed before touching the kubeconfig: the label check comes first.
    assert!(!stderr.contains("kubeconfig"), "{stderr}");
}

#[test]
fn malformed_taints_and_labels_are_reported_clearly() {
    for (args, expect) in [
        (
            ["--node-name", "ok-node", "--taint", "novalue"],
            "invalid taint",
        ),
        (
            ["--node-name", "ok-node", "--label", "justakey"],
            "expected KEY=VALUE",
        ),
        (
            ["--node-name", "Bad_Name", "--label", "a=b"],
            "invalid node name",
        ),
    ] {
        let out = vz_kubelet()
            .args(["run", "--client-ca-file", "/x"])
            .args(args)
            .output();
        let out = match out {
            Ok(o) => o,
            Err(e) => panic!("running vz-kubelet: {e}"),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

/// Runs `vz-kubelet image …` with `args`; returns (success, stdout, stderr).
fn image(args: &[&str], config_dir: &std::path::Path) -> (bool, String, String) {
    let out = vz_kubelet()
        .arg("image")
        .args(args)
        // Never the machine's own configuration or credentials.
        .env("VZK_REGISTRY_CONFIG_DIR", config_dir)
        .env("DOCKER_CONFIG", config_dir)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("running vz-kubelet image: {e}"),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn image_pull_uses_the_mirrors_of_the_registry_config_dir() {
    let upstream = vzk_testenv::Registry::start();
    let mirror = vzk_testenv::Registry::start();
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("tempdir: {e}"),
    };
    let write = |p: std::path::PathBuf, bytes: &[u8]| {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir: {e}"));
        }
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    };
    let src = tmp.path().join("src");
    write(
        src.join("config.json"),
        br#"{"os":"linux","kernelCmdline":"console=ttyS0"}"#,
    );
    write(src.join("kernel"), &[7u8; 100_000]);
    write(src.join("disk.img"), &vec![1u8; 3 << 20]);
    let empty = tmp.path().join("no-config");
    std::fs::create_dir(&empty).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let root = tmp.path().join("cache");
    let root = root.to_string_lossy().into_owned();
    let src_arg = src.to_string_lossy().into_owned();
    let image_on = |addr: &str| format!("{addr}/vm/cli:1");
    // The same image on both: the mirror's copy has a manifest of its own (its own
    // creation time), which tells who served the pull.
    let mut digests = Vec::new();
    for addr in [&upstream.addr, &mirror.addr] {
        let (ok, out, err) = image(
            &[
                "push",
                "--root",
                &root,
                "-o",
                "json",
                &src_arg,
                &image_on(addr),
            ],
            &empty,
        );
        assert!(ok, "push to {addr}: {err}");
        let report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("push output {out:?}: {e}"));
        digests.push(report["digest"].as_str().unwrap_or_default().to_owned());
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_ne!(digests[0], digests[1], "two manifests");
    let config = tmp.path().join("certs.d");
    write(
        config.join(&upstream.addr).join("hosts.toml"),
        format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.addr
        )
        .as_bytes(),
    );
    let wanted = image_on(&upstream.addr);
    drop(upstream);
    let config_arg = config.to_string_lossy().into_owned();
    let (ok, out, err) = image(
        &[
            "pull",
            "--root",
            &root,
            "-o",
            "json",
            "--registry-config-dir",
            &config_arg,
            &wanted,
        ],
        &empty,
    );
    assert!(ok, "pull through the mirror: {err}");
    let pulled: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("pull output {out:?}: {e}"));
    assert_eq!(
        pulled["digest"].as_str(),
        Some(digests[1].as_str()),
        "the mirror's manifest"
    );
    assert_eq!(pulled["reference"].as_str(), Some(wanted.as_str()));
    // Without the configuration the pull goes to the upstream, which is gone.
    let (ok, _, err) = image(&["pull", "--root", &root, &wanted], &empty);
    assert!(!ok, "the upstream is down");
    assert!(err.contains(&wanted), "{err}");
    // A bad file stops the command, naming file, line and column.
    write(
        config.join("_default/hosts.toml"),
        b"[host.\"http://127.0.0.1:1\"]\n  skip_verfy = true\n",
    );
    let (ok, _, err) = image(
        &[
            "pull",
            "--root",
            &root,
            "--registry-config-dir",
            &config_arg,
            &wanted,
        ],
        &empty,
    );
    assert!(!ok);
    assert!(err.contains("_default/hosts.toml:2:3"), "{err}");
    assert!(err.contains("unknown field `skip_verfy`"), "{err}");
}

#[test]
fn a_second_agent_on_the_same_data_dir_stops_at_start_up_naming_the_first() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temp dir: {e}"),
    };
    let data = dir.path().join("data");
    // This test process is "the first agent": it holds the data dir's lock.
    let first = match vzk_backend::lock_data_dir(&data) {
        Ok(l) => l,
        Err(e) => panic!("locking: {e}"),
    };
    let run = |data: &std::path::Path| {
        let out = vz_kubelet()
            .args([
                "run",
                "--node-name",
                "n2",
                "--client-ca-file",
                "/nonexistent/ca.crt",
            ])
            .arg("--kubeconfig")
            .arg("/nonexistent/kubeconfig")
            .arg("--data-dir")
            .arg(data)
            .output();
        match out {
            Ok(o) => o,
            Err(e) => panic!("running vz-kubelet: {e}"),
        }
    };
    let out = run(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse to start: {stderr}");
    assert!(
        stderr.contains(&format!(
            "another vz-kubelet (pid {}) already runs with data dir {}",
            std::process::id(),
            data.display()
        )),
        "{stderr}"
    );
    // Nothing was started: it stopped before reading the kubeconfig.
    assert!(!stderr.contains("kubeconfig"), "{stderr}");
    // Once the first agent is gone the lock is free: the same command gets past it (and
    // stops at the missing kubeconfig instead).
    drop(first);
    let out = run(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("another vz-kubelet"), "{stderr}");
    assert!(stderr.contains("kubeconfig"), "{stderr}");
}

#[test]
fn a_macosvm_bundle_is_imported_pushed_as_tart_and_converted_with_json_progress() {
    let reg = vzk_testenv::Registry::start();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let disk: Vec<u8> = (0..(5u32 << 20)).map(|i| (i / 4096 % 7) as u8).collect();
    std::fs::write(bundle.join("disk.img"), &disk).unwrap_or_else(|e| panic!("disk: {e}"));
    std::fs::write(bundle.join("aux.img"), vec![3u8; 65536]).unwrap_or_else(|e| panic!("aux: {e}"));
    // macosvm's spec, as its README shows it (platform data from a real VM).
    std::fs::write(
        bundle.join("vm.json"),
        br#"{"hardwareModel":"YnBsaXN0MDDTAQIDBAUGXxAZRGF0YVJlcHJlc2VudGF0aW9uVmVyc2lvbl8QD1BsYXRmb3JtVmVyc2lvbl8QEk1pbmltdW1TdXBwb3J0ZWRPUxQAAAAAAAAAAAAAAAAAAAABEAKjBwgIEA0QAAgPKz1SY2VpawAAAAAAAAEBAAAAAAAAAAkAAAAAAAAAAAAAAAAAAABt",
            "storage":[{"type":"disk","file":"disk.img","readOnly":false},{"type":"aux","file":"aux.img","readOnly":false}],
            "ram":4294967296,"machineId":"YnBsaXN0MDDRAQJURUNJRBMWYaHTD7Jo1QgLEAAAAAAAAAEBAAAAAAAAAAMAAAAAAAAAAAAAAAAAAAAZ",
            "displays":[{"dpi":200,"width":2560,"height":1600}],"version":1,"cpus":2,"networks":[{"type":"nat"}],"audio":false}"#,
    )
    .unwrap_or_else(|e| panic!("spec: {e}"));
    let empty = tmp.path().join("no-config");
    std::fs::create_dir(&empty).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let (root, dir) = (s(tmp.path().join("cache")), s(tmp.path().join("image")));

    let (ok, out, err) = image(&["import", "-o", "json", &s(bundle.clone()), &dir], &empty);
    assert!(ok, "import: {err}");
    let rep: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("import output {out:?}: {e}"));
    assert_eq!(rep["kind"], "macosvm");
    assert_eq!(rep["config"]["cpus"], 2);
    // Not a terminal: progress comes as JSON lines on stderr.
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("event").is_some())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"begin"), "{err}");
    assert_eq!(kinds.last(), Some(&"done"), "{err}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "progress" && e["percent"] == 100),
        "{err}"
    );

    let tart = format!("{}/mac/bundle:tart", reg.addr);
    let (ok, _, err) = image(
        &["push", "--root", &root, "--format", "tart", &dir, &tart],
        &empty,
    );
    assert!(ok, "push tart: {err}");
    let vzk = format!("{}/mac/bundle:vzk", reg.addr);
    let (ok, out, err) = image(
        &["convert", "--root", &root, "-o", "json", &tart, &vzk],
        &empty,
    );
    assert!(ok, "convert: {err}");
    let rep: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("convert output {out:?}: {e}"));
    assert_eq!(rep["sourceFormat"], "tart");
    assert_eq!(rep["verified"]["format"], "vzk");
    assert_eq!(rep["verified"]["bytes"], (5u64 << 20) + 65536);

    // A raw macOS disk without its auxiliary storage is refused, naming the flag.
    let (ok, _, err) = image(
        &[
            "import",
            "--raw",
            "--os",
            "darwin",
            &s(bundle.join("disk.img")),
            &s(tmp.path().join("raw")),
        ],
        &empty,
    );
    assert!(!ok);
    assert!(err.contains("--aux"), "{err}");
    assert!(!tmp.path().join("raw").exists());
}

#[cfg(not(target_os = "macos"))]
#[test]
fn image_create_macos_elsewhere_says_it_needs_a_mac_and_makes_nothing() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dest = tmp.path().join("sonoma");
    let (ok, _, err) = image(
        &[
            "create",
            "macos",
            "--ipsw",
            "https://updates.cdn-apple.com/UniversalMac_14.6.1_23G93_Restore.ipsw",
            "--root",
            &tmp.path().join("cache").to_string_lossy(),
            &dest.to_string_lossy(),
        ],
        tmp.path(),
    );
    assert!(!ok);
    assert!(err.contains("needs a Mac with Apple silicon"), "{err}");
    assert!(!dest.exists());
    assert!(
        !tmp.path().join("cache/ipsw").exists(),
        "nothing downloaded"
    );
}
