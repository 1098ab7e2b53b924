//! The status controller: promotes the admission-verified digest (the annotation) to
//! `status.resolvedDigest`, sets the `Verified` and `Ready` conditions, aggregates the
//! node objects into `status.counts`, and records who vouched for the digest in
//! `status.provenance`. The digest is admission's; the provenance comes from the
//! controller's own verification of that digest ([`Vouch`]), answered from the verifier's
//! cache when admission has just verified it, so nothing in it is taken from the object.
//!
//! Reconcile is a plain function of the cache and a context; status is written with
//! server-side apply under the field manager `gkm-controller`, only when it changes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gkm_api::{
    CacheCounts, CacheState, CacheStatus, ClusterGKMCache, ClusterGKMCacheNode, GKMCache,
    GKMCacheNode, NodeStatus, Provenance, RESOLVED_DIGEST_ANNOTATION, short_digest,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

pub const FIELD_MANAGER: &str = "gkm-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing node objects for {cache}: {source}")]
    ListNodes { cache: String, source: kube::Error },
    #[error("writing the status of {cache}: {source}")]
    WriteStatus { cache: String, source: kube::Error },
}

impl Error {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::ListNodes { .. } => "list_nodes",
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

pub struct Context {
    pub client: Client,
    /// Verifies a cache's digest for its provenance; `None` leaves provenance out.
    pub vouch: Option<Arc<dyn Vouch>>,
}

/// Verifies `image` (a cache's `spec.image`, by tag or digest) at `digest` under the
/// trust policy in force, as admission does for caches.
pub trait Vouch: Send + Sync + 'static {
    fn vouch<'a>(
        &'a self,
        image: &'a str,
        digest: &'a str,
        credentials: &'a gkm_image::oci::Credentials,
    ) -> futures::future::BoxFuture<'a, Result<gkm_image::trust::Verified, String>>;
    /// The trust policy's `pullSecretNamespace` (where `ClusterGKMCache` pull secrets are).
    fn pull_secret_namespace(&self) -> Option<String>;
}

/// The controller's own verification: the trust policy's verifier, reading the registry
/// through the controller's puller (its registry configuration and credentials).
pub struct TrustVouch {
    pub trust: Arc<gkm_image::trust::Verifier>,
    pub puller: gkm_image::oci::Puller,
}

impl Vouch for TrustVouch {
    fn vouch<'a>(
        &'a self,
        image: &'a str,
        digest: &'a str,
        credentials: &'a gkm_image::oci::Credentials,
    ) -> futures::future::BoxFuture<'a, Result<gkm_image::trust::Verified, String>> {
        Box::pin(async move {
            let reference = gkm_image::oci::parse_reference(image).map_err(|e| e.to_string())?;
            let pinned =
                gkm_image::oci::PinnedRef::new(&reference, digest).map_err(|e| e.to_string())?;
            if credentials.is_empty() {
                return self.trust.verify(&pinned).await.map_err(|e| e.to_string());
            }
            // The cache's own credentials, through a client of their own.
            let puller = self.puller.with_credentials(credentials);
            self.trust
                .verify_for_through(&puller, &pinned, gkm_image::trust::Scope::Caches)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn pull_secret_namespace(&self) -> Option<String> {
        self.trust.policy().pull_secret_namespace.clone()
    }
}

/// [`Vouch::vouch`] for `cache` at `digest`, with the cache's pull secrets.
async fn vouch_with_secrets<K: CacheResource>(
    vouch: &dyn Vouch,
    ctx: &Context,
    cache: &K,
    digest: &str,
) -> Result<gkm_image::trust::Verified, String> {
    let credentials = match cache.cache_ref() {
        Some(key) => crate::pull_secrets::PullSecrets::for_cache(
            Some(&crate::pull_secrets::PullSecrets::new(ctx.client.clone())),
            &key,
            &cache
                .image_pull_secrets()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>(),
            vouch.pull_secret_namespace().as_deref(),
        )
        .await
        .map_err(|e| e.to_string())?,
        None => gkm_image::oci::Credentials::anonymous(),
    };
    vouch.vouch(cache.image(), digest, &credentials).await
}

/// The provenance of `digest` from a verification of it (`verified`), keeping `old`'s
/// `verifiedAt` when it recorded the same outcome, and `old` itself, for the same digest,
/// when there is no new verification (the registry is unreachable, say): it was true when
/// it was written, and `verifiedAt` says when.
pub fn provenance(
    digest: Option<&str>,
    verified: Option<&gkm_image::trust::Verified>,
    old: Option<&Provenance>,
) -> Option<Provenance> {
    let digest = digest?;
    let Some(v) = verified.filter(|v| v.digest == digest) else {
        return old.filter(|o| o.digest == digest).cloned();
    };
    let (key_fingerprint, issuer, subject) = match &v.signer {
        gkm_image::trust::Signer::Key { fingerprint } => (Some(fingerprint.clone()), None, None),
        gkm_image::trust::Signer::Keyless { issuer, subject } => {
            (None, Some(issuer.clone()), Some(subject.clone()))
        }
    };
    let secs = v
        .verified_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut p = Provenance {
        digest: digest.to_string(),
        authority: v.authority.clone(),
        key_fingerprint,
        issuer,
        subject,
        signature_format: v.format.as_str().to_string(),
        attestation_required: !v.attestations.is_empty(),
        attestations: v
            .attestations
            .iter()
            .map(|a| a.predicate_type.clone())
            .collect(),
        verified_at: Time(
            k8s_openapi::jiff::Timestamp::from_second(secs)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ),
    };
    if let Some(o) = old {
        let same = Provenance {
            verified_at: o.verified_at.clone(),
            ..p.clone()
        };
        if same == *o {
            p.verified_at = o.verified_at.clone();
        }
    }
    Some(p)
}

/// The status a cache should have, from its metadata, its current status, the status of
/// every node object that may mention it, and the controller's verification of its digest
/// (`vouched`, if one was made).
pub fn desired_status<'a>(
    meta: &ObjectMeta,
    old: Option<&CacheStatus>,
    nodes: impl Iterator<Item = &'a NodeStatus>,
    vouched: Option<&gkm_image::trust::Verified>,
    now: Time,
) -> CacheStatus {
    let name = meta.name.clone().unwrap_or_default();
    let digest = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(RESOLVED_DIGEST_ANNOTATION))
        .filter(|d| gkm_image::oci::sha256_hex(d).is_some())
        .cloned();
    let mut counts = CacheCounts::default();
    let mut total_nodes = 0;
    for node in nodes {
        let Some(entries) = node.caches.get(&name) else {
            continue;
        };
        total_nodes += 1;
        counts.pods += entries.values().map(|e| e.pods.len() as u32).sum::<u32>();
        let Some(current) = digest.as_ref().and_then(|d| entries.get(d)) else {
            continue;
        };
        match current.state {
            CacheState::Extracted | CacheState::InUse => counts.nodes_ready += 1,
            CacheState::Error => counts.nodes_error += 1,
            CacheState::Incompatible => counts.nodes_incompatible += 1,
            _ => {}
        }
    }
    let last_updated = match old {
        Some(o) if o.resolved_digest == digest => o.last_updated.clone(),
        _ => digest.as_ref().map(|_| now.clone()),
    };
    let verified = match &digest {
        Some(d) => condition(
            "Verified",
            true,
            "SignatureVerified",
            format!("admission resolved and verified {d}"),
        ),
        None => condition(
            "Verified",
            false,
            "NotVerified",
            format!(
                "no valid {RESOLVED_DIGEST_ANNOTATION} annotation: the cache has not passed admission"
            ),
        ),
    };
    let ready = if counts.nodes_ready > 0 {
        condition(
            "Ready",
            true,
            "NodesReady",
            format!(
                "{} of {total_nodes} node(s) have it extracted",
                counts.nodes_ready
            ),
        )
    } else if digest.is_none() {
        condition(
            "Ready",
            false,
            "NotVerified",
            "waiting for a verified digest".to_string(),
        )
    } else {
        condition(
            "Ready",
            false,
            "NoNodeReady",
            format!(
                "no node has it extracted yet ({} with errors, {} incompatible, of {total_nodes} reporting)",
                counts.nodes_error, counts.nodes_incompatible
            ),
        )
    };
    let conditions = [verified, ready]
        .into_iter()
        .map(|mut c| {
            // Keep the transition time unless the status of the condition changed.
            let prev = old.and_then(|o| o.conditions.iter().find(|p| p.type_ == c.type_));
            c.last_transition_time = match prev {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            c.observed_generation = meta.generation;
            c
        })
        .collect();
    CacheStatus {
        provenance: provenance(
            digest.as_deref(),
            vouched,
            old.and_then(|o| o.provenance.as_ref()),
        ),
        short_digest: digest.as_deref().map(short_digest),
        resolved_digest: digest,
        last_updated,
        conditions,
        counts: Some(counts),
        observed_generation: meta.generation,
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn apply_status<K>(api: &Api<K>, name: &str, status: &CacheStatus) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

/// What the reconciler needs to know of a cache resource (either kind) and its node objects.
pub trait CacheResource:
    gkm_api::Cache
    + Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    type Node: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug;
    fn node_status(node: &Self::Node) -> Option<&NodeStatus>;
    /// The API of this kind and of its node objects, scoped to `ns` for namespaced kinds.
    fn apis(client: Client, ns: &str) -> (Api<Self>, Api<Self::Node>);
}

impl CacheResource for GKMCache {
    type Node = GKMCacheNode;
    fn node_status(node: &GKMCacheNode) -> Option<&NodeStatus> {
        node.status.as_ref()
    }
    fn apis(client: Client, ns: &str) -> (Api<Self>, Api<GKMCacheNode>) {
        (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        )
    }
}

impl CacheResource for ClusterGKMCache {
    type Node = ClusterGKMCacheNode;
    fn node_status(node: &ClusterGKMCacheNode) -> Option<&NodeStatus> {
        node.status.as_ref()
    }
    fn apis(client: Client, _: &str) -> (Api<Self>, Api<ClusterGKMCacheNode>) {
        (Api::all(client.clone()), Api::all(client))
    }
}

/// Reconciles one cache of either kind: desired status from its annotation and the node
/// objects, written only when it differs.
pub async fn reconcile<K: CacheResource>(
    cache: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let ns = cache.namespace().unwrap_or_default();
    let name = cache.name_any();
    let shown = match cache.cache_ref() {
        Some(r) => format!("{} {r}", r.kind()),
        None => format!("{} {name}", K::kind(&())),
    };
    let (caches, nodes) = K::apis(ctx.client.clone(), &ns);
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::ListNodes {
            cache: shown.clone(),
            source,
        })?;
    let digest = cache
        .annotations()
        .get(RESOLVED_DIGEST_ANNOTATION)
        .filter(|d| gkm_image::oci::sha256_hex(d).is_some());
    let mut retry = Duration::from_secs(300);
    let verified = match (&ctx.vouch, digest) {
        (Some(v), Some(d)) => match vouch_with_secrets(v.as_ref(), &ctx, cache.as_ref(), d).await {
            Ok(v) => Some(v),
            Err(e) => {
                // Admission verified it; the record of who did waits for the next try.
                warn!(cache = %shown, digest = %d, error = %e, "verifying for provenance failed");
                retry = Duration::from_secs(30);
                None
            }
        },
        _ => None,
    };
    let want = desired_status(
        cache.meta(),
        cache.status(),
        list.items.iter().filter_map(K::node_status),
        verified.as_ref(),
        now(),
    );
    if !same_status(cache.status(), &want) {
        apply_status(&caches, &name, &want)
            .await
            .map_err(|source| Error::WriteStatus {
                cache: shown.clone(),
                source,
            })?;
        info!(cache = %shown, digest = want.resolved_digest.as_deref().unwrap_or("-"), "status updated");
    }
    gkm_image::metrics::Metrics::result(&crate::metrics::global().reconciles, "ok");
    Ok(Action::requeue(retry))
}

/// Equal but for timestamps that `desired_status` carries over anyway.
fn same_status(old: Option<&CacheStatus>, new: &CacheStatus) -> bool {
    old == Some(new)
}

fn error_policy<K>(_: Arc<K>, e: &Error, _: Arc<Context>) -> Action {
    gkm_image::metrics::Metrics::result(&crate::metrics::global().reconciles, e.label());
    warn!(error = %e, label = e.label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs both controllers until `shutdown` completes. Node objects trigger the caches they
/// name in `status.caches`.
pub async fn run(
    client: Client,
    vouch: Option<Arc<dyn Vouch>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context {
        client: client.clone(),
        vouch,
    });
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let namespaced = Controller::new(
        Api::<GKMCache>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<GKMCacheNode>::all(client.clone()),
        watcher::Config::default(),
        |node| {
            let ns = node.namespace().unwrap_or_default();
            node.status
                .iter()
                .flat_map(|s| s.caches.keys().cloned().collect::<Vec<_>>())
                .map(move |name| ObjectRef::<GKMCache>::new(&name).within(&ns))
                .collect::<Vec<_>>()
        },
    )
    .graceful_shutdown_on(shutdown.clone())
    .run(reconcile::<GKMCache>, error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let cluster = Controller::new(
        Api::<ClusterGKMCache>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<ClusterGKMCacheNode>::all(client),
        watcher::Config::default(),
        |node| {
            node.status
                .iter()
                .flat_map(|s| s.caches.keys().cloned().collect::<Vec<_>>())
                .map(|name| ObjectRef::<ClusterGKMCache>::new(&name))
                .collect::<Vec<_>>()
        },
    )
    .graceful_shutdown_on(shutdown)
    .run(reconcile::<ClusterGKMCache>, error_policy, ctx)
    .for_each(|_| futures::future::ready(()));
    futures::join!(namespaced, cluster);
}

#[cfg(test)]
mod tests {
    use super::*;
    use gkm_api::CacheDigestStatus;
    use std::collections::BTreeMap;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D0: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn meta(digest: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some("llama".into()),
            generation: Some(3),
            annotations: digest
                .map(|d| [(RESOLVED_DIGEST_ANNOTATION.to_string(), d.to_string())].into()),
            ..Default::default()
        }
    }

    fn node(entries: &[(&str, CacheState, usize)]) -> NodeStatus {
        let mut per_digest = BTreeMap::new();
        for (d, state, pods) in entries {
            per_digest.insert(
                d.to_string(),
                CacheDigestStatus {
                    state: *state,
                    pods: (0..*pods).map(|i| format!("ns/p{i}")).collect(),
                    ..Default::default()
                },
            );
        }
        NodeStatus {
            node_name: "n".into(),
            caches: [("llama".to_string(), per_digest)].into(),
            ..Default::default()
        }
    }

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn promotes_the_annotation_and_counts_nodes() {
        let nodes = [
            node(&[(D1, CacheState::InUse, 2), (D0, CacheState::Outdated, 1)]),
            node(&[(D1, CacheState::Extracted, 0)]),
            node(&[(D1, CacheState::Incompatible, 0)]),
            node(&[(D1, CacheState::Error, 0)]),
        ];
        let s = desired_status(&meta(Some(D1)), None, nodes.iter(), None, t(100));
        assert_eq!(s.resolved_digest.as_deref(), Some(D1));
        assert_eq!(s.short_digest.as_deref(), Some("sha256:111111111111"));
        assert_eq!(s.last_updated, Some(t(100)));
        assert_eq!(
            s.counts,
            Some(CacheCounts {
                nodes_ready: 2,
                nodes_error: 1,
                nodes_incompatible: 1,
                pods: 3
            })
        );
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "NodesReady")
        );
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn timestamps_move_only_when_something_changes() {
        let first = desired_status(&meta(Some(D1)), None, std::iter::empty(), None, t(100));
        let again = desired_status(
            &meta(Some(D1)),
            Some(&first),
            std::iter::empty(),
            None,
            t(200),
        );
        assert_eq!(again, first, "nothing changed: identical status, no write");
        let ready_now = [node(&[(D1, CacheState::Extracted, 0)])];
        let later = desired_status(
            &meta(Some(D1)),
            Some(&first),
            ready_now.iter(),
            None,
            t(300),
        );
        assert_eq!(
            later.last_updated,
            Some(t(100)),
            "same digest: lastUpdated kept"
        );
        let ready = later
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.last_transition_time, t(300));
        let verified = later
            .conditions
            .iter()
            .find(|c| c.type_ == "Verified")
            .unwrap();
        assert_eq!(verified.last_transition_time, t(100));
    }

    #[test]
    fn no_annotation_means_not_verified() {
        let s = desired_status(&meta(None), None, std::iter::empty(), None, t(1));
        assert_eq!(s.resolved_digest, None);
        let v = s.conditions.iter().find(|c| c.type_ == "Verified").unwrap();
        assert_eq!(
            (v.status.as_str(), v.reason.as_str()),
            ("False", "NotVerified")
        );
        let bad = desired_status(
            &meta(Some("sha256:nothex")),
            None,
            std::iter::empty(),
            None,
            t(1),
        );
        assert_eq!(
            bad.resolved_digest, None,
            "a malformed annotation is not promoted"
        );
    }

    fn verified(digest: &str, authority: &str, at: i64) -> gkm_image::trust::Verified {
        gkm_image::trust::Verified {
            digest: digest.into(),
            authority: authority.into(),
            signer: gkm_image::trust::Signer::Key {
                fingerprint: "sha256:abcd".into(),
            },
            format: gkm_image::trust::SignatureFormat::Tag,
            evidence: gkm_image::trust::Evidence::Referrer {
                digest: String::new(),
            },
            verified_at: std::time::UNIX_EPOCH + std::time::Duration::from_secs(at as u64),
            attestations: Vec::new(),
        }
    }

    #[test]
    fn provenance_comes_from_the_verification_and_keeps_its_first_time() {
        let v = verified(D1, "release", 50);
        let s = desired_status(&meta(Some(D1)), None, std::iter::empty(), Some(&v), t(100));
        let p = s.provenance.clone().unwrap();
        assert_eq!(
            (
                p.digest.as_str(),
                p.authority.as_str(),
                p.key_fingerprint.as_deref()
            ),
            (D1, "release", Some("sha256:abcd"))
        );
        assert_eq!(
            (p.signature_format.as_str(), p.attestation_required),
            ("tag", false)
        );
        assert_eq!(p.verified_at, t(50));

        // Verified again later with the same outcome: the first time stays, nothing to write.
        let again = verified(D1, "release", 400);
        let s2 = desired_status(
            &meta(Some(D1)),
            Some(&s),
            std::iter::empty(),
            Some(&again),
            t(500),
        );
        assert_eq!(s2, s);
        // No verification this time (registry down): the record for this digest stays.
        let s3 = desired_status(&meta(Some(D1)), Some(&s), std::iter::empty(), None, t(600));
        assert_eq!(s3.provenance, s.provenance);
        // Another authority: a new record with its own time.
        let other = verified(D1, "ci", 700);
        let s4 = desired_status(
            &meta(Some(D1)),
            Some(&s),
            std::iter::empty(),
            Some(&other),
            t(800),
        );
        assert_eq!(s4.provenance.as_ref().unwrap().authority, "ci");
        assert_eq!(s4.provenance.unwrap().verified_at, t(700));
        // A new digest without a verification: no record (the old one was for D0... or D1).
        let s5 = desired_status(&meta(Some(D0)), Some(&s), std::iter::empty(), None, t(900));
        assert_eq!(s5.provenance, None);
        // A verification of another digest than the annotation's is not used.
        let s6 = desired_status(&meta(Some(D0)), None, std::iter::empty(), Some(&v), t(900));
        assert_eq!(s6.provenance, None);
    }
}
