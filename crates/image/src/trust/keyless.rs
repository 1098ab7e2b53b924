//! Keyless (Fulcio certificate + Rekor) signatures, verified offline against a trusted
//! root, with every binding checked here rather than trusted to a library.
//!
//! Owns the checks that make a keyless signature mean "this identity signed these bytes":
//! 1. the Rekor SignedEntryTimestamp verifies under a trusted Rekor key, over the canonical
//!    JSON of `{body, integratedTime, logID, logIndex}`, and `logID` names that key;
//! 2. the Rekor entry is about *this* signature: its recorded hash is SHA-256 of the signed
//!    bytes, its signature is the signature we were given, its key is the certificate;
//! 3. the certificate chains to a CA of the trusted root, and the log's time
//!    (`integratedTime`) lies within the validity of the certificate, every CA certificate
//!    above it, the CA entry and the Rekor key;
//! 4. the certificate is for code signing and names the authority's OIDC issuer (extension
//!    1.3.6.1.4.1.57264.1.8, else the deprecated 1.1) and subject (an email or URI SAN,
//!    equal to `subject` or matching the anchored `subjectRegExp`);
//! 5. the signature verifies over the exact signed bytes under the certificate's key.
//!
//! Without 2 and 5, anyone could pair a genuine certificate and log entry from the public
//! log with a payload of their own. Not checked: embedded SCTs (CT logs), RFC 3161
//! timestamps, and intermediates from the signature's chain annotation (cosign v3 leaves it
//! empty; intermediates come from the trusted root only).

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::canonical::to_canonical;
use super::keys::{Hash, PublicKey};
use super::root::TrustedRoot;

const OID_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
const OID_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";

/// Extensions whose criticality we understand (RFC 5280: refuse unknown critical ones).
const KNOWN_CRITICAL: &[&str] = &[
    "2.5.29.15", // key usage
    "2.5.29.17", // subject alternative name
    "2.5.29.19", // basic constraints
    "2.5.29.37", // extended key usage
    "2.5.29.14", // subject key identifier
    "2.5.29.35", // authority key identifier
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeylessError {
    #[error("no certificate: keyless authorities verify certificate-bearing signatures only")]
    NoCertificate,
    #[error("certificate is unreadable: {0}")]
    BadCertificate(String),
    #[error(
        "no Rekor bundle: a keyless signature needs the transparency log's signed promise to date its short-lived certificate"
    )]
    NoBundle,
    #[error("Rekor bundle is unreadable: {0}")]
    BadBundle(String),
    #[error("Rekor log {0} is not in the trusted root")]
    UnknownLog(String),
    #[error("Rekor SignedEntryTimestamp does not verify under the log's key: {0}")]
    BadTimestamp(String),
    #[error("{what} is not valid at the log's integratedTime {at}")]
    NotValidAt { what: String, at: i64 },
    #[error("Rekor entry does not match the signature: {0}")]
    EntryMismatch(String),
    #[error("certificate does not chain to the trusted root: {0}")]
    Untrusted(String),
    #[error("certificate is not for code signing: {0}")]
    Usage(String),
    #[error("certificate names no OIDC issuer (extension {OID_ISSUER_V2} or {OID_ISSUER_V1})")]
    NoIssuer,
    #[error("certificate issuer is {got:?}, the authority wants {want:?}")]
    WrongIssuer { want: String, got: String },
    #[error("certificate subject {got:?} does not match {want}")]
    WrongSubject { want: String, got: Vec<String> },
    #[error("signature does not verify under the certificate's key: {0}")]
    BadSignature(String),
}

/// How a keyless authority matches the certificate's subject (its email or URI SAN).
#[derive(Debug, Clone)]
pub enum SubjectMatch {
    Exact(String),
    /// Anchored: the whole SAN must match (`^(?:re)$`), unlike cosign's unanchored RE2 match,
    /// so `https://github.com/org/` cannot be satisfied by `https://evil/?https://github.com/org/`.
    RegExp {
        source: String,
        regex: regex::Regex,
    },
}

impl SubjectMatch {
    pub fn regexp(source: &str) -> Result<Self, String> {
        let regex = regex::Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| format!("not a valid regular expression: {e}"))?;
        Ok(Self::RegExp {
            source: source.to_string(),
            regex,
        })
    }

    pub fn matches(&self, san: &str) -> bool {
        match self {
            SubjectMatch::Exact(s) => s == san,
            SubjectMatch::RegExp { regex, .. } => regex.is_match(san),
        }
    }
}

impl std::fmt::Display for SubjectMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubjectMatch::Exact(s) => write!(f, "{s:?}"),
            SubjectMatch::RegExp { source, .. } => write!(f, "the regexp ^(?:{source})$"),
        }
    }
}

/// A keyless authority: an OIDC identity certified by a CA of `trusted_root`.
#[derive(Debug, Clone)]
pub struct KeylessIdentity {
    pub issuer: String,
    pub subject: SubjectMatch,
    pub trusted_root: Arc<TrustedRoot>,
    pub trusted_root_path: PathBuf,
}

/// The `dev.sigstore.cosign/bundle` annotation (cosign's `RekorBundle`; PascalCase keys).
#[derive(Deserialize)]
struct RekorBundle {
    #[serde(rename = "SignedEntryTimestamp")]
    set: String,
    #[serde(rename = "Payload")]
    payload: RekorPayload,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RekorPayload {
    body: String,
    integrated_time: i64,
    log_index: i64,
    #[serde(rename = "logID")]
    log_id: String,
}

/// A transparency-log entry with its inclusion promise, in either carrier's shape.
pub(crate) struct LogEntry {
    /// Base64 of the entry body, exactly as stored (it is what the SET signs).
    pub body: String,
    pub integrated_time: i64,
    pub log_index: i64,
    pub log_id: Vec<u8>,
    pub set: Vec<u8>,
}

impl LogEntry {
    /// From the tag format's bundle annotation.
    pub fn from_annotation(json: &str) -> Result<Self, KeylessError> {
        let b: RekorBundle =
            serde_json::from_str(json).map_err(|e| KeylessError::BadBundle(e.to_string()))?;
        let log_id = hex::decode(&b.payload.log_id)
            .map_err(|_| KeylessError::BadBundle("logID is not hex".into()))?;
        if hex::encode(&log_id) != b.payload.log_id {
            // The SET signs the hex as written: only Rekor's lowercase form can verify.
            return Err(KeylessError::BadBundle("logID is not lowercase hex".into()));
        }
        Ok(Self {
            body: b.payload.body,
            integrated_time: b.payload.integrated_time,
            log_index: b.payload.log_index,
            log_id,
            set: B64
                .decode(&b.set)
                .map_err(|e| KeylessError::BadBundle(format!("SignedEntryTimestamp: {e}")))?,
        })
    }

    /// From a Sigstore bundle's `verificationMaterial.tlogEntries[i]` (protojson: int64 as
    /// strings, bytes as base64).
    pub fn from_bundle_entry(v: &Value) -> Result<Self, KeylessError> {
        let bad = |what: &str| KeylessError::BadBundle(format!("tlog entry: {what}"));
        let int = |v: Option<&Value>, what: &str| -> Result<i64, KeylessError> {
            match v {
                Some(Value::String(s)) => s.parse().map_err(|_| bad(what)),
                Some(Value::Number(n)) => n.as_i64().ok_or_else(|| bad(what)),
                _ => Err(bad(what)),
            }
        };
        let string = |v: Option<&Value>, what: &str| -> Result<String, KeylessError> {
            v.and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(what))
        };
        let b64 = |s: String, what: &str| B64.decode(s).map_err(|_| bad(what));
        Ok(Self {
            body: string(v.get("canonicalizedBody"), "no canonicalizedBody")?,
            integrated_time: int(v.get("integratedTime"), "integratedTime")?,
            log_index: int(v.get("logIndex"), "logIndex")?,
            log_id: b64(
                string(v.pointer("/logId/keyId"), "no logId.keyId")?,
                "logId.keyId",
            )?,
            set: b64(
                string(
                    v.pointer("/inclusionPromise/signedEntryTimestamp"),
                    "no inclusionPromise (a SignedEntryTimestamp is required)",
                )?,
                "signedEntryTimestamp",
            )?,
        })
    }

    /// The decoded entry body.
    fn body_json(&self) -> Result<Value, KeylessError> {
        let raw = B64
            .decode(&self.body)
            .map_err(|_| KeylessError::BadBundle("entry body is not base64".into()))?;
        serde_json::from_slice(&raw)
            .map_err(|e| KeylessError::BadBundle(format!("entry body is not JSON: {e}")))
    }
}

/// What was signed, and how, for the Rekor entry comparison.
pub(crate) enum Signed<'a> {
    /// A tag-format payload (hashedrekord entry over the payload bytes).
    Payload(&'a [u8]),
    /// A DSSE envelope (dsse entry): the statement, and the PAE that was signed.
    Dsse { payload: &'a [u8], pae: &'a [u8] },
}

impl KeylessIdentity {
    /// Verifies one keyless signature: `sig` over `signed`, by the certificate `cert_der`,
    /// logged in `entry`. Ok only if every check in the module docs passes.
    pub(crate) fn verify(
        &self,
        signed: Signed<'_>,
        sig: &[u8],
        cert_der: &[u8],
        entry: &LogEntry,
    ) -> Result<(), KeylessError> {
        let at = self.verify_log_entry(entry)?;
        let body = entry.body_json()?;
        match signed {
            Signed::Payload(payload) => check_hashedrekord(&body, payload, sig, cert_der)?,
            Signed::Dsse { payload, .. } => check_dsse_entry(&body, payload, sig, cert_der)?,
        }
        let key = self.verify_certificate(cert_der, at)?;
        let msg = match signed {
            Signed::Payload(p) => p,
            Signed::Dsse { pae, .. } => pae,
        };
        key.verify(msg, sig).map_err(KeylessError::BadSignature)
    }

    /// Whether the certificate `cert_der` names this identity (OIDC issuer and subject),
    /// without checking its chain, validity or signature: a cheap test that orders what
    /// to verify, never a verdict.
    pub(crate) fn names(&self, cert_der: &[u8]) -> bool {
        let Ok(leaf) = parse_cert(cert_der) else {
            return false;
        };
        oidc_issuer(&leaf).is_ok_and(|i| i == self.issuer)
            && subjects(&leaf).is_ok_and(|s| s.iter().any(|s| self.subject.matches(s)))
    }

    /// The certificate's subject (email or URI SAN) that this identity matches, for the
    /// record of who signed; `None` when none does or the certificate is unreadable. Read
    /// after the certificate verified, never instead.
    pub(crate) fn matched_subject(&self, cert_der: &[u8]) -> Option<String> {
        let leaf = parse_cert(cert_der).ok()?;
        subjects(&leaf)
            .ok()?
            .into_iter()
            .find(|s| self.subject.matches(s))
    }

    /// Checks the SET and returns the time it vouches for.
    fn verify_log_entry(&self, e: &LogEntry) -> Result<i64, KeylessError> {
        let log = self
            .trusted_root
            .log(&e.log_id)
            .ok_or_else(|| KeylessError::UnknownLog(hex::encode(&e.log_id)))?;
        let msg = to_canonical(&json!({
            "body": e.body,
            "integratedTime": e.integrated_time,
            "logID": hex::encode(log.log_id),
            "logIndex": e.log_index,
        }))
        .map_err(|err| KeylessError::BadBundle(err.to_string()))?;
        log.key
            .verify(msg.as_bytes(), &e.set)
            .map_err(KeylessError::BadTimestamp)?;
        if !log.valid_for.contains(e.integrated_time) {
            return Err(KeylessError::NotValidAt {
                what: format!("Rekor key of {}", log.base_url),
                at: e.integrated_time,
            });
        }
        Ok(e.integrated_time)
    }

    /// Checks the certificate at time `at` (chain, validity, usage, identity) and returns its
    /// key.
    pub(crate) fn verify_certificate(
        &self,
        der: &[u8],
        at: i64,
    ) -> Result<PublicKey, KeylessError> {
        let leaf = parse_cert(der).map_err(KeylessError::BadCertificate)?;
        valid_at(&leaf, "the certificate", at)?;
        check_critical(&leaf).map_err(KeylessError::BadCertificate)?;
        if leaf
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca)
        {
            return Err(KeylessError::Usage("it is a CA certificate".into()));
        }
        match leaf.extended_key_usage() {
            Ok(Some(eku)) if eku.value.code_signing => {}
            Ok(_) => {
                return Err(KeylessError::Usage(
                    "no codeSigning extended key usage".into(),
                ));
            }
            Err(e) => return Err(KeylessError::BadCertificate(e.to_string())),
        }
        self.chain(&leaf, at)?;
        let issuer = oidc_issuer(&leaf)?;
        if issuer != self.issuer {
            return Err(KeylessError::WrongIssuer {
                want: self.issuer.clone(),
                got: issuer,
            });
        }
        let sans = subjects(&leaf)?;
        if !sans.iter().any(|s| self.subject.matches(s)) {
            return Err(KeylessError::WrongSubject {
                want: self.subject.to_string(),
                got: sans,
            });
        }
        PublicKey::from_spki_der(leaf.public_key().raw)
            .map_err(|e| KeylessError::BadCertificate(format!("its public key: {e}")))
    }

    /// Finds a CA of the trusted root whose chain certifies `leaf` at `at`.
    fn chain(&self, leaf: &X509Certificate<'_>, at: i64) -> Result<(), KeylessError> {
        let mut why = Vec::new();
        for ca in &self.trusted_root.authorities {
            let name = if ca.uri.is_empty() { "CA" } else { &ca.uri };
            if !ca.valid_for.contains(at) {
                why.push(format!("{name}: not valid at {at}"));
                continue;
            }
            // The leaf may be issued by any certificate of the chain (an intermediate, or
            // the anchor itself); the path from there up to the anchor must hold.
            let mut first_err = None;
            for start in 0..ca.chain.len() {
                match chain_to(leaf, &ca.chain[start..], at) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                why.push(format!("{name}: {e}"));
            }
        }
        Err(KeylessError::Untrusted(why.join("; ")))
    }
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(c),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn valid_at(cert: &X509Certificate<'_>, what: &str, at: i64) -> Result<(), KeylessError> {
    let v = cert.validity();
    if v.not_before.timestamp() <= at && at <= v.not_after.timestamp() {
        Ok(())
    } else {
        Err(KeylessError::NotValidAt {
            what: format!(
                "{what} (valid {} to {})",
                v.not_before.timestamp(),
                v.not_after.timestamp()
            ),
            at,
        })
    }
}

fn check_critical(cert: &X509Certificate<'_>) -> Result<(), String> {
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        if ext.critical && !KNOWN_CRITICAL.contains(&oid.as_str()) {
            return Err(format!("unknown critical extension {oid}"));
        }
    }
    Ok(())
}

/// Checks `leaf` ← chain[0] ← … ← chain[last] (the anchor), each link at time `at`.
fn chain_to(leaf: &X509Certificate<'_>, chain: &[Vec<u8>], at: i64) -> Result<(), String> {
    let mut child_der: Option<&[u8]> = None;
    for (i, parent_der) in chain.iter().enumerate() {
        let parent = parse_cert(parent_der)?;
        let child = match child_der {
            None => leaf.clone(),
            Some(d) => parse_cert(d)?,
        };
        if child.issuer().as_raw() != parent.subject().as_raw() {
            return Err(format!(
                "{} is not issued by {} (chain[{i}])",
                child.subject(),
                parent.subject()
            ));
        }
        if !parent
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|b| b.value.ca)
        {
            return Err(format!("chain[{i}] ({}) is not a CA", parent.subject()));
        }
        if let Ok(Some(ku)) = parent.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(format!(
                "chain[{i}] ({}) may not sign certificates",
                parent.subject()
            ));
        }
        valid_at(&parent, &format!("CA certificate {}", parent.subject()), at)
            .map_err(|e| e.to_string())?;
        check_signed_by(&child, &parent).map_err(|e| {
            format!(
                "signature of {} does not verify under {}: {e}",
                child.subject(),
                parent.subject()
            )
        })?;
        child_der = Some(parent_der);
    }
    Ok(())
}

fn check_signed_by(
    child: &X509Certificate<'_>,
    parent: &X509Certificate<'_>,
) -> Result<(), String> {
    let key = PublicKey::from_spki_der(parent.public_key().raw).map_err(|e| e.to_string())?;
    let alg = child.signature_algorithm.algorithm.to_id_string();
    let (family, hash) = match alg.as_str() {
        "1.2.840.10045.4.3.2" => ("ECDSA", Hash::Sha256),
        "1.2.840.10045.4.3.3" => ("ECDSA", Hash::Sha384),
        "1.2.840.10045.4.3.4" => ("ECDSA", Hash::Sha512),
        "1.2.840.113549.1.1.11" => ("RSA", Hash::Sha256),
        "1.2.840.113549.1.1.12" => ("RSA", Hash::Sha384),
        "1.2.840.113549.1.1.13" => ("RSA", Hash::Sha512),
        "1.3.101.112" => ("Ed25519", Hash::Sha512),
        other => return Err(format!("unsupported signature algorithm {other}")),
    };
    if !key.algorithm().starts_with(family) {
        return Err(format!(
            "signed with {family} but the issuer's key is {}",
            key.algorithm()
        ));
    }
    key.verify_with(
        hash,
        child.tbs_certificate.as_ref(),
        &child.signature_value.data,
    )
}

/// The OIDC issuer: the DER UTF8String of extension 1.8, else the raw bytes of 1.1.
fn oidc_issuer(cert: &X509Certificate<'_>) -> Result<String, KeylessError> {
    let find = |oid: &str| {
        cert.extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)
            .map(|e| e.value)
    };
    if let Some(v) = find(OID_ISSUER_V2) {
        return der_utf8(v).ok_or_else(|| {
            KeylessError::BadCertificate(format!("extension {OID_ISSUER_V2} is not a UTF8String"))
        });
    }
    if let Some(v) = find(OID_ISSUER_V1) {
        return String::from_utf8(v.to_vec()).map_err(|_| {
            KeylessError::BadCertificate(format!("extension {OID_ISSUER_V1} is not UTF-8"))
        });
    }
    Err(KeylessError::NoIssuer)
}

/// Decodes a DER UTF8String (tag 0x0C, definite length) that fills `v` exactly.
fn der_utf8(v: &[u8]) -> Option<String> {
    let (&tag, rest) = v.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() == len)
        .then(|| String::from_utf8(rest.to_vec()).ok())
        .flatten()
}

/// The certificate's email and URI subject alternative names.
fn subjects(cert: &X509Certificate<'_>) -> Result<Vec<String>, KeylessError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| KeylessError::BadCertificate(e.to_string()))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::RFC822Name(s) | GeneralName::URI(s) => Some(s.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn pem_cert_der(b64_pem: &str, what: &str) -> Result<Vec<u8>, KeylessError> {
    let pem = B64
        .decode(b64_pem)
        .map_err(|_| KeylessError::EntryMismatch(format!("{what} is not base64")))?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| KeylessError::EntryMismatch(format!("{what} is not a PEM certificate")))?;
    Ok(block.contents)
}

fn check_kind(body: &Value, kind: &str) -> Result<(), KeylessError> {
    let got = body.get("kind").and_then(Value::as_str).unwrap_or_default();
    let version = body
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if got != kind || version != "0.0.1" {
        return Err(KeylessError::EntryMismatch(format!(
            "entry is {got:?} v{version}, expected {kind:?} v0.0.1"
        )));
    }
    Ok(())
}

fn check_sha256(hash: Option<&Value>, bytes: &[u8], what: &str) -> Result<(), KeylessError> {
    let alg = hash
        .and_then(|h| h.get("algorithm"))
        .and_then(Value::as_str);
    let value = hash.and_then(|h| h.get("value")).and_then(Value::as_str);
    let actual = hex::encode(Sha256::digest(bytes));
    match (alg, value) {
        (Some("sha256"), Some(v)) if v == actual => Ok(()),
        (Some("sha256"), Some(v)) => Err(KeylessError::EntryMismatch(format!(
            "the entry records sha256 {v}, but the {what} hashes to {actual}"
        ))),
        _ => Err(KeylessError::EntryMismatch(format!(
            "the entry has no sha256 hash of the {what}"
        ))),
    }
}

/// A hashedrekord entry must be about exactly this payload, signature and certificate.
fn check_hashedrekord(
    body: &Value,
    payload: &[u8],
    sig: &[u8],
    cert_der: &[u8],
) -> Result<(), KeylessError> {
    check_kind(body, "hashedrekord")?;
    check_sha256(body.pointer("/spec/data/hash"), payload, "payload")?;
    let logged_sig = body
        .pointer("/spec/signature/content")
        .and_then(Value::as_str)
        .and_then(|s| B64.decode(s).ok());
    if logged_sig.as_deref() != Some(sig) {
        return Err(KeylessError::EntryMismatch(
            "the entry records another signature".into(),
        ));
    }
    let key = body
        .pointer("/spec/signature/publicKey/content")
        .and_then(Value::as_str)
        .ok_or_else(|| KeylessError::EntryMismatch("the entry has no public key".into()))?;
    if pem_cert_der(key, "the entry's public key")? != cert_der {
        return Err(KeylessError::EntryMismatch(
            "the entry records another certificate".into(),
        ));
    }
    Ok(())
}

/// A dsse entry must record this statement's hash, and this signature by this certificate.
fn check_dsse_entry(
    body: &Value,
    payload: &[u8],
    sig: &[u8],
    cert_der: &[u8],
) -> Result<(), KeylessError> {
    check_kind(body, "dsse")?;
    check_sha256(body.pointer("/spec/payloadHash"), payload, "statement")?;
    let sigs = body
        .pointer("/spec/signatures")
        .and_then(Value::as_array)
        .ok_or_else(|| KeylessError::EntryMismatch("the entry has no signatures".into()))?;
    for s in sigs {
        let logged = s
            .get("signature")
            .and_then(Value::as_str)
            .and_then(|s| B64.decode(s).ok());
        if logged.as_deref() != Some(sig) {
            continue;
        }
        let verifier = s
            .get("verifier")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if pem_cert_der(verifier, "the entry's verifier")? == cert_der {
            return Ok(());
        }
    }
    Err(KeylessError::EntryMismatch(
        "the entry records no such signature by this certificate".into(),
    ))
}

/// The DER of the first PEM certificate in `pem`.
pub(crate) fn cert_from_pem(pem: &str) -> Result<Vec<u8>, KeylessError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.trim_start().as_bytes())
        .map_err(|e| KeylessError::BadCertificate(format!("not PEM: {e}")))?;
    if block.label != "CERTIFICATE" {
        return Err(KeylessError::BadCertificate(format!(
            "PEM block is {:?}, not CERTIFICATE",
            block.label
        )));
    }
    Ok(block.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_regexps_are_anchored() {
        let m = SubjectMatch::regexp("https://github.com/org/.*").unwrap();
        assert!(m.matches("https://github.com/org/repo/.github/workflows/x.yaml@refs/heads/main"));
        assert!(!m.matches("https://evil.example/?https://github.com/org/x"));
        let m = SubjectMatch::regexp("dev@example\\.com").unwrap();
        assert!(!m.matches("dev@example.com.evil"));
        assert!(SubjectMatch::regexp("(").is_err());
    }

    #[test]
    fn der_utf8_strings() {
        assert_eq!(der_utf8(b"\x0c\x03abc").as_deref(), Some("abc"));
        assert_eq!(der_utf8(b"\x0c\x04abc"), None);
        assert_eq!(der_utf8(b"\x16\x03abc"), None);
        let long = [&[0x0c, 0x81, 0x80][..], &[b'x'; 128]].concat();
        assert_eq!(der_utf8(&long).map(|s| s.len()), Some(128));
    }

    #[test]
    fn tag_bundle_annotations_parse() {
        let e = LogEntry::from_annotation(
            r#"{"SignedEntryTimestamp":"AAEC","Payload":{"body":"e30=","integratedTime":5,"logIndex":7,"logID":"c0d2"}}"#,
        )
        .unwrap();
        assert_eq!(
            (e.integrated_time, e.log_index, e.set.clone()),
            (5, 7, vec![0, 1, 2])
        );
        assert_eq!(e.log_id, vec![0xc0, 0xd2]);
        assert!(
            LogEntry::from_annotation(
                r#"{"SignedEntryTimestamp":"","Payload":{"body":"","integratedTime":5,"logIndex":7,"logID":"C0D2"}}"#
            )
            .is_err()
        );
    }
}
