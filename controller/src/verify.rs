//! What admission asks of image verification: resolve `spec.image` to a digest once and
//! check that digest's signature against the trust policy. [`ImageVerifier`] is that
//! question; [`TrustVerifier`] answers it with `gkm::trust` and the registry.

use std::future::Future;

/// An image that resolved to a digest whose signature the policy accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedImage {
    /// `registry/repository`.
    pub repository: String,
    pub digest: String,
    /// Which authority accepted it, for logs and events.
    pub authority: String,
}

pub use gkm::trust::Scope;

/// Why an image may not be used, in words that name the image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denial(pub String);

pub trait ImageVerifier: Send + Sync + 'static {
    /// Resolves `image` (by tag or digest) and verifies it as an image of `scope` (whose
    /// required attestations it must carry). Must fail closed: any error, timeout or
    /// unreachable registry is a denial.
    fn verify(
        &self,
        image: &str,
        scope: Scope,
    ) -> impl Future<Output = Result<VerifiedImage, Denial>> + Send;
    /// [`ImageVerifier::verify`], with a tag resolved now, never answered from a memory of
    /// recent resolutions: the digest a Pod is pinned to must be what the tag names when
    /// the pod is admitted.
    fn verify_now(
        &self,
        image: &str,
        scope: Scope,
    ) -> impl Future<Output = Result<VerifiedImage, Denial>> + Send {
        self.verify(image, scope)
    }
    /// The Pod rule of the policy in force (it changes when the policy is reloaded).
    fn pod_rules(&self) -> crate::webhook::pods::PodRules;
}

/// Admission's verifier: the trust policy's registry check (before any network call, so
/// a user cannot make the webhook contact arbitrary hosts), one tag resolution per image
/// (remembered briefly, so the validating call after the mutating one does not resolve
/// again), and `gkm::trust` for the signatures, all under the policy's timeout.
pub struct TrustVerifier {
    trust: std::sync::Arc<gkm::trust::Verifier>,
    puller: gkm::oci::Puller,
    tags: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    tag_ttl: std::time::Duration,
}

impl TrustVerifier {
    pub fn new(trust: std::sync::Arc<gkm::trust::Verifier>, puller: gkm::oci::Puller) -> Self {
        Self {
            trust,
            puller,
            tags: Default::default(),
            tag_ttl: std::time::Duration::from_secs(30),
        }
    }

    /// `reference` pinned: its own digest, else its tag resolved (from the brief memory of
    /// recent resolutions unless `fresh`).
    async fn pin(
        &self,
        image: &str,
        reference: &gkm::oci::Reference,
        fresh: bool,
    ) -> Result<gkm::oci::PinnedRef, Denial> {
        if let Some(d) = reference.digest() {
            return gkm::oci::PinnedRef::new(reference, d).map_err(|e| Denial(e.to_string()));
        }
        let cached = if fresh {
            None
        } else {
            let tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
            tags.get(image)
                .filter(|(_, at)| at.elapsed() < self.tag_ttl)
                .map(|(d, _)| d.clone())
        };
        if let Some(d) = cached {
            return gkm::oci::PinnedRef::new(reference, &d).map_err(|e| Denial(e.to_string()));
        }
        let pinned = self
            .puller
            .resolve_tag(reference)
            .await
            .map_err(|e| Denial(format!("cannot resolve {image}: {e}")))?;
        self.tags.lock().unwrap_or_else(|e| e.into_inner()).insert(
            image.to_string(),
            (pinned.digest().to_string(), std::time::Instant::now()),
        );
        Ok(pinned)
    }
}

impl ImageVerifier for TrustVerifier {
    fn pod_rules(&self) -> crate::webhook::pods::PodRules {
        let policy = self.trust.policy();
        crate::webhook::pods::PodRules {
            policy: policy.pod_policy.clone(),
            trusted_registries: policy.trusted_registries.clone(),
        }
    }

    async fn verify(&self, image: &str, scope: Scope) -> Result<VerifiedImage, Denial> {
        self.verify_counted(image, scope, false).await
    }

    async fn verify_now(&self, image: &str, scope: Scope) -> Result<VerifiedImage, Denial> {
        self.verify_counted(image, scope, true).await
    }
}

impl TrustVerifier {
    /// A verification, counted under its outcome's metric label.
    async fn verify_counted(
        &self,
        image: &str,
        scope: Scope,
        fresh: bool,
    ) -> Result<VerifiedImage, Denial> {
        let result = self.verify_labelled(image, scope, fresh).await;
        let label = result.as_ref().map_or_else(|(l, _)| *l, |_| "verified");
        gkm::metrics::Metrics::result(&crate::metrics::global().verifications, label);
        result.map_err(|(_, d)| d)
    }

    /// [`ImageVerifier::verify`], with a metric label for each way it can fail.
    async fn verify_labelled(
        &self,
        image: &str,
        scope: Scope,
        fresh: bool,
    ) -> Result<VerifiedImage, (&'static str, Denial)> {
        let reference = gkm::oci::parse_reference(image)
            .map_err(|e| ("bad_reference", Denial(e.to_string())))?;
        let policy = self.trust.policy();
        if policy.trusted_registry_for(&reference).is_none() {
            let trusted: Vec<&str> = policy
                .trusted_registries
                .iter()
                .map(|p| p.as_str())
                .collect();
            return Err((
                "untrusted_registry",
                Denial(format!(
                    "{image} is not in a trusted registry (trusted: {})",
                    trusted.join(", ")
                )),
            ));
        }
        let timeout = policy.verification.timeout;
        let work = async {
            let pinned = self
                .pin(image, &reference, fresh)
                .await
                .map_err(|d| ("resolve_failed", d))?;
            let v = self
                .trust
                .verify_for(&pinned, scope)
                .await
                .map_err(|e| (e.label(), Denial(e.to_string())))?;
            Ok(VerifiedImage {
                repository: format!("{}/{}", pinned.registry(), pinned.repository()),
                digest: v.digest,
                authority: v.authority,
            })
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| {
            (
                "timeout",
                Denial(format!(
                    "verifying {image} took longer than {timeout:?}; denied (fail closed)"
                )),
            )
        })?
    }
}
