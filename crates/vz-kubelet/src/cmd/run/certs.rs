//! The node's credentials at start-up: the PEM files it is given are checked (an X.509 v1
//! certificate is refused with one message), then the client comes from `--kubeconfig`
//! as given, or from the TLS bootstrap (`--bootstrap-kubeconfig`, see `vzk_certs`), whose
//! certificate then rotates while the agent runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tracing::{info, warn};
use vzk_certs::client::{BootstrapOptions, ClientRotation};
use vzk_certs::inspect;

/// The advice appended to a refused kubeconfig certificate.
const BOOTSTRAP_HINT: &str =
    "; or let the agent request its own with --bootstrap-kubeconfig (TLS bootstrap)";

/// The node's client, and the renewal task when the agent manages the certificate.
pub(crate) struct Credentials {
    pub(crate) client: kube::Client,
    pub(crate) rotation: Option<ClientRotation>,
}

/// Where the node's client comes from.
pub(crate) struct ClientSource<'a> {
    pub(crate) kubeconfig: Option<&'a PathBuf>,
    pub(crate) bootstrap_kubeconfig: Option<&'a PathBuf>,
    pub(crate) node_name: &'a str,
    pub(crate) data_dir: &'a Path,
    pub(crate) csr_timeout: Duration,
}

/// Refuses an X.509 v1/v2 `--tls-cert-file` with one message (before anything else runs).
pub(crate) fn check_serving_cert(tls_cert_file: Option<&Path>) -> anyhow::Result<()> {
    if let Some(cert) = tls_cert_file {
        inspect::check_leaf_file(
            cert,
            "--tls-cert-file, the kubelet API's serving certificate",
            "; or drop --tls-cert-file (a self-signed certificate) or use --rotate-server-certificates",
        )?;
    }
    Ok(())
}

/// The client CA bundle must hold readable certificates. (A v1 CA is fine: rustls takes it
/// as a trust anchor.)
pub(crate) fn check_client_ca(client_ca_file: &Path) -> anyhow::Result<()> {
    inspect::check_ca_file(client_ca_file).context("--client-ca-file")?;
    Ok(())
}

/// Why `--kubeconfig` is not usable as it is, if it is not (its client certificate is X.509
/// v1 or expired). Errors reading it are returned as such.
fn kubeconfig_trouble(path: &Path) -> anyhow::Result<Option<String>> {
    let info = match inspect::check_kubeconfig(path, BOOTSTRAP_HINT) {
        Ok(Some(info)) => info,
        Ok(None) => return Ok(None),
        Err(e @ vzk_certs::CertError::NotV3 { .. }) => return Ok(Some(vzk_core::error_chain(&e))),
        Err(e) => return Err(e.into()),
    };
    if info.not_after <= SystemTime::now() {
        return Ok(Some(format!(
            "the client certificate of kubeconfig {} expired (serial {})",
            path.display(),
            info.serial
        )));
    }
    Ok(None)
}

/// The node's client: `--kubeconfig` if given and usable, else the TLS bootstrap with
/// `--bootstrap-kubeconfig` (reusing a valid certificate stored in the data dir), else the
/// inferred kubeconfig.
pub(crate) async fn node_client(src: ClientSource<'_>) -> anyhow::Result<Credentials> {
    if let Some(kc) = src.kubeconfig {
        let trouble = if kc.exists() || src.bootstrap_kubeconfig.is_none() {
            kubeconfig_trouble(kc)?
        } else {
            Some(format!("{} does not exist", kc.display()))
        };
        match (trouble, src.bootstrap_kubeconfig) {
            (None, _) => {
                let client = vzk_certs::client::static_client(kc).await?;
                return Ok(Credentials {
                    client,
                    rotation: None,
                });
            }
            (Some(why), None) => bail!("{why}"),
            (Some(why), Some(_)) => {
                warn!(kubeconfig = %kc.display(), %why, "not using --kubeconfig; TLS bootstrap with --bootstrap-kubeconfig");
            }
        }
    }
    let Some(bootstrap) = src.bootstrap_kubeconfig else {
        let config = kube::Config::infer()
            .await
            .context("finding a kubeconfig (pass --kubeconfig or --bootstrap-kubeconfig)")?;
        let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
        return Ok(Credentials {
            client,
            rotation: None,
        });
    };
    if let Some((pem, name)) = inspect::kubeconfig_client_cert(bootstrap)? {
        inspect::check_leaf_pem(
            &pem,
            &name,
            &format!(
                "the client certificate of --bootstrap-kubeconfig {}",
                bootstrap.display()
            ),
            "",
        )?;
    }
    let nc = vzk_certs::client::node_client(&BootstrapOptions {
        node_name: src.node_name.to_owned(),
        data_dir: src.data_dir.to_owned(),
        bootstrap_kubeconfig: bootstrap.clone(),
        csr_timeout: src.csr_timeout,
    })
    .await
    .context("TLS bootstrap")?;
    info!(kubeconfig = %nc.kubeconfig.display(), bootstrapped = nc.bootstrapped, "node client certificate managed by the agent (rotated before it expires)");
    Ok(Credentials {
        client: nc.client,
        rotation: Some(nc.rotation),
    })
}
