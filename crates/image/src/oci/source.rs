//! What signature and attestation discovery read from a registry, as a small interface:
//! [`ImageSource`]. [`Puller`] is the real one (an OCI distribution client); an
//! [`InMemoryRegistry`] serves a fixed set of manifests and blobs, records every call and
//! can be told to fail, so the verifier's decisions are unit-tested without a registry
//! (the integration tests against a real registry and real cosign stay).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use oci_client::manifest::{ImageIndexEntry, OciImageIndex};

use super::{PinnedRef, PullError, Puller, Reference};

/// A manifest's exact bytes and their digest (`sha256:<hex>`, computed from the bytes).
pub type Manifest = (Vec<u8>, String);

/// Reads from a registry: the exact bytes of manifests, small blobs, referrers. The
/// contracts are [`Puller`]'s: a manifest's digest is computed from its bytes (and checked
/// against a by-digest reference), a blob is checked against its digest and size, and
/// anything over the given bounds is refused before it is used.
pub trait ImageSource: Send + Sync {
    /// The manifest or index `reference` (tag or digest) names, with its digest;
    /// `Ok(None)` when the registry says it does not exist. Refused over `max_bytes`.
    fn fetch_manifest_bytes<'a>(
        &'a self,
        reference: &'a Reference,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Option<Manifest>, PullError>>;

    /// The blob `digest` of `size` bytes in `image`'s repository; refused when `size` is
    /// over `max_bytes`, when fewer or more bytes come, or when they do not hash to `digest`.
    fn fetch_blob_bytes<'a>(
        &'a self,
        image: &'a PinnedRef,
        digest: &'a str,
        size: u64,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, PullError>>;

    /// The referrers of `image` (OCI 1.1); an empty index when there are none.
    fn list_referrers<'a>(
        &'a self,
        image: &'a PinnedRef,
    ) -> BoxFuture<'a, Result<OciImageIndex, PullError>>;
}

impl ImageSource for Puller {
    fn fetch_manifest_bytes<'a>(
        &'a self,
        reference: &'a Reference,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Option<Manifest>, PullError>> {
        Box::pin(Puller::fetch_manifest_bytes(self, reference, max_bytes))
    }

    fn fetch_blob_bytes<'a>(
        &'a self,
        image: &'a PinnedRef,
        digest: &'a str,
        size: u64,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, PullError>> {
        Box::pin(Puller::fetch_blob_bytes(
            self, image, digest, size, max_bytes,
        ))
    }

    fn list_referrers<'a>(
        &'a self,
        image: &'a PinnedRef,
    ) -> BoxFuture<'a, Result<OciImageIndex, PullError>> {
        Box::pin(Puller::list_referrers(self, image))
    }
}

/// How an [`InMemoryRegistry`] fails every call while a fault is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `401 Unauthorized`, as a registry answers without valid credentials.
    Unauthorized,
    /// The call times out, as an unreachable registry's would.
    Timeout,
}

#[derive(Default)]
struct Contents {
    /// `registry/repository` -> digest -> manifest bytes.
    manifests: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// `registry/repository` -> tag -> digest.
    tags: BTreeMap<String, BTreeMap<String, String>>,
    /// `registry/repository` -> digest -> blob bytes.
    blobs: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    fault: Option<Fault>,
    calls: Vec<String>,
}

/// An OCI registry in memory, for unit tests of decisions over registry contents: push
/// manifests (by digest, optionally tagged) and blobs into repositories named
/// `registry/repository`; referrers are the manifests of the repository whose `subject`
/// names the image, as the OCI 1.1 referrers API lists them. Every call is recorded
/// ([`InMemoryRegistry::calls`]) as `manifest <ref>`, `blob <repo>@<digest>` or
/// `referrers <ref>`.
#[derive(Default)]
pub struct InMemoryRegistry {
    contents: Mutex<Contents>,
}

fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

impl InMemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `bytes` as a manifest of `repository` (`registry/repository`), tagged `tag`
    /// when given; returns its digest.
    pub fn put_manifest(&self, repository: &str, tag: Option<&str>, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let mut c = self.lock();
        c.manifests
            .entry(repository.to_string())
            .or_default()
            .insert(digest.clone(), bytes.to_vec());
        if let Some(tag) = tag {
            c.tags
                .entry(repository.to_string())
                .or_default()
                .insert(tag.to_string(), digest.clone());
        }
        digest
    }

    /// Stores `bytes` as a blob of `repository`; returns its digest.
    pub fn put_blob(&self, repository: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        self.lock()
            .blobs
            .entry(repository.to_string())
            .or_default()
            .insert(digest.clone(), bytes.to_vec());
        digest
    }

    /// Every call from now on fails with `fault` (None: serve again).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Records `call`; the fault's error, if one is set.
    fn enter(&self, call: String, image: &str, registry: &str) -> Result<(), PullError> {
        let mut c = self.lock();
        c.calls.push(call.clone());
        match c.fault {
            None => Ok(()),
            Some(Fault::Unauthorized) => Err(PullError::Denied {
                registry: registry.to_string(),
                image: image.to_string(),
                status: "401 Unauthorized",
                hint: "the in-memory registry was told to refuse",
            }),
            Some(Fault::Timeout) => Err(PullError::Timeout {
                image: image.to_string(),
                what: call,
                after: Duration::from_secs(30),
            }),
        }
    }
}

fn repository_of(registry: &str, repository: &str) -> String {
    format!("{registry}/{repository}")
}

impl ImageSource for InMemoryRegistry {
    fn fetch_manifest_bytes<'a>(
        &'a self,
        reference: &'a Reference,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Option<Manifest>, PullError>> {
        Box::pin(async move {
            let name = reference.whole();
            self.enter(format!("manifest {name}"), &name, reference.registry())?;
            let repo = repository_of(reference.registry(), reference.repository());
            let c = self.lock();
            let digest = match (reference.digest(), reference.tag()) {
                (Some(d), _) => Some(d.to_string()),
                (None, Some(t)) => c.tags.get(&repo).and_then(|t2| t2.get(t)).cloned(),
                (None, None) => None,
            };
            let Some(bytes) = digest.and_then(|d| c.manifests.get(&repo)?.get(&d).cloned()) else {
                return Ok(None);
            };
            if bytes.len() > max_bytes {
                return Err(PullError::SizeMismatch {
                    image: name,
                    what: "manifest (limit)".into(),
                    expected: max_bytes as u64,
                    actual: bytes.len() as u64,
                });
            }
            let digest = sha256_digest(&bytes);
            Ok(Some((bytes, digest)))
        })
    }

    fn fetch_blob_bytes<'a>(
        &'a self,
        image: &'a PinnedRef,
        digest: &'a str,
        size: u64,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, PullError>> {
        Box::pin(async move {
            let name = image.to_string();
            let repo = repository_of(image.registry(), image.repository());
            self.enter(format!("blob {repo}@{digest}"), &name, image.registry())?;
            let what = format!("blob {digest}");
            if size > max_bytes {
                return Err(PullError::SizeMismatch {
                    image: name,
                    what: format!("{what} (limit)"),
                    expected: max_bytes,
                    actual: size,
                });
            }
            let bytes = self
                .lock()
                .blobs
                .get(&repo)
                .and_then(|b| b.get(digest))
                .cloned()
                .ok_or_else(|| PullError::BadManifest {
                    image: name.clone(),
                    reason: format!("{what} does not exist"),
                })?;
            if bytes.len() as u64 != size {
                return Err(PullError::SizeMismatch {
                    image: name,
                    what,
                    expected: size,
                    actual: bytes.len() as u64,
                });
            }
            Ok(bytes)
        })
    }

    fn list_referrers<'a>(
        &'a self,
        image: &'a PinnedRef,
    ) -> BoxFuture<'a, Result<OciImageIndex, PullError>> {
        Box::pin(async move {
            let name = image.to_string();
            self.enter(format!("referrers {name}"), &name, image.registry())?;
            let repo = repository_of(image.registry(), image.repository());
            let c = self.lock();
            let manifests = c
                .manifests
                .get(&repo)
                .into_iter()
                .flatten()
                .filter_map(|(digest, bytes)| {
                    let m: serde_json::Value = serde_json::from_slice(bytes).ok()?;
                    let subject = m.pointer("/subject/digest")?.as_str()?;
                    (subject == image.digest()).then(|| ImageIndexEntry {
                        media_type: m
                            .get("mediaType")
                            .and_then(|t| t.as_str())
                            .unwrap_or(super::image::OCI_MANIFEST)
                            .to_string(),
                        digest: digest.clone(),
                        size: bytes.len() as i64,
                        platform: None,
                        annotations: None,
                        artifact_type: m
                            .get("artifactType")
                            .and_then(|t| t.as_str())
                            .map(str::to_string),
                    })
                })
                .collect();
            Ok(OciImageIndex {
                schema_version: 2,
                media_type: Some("application/vnd.oci.image.index.v1+json".into()),
                manifests,
                artifact_type: None,
                annotations: None,
            })
        })
    }
}
