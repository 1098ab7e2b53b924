//! How the CSI plugin finds a cache's verified digest: the [`CacheResolver`] interface. The
//! agent's watch cache implements it (so publishes work while the API server is briefly
//! unreachable); [`ApiResolver`] asks the API server directly; [`StaticResolver`] serves a
//! fixed table for unit tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;

use kube::api::Api;

pub use crate::api::volume::ResolvedCache;
use crate::api::{CacheRef, ClusterGKMCache, GKMCache};

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
