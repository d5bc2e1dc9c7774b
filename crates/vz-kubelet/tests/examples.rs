//! The shipped manifests and service files are valid: every `examples/*.yaml` passes a
//! server-side dry run on the real kube-apiserver (schema, defaulting and admission),
//! and the launchd plist parses.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test]
async fn every_example_manifest_passes_a_server_side_dry_run() {
    let cp = vzk_testenv::ControlPlane::shared();
    let ns = cp.create_namespace("examples").await;
    let mut checked = 0;
    let dir = repo().join("examples");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        // The demo manifest has a placeholder the demo script fills in.
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .replace("REGISTRY", "127.0.0.1:5000");
        let tmp = std::env::temp_dir().join(format!(
            "vzk-example-{}-{}",
            std::process::id(),
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x.yaml")
        ));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        let out = cp
            .kubectl()
            .args(["apply", "--dry-run=server", "-n", &ns, "-f"])
            .arg(&tmp)
            .output()
            .unwrap_or_else(|e| panic!("kubectl: {e}"));
        let _ = std::fs::remove_file(&tmp);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected the shipped examples, found {checked}"
    );
}

#[test]
fn the_launchd_plist_parses_and_runs_the_agent() {
    let path = repo().join("deploy/launchd/io.vz-kubelet.plist");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import plistlib,sys; p=plistlib.load(open(sys.argv[1],'rb')); print(' '.join(p['ProgramArguments']))",
        ])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "/usr/local/bin/vz-kubelet run"
    );
}

#[test]
fn the_systemd_unit_starts_the_agent_and_spares_the_vms() {
    let path = repo().join("deploy/systemd/vz-kubelet.service");
    let unit = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/local/bin/vz-kubelet run")
    );
    // Re-adoption depends on this: systemd must not kill the VMs' QEMU processes.
    assert!(unit.lines().any(|l| l == "KillMode=process"));
}
