//! What admission asks of image verification: resolve `spec.image` to a digest once and
//! check that digest's signature against the trust policy. [`ImageVerifier`] is that
//! question; [`TrustVerifier`] answers it with `gkm_image::trust` and the registry.

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

pub use gkm_image::trust::Scope;

/// Why an image may not be used: words that name the image, and a short, stable label for
/// metrics (`untrusted_registry`, `resolve_failed`, `timeout`, or a [`VerifyError`]'s).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denial {
    pub label: &'static str,
    pub message: String,
}

impl Denial {
    pub fn new(label: &'static str, message: impl Into<String>) -> Self {
        Denial {
            label,
            message: message.into(),
        }
    }
}

impl From<gkm_image::trust::VerifyError> for Denial {
    fn from(e: gkm_image::trust::VerifyError) -> Self {
        Denial::new(e.label(), e.to_string())
    }
}

impl From<gkm_image::trust::UntrustedRegistry> for Denial {
    fn from(e: gkm_image::trust::UntrustedRegistry) -> Self {
        Denial::new("untrusted_registry", e.to_string())
    }
}

impl From<gkm_image::oci::RefError> for Denial {
    fn from(e: gkm_image::oci::RefError) -> Self {
        Denial::new("bad_reference", e.to_string())
    }
}

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
    /// [`ImageVerifier::verify`] reading the registry with `credentials` (a cache's own
    /// pull secrets) on top of the controller's. Implementations that never reach a
    /// registry (test fakes) may ignore them, as this default does.
    fn verify_with(
        &self,
        image: &str,
        scope: Scope,
        credentials: &gkm_image::oci::Credentials,
    ) -> impl Future<Output = Result<VerifiedImage, Denial>> + Send {
        let _ = credentials;
        self.verify(image, scope)
    }
    /// The Pod rule of the policy in force (it changes when the policy is reloaded).
    fn pod_rules(&self) -> gkm_image::trust::PodRules;
    /// The policy's `pullSecretNamespace`, where `ClusterGKMCache` pull secrets live.
    fn pull_secret_namespace(&self) -> Option<String> {
        None
    }
}

/// Admission's verifier: the trust policy's registry check (before any network call, so
/// a user cannot make the webhook contact arbitrary hosts), one tag resolution per image
/// (remembered briefly, so the validating call after the mutating one does not resolve
/// again), and `gkm_image::trust` for the signatures, all under the policy's timeout.
pub struct TrustVerifier {
    trust: std::sync::Arc<gkm_image::trust::Verifier>,
    puller: gkm_image::oci::Puller,
    tags: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    tag_ttl: std::time::Duration,
}

impl TrustVerifier {
    pub fn new(
        trust: std::sync::Arc<gkm_image::trust::Verifier>,
        puller: gkm_image::oci::Puller,
    ) -> Self {
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
        reference: &gkm_image::oci::Reference,
        fresh: bool,
    ) -> Result<gkm_image::oci::PinnedRef, Denial> {
        if let Some(d) = reference.digest() {
            return Ok(gkm_image::oci::PinnedRef::new(reference, d)?);
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
            return Ok(gkm_image::oci::PinnedRef::new(reference, &d)?);
        }
        let pinned =
            self.puller.resolve_tag(reference).await.map_err(|e| {
                Denial::new("resolve_failed", format!("cannot resolve {image}: {e}"))
            })?;
        self.tags.lock().unwrap_or_else(|e| e.into_inner()).insert(
            image.to_string(),
            (pinned.digest().to_string(), std::time::Instant::now()),
        );
        Ok(pinned)
    }
}

impl ImageVerifier for TrustVerifier {
    fn pod_rules(&self) -> gkm_image::trust::PodRules {
        self.trust.policy().pod_rules()
    }

    async fn verify(&self, image: &str, scope: Scope) -> Result<VerifiedImage, Denial> {
        self.verify_counted(image, scope, false, None).await
    }

    async fn verify_with(
        &self,
        image: &str,
        scope: Scope,
        credentials: &gkm_image::oci::Credentials,
    ) -> Result<VerifiedImage, Denial> {
        if credentials.is_empty() {
            return self.verify(image, scope).await;
        }
        // A client of its own: oci-client keeps bearer tokens per registry and repository,
        // and a token fetched with this cache's credentials must never serve another's
        // request. The tag is resolved afresh for the same reason.
        let puller = self.puller.with_credentials(credentials);
        self.verify_counted(image, scope, true, Some(&puller)).await
    }

    fn pull_secret_namespace(&self) -> Option<String> {
        self.trust.policy().pull_secret_namespace.clone()
    }

    async fn verify_now(&self, image: &str, scope: Scope) -> Result<VerifiedImage, Denial> {
        self.verify_counted(image, scope, true, None).await
    }
}

impl TrustVerifier {
    /// A verification, counted under its outcome's metric label.
    async fn verify_counted(
        &self,
        image: &str,
        scope: Scope,
        fresh: bool,
        own: Option<&gkm_image::oci::Puller>,
    ) -> Result<VerifiedImage, Denial> {
        let result = self.verify_uncounted(image, scope, fresh, own).await;
        let label = result.as_ref().map_or_else(|d| d.label, |_| "verified");
        gkm_image::metrics::Metrics::result(&crate::metrics::global().verifications, label);
        result
    }

    async fn verify_uncounted(
        &self,
        image: &str,
        scope: Scope,
        fresh: bool,
        own: Option<&gkm_image::oci::Puller>,
    ) -> Result<VerifiedImage, Denial> {
        let reference = gkm_image::oci::parse_reference(image)?;
        let policy = self.trust.policy();
        policy.check_registry(image, &reference)?;
        let timeout = policy.verification.timeout;
        let work = async {
            let v = match own {
                None => {
                    let pinned = self.pin(image, &reference, fresh).await?;
                    self.trust.verify_for(&pinned, scope).await?
                }
                Some(puller) => {
                    let pinned = match reference.digest() {
                        Some(d) => gkm_image::oci::PinnedRef::new(&reference, d)?,
                        None => puller.resolve_tag(&reference).await.map_err(|e| {
                            Denial::new("resolve_failed", format!("cannot resolve {image}: {e}"))
                        })?,
                    };
                    self.trust
                        .verify_for_through(puller, &pinned, scope)
                        .await?
                }
            };
            let pinned_repository = format!("{}/{}", reference.registry(), reference.repository());
            Ok(VerifiedImage {
                repository: pinned_repository,
                digest: v.digest,
                authority: v.authority,
            })
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| {
            Denial::new(
                "timeout",
                format!("verifying {image} took longer than {timeout:?}; denied (fail closed)"),
            )
        })?
    }
}
