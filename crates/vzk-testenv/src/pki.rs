//! Certificates for the test cluster: one CA signs the API server's serving certificate,
//! client certificates (admin, nodes, the API server's kubelet client, metrics-server) and
//! serving certificates (kubelets, metrics-server); a second CA, the front-proxy CA, signs
//! only the client certificate the API server's aggregation layer presents to extension
//! API servers (as kubeadm lays it out). Keys are ECDSA P-256 (rcgen's default).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::TestEnvError;

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

/// The cluster's certificate authority.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn pki_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> TestEnvError {
    move |source| TestEnvError::Certificate { what, source }
}

impl Ca {
    /// A self-signed CA with `CN=cn`.
    pub(crate) fn named(cn: &str) -> Result<Self, TestEnvError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("CA"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(pki_err("CA key"))?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(pki_err("CA"))?;
        Ok(Self { issuer })
    }

    pub(crate) fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key, PEM (for a signer such as the controller-manager's).
    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A client certificate with `CN=cn` and one `O` per group.
    pub(crate) fn client_cert(&self, cn: &str, groups: &[&str]) -> Result<CertPair, TestEnvError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("client"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        // rcgen keeps one value per attribute type; Kubernetes reads every O as a group,
        // and a single group is all the tests need.
        if let Some(g) = groups.first() {
            dn.push(DnType::OrganizationName, *g);
        }
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, "client")
    }

    /// A serving certificate for the given DNS names / IP addresses.
    pub(crate) fn serving_cert(&self, sans: &[&str]) -> Result<CertPair, TestEnvError> {
        let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).map_err(pki_err("serving"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            sans.first().copied().unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, "serving")
    }

    fn sign(
        &self,
        params: CertificateParams,
        what: &'static str,
    ) -> Result<CertPair, TestEnvError> {
        let key = KeyPair::generate().map_err(pki_err(what))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(pki_err(what))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A key pair for signing service-account tokens: (private PEM, public PEM).
pub(crate) fn service_account_keys() -> Result<(String, String), TestEnvError> {
    let key = KeyPair::generate().map_err(pki_err("service-account key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}
