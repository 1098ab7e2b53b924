//! Signature verification: whether an image digest may be used, under the cluster's trust
//! policy. The admission webhook, `gkm verify` and promotion decide through this module.
//!
//! It owns:
//! - [`policy`]: the trust policy (authorities, trusted registries, verification settings,
//!   Pod policy, promotion), parsed with every problem reported at once;
//! - [`Verifier`]: discovery of an image's signatures in both cosign formats (the
//!   `sha256-<hex>.sig` tag, and Sigstore bundles as OCI referrers or under the referrers
//!   fallback tag), the decision, the cache of successes and the fail-closed timeout;
//! - [`attest`]: attestations in cosign's `.att` tag: the verification attestation the
//!   promoter signs, and the check of those a policy requires;
//! - the cryptographic checks, done here with RustCrypto primitives rather than trusted to a
//!   Sigstore library (see DESIGN.md, "Known hazards"): [`keys`] (ECDSA P-256, Ed25519ph,
//!   RSA PKCS#1 v1.5), [`tag`] (simple-signing claims), [`bundle`] (DSSE PAE, in-toto
//!   statements), [`keyless`] (certificate chain, OIDC identity, Rekor SET and entry
//!   binding), [`root`] (`trusted_root.json`) and [`canonical`] (RFC 8785 JSON).
//!
//! An image is accepted when its repository lies in a trusted registry and at least one of
//! its signatures verifies, claims and all, under at least one authority. Everything else
//! denies, naming the image and saying, signature by signature, why.

pub mod attest;
pub mod bundle;
pub mod canonical;
pub mod keyless;
pub mod keys;
pub mod policy;
pub mod root;
pub mod sign;
pub mod tag;
mod verifier;

pub use keyless::{KeylessIdentity, SubjectMatch};
pub use keys::PublicKey;
pub use policy::{
    Authority, AuthorityKind, Condition, ConditionTest, PodPolicy, PodRules, PolicyError, Problem,
    Promotion, RegistryPrefix, RequiredAttestation, Scope, TrustPolicy, UntrustedRegistry,
    VerificationSettings,
};
pub use root::TrustedRoot;
pub use verifier::{
    Evidence, MAX_BLOB_BYTES, MAX_MANIFEST_BYTES, MAX_SIGNATURE_CHECKS, MAX_SIGNATURE_FETCHES,
    Rejected, SignatureFormat, Signer, Verified, Verifier, VerifyError,
};
