//! Signing image digests in cosign's tag format, with a key (`gkm build --sign-key`).
//!
//! Owns:
//! - reading the private key: cosign's encrypted key file (`ENCRYPTED SIGSTORE PRIVATE KEY`
//!   or the older `ENCRYPTED COSIGN PRIVATE KEY`: JSON with an scrypt KDF and a NaCl
//!   secretbox around a PKCS#8 DER key, the password from `COSIGN_PASSWORD`), or a plain
//!   PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`) PEM; only ECDSA P-256 keys sign;
//! - the simple-signing payload cosign writes for an image digest, and its ECDSA P-256
//!   SHA-256 signature (ASN.1 DER, base64 in the layer annotation);
//! - the manifest of the `sha256-<hex>.sig` tag: the signatures already there are kept, ours
//!   comes first (once: signing twice with one key adds nothing, RFC 6979 signatures being
//!   deterministic), so a bounded verifier reaches it whatever else the tag holds, and the
//!   config lists every layer as cosign's does.
//!
//! [`push_signature`] signs and pushes through [`crate::oci::Pusher`];
//! [`merge_signature_manifests`] joins the `.sig` manifests of two repositories (promotion).
//! What is written verifies with [`super::Verifier`] and with `cosign verify --key`.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::tag::{PAYLOAD_TYPE, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE};

/// The environment variable holding the password of an encrypted cosign key (as cosign).
pub const PASSWORD_ENV: &str = "COSIGN_PASSWORD";

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";

/// Most memory the scrypt parameters of a key file may ask for (cosign uses 64 MiB).
const MAX_SCRYPT_BYTES: u128 = 1 << 30;

/// Why a signing key could not be used. Every variant names the key file.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("reading signing key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key {path} is not a PEM file: {reason}")]
    NotPem { path: String, reason: String },
    #[error(
        "signing key {path} is a {label:?} PEM block; expected a cosign key (ENCRYPTED SIGSTORE PRIVATE KEY), PRIVATE KEY (PKCS#8) or EC PRIVATE KEY (SEC1)"
    )]
    UnsupportedPem { path: String, label: String },
    #[error("signing key {path} is not a valid cosign encrypted key: {reason}")]
    BadEncryptedKey { path: String, reason: String },
    #[error(
        "signing key {path}: wrong password (set {PASSWORD_ENV} to the password the key was created with)"
    )]
    WrongPassword { path: String },
    #[error("signing key {path} is {algorithm}; gkm signs with ECDSA P-256 keys only")]
    UnsupportedKeyType { path: String, algorithm: String },
    #[error("signing key {path} is not a valid private key: {reason}")]
    InvalidKey { path: String, reason: String },
}

/// An ECDSA P-256 private key that signs image digests.
pub struct SigningKey {
    key: p256::ecdsa::SigningKey,
    origin: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("SigningKey")
            .field("origin", &self.origin)
            .field("algorithm", &"ECDSA P-256")
            .finish()
    }
}

/// The password from `COSIGN_PASSWORD`, empty when it is not set (as cosign reads it).
pub fn password_from_env() -> Vec<u8> {
    std::env::var_os(PASSWORD_ENV)
        .map(|v| v.into_encoded_bytes())
        .unwrap_or_default()
}

impl SigningKey {
    /// Reads the key file at `path`; `password` decrypts a cosign encrypted key (and is
    /// ignored for an unencrypted one).
    pub fn from_file(path: &Path, password: &[u8]) -> Result<Self, SignError> {
        let origin = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| SignError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::from_pem(&String::from_utf8_lossy(&text), password, &origin)
    }

    /// Reads a PEM key; `origin` names it in errors (a path).
    pub fn from_pem(pem: &str, password: &[u8], origin: &str) -> Result<Self, SignError> {
        let (label, der) = decode_pem(pem).map_err(|reason| SignError::NotPem {
            path: origin.to_string(),
            reason,
        })?;
        let key = match label.as_str() {
            "ENCRYPTED SIGSTORE PRIVATE KEY" | "ENCRYPTED COSIGN PRIVATE KEY" => {
                let pkcs8 = decrypt_cosign_key(&der, password, origin)?;
                pkcs8_key(&pkcs8, origin)?
            }
            "PRIVATE KEY" => pkcs8_key(&der, origin)?,
            "EC PRIVATE KEY" => sec1_key(&der, origin)?,
            "RSA PRIVATE KEY" => {
                return Err(SignError::UnsupportedKeyType {
                    path: origin.to_string(),
                    algorithm: "an RSA key".into(),
                });
            }
            _ => {
                return Err(SignError::UnsupportedPem {
                    path: origin.to_string(),
                    label,
                });
            }
        };
        Ok(Self {
            key,
            origin: origin.to_string(),
        })
    }

    /// The public key as a PEM `PUBLIC KEY` block (what `cosign.pub` holds).
    pub fn public_key_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("a P-256 public key encodes")
    }

    /// A fixed key made from `seed`, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(seed: u8) -> Self {
        Self {
            key: p256::ecdsa::SigningKey::from_bytes(&[seed.max(1); 32].into()).unwrap(),
            origin: format!("test key {seed}"),
        }
    }

    /// The public key's [`PublicKey::fingerprint`](super::PublicKey::fingerprint).
    pub fn fingerprint(&self) -> String {
        let der = self
            .key
            .verifying_key()
            .to_public_key_der()
            .expect("a P-256 public key encodes");
        format!("sha256:{}", hex::encode(Sha256::digest(der.as_bytes())))
    }

    /// The ASN.1 DER ECDSA signature over SHA-256 of `msg` (deterministic, RFC 6979).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: p256::ecdsa::Signature = self.key.sign(msg);
        sig.to_der().as_bytes().to_vec()
    }
}

/// Splits a PEM file into its first block's label and decoded bytes. Lenient about line
/// lengths and headers; text before the block is ignored.
fn decode_pem(pem: &str) -> Result<(String, Vec<u8>), String> {
    let mut lines = pem.lines().map(str::trim);
    let label = loop {
        match lines.next() {
            Some(l) => {
                if let Some(rest) = l.strip_prefix("-----BEGIN ")
                    && let Some(label) = rest.strip_suffix("-----")
                {
                    break label.to_string();
                }
            }
            None => return Err("no -----BEGIN ...----- line".into()),
        }
    };
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    let mut ended = false;
    for l in lines {
        if l == end {
            ended = true;
            break;
        }
        if l.contains(':') {
            continue; // an RFC 1421 header such as `Proc-Type: 4,ENCRYPTED`
        }
        body.push_str(l);
    }
    if !ended {
        return Err(format!("no {end} line"));
    }
    let der = B64
        .decode(body.as_bytes())
        .map_err(|e| format!("the {label} block is not base64: {e}"))?;
    Ok((label, der))
}

#[derive(Deserialize)]
struct EncryptedKey {
    kdf: Kdf,
    cipher: Cipher,
    #[serde(with = "b64")]
    ciphertext: Vec<u8>,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    #[serde(with = "b64")]
    salt: Vec<u8>,
}

#[derive(Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    #[serde(with = "b64")]
    nonce: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::B64
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("not base64: {e}")))
    }
}

/// Opens cosign's encrypted key (go-securesystemslib's `encrypted` format): the key is
/// scrypt(password, salt, N, r, p) of 32 bytes, the box is NaCl secretbox (XSalsa20-Poly1305).
fn decrypt_cosign_key(json: &[u8], password: &[u8], origin: &str) -> Result<Vec<u8>, SignError> {
    use crypto_secretbox::aead::{Aead, KeyInit};
    let bad = |reason: String| SignError::BadEncryptedKey {
        path: origin.to_string(),
        reason,
    };
    let enc: EncryptedKey =
        serde_json::from_slice(json).map_err(|e| bad(format!("not the expected JSON: {e}")))?;
    if enc.kdf.name != "scrypt" {
        return Err(bad(format!(
            "unsupported KDF {:?} (only scrypt)",
            enc.kdf.name
        )));
    }
    if enc.cipher.name != "nacl/secretbox" {
        return Err(bad(format!(
            "unsupported cipher {:?} (only nacl/secretbox)",
            enc.cipher.name
        )));
    }
    let ScryptParams { n, r, p } = enc.kdf.params;
    if n < 2 || !n.is_power_of_two() {
        return Err(bad(format!("scrypt N = {n} is not a power of two")));
    }
    if r == 0 || p == 0 || 128 * u128::from(r) * (u128::from(n) + u128::from(p)) > MAX_SCRYPT_BYTES
    {
        return Err(bad(format!(
            "scrypt parameters N={n} r={r} p={p} are out of range (at most 1 GiB of memory)"
        )));
    }
    let params = scrypt::Params::new(n.trailing_zeros() as u8, r, p)
        .map_err(|e| bad(format!("scrypt parameters N={n} r={r} p={p}: {e}")))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(password, &enc.kdf.salt, &params, &mut key)
        .map_err(|e| bad(format!("scrypt: {e}")))?;
    if enc.cipher.nonce.len() != 24 {
        return Err(bad(format!(
            "the secretbox nonce is {} bytes, not 24",
            enc.cipher.nonce.len()
        )));
    }
    let cipher = crypto_secretbox::XSalsa20Poly1305::new(&key.into());
    let nonce = crypto_secretbox::Nonce::from_slice(&enc.cipher.nonce);
    let plain = cipher.decrypt(nonce, enc.ciphertext.as_slice());
    key.fill(0);
    plain.map_err(|_| SignError::WrongPassword {
        path: origin.to_string(),
    })
}

/// A P-256 key from PKCS#8 DER; other key types are named in the error.
fn pkcs8_key(der: &[u8], origin: &str) -> Result<p256::ecdsa::SigningKey, SignError> {
    let info =
        p256::pkcs8::PrivateKeyInfoRef::try_from(der).map_err(|e| SignError::InvalidKey {
            path: origin.to_string(),
            reason: format!("not PKCS#8: {e}"),
        })?;
    let alg = info.algorithm.oid.to_string();
    let curve = info
        .algorithm
        .parameters
        .and_then(|p| p.decode_as::<p256::pkcs8::ObjectIdentifier>().ok())
        .map(|o| o.to_string());
    match (alg.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256)) => {}
        (OID_EC_PUBLIC_KEY, c) => {
            return Err(SignError::UnsupportedKeyType {
                path: origin.to_string(),
                algorithm: format!("an ECDSA key on {}", curve_name(c)),
            });
        }
        (other, _) => {
            return Err(SignError::UnsupportedKeyType {
                path: origin.to_string(),
                algorithm: algorithm_name(other),
            });
        }
    }
    p256::ecdsa::SigningKey::from_pkcs8_der(der).map_err(|e| SignError::InvalidKey {
        path: origin.to_string(),
        reason: e.to_string(),
    })
}

/// A P-256 key from SEC1 DER (`EC PRIVATE KEY`).
fn sec1_key(der: &[u8], origin: &str) -> Result<p256::ecdsa::SigningKey, SignError> {
    let secret = p256::SecretKey::from_sec1_der(der).map_err(|e| {
        // A key on another curve fails here too; say which one when it can be read.
        let curve = sec1_curve(der);
        match curve {
            Some(c) if c != OID_P256 => SignError::UnsupportedKeyType {
                path: origin.to_string(),
                algorithm: format!("an ECDSA key on {}", curve_name(Some(&c))),
            },
            _ => SignError::InvalidKey {
                path: origin.to_string(),
                reason: format!("not a SEC1 P-256 key: {e}"),
            },
        }
    })?;
    Ok(p256::ecdsa::SigningKey::from(&secret))
}

/// The named curve a SEC1 `ECPrivateKey` names, when it is one GKM can name: its OID's DER
/// encoding appears in the key's parameters.
fn sec1_curve(der: &[u8]) -> Option<String> {
    const CURVES: &[(&[u8], &str)] = &[
        (
            &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            OID_P256,
        ),
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22], OID_P384),
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23], OID_P521),
        (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a], "1.3.132.0.10"),
    ];
    CURVES
        .iter()
        .find(|(enc, _)| der.windows(enc.len()).any(|w| w == *enc))
        .map(|(_, oid)| oid.to_string())
}

fn curve_name(oid: Option<&str>) -> String {
    match oid {
        Some(OID_P384) => "P-384".into(),
        Some(OID_P521) => "P-521".into(),
        Some("1.3.132.0.10") => "secp256k1".into(),
        Some(o) => format!("curve {o}"),
        None => "an unnamed curve".into(),
    }
}

fn algorithm_name(oid: &str) -> String {
    match oid {
        OID_RSA => "an RSA key".into(),
        OID_ED25519 => "an Ed25519 key".into(),
        o => format!("a key of algorithm {o}"),
    }
}

/// cosign's simple-signing payload for `digest` of `docker_reference` (`registry/repo`),
/// byte for byte as cosign writes it.
pub fn simple_signing_payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": null,
    }))
    .expect("JSON into memory")
}

/// A descriptor as the `.sig` manifest carries it (annotations kept as found).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SigDescriptor {
    pub media_type: String,
    pub size: u64,
    pub digest: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub annotations: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct SigManifest {
    schema_version: u32,
    media_type: String,
    config: SigDescriptor,
    layers: Vec<SigDescriptor>,
}

/// What to push for a signature: the payload blob, the config blob and the manifest of the
/// `sha256-<hex>.sig` tag.
#[derive(Clone, Debug)]
pub struct SignatureArtifacts {
    pub payload: Vec<u8>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    /// False when the existing manifest already holds this very signature (nothing to push).
    pub changed: bool,
}

/// The layers of a `.sig` or `.att` manifest.
pub(crate) fn manifest_layers(manifest: &[u8]) -> Result<Vec<SigDescriptor>, String> {
    serde_json::from_slice::<SigManifest>(manifest)
        .map(|m| m.layers)
        .map_err(|e| format!("the manifest is not readable: {e}"))
}

/// The config and manifest of a `.sig` (or `.att`) tag holding `layers`, as cosign writes
/// them.
pub(crate) fn sig_manifest(layers: Vec<SigDescriptor>) -> (Vec<u8>, Vec<u8>) {
    // cosign's config (go-containerregistry's empty image, one history entry per layer).
    let zero = "0001-01-01T00:00:00Z";
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "",
        "created": zero,
        "history": layers.iter().map(|_| serde_json::json!({"created": zero})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.digest).collect::<Vec<_>>()},
        "config": {},
    }))
    .expect("JSON into memory");
    let manifest = serde_json::to_vec(&SigManifest {
        schema_version: 2,
        media_type: crate::oci::image::OCI_MANIFEST.into(),
        config: SigDescriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            size: config.len() as u64,
            digest: sha256_digest(&config),
            annotations: Default::default(),
        },
        layers,
    })
    .expect("JSON into memory");
    (config, manifest)
}

/// The `.sig` manifest for the destination of a copy: the layers of `target` (its current
/// manifest, if any), then those of `source` not already there, the first of these that
/// `lead` picks moved to the front (promotion leads with the signature it verified, so a
/// bounded verifier reaches it first; a layer `target` holds keeps its place, so copying
/// again changes nothing). `Ok(None)` when `target` already is exactly that; without a
/// `target`, a `source` already in that order is kept as its own bytes.
pub fn merge_signature_manifests(
    target: Option<&[u8]>,
    source: &[u8],
    lead: impl Fn(&SigDescriptor) -> bool,
) -> Result<Option<MergedSignatures>, String> {
    let read = |b: &[u8], which: &str| {
        serde_json::from_slice::<SigManifest>(b)
            .map(|m| m.layers)
            .map_err(|e| format!("the {which} signature manifest is not readable: {e}"))
    };
    let before = target.map(|t| read(t, "destination's")).transpose()?;
    let theirs = read(source, "source's")?;
    let mut layers = before.clone().unwrap_or_default();
    for l in &theirs {
        if !layers.contains(l) {
            layers.push(l.clone());
        }
    }
    let kept = before.as_ref().map_or(0, Vec::len);
    if let Some(at) = layers[kept..].iter().position(lead) {
        let first = layers.remove(kept + at);
        layers.insert(0, first);
    }
    match before {
        Some(before) if before == layers => Ok(None),
        None if theirs == layers => Ok(Some(MergedSignatures {
            config: None,
            manifest: source.to_vec(),
        })),
        _ => {
            let (config, manifest) = sig_manifest(layers);
            Ok(Some(MergedSignatures {
                config: Some(config),
                manifest,
            }))
        }
    }
}

/// A `.sig` manifest made by [`merge_signature_manifests`], and its config blob when it
/// needs a new one.
#[derive(Clone, Debug)]
pub struct MergedSignatures {
    pub config: Option<Vec<u8>>,
    pub manifest: Vec<u8>,
}

impl SigDescriptor {
    /// The base64 signature of this layer, if it has one.
    pub fn signature(&self) -> Option<&str> {
        self.annotations
            .get(SIGNATURE_ANNOTATION)
            .and_then(serde_json::Value::as_str)
    }
}

/// The blobs a `.sig` manifest names (its config and every payload), as `(digest, size)`.
pub fn signature_blobs(manifest: &[u8]) -> Result<Vec<(String, u64)>, String> {
    let m: SigManifest = serde_json::from_slice(manifest)
        .map_err(|e| format!("the signature manifest is not readable: {e}"))?;
    Ok(std::iter::once(&m.config)
        .chain(&m.layers)
        .map(|d| (d.digest.clone(), d.size))
        .collect())
}

/// Signs `image` with `key` in cosign's tag format and pushes it: the signature is put first
/// in the manifest of `<repo>:sha256-<hex>.sig` (other signatures there are kept, after
/// it). Returns that tag's reference.
pub async fn push_signature(
    pusher: &crate::oci::Pusher,
    image: &crate::oci::PinnedRef,
    key: &SigningKey,
) -> Result<String, crate::oci::PushError> {
    use crate::oci::{PushError, Reference};
    let sig_ref = Reference::with_tag(
        image.registry().to_string(),
        image.repository().to_string(),
        super::tag::signature_tag(image.digest()),
    );
    let name = sig_ref.whole();
    let failed = |what: &str| {
        let (name, what) = (name.clone(), what.to_string());
        move |reason: String| PushError::Registry {
            image: name,
            what,
            reason,
        }
    };
    let existing = pusher
        .puller()
        .fetch_manifest_bytes(&sig_ref, super::MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| failed("reading the existing signatures")(e.to_string()))?;
    let docker_reference = format!("{}/{}", image.registry(), image.repository());
    let art = tag_signature(
        key,
        &docker_reference,
        image.digest(),
        existing.as_ref().map(|(b, _)| b.as_slice()),
    )
    .map_err(failed("reading the existing signatures"))?;
    if !art.changed {
        return Ok(name);
    }
    pusher
        .push_bytes(&sig_ref, &art.payload, "the signature payload")
        .await?;
    pusher
        .push_bytes(&sig_ref, &art.config, "the signature config")
        .await?;
    pusher
        .push_manifest(
            &sig_ref,
            art.manifest,
            crate::oci::image::OCI_MANIFEST,
            "the signature manifest",
        )
        .await?;
    Ok(name)
}

/// Signs `digest` of `docker_reference` with `key` and builds the `.sig` manifest: the new
/// signature first (moved there if it is already present), then the other layers of
/// `existing` (the tag's current manifest, if any). First, because a verifier bounds how
/// many signatures it examines: whatever else is there, GKM's own is reached.
pub fn tag_signature(
    key: &SigningKey,
    docker_reference: &str,
    digest: &str,
    existing: Option<&[u8]>,
) -> Result<SignatureArtifacts, String> {
    let payload = simple_signing_payload(docker_reference, digest);
    let signature = B64.encode(key.sign(&payload));
    let mut layers = match existing {
        Some(bytes) => {
            let m: SigManifest = serde_json::from_slice(bytes)
                .map_err(|e| format!("the existing signature manifest is not readable: {e}"))?;
            m.layers
        }
        None => Vec::new(),
    };
    let ours = SigDescriptor {
        media_type: SIMPLE_SIGNING_MEDIA_TYPE.into(),
        size: payload.len() as u64,
        digest: sha256_digest(&payload),
        annotations: [(
            SIGNATURE_ANNOTATION.to_string(),
            serde_json::Value::String(signature),
        )]
        .into_iter()
        .collect(),
    };
    let at = layers.iter().position(|l| *l == ours);
    let changed = at != Some(0);
    if let Some(at) = at {
        layers.remove(at);
    }
    layers.insert(0, ours);
    let (config, manifest) = sig_manifest(layers);
    Ok(SignatureArtifacts {
        payload,
        config,
        manifest,
        changed,
    })
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::PublicKey;
    use crate::trust::tag::check_payload;

    const D: &str = "sha256:3adf18e5ca127807c16d3d099021bf087018731026c358ae5f073ee2e3ff8a49";

    fn key() -> SigningKey {
        let bytes = [7u8; 32];
        SigningKey {
            key: p256::ecdsa::SigningKey::from_bytes(&bytes.into()).unwrap(),
            origin: "test".into(),
        }
    }

    #[test]
    fn the_payload_is_byte_for_byte_cosigns() {
        let p = simple_signing_payload("127.0.0.1:5055/demo/app", D);
        assert_eq!(
            String::from_utf8(p.clone()).unwrap(),
            format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"127.0.0.1:5055/demo/app"}},"image":{{"docker-manifest-digest":"{D}"}},"type":"cosign container image signature"}},"optional":null}}"#
            )
        );
        assert_eq!(check_payload(&p, D), Ok(()));
    }

    #[test]
    fn signatures_verify_under_the_public_key_and_are_put_first_once() {
        let k = key();
        let public = PublicKey::from_pem(&k.public_key_pem()).unwrap();
        let a = tag_signature(&k, "r/x", D, None).unwrap();
        assert!(a.changed);
        let m: SigManifest = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(m.layers.len(), 1);
        let sig = m.layers[0].annotations[SIGNATURE_ANNOTATION]
            .as_str()
            .unwrap();
        let sig = B64.decode(sig).unwrap();
        public.verify(&a.payload, &sig).unwrap();
        assert_eq!(m.config.digest, sha256_digest(&a.config));

        // Again with the same key: the same signature, nothing new.
        let b = tag_signature(&k, "r/x", D, Some(&a.manifest)).unwrap();
        assert!(!b.changed);
        assert_eq!(b.manifest, a.manifest);

        // Another key's signature is kept, ours put before it.
        let other = SigningKey {
            key: p256::ecdsa::SigningKey::from_bytes(&[9u8; 32].into()).unwrap(),
            origin: "other".into(),
        };
        let c = tag_signature(&other, "r/x", D, Some(&a.manifest)).unwrap();
        let m: SigManifest = serde_json::from_slice(&c.manifest).unwrap();
        let first: SigManifest = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.layers[1], first.layers[0]);
        assert_ne!(m.layers[0], first.layers[0]);
        // Signing again with the first key moves its signature back to the front.
        let d = tag_signature(&k, "r/x", D, Some(&c.manifest)).unwrap();
        assert!(d.changed);
        let m: SigManifest = serde_json::from_slice(&d.manifest).unwrap();
        assert_eq!(m.layers, [first.layers[0].clone(), m.layers[1].clone()]);
        let cfg: serde_json::Value = serde_json::from_slice(&c.config).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn merged_signature_manifests_hold_each_layer_once_led_by_the_chosen_one() {
        let a = key();
        let b = SigningKey {
            key: p256::ecdsa::SigningKey::from_bytes(&[9u8; 32].into()).unwrap(),
            origin: "test".into(),
        };
        let none = |_: &SigDescriptor| false;
        let first = tag_signature(&a, "r.io/x", D, None).unwrap().manifest;
        let both = tag_signature(&b, "r.io/x", D, Some(&first))
            .unwrap()
            .manifest;
        let other = tag_signature(&b, "r.io/x", D, None).unwrap().manifest;
        // The destination already holds everything of the source: nothing to write.
        assert!(
            merge_signature_manifests(Some(&both), &first, none)
                .unwrap()
                .is_none()
        );
        assert!(
            merge_signature_manifests(Some(&both), &other, none)
                .unwrap()
                .is_none()
        );
        // The destination holds b's signature; a's joins it, after it.
        let merged = merge_signature_manifests(Some(&other), &first, none)
            .unwrap()
            .unwrap();
        let m: SigManifest = serde_json::from_slice(&merged.manifest).unwrap();
        let theirs: SigManifest = serde_json::from_slice(&first).unwrap();
        let ours: SigManifest = serde_json::from_slice(&other).unwrap();
        assert_eq!(
            m.layers,
            [ours.layers.clone(), theirs.layers.clone()].concat()
        );
        let config = merged.config.unwrap();
        assert_eq!(m.config.digest, sha256_digest(&config));
        let blobs = signature_blobs(&merged.manifest).unwrap();
        assert_eq!(blobs.len(), 3, "config and two payloads: {blobs:?}");
        // Led by a's signature, it comes first; where the destination has it already, it
        // keeps its place.
        let a_sig = theirs.layers[0].signature().unwrap().to_string();
        let lead = |d: &SigDescriptor| d.signature() == Some(a_sig.as_str());
        let led = merge_signature_manifests(Some(&other), &first, lead)
            .unwrap()
            .unwrap();
        let m: SigManifest = serde_json::from_slice(&led.manifest).unwrap();
        assert_eq!(
            m.layers,
            [theirs.layers.clone(), ours.layers.clone()].concat()
        );
        assert!(
            merge_signature_manifests(Some(&merged.manifest), &first, lead)
                .unwrap()
                .is_none()
        );
        // No destination, the source already in order: its own bytes, no new config.
        let copied = merge_signature_manifests(None, &both, none)
            .unwrap()
            .unwrap();
        assert_eq!((copied.manifest, copied.config), (both.clone(), None));
        let reordered = merge_signature_manifests(None, &both, lead)
            .unwrap()
            .unwrap();
        assert!(reordered.config.is_some() && reordered.manifest != both);
        assert!(merge_signature_manifests(Some(b"{}"), &first, none).is_err());
    }

    #[test]
    fn plain_pkcs8_and_sec1_keys_are_read_and_other_types_named() {
        use p256::pkcs8::EncodePrivateKey;
        let k = key();
        let pkcs8 = k
            .key
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        let read = SigningKey::from_pem(&pkcs8, b"", "k.pem").unwrap();
        assert_eq!(read.public_key_pem(), k.public_key_pem());

        let secret = p256::SecretKey::from_bytes(&[7u8; 32].into()).unwrap();
        let sec1 = secret
            .to_sec1_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        let read = SigningKey::from_pem(&sec1, b"", "k.pem").unwrap();
        assert_eq!(read.public_key_pem(), k.public_key_pem());

        let e = SigningKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            b"",
            "pub.pem",
        )
        .unwrap_err();
        assert!(matches!(e, SignError::UnsupportedPem { .. }), "{e}");
        assert!(e.to_string().contains("pub.pem"), "{e}");
        let e = SigningKey::from_pem("hello", b"", "x").unwrap_err();
        assert!(matches!(e, SignError::NotPem { .. }), "{e}");
    }

    #[test]
    fn ed25519_pkcs8_is_an_unsupported_key_type() {
        // RFC 8410 test key.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let e = SigningKey::from_pem(pem, b"", "ed.key").unwrap_err();
        assert!(
            matches!(&e, SignError::UnsupportedKeyType { algorithm, .. } if algorithm.contains("Ed25519")),
            "{e}"
        );
    }

    #[test]
    fn cosign_encrypted_keys_decrypt_with_the_right_password_only() {
        // Made with `cosign generate-key-pair` (v3.1.2), password "pw"; its public key below.
        let key = "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiI5ZmlsQmJIUjBiU0d0TzhPOVMzSHhTRyszL1BDcWVR
TzJCWkh2VlJpUEdnPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiI0MXh0OTdmR1JISSs3clF0SEQ4OTNLQlM2TVVNaGxNZCJ9LCJj
aXBoZXJ0ZXh0IjoiY2NJdlAvaDh1bHVubmNOalFnNitSSExIdkNGWXVhZlJZT2Vj
THdpd2JaWXNnUkJGOE43bUxsaXM5T3FQUlphekpCWlNLa01ZcTg5L0FmSnpkbDVx
bDNRS0dqamJTNHNVZ2ltbVB1R3F4Z0ZsTGpUSVA0NUFSNVlZdmFYdXhRNGJXMmNP
S3JkVGZNczlSdGJ6NWJadlBpSFRYYzFqdi9TQjIzWkRDMzZKSktJOTF1Q0tndTRT
ZFIzQm8zRkFzUWN1TDJpSDcrMDVycFJsdEE9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
";
        let k = SigningKey::from_pem(key, b"pw", "cosign.key").unwrap();
        assert_eq!(k.public_key_pem().trim(), COSIGN_PUB.trim());
        let e = SigningKey::from_pem(key, b"nope", "cosign.key").unwrap_err();
        assert!(matches!(e, SignError::WrongPassword { .. }), "{e}");
        assert!(e.to_string().contains("cosign.key"), "{e}");
        assert!(e.to_string().contains(PASSWORD_ENV), "{e}");
    }

    const COSIGN_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhs7GGs1eB6Y9KSasVe34Jo6VkPVJ
D7fZENMp15TCIeeVK8UjCq9dmYaOFOAyx/ubYGLPLiAgQe/mLwnUjurekw==
-----END PUBLIC KEY-----";
}
