//! `vz-kubelet run`: register the node and run its pods.
//!
//! Wires the provider-agnostic runtime (node controller, pod controller, kubelet API)
//! to the VM provider. Flags are parsed here (raw), validated into a `NodeConfig`, and
//! nothing downstream sees an unvalidated value.
//!
//! Shutdown: the first SIGTERM/SIGINT stops the controllers and the kubelet API, then
//! each pod's tasks, and waits up to 15 s for them; a second signal exits at once. VMs are left running on
//! purpose: a restarted agent re-adopts them, so an agent upgrade does not kill CI jobs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vzk_node::pods::PodControllerConfig;
use vzk_node::{NodeConfig, NodeController, PodController, TaintSpec};

mod certs;

/// Flags of `vz-kubelet run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Kubeconfig with the node's identity (`CN=system:node:<name>, O=system:nodes`).
    /// Default: $KUBECONFIG, ~/.kube/config, or the in-cluster service account; with
    /// --bootstrap-kubeconfig, the certificate the agent obtained itself.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// TLS bootstrap: a kubeconfig whose credentials (e.g. a bootstrap token) may request the
    /// node's client certificate by CSR when the data dir holds no valid one (and
    /// --kubeconfig is not given or not usable). The certificate is stored in
    /// `<data-dir>/pki/kubelet-client-current.pem` (+ `<data-dir>/kubelet.kubeconfig`) and
    /// renewed at 70-90 % of its lifetime without a restart.
    #[arg(long, env = "VZK_BOOTSTRAP_KUBECONFIG")]
    bootstrap_kubeconfig: Option<PathBuf>,
    /// Request the kubelet API's serving certificate from the cluster (CSR, signer
    /// `kubernetes.io/kubelet-serving`, to be approved by an operator or approver), store it
    /// in `<data-dir>/pki/kubelet-server-current.pem` and renew it. Until it is issued the
    /// kubelet API refuses every connection.
    #[arg(
        long,
        env = "VZK_ROTATE_SERVER_CERTIFICATES",
        conflicts_with = "tls_cert_file"
    )]
    rotate_server_certificates: bool,
    /// How long a certificate signing request is waited for: the TLS bootstrap fails after
    /// it, a renewal tries again, a pending serving certificate is reported again.
    #[arg(long, env = "VZK_CSR_TIMEOUT_SECONDS", default_value_t = 900)]
    csr_timeout_seconds: u64,
    /// Node name (default: the host name, lowercased).
    #[arg(long, env = "VZK_NODE_NAME")]
    node_name: Option<String>,
    /// Address the API server reaches this node's kubelet API on (default: the first
    /// non-loopback IPv4 address of the host, else 127.0.0.1).
    #[arg(long, env = "VZK_NODE_IP")]
    node_ip: Option<IpAddr>,
    /// Taint set when the node registers, `key[=value]:Effect`.
    #[arg(
        long,
        env = "VZK_TAINT",
        default_value = "virtual-kubelet.io/provider=vz:NoSchedule"
    )]
    taint: String,
    /// Register without any taint.
    #[arg(long, env = "VZK_NO_TAINT")]
    no_taint: bool,
    /// Extra node label `key=value` (repeatable). Labels the NodeRestriction admission
    /// plugin forbids a node to set (e.g. `node-role.kubernetes.io/*`) are refused at
    /// start-up: an operator sets those.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Address the kubelet API listens on.
    #[arg(long, env = "VZK_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// Port of the kubelet API.
    #[arg(long, env = "VZK_KUBELET_PORT", default_value_t = 10250)]
    kubelet_port: u16,
    /// Serving certificate of the kubelet API (PEM); reloaded when it changes.
    #[arg(long, env = "VZK_TLS_CERT_FILE", requires = "tls_private_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// Private key of the serving certificate (PEM).
    #[arg(long, env = "VZK_TLS_PRIVATE_KEY_FILE", requires = "tls_cert_file")]
    tls_private_key_file: Option<PathBuf>,
    /// CA that signs client certificates accepted by the kubelet API (the cluster CA,
    /// which signs the API server's kubelet client certificate).
    #[arg(long, env = "VZK_CLIENT_CA_FILE")]
    client_ca_file: PathBuf,
    /// Let requests without credentials through as `system:anonymous` (still
    /// authorized by SubjectAccessReview). Off by default.
    #[arg(long, env = "VZK_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// Seconds between lease renewals.
    #[arg(long, env = "VZK_LEASE_RENEW_SECONDS", default_value_t = 10)]
    lease_renew_seconds: u64,
    /// Seconds after start-up at which the agent hands its start-up code back to the
    /// system (the binary's resident read-only pages are reclaimed; what still runs
    /// faults back in). 0 turns it off.
    #[arg(long, env = "VZK_PAGE_OUT_AFTER_SECONDS", default_value_t = 60)]
    page_out_after_seconds: u64,
    #[command(flatten)]
    provider: vzk_provider::ProviderArgs,
    #[command(flatten)]
    backend: vzk_backend::BackendArgs,
}

/// Validated settings.
struct Settings {
    node: NodeConfig,
    listen: SocketAddr,
}

impl RunArgs {
    fn settings(&self) -> anyhow::Result<Settings> {
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .context("reading the host name (pass --node-name)")?
                .to_string_lossy()
                .to_lowercase(),
        };
        let mut node = NodeConfig::new(node_name);
        node.taint = if self.no_taint {
            None
        } else {
            Some(TaintSpec::parse(&self.taint)?)
        };
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            let Some((k, v)) = l.split_once('=') else {
                bail!("invalid --label {l:?}: expected KEY=VALUE");
            };
            labels.insert(k.to_owned(), v.to_owned());
        }
        node.labels = labels;
        node.internal_ip = self.node_ip.unwrap_or_else(default_node_ip);
        node.hostname = node.node_name.clone();
        node.kubelet_port = self.kubelet_port;
        node.lease_renew_interval = Duration::from_secs(self.lease_renew_seconds.max(1));
        node.status_check_interval = node.lease_renew_interval;
        node.data_dir = self.provider.data_dir.clone();
        if vzk_kubelet_api::WEBSOCKETS_SUPPORTED {
            node.declared_features = vec![vzk_kubelet_api::EXTEND_WEBSOCKETS_TO_KUBELET.to_owned()];
        }
        node.validate()?;
        Ok(Settings {
            node,
            listen: SocketAddr::new(self.listen_address, self.kubelet_port),
        })
    }
}

fn default_node_ip() -> IpAddr {
    let found = nix::ifaddrs::getifaddrs().ok().and_then(|addrs| {
        addrs
            .filter(|a| {
                !a.flags
                    .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
            })
            .filter_map(|a| a.address?.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())))
            .next()
    });
    found.unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Where the kubelet API's serving certificate comes from.
fn serving_cert(args: &RunArgs, node: &NodeConfig) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let (Some(c), Some(k)) = (&args.tls_cert_file, &args.tls_private_key_file) {
        return Ok((c.clone(), k.clone()));
    }
    if args.rotate_server_certificates {
        // Certificate and key in one file, written by the serving certificate manager.
        let pem = vzk_certs::files::pki_path(&args.provider.data_dir, vzk_certs::SERVER_CERT_FILE);
        return Ok((pem.clone(), pem));
    }
    // Like the kubelet without --tls-cert-file: a self-signed certificate for this node.
    let dir = args.provider.data_dir.join("pki");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (crt, key) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    if !crt.exists() || !key.exists() {
        let sans = vec![
            node.node_name.clone(),
            node.internal_ip.to_string(),
            "localhost".to_owned(),
        ];
        let cert = rcgen::generate_simple_self_signed(sans)
            .context("generating a self-signed serving certificate")?;
        std::fs::write(&crt, cert.cert.pem())
            .with_context(|| format!("writing {}", crt.display()))?;
        std::fs::write(&key, cert.signing_key.serialize_pem())
            .with_context(|| format!("writing {}", key.display()))?;
        info!(cert = %crt.display(), "generated a self-signed kubelet serving certificate");
    }
    Ok((crt, key))
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let node = settings.node;
    // Before anything touches the data dir's VMs, NAT network or dnsmasq: one agent per
    // data dir (held until the process exits).
    let _data_dir_lock = vzk_backend::lock_data_dir(&args.provider.data_dir)?;
    certs::check_serving_cert(args.tls_cert_file.as_deref())?;
    let csr_timeout = Duration::from_secs(args.csr_timeout_seconds.max(1));
    let credentials = certs::node_client(certs::ClientSource {
        kubeconfig: args.kubeconfig.as_ref(),
        bootstrap_kubeconfig: args.bootstrap_kubeconfig.as_ref(),
        node_name: &node.node_name,
        data_dir: &args.provider.data_dir,
        csr_timeout,
    })
    .await?;
    // Every request of the agent to the API server is counted for /metrics.
    let api_requests = vzk_node::api_metrics::ApiRequestMetrics::default();
    let client = api_requests.wrap(credentials.client);
    certs::check_client_ca(&args.client_ca_file)?;
    let hypervisor = vzk_backend::open(&args.backend, &args.provider.data_dir.join("qemu"))
        .await
        .context("starting the hypervisor backend")?;
    let provider = vzk_provider::VmProvider::new(
        args.provider.clone(),
        &node.node_name,
        node.internal_ip,
        client.clone(),
        hypervisor,
    )
    .await
    .context("starting the VM provider")?;

    let token = CancellationToken::new();
    let node_controller = NodeController::new(client.clone(), node.clone(), provider.clone());
    let mut pod_config = PodControllerConfig::new(&node.node_name, node.internal_ip.to_string());
    if let Ok(cap) = vzk_core::NodeProvider::capacity(provider.as_ref()).await {
        for (k, q) in cap {
            if let Some(v) = vzk_node::quantity::parse(&q.0) {
                pod_config.allocatable.insert(k, v);
            }
        }
    }
    let pods = PodController::new(client.clone(), pod_config, provider.clone());
    // One registry for /metrics: the provider's series and the kubelet API's own.
    let mut registry = prometheus_client::registry::Registry::default();
    provider.register_metrics(&mut registry);
    api_requests.register(&mut registry);
    let view = pods.view();

    let (crt, key) = serving_cert(&args, &node)?;
    let listener = vzk_kubelet_api::KubeletServer::bind(settings.listen)
        .with_context(|| format!("binding the kubelet API to {}", settings.listen))?;
    let server = vzk_kubelet_api::KubeletServer::builder()
        .provider(provider.clone())
        .node_name(&node.node_name)
        .pods(Arc::new(move || view.pods()))
        .tls(crt, key, args.client_ca_file.clone())
        .authenticator(client.clone())
        .allow_anonymous(args.allow_anonymous)
        .wait_for_serving_certificate(args.rotate_server_certificates)
        .metrics_registry(registry)
        .build()
        .context("configuring the kubelet API")?;
    info!(node = %node.node_name, listen = %settings.listen, "vz-kubelet running");

    let tracker = tokio_util::task::TaskTracker::new();
    if let Some(rotation) = credentials.rotation {
        tracker.spawn(rotation.run(token.clone()));
    }
    if args.rotate_server_certificates {
        let reloader = server.certificate_reloader();
        let manager = vzk_certs::serving::ServingCertManager::new(
            client.clone(),
            &node.node_name,
            &[node.internal_ip],
            std::slice::from_ref(&node.hostname),
            &args.provider.data_dir,
            csr_timeout,
            Arc::new(move || {
                if let Err(e) = reloader.reload() {
                    warn!(error = %vzk_core::error_chain(&e), "kubelet api: the new serving certificate did not load");
                }
            }),
        );
        tracker.spawn(manager.run(token.clone()));
    }
    let t = token.clone();
    tracker.spawn(async move { node_controller.run(t).await });
    let t = token.clone();
    tracker.spawn(async move {
        if let Err(e) = pods.run(t.clone()).await {
            tracing::error!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "pod controller stopped"
            );
            t.cancel();
        }
    });
    let t = token.clone();
    tracker.spawn(async move { server.serve(listener, t.cancelled_owned()).await });
    if args.page_out_after_seconds > 0 {
        let after = Duration::from_secs(args.page_out_after_seconds);
        let t = token.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(after) => {}
                () = t.cancelled() => return,
            }
            match tokio::task::spawn_blocking(crate::memory::page_out_own_code).await {
                Ok(Ok(bytes)) => tracing::debug!(bytes, "start-up code paged out"),
                Ok(Err(e)) => tracing::debug!(error = %e, "could not page out start-up code"),
                Err(e) => tracing::debug!(error = %e, "page-out task failed"),
            }
        });
    }
    tracker.close();

    tokio::select! {
        () = shutdown_signal() => info!("shutting down; VMs keep running and are re-adopted on the next start"),
        () = token.cancelled() => warn!("a component stopped; shutting down"),
    }
    token.cancel();
    let stopped = async {
        tracker.wait().await;
        // Then each pod's tasks (VMs and side-car containers keep running).
        provider.shutdown(Duration::from_secs(10)).await;
    };
    tokio::select! {
        () = stopped => {}
        () = tokio::time::sleep(Duration::from_secs(15)) => warn!("components did not stop within 15 s"),
        () = shutdown_signal() => warn!("second signal: exiting now"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is nothing to wait for but the process's end.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
