//! The node's certificates, as the kubelet manages them.
//!
//! * **TLS bootstrap** ([`client::node_client`]): with a bootstrap kubeconfig (a bootstrap
//!   token, or any identity allowed to create CertificateSigningRequests) and no valid client
//!   certificate in the data dir, the node generates an ECDSA P-256 key, asks for a
//!   certificate with a CSR (`certificates.k8s.io/v1`, signer
//!   `kubernetes.io/kube-apiserver-client-kubelet`, `CN=system:node:<name>, O=system:nodes`,
//!   usages digital signature + client auth), waits (watch) until it is approved and issued,
//!   and writes cert + key to `<data-dir>/pki/kubelet-client-current.pem` and a kubeconfig
//!   `<data-dir>/kubelet.kubeconfig` naming that file, both atomically with mode 0600. A
//!   restarted agent reuses the stored certificate while it is valid. Keys never leave the
//!   host: only the CSR (public key + subject) is sent.
//! * **Client rotation without restart** ([`client::RotatingClientCert`]): the
//!   `kube::Client` is built on a rustls `ClientConfig` whose client identity comes from a
//!   `ResolvesClientCert` holding the current certificate behind an `ArcSwap`. Rotation
//!   ([`client::ClientRotation`]) happens at a jittered point in 70–90 % of the certificate's
//!   lifetime ([`rotation::rotation_deadline`]); the renewal CSR is made with the current
//!   certificate (a node may request its own, auto-approved through `selfnodeclient`). A new
//!   certificate is swapped in: open connections (the pod watch, streams) stay, new
//!   connections present the new certificate, and a connection made with an older
//!   certificate is not reused for another request once its current request ends (the API
//!   server checks the certificate's validity on every request, so an idle pooled connection
//!   must not outlive the old certificate). TLS session resumption is off, so a new
//!   connection always sends the current certificate.
//! * **Serving certificate** ([`serving::ServingCertManager`], `--rotate-server-certificates`):
//!   requested with signer `kubernetes.io/kubelet-serving` (SANs: the node's InternalIP and
//!   host name), stored as `<data-dir>/pki/kubelet-server-current.pem`, rotated the same way;
//!   the kubelet API reloads it when the file changes. Such CSRs are not auto-approved by the
//!   controller-manager: an operator (`kubectl certificate approve`) or an approver does it.
//! * **Certificate trouble named** ([`inspect`]): the PEM files the agent is given are checked
//!   at start-up; an X.509 v1 certificate (what `openssl x509 -req` makes without
//!   `-extfile`) is refused with one message naming the file, the cause and the fix, instead
//!   of rustls' repeated `UnsupportedCertVersion`.
//!
//! Files: [`files::write_private`] writes a temporary file (0600) in the same directory,
//! syncs it, renames it over the target and syncs the directory.

pub mod client;
pub mod csr;
pub mod files;
pub mod inspect;
pub mod rotation;
pub mod serving;

use std::path::PathBuf;
use std::time::Duration;

/// Signer of node client certificates.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// Signer of kubelet serving certificates.
pub const KUBELET_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// File holding the node's client certificate and key, under `<data-dir>/pki`.
pub const CLIENT_CERT_FILE: &str = "kubelet-client-current.pem";
/// File holding the kubelet API's serving certificate and key, under `<data-dir>/pki`.
pub const SERVER_CERT_FILE: &str = "kubelet-server-current.pem";
/// The kubeconfig written after bootstrap, under `<data-dir>`.
pub const KUBECONFIG_FILE: &str = "kubelet.kubeconfig";
/// How long a CSR is waited for by default before the wait gives up (the kubelet's
/// `certificateWaitTimeout`).
pub const DEFAULT_CSR_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Errors of certificate handling. Each names the file or object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading a file.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what it should be (no certificate, no key, not X.509, …).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file (or `<kubeconfig> (client-certificate-data)`).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An X.509 v1 or v2 certificate, which rustls refuses.
    #[error(
        "{path} ({what}) is an X.509 v{version} certificate: it has no extensions, and rustls (the TLS \
         library of vz-kubelet) requires X.509 v3. Re-issue it with v3 extensions, e.g. \
         `openssl x509 -req ... -extfile ext.cnf` with basicConstraints, keyUsage, extendedKeyUsage and \
         subjectAltName in ext.cnf (or `kubeadm`/cfssl, which always write v3){hint}"
    )]
    NotV3 {
        /// The file.
        path: String,
        /// What the file is for.
        what: String,
        /// 1 or 2.
        version: u32,
        /// Extra advice (e.g. `--bootstrap-kubeconfig`).
        hint: String,
    },
    /// Reading or using a kubeconfig.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Generating a key or a CSR.
    #[error("generating the {what}")]
    Generate {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// The TLS library refused a key or certificate.
    #[error("{what}")]
    Tls {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// A request to the API server failed.
    #[error("{what}")]
    Api {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The CSR was denied.
    #[error(
        "certificate signing request {name} ({signer}) was denied: {reason}: {message}; ask the cluster \
         operator why, then restart to request a new one"
    )]
    Denied {
        /// CSR name.
        name: String,
        /// Signer.
        signer: String,
        /// Condition reason.
        reason: String,
        /// Condition message.
        message: String,
    },
    /// Signing the CSR failed.
    #[error("certificate signing request {name} ({signer}) failed: {reason}: {message}")]
    Failed {
        /// CSR name.
        name: String,
        /// Signer.
        signer: String,
        /// Condition reason.
        reason: String,
        /// Condition message.
        message: String,
    },
    /// The CSR was deleted before it was issued.
    #[error("certificate signing request {name} was deleted before a certificate was issued")]
    Deleted {
        /// CSR name.
        name: String,
    },
    /// The CSR was not approved and issued in time.
    #[error(
        "certificate signing request {name} ({signer}) was not {state} within {waited:?}: {hint}"
    )]
    Timeout {
        /// CSR name.
        name: String,
        /// Signer.
        signer: String,
        /// `approved` or `issued (approved, not signed)`.
        state: &'static str,
        /// How long we waited.
        waited: Duration,
        /// What to do.
        hint: String,
    },
    /// The issued certificate does not fit the request.
    #[error("certificate signing request {name}: the issued certificate is unusable: {reason}")]
    BadIssued {
        /// CSR name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) use vzk_core::error_chain as chain;
