//! How the CSI plugin finds a cache's verified digest: the [`CacheResolver`] interface. The
//! agent's watch cache implements it (so publishes work while the API server is briefly
//! unreachable); [`ApiResolver`] asks the API server directly; [`StaticResolver`] serves a
//! fixed table for unit tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use kube::api::Api;

use crate::api::{Cache, CacheRef, ClusterGKMCache, GKMCache, RESOLVED_DIGEST_ANNOTATION};

/// What the plugin needs of a cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedCache {
    pub key: CacheRef,
    /// `spec.image`: the repository the digest is pulled from.
    pub image: String,
    /// The verified digest (annotation written by the webhook, else the promoted status).
    pub digest: Option<String>,
    /// ClusterGKMCache only: namespaces whose pods may mount it; empty means all.
    pub workload_namespaces: Vec<String>,
}

impl ResolvedCache {
    pub fn from_namespaced(c: &GKMCache) -> Option<Self> {
        Self::from_cache(c, Vec::new())
    }

    pub fn from_cluster(c: &ClusterGKMCache) -> Option<Self> {
        Self::from_cache(c, c.spec.workload_namespaces.clone())
    }

    fn from_cache<C: Cache + kube::Resource>(
        c: &C,
        workload_namespaces: Vec<String>,
    ) -> Option<Self> {
        Some(Self {
            key: c.cache_ref()?,
            image: c.image().to_string(),
            digest: trusted_digest(
                &c.meta().annotations,
                c.status().and_then(|s| s.resolved_digest.as_ref()),
            ),
            workload_namespaces,
        })
    }

    /// Whether pods of `namespace` may mount this cache.
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        match &self.key {
            CacheRef::Namespaced { namespace: ns, .. } => ns == namespace,
            CacheRef::Cluster { .. } => {
                self.workload_namespaces.is_empty()
                    || self.workload_namespaces.iter().any(|n| n == namespace)
            }
        }
    }
}

/// The annotation is the newest verified digest (the webhook writes it on every image
/// change); the status is the controller's promoted copy, used when the annotation is gone.
fn trusted_digest(
    annotations: &Option<BTreeMap<String, String>>,
    status: Option<&String>,
) -> Option<String> {
    annotations
        .as_ref()
        .and_then(|a| a.get(RESOLVED_DIGEST_ANNOTATION))
        .or(status)
        .filter(|d| crate::oci::sha256_hex(d).is_some())
        .cloned()
}

/// Why a lookup could not be answered (as opposed to "no such cache").
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResolveError(pub String);

pub trait CacheResolver: Send + Sync + 'static {
    /// The cache named by `key`, or None if it does not exist.
    fn resolve(
        &self,
        key: &CacheRef,
    ) -> impl Future<Output = Result<Option<ResolvedCache>, ResolveError>> + Send;
    /// Whether lookups can be answered (the watch cache has synced).
    fn ready(&self) -> bool;
}

/// Asks the API server on every lookup.
#[derive(Clone)]
pub struct ApiResolver {
    client: kube::Client,
}

impl ApiResolver {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl CacheResolver for ApiResolver {
    async fn resolve(&self, key: &CacheRef) -> Result<Option<ResolvedCache>, ResolveError> {
        let err = |e: kube::Error| ResolveError(format!("reading {} {key}: {e}", key.kind()));
        match key {
            CacheRef::Namespaced { namespace, name } => {
                let api: Api<GKMCache> = Api::namespaced(self.client.clone(), namespace);
                Ok(api
                    .get_opt(name)
                    .await
                    .map_err(err)?
                    .as_ref()
                    .and_then(ResolvedCache::from_namespaced))
            }
            CacheRef::Cluster { name } => {
                let api: Api<ClusterGKMCache> = Api::all(self.client.clone());
                Ok(api
                    .get_opt(name)
                    .await
                    .map_err(err)?
                    .as_ref()
                    .and_then(ResolvedCache::from_cluster))
            }
        }
    }

    fn ready(&self) -> bool {
        true
    }
}

/// A fixed table, for tests.
#[derive(Default)]
pub struct StaticResolver {
    pub caches: Mutex<BTreeMap<CacheRef, ResolvedCache>>,
}

impl StaticResolver {
    pub fn insert(&self, c: ResolvedCache) {
        self.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.key.clone(), c);
    }

    pub fn remove(&self, key: &CacheRef) {
        self.caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

impl CacheResolver for StaticResolver {
    async fn resolve(&self, key: &CacheRef) -> Result<Option<ResolvedCache>, ResolveError> {
        Ok(self
            .caches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned())
    }

    fn ready(&self) -> bool {
        true
    }
}
