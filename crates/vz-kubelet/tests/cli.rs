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
