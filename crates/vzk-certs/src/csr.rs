//! Certificate signing requests (`certificates.k8s.io/v1`): a fresh ECDSA P-256 key, the
//! PKCS#10 request, the API object, and the wait (a watch on that one object) until it is
//! issued, denied or failed.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use tracing::{debug, info};

use crate::CertError;
use crate::inspect::{CertInfo, check_leaf_pem};

/// What to ask for.
#[derive(Debug, Clone)]
pub struct CsrSpec {
    /// `spec.signerName`.
    pub signer: String,
    /// Subject CN.
    pub common_name: String,
    /// Subject O's.
    pub organizations: Vec<String>,
    /// `spec.usages`.
    pub usages: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<IpAddr>,
}

impl CsrSpec {
    /// The node client certificate: `CN=system:node:<node>, O=system:nodes`, digital
    /// signature + client auth (ECDSA: no key encipherment), no SANs.
    pub fn node_client(node: &str) -> Self {
        Self {
            signer: crate::KUBELET_CLIENT_SIGNER.into(),
            common_name: format!("system:node:{node}"),
            organizations: vec!["system:nodes".into()],
            usages: vec!["digital signature".into(), "client auth".into()],
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
        }
    }

    /// The kubelet serving certificate: same subject, digital signature + server auth
    /// (key encipherment only for RSA keys, which we never make), SANs: `ips` and `dns`.
    pub fn node_serving(node: &str, ips: &[IpAddr], dns: &[String]) -> Self {
        Self {
            signer: crate::KUBELET_SERVING_SIGNER.into(),
            usages: vec!["digital signature".into(), "server auth".into()],
            dns_names: dns.to_vec(),
            ip_addresses: ips.to_vec(),
            ..Self::node_client(node)
        }
    }
}

/// A key and the PEM CSR for it. The key stays here; only the CSR goes to the API server.
pub struct KeyAndRequest {
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The PKCS#10 request, PEM.
    pub csr_pem: String,
}

impl std::fmt::Debug for KeyAndRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndRequest").finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key and a CSR for `spec`.
pub fn generate(spec: &CsrSpec) -> Result<KeyAndRequest, CertError> {
    let gen_err = |what| move |source| CertError::Generate { what, source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err("key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.common_name.as_str());
    // rcgen keeps one value per attribute type; nodes have exactly one O.
    if let Some(o) = spec.organizations.first() {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    params.distinguished_name = dn;
    for d in &spec.dns_names {
        let name = d.clone().try_into().map_err(gen_err("CSR (a DNS name)"))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    for ip in &spec.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let csr = params
        .serialize_request(&key)
        .map_err(gen_err("certificate signing request"))?;
    Ok(KeyAndRequest {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(gen_err("CSR PEM"))?,
    })
}

/// Creates the CSR object (name `csr-<random>`); returns its name.
pub async fn submit(
    client: &kube::Client,
    spec: &CsrSpec,
    request: &KeyAndRequest,
) -> Result<String, CertError> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let obj = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("csr-".into()),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.csr_pem.as_bytes().to_vec()),
            signer_name: spec.signer.clone(),
            usages: Some(spec.usages.clone()),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &obj)
        .await
        .map_err(|source| CertError::Api {
            what: format!(
                "creating a certificate signing request for {} ({}); the credentials need `create` on \
                 certificatesigningrequests (a bootstrap token's group system:bootstrappers bound to \
                 ClusterRole system:node-bootstrapper, or the node itself)",
                spec.common_name, spec.signer
            ),
            source,
        })?;
    let name = created.metadata.name.unwrap_or_default();
    info!(csr = %name, signer = %spec.signer, subject = %spec.common_name, "certificate signing request created");
    Ok(name)
}

/// Where a CSR stands.
enum Decision {
    Pending { approved: bool },
    Issued(Vec<u8>),
}

fn decide(name: &str, csr: &CertificateSigningRequest) -> Result<Decision, CertError> {
    let signer = csr.spec.signer_name.clone();
    let status = csr.status.as_ref();
    for c in status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        if c.status != "True" {
            continue;
        }
        let (reason, message) = (
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        );
        match c.type_.as_str() {
            "Denied" => {
                return Err(CertError::Denied {
                    name: name.to_owned(),
                    signer,
                    reason,
                    message,
                });
            }
            "Failed" => {
                return Err(CertError::Failed {
                    name: name.to_owned(),
                    signer,
                    reason,
                    message,
                });
            }
            _ => {}
        }
    }
    if let Some(cert) = status.and_then(|s| s.certificate.as_ref())
        && !cert.0.is_empty()
    {
        return Ok(Decision::Issued(cert.0.clone()));
    }
    let approved = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Approved" && c.status == "True");
    Ok(Decision::Pending { approved })
}

/// What to tell the operator when a CSR of `signer` stays pending.
fn hint(name: &str, signer: &str, approved: bool) -> String {
    if approved {
        return format!(
            "it is approved but not signed: the kube-controller-manager must run the csrsigning controller \
             with --cluster-signing-cert-file/--cluster-signing-key-file (or another signer for {signer} must run)"
        );
    }
    if signer == crate::KUBELET_SERVING_SIGNER {
        format!(
            "kubelet serving certificates are not approved automatically: approve it with \
             `kubectl certificate approve {name}` (or run an approver for {signer})"
        )
    } else {
        format!(
            "approve it with `kubectl certificate approve {name}`, or let the kube-controller-manager \
             approve node CSRs: its csrapproving controller, and the requesting group (system:bootstrappers for \
             bootstrap tokens, system:nodes for renewals) bound to ClusterRole \
             system:certificates.k8s.io:certificatesigningrequests:nodeclient (resp. ...:selfnodeclient)"
        )
    }
}

/// Waits until CSR `name` is issued (its PEM certificate), denied, failed or deleted, or
/// `timeout` passes. Watches the one object; a broken watch is resumed.
pub async fn wait_issued(
    client: &kube::Client,
    name: &str,
    timeout: Duration,
) -> Result<Vec<u8>, CertError> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let start = Instant::now();
    let mut approved = false;
    let mut signer = String::new();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let cond = |o: Option<&CertificateSigningRequest>| match o {
            None => true,
            Some(csr) => !matches!(decide(name, csr), Ok(Decision::Pending { .. })),
        };
        match tokio::time::timeout(
            left,
            kube::runtime::wait::await_condition(api.clone(), name, cond),
        )
        .await
        {
            Err(_elapsed) => {
                // Say precisely where it stands.
                if let Ok(csr) = api.get(name).await {
                    signer = csr.spec.signer_name.clone();
                    if let Ok(Decision::Pending { approved: a }) = decide(name, &csr) {
                        approved = a;
                    }
                }
                return Err(CertError::Timeout {
                    name: name.to_owned(),
                    state: if approved {
                        "issued (approved, not signed)"
                    } else {
                        "approved"
                    },
                    hint: hint(name, &signer, approved),
                    signer,
                    waited: timeout,
                });
            }
            Ok(Ok(None)) => {
                return Err(CertError::Deleted {
                    name: name.to_owned(),
                });
            }
            Ok(Ok(Some(csr))) => match decide(name, &csr)? {
                Decision::Issued(pem) => return Ok(pem),
                Decision::Pending { .. } => continue,
            },
            Ok(Err(e)) => {
                debug!(csr = %name, error = %crate::chain(&e), "watching the CSR failed; resuming");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Checks an issued certificate against what was asked: X.509 v3, the subject, and that
/// it certifies our key (rustls refuses a mismatched pair). Returns the PEM file content
/// (certificate chain, then the key) and the leaf's facts.
pub fn finish(
    name: &str,
    spec: &CsrSpec,
    cert_pem: &[u8],
    request: &KeyAndRequest,
) -> Result<(Vec<u8>, CertInfo), CertError> {
    let bad = |reason: String| CertError::BadIssued {
        name: name.to_owned(),
        reason,
    };
    let infos = check_leaf_pem(cert_pem, &format!("CSR {name}"), "issued certificate", "")
        .map_err(|e| bad(crate::chain(&e)))?;
    let Some(leaf) = infos.into_iter().next() else {
        return Err(bad("no certificate".into()));
    };
    if leaf.common_name.as_deref() != Some(spec.common_name.as_str()) {
        return Err(bad(format!(
            "subject CN {:?}, asked for {:?}",
            leaf.common_name, spec.common_name
        )));
    }
    let mut file = cert_pem.to_vec();
    if !file.ends_with(b"\n") {
        file.push(b'\n');
    }
    file.extend_from_slice(request.key_pem.as_bytes());
    crate::client::certified_key(&file, name).map_err(|e| bad(crate::chain(&e)))?;
    Ok((file, leaf))
}

/// Generate, submit, wait, check: the PEM file content (chain + key) and the leaf's facts.
pub async fn request_certificate(
    client: &kube::Client,
    spec: &CsrSpec,
    timeout: Duration,
) -> Result<(Vec<u8>, CertInfo), CertError> {
    let request = generate(spec)?;
    let name = submit(client, spec, &request).await?;
    let cert = wait_issued(client, &name, timeout).await?;
    let done = finish(&name, spec, &cert, &request)?;
    info!(csr = %name, serial = %done.1.serial, not_after = ?done.1.not_after, "certificate issued");
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer as _, ParsedExtension, X509CertificationRequest};

    /// (subject, SANs) of a PEM CSR.
    fn read_csr(pem: &str) -> (String, String) {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("PEM: {e}"));
        let (_, csr) = X509CertificationRequest::from_der(&pem.contents)
            .unwrap_or_else(|e| panic!("CSR: {e}"));
        let subject = csr.certification_request_info.subject.to_string();
        let mut sans = String::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                sans = format!("{:?}", san.general_names);
            }
        }
        (subject, sans)
    }

    #[test]
    fn the_client_csr_carries_only_the_node_subject() {
        let spec = CsrSpec::node_client("node-a");
        let r = generate(&spec).unwrap_or_else(|e| panic!("{e}"));
        let (subject, sans) = read_csr(&r.csr_pem);
        assert!(subject.contains("CN=system:node:node-a"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
        assert!(sans.is_empty(), "no SANs: {sans}");
        assert!(r.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            spec.usages,
            vec!["digital signature".to_owned(), "client auth".to_owned()]
        );
    }

    #[test]
    fn the_serving_csr_names_the_nodes_addresses() {
        let spec = CsrSpec::node_serving(
            "node-a",
            &[IpAddr::from([10, 1, 2, 3])],
            &["node-a".to_owned()],
        );
        let r = generate(&spec).unwrap_or_else(|e| panic!("{e}"));
        let (subject, sans) = read_csr(&r.csr_pem);
        assert!(subject.contains("CN=system:node:node-a"), "{subject}");
        assert!(
            sans.contains("10.1.2.3") || sans.contains("[10, 1, 2, 3]"),
            "{sans}"
        );
        assert!(sans.contains("node-a"), "{sans}");
        assert!(!spec.usages.iter().any(|u| u == "key encipherment"));
        assert_eq!(spec.signer, crate::KUBELET_SERVING_SIGNER);
    }
}
