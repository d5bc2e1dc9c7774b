//! `vzk-cluster`: a local control plane for the demo and for trying vz-kubelet by hand.
//!
//! Starts etcd + kube-apiserver (Node,RBAC + NodeRestriction) from `KUBEBUILDER_ASSETS`,
//! prepares the `default` namespace, issues the node identity for `--node`, writes
//! `<dir>/cluster.env` (shell variables: ADMIN_KUBECONFIG, NODE_KUBECONFIG, CA_FILE,
//! SERVER) and runs until SIGINT/SIGTERM, then stops everything.

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: vzk-cluster --dir DIR --node NODE_NAME");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut node) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--node" => node = args.next(),
            _ => usage(),
        }
    }
    let (Some(dir), Some(node)) = (dir, node) else {
        usage()
    };
    if let Err(e) = run(&dir, &node) {
        eprintln!("vzk-cluster: {e}");
        std::process::exit(1);
    }
}

fn run(dir: &std::path::Path, node: &str) -> Result<(), String> {
    let cp = vzk_testenv::ControlPlane::start().map_err(|e| vzk_testenv::error_chain(&e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    rt.block_on(cp.prepare_namespace("default"))
        .map_err(|e| format!("preparing namespace default: {e}"))?;
    let id = cp.node_identity(node);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let env = format!(
        "ADMIN_KUBECONFIG={}\nNODE_KUBECONFIG={}\nCA_FILE={}\nSERVER={}\nAUDIT_LOG={}\n",
        cp.admin_kubeconfig().display(),
        id.kubeconfig.display(),
        cp.ca_cert_path().display(),
        cp.server_url(),
        cp.audit_log_path().display(),
    );
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
