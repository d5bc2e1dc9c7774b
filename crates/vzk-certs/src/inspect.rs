//! Reading certificates: validity, subject, version, and the start-up checks of the PEM
//! files the agent is given.
//!
//! rustls (through webpki) refuses end-entity certificates that are not X.509 v3 with
//! `UnsupportedCertVersion`, once per connection. [`check_leaf_file`] and
//! [`check_kubeconfig`] refuse such a certificate at start-up with one message instead.
//! CA bundles ([`check_ca_file`]) are only checked for being readable certificates: rustls
//! takes a v1 certificate as a trust anchor (its subject and key are all it needs), so a v1
//! CA works and is not refused.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use kube::config::Kubeconfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::CertError;

/// What the agent needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// X.509 version (1, 2 or 3).
    pub version: u32,
    /// Subject common name.
    pub common_name: Option<String>,
    /// Subject organizations.
    pub organizations: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Serial number, hex.
    pub serial: String,
}

impl CertInfo {
    /// Parses one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            }
        };
        let subject = cert.subject();
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => ip_addresses
                            .push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                        16 => ip_addresses
                            .push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(Self {
            version: cert.version().0 + 1,
            common_name: subject
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .map(str::to_owned),
            organizations: subject
                .iter_organization()
                .filter_map(|o| o.as_str().ok().map(str::to_owned))
                .collect(),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
            dns_names,
            ip_addresses,
            serial: cert.raw_serial_as_string(),
        })
    }

    /// Whether `now` lies within the validity period.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// The certificates of a PEM document, leaf first.
pub fn pem_certs(pem: &[u8], name: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid {
            path: name.to_owned(),
            reason: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Invalid {
            path: name.to_owned(),
            reason: "holds no certificate (no `-----BEGIN CERTIFICATE-----` block)".into(),
        });
    }
    Ok(certs)
}

/// Parses every certificate of a PEM document; refuses X.509 v1/v2 ones (`what` says what the
/// file is for, `hint` is appended to the advice).
pub fn check_leaf_pem(
    pem: &[u8],
    name: &str,
    what: &str,
    hint: &str,
) -> Result<Vec<CertInfo>, CertError> {
    let mut infos = Vec::new();
    for der in pem_certs(pem, name)? {
        let info = CertInfo::from_der(der.as_ref()).map_err(|reason| CertError::Invalid {
            path: name.to_owned(),
            reason,
        })?;
        if info.version < 3 {
            return Err(CertError::NotV3 {
                path: name.to_owned(),
                what: what.to_owned(),
                version: info.version,
                hint: hint.to_owned(),
            });
        }
        infos.push(info);
    }
    Ok(infos)
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// [`check_leaf_pem`] on a file (a serving or client certificate, maybe with its chain).
pub fn check_leaf_file(path: &Path, what: &str, hint: &str) -> Result<Vec<CertInfo>, CertError> {
    check_leaf_pem(&read(path)?, &path.display().to_string(), what, hint)
}

/// A CA bundle: readable, PEM, at least one X.509 certificate. v1 CAs are accepted (see the
/// module docs).
pub fn check_ca_file(path: &Path) -> Result<Vec<CertInfo>, CertError> {
    let name = path.display().to_string();
    pem_certs(&read(path)?, &name)?
        .iter()
        .map(|der| {
            CertInfo::from_der(der.as_ref()).map_err(|reason| CertError::Invalid {
                path: name.clone(),
                reason,
            })
        })
        .collect()
}

/// The client certificate of a kubeconfig's current user, if it has one: its PEM and a
/// name for messages (the file, or `<kubeconfig> (client-certificate-data)`).
pub fn kubeconfig_client_cert(path: &Path) -> Result<Option<(Vec<u8>, String)>, CertError> {
    let kc = Kubeconfig::read_from(path).map_err(|e| CertError::Kubeconfig {
        path: path.to_owned(),
        reason: crate::chain(&e),
    })?;
    let user = kc
        .current_context
        .as_ref()
        .and_then(|name| kc.contexts.iter().find(|c| &c.name == name))
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.user.clone());
    let Some(auth) = user
        .and_then(|u| kc.auth_infos.iter().find(|a| a.name == u))
        .and_then(|a| a.auth_info.as_ref())
    else {
        return Ok(None);
    };
    if let Some(data) = &auth.client_certificate_data {
        use base64::Engine as _;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| CertError::Kubeconfig {
                path: path.to_owned(),
                reason: format!("client-certificate-data is not base64: {e}"),
            })?;
        return Ok(Some((
            pem,
            format!("{} (client-certificate-data)", path.display()),
        )));
    }
    match &auth.client_certificate {
        Some(file) => {
            let file = Path::new(file);
            Ok(Some((read(file)?, file.display().to_string())))
        }
        None => Ok(None),
    }
}

/// Checks the client certificate of a kubeconfig (if it uses one): X.509 v3, and returns
/// the leaf's facts.
pub fn check_kubeconfig(path: &Path, hint: &str) -> Result<Option<CertInfo>, CertError> {
    let Some((pem, name)) = kubeconfig_client_cert(path)? else {
        return Ok(None);
    };
    let what = format!("the client certificate of kubeconfig {}", path.display());
    Ok(check_leaf_pem(&pem, &name, &what, hint)?.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `openssl x509 -req` without `-extfile`: X.509 v1 (see testdata/README.md).
    const V1_LEAF: &[u8] = include_bytes!("../testdata/v1-leaf.pem");
    const V1_CA: &[u8] = include_bytes!("../testdata/v1-ca.pem");

    fn leaf_v3() -> String {
        let mut params = rcgen::CertificateParams::new(vec!["node-a".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:node-a");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .pem()
    }

    #[test]
    fn a_v1_certificate_is_refused_with_one_message_naming_file_cause_and_fix() {
        let err = check_leaf_pem(V1_LEAF, "/etc/vz/kubelet.crt", "--tls-cert-file", "")
            .err()
            .unwrap_or_else(|| panic!("a v1 certificate was accepted"));
        let msg = err.to_string();
        for needle in [
            "/etc/vz/kubelet.crt",
            "--tls-cert-file",
            "X.509 v1",
            "no extensions",
            "requires X.509 v3",
            "-extfile",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
        assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    }

    #[test]
    fn a_v3_certificate_passes_and_its_facts_are_read() {
        let pem = leaf_v3();
        let infos = check_leaf_pem(pem.as_bytes(), "x", "y", "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(infos.len(), 1);
        let i = &infos[0];
        assert_eq!(i.version, 3);
        assert_eq!(i.common_name.as_deref(), Some("system:node:node-a"));
        assert_eq!(i.organizations, vec!["system:nodes".to_owned()]);
        assert_eq!(i.dns_names, vec!["node-a".to_owned()]);
        assert!(i.not_before < i.not_after);
    }

    #[test]
    fn a_kubeconfig_whose_client_certificate_is_v1_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let crt = dir.path().join("node.crt");
        std::fs::write(&crt, V1_LEAF).unwrap_or_else(|e| panic!("{e}"));
        let kc = dir.path().join("node.kubeconfig");
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'https://127.0.0.1:1'}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\nusers:\n- name: u\n  user: {{client-certificate: {}, client-key: {}}}\n",
                crt.display(),
                crt.display()
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let msg = check_kubeconfig(&kc, "; or use --bootstrap-kubeconfig")
            .err()
            .unwrap_or_else(|| panic!("accepted"))
            .to_string();
        assert!(msg.contains(&crt.display().to_string()), "{msg}");
        assert!(msg.contains(&kc.display().to_string()), "{msg}");
        assert!(msg.contains("--bootstrap-kubeconfig"), "{msg}");
    }

    #[test]
    fn a_v1_ca_is_accepted_since_rustls_takes_it_as_a_trust_anchor() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, V1_CA).unwrap_or_else(|e| panic!("{e}"));
        let infos = check_ca_file(&ca).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(infos[0].version, 1);
        // And rustls indeed accepts it as a root.
        let mut roots = rustls::RootCertStore::empty();
        for der in pem_certs(V1_CA, "ca").unwrap_or_else(|e| panic!("{e}")) {
            roots
                .add(der)
                .unwrap_or_else(|e| panic!("rustls refused the v1 CA: {e}"));
        }
        assert_eq!(roots.len(), 1);
    }

    #[test]
    fn garbage_is_named() {
        let msg = check_leaf_pem(b"hello", "/x/y.pem", "--tls-cert-file", "")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("/x/y.pem") && msg.contains("no certificate"),
            "{msg}"
        );
    }
}
