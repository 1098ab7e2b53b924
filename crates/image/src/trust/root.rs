//! Sigstore's `trusted_root.json` (protobuf-specs `TrustedRoot`, protojson camelCase): the
//! certificate authorities (Fulcio) and transparency logs (Rekor) a keyless authority
//! trusts, read from a file so that verification works air-gapped.
//!
//! Owns reading and checking that file. Only what GKM verifies is kept: CA chains (leaf-most
//! first, trust anchor last) with their validity windows, and Rekor logs with ECDSA P-256
//! keys (the only kind that signs SignedEntryTimestamps). CT logs (SCTs) and timestamp
//! authorities are not used. Logs of other key types (Rekor v2's Ed25519 checkpoints) are
//! skipped, not refused, so current public-good roots load.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::keys::PublicKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("not a trusted_root.json: {0}")]
    Parse(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("it has no certificate authority")]
    NoAuthority,
    #[error("it has no transparency log with an ECDSA P-256 key")]
    NoLog,
}

/// A time window in Unix seconds; `None` ends are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Window {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl Window {
    pub fn contains(&self, t: i64) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t <= e)
    }
}

/// A certificate authority: its chain as DER (leaf-most first, anchor last).
#[derive(Debug, Clone)]
pub struct CertificateAuthority {
    pub uri: String,
    pub chain: Vec<Vec<u8>>,
    pub valid_for: Window,
}

/// A Rekor log: its key, and the log ID (SHA-256 of the key's SPKI) that bundles name.
#[derive(Debug, Clone)]
pub struct TransparencyLog {
    pub base_url: String,
    pub key: PublicKey,
    pub log_id: [u8; 32],
    pub valid_for: Window,
}

/// The parts of a trusted root that GKM verifies against.
#[derive(Debug, Clone)]
pub struct TrustedRoot {
    pub authorities: Vec<CertificateAuthority>,
    pub logs: Vec<TransparencyLog>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRoot {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    tlogs: Vec<RawLog>,
    #[serde(default)]
    certificate_authorities: Vec<RawCa>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLog {
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    hash_algorithm: String,
    public_key: RawKey,
    log_id: RawLogId,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawKey {
    raw_bytes: String,
    #[serde(default)]
    key_details: String,
    #[serde(default)]
    valid_for: Option<RawWindow>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogId {
    key_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCa {
    #[serde(default)]
    uri: String,
    cert_chain: RawChain,
    #[serde(default)]
    valid_for: Option<RawWindow>,
}

#[derive(Deserialize)]
struct RawChain {
    certificates: Vec<RawCert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCert {
    raw_bytes: String,
}

#[derive(Deserialize)]
struct RawWindow {
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    end: Option<String>,
}

fn window(w: &Option<RawWindow>, field: &str) -> Result<Window, RootError> {
    let Some(w) = w else {
        return Ok(Window::default());
    };
    let parse = |s: &Option<String>, which: &str| -> Result<Option<i64>, RootError> {
        s.as_deref()
            .map(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map(|t| t.unix_timestamp())
                    .map_err(|e| RootError::Invalid {
                        field: format!("{field}.validFor.{which}"),
                        reason: format!("{s:?} is not an RFC 3339 time: {e}"),
                    })
            })
            .transpose()
    };
    Ok(Window {
        start: parse(&w.start, "start")?,
        end: parse(&w.end, "end")?,
    })
}

impl TrustedRoot {
    pub fn load(path: &Path) -> Result<Self, RootError> {
        let text = std::fs::read_to_string(path).map_err(|e| RootError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, RootError> {
        let raw: RawRoot =
            serde_json::from_str(text).map_err(|e| RootError::Parse(e.to_string()))?;
        if !raw.media_type.is_empty()
            && !raw
                .media_type
                .starts_with("application/vnd.dev.sigstore.trustedroot")
        {
            return Err(RootError::Parse(format!(
                "mediaType is {:?}, not a Sigstore trusted root",
                raw.media_type
            )));
        }
        let mut authorities = Vec::new();
        for (i, ca) in raw.certificate_authorities.iter().enumerate() {
            let field = format!("certificateAuthorities[{i}]");
            if ca.cert_chain.certificates.is_empty() {
                return Err(RootError::Invalid {
                    field: format!("{field}.certChain"),
                    reason: "no certificates".into(),
                });
            }
            let mut chain = Vec::new();
            for (j, c) in ca.cert_chain.certificates.iter().enumerate() {
                let f = format!("{field}.certChain.certificates[{j}]");
                let der = B64.decode(&c.raw_bytes).map_err(|e| RootError::Invalid {
                    field: f.clone(),
                    reason: format!("rawBytes is not base64: {e}"),
                })?;
                match X509Certificate::from_der(&der) {
                    Ok(([], _)) => {}
                    Ok(_) => {
                        return Err(RootError::Invalid {
                            field: f,
                            reason: "trailing bytes after the certificate".into(),
                        });
                    }
                    Err(e) => {
                        return Err(RootError::Invalid {
                            field: f,
                            reason: format!("not an X.509 certificate: {e}"),
                        });
                    }
                }
                chain.push(der);
            }
            authorities.push(CertificateAuthority {
                uri: ca.uri.clone(),
                chain,
                valid_for: window(&ca.valid_for, &field)?,
            });
        }
        let mut logs = Vec::new();
        for (i, log) in raw.tlogs.iter().enumerate() {
            let field = format!("tlogs[{i}]");
            if log.public_key.key_details != "PKIX_ECDSA_P256_SHA_256"
                || (!log.hash_algorithm.is_empty() && log.hash_algorithm != "SHA2_256")
            {
                tracing::debug!(
                    log = %log.base_url,
                    key = %log.public_key.key_details,
                    "skipping a transparency log whose key cannot sign SignedEntryTimestamps"
                );
                continue;
            }
            let der = B64
                .decode(&log.public_key.raw_bytes)
                .map_err(|e| RootError::Invalid {
                    field: format!("{field}.publicKey.rawBytes"),
                    reason: format!("not base64: {e}"),
                })?;
            let key = PublicKey::from_spki_der(&der).map_err(|e| RootError::Invalid {
                field: format!("{field}.publicKey"),
                reason: e.to_string(),
            })?;
            if key.algorithm() != "ECDSA P-256" {
                return Err(RootError::Invalid {
                    field: format!("{field}.publicKey"),
                    reason: format!(
                        "keyDetails says ECDSA P-256, the key is {}",
                        key.algorithm()
                    ),
                });
            }
            let log_id: [u8; 32] = Sha256::digest(&der).into();
            // Bundles name the log by this ID; a root whose ID is not its key's hash would
            // let a bundle select a key under a false name.
            let named = B64.decode(&log.log_id.key_id).unwrap_or_default();
            if named != log_id {
                return Err(RootError::Invalid {
                    field: format!("{field}.logId.keyId"),
                    reason: "is not the SHA-256 of the log's public key".into(),
                });
            }
            logs.push(TransparencyLog {
                base_url: log.base_url.clone(),
                key,
                log_id,
                valid_for: window(&log.public_key.valid_for, &format!("{field}.publicKey"))?,
            });
        }
        if authorities.is_empty() {
            return Err(RootError::NoAuthority);
        }
        if logs.is_empty() {
            return Err(RootError::NoLog);
        }
        Ok(Self { authorities, logs })
    }

    /// The log whose ID is `log_id`.
    pub fn log(&self, log_id: &[u8]) -> Option<&TransparencyLog> {
        self.logs.iter().find(|l| l.log_id[..] == *log_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_inclusive_and_open_ended() {
        let w = Window {
            start: Some(10),
            end: None,
        };
        assert!(!w.contains(9) && w.contains(10) && w.contains(i64::MAX));
        let w = Window {
            start: None,
            end: Some(20),
        };
        assert!(w.contains(20) && !w.contains(21));
    }

    #[test]
    fn refuses_roots_without_authorities_or_logs() {
        assert_eq!(
            TrustedRoot::from_json(
                r#"{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1"}"#
            )
            .unwrap_err(),
            RootError::NoAuthority
        );
        assert!(matches!(
            TrustedRoot::from_json("\"a string\""),
            Err(RootError::Parse(_))
        ));
    }
}
