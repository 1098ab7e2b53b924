//! Serving certificates without an extra operator: the controller mints a CA and a
//! certificate for its Service's DNS names at start, serves with them, and writes the CA
//! into the `caBundle` of its webhook configurations. Every start mints a new pair (valid a
//! year), so a rollout rotates them. One replica per pair: with several replicas, use
//! cert-manager (see docs/trust.md) instead.

use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("webhook configuration {name}: {source}")]
    Inject { name: String, source: kube::Error },
}

/// Files of a minted pair and the CA that signs it (PEM).
pub struct Minted {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_pem: String,
}

/// The DNS names a Service is reached by from the API server.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Mints a CA and a serving certificate for `hosts` into `dir` (`tls.crt`, `tls.key`).
pub fn mint(dir: &Path, hosts: &[String]) -> Result<Minted, CertError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "gkm-controller webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        hosts
            .first()
            .map(String::as_str)
            .unwrap_or("gkm-controller"),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - time::Duration::minutes(5);
    leaf.not_after = now + time::Duration::days(365);
    let cert = leaf.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    for (path, pem) in [(&cert_path, cert.pem()), (&key_path, key.serialize_pem())] {
        std::fs::write(path, pem).map_err(|source| CertError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Minted {
        cert: cert_path,
        key: key_path,
        ca_pem: ca_cert.pem(),
    })
}

/// Writes `ca_pem` into every webhook's `caBundle` of the mutating and validating
/// configurations named `name` (replace under the read resourceVersion: a concurrent
/// change fails and is retried once).
pub async fn inject_ca_bundle(
    client: kube::Client,
    name: &str,
    ca_pem: &str,
) -> Result<(), CertError> {
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let err = |source| CertError::Inject {
        name: name.to_string(),
        source,
    };
    for attempt in 0..2 {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let mut m = api.get(name).await.map_err(err)?;
        for w in m.webhooks.iter_mut().flatten() {
            w.client_config.ca_bundle = Some(bundle.clone());
        }
        match api.replace(name, &PostParams::default(), &m).await {
            Err(kube::Error::Api(e)) if e.code == 409 && attempt == 0 => continue,
            r => {
                r.map_err(err)?;
                break;
            }
        }
    }
    for attempt in 0..2 {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let mut v = api.get(name).await.map_err(err)?;
        for w in v.webhooks.iter_mut().flatten() {
            w.client_config.ca_bundle = Some(bundle.clone());
        }
        match api.replace(name, &PostParams::default(), &v).await {
            Err(kube::Error::Api(e)) if e.code == 409 && attempt == 0 => continue,
            r => {
                r.map_err(err)?;
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_certificates_name_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let m = mint(dir.path(), &service_names("gkm-controller", "gkm-system")).unwrap();
        let pem = std::fs::read_to_string(&m.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.ca_pem.contains("BEGIN CERTIFICATE"));
        // The server loads them.
        crate::webhook::server::tls_config(&m.cert, &m.key).unwrap();
        assert_eq!(service_names("s", "n")[2], "s.n.svc");
    }
}
