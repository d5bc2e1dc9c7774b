//! `vzk-cluster`: a local control plane for the demo and for trying vz-kubelet by hand.
//!
//! Starts etcd + kube-apiserver (Node,RBAC + NodeRestriction) from `KUBEBUILDER_ASSETS`,
//! prepares the `default` namespace, issues the node identity for `--node`, writes
//! `<dir>/cluster.env` (shell variables: ADMIN_KUBECONFIG, NODE_KUBECONFIG, CA_FILE,
//! SERVER, AUDIT_LOG, and METRICS_SERVER_LOG with `--metrics-server`) and runs until
//! SIGINT/SIGTERM, then stops everything.
//!
//! `--metrics-server` also starts metrics-server (from `$KUBEBUILDER_ASSETS/extra`) behind
//! the API server's aggregation layer, so that `kubectl top node|pod` works; cluster.env is
//! written once its APIService is Available.

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: vzk-cluster --dir DIR --node NODE_NAME [--metrics-server]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut node, mut metrics_server) = (None, None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--node" => node = args.next(),
            "--metrics-server" => metrics_server = true,
            _ => usage(),
        }
    }
    let (Some(dir), Some(node)) = (dir, node) else {
        usage()
    };
    if let Err(e) = run(&dir, &node, metrics_server) {
        eprintln!("vzk-cluster: {e}");
        std::process::exit(1);
    }
}

fn run(dir: &std::path::Path, node: &str, metrics_server: bool) -> Result<(), String> {
    let cp = vzk_testenv::ControlPlane::start().map_err(|e| vzk_testenv::error_chain(&e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    rt.block_on(cp.prepare_namespace("default"))
        .map_err(|e| format!("preparing namespace default: {e}"))?;
    if metrics_server {
        rt.block_on(cp.start_metrics_server()).map_err(|e| {
            // Its log goes with the control plane's directory: show its end now.
            let log = std::fs::read_to_string(cp.metrics_server_log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "starting metrics-server: {}\n{}",
                vzk_testenv::error_chain(&e),
                tail.join("\n")
            )
        })?;
    }
    let id = cp.node_identity(node);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut env = format!(
        "ADMIN_KUBECONFIG={}\nNODE_KUBECONFIG={}\nCA_FILE={}\nSERVER={}\nAUDIT_LOG={}\n",
        cp.admin_kubeconfig().display(),
        id.kubeconfig.display(),
        cp.ca_cert_path().display(),
        cp.server_url(),
        cp.audit_log_path().display(),
    );
    if metrics_server {
        env.push_str(&format!(
            "METRICS_SERVER_LOG={}\n",
            cp.metrics_server_log_path().display()
        ));
    }
    let env_path = dir.join("cluster.env");
    std::fs::write(&env_path, env).map_err(|e| format!("writing {}: {e}", env_path.display()))?;
    eprintln!(
        "vzk-cluster: API server at {}; wrote {}",
        cp.server_url(),
        env_path.display()
    );
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    });
    eprintln!("vzk-cluster: stopping");
    drop(cp);
    Ok(())
}
