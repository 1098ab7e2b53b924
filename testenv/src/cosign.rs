//! Real cosign: an offline key pair, signatures in the tag format (`sha256-<hex>.sig`) or
//! as a Sigstore bundle, and `cosign verify` as an independent check.

use std::path::PathBuf;

use sha2::Digest;

use tokio::process::Command;

use crate::Error;
use crate::process;
use crate::tools::{self, Tool};

/// A cosign key pair in its own directory, and the cosign binary to use it with.
pub struct Cosign {
    bin: PathBuf,
    dir: PathBuf,
    password: String,
}

impl Cosign {
    /// Generates a new key pair (`cosign generate-key-pair`, password-protected).
    pub async fn generate() -> Result<Self, Error> {
        let this = Self {
            bin: tools::locate(Tool::Cosign)?,
            dir: process::work_dir("cosign")?,
            password: "gkm-testenv".into(),
        };
        this.run(&["generate-key-pair"]).await?;
        Ok(this)
    }

    /// Imports an existing PEM private key (RSA, ECDSA or Ed25519, PKCS#1/SEC1/PKCS#8) with
    /// `cosign import-key-pair`, so that cosign signs with a key type of the test's choice.
    pub async fn import(private_key_pem: &std::path::Path) -> Result<Self, Error> {
        let this = Self {
            bin: tools::locate(Tool::Cosign)?,
            dir: process::work_dir("cosign")?,
            password: "gkm-testenv".into(),
        };
        let key = std::fs::canonicalize(private_key_pem)
            .map_err(|e| Error::io(format!("reading {}", private_key_pem.display()), e))?;
        let key = key.to_string_lossy().into_owned();
        this.run(&[
            "import-key-pair",
            "--key",
            &key,
            "--output-key-prefix",
            "cosign",
            "-y",
        ])
        .await?;
        Ok(this)
    }

    /// The private key's password (what `COSIGN_PASSWORD` must hold to sign with it).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Path of the encrypted private key (`cosign.key`).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("cosign.key")
    }

    /// Path of the public key (`cosign.pub`, PEM).
    pub fn public_key_path(&self) -> PathBuf {
        self.dir.join("cosign.pub")
    }

    pub fn public_key_pem(&self) -> Result<String, Error> {
        std::fs::read_to_string(self.public_key_path())
            .map_err(|e| Error::io("reading cosign.pub", e))
    }

    /// Signs `image` (`repo@sha256:…`) in cosign's tag format, fully offline.
    pub async fn sign(&self, image: &str) -> Result<String, Error> {
        self.run(&[
            "sign",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
            "--use-signing-config=false",
            "--new-bundle-format=false",
            "--allow-http-registry",
            "-y",
            image,
        ])
        .await
    }

    /// Signs `image` with a Sigstore bundle, attached as an OCI 1.1 referrer (or under the
    /// fallback tag where the registry has no referrers API), fully offline.
    pub async fn sign_bundle(&self, image: &str) -> Result<String, Error> {
        self.run(&[
            "sign",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
            "--use-signing-config=false",
            "--new-bundle-format=true",
            "--allow-http-registry",
            "-y",
            image,
        ])
        .await
    }

    /// `cosign verify --key cosign.pub`; Ok with cosign's output when it verifies.
    pub async fn verify(&self, image: &str) -> Result<String, Error> {
        self.run(&[
            "verify",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            image,
        ])
        .await
    }

    /// `cosign verify-attestation` of `image` with this key for `predicate_type`, offline;
    /// `docker_config` is a docker config file with credentials for the image's registry.
    pub async fn verify_attestation(
        &self,
        image: &str,
        predicate_type: &str,
        docker_config: Option<&std::path::Path>,
    ) -> Result<String, Error> {
        let args = [
            "verify-attestation",
            "--key",
            "cosign.pub",
            "--type",
            predicate_type,
            "--insecure-ignore-tlog=true",
            "--allow-http-registry",
            image,
        ];
        self.run_with(&args, docker_config).await
    }

    /// `cosign attest` of `image` with this key: a statement of `predicate_type` with the
    /// JSON `predicate`, offline, in cosign's `.att` tag format.
    pub async fn attest(
        &self,
        image: &str,
        predicate_type: &str,
        predicate: &serde_json::Value,
        docker_config: Option<&std::path::Path>,
    ) -> Result<String, Error> {
        let file = self.dir.join("predicate.json");
        std::fs::write(&file, predicate.to_string())
            .map_err(|e| Error::io("writing predicate.json", e))?;
        let args = [
            "attest",
            "--key",
            "cosign.key",
            "--type",
            predicate_type,
            "--predicate",
            "predicate.json",
            "--tlog-upload=false",
            "--use-signing-config=false",
            "--new-bundle-format=false",
            "--allow-http-registry",
            "-y",
            image,
        ];
        self.run_with(&args, docker_config).await
    }

    /// Runs cosign in the key's directory, with a private HOME so it neither reads nor
    /// writes the user's sigstore state.
    pub async fn run(&self, args: &[&str]) -> Result<String, Error> {
        self.run_with(args, None).await
    }

    /// [`Cosign::run`], with registry credentials from `docker_config` (a docker config
    /// file, copied to where cosign looks for one).
    pub async fn run_with(
        &self,
        args: &[&str],
        docker_config: Option<&std::path::Path>,
    ) -> Result<String, Error> {
        let docker_dir = self.dir.join("docker");
        let _ = std::fs::remove_dir_all(&docker_dir);
        if let Some(file) = docker_config {
            std::fs::create_dir_all(&docker_dir)
                .and_then(|_| std::fs::copy(file, docker_dir.join("config.json")))
                .map_err(|e| Error::io("copying the docker config for cosign", e))?;
        }
        let out = Command::new(&self.bin)
            .args(args)
            .env("DOCKER_CONFIG", &docker_dir)
            .current_dir(&self.dir)
            .env("COSIGN_PASSWORD", &self.password)
            .env("HOME", &self.dir)
            .env("TUF_ROOT", self.dir.join("tuf"))
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::io(format!("running {}", self.bin.display()), e))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(Error::Command {
                command: format!("cosign {}", args.join(" ")),
                status: out.status.to_string(),
                output: text,
            })
        }
    }
}

impl Drop for Cosign {
    fn drop(&mut self) {
        process::remove_work_dir(&self.dir);
    }
}

/// Junk that anyone who may push to a repository can add to an image's `.sig` manifest,
/// as copies of the genuine signature layer `valid` (so over the genuine payload): first
/// `malformed` ones whose signature is no signature at all (the bug report's
/// `sig-manifest.jq`: `MEUCIQ<i>AAA…==`, not base64 for some `i`, a broken DER signature
/// for others), then `forged` well-formed ones that do not verify (the genuine signature
/// with its last two bytes changed, a different pair each).
pub fn junk_signature_layers(
    valid: &serde_json::Value,
    malformed: usize,
    forged: usize,
) -> Vec<serde_json::Value> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    const SIGNATURE: &str = "dev.cosignproject.cosign/signature";
    let with = |signature: String| {
        let mut l = valid.clone();
        l["annotations"][SIGNATURE] = signature.into();
        l
    };
    let genuine = b64
        .decode(valid["annotations"][SIGNATURE].as_str().unwrap_or_default())
        .unwrap_or_default();
    let mut out: Vec<_> = (0..malformed)
        .map(|i| with(format!("MEUCIQ{i}{}==", "A".repeat(100))))
        .collect();
    out.extend((0..forged).map(|i| {
        let mut sig = genuine.clone();
        let n = sig.len();
        if n >= 2 {
            sig[n - 1] ^= (i % 255 + 1) as u8;
            sig[n - 2] ^= (i / 255) as u8;
        }
        with(b64.encode(sig))
    }));
    out
}

/// Pushes (or replaces) the `.sig` manifest of `digest` in `repo` with these layer
/// descriptors as they are (their blobs need not exist) and a config listing them, as
/// cosign writes it.
pub async fn push_signature_layers(
    registry: &crate::Registry,
    repo: &str,
    digest: &str,
    layers: &[serde_json::Value],
) -> Result<(), Error> {
    use crate::image;
    let config = serde_json::json!({
        "architecture": "", "os": "", "created": "0001-01-01T00:00:00Z", "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|d| d["digest"].clone()).collect::<Vec<_>>()},
    })
    .to_string();
    let config_digest = image::push_blob(registry, repo, config.as_bytes()).await?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": image::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": config_digest},
        "layers": layers,
    });
    let tag = format!("{}.sig", digest.replace(':', "-"));
    image::push_manifest(
        registry,
        repo,
        &tag,
        image::OCI_MANIFEST,
        manifest.to_string().as_bytes(),
    )
    .await?;
    Ok(())
}

/// Unix seconds as the certificate time type rcgen takes (a macro: rcgen does not re-export
/// that type, and testenv does not depend on `time` itself).
macro_rules! at {
    ($secs:expr) => {
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(($secs).max(0) as u64)
    };
}

/// The subject alternative name a keyless certificate carries: who signed.
#[derive(Clone, Debug)]
pub enum San {
    Email(String),
    Uri(String),
}

/// An offline stand-in for Sigstore's public-good instance, for keyless tests: a CA playing
/// Fulcio (a P-384 root and intermediate, as Fulcio's are), a P-256 key playing Rekor, and
/// the `trusted_root.json` naming both. It issues short-lived code-signing certificates
/// with the OIDC issuer extensions, and signs SignedEntryTimestamps over whatever entry it
/// is handed, so tests can build genuine evidence and forge around it.
pub struct FakeSigstore {
    root_der: Vec<u8>,
    intermediate_der: Vec<u8>,
    intermediate: rcgen::Issuer<'static, rcgen::KeyPair>,
    rekor: rcgen::KeyPair,
}

/// A keyless signer: a leaf certificate from a [`FakeSigstore`] and its private key.
pub struct KeylessSigner {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    key: rcgen::KeyPair,
}

impl KeylessSigner {
    /// An ASN.1 DER ECDSA P-256 signature over SHA-256 of `msg`, as cosign makes them.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use rcgen::SigningKey;
        self.key.sign(msg).expect("signing with an in-memory key")
    }
}

fn rcgen_err(what: &str, e: rcgen::Error) -> Error {
    Error::Other(format!("fake sigstore: {what}: {e}"))
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl FakeSigstore {
    pub fn new() -> Result<Self, Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_params = |cn: &str, path_len: Option<u8>| -> Result<CertificateParams, Error> {
            let mut p = CertificateParams::new(Vec::<String>::new())
                .map_err(|e| rcgen_err("CA params", e))?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "gkm-test");
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(match path_len {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            });
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = at!(946_684_800i64); // 2000-01-01
            p.not_after = at!(4_102_444_800i64); // 2100-01-01
            Ok(p)
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .map_err(|e| rcgen_err("root key", e))?;
        let root_params = ca_params("fake-fulcio-root", None)?;
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(|e| rcgen_err("root certificate", e))?;
        let root = rcgen::Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .map_err(|e| rcgen_err("intermediate key", e))?;
        let int_params = ca_params("fake-fulcio-intermediate", Some(0))?;
        let int_cert = int_params
            .signed_by(&int_key, &root)
            .map_err(|e| rcgen_err("intermediate certificate", e))?;
        let rekor = KeyPair::generate().map_err(|e| rcgen_err("rekor key", e))?;
        Ok(Self {
            root_der: root_cert.der().to_vec(),
            intermediate_der: int_cert.der().to_vec(),
            intermediate: rcgen::Issuer::new(int_params, int_key),
            rekor,
        })
    }

    /// The `trusted_root.json` naming this CA (intermediate, then root) and this Rekor key.
    pub fn trusted_root_json(&self) -> String {
        use rcgen::PublicKeyData;
        let spki = self.rekor.subject_public_key_info();
        serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [{
                "baseUrl": "https://rekor.fake.test",
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": b64(&spki),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": {"start": "2000-01-01T00:00:00Z"},
                },
                "logId": {"keyId": b64(sha2::Sha256::digest(&spki))},
            }],
            "certificateAuthorities": [{
                "subject": {"organization": "gkm-test", "commonName": "fake-fulcio"},
                "uri": "https://fulcio.fake.test",
                "certChain": {"certificates": [
                    {"rawBytes": b64(&self.intermediate_der)},
                    {"rawBytes": b64(&self.root_der)},
                ]},
                "validFor": {"start": "2000-01-01T00:00:00Z"},
            }],
            "ctlogs": [],
            "timestampAuthorities": [],
        })
        .to_string()
    }

    /// A Fulcio-like code-signing certificate for `san`, naming OIDC `issuer` in both issuer
    /// extensions (1.3.6.1.4.1.57264.1.8 as a DER UTF8String, 1.1 raw), valid for
    /// `lifetime_secs` from `not_before` (Unix seconds).
    pub fn issue(
        &self,
        issuer: &str,
        san: San,
        not_before: i64,
        lifetime_secs: i64,
    ) -> Result<KeylessSigner, Error> {
        use rcgen::{
            CertificateParams, CustomExtension, DistinguishedName, ExtendedKeyUsagePurpose,
            KeyPair, KeyUsagePurpose, SanType,
        };
        let mut p = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| rcgen_err("leaf params", e))?;
        p.distinguished_name = DistinguishedName::new();
        let ia5 =
            |s: String| rcgen::string::Ia5String::try_from(s).map_err(|e| rcgen_err("SAN", e));
        p.subject_alt_names = vec![match san {
            San::Email(e) => SanType::Rfc822Name(ia5(e)?),
            San::Uri(u) => SanType::URI(ia5(u)?),
        }];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        let mut v2 = vec![0x0c];
        if issuer.len() < 0x80 {
            v2.push(issuer.len() as u8);
        } else {
            v2.extend([0x82, (issuer.len() >> 8) as u8, issuer.len() as u8]);
        }
        v2.extend_from_slice(issuer.as_bytes());
        p.custom_extensions = vec![
            CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 57264, 1, 1],
                issuer.as_bytes().to_vec(),
            ),
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 57264, 1, 8], v2),
        ];
        p.not_before = at!(not_before);
        p.not_after = at!(not_before + lifetime_secs);
        let key = KeyPair::generate().map_err(|e| rcgen_err("leaf key", e))?;
        let cert = p
            .signed_by(&key, &self.intermediate)
            .map_err(|e| rcgen_err("leaf certificate", e))?;
        Ok(KeylessSigner {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key,
        })
    }

    /// The Rekor log ID: SHA-256 of the log key's SPKI, lowercase hex.
    pub fn log_id_hex(&self) -> String {
        use rcgen::PublicKeyData;
        hex::encode(sha2::Sha256::digest(self.rekor.subject_public_key_info()))
    }

    /// The SignedEntryTimestamp: Rekor's ECDSA signature over the RFC 8785 JSON of
    /// `{body, integratedTime, logID, logIndex}` (written out here in canonical order).
    pub fn sign_entry(&self, body_b64: &str, integrated_time: i64, log_index: i64) -> Vec<u8> {
        use rcgen::SigningKey;
        let msg = format!(
            r#"{{"body":"{body_b64}","integratedTime":{integrated_time},"logID":"{}","logIndex":{log_index}}}"#,
            self.log_id_hex()
        );
        self.rekor
            .sign(msg.as_bytes())
            .expect("signing with an in-memory key")
    }

    /// Base64 of a hashedrekord v0.0.1 entry for `payload`, `sig` and the PEM `cert_pem`.
    pub fn hashedrekord_body(payload: &[u8], sig: &[u8], cert_pem: &str) -> String {
        b64(serde_json::json!({
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": {"hash": {"algorithm": "sha256", "value": hex::encode(sha2::Sha256::digest(payload))}},
                "signature": {"content": b64(sig), "publicKey": {"content": b64(cert_pem)}},
            },
        })
        .to_string())
    }

    /// Base64 of a dsse v0.0.1 entry for the in-toto `statement`, `sig` and `cert_pem`.
    pub fn dsse_body(statement: &[u8], sig: &[u8], cert_pem: &str) -> String {
        b64(serde_json::json!({
            "apiVersion": "0.0.1",
            "kind": "dsse",
            "spec": {
                "payloadHash": {"algorithm": "sha256", "value": hex::encode(sha2::Sha256::digest(statement))},
                "signatures": [{"signature": b64(sig), "verifier": b64(cert_pem)}],
            },
        })
        .to_string())
    }

    /// The tag format's `dev.sigstore.cosign/bundle` annotation for an entry, with its SET.
    pub fn tag_bundle_annotation(
        &self,
        body_b64: &str,
        integrated_time: i64,
        log_index: i64,
    ) -> String {
        serde_json::json!({
            "SignedEntryTimestamp": b64(self.sign_entry(body_b64, integrated_time, log_index)),
            "Payload": {
                "body": body_b64,
                "integratedTime": integrated_time,
                "logIndex": log_index,
                "logID": self.log_id_hex(),
            },
        })
        .to_string()
    }

    /// A Sigstore bundle's `tlogEntries[]` item for an entry (protojson: int64 as strings).
    pub fn bundle_tlog_entry(
        &self,
        kind: &str,
        body_b64: &str,
        integrated_time: i64,
        log_index: i64,
    ) -> serde_json::Value {
        let log_id = hex::decode(self.log_id_hex()).expect("hex we wrote");
        serde_json::json!({
            "logIndex": log_index.to_string(),
            "logId": {"keyId": b64(log_id)},
            "kindVersion": {"kind": kind, "version": "0.0.1"},
            "integratedTime": integrated_time.to_string(),
            "inclusionPromise": {"signedEntryTimestamp": b64(self.sign_entry(body_b64, integrated_time, log_index))},
            "canonicalizedBody": body_b64,
        })
    }
}
