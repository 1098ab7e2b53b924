//! The agent's watch cache of `GKMCache` and `ClusterGKMCache`, and the CSI plugin's
//! [`CacheResolver`] on top of it: publishes resolve caches from memory, so a publish for a
//! known cache works while the API server is briefly unreachable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{info, warn};

use crate::api::{ClusterGKMCache, GKMCache};
use crate::csi::resolver::ResolveError;
use crate::csi::{CacheKey, CacheResolver, ResolvedCache};

/// Reflector stores of both cache kinds, fed by watches that retry with backoff.
#[derive(Clone)]
pub struct WatchResolver {
    namespaced: Store<GKMCache>,
    cluster: Store<ClusterGKMCache>,
    ready: Arc<AtomicBool>,
}

impl WatchResolver {
    /// Starts the watches on the current tokio runtime. The resolver is ready once both
    /// have listed everything once.
    pub fn start(client: kube::Client) -> Self {
        let (namespaced, ns_writer) = reflector::store();
        let (cluster, cl_writer) = reflector::store();
        let ns_stream = reflector::reflector(
            ns_writer,
            watcher(
                Api::<GKMCache>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();
        let cl_stream = reflector::reflector(
            cl_writer,
            watcher(
                Api::<ClusterGKMCache>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();
        tokio::spawn(ns_stream.for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "GKMCache watch (retrying)");
            }
            futures::future::ready(())
        }));
        tokio::spawn(cl_stream.for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "ClusterGKMCache watch (retrying)");
            }
            futures::future::ready(())
        }));
        let ready = Arc::new(AtomicBool::new(false));
        let (a, b, flag) = (namespaced.clone(), cluster.clone(), ready.clone());
        tokio::spawn(async move {
            if a.wait_until_ready().await.is_ok() && b.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
                info!(
                    namespaced = a.state().len(),
                    cluster = b.state().len(),
                    "cache watch synced"
                );
            }
        });
        Self {
            namespaced,
            cluster,
            ready,
        }
    }
}

impl CacheResolver for WatchResolver {
    async fn resolve(&self, key: &CacheKey) -> Result<Option<ResolvedCache>, ResolveError> {
        if !self.ready() {
            return Err(ResolveError("the cache watch has not synced yet".into()));
        }
        Ok(match key {
            CacheKey::Namespaced { namespace, name } => self
                .namespaced
                .get(&ObjectRef::new(name).within(namespace))
                .and_then(|c| ResolvedCache::from_namespaced(&c)),
            CacheKey::Cluster { name } => self
                .cluster
                .get(&ObjectRef::new(name))
                .and_then(|c| ResolvedCache::from_cluster(&c)),
        })
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}
