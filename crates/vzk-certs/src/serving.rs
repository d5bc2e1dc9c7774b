//! The kubelet API's serving certificate from the cluster (`--rotate-server-certificates`).
//!
//! Requested with signer `kubernetes.io/kubelet-serving` as the node itself, for the node's
//! InternalIP and host name; stored as `<data-dir>/pki/kubelet-server-current.pem` (chain +
//! key, 0600) and renewed at a jittered 70–90 % of its lifetime. The kube-controller-manager
//! never approves these CSRs on its own: until someone approves (`kubectl certificate
//! approve <csr>`), the manager keeps waiting on the same CSR and says so every
//! `reminder`; a denied, failed or deleted CSR is followed by a new one after a back-off.
//! Whoever serves the file (the kubelet API reloads it when it changes) is told through
//! the `on_change` callback as soon as a new certificate is written.
//!
//! Until the first certificate is issued the kubelet API serves nothing (every handshake is
//! refused and logged), not a temporary self-signed certificate: a cluster that wants
//! CA-signed kubelet certificates verifies them (`--kubelet-certificate-authority`) and
//! would refuse a self-signed one anyway, a client that skips verification would talk to a
//! certificate nobody approved, and a refused connection with the pending CSR named in the
//! log makes the missing approval visible.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{show, sleep_until};
use crate::csr::{CsrSpec, finish, generate, submit, wait_issued};
use crate::files::{read_optional, write_private};
use crate::inspect::CertInfo;
use crate::rotation::{jittered_fraction, retry_delay, rotation_deadline, until};
use crate::{CertError, SERVER_CERT_FILE};

/// Keeps the kubelet API's serving certificate issued and fresh.
pub struct ServingCertManager {
    client: kube::Client,
    spec: CsrSpec,
    path: PathBuf,
    reminder: Duration,
    on_change: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for ServingCertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertManager")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ServingCertManager {
    /// For node `node` (SANs: `ips` and `dns`), stored under `<data_dir>/pki`; `client` is the
    /// node's own; `reminder` is how often a pending CSR is reported (e.g. 15 min).
    pub fn new(
        client: kube::Client,
        node: &str,
        ips: &[IpAddr],
        dns: &[String],
        data_dir: &Path,
        reminder: Duration,
        on_change: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            client,
            spec: CsrSpec::node_serving(node, ips, dns),
            path: crate::files::pki_path(data_dir, SERVER_CERT_FILE),
            reminder,
            on_change,
        }
    }

    /// `<data-dir>/pki/kubelet-server-current.pem`: serve it as both certificate and key.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored certificate's facts if it can be served: for this node, its SANs as asked,
    /// valid now.
    pub fn stored(&self) -> Option<CertInfo> {
        match self.check_stored() {
            Ok(info) => info,
            Err(why) => {
                warn!(file = %self.path.display(), %why, "not using the stored serving certificate");
                None
            }
        }
    }

    fn check_stored(&self) -> Result<Option<CertInfo>, String> {
        let Some(pem) = read_optional(&self.path).map_err(|e| crate::chain(&e))? else {
            return Ok(None);
        };
        let name = self.path.display().to_string();
        crate::client::certified_key(&pem, &name).map_err(|e| crate::chain(&e))?;
        let info =
            crate::inspect::check_leaf_pem(&pem, &name, "the kubelet serving certificate", "")
                .map_err(|e| crate::chain(&e))?
                .into_iter()
                .next()
                .ok_or("no certificate")?;
        if info.common_name.as_deref() != Some(self.spec.common_name.as_str()) {
            return Err(format!("it is for {:?}", info.common_name));
        }
        let missing_ip = self
            .spec
            .ip_addresses
            .iter()
            .find(|ip| !info.ip_addresses.contains(ip));
        let missing_dns = self
            .spec
            .dns_names
            .iter()
            .find(|d| !info.dns_names.contains(d));
        if let Some(m) = missing_ip.map(ToString::to_string).or(missing_dns.cloned()) {
            return Err(format!("it does not name {m} (the node's address changed)"));
        }
        if !info.valid_at(SystemTime::now()) {
            return Ok(None);
        }
        Ok(Some(info))
    }

    /// Requests a certificate (waiting as long as it takes, see the module docs) and stores
    /// it. False if `stop` fired first.
    async fn obtain(&self, stop: &CancellationToken) -> bool {
        let mut attempt = 0;
        loop {
            match self.obtain_once(stop).await {
                Ok(Some(info)) => {
                    info!(serial = %info.serial, not_after = %show(info.not_after), file = %self.path.display(), "kubelet serving certificate issued");
                    (self.on_change)();
                    return true;
                }
                Ok(None) => return false,
                Err(e) => {
                    warn!(error = %crate::chain(&e), "kubelet serving certificate: request failed")
                }
            }
            attempt += 1;
            let until_expiry = self.stored().map_or(SystemTime::now(), |i| i.not_after);
            let wait = retry_delay(attempt, SystemTime::now(), until_expiry)
                .max(Duration::from_secs(5 * attempt.min(12) as u64));
            if !sleep_until(SystemTime::now() + wait, stop).await {
                return false;
            }
        }
    }

    async fn obtain_once(&self, stop: &CancellationToken) -> Result<Option<CertInfo>, CertError> {
        let request = generate(&self.spec)?;
        let name = submit(&self.client, &self.spec, &request).await?;
        let cert = loop {
            let waited = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                r = wait_issued(&self.client, &name, self.reminder) => r,
            };
            match waited {
                Ok(cert) => break cert,
                Err(e @ CertError::Timeout { .. }) => {
                    warn!(csr = %name, "kubelet serving certificate still pending: {}", crate::chain(&e));
                }
                Err(e) => return Err(e),
            }
        };
        let (file, info) = finish(&name, &self.spec, &cert, &request)?;
        write_private(&self.path, &file)?;
        Ok(Some(info))
    }

    /// Obtains the certificate if none is stored, then renews it at a jittered 70–90 % of
    /// each lifetime, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut earliest = SystemTime::now();
        loop {
            let Some(cur) = self.stored() else {
                info!(
                    signer = crate::KUBELET_SERVING_SIGNER,
                    "no usable kubelet serving certificate: requesting one; the kubelet API accepts no \
                     connection until it is issued"
                );
                if !self.obtain(&stop).await {
                    return;
                }
                continue;
            };
            let deadline =
                rotation_deadline(cur.not_before, cur.not_after, jittered_fraction()).max(earliest);
            info!(serial = %cur.serial, not_after = %show(cur.not_after), renew_at = %show(deadline), "kubelet serving certificate: next renewal");
            if !sleep_until(deadline, &stop).await || !self.obtain(&stop).await {
                return;
            }
            let left = self
                .stored()
                .map_or(Duration::ZERO, |i| until(i.not_after, SystemTime::now()));
            earliest = SystemTime::now() + (left / 2).min(Duration::from_secs(30));
        }
    }
}
