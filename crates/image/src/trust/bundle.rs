//! The Sigstore bundle format as cosign v3 attaches it to an image: an OCI 1.1 referrer
//! (found through the referrers API or its fallback tag `sha256-<hex>`) whose one layer is a
//! bundle holding a DSSE envelope around an in-toto statement about the image.
//!
//! Owns parsing the bundle and the claim checks: the envelope's payloadType is in-toto, the
//! statement is an in-toto Statement v1 with cosign's predicate type
//! (`https://sigstore.dev/cosign/sign/v1`, which cosign itself does not insist on), and one of
//! its subjects has the image's sha256 digest. What is signed is the DSSE pre-authentication
//! encoding ([`pae`]) of the statement, never the statement alone.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::Value;

use super::keyless::{KeylessError, LogEntry};

/// Media types of a Sigstore bundle start with this (`….bundle.v0.3+json`,
/// `….bundle+json;version=0.2`).
pub const BUNDLE_MEDIA_TYPE_PREFIX: &str = "application/vnd.dev.sigstore.bundle";
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const COSIGN_PREDICATE_TYPE: &str = "https://sigstore.dev/cosign/sign/v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not JSON: {0}")]
    NotJson(String),
    #[error("bundle media type {0:?} is not a Sigstore bundle")]
    MediaType(String),
    #[error("bundle holds a message signature, not a DSSE envelope: that does not sign an image")]
    NotDsse,
    #[error("bundle is malformed: {0}")]
    Malformed(String),
    #[error("DSSE payloadType is {0:?}, not {IN_TOTO_PAYLOAD_TYPE:?}")]
    PayloadType(String),
    #[error("statement is not an in-toto Statement v1: {0}")]
    Statement(String),
    #[error("statement predicateType is {0:?}, not {COSIGN_PREDICATE_TYPE:?}")]
    PredicateType(String),
    #[error("statement is about {got}, not this image (sha256:{want})")]
    OtherSubject { want: String, got: String },
    #[error("{0}")]
    Keyless(#[from] KeylessError),
}

/// DSSE's pre-authentication encoding: `"DSSEv1" SP len(type) SP type SP len(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// What signs the envelope.
pub enum Material {
    /// A public key (only a hint names it; any key authority may try).
    PublicKey,
    /// A certificate (DER) with the transparency-log entries that date it.
    Certificate {
        cert_der: Vec<u8>,
        entries: Vec<Value>,
    },
}

/// A parsed bundle.
pub struct Bundle {
    pub payload_type: String,
    /// The decoded statement bytes.
    pub payload: Vec<u8>,
    pub signatures: Vec<Vec<u8>>,
    pub material: Material,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBundle {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    verification_material: Option<Value>,
    #[serde(default)]
    dsse_envelope: Option<RawEnvelope>,
    #[serde(default)]
    message_signature: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    payload: String,
    payload_type: String,
    signatures: Vec<RawSig>,
}

#[derive(Deserialize)]
struct RawSig {
    sig: String,
}

impl Bundle {
    pub fn parse(bytes: &[u8]) -> Result<Self, BundleError> {
        let raw: RawBundle =
            serde_json::from_slice(bytes).map_err(|e| BundleError::NotJson(e.to_string()))?;
        if !raw.media_type.starts_with(BUNDLE_MEDIA_TYPE_PREFIX) {
            return Err(BundleError::MediaType(raw.media_type));
        }
        let Some(env) = raw.dsse_envelope else {
            return Err(if raw.message_signature.is_some() {
                BundleError::NotDsse
            } else {
                BundleError::Malformed("no dsseEnvelope".into())
            });
        };
        let payload = B64
            .decode(&env.payload)
            .map_err(|_| BundleError::Malformed("envelope payload is not base64".into()))?;
        let signatures = env
            .signatures
            .iter()
            .map(|s| B64.decode(&s.sig))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| BundleError::Malformed("a signature is not base64".into()))?;
        if signatures.is_empty() {
            return Err(BundleError::Malformed(
                "the envelope has no signature".into(),
            ));
        }
        let vm = raw
            .verification_material
            .ok_or_else(|| BundleError::Malformed("no verificationMaterial".into()))?;
        let cert = vm
            .pointer("/certificate/rawBytes")
            .or_else(|| vm.pointer("/x509CertificateChain/certificates/0/rawBytes"))
            .and_then(Value::as_str);
        let material = match cert {
            Some(c) => Material::Certificate {
                cert_der: B64.decode(c).map_err(|_| {
                    BundleError::Malformed("certificate rawBytes is not base64".into())
                })?,
                entries: vm
                    .get("tlogEntries")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            },
            None if vm.get("publicKey").is_some() => Material::PublicKey,
            None => {
                return Err(BundleError::Malformed(
                    "verificationMaterial has neither a public key nor a certificate".into(),
                ));
            }
        };
        Ok(Self {
            payload_type: env.payload_type,
            payload,
            signatures,
            material,
        })
    }

    /// The bytes each signature signs.
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }

    /// Checks the claims: an in-toto statement by cosign about `digest` (`sha256:<hex>`).
    pub fn check_statement(&self, digest: &str) -> Result<(), BundleError> {
        if self.payload_type != IN_TOTO_PAYLOAD_TYPE {
            return Err(BundleError::PayloadType(self.payload_type.clone()));
        }
        let st: Value = serde_json::from_slice(&self.payload)
            .map_err(|e| BundleError::Statement(e.to_string()))?;
        let kind = st.get("_type").and_then(Value::as_str).unwrap_or_default();
        if kind != STATEMENT_TYPE {
            return Err(BundleError::Statement(format!("_type is {kind:?}")));
        }
        let predicate = st
            .get("predicateType")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if predicate != COSIGN_PREDICATE_TYPE {
            return Err(BundleError::PredicateType(predicate.to_string()));
        }
        let want = digest.strip_prefix("sha256:").unwrap_or(digest);
        let subjects: Vec<&str> = st
            .get("subject")
            .and_then(Value::as_array)
            .map(|s| {
                s.iter()
                    .filter_map(|s| s.pointer("/digest/sha256").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        if subjects.contains(&want) {
            return Ok(());
        }
        Err(BundleError::OtherSubject {
            want: want.to_string(),
            got: if subjects.is_empty() {
                "no sha256 subject".into()
            } else {
                subjects
                    .iter()
                    .map(|s| format!("sha256:{s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    /// The transparency-log entries of a certificate bundle, parsed.
    pub(crate) fn log_entries(&self) -> Result<Vec<LogEntry>, BundleError> {
        match &self.material {
            Material::Certificate { entries, .. } => entries
                .iter()
                .map(|e| LogEntry::from_bundle_entry(e).map_err(BundleError::from))
                .collect(),
            Material::PublicKey => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dssev1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"{\"a\":1}"),
            b"DSSEv1 28 application/vnd.in-toto+json 7 {\"a\":1}".to_vec()
        );
        // Lengths are bytes, not characters.
        assert_eq!(
            pae("t", "é".as_bytes()),
            "DSSEv1 1 t 2 é".as_bytes().to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    fn bundle(statement: &str) -> Bundle {
        let json = serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": "x"}},
            "dsseEnvelope": {
                "payload": B64.encode(statement),
                "payloadType": IN_TOTO_PAYLOAD_TYPE,
                "signatures": [{"sig": "AAAA"}],
            },
        });
        Bundle::parse(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn statements_must_be_cosign_signatures_of_the_image() {
        let d = "1d2f77c191f1909c740b1a422f7a149d82566de08efbdd9713ca040b0987936b";
        // As cosign v3.1.2 writes it; keyless bundles leave out "predicate".
        let st = format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"digest":{{"sha256":"{d}"}},"annotations":{{}}}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{{}}}}"#
        );
        assert_eq!(bundle(&st).check_statement(&format!("sha256:{d}")), Ok(()));
        let other = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            bundle(&st).check_statement(&other),
            Err(BundleError::OtherSubject { .. })
        ));
        let slsa = st.replace(COSIGN_PREDICATE_TYPE, "https://slsa.dev/provenance/v1");
        assert!(matches!(
            bundle(&slsa).check_statement(&format!("sha256:{d}")),
            Err(BundleError::PredicateType(_))
        ));
        let v01 = st.replace("Statement/v1", "Statement/v0.1");
        assert!(matches!(
            bundle(&v01).check_statement(&format!("sha256:{d}")),
            Err(BundleError::Statement(_))
        ));
    }

    #[test]
    fn refuses_message_signatures_and_other_media_types() {
        let ms = serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": {"publicKey": {"hint": "x"}},
            "messageSignature": {"signature": "AAAA"},
        });
        assert!(matches!(
            Bundle::parse(ms.to_string().as_bytes()),
            Err(BundleError::NotDsse)
        ));
        assert!(matches!(
            Bundle::parse(br#"{"mediaType":"application/json"}"#),
            Err(BundleError::MediaType(_))
        ));
    }
}
