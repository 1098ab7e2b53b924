//! Attestations in cosign's `.att` tag: the verification attestation the promoter writes,
//! and the check of the attestations a trust policy requires (`requiredAttestations`).
//!
//! The format is the one `cosign attest --new-bundle-format=false` writes and
//! `cosign verify-attestation --key K --type T` reads: the tag `sha256-<hex>.att` of the
//! image's repository names an image manifest whose layers are DSSE envelopes
//! (`application/vnd.dsse.envelope.v1+json`) around in-toto statements, each layer
//! annotated with `predicateType` and an empty `dev.cosignproject.cosign/signature`. The
//! envelope signs the DSSE pre-authentication encoding of the statement
//! ([`super::bundle::pae`]), and a statement counts for an image only when one of its
//! subjects carries the image's sha256 digest.
//!
//! GKM's own statement ([`VERIFICATION_PREDICATE_TYPE`], a [`VerificationPredicate`])
//! records what promotion verified: the incoming and trusted references, the authority and
//! signer that passed, the signature format, the policy (its sha256 and generation), the
//! time, and the caller the API server vouched for. Its layer also carries the annotation
//! `gkm.io/attester: <key fingerprint>`, which only orders the search: nothing is taken
//! from an annotation without checking the signature.
//!
//! Bounds, as for signatures: one manifest of at most [`MAX_MANIFEST_BYTES`], envelopes of
//! at most [`MAX_BLOB_BYTES`], at most [`MAX_SIGNATURE_FETCHES`] envelope fetches per
//! requirement, the likeliest envelopes first, so junk pushed into the tag cannot hide a
//! valid attestation behind the bound.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bundle::{IN_TOTO_PAYLOAD_TYPE, pae};
use super::policy::RequiredAttestation;
use super::sign::{SigDescriptor, SigningKey, sha256_digest};
use super::tag::SIGNATURE_ANNOTATION;
use super::verifier::{Layer, MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, MAX_SIGNATURE_FETCHES};
use crate::oci::{ImageSource, PinnedRef, PushError, Pusher};

/// The predicate type of GKM's verification attestation.
pub const VERIFICATION_PREDICATE_TYPE: &str = "https://gkm.io/attestations/verification/v1";
/// The media type of a `.att` layer (a DSSE envelope).
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// cosign's annotation naming a `.att` layer's predicate type (not signed: a hint).
pub const PREDICATE_TYPE_ANNOTATION: &str = "predicateType";
/// GKM's annotation naming the key that signed a `.att` layer (not signed: a hint).
pub const ATTESTER_ANNOTATION: &str = "gkm.io/attester";
/// The in-toto statement type GKM writes (the one cosign's `attest` writes too).
pub const STATEMENT_TYPE_V01: &str = "https://in-toto.io/Statement/v0.1";
/// The newer statement type, also accepted when reading.
pub const STATEMENT_TYPE_V1: &str = super::bundle::STATEMENT_TYPE;

/// The tag that holds the attestations of `digest` (`sha256:<hex>` → `sha256-<hex>.att`).
pub fn attestation_tag(digest: &str) -> String {
    format!("{}.att", digest.replace(':', "-"))
}

/// What GKM's verification attestation says about a promoted digest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationPredicate {
    /// `<incoming repository>@<digest>`: what was verified.
    pub incoming: String,
    /// `<trusted repository>@<digest>`: where it was promoted to.
    pub trusted: String,
    pub verification: VerificationRecord,
    pub policy: PolicyRecord,
    /// RFC 3339, UTC, seconds.
    pub verified_at: String,
    /// Who asked for the promotion, as the API server's TokenReview answered; `None` when
    /// `gkm promote` ran without `--server` (no API server vouched for anyone).
    pub caller: Option<Caller>,
}

/// The signature that passed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationRecord {
    /// The authority's name in the trust policy.
    pub authority: String,
    /// `sha256:<hex>` of the key's SubjectPublicKeyInfo, for a key authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// The certificate's OIDC issuer and subject, for a keyless authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `tag` (cosign's `.sig` tag) or `bundle` (a Sigstore bundle referrer).
    pub signature_format: String,
}

/// The policy a verification was made under.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRecord {
    /// `sha256:<hex>` of the policy file's text.
    pub sha256: String,
    /// The verifier's policy generation (1 at start, one more per reload).
    pub generation: u64,
}

/// A caller as the API server knows them (TokenReview's `status.user`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Caller {
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The in-toto statement about `digest` of `subject_name` (`registry/repository`).
pub fn statement(
    subject_name: &str,
    digest: &str,
    predicate_type: &str,
    predicate: &Value,
) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    serde_json::to_vec(&serde_json::json!({
        "_type": STATEMENT_TYPE_V01,
        "subject": [{"name": subject_name, "digest": {"sha256": hex}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }))
    .expect("JSON into memory")
}

/// A DSSE envelope around `statement`, signed with `key`.
pub fn envelope(key: &SigningKey, statement: &[u8]) -> Vec<u8> {
    let sig = key.sign(&pae(IN_TOTO_PAYLOAD_TYPE, statement));
    serde_json::to_vec(&Envelope {
        payload_type: IN_TOTO_PAYLOAD_TYPE.into(),
        payload: B64.encode(statement),
        signatures: vec![EnvelopeSignature {
            keyid: String::new(),
            sig: B64.encode(sig),
        }],
    })
    .expect("JSON into memory")
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload_type: String,
    payload: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Serialize, Deserialize)]
struct EnvelopeSignature {
    #[serde(default)]
    keyid: String,
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<Subject>,
    predicate_type: String,
    #[serde(default)]
    predicate: Value,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    digest: BTreeMap<String, String>,
}

/// Checks one envelope (`blob`) against `required` for the image `digest`: the signature
/// under the authority's key, the statement's type, subject and predicate type, then each
/// condition. Ok with the predicate; Err with the first reason it does not count.
pub fn check_envelope(
    blob: &[u8],
    required: &RequiredAttestation,
    digest: &str,
) -> Result<Value, String> {
    let env: Envelope =
        serde_json::from_slice(blob).map_err(|e| format!("not a DSSE envelope: {e}"))?;
    if env.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!(
            "payloadType is {:?}, not {IN_TOTO_PAYLOAD_TYPE:?}",
            env.payload_type
        ));
    }
    let payload = B64
        .decode(env.payload.trim())
        .map_err(|_| "the payload is not base64".to_string())?;
    let msg = pae(IN_TOTO_PAYLOAD_TYPE, &payload);
    let mut last = String::from("the envelope has no signatures");
    let signed = env.signatures.iter().any(|s| {
        match B64
            .decode(s.sig.trim())
            .map_err(|_| "a signature is not base64".to_string())
            .and_then(|sig| required.key.verify(&msg, &sig))
        {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    if !signed {
        return Err(format!(
            "not signed by authority {:?}: {last}",
            required.authority
        ));
    }
    let st: Statement = serde_json::from_slice(&payload)
        .map_err(|e| format!("the payload is not an in-toto statement: {e}"))?;
    if st.type_ != STATEMENT_TYPE_V01 && st.type_ != STATEMENT_TYPE_V1 {
        return Err(format!(
            "statement _type {:?} is not an in-toto statement",
            st.type_
        ));
    }
    if st.predicate_type != required.predicate_type {
        return Err(format!(
            "predicate type {}, not {}",
            st.predicate_type, required.predicate_type
        ));
    }
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if !st
        .subject
        .iter()
        .any(|s| s.digest.get("sha256").is_some_and(|d| d == hex))
    {
        let got: Vec<String> = st
            .subject
            .iter()
            .filter_map(|s| s.digest.get("sha256").map(|d| format!("sha256:{d}")))
            .collect();
        return Err(format!(
            "about {}, not this image ({digest})",
            if got.is_empty() {
                "no sha256 digest".to_string()
            } else {
                got.join(", ")
            }
        ));
    }
    for c in &required.conditions {
        c.check(&st.predicate)?;
    }
    Ok(st.predicate)
}

/// An attestation that met a requirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundAttestation {
    pub predicate_type: String,
    pub authority: String,
    /// The layer's blob digest in the `.att` manifest.
    pub layer: String,
    /// The predicate's `verifiedAt`, when it has one (GKM's verification attestation).
    pub verified_at: Option<String>,
}

/// A `.att` manifest's layers as far as the search reads them.
#[derive(Deserialize)]
struct AttManifest {
    #[serde(default)]
    layers: Vec<Layer>,
}

/// Finds an attestation of `image` that meets `required`: Ok with it, or the reasons,
/// envelope by envelope, why none does (each naming its layer).
pub async fn find(
    source: &dyn ImageSource,
    image: &PinnedRef,
    required: &RequiredAttestation,
) -> Result<FoundAttestation, Vec<String>> {
    let tag = attestation_tag(image.digest());
    let reference = oci_client::Reference::with_tag(
        image.registry().to_string(),
        image.repository().to_string(),
        tag.clone(),
    );
    let bytes = match source
        .fetch_manifest_bytes(&reference, MAX_MANIFEST_BYTES)
        .await
    {
        Ok(Some((b, _))) => b,
        Ok(None) => return Err(vec![format!("there is no attestation tag {tag}")]),
        Err(e) => return Err(vec![format!("attestation tag {tag}: {e}")]),
    };
    let manifest: AttManifest = serde_json::from_slice(&bytes).map_err(|e| {
        vec![format!(
            "attestation tag {tag} is not an image manifest: {e}"
        )]
    })?;
    let fingerprint = required.key.fingerprint();
    let total = manifest.layers.len();
    let mut reasons = Vec::new();
    let mut blobs: HashMap<String, Result<Vec<u8>, String>> = HashMap::new();
    let mut fetches = 0;
    let mut skipped = 0;
    for i in search_order(&manifest.layers, required, &fingerprint) {
        let layer = &manifest.layers[i];
        let name = format!("{tag} layer {i} of {total}");
        if layer.media_type != DSSE_MEDIA_TYPE {
            reasons.push(format!(
                "{name}: media type {:?} is not a DSSE envelope",
                layer.media_type
            ));
            continue;
        }
        if crate::oci::sha256_hex(&layer.digest).is_none() || layer.size > MAX_BLOB_BYTES {
            reasons.push(format!(
                "{name}: not a sha256 blob of at most {MAX_BLOB_BYTES} bytes"
            ));
            continue;
        }
        if !blobs.contains_key(&layer.digest) {
            if fetches == MAX_SIGNATURE_FETCHES {
                skipped += 1;
                continue;
            }
            fetches += 1;
            let got = source
                .fetch_blob_bytes(image, &layer.digest, layer.size, MAX_BLOB_BYTES)
                .await
                .map_err(|e| e.to_string());
            blobs.insert(layer.digest.clone(), got);
        }
        match &blobs[&layer.digest] {
            Err(e) => reasons.push(format!("{name}: unreadable: {e}")),
            Ok(blob) => match check_envelope(blob, required, image.digest()) {
                Ok(predicate) => {
                    return Ok(FoundAttestation {
                        predicate_type: required.predicate_type.clone(),
                        authority: required.authority.clone(),
                        layer: layer.digest.clone(),
                        verified_at: predicate
                            .get("verifiedAt")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    });
                }
                Err(e) => reasons.push(format!("{name}: {e}")),
            },
        }
    }
    if total == 0 {
        reasons.push(format!("attestation tag {tag} has no layers"));
    }
    if skipped > 0 {
        reasons.push(format!(
            "{skipped} more envelopes not examined: one check fetches at most {MAX_SIGNATURE_FETCHES}"
        ));
    }
    Err(reasons)
}

/// The order in which `.att` layers are examined: those annotated with the required
/// predicate type and the authority's key first, then those with the predicate type, then
/// those without a predicate-type annotation, then the rest; each group in manifest order.
fn search_order(layers: &[Layer], required: &RequiredAttestation, fp: &str) -> Vec<usize> {
    let rank = |l: &Layer| {
        let t = l.annotations.get(PREDICATE_TYPE_ANNOTATION);
        let by = l.annotations.get(ATTESTER_ANNOTATION);
        match (t, by) {
            (Some(t), Some(by)) if *t == required.predicate_type && by == fp => 0,
            (Some(t), _) if *t == required.predicate_type => 1,
            (None, _) => 2,
            _ => 3,
        }
    };
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by_key(|&i| rank(&layers[i]));
    order
}

/// What [`attach`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// `registry/repository:sha256-<hex>.att`.
    pub tag: String,
    /// False when an attestation of this type by this key, about this digest, was already
    /// there first (nothing written: re-promotion does not pile them up).
    pub written: bool,
}

/// Signs `statement` (about `image`'s digest, of `predicate_type`) with `key` and puts it
/// first in `image`'s `.att` tag, other layers kept after it. When the tag already holds
/// an attestation of this type about this digest that verifies under `key`, that one is
/// kept (moved first if it is not) and nothing new is signed: one attestation per promoter
/// key, predicate type and digest, however often the digest is promoted.
pub async fn attach(
    pusher: &Pusher,
    image: &PinnedRef,
    key: &SigningKey,
    predicate_type: &str,
    statement: &[u8],
) -> Result<Attached, PushError> {
    let reference = oci_client::Reference::with_tag(
        image.registry().to_string(),
        image.repository().to_string(),
        attestation_tag(image.digest()),
    );
    let name = reference.whole();
    let failed = |what: &str, reason: String| PushError::Registry {
        image: name.clone(),
        what: what.to_string(),
        reason,
    };
    let existing = pusher
        .puller()
        .fetch_manifest_bytes(&reference, MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| failed("reading the existing attestations", e.to_string()))?;
    let mut layers = match &existing {
        Some((bytes, _)) => super::sign::manifest_layers(bytes)
            .map_err(|e| failed("reading the existing attestations", e))?,
        None => Vec::new(),
    };
    let fingerprint = key.fingerprint();
    let public = super::PublicKey::from_pem(&key.public_key_pem())
        .map_err(|e| failed("the promoter's public key", e.to_string()))?;
    let ours = RequiredAttestation {
        predicate_type: predicate_type.to_string(),
        authority: "promotion.signKey".into(),
        key: public,
        applies_to: Vec::new(),
        conditions: Vec::new(),
    };
    // An earlier attestation by this key: the layers annotated as ours (a few: a copy
    // from the incoming registry may claim the annotation without the signature).
    let mut kept = None;
    for (i, l) in layers.iter().enumerate().take(MAX_SIGNATURE_FETCHES) {
        let annotated = l
            .annotations
            .get(ATTESTER_ANNOTATION)
            .and_then(Value::as_str)
            == Some(fingerprint.as_str());
        if !annotated || l.media_type != DSSE_MEDIA_TYPE || l.size > MAX_BLOB_BYTES {
            continue;
        }
        let blob = pusher
            .puller()
            .fetch_blob_bytes(image, &l.digest, l.size, MAX_BLOB_BYTES)
            .await;
        if blob.is_ok_and(|b| check_envelope(&b, &ours, image.digest()).is_ok()) {
            kept = Some(i);
            break;
        }
    }
    let lead = match kept {
        Some(0) => {
            return Ok(Attached {
                tag: name,
                written: false,
            });
        }
        Some(i) => layers.remove(i),
        None => {
            let blob = envelope(key, statement);
            pusher
                .push_bytes(&reference, &blob, "the attestation envelope")
                .await?;
            let annotations = [
                (SIGNATURE_ANNOTATION, ""),
                (PREDICATE_TYPE_ANNOTATION, predicate_type),
                (ATTESTER_ANNOTATION, fingerprint.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
            SigDescriptor {
                media_type: DSSE_MEDIA_TYPE.into(),
                size: blob.len() as u64,
                digest: sha256_digest(&blob),
                annotations,
            }
        }
    };
    layers.insert(0, lead);
    let (config, manifest) = super::sign::sig_manifest(layers);
    pusher
        .push_bytes(&reference, &config, "the attestation config")
        .await?;
    pusher
        .push_manifest(
            &reference,
            manifest,
            crate::oci::image::OCI_MANIFEST,
            "the attestation manifest",
        )
        .await?;
    Ok(Attached {
        tag: name,
        written: kept.is_none(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::policy::{Condition, ConditionTest, Scope};

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn key() -> SigningKey {
        use std::sync::atomic::{AtomicU8, Ordering};
        static NEXT: AtomicU8 = AtomicU8::new(1);
        SigningKey::for_tests(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn required(k: &SigningKey, conditions: Vec<Condition>) -> RequiredAttestation {
        RequiredAttestation {
            predicate_type: VERIFICATION_PREDICATE_TYPE.into(),
            authority: "promoter".into(),
            key: super::super::PublicKey::from_pem(&k.public_key_pem()).unwrap(),
            applies_to: vec![Scope::Caches],
            conditions,
        }
    }

    fn predicate() -> Value {
        serde_json::to_value(VerificationPredicate {
            incoming: format!("in.io/dev/x@{DIGEST}"),
            trusted: format!("reg.io/kernels/x@{DIGEST}"),
            verification: VerificationRecord {
                authority: "dev".into(),
                key_fingerprint: Some("sha256:ab".into()),
                issuer: None,
                subject: None,
                signature_format: "tag".into(),
            },
            policy: PolicyRecord {
                sha256: "sha256:cd".into(),
                generation: 1,
            },
            verified_at: "2026-12-01T00:00:00Z".into(),
            caller: Some(Caller {
                username: "system:serviceaccount:ci:bot".into(),
                uid: None,
                groups: vec!["system:serviceaccounts".into(), "release".into()],
            }),
        })
        .unwrap()
    }

    #[test]
    fn an_envelope_verifies_under_its_key_only_for_its_digest_and_type() {
        let k = key();
        let st = statement(
            "reg.io/kernels/x",
            DIGEST,
            VERIFICATION_PREDICATE_TYPE,
            &predicate(),
        );
        let env = envelope(&k, &st);
        let p = check_envelope(&env, &required(&k, vec![]), DIGEST).unwrap();
        assert_eq!(p["caller"]["username"], "system:serviceaccount:ci:bot");

        let other_key = key();
        let e = check_envelope(&env, &required(&other_key, vec![]), DIGEST).unwrap_err();
        assert!(e.contains("not signed by authority \"promoter\""), "{e}");
        let e = check_envelope(&env, &required(&k, vec![]), OTHER).unwrap_err();
        assert!(e.contains("not this image"), "{e}");
        let mut other_type = required(&k, vec![]);
        other_type.predicate_type = "https://example.com/other".into();
        let e = check_envelope(&env, &other_type, DIGEST).unwrap_err();
        assert!(e.contains("predicate type"), "{e}");

        // A statement changed after signing no longer verifies.
        let mut v: Value = serde_json::from_slice(&env).unwrap();
        let forged = statement(
            "reg.io/kernels/x",
            OTHER,
            VERIFICATION_PREDICATE_TYPE,
            &predicate(),
        );
        v["payload"] = Value::String(B64.encode(forged));
        let e = check_envelope(
            &serde_json::to_vec(&v).unwrap(),
            &required(&k, vec![]),
            OTHER,
        )
        .unwrap_err();
        assert!(e.contains("not signed"), "{e}");
    }

    #[test]
    fn conditions_name_the_field_that_fails() {
        let k = key();
        let env = envelope(
            &k,
            &statement("r/x", DIGEST, VERIFICATION_PREDICATE_TYPE, &predicate()),
        );
        let cond = |field: &str, test| Condition {
            field: field.into(),
            test,
        };
        let ok = required(
            &k,
            vec![
                cond("/caller/groups", ConditionTest::Contains("release".into())),
                cond(
                    "/verification/authority",
                    ConditionTest::Equals("dev".into()),
                ),
            ],
        );
        check_envelope(&env, &ok, DIGEST).unwrap();
        let not_in = required(
            &k,
            vec![cond(
                "/caller/groups",
                ConditionTest::Contains("admins".into()),
            )],
        );
        let e = check_envelope(&env, &not_in, DIGEST).unwrap_err();
        assert!(
            e.contains("/caller/groups is [") && e.contains("\"admins\""),
            "{e}"
        );
        let missing = required(
            &k,
            vec![cond("/caller/email", ConditionTest::Equals("a@b".into()))],
        );
        let e = check_envelope(&env, &missing, DIGEST).unwrap_err();
        assert!(e.contains("no field /caller/email"), "{e}");
    }

    #[test]
    fn junk_envelopes_are_refused_with_reasons() {
        let k = key();
        let r = required(&k, vec![]);
        for (blob, want) in [
            (&b"not json"[..], "not a DSSE envelope"),
            (
                br#"{"payloadType":"text/plain","payload":"","signatures":[]}"#,
                "payloadType",
            ),
            (
                br#"{"payloadType":"application/vnd.in-toto+json","payload":"%%","signatures":[]}"#,
                "not base64",
            ),
            (
                br#"{"payloadType":"application/vnd.in-toto+json","payload":"","signatures":[]}"#,
                "no signatures",
            ),
        ] {
            let e = check_envelope(blob, &r, DIGEST).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn the_search_tries_annotated_layers_first() {
        let k = key();
        let r = required(&k, vec![]);
        let fp = k.fingerprint();
        let layer = |t: Option<&str>, by: Option<&str>| Layer {
            media_type: DSSE_MEDIA_TYPE.into(),
            digest: DIGEST.into(),
            size: 1,
            annotations: t
                .map(|t| (PREDICATE_TYPE_ANNOTATION.to_string(), t.to_string()))
                .into_iter()
                .chain(by.map(|b| (ATTESTER_ANNOTATION.to_string(), b.to_string())))
                .collect(),
        };
        let layers = [
            layer(Some("https://slsa.dev/provenance/v1"), None),
            layer(None, None),
            layer(Some(VERIFICATION_PREDICATE_TYPE), None),
            layer(Some(VERIFICATION_PREDICATE_TYPE), Some(&fp)),
        ];
        assert_eq!(search_order(&layers, &r, &fp), vec![3, 2, 1, 0]);
    }
}
