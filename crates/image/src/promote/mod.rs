//! Promotion from the incoming registry to the trusted one (the trust policy's
//! `promotion`): verify `image@digest` under the policy's authorities, then copy it by
//! digest, with its signature artifacts, into the trusted repository, and optionally sign
//! the promoted digest with the promoter's own key.
//!
//! Owns the order of the copy, which is what makes it safe to retry and to crash in:
//! blobs, then the manifest by digest, then the signature artifacts (cosign's `.sig` and
//! `.att` tags, merged with any already there; OCI 1.1 referrers such as Sigstore bundles,
//! listed in the referrers tag `sha256-<hex>` where the trusted registry has no referrers
//! API), then the promoter's signature, and the tag last. Nothing is written before the
//! signature verifies. Everything already present is skipped, so promoting twice is a
//! no-op. The controller's `POST /api/images/verify-and-promote` and `gkm promote` both
//! call [`Promoter::promote`].
//!
//! Also owns what a bounded verifier finds there: the signature that verified is put
//! first among those copied, the promoter's first of all, and `signed` is reported only
//! once a verifier trusting the promoter's key alone accepts the copy. And which tags it
//! sets: never one reserved for artifacts ([`crate::trust::tag::reserved_tag`]), never
//! over a tag that already names an artifact.

pub mod client;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span};

use crate::oci::image::{OCI_INDEX, OCI_MANIFEST};
use crate::oci::{PinnedRef, PullError, PushError, Pusher, Reference};
use crate::trust::attest::{
    self, Caller, PolicyRecord, VERIFICATION_PREDICATE_TYPE, VerificationPredicate,
    VerificationRecord,
};
use crate::trust::sign::{self, SigningKey};
use crate::trust::{
    Authority, AuthorityKind, Evidence, MAX_MANIFEST_BYTES, PublicKey, RegistryPrefix,
    RequiredAttestation, Scope, Signer, TrustPolicy, VerificationSettings, Verifier,
};

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("promotion is not configured: the trust policy has no `promotion` section")]
    NotConfigured,
    /// The request itself is wrong (unparsable, outside the incoming registry, …).
    #[error("{0}")]
    BadRequest(String),
    #[error("{image} was not promoted: {reason}")]
    NotVerified { image: String, reason: String },
    #[error("reading {image}: {source}")]
    Read {
        image: String,
        #[source]
        source: Box<PullError>,
    },
    #[error(transparent)]
    Write(#[from] PushError),
    #[error("{image}: {reason}")]
    Artifact { image: String, reason: String },
    #[error("promotion.signKey {path}: {reason}")]
    SignKey { path: String, reason: String },
    /// The request's tag has the form of an artifact's tag (signature, attestation, SBOM,
    /// referrers fallback index): setting it would replace another digest's artifacts.
    #[error(
        "tag {tag:?} is reserved for artifacts: {reason}; promote under another tag, or by digest alone"
    )]
    ReservedTag { tag: String, reason: String },
    /// The request's tag already names an artifact in the trusted repository.
    #[error("{image} names {what}; GKM does not set a tag over an artifact")]
    TagNamesArtifact { image: String, what: String },
}

impl PromoteError {
    /// Whether the caller's request is at fault (so retrying it unchanged cannot help).
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            PromoteError::BadRequest(_)
                | PromoteError::NotVerified { .. }
                | PromoteError::ReservedTag { .. }
                | PromoteError::TagNamesArtifact { .. }
        )
    }

    /// A short, stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            PromoteError::NotConfigured => "not_configured",
            PromoteError::BadRequest(_) => "bad_request",
            PromoteError::NotVerified { .. } => "not_verified",
            PromoteError::Read { .. } => "registry_read",
            PromoteError::Write(_) => "registry_write",
            PromoteError::Artifact { .. } => "bad_artifact",
            PromoteError::SignKey { .. } => "sign_key",
            PromoteError::ReservedTag { .. } => "reserved_tag",
            PromoteError::TagNamesArtifact { .. } => "tag_names_artifact",
        }
    }
}

/// `t` as RFC 3339 in UTC, to the second (`2026-12-01T02:03:04Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// What a promotion did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Promoted {
    /// `<trusted repository>@<digest>`.
    pub promoted: String,
    pub digest: String,
    /// `<incoming repository>@<digest>`.
    pub source: String,
    /// The tag also set in the trusted repository (the request's tag), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The authority the incoming signature verified under.
    pub authority: String,
    /// Blobs sent (those already in the trusted repository are not counted).
    pub blobs_copied: usize,
    /// Signature artifacts written: tags and referrer digests.
    pub signatures: Vec<String>,
    /// Whether the promoter's key signed the promoted digest.
    pub signed: bool,
    /// The promoter's verification attestation (`<trusted repository>:sha256-<hex>.att`),
    /// when it has a key; it was written by this call or an earlier promotion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
}

/// Verifies and copies images from the incoming to the trusted registry.
pub struct Promoter {
    trust: Arc<Verifier>,
    pusher: Pusher,
}

impl Promoter {
    pub fn new(trust: Arc<Verifier>, pusher: Pusher) -> Self {
        Self { trust, pusher }
    }

    /// Promotes `image` (incoming repository, by tag or digest) at `digest` (required when
    /// `image` has no digest and resolving its tag is not wanted; must agree with it when
    /// both are given). The tag resolution, when needed, happens once, before verification.
    /// `caller` is who asked, as the API server vouched for them; it goes into the
    /// verification attestation.
    pub async fn promote(
        &self,
        image: &str,
        digest: Option<&str>,
        caller: Option<&Caller>,
    ) -> Result<Promoted, PromoteError> {
        let span = info_span!("promote", image = %image, digest = digest.unwrap_or(""));
        self.promote_inner(image, digest, caller)
            .instrument(span)
            .await
    }

    async fn promote_inner(
        &self,
        image: &str,
        digest: Option<&str>,
        caller: Option<&Caller>,
    ) -> Result<Promoted, PromoteError> {
        let policy = self.trust.policy();
        let promotion = policy
            .promotion
            .as_ref()
            .ok_or(PromoteError::NotConfigured)?;
        let reference = crate::oci::parse_reference(image)
            .map_err(|e| PromoteError::BadRequest(e.to_string()))?;
        // The tag set last, if the request names one (a digest in the image wins).
        let tag = reference.tag().filter(|_| reference.digest().is_none());
        if let Some(tag) = tag
            && let Some(reason) = crate::trust::tag::reserved_tag(tag)
        {
            return Err(PromoteError::ReservedTag {
                tag: tag.to_string(),
                reason,
            });
        }
        if let Some(d) = digest
            && crate::oci::sha256_hex(d).is_none()
        {
            return Err(PromoteError::BadRequest(format!(
                "digest {d:?} is not sha256:<64 lowercase hex>"
            )));
        }
        let digest = match (reference.digest(), digest) {
            (Some(a), Some(b)) if a != b => {
                return Err(PromoteError::BadRequest(format!(
                    "{image} names digest {a}, but the request asks for {b}"
                )));
            }
            (Some(a), _) => a.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) => self
                .pusher
                .puller()
                .resolve_tag(&reference)
                .await
                .map_err(|source| PromoteError::Read {
                    image: image.to_string(),
                    source: Box::new(source),
                })?
                .digest()
                .to_string(),
        };
        let (registry, repository) = promotion
            .incoming
            .rebase(&reference, &promotion.trusted)
            .ok_or_else(|| {
                PromoteError::BadRequest(format!(
                    "{image} is not in the incoming registry {} (promotion.incoming)",
                    promotion.incoming
                ))
            })?;
        let source = PinnedRef::new(&reference, &digest)
            .map_err(|e| PromoteError::BadRequest(e.to_string()))?;
        let target_repo = Reference::with_tag(registry, repository, "latest".into());
        let target = PinnedRef::new(&target_repo, &digest)
            .map_err(|e| PromoteError::BadRequest(e.to_string()))?;
        if let Some(tag) = tag {
            self.refuse_artifact_tag(&with_tag(&target, tag)).await?;
        }

        // Nothing is written before this.
        let verified =
            self.trust
                .verify_incoming(&source)
                .await
                .map_err(|e| PromoteError::NotVerified {
                    image: source.to_string(),
                    reason: e.to_string(),
                })?;
        info!(source = %source, target = %target, authority = %verified.authority, "verified; copying");
        // The promoter's key is read before anything is copied, so a bad key copies nothing.
        let key = match &promotion.sign_key {
            Some(path) => Some(
                SigningKey::from_file(path, &sign::password_from_env()).map_err(|e| {
                    PromoteError::SignKey {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    }
                })?,
            ),
            None => None,
        };

        let mut blobs_copied = self.copy_manifest(&source, &target, &digest).await?.blobs;
        let mut signatures = Vec::new();
        for suffix in [".sig", ".att"] {
            let sig_tag = format!("sha256-{}{suffix}", source.hex());
            if self
                .copy_signature_tag(&source, &target, &sig_tag, &verified.evidence)
                .await?
            {
                signatures.push(sig_tag);
            }
        }
        let (n, referrers) = self
            .copy_referrers(&source, &target, &verified.evidence)
            .await?;
        blobs_copied += n;
        signatures.extend(referrers);

        let (signed, attestation) = match &key {
            Some(key) => {
                sign::push_signature(&self.pusher, &target, key).await?;
                let predicate = VerificationPredicate {
                    incoming: source.to_string(),
                    trusted: target.to_string(),
                    verification: VerificationRecord {
                        authority: verified.authority.clone(),
                        key_fingerprint: match &verified.signer {
                            Signer::Key { fingerprint } => Some(fingerprint.clone()),
                            Signer::Keyless { .. } => None,
                        },
                        issuer: match &verified.signer {
                            Signer::Keyless { issuer, .. } => Some(issuer.clone()),
                            Signer::Key { .. } => None,
                        },
                        subject: match &verified.signer {
                            Signer::Keyless { subject, .. } => Some(subject.clone()),
                            Signer::Key { .. } => None,
                        },
                        signature_format: verified.format.as_str().into(),
                    },
                    policy: PolicyRecord {
                        sha256: policy.sha256.clone(),
                        generation: self.trust.generation(),
                    },
                    verified_at: rfc3339(verified.verified_at),
                    caller: caller.cloned(),
                };
                let statement = attest::statement(
                    &format!("{}/{}", target.registry(), target.repository()),
                    &digest,
                    VERIFICATION_PREDICATE_TYPE,
                    &serde_json::to_value(&predicate).expect("JSON into memory"),
                );
                let attached = attest::attach(
                    &self.pusher,
                    &target,
                    key,
                    VERIFICATION_PREDICATE_TYPE,
                    &statement,
                )
                .await?;
                info!(tag = %attached.tag, written = attached.written, "verification attestation");
                self.check_promoter_artifacts(&target, key).await?;
                (true, Some(attached.tag))
            }
            None => (false, None),
        };

        if let Some(tag) = tag {
            let (bytes, media_type) = self.manifest(&source).await?;
            self.pusher
                .push_manifest(&with_tag(&target, tag), bytes, &media_type, "the tag")
                .await?;
        }
        info!(target = %target, blobs_copied, signatures = signatures.len(), signed, "promoted");
        Ok(Promoted {
            promoted: target.to_string(),
            digest,
            source: source.to_string(),
            tag: tag.map(str::to_string),
            authority: verified.authority,
            blobs_copied,
            signatures,
            signed,
            attestation,
        })
    }

    /// Refuses a tag of the trusted repository that already names an artifact (a signature,
    /// attestation or referrer under an ordinary name): the request's tag never replaces one.
    async fn refuse_artifact_tag(&self, tagged: &Reference) -> Result<(), PromoteError> {
        let Some((bytes, _)) = self.fetch(tagged).await? else {
            return Ok(());
        };
        // A tag GKM cannot read as a manifest is left to the registry's own rules.
        let what = serde_json::from_slice::<ManifestShape>(&bytes)
            .ok()
            .and_then(|m| m.artifact());
        match what {
            Some(what) => Err(PromoteError::TagNamesArtifact {
                image: tagged.whole(),
                what,
            }),
            None => Ok(()),
        }
    }

    /// The exact bytes and media type of the manifest `image` names.
    async fn manifest(&self, image: &PinnedRef) -> Result<(Vec<u8>, String), PromoteError> {
        let (bytes, _) =
            self.fetch(image.as_reference())
                .await?
                .ok_or_else(|| PromoteError::Artifact {
                    image: image.to_string(),
                    reason: "the registry does not have this manifest".into(),
                })?;
        let media_type = ManifestShape::parse(&bytes, &image.to_string())?.media_type();
        Ok((bytes, media_type))
    }

    async fn fetch(&self, r: &Reference) -> Result<Option<(Vec<u8>, String)>, PromoteError> {
        self.pusher
            .puller()
            .fetch_manifest_bytes(r, MAX_MANIFEST_BYTES)
            .await
            .map_err(|source| PromoteError::Read {
                image: r.whole(),
                source: Box::new(source),
            })
    }

    /// Copies manifest `digest` of `from`'s repository, and everything it names (child
    /// manifests of an index, config and layers), to `to`'s repository. A manifest already
    /// there is taken as complete (a registry only accepts a manifest whose blobs it has).
    async fn copy_manifest(
        &self,
        from: &PinnedRef,
        to: &PinnedRef,
        digest: &str,
    ) -> Result<Copied, PromoteError> {
        let src = with_digest(from, digest);
        let dst = with_digest(to, digest);
        if self.fetch(&dst).await?.is_some() {
            return Ok(Copied::default());
        }
        let Some((bytes, _)) = self.fetch(&src).await? else {
            return Err(PromoteError::Artifact {
                image: src.whole(),
                reason: "the incoming registry does not have this manifest".into(),
            });
        };
        let parsed = ManifestShape::parse(&bytes, &src.whole())?;
        let mut blobs = 0;
        for child in &parsed.manifests {
            blobs += Box::pin(self.copy_manifest(from, to, &child.digest))
                .await?
                .blobs;
        }
        for blob in parsed.config.iter().chain(&parsed.layers) {
            if self
                .pusher
                .copy_blob(&src, &dst, &blob.digest, blob.size)
                .await?
            {
                blobs += 1;
            }
        }
        self.pusher
            .push_manifest(&dst, bytes, &parsed.media_type(), "the manifest")
            .await?;
        Ok(Copied {
            blobs,
            manifest: true,
        })
    }

    /// Copies cosign's `tag` (`sha256-<hex>.sig` or `.att`) of `from` to `to`, merging its
    /// layers into the manifest already there, led by the signature that verified (if it is
    /// a layer of this tag). Returns whether anything was written.
    async fn copy_signature_tag(
        &self,
        from: &PinnedRef,
        to: &PinnedRef,
        tag: &str,
        verified: &Evidence,
    ) -> Result<bool, PromoteError> {
        let src = with_tag(from, tag);
        let dst = with_tag(to, tag);
        let Some((src_bytes, _)) = self.fetch(&src).await? else {
            return Ok(false);
        };
        let bad = |reason: String| PromoteError::Artifact {
            image: src.whole(),
            reason,
        };
        for (digest, size) in sign::signature_blobs(&src_bytes).map_err(bad)? {
            self.pusher.copy_blob(&src, &dst, &digest, size).await?;
        }
        let lead = |d: &sign::SigDescriptor| match verified {
            Evidence::Layer { payload, signature } => {
                d.digest == *payload && d.signature() == Some(signature.as_str())
            }
            Evidence::Referrer { .. } => false,
        };
        let existing = self.fetch(&dst).await?;
        let Some(merged) = sign::merge_signature_manifests(
            existing.as_ref().map(|(b, _)| &b[..]),
            &src_bytes,
            lead,
        )
        .map_err(bad)?
        else {
            return Ok(false);
        };
        if let Some(config) = &merged.config {
            self.pusher
                .push_bytes(&dst, config, "the signature config")
                .await?;
        }
        let merged = merged.manifest;
        let media_type = ManifestShape::parse(&merged, &dst.whole())?.media_type();
        self.pusher
            .push_manifest(&dst, merged, &media_type, "the signature manifest")
            .await?;
        Ok(true)
    }

    /// Verifies the promoted digest under the promoter's key alone, with the bounded
    /// verifier admission uses, requiring the verification attestation too, so that
    /// `signed: true` and the attestation are reported only when a cluster trusting just
    /// that key finds them.
    async fn check_promoter_artifacts(
        &self,
        target: &PinnedRef,
        key: &SigningKey,
    ) -> Result<(), PromoteError> {
        let policy = self.trust.policy();
        let public =
            PublicKey::from_pem(&key.public_key_pem()).map_err(|e| PromoteError::Artifact {
                image: target.to_string(),
                reason: format!("the promoter's public key: {e}"),
            })?;
        let promoter_only = TrustPolicy {
            required_attestations: vec![RequiredAttestation {
                predicate_type: VERIFICATION_PREDICATE_TYPE.into(),
                authority: "promotion.signKey".into(),
                key: public.clone(),
                applies_to: vec![Scope::Caches],
                conditions: Vec::new(),
            }],
            sha256: String::new(),
            pull_secret_namespace: None,
            authorities: vec![Authority {
                name: "promotion.signKey".into(),
                kind: AuthorityKind::Key(public),
            }],
            trusted_registries: vec![
                RegistryPrefix::parse(&format!("{}/{}", target.registry(), target.repository()))
                    .map_err(PromoteError::BadRequest)?,
            ],
            verification: VerificationSettings {
                cache_ttl: Duration::ZERO,
                ..policy.verification
            },
            pod_policy: Default::default(),
            promotion: None,
        };
        Verifier::new(promoter_only, self.pusher.puller().clone())
            .verify(target)
            .await
            .map(|_| ())
            .map_err(|e| PromoteError::Artifact {
                image: target.to_string(),
                reason: format!(
                    "the promoter's signature and attestation were written, but a verifier trusting only promotion.signKey does not accept them: {e}"
                ),
            })
    }

    /// Copies every OCI 1.1 referrer of `from` (Sigstore bundles and the like) to `to`,
    /// and makes each discoverable there: through the registry's referrers API when it has
    /// one, else in the referrers tag `sha256-<hex>`, led by the referrer that verified.
    /// Returns blobs sent and the referrer digests written.
    async fn copy_referrers(
        &self,
        from: &PinnedRef,
        to: &PinnedRef,
        verified: &Evidence,
    ) -> Result<(usize, Vec<String>), PromoteError> {
        let puller = self.pusher.puller();
        let listed = puller
            .list_referrers(from)
            .await
            .map_err(|source| PromoteError::Read {
                image: from.to_string(),
                source: Box::new(source),
            })?;
        if listed.manifests.is_empty() {
            return Ok((0, Vec::new()));
        }
        let (mut blobs, mut written) = (0, Vec::new());
        for desc in &listed.manifests {
            let copied = self.copy_manifest(from, to, &desc.digest).await?;
            blobs += copied.blobs;
            if copied.manifest {
                written.push(desc.digest.clone());
            }
        }
        let mut present = puller
            .list_referrers(to)
            .await
            .map_err(|source| PromoteError::Read {
                image: to.to_string(),
                source: Box::new(source),
            })?;
        let missing: Vec<_> = listed
            .manifests
            .iter()
            .filter(|d| !present.manifests.iter().any(|p| p.digest == d.digest))
            .cloned()
            .collect();
        if !missing.is_empty() {
            // No referrers API: keep the referrers tag schema's index up to date, the
            // verified referrer first, where a bounded verifier looks first.
            present.manifests.extend(missing);
            if let Evidence::Referrer { digest } = verified
                && let Some(at) = present.manifests.iter().position(|d| d.digest == *digest)
            {
                let first = present.manifests.remove(at);
                present.manifests.insert(0, first);
            }
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": present.manifests,
            });
            let bytes = serde_json::to_vec(&index).expect("JSON into memory");
            let tag = with_tag(to, &format!("sha256-{}", to.hex()));
            self.pusher
                .push_manifest(&tag, bytes, OCI_INDEX, "the referrers tag")
                .await?;
        }
        Ok((blobs, written))
    }
}

/// What one [`Promoter::copy_manifest`] sent.
#[derive(Default)]
struct Copied {
    blobs: usize,
    /// Whether the manifest itself was written (it was not there yet).
    manifest: bool,
}

/// The fields of a manifest or index that name what it needs.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestShape {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    subject: Option<Blob>,
    #[serde(default)]
    config: Option<Blob>,
    #[serde(default)]
    layers: Vec<Blob>,
    #[serde(default)]
    manifests: Vec<Blob>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Blob {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
}

/// Whether a layer of this media type makes its manifest a signature or attestation.
fn artifact_layer(media_type: &str) -> bool {
    media_type == crate::trust::tag::SIMPLE_SIGNING_MEDIA_TYPE
        || media_type == "application/vnd.dsse.envelope.v1+json"
        || media_type == crate::trust::bundle::IN_TOTO_PAYLOAD_TYPE
        || media_type.starts_with(crate::trust::bundle::BUNDLE_MEDIA_TYPE_PREFIX)
}

impl ManifestShape {
    fn parse(bytes: &[u8], image: &str) -> Result<Self, PromoteError> {
        serde_json::from_slice(bytes).map_err(|e| PromoteError::Artifact {
            image: image.to_string(),
            reason: format!("not an OCI manifest or index: {e}"),
        })
    }

    /// What artifact this is, in words, or `None` for an image or an index of images: a
    /// referrer (it has a subject), an artifact manifest, a manifest of signature or
    /// attestation layers (cosign's `.sig` and `.att`), or an index of referrers.
    fn artifact(&self) -> Option<String> {
        if let Some(subject) = &self.subject {
            return Some(format!("a referrer of {}", subject.digest));
        }
        if let Some(t) = &self.artifact_type {
            return Some(format!("an artifact of type {t}"));
        }
        if let Some(t) = self
            .layers
            .iter()
            .filter_map(|l| l.media_type.as_deref())
            .find(|t| artifact_layer(t))
        {
            return Some(format!("a signature or attestation manifest ({t} layers)"));
        }
        if self.manifests.iter().any(|m| m.artifact_type.is_some()) {
            return Some("an index of referrers".into());
        }
        None
    }

    /// Its `mediaType`, or what its shape says when it names none.
    fn media_type(&self) -> String {
        match &self.media_type {
            Some(m) => m.clone(),
            None if self.manifests.is_empty() => OCI_MANIFEST.into(),
            None => OCI_INDEX.into(),
        }
    }
}

fn with_digest(repo: &PinnedRef, digest: &str) -> Reference {
    Reference::with_digest(
        repo.registry().to_string(),
        repo.repository().to_string(),
        digest.to_string(),
    )
}

fn with_tag(repo: &PinnedRef, tag: &str) -> Reference {
    Reference::with_tag(
        repo.registry().to_string(),
        repo.repository().to_string(),
        tag.to_string(),
    )
}

/// The promoter's decisions before anything is written, over an in-memory incoming
/// registry: every refusal names its reason, and nothing reaches the trusted registry
/// (here an address where nothing listens, so a write would fail differently). Copies
/// between real registries are tested in tests/promote.rs.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Credentials, InMemoryRegistry};
    use crate::trust::TrustPolicy;
    use crate::trust::sign::tag_signature;
    use std::path::Path;

    // Nothing listens on either address: the verifier reads the incoming registry through
    // the in-memory one, and any other call fails at once.
    const INCOMING: &str = "127.0.0.1:2/dev/cache";

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn policy(promotion: bool) -> TrustPolicy {
        let pem: String = SigningKey::for_tests(1)
            .public_key_pem()
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect();
        let promotion = if promotion {
            "promotion: {incoming: 127.0.0.1:2/dev, trusted: 127.0.0.1:1/team}\n"
        } else {
            ""
        };
        let yaml = format!(
            "authorities:\n  - name: k\n    key: |\n{pem}trustedRegistries: [127.0.0.1:1/team]\n{promotion}"
        );
        TrustPolicy::from_yaml(&yaml, Path::new("/")).unwrap()
    }

    fn promoter(promotion: bool) -> (Promoter, Arc<InMemoryRegistry>) {
        let incoming = Arc::new(InMemoryRegistry::new());
        let trust = Arc::new(Verifier::with_source(policy(promotion), incoming.clone()));
        let pusher = Pusher::new(
            vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            Credentials::anonymous(),
        );
        (Promoter::new(trust, pusher), incoming)
    }

    async fn refusal(p: &Promoter, image: &str, digest: Option<&str>) -> PromoteError {
        p.promote(image, digest, None).await.unwrap_err()
    }

    #[tokio::test]
    async fn without_a_promotion_section_nothing_is_promoted() {
        let (p, incoming) = promoter(false);
        let e = refusal(&p, &format!("{INCOMING}@{}", digest(9)), None).await;
        assert!(matches!(e, PromoteError::NotConfigured), "{e}");
        assert!(incoming.calls().is_empty());
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_any_registry_call() {
        let (p, incoming) = promoter(true);
        let d = digest(9);
        for (image, asked, expect) in [
            (
                format!("other.io/dev/cache@{d}"),
                None,
                "promotion.incoming",
            ),
            (
                format!("{INCOMING}@{d}"),
                Some(digest(8)),
                "but the request asks for",
            ),
            (
                format!("{INCOMING}:v1"),
                Some("sha256:short".to_string()),
                "is not sha256",
            ),
            ("not a reference".to_string(), None, ""),
        ] {
            let e = refusal(&p, &image, asked.as_deref()).await;
            assert!(matches!(e, PromoteError::BadRequest(_)), "{image}: {e}");
            assert!(e.to_string().contains(expect), "{image}: {e}");
            assert!(e.is_caller_error());
        }
        let e = refusal(
            &p,
            &format!("{INCOMING}:sha256-{}.sig", "a".repeat(64)),
            Some(&d),
        )
        .await;
        assert!(matches!(e, PromoteError::ReservedTag { .. }), "{e}");
        assert!(incoming.calls().is_empty(), "{:?}", incoming.calls());
    }

    #[tokio::test]
    async fn an_unverified_image_is_refused_and_nothing_is_written() {
        let (p, incoming) = promoter(true);
        // Signed, but by a key the policy does not name.
        let sig = tag_signature(&SigningKey::for_tests(2), INCOMING, &digest(9), None).unwrap();
        incoming.put_blob(INCOMING, &sig.payload);
        incoming.put_manifest(
            INCOMING,
            Some(&crate::trust::tag::signature_tag(&digest(9))),
            &sig.manifest,
        );
        let e = refusal(&p, &format!("{INCOMING}@{}", digest(9)), None).await;
        assert!(matches!(e, PromoteError::NotVerified { .. }), "{e}");
        assert_eq!(e.label(), "not_verified");
        assert!(e.to_string().contains("was not promoted"), "{e}");
        // Only reads of the incoming image's signatures happened.
        assert!(
            incoming.calls().iter().all(|c| c.contains(INCOMING)),
            "{:?}",
            incoming.calls()
        );
    }

    #[tokio::test]
    async fn a_verified_image_goes_on_to_the_copy() {
        let (p, incoming) = promoter(true);
        let sig = tag_signature(&SigningKey::for_tests(1), INCOMING, &digest(9), None).unwrap();
        incoming.put_blob(INCOMING, &sig.payload);
        incoming.put_manifest(
            INCOMING,
            Some(&crate::trust::tag::signature_tag(&digest(9))),
            &sig.manifest,
        );
        // Verification passes; the copy is the first write, and the trusted registry here
        // does not answer: the error is a registry one, not a refusal of the request.
        let e = refusal(&p, &format!("{INCOMING}@{}", digest(9)), None).await;
        assert!(!e.is_caller_error(), "{e}");
        assert!(
            matches!(e, PromoteError::Read { .. } | PromoteError::Write(_)),
            "{e}"
        );
    }
}
