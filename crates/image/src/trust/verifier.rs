//! The [`Verifier`]: finds an image's signatures in its registry, in both formats, and
//! decides under the current [`TrustPolicy`]; shared by concurrent admission requests.
//!
//! Owns discovery (the `.sig` tag, referrers or their fallback tag), the decision (accept
//! when any signature verifies under any authority), the cache of successes and the overall
//! timeout. Fails closed: a timeout, an unreachable registry or a bad signature all deny,
//! with a message that names the image and says why, signature by signature.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use oci_client::Reference;
use serde::Deserialize;
use tracing::{Instrument, debug, info, info_span, warn};

use super::bundle::{BUNDLE_MEDIA_TYPE_PREFIX, Bundle, COSIGN_PREDICATE_TYPE, Material};
use super::keyless::{self, LogEntry, Signed};
use super::policy::{AuthorityKind, Scope, TrustPolicy};
use super::tag::{self, BUNDLE_ANNOTATION, CERTIFICATE_ANNOTATION, SIGNATURE_ANNOTATION};
use crate::oci::{Credentials, ImageSource, PinnedRef, PullConfig, PullError, Puller, RefError};

/// Largest manifest read (a `.sig` manifest grows by one layer per signature).
pub const MAX_MANIFEST_BYTES: usize = 2 << 20;
/// Largest payload or bundle blob read.
pub const MAX_BLOB_BYTES: u64 = 1 << 20;
/// Most registry fetches one format makes for an image's signatures: payload blobs of the
/// `.sig` tag (each distinct blob once), or referrer manifests and their bundle blobs (two
/// per referrer). With [`MAX_SIGNATURE_CHECKS`], what a signature manifest full of junk can
/// cost one verification.
pub const MAX_SIGNATURE_FETCHES: usize = 128;
/// Most signatures one format checks cryptographically (each against every authority).
/// The checks that need neither a fetch nor cryptography (media type, digest, size, an
/// annotation that decodes to a signature of the form some authority's key makes, or comes
/// with a certificate for an identity) run on every signature, unbounded.
pub const MAX_SIGNATURE_CHECKS: usize = 1024;
/// Most successful verifications remembered.
const MAX_CACHE_ENTRIES: usize = 10_000;

/// Where a verified signature was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFormat {
    /// cosign's tag format: a simple-signing layer of `<repo>:sha256-<hex>.sig`.
    Tag,
    /// A Sigstore bundle attached as an OCI referrer (or under the referrers fallback tag).
    Bundle,
}

impl fmt::Display for SignatureFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureFormat::Tag => "cosign tag format",
            SignatureFormat::Bundle => "Sigstore bundle",
        })
    }
}

impl SignatureFormat {
    /// The word status and attestations use: `tag` or `bundle`.
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureFormat::Tag => "tag",
            SignatureFormat::Bundle => "bundle",
        }
    }
}

/// A successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The image digest the signature binds (`sha256:…`).
    pub digest: String,
    /// The name of the authority it verified under.
    pub authority: String,
    /// What identifies the signer under that authority.
    pub signer: Signer,
    pub format: SignatureFormat,
    /// Which signature verified (promotion lists it first in the trusted registry).
    pub evidence: Evidence,
    /// When the signature was verified (a cached result keeps its original time).
    pub verified_at: std::time::SystemTime,
    /// The attestations the policy required of this image's scope, each as found.
    pub attestations: Vec<super::attest::FoundAttestation>,
}

/// Who signed, under the authority that accepted the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    /// A key authority: `sha256:<hex>` of its SubjectPublicKeyInfo.
    Key { fingerprint: String },
    /// A keyless authority: the certificate's OIDC issuer and the subject (email or URI
    /// SAN) that matched.
    Keyless { issuer: String, subject: String },
}

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signer::Key { fingerprint } => write!(f, "key {fingerprint}"),
            Signer::Keyless { issuer, subject } => write!(f, "{subject} (issuer {issuer})"),
        }
    }
}

/// The [`Signer`] of a signature that verified under authority `name`; `cert_der` is the
/// certificate that came with it, if any.
fn signer_of(policy: &TrustPolicy, name: &str, cert_der: Option<&[u8]>) -> Signer {
    match policy
        .authorities
        .iter()
        .find(|a| a.name == name)
        .map(|a| &a.kind)
    {
        Some(AuthorityKind::Key(k)) => Signer::Key {
            fingerprint: k.fingerprint(),
        },
        Some(AuthorityKind::Keyless(id)) => Signer::Keyless {
            issuer: id.issuer.clone(),
            subject: cert_der
                .and_then(|c| id.matched_subject(c))
                .unwrap_or_default(),
        },
        // `decide` only names authorities of the policy.
        None => Signer::Key {
            fingerprint: String::new(),
        },
    }
}

/// The one signature that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// A layer of the `.sig` tag: its payload's digest and its signature annotation.
    Layer { payload: String, signature: String },
    /// A Sigstore-bundle referrer: its manifest's digest.
    Referrer { digest: String },
}

/// One signature found, and why it did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where it was found, in words (`tag-format signature 2 (sha256-….sig layer 1)`).
    pub signature: String,
    /// Why not: claim problems, then one reason per authority (`authority "ci": …`).
    pub reasons: Vec<String>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.signature, self.reasons.join("; "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Reference(#[from] RefError),
    #[error(transparent)]
    UntrustedRegistry(#[from] super::policy::UntrustedRegistry),
    #[error("no signatures found for {image}")]
    NoSignatures { image: String },
    #[error("could not read the signatures of {image}: {}", problems.join("; "))]
    Registry {
        image: String,
        problems: Vec<String>,
    },
    #[error(
        "no signature of {image} verified under the trust policy:{}{}",
        list_rejected(rejected),
        problems.iter().map(|p| format!("\n  - also: {p}")).collect::<String>()
    )]
    NotVerified {
        image: String,
        rejected: Vec<Rejected>,
        /// Signatures that could not be read at all (registry errors).
        problems: Vec<String>,
    },
    #[error("verifying the signatures of {image} timed out after {after:?}; denied")]
    Timeout { image: String, after: Duration },
    /// The signature verified, but an attestation the policy requires is missing or fails.
    #[error(
        "{image} is signed, but the trust policy requires {required} for {scope}, and none was found:{}",
        reasons.iter().map(|r| format!("\n  - {r}")).collect::<String>()
    )]
    Attestation {
        image: String,
        scope: Scope,
        required: String,
        reasons: Vec<String>,
    },
}

/// How [`Rejected`] entries the bounds left unexamined begin their reason.
const NOT_EXAMINED: &str = "not examined";

/// The rejected signatures, one line each: the first few and every summary of unexamined
/// ones, so a signature manifest full of junk does not make a denial of thousands of lines.
fn list_rejected(rejected: &[Rejected]) -> String {
    const SHOWN: usize = 12;
    let mut out = String::new();
    let mut hidden = 0;
    for (i, r) in rejected.iter().enumerate() {
        let summary = r.reasons.iter().any(|x| x.starts_with(NOT_EXAMINED));
        if i < SHOWN || summary {
            out.push_str(&format!("\n  - {r}"));
        } else {
            hidden += 1;
        }
    }
    if hidden > 0 {
        out.push_str(&format!("\n  - and {hidden} more signatures rejected"));
    }
    out
}

impl VerifyError {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            VerifyError::Reference(_) => "bad_reference",
            VerifyError::UntrustedRegistry(_) => "untrusted_registry",
            VerifyError::NoSignatures { .. } => "no_signatures",
            VerifyError::Registry { .. } => "registry_error",
            VerifyError::NotVerified { .. } => "not_verified",
            VerifyError::Timeout { .. } => "timeout",
            VerifyError::Attestation { .. } => "attestation_missing",
        }
    }
}

struct Loaded {
    policy: Arc<TrustPolicy>,
    generation: u64,
}

struct CacheEntry {
    verified: Verified,
    generation: u64,
    at: Instant,
}

/// Verifies image signatures under a trust policy. `Send + Sync`; share one (`Arc`) across
/// requests. Successful verifications are cached by digest for the policy's TTL; a new
/// policy ([`Verifier::set_policy`]) starts a new generation, so nothing verified under an
/// older policy is served from the cache.
pub struct Verifier {
    source: Arc<dyn ImageSource>,
    loaded: RwLock<Arc<Loaded>>,
    cache: Mutex<HashMap<String, CacheEntry>>,
}

impl Verifier {
    /// A verifier that reaches registries through `puller`.
    pub fn new(policy: TrustPolicy, puller: Puller) -> Self {
        Self::with_source(policy, Arc::new(puller))
    }

    /// A verifier that reads signatures from `source` (a [`Puller`], or an
    /// [`crate::oci::InMemoryRegistry`] in unit tests).
    pub fn with_source(policy: TrustPolicy, source: Arc<dyn ImageSource>) -> Self {
        Self {
            source,
            loaded: RwLock::new(Arc::new(Loaded {
                policy: Arc::new(policy),
                generation: 1,
            })),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A verifier with its own registry client, configured like the node's pulls.
    pub fn with_config(policy: TrustPolicy, config: PullConfig, credentials: Credentials) -> Self {
        Self::new(policy, Puller::new(config, credentials))
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<TrustPolicy> {
        self.loaded().policy.clone()
    }

    /// The policy generation: 1 at construction, one more for each [`Verifier::set_policy`].
    pub fn generation(&self) -> u64 {
        self.loaded().generation
    }

    /// Puts a new policy in force (a reloaded ConfigMap) and forgets every cached result.
    pub fn set_policy(&self, policy: TrustPolicy) {
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        let generation = loaded.generation + 1;
        *loaded = Arc::new(Loaded {
            policy: Arc::new(policy),
            generation,
        });
        drop(loaded);
        self.clear_cache();
        info!(generation, "trust policy replaced");
    }

    /// Forgets every cached verification.
    pub fn clear_cache(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Parses `image` (which must be pinned: `repo@sha256:…`) and verifies it.
    pub async fn verify_reference(&self, image: &str) -> Result<Verified, VerifyError> {
        let pinned = PinnedRef::parse(image)?;
        self.verify(&pinned).await
    }

    /// Verifies cache image `image` under the policy in force: its repository must be in
    /// a trusted registry, at least one of its signatures must verify under an authority,
    /// and it must carry every attestation the policy requires of caches.
    pub async fn verify(&self, image: &PinnedRef) -> Result<Verified, VerifyError> {
        self.verify_from(image, Some(Scope::Caches)).await
    }

    /// [`Verifier::verify`] for an image of `scope` (a Pod's container image checks the
    /// attestations required of pods).
    pub async fn verify_for(
        &self,
        image: &PinnedRef,
        scope: Scope,
    ) -> Result<Verified, VerifyError> {
        self.verify_from(image, Some(scope)).await
    }

    /// Verifies `image` of the promotion's incoming registry under the policy's authorities,
    /// before it is promoted. Never cached, and never answered from the cache: the trusted
    /// copy is verified on its own when admission asks.
    pub async fn verify_incoming(&self, image: &PinnedRef) -> Result<Verified, VerifyError> {
        self.verify_from(image, None).await
    }

    /// `scope` is `None` for an incoming image: signatures only, never cached.
    async fn verify_from(
        &self,
        image: &PinnedRef,
        scope: Option<Scope>,
    ) -> Result<Verified, VerifyError> {
        self.verify_through(self.source.as_ref(), image, scope)
            .await
    }

    /// [`Verifier::verify_for`], reading the registry through `source` rather than the
    /// verifier's own: a [`Puller`] with a cache's own pull credentials. A success is
    /// remembered by digest like any other (a signature's validity does not depend on
    /// who read it).
    pub async fn verify_for_through(
        &self,
        source: &dyn ImageSource,
        image: &PinnedRef,
        scope: Scope,
    ) -> Result<Verified, VerifyError> {
        self.verify_through(source, image, Some(scope)).await
    }

    async fn verify_through(
        &self,
        src: &dyn ImageSource,
        image: &PinnedRef,
        scope: Option<Scope>,
    ) -> Result<Verified, VerifyError> {
        let incoming = scope.is_none();
        let span =
            info_span!("verify_signatures", image = %image, digest = %image.digest(), incoming);
        async {
            let loaded = self.loaded();
            let policy = &loaded.policy;
            if incoming {
                let inside = policy
                    .promotion
                    .as_ref()
                    .is_some_and(|p| p.incoming.matches_reference(image.as_reference()));
                if !inside {
                    return Err(super::policy::UntrustedRegistry {
                        image: image.to_string(),
                        trusted: vec![
                            policy
                                .promotion
                                .as_ref()
                                .map(|p| p.incoming.as_str().to_string())
                                .unwrap_or_else(|| "no promotion.incoming".into()),
                        ],
                    }
                    .into());
                }
            }
            // The registry check comes before the cache: a digest verified in one
            // repository must not be admitted from an untrusted one.
            else {
                policy.check_registry(&image.to_string(), image.as_reference())?;
            }
            let ttl = if incoming {
                Duration::ZERO
            } else {
                policy.verification.cache_ttl
            };
            let key = cache_key(image.digest(), scope);
            if let Some(v) = self.cached(&key, loaded.generation, ttl) {
                debug!(authority = %v.authority, "verified (cached)");
                return Ok(v);
            }
            let after = policy.verification.timeout;
            let work = async {
                let mut v = self.verify_uncached(src, policy, image).await?;
                if let Some(scope) = scope {
                    v.attestations = self
                        .required_attestations(src, policy, image, scope)
                        .await?;
                }
                Ok(v)
            };
            let result = tokio::time::timeout(after, work).await.unwrap_or_else(|_| {
                Err(VerifyError::Timeout {
                    image: image.to_string(),
                    after,
                })
            });
            match &result {
                Ok(v) => {
                    info!(authority = %v.authority, format = %v.format, "signature verified");
                    if !ttl.is_zero() {
                        self.remember(&key, v, loaded.generation);
                    }
                }
                Err(e) => warn!(error = %e, "signature verification denied"),
            }
            result
        }
        .instrument(span)
        .await
    }

    fn cached(&self, key: &str, generation: u64, ttl: Duration) -> Option<Verified> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|e| e.generation == generation && e.at.elapsed() < ttl)
            .map(|e| e.verified.clone())
    }

    fn remember(&self, key: &str, v: &Verified, generation: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            // Drop the stale generation first, then the oldest entry; the cache only saves
            // registry round trips, so losing an entry costs one re-verification.
            cache.retain(|_, e| e.generation == generation);
            if cache.len() >= MAX_CACHE_ENTRIES
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, e)| e.at)
                    .map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(
            key.to_string(),
            CacheEntry {
                verified: v.clone(),
                generation,
                at: Instant::now(),
            },
        );
    }

    /// Each attestation the policy requires of `scope`, found, or the first requirement
    /// none meets.
    async fn required_attestations(
        &self,
        src: &dyn ImageSource,
        policy: &TrustPolicy,
        image: &PinnedRef,
        scope: Scope,
    ) -> Result<Vec<super::attest::FoundAttestation>, VerifyError> {
        let mut found = Vec::new();
        for required in policy
            .required_attestations
            .iter()
            .filter(|r| r.applies(scope))
        {
            match super::attest::find(src, image, required).await {
                Ok(a) => {
                    debug!(predicate_type = %a.predicate_type, authority = %a.authority, "attestation found");
                    found.push(a);
                }
                Err(reasons) => {
                    return Err(VerifyError::Attestation {
                        image: image.to_string(),
                        scope,
                        required: required.to_string(),
                        reasons: shorten(reasons),
                    });
                }
            }
        }
        Ok(found)
    }

    async fn verify_uncached(
        &self,
        src: &dyn ImageSource,
        policy: &TrustPolicy,
        image: &PinnedRef,
    ) -> Result<Verified, VerifyError> {
        let (tag, bundles) = futures::join!(
            self.tag_signatures(src, policy, image),
            self.bundle_signatures(src, policy, image)
        );
        let mut found = Found::default();
        for part in [tag, bundles] {
            if let Some(v) = part.verified {
                return Ok(v);
            }
            found.rejected.extend(part.rejected);
            found.problems.extend(part.problems);
        }
        let name = image.to_string();
        Err(
            match (found.rejected.is_empty(), found.problems.is_empty()) {
                (true, true) => VerifyError::NoSignatures { image: name },
                (true, false) => VerifyError::Registry {
                    image: name,
                    problems: found.problems,
                },
                (false, _) => VerifyError::NotVerified {
                    image: name,
                    rejected: found.rejected,
                    problems: found.problems,
                },
            },
        )
    }

    /// The tag format: the layers of `<repo>:sha256-<hex>.sig`, in [`tag_order`], within
    /// one [`Budget`].
    async fn tag_signatures(
        &self,
        src: &dyn ImageSource,
        policy: &TrustPolicy,
        image: &PinnedRef,
    ) -> Found {
        let mut found = Found::default();
        let tag_name = tag::signature_tag(image.digest());
        let reference = Reference::with_tag(
            image.registry().to_string(),
            image.repository().to_string(),
            tag_name.clone(),
        );
        let manifest = match src
            .fetch_manifest_bytes(&reference, MAX_MANIFEST_BYTES)
            .await
        {
            Ok(None) => return found,
            Ok(Some((bytes, _))) => bytes,
            Err(e) => {
                found
                    .problems
                    .push(format!("signature tag {tag_name}: {e}"));
                return found;
            }
        };
        let manifest: SignatureManifest = match serde_json::from_slice(&manifest) {
            Ok(m) => m,
            Err(e) => {
                found.rejected.push(Rejected {
                    signature: format!("signature tag {tag_name}"),
                    reasons: vec![format!("not an image manifest: {e}")],
                });
                return found;
            }
        };
        let total = manifest.layers.len();
        // The payload cosign (and GKM's own signing) writes for this image here is known
        // without a fetch; identical payloads share one blob, fetched once.
        let expected = super::sign::simple_signing_payload(
            &format!("{}/{}", image.registry(), image.repository()),
            image.digest(),
        );
        let expected_digest = super::sign::sha256_digest(&expected);
        let mut blobs: HashMap<String, Result<Vec<u8>, String>> =
            HashMap::from([(expected_digest.clone(), Ok(expected))]);
        let mut budget = Budget::default();
        let mut skipped = Vec::new();
        for i in tag_order(policy, &manifest.layers, &expected_digest) {
            let layer = &manifest.layers[i];
            let signature = format!(
                "tag-format signature {} of {total} ({tag_name} layer {i})",
                i + 1
            );
            let sig = match precheck_layer(policy, layer) {
                Ok(sig) => sig,
                Err(reasons) => {
                    found.rejected.push(Rejected { signature, reasons });
                    continue;
                }
            };
            if !blobs.contains_key(&layer.digest) {
                if !budget.spend(1, 0) {
                    skipped.push(i);
                    continue;
                }
                let got = self.small_blob(src, image, &layer.digest, layer.size).await;
                blobs.insert(layer.digest.clone(), got);
            }
            if !budget.spend(0, 1) {
                skipped.push(i);
                continue;
            }
            let outcome = match &blobs[&layer.digest] {
                Err(e) => Err(vec![format!("payload unreadable: {e}")]),
                Ok(payload) => tag_layer(policy, image, layer, &sig, payload),
            };
            match outcome {
                Ok(authority) => {
                    let cert = layer
                        .annotations
                        .get(CERTIFICATE_ANNOTATION)
                        .and_then(|c| keyless::cert_from_pem(c).ok());
                    found.verified = Some(Verified {
                        digest: image.digest().to_string(),
                        signer: signer_of(policy, &authority, cert.as_deref()),
                        authority,
                        format: SignatureFormat::Tag,
                        verified_at: std::time::SystemTime::now(),
                        attestations: Vec::new(),
                        evidence: Evidence::Layer {
                            payload: layer.digest.clone(),
                            signature: layer
                                .annotations
                                .get(SIGNATURE_ANNOTATION)
                                .cloned()
                                .unwrap_or_default(),
                        },
                    });
                    return found;
                }
                Err(reasons) => found.rejected.push(Rejected { signature, reasons }),
            }
        }
        if !skipped.is_empty() {
            found.rejected.push(not_examined(
                &format!("tag-format signatures ({tag_name} layers"),
                &skipped,
                total,
            ));
        }
        found
    }

    /// The bundle format: the Sigstore-bundle referrers of the image, in [`bundle_order`],
    /// within one [`Budget`].
    async fn bundle_signatures(
        &self,
        src: &dyn ImageSource,
        policy: &TrustPolicy,
        image: &PinnedRef,
    ) -> Found {
        let mut found = Found::default();
        let index = match src.list_referrers(image).await {
            Ok(i) => i,
            Err(e) => {
                found.problems.push(format!("referrers: {e}"));
                return found;
            }
        };
        let candidates: Vec<_> = index
            .manifests
            .iter()
            .filter(|m| {
                // Other referrers (SBOMs, attestations) are not signatures. Some registries
                // report the config's empty type as artifactType, so those are opened too.
                m.artifact_type.as_deref().is_none_or(|t| {
                    t.starts_with(BUNDLE_MEDIA_TYPE_PREFIX)
                        || t == "application/vnd.oci.empty.v1+json"
                })
            })
            .collect();
        let total = candidates.len();
        let mut budget = Budget::default();
        let mut seen = HashSet::new();
        let mut skipped = Vec::new();
        for i in bundle_order(&candidates) {
            let entry = candidates[i];
            if !seen.insert(entry.digest.as_str()) {
                continue; // listed twice: examined once
            }
            // Its manifest and its bundle blob, then one check.
            if !budget.spend(2, 1) {
                skipped.push(i);
                continue;
            }
            let signature = format!("bundle {} of {total} (referrer {})", i + 1, entry.digest);
            match self
                .bundle_referrer(src, policy, image, &entry.digest)
                .await
            {
                Ok(Some((authority, cert))) => {
                    found.verified = Some(Verified {
                        digest: image.digest().to_string(),
                        signer: signer_of(policy, &authority, cert.as_deref()),
                        authority,
                        format: SignatureFormat::Bundle,
                        verified_at: std::time::SystemTime::now(),
                        attestations: Vec::new(),
                        evidence: Evidence::Referrer {
                            digest: entry.digest.clone(),
                        },
                    });
                    return found;
                }
                Ok(None) => {}
                Err(reasons) => found.rejected.push(Rejected { signature, reasons }),
            }
        }
        if !skipped.is_empty() {
            found
                .rejected
                .push(not_examined("bundles (referrers", &skipped, total));
        }
        found
    }

    /// One referrer: Ok(Some(authority)) when it verifies, Ok(None) when it is not a
    /// Sigstore bundle at all, or the reasons why it does not verify.
    async fn bundle_referrer(
        &self,
        src: &dyn ImageSource,
        policy: &TrustPolicy,
        image: &PinnedRef,
        digest: &str,
    ) -> Result<Option<(String, Option<Vec<u8>>)>, Vec<String>> {
        let one = |e: String| vec![e];
        if crate::oci::sha256_hex(digest).is_none() {
            return Err(one(format!("referrer digest {digest:?} is not sha256")));
        }
        let reference = Reference::with_digest(
            image.registry().to_string(),
            image.repository().to_string(),
            digest.to_string(),
        );
        let bytes = match src
            .fetch_manifest_bytes(&reference, MAX_MANIFEST_BYTES)
            .await
        {
            Ok(Some((b, _))) => b,
            Ok(None) => return Err(one("the referrer manifest does not exist".into())),
            Err(e) => return Err(one(format!("referrer manifest unreadable: {e}"))),
        };
        let manifest: SignatureManifest = serde_json::from_slice(&bytes)
            .map_err(|e| one(format!("referrer is not an image manifest: {e}")))?;
        let bundle_layers: Vec<&Layer> = manifest
            .layers
            .iter()
            .filter(|l| l.media_type.starts_with(BUNDLE_MEDIA_TYPE_PREFIX))
            .collect();
        let [layer] = bundle_layers[..] else {
            if bundle_layers.is_empty() {
                return Ok(None);
            }
            return Err(one(format!(
                "{} bundle layers; a signature referrer has one",
                bundle_layers.len()
            )));
        };
        // The referrers list says this manifest refers to the image; its own subject must
        // agree (the statement's subject is checked again below, and that one is signed).
        let subject = manifest.subject.as_ref().map(|s| s.digest.as_str());
        if subject != Some(image.digest()) {
            return Err(one(format!(
                "the referrer's subject is {}, not this image",
                subject.unwrap_or("missing")
            )));
        }
        let blob = self
            .small_blob(src, image, &layer.digest, layer.size)
            .await
            .map_err(|e| one(format!("bundle unreadable: {e}")))?;
        let bundle = Bundle::parse(&blob).map_err(|e| one(e.to_string()))?;
        let claim = bundle.check_statement(image.digest());
        let pae = bundle.pae();
        let entries = bundle.log_entries();
        decide(policy, claim.map_err(|e| e.to_string()), |kind| {
            match kind {
                AuthorityKind::Key(key) => {
                    // Any of the envelope's signatures will do.
                    let mut last = String::from("no signature");
                    let mut ok = false;
                    for sig in &bundle.signatures {
                        match key.verify(&pae, sig) {
                            Ok(()) => {
                                ok = true;
                                break;
                            }
                            Err(e) => last = e,
                        }
                    }
                    if ok { Ok(()) } else { Err(last) }
                }
                AuthorityKind::Keyless(id) => match (&bundle.material, &entries) {
                    (Material::PublicKey, _) => {
                        Err(keyless::KeylessError::NoCertificate.to_string())
                    }
                    (_, Err(e)) => Err(e.to_string()),
                    (Material::Certificate { cert_der, .. }, Ok(entries)) => {
                        if entries.is_empty() {
                            Err(keyless::KeylessError::NoBundle.to_string())
                        } else {
                            let mut last = String::new();
                            let mut ok = false;
                            'outer: for sig in &bundle.signatures {
                                for entry in entries {
                                    let s = Signed::Dsse {
                                        payload: &bundle.payload,
                                        pae: &pae,
                                    };
                                    match id.verify(s, sig, cert_der, entry) {
                                        Ok(()) => {
                                            ok = true;
                                            break 'outer;
                                        }
                                        Err(e) => last = e.to_string(),
                                    }
                                }
                            }
                            if ok { Ok(()) } else { Err(last) }
                        }
                    }
                },
            }
        })
        .map(|authority| {
            let cert = match &bundle.material {
                Material::Certificate { cert_der, .. } => Some(cert_der.clone()),
                Material::PublicKey => None,
            };
            Some((authority, cert))
        })
    }

    async fn small_blob(
        &self,
        src: &dyn ImageSource,
        image: &PinnedRef,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>, String> {
        if crate::oci::sha256_hex(digest).is_none() {
            return Err(format!("blob digest {digest:?} is not sha256"));
        }
        src.fetch_blob_bytes(image, digest, size, MAX_BLOB_BYTES)
            .await
            .map_err(|e: PullError| e.to_string())
    }
}

/// One tag-format layer whose payload is at hand (`sig` is its decoded signature): Ok with
/// the authority it verifies under, or the reasons why not.
fn tag_layer(
    policy: &TrustPolicy,
    image: &PinnedRef,
    layer: &Layer,
    sig: &[u8],
    payload: &[u8],
) -> Result<String, Vec<String>> {
    let claim = tag::check_payload(payload, image.digest());
    let cert = layer
        .annotations
        .get(CERTIFICATE_ANNOTATION)
        .filter(|c| !c.is_empty());
    let rekor = layer
        .annotations
        .get(BUNDLE_ANNOTATION)
        .filter(|b| !b.is_empty());
    decide(
        policy,
        claim.map_err(|e| e.to_string()),
        |kind| match kind {
            AuthorityKind::Key(key) => key.verify(payload, sig),
            AuthorityKind::Keyless(id) => (|| {
                let cert = cert.ok_or(keyless::KeylessError::NoCertificate)?;
                let cert_der = keyless::cert_from_pem(cert)?;
                let entry =
                    LogEntry::from_annotation(rekor.ok_or(keyless::KeylessError::NoBundle)?)?;
                id.verify(Signed::Payload(payload), sig, &cert_der, &entry)
            })()
            .map_err(|e| e.to_string()),
        },
    )
}

/// Tries one signature under each authority (`verify`): Ok with the first that accepts it
/// when its `claim` (about the image) holds, else why not, signature by signature.
fn decide(
    policy: &TrustPolicy,
    claim: Result<(), String>,
    verify: impl Fn(&AuthorityKind) -> Result<(), String>,
) -> Result<String, Vec<String>> {
    let mut reasons = Vec::new();
    let mut verified_by = None;
    for authority in &policy.authorities {
        match verify(&authority.kind) {
            Ok(()) if claim.is_ok() => return Ok(authority.name.clone()),
            Ok(()) => verified_by = Some(authority.name.clone()),
            Err(e) => reasons.push(format!("authority {:?}: {e}", authority.name)),
        }
    }
    Err(rejection(claim.err(), verified_by, reasons))
}

/// The cache key of a verification: the digest, and the scope whose attestations it
/// checked (an incoming verification is never cached).
fn cache_key(digest: &str, scope: Option<Scope>) -> String {
    match scope {
        Some(s) => format!("{s}:{digest}"),
        None => format!("incoming:{digest}"),
    }
}

/// The first dozen reasons and a count of the rest: junk must not make a denial of
/// thousands of lines.
fn shorten(mut reasons: Vec<String>) -> Vec<String> {
    const SHOWN: usize = 12;
    if reasons.len() > SHOWN {
        let more = reasons.len() - SHOWN;
        reasons.truncate(SHOWN);
        reasons.push(format!("and {more} more"));
    }
    reasons
}

/// What one format may still spend on an image's signatures (see
/// [`MAX_SIGNATURE_FETCHES`] and [`MAX_SIGNATURE_CHECKS`]).
#[derive(Default)]
struct Budget {
    fetches: usize,
    checks: usize,
}

impl Budget {
    /// Takes `fetches` fetches and `checks` checks, all or nothing; false when that would
    /// pass a bound.
    fn spend(&mut self, fetches: usize, checks: usize) -> bool {
        if self.fetches + fetches > MAX_SIGNATURE_FETCHES
            || self.checks + checks > MAX_SIGNATURE_CHECKS
        {
            return false;
        }
        self.fetches += fetches;
        self.checks += checks;
        true
    }
}

/// The checks of a tag-format layer that need neither the registry nor cryptography; Ok
/// with its decoded signature, else why not (per authority, once the layer itself is
/// well-formed).
fn precheck_layer(policy: &TrustPolicy, layer: &Layer) -> Result<Vec<u8>, Vec<String>> {
    let one = |e: String| vec![e];
    if layer.media_type != tag::SIMPLE_SIGNING_MEDIA_TYPE {
        return Err(one(format!(
            "media type {:?} is not a cosign simple-signing payload",
            layer.media_type
        )));
    }
    if crate::oci::sha256_hex(&layer.digest).is_none() {
        return Err(one(format!(
            "payload digest {:?} is not sha256",
            layer.digest
        )));
    }
    if layer.size > MAX_BLOB_BYTES {
        return Err(one(format!(
            "payload of {} bytes, more than {MAX_BLOB_BYTES}",
            layer.size
        )));
    }
    let Some(sig_b64) = layer.annotations.get(SIGNATURE_ANNOTATION) else {
        return Err(one(format!("no {SIGNATURE_ANNOTATION} annotation")));
    };
    let sig = decode_b64(sig_b64).map_err(|_| one("the signature is not base64".into()))?;
    // A signature no authority could accept is set aside before any fetch or check: a key
    // checks only signatures of its own form, an identity only what comes with a
    // certificate.
    let has_cert = layer
        .annotations
        .get(CERTIFICATE_ANNOTATION)
        .is_some_and(|c| !c.is_empty());
    let mut reasons = Vec::new();
    for authority in &policy.authorities {
        let why = match &authority.kind {
            AuthorityKind::Key(key) => key.check_form(&sig).err(),
            AuthorityKind::Keyless(_) if has_cert => None,
            AuthorityKind::Keyless(_) => Some(keyless::KeylessError::NoCertificate.to_string()),
        };
        match why {
            None => return Ok(sig),
            Some(e) => reasons.push(format!("authority {:?}: {e}", authority.name)),
        }
    }
    Err(reasons)
}

/// The order in which a `.sig` tag's layers are examined, so that the bounds fall on junk
/// rather than on a valid signature: first the layers whose payload is the one written for
/// this very image here (`expected`: what GKM's promoter and `gkm build` sign, and cosign
/// signing the image in this repository), known without a fetch; then keyless layers whose
/// certificate names an identity of the policy; then the rest; each group in manifest
/// order.
fn tag_order(policy: &TrustPolicy, layers: &[Layer], expected: &str) -> Vec<usize> {
    let names_authority = |pem: &String| {
        keyless::cert_from_pem(pem).is_ok_and(|der| {
            policy
                .authorities
                .iter()
                .any(|a| matches!(&a.kind, AuthorityKind::Keyless(id) if id.names(&der)))
        })
    };
    let rank = |l: &Layer| {
        if l.digest == expected {
            0
        } else if l
            .annotations
            .get(CERTIFICATE_ANNOTATION)
            .is_some_and(names_authority)
        {
            1
        } else {
            2
        }
    };
    let mut order: Vec<usize> = (0..layers.len()).collect();
    // Stable: manifest order within a rank.
    order.sort_by_cached_key(|&i| rank(&layers[i]));
    order
}

/// The annotation cosign puts on a bundle referrer (copied into referrer lists) naming the
/// statement's predicate type.
const PREDICATE_TYPE_ANNOTATION: &str = "dev.sigstore.bundle.predicateType";

/// The order in which bundle referrers are examined: first those annotated as cosign
/// signatures, then those without the annotation (cosign's own fallback tag drops it), then
/// those annotated as something else (an attestation's bundle has the same media type, but
/// can never verify as a signature); each group in list order.
fn bundle_order(entries: &[&oci_client::manifest::ImageIndexEntry]) -> Vec<usize> {
    let rank = |e: &oci_client::manifest::ImageIndexEntry| match e
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREDICATE_TYPE_ANNOTATION))
    {
        Some(t) if t == COSIGN_PREDICATE_TYPE => 0,
        None => 1,
        Some(_) => 2,
    };
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| rank(entries[i]));
    order
}

/// One entry for the signatures the bounds left unexamined: `what` opens a parenthesis that
/// their (0-based) positions close. A denial says they exist without listing thousands.
fn not_examined(what: &str, skipped: &[usize], total: usize) -> Rejected {
    const SHOWN: usize = 8;
    let mut shown: Vec<String> = skipped.iter().take(SHOWN).map(usize::to_string).collect();
    if skipped.len() > SHOWN {
        shown.push("…".into());
    }
    Rejected {
        signature: format!("{} of {total} {what} {})", skipped.len(), shown.join(", ")),
        reasons: vec![format!(
            "{NOT_EXAMINED}: one verification checks at most {MAX_SIGNATURE_CHECKS} signatures and makes at most {MAX_SIGNATURE_FETCHES} fetches per format, the signatures GKM can tell apart without them first"
        )],
    }
}

/// What one format turned up.
#[derive(Default)]
struct Found {
    verified: Option<Verified>,
    rejected: Vec<Rejected>,
    problems: Vec<String>,
}

fn decode_b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim())
}

/// A `.sig` manifest or a referrer manifest, as far as verification reads it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureManifest {
    #[serde(default)]
    layers: Vec<Layer>,
    #[serde(default)]
    subject: Option<Layer>,
}

/// A manifest's layer (or subject) descriptor, as much of it as verification reads.
#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Layer {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// Why a signature was rejected: a wrong claim (the payload or statement names another
/// image) outranks the per-authority reasons, noting when the signature itself verified.
fn rejection(
    claim_error: Option<String>,
    verified_by: Option<String>,
    reasons: Vec<String>,
) -> Vec<String> {
    let Some(e) = claim_error else {
        return reasons;
    };
    let mut out = vec![e];
    if let Some(name) = verified_by {
        out.push(format!(
            "(its signature does verify under authority {name:?}, but it signs another claim)"
        ));
    }
    out
}

/// The verifier's decisions over an in-memory registry: what is admitted, what is refused
/// and why, and which registry calls it takes to decide. Real cosign output against a real
/// registry is tested in tests/trust.rs and controller/tests/webhook.rs.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Fault, InMemoryRegistry};
    use crate::trust::sign::{SigningKey, tag_signature};
    use std::path::Path;

    const REPO: &str = "reg.io/team/cache";

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn image(n: u8) -> PinnedRef {
        PinnedRef::parse(&format!("{REPO}@{}", digest(n))).unwrap()
    }

    /// A policy trusting `reg.io/team` and the key of `seed`.
    fn policy(seed: u8) -> TrustPolicy {
        let pem: String = SigningKey::for_tests(seed)
            .public_key_pem()
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect();
        let yaml = format!(
            "authorities:\n  - name: k\n    key: |\n{pem}trustedRegistries: [reg.io/team]\n"
        );
        TrustPolicy::from_yaml(&yaml, Path::new("/")).unwrap()
    }

    /// Pushes a `.sig` tag for `image` whose one layer is `key`'s signature of `claimed`.
    fn sign(registry: &InMemoryRegistry, image: &PinnedRef, key: &SigningKey, claimed: &str) {
        let sig = tag_signature(key, REPO, claimed, None).unwrap();
        registry.put_blob(REPO, &sig.payload);
        registry.put_blob(REPO, &sig.config);
        registry.put_manifest(
            REPO,
            Some(&tag::signature_tag(image.digest())),
            &sig.manifest,
        );
    }

    fn verifier(seed: u8) -> (Verifier, Arc<InMemoryRegistry>) {
        let registry = Arc::new(InMemoryRegistry::new());
        (
            Verifier::with_source(policy(seed), registry.clone()),
            registry,
        )
    }

    #[tokio::test]
    async fn a_signature_under_the_policys_key_is_admitted_and_then_served_from_the_cache() {
        let (v, registry) = verifier(1);
        sign(&registry, &image(9), &SigningKey::for_tests(1), &digest(9));
        let ok = v.verify(&image(9)).await.unwrap();
        assert_eq!(
            (ok.authority.as_str(), ok.format, ok.digest.as_str()),
            ("k", SignatureFormat::Tag, digest(9).as_str())
        );
        let calls = registry.calls().len();
        assert!(calls >= 2, "{:?}", registry.calls());
        v.verify(&image(9)).await.unwrap();
        assert_eq!(registry.calls().len(), calls, "the second answer is cached");
        // A new policy forgets what the old one admitted.
        v.set_policy(policy(1));
        v.verify(&image(9)).await.unwrap();
        assert!(registry.calls().len() > calls);
    }

    #[tokio::test]
    async fn another_keys_signature_is_refused_and_the_denial_says_so() {
        let (v, registry) = verifier(1);
        sign(&registry, &image(9), &SigningKey::for_tests(2), &digest(9));
        let e = v.verify(&image(9)).await.unwrap_err();
        assert!(matches!(e, VerifyError::NotVerified { .. }), "{e}");
        assert_eq!(e.label(), "not_verified");
        let msg = e.to_string();
        assert!(msg.contains(REPO) && msg.contains("\"k\""), "{msg}");
    }

    #[tokio::test]
    async fn a_valid_signature_copied_from_another_digest_is_refused() {
        let (v, registry) = verifier(1);
        // The policy's key really signed digest 8; the layer is put under digest 9's tag.
        sign(&registry, &image(9), &SigningKey::for_tests(1), &digest(8));
        let e = v.verify(&image(9)).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, VerifyError::NotVerified { .. }), "{msg}");
        assert!(
            msg.contains(&digest(8)) || msg.contains("another claim"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn an_unsigned_image_has_no_signatures() {
        let (v, registry) = verifier(1);
        let e = v.verify(&image(9)).await.unwrap_err();
        assert!(matches!(e, VerifyError::NoSignatures { .. }), "{e}");
        // Both formats were looked for: the .sig tag and the referrers.
        let calls = registry.calls();
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("manifest ") && c.ends_with(".sig"))
        );
        assert!(calls.iter().any(|c| c.starts_with("referrers ")));
    }

    #[tokio::test]
    async fn an_untrusted_repository_is_refused_before_any_registry_call() {
        let (v, registry) = verifier(1);
        let elsewhere = PinnedRef::parse(&format!("other.io/team/cache@{}", digest(9))).unwrap();
        let e = v.verify(&elsewhere).await.unwrap_err();
        assert!(matches!(e, VerifyError::UntrustedRegistry(_)), "{e}");
        assert!(registry.calls().is_empty(), "{:?}", registry.calls());
    }

    #[tokio::test]
    async fn a_registry_that_refuses_fails_closed_naming_the_status() {
        let (v, registry) = verifier(1);
        sign(&registry, &image(9), &SigningKey::for_tests(1), &digest(9));
        registry.set_fault(Some(Fault::Unauthorized));
        let e = v.verify(&image(9)).await.unwrap_err();
        assert!(matches!(e, VerifyError::Registry { .. }), "{e}");
        assert!(e.to_string().contains("401 Unauthorized"), "{e}");
        // Once the registry answers again, the same image is admitted.
        registry.set_fault(None);
        v.verify(&image(9)).await.unwrap();
    }

    #[tokio::test]
    async fn many_bad_signatures_cost_a_bounded_number_of_fetches() {
        let (v, registry) = verifier(1);
        // 400 layers, each another key's signature over its own payload.
        let wrong = SigningKey::for_tests(2);
        let mut manifest: Option<Vec<u8>> = None;
        for i in 0..400u32 {
            let sig = tag_signature(
                &wrong,
                &format!("{REPO}/n{i}"),
                &digest(9),
                manifest.as_deref(),
            )
            .unwrap();
            registry.put_blob(REPO, &sig.payload);
            manifest = Some(sig.manifest);
        }
        registry.put_manifest(
            REPO,
            Some(&tag::signature_tag(&digest(9))),
            manifest.as_deref().unwrap(),
        );
        let e = v.verify(&image(9)).await.unwrap_err();
        let blobs = registry
            .calls()
            .iter()
            .filter(|c| c.starts_with("blob "))
            .count();
        assert!(blobs <= MAX_SIGNATURE_FETCHES, "{blobs} blob fetches");
        assert!(blobs > 0);
        assert!(e.to_string().contains(NOT_EXAMINED), "{e}");
    }
}
