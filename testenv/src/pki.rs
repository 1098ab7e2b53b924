//! A throwaway PKI for one test cluster: a CA, the apiserver's serving certificate, client
//! certificates, and the service-account signing key.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::Error;

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

fn pki_err(what: &str, e: rcgen::Error) -> Error {
    Error::Other(format!("generating {what}: {e}"))
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(|e| pki_err("a CA key", e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_err("CA params", e))?;
        params.distinguished_name = name(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| pki_err("the CA certificate", e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A serving certificate for loopback (`127.0.0.1`, `localhost`) plus `extra_names`.
    pub fn server(&self, common_name: &str, extra_names: &[&str]) -> Result<CertPair, Error> {
        let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        sans.extend(extra_names.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(sans).map_err(|e| pki_err("server params", e))?;
        params.distinguished_name = name(common_name, None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, "a server certificate")
    }

    /// A client certificate: Kubernetes reads the user from CN and groups from O.
    pub fn client(&self, user: &str, group: Option<&str>) -> Result<CertPair, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| pki_err("client params", e))?;
        params.distinguished_name = name(user, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, "a client certificate")
    }

    fn sign(&self, params: CertificateParams, what: &str) -> Result<CertPair, Error> {
        let key = KeyPair::generate().map_err(|e| pki_err(what, e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| pki_err(what, e))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

/// An ECDSA P-256 key pair as (PKCS#8 private key PEM, public key PEM), e.g. for signing
/// and checking service-account tokens.
pub fn signing_key_pem() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(|e| pki_err("a signing key", e))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}
