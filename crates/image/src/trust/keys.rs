//! Public keys and the signature schemes cosign uses with them.
//!
//! Owns the mapping from a key type to the exact verification cosign's signatures need:
//! - ECDSA (P-256, and P-384 for certificate chains): an ASN.1 DER signature over a digest
//!   (SHA-256 for everything cosign signs, whatever the curve; the certificate's own
//!   algorithm for chain links).
//! - RSA: PKCS#1 v1.5 (never PSS), 2048 to 8192 bits.
//! - Ed25519: cosign signs images with Ed25519ph (SHA-512 pre-hash, RFC 8032 `dom2(1, "")`);
//!   pure Ed25519, which older cosign releases wrote, is accepted too.

use ed25519_dalek::Digest as _;
use sha2::{Digest, Sha256, Sha384, Sha512};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM public key: {0}")]
    NotPem(String),
    #[error("PEM block is {0:?}, expected \"PUBLIC KEY\"")]
    WrongPemLabel(String),
    #[error("not a DER SubjectPublicKeyInfo: {0}")]
    BadSpki(String),
    #[error("unsupported key type {0}; supported: ECDSA P-256, Ed25519, RSA (2048+ bits)")]
    Unsupported(String),
    #[error("RSA key of {bits} bits is too small: at least {MIN_RSA_BITS} are required")]
    RsaTooSmall { bits: usize },
    #[error("invalid {algorithm} key: {reason}")]
    Invalid {
        algorithm: &'static str,
        reason: String,
    },
}

/// The digest applied before an ECDSA or RSA signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, msg: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::digest(msg).to_vec(),
            Hash::Sha384 => Sha384::digest(msg).to_vec(),
            Hash::Sha512 => Sha512::digest(msg).to_vec(),
        }
    }
}

#[derive(Clone)]
enum Inner {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
}

/// A public key, with the DER SubjectPublicKeyInfo it was read from (compared byte for byte
/// where a Rekor entry names a key).
#[derive(Clone)]
pub struct PublicKey {
    inner: Inner,
    spki_der: Vec<u8>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithm", &self.algorithm())
            .field("sha256", &hex::encode(Sha256::digest(&self.spki_der)))
            .finish()
    }
}

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` block (an SPKI), as `cosign generate-key-pair` writes it.
    /// Only the key types an authority may use: ECDSA P-256, Ed25519, RSA of 2048+ bits.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (rest, block) = x509_parser::pem::parse_x509_pem(pem.trim_start().as_bytes())
            .map_err(|e| KeyError::NotPem(e.to_string()))?;
        if block.label != "PUBLIC KEY" {
            return Err(KeyError::WrongPemLabel(block.label));
        }
        if !String::from_utf8_lossy(rest).trim().is_empty() {
            // A second block would be silently ignored; an authority names one key.
            return Err(KeyError::NotPem("more than one PEM block".into()));
        }
        let key = Self::from_spki_der(&block.contents)?;
        if matches!(key.inner, Inner::P384(_)) {
            return Err(KeyError::Unsupported("ECDSA P-384".into()));
        }
        Ok(key)
    }

    /// Reads a DER SubjectPublicKeyInfo: ECDSA P-256/P-384, Ed25519 or RSA (2048+ bits).
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let (rest, spki) =
            SubjectPublicKeyInfo::from_der(der).map_err(|e| KeyError::BadSpki(e.to_string()))?;
        if !rest.is_empty() {
            return Err(KeyError::BadSpki("trailing bytes".into()));
        }
        let alg = spki.algorithm.algorithm.to_id_string();
        let bits: &[u8] = &spki.subject_public_key.data;
        let invalid =
            |algorithm: &'static str, reason: String| KeyError::Invalid { algorithm, reason };
        let inner = match alg.as_str() {
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                match curve.as_str() {
                    OID_P256 => Inner::P256(
                        p256::ecdsa::VerifyingKey::from_sec1_bytes(bits)
                            .map_err(|e| invalid("ECDSA P-256", e.to_string()))?,
                    ),
                    OID_P384 => Inner::P384(
                        p384::ecdsa::VerifyingKey::from_sec1_bytes(bits)
                            .map_err(|e| invalid("ECDSA P-384", e.to_string()))?,
                    ),
                    other => {
                        return Err(KeyError::Unsupported(format!("ECDSA on curve {other}")));
                    }
                }
            }
            OID_ED25519 => {
                let raw: &[u8; 32] = bits
                    .try_into()
                    .map_err(|_| invalid("Ed25519", format!("{} bytes, not 32", bits.len())))?;
                Inner::Ed25519(
                    ed25519_dalek::VerifyingKey::from_bytes(raw)
                        .map_err(|e| invalid("Ed25519", e.to_string()))?,
                )
            }
            OID_RSA => {
                use rsa::pkcs1::der::Decode as _;
                use rsa::traits::PublicKeyParts as _;
                let k = rsa::pkcs1::RsaPublicKey::from_der(bits)
                    .map_err(|e| invalid("RSA", e.to_string()))?;
                let n = rsa::BigUint::from_bytes_be(k.modulus.as_bytes());
                let e = rsa::BigUint::from_bytes_be(k.public_exponent.as_bytes());
                let key = rsa::RsaPublicKey::new_with_max_size(n, e, MAX_RSA_BITS)
                    .map_err(|e| invalid("RSA", e.to_string()))?;
                let bits = key.n().bits();
                if bits < MIN_RSA_BITS {
                    return Err(KeyError::RsaTooSmall { bits });
                }
                Inner::Rsa(key)
            }
            other => return Err(KeyError::Unsupported(format!("with algorithm OID {other}"))),
        };
        Ok(Self {
            inner,
            spki_der: der.to_vec(),
        })
    }

    /// `ECDSA P-256`, `Ed25519`, `RSA-3072`, …
    pub fn algorithm(&self) -> String {
        match &self.inner {
            Inner::P256(_) => "ECDSA P-256".into(),
            Inner::P384(_) => "ECDSA P-384".into(),
            Inner::Ed25519(_) => "Ed25519".into(),
            Inner::Rsa(k) => {
                use rsa::traits::PublicKeyParts as _;
                format!("RSA-{}", k.n().bits())
            }
        }
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo: what names this key in attestations
    /// and status (`openssl pkey -pubin -outform DER | sha256sum` gives the same hex).
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(&self.spki_der)))
    }

    /// Whether `sig` has the form of a signature by this key, judged without cryptography:
    /// an ASN.1 DER ECDSA signature with both scalars in range, 64 bytes for Ed25519, the
    /// modulus' length for RSA. What fails here never verifies, so a verifier can set it
    /// aside before spending a signature check on it.
    pub fn check_form(&self, sig: &[u8]) -> Result<(), String> {
        match &self.inner {
            Inner::P256(_) => p256::ecdsa::Signature::from_der(sig)
                .map(|_| ())
                .map_err(|_| NOT_DER.to_string()),
            Inner::P384(_) => p384::ecdsa::Signature::from_der(sig)
                .map(|_| ())
                .map_err(|_| NOT_DER.to_string()),
            Inner::Ed25519(_) => ed25519_dalek::Signature::from_slice(sig)
                .map(|_| ())
                .map_err(|_| not_ed25519(sig)),
            Inner::Rsa(k) => {
                use rsa::traits::PublicKeyParts as _;
                if sig.len() == k.size() {
                    Ok(())
                } else {
                    Err(format!(
                        "an {} signature is {} bytes, not {}",
                        self.algorithm(),
                        k.size(),
                        sig.len()
                    ))
                }
            }
        }
    }

    /// Verifies a signature over `msg` as cosign makes them: SHA-256 for ECDSA and RSA,
    /// Ed25519ph (or pure Ed25519) for Ed25519.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        self.verify_with(Hash::Sha256, msg, sig)
    }

    /// Verifies a signature over `msg` with `hash` as the digest for ECDSA and RSA (the
    /// certificate signature algorithm of a chain link). Ed25519 ignores `hash`.
    pub fn verify_with(&self, hash: Hash, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        let bad = || "signature does not verify".to_string();
        match &self.inner {
            Inner::P256(k) => {
                use p256::ecdsa::signature::hazmat::PrehashVerifier;
                let s = p256::ecdsa::Signature::from_der(sig).map_err(|_| NOT_DER.to_string())?;
                k.verify_prehash(&hash.digest(msg), &s).map_err(|_| bad())
            }
            Inner::P384(k) => {
                use p384::ecdsa::signature::hazmat::PrehashVerifier;
                let s = p384::ecdsa::Signature::from_der(sig).map_err(|_| NOT_DER.to_string())?;
                k.verify_prehash(&hash.digest(msg), &s).map_err(|_| bad())
            }
            Inner::Rsa(k) => {
                let scheme = match hash {
                    Hash::Sha256 => rsa::Pkcs1v15Sign::new::<Sha256>(),
                    Hash::Sha384 => rsa::Pkcs1v15Sign::new::<Sha384>(),
                    Hash::Sha512 => rsa::Pkcs1v15Sign::new::<Sha512>(),
                };
                k.verify(scheme, &hash.digest(msg), sig).map_err(|_| bad())
            }
            Inner::Ed25519(k) => {
                let s = ed25519_dalek::Signature::from_slice(sig).map_err(|_| not_ed25519(sig))?;
                let ph = ed25519_dalek::Sha512::new().chain_update(msg);
                if k.verify_prehashed_strict(ph, None, &s).is_ok()
                    || k.verify_strict(msg, &s).is_ok()
                {
                    Ok(())
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// Why a signature is not one an ECDSA key makes.
const NOT_DER: &str = "not an ASN.1 DER ECDSA signature";

/// Why `sig` is not one an Ed25519 key makes.
fn not_ed25519(sig: &[u8]) -> String {
    format!("an Ed25519 signature is 64 bytes, not {}", sig.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_a_public_key() {
        assert!(matches!(
            PublicKey::from_pem("hello"),
            Err(KeyError::NotPem(_))
        ));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            PublicKey::from_pem(cert),
            Err(KeyError::WrongPemLabel(l)) if l == "CERTIFICATE"
        ));
    }

    #[test]
    fn the_form_of_a_signature_is_checked_without_cryptography() {
        // RFC 8410's Ed25519 test key, and a P-256 key.
        let ed = PublicKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        assert!(ed.check_form(&[1; 64]).is_ok());
        assert!(ed.check_form(&[1; 63]).unwrap_err().contains("64 bytes"));
        let p256 = PublicKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEhs7GGs1eB6Y9KSasVe34Jo6VkPVJ\nD7fZENMp15TCIeeVK8UjCq9dmYaOFOAyx/ubYGLPLiAgQe/mLwnUjurekw==\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        // SEQUENCE { INTEGER 1, INTEGER 1 }: well-formed, if no valid signature.
        assert!(p256.check_form(&[0x30, 6, 2, 1, 1, 2, 1, 1]).is_ok());
        // The bug report's junk: a DER header, then zero bytes where `s` should be.
        let mut junk = vec![0x30, 0x45, 0x02, 0x21];
        junk.extend([0u8; 67]);
        assert_eq!(p256.check_form(&junk).unwrap_err(), NOT_DER);
        // A zero scalar is out of range.
        assert!(p256.check_form(&[0x30, 6, 2, 1, 0, 2, 1, 1]).is_err());
    }
}
