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

use super::status::Scope;
use crate::api::CacheRef;
use crate::api::{ClusterGKMCache, GKMCache};
use crate::csi::resolver::ResolveError;
use crate::csi::{CacheResolver, ResolvedCache};

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
        Self::start_notifying(client, |_| {})
    }

    /// [`WatchResolver::start`], calling `changed` with the scope of every cache that is
    /// listed, added, changed or deleted.
    pub fn start_notifying(
        client: kube::Client,
        changed: impl Fn(Scope) + Send + Sync + 'static,
    ) -> Self {
        let changed = Arc::new(changed);
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
        .modify(trim)
        .touched_objects();
        let cl_stream = reflector::reflector(
            cl_writer,
            watcher(
                Api::<ClusterGKMCache>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .modify(trim)
        .touched_objects();
        let tell = changed.clone();
        tokio::spawn(ns_stream.for_each(move |r| {
            match r {
                Ok(c) => {
                    if let Some(ns) = c.metadata.namespace {
                        tell(Scope::Namespace(ns));
                    }
                }
                Err(e) => warn!(error = %e, "GKMCache watch (retrying)"),
            }
            futures::future::ready(())
        }));
        tokio::spawn(cl_stream.for_each(move |r| {
            match r {
                Ok(_) => changed(Scope::Cluster),
                Err(e) => warn!(error = %e, "ClusterGKMCache watch (retrying)"),
            }
            futures::future::ready(())
        }));
        let ready = Arc::new(AtomicBool::new(false));
        let (a, b, flag) = (namespaced.clone(), cluster.clone(), ready.clone());
        tokio::spawn(async move {
            if a.wait_until_ready().await.is_ok() && b.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
                // The initial lists were the biggest allocation burst the agent makes.
                super::memory::trim();
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

/// Drops what the agent never reads before an object enters the watch cache: with
/// thousands of caches, managed fields, other annotations (kubectl's last-applied copy),
/// labels, legacy spec fields and status beyond the promoted digest are most of the
/// memory the cache would hold.
fn trim<K: kube::Resource + crate::api::Cache>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k == crate::api::RESOLVED_DIGEST_ANNOTATION);
    }
    *obj.legacy_mut() = Default::default();
    if let Some(s) = obj.status_mut() {
        *s = crate::api::CacheStatus {
            resolved_digest: s.resolved_digest.take(),
            ..Default::default()
        };
    }
}

impl WatchResolver {
    /// Every cache of `scope` in the watch cache.
    pub fn caches_in(&self, scope: &Scope) -> Vec<ResolvedCache> {
        match scope {
            Scope::Cluster => self
                .cluster
                .state()
                .iter()
                .filter_map(|c| ResolvedCache::from_cluster(c))
                .collect(),
            Scope::Namespace(ns) => self
                .namespaced
                .state()
                .iter()
                .filter(|c| c.metadata.namespace.as_deref() == Some(ns))
                .filter_map(|c| ResolvedCache::from_namespaced(c))
                .collect(),
        }
    }

    /// Every cache of both kinds.
    pub fn all_caches(&self) -> Vec<ResolvedCache> {
        let mut all: Vec<ResolvedCache> = self
            .namespaced
            .state()
            .iter()
            .filter_map(|c| ResolvedCache::from_namespaced(c))
            .collect();
        all.extend(
            self.cluster
                .state()
                .iter()
                .filter_map(|c| ResolvedCache::from_cluster(c)),
        );
        all
    }

    /// A reference to the cache object `key` names, for Events.
    pub fn object_ref(
        &self,
        key: &CacheRef,
    ) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
        use kube::Resource;
        match key {
            CacheRef::Namespaced { namespace, name } => self
                .namespaced
                .get(&ObjectRef::new(name).within(namespace))
                .map(|c| c.object_ref(&())),
            CacheRef::Cluster { name } => self
                .cluster
                .get(&ObjectRef::new(name))
                .map(|c| c.object_ref(&())),
        }
    }
}

impl CacheResolver for WatchResolver {
    async fn resolve(&self, key: &CacheRef) -> Result<Option<ResolvedCache>, ResolveError> {
        if !self.ready() {
            return Err(ResolveError("the cache watch has not synced yet".into()));
        }
        Ok(match key {
            CacheRef::Namespaced { namespace, name } => self
                .namespaced
                .get(&ObjectRef::new(name).within(namespace))
                .and_then(|c| ResolvedCache::from_namespaced(&c)),
            CacheRef::Cluster { name } => self
                .cluster
                .get(&ObjectRef::new(name))
                .and_then(|c| ResolvedCache::from_cluster(&c)),
        })
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The agent's watch of the pods on its node (`spec.nodeName` = the node), trimmed to
/// what the CSI plugin needs to learn where a pod mounts its volume: the pod's identity,
/// its volumes' CSI drivers, and its containers' `volumeMounts`. Serves
/// [`crate::csi::PodSource`].
#[derive(Clone)]
pub struct PodWatch {
    pods: Store<k8s_openapi::api::core::v1::Pod>,
    ready: Arc<AtomicBool>,
}

impl PodWatch {
    /// Starts the watch on the current tokio runtime.
    pub fn start(client: kube::Client, node: &str) -> Self {
        use k8s_openapi::api::core::v1::Pod;
        let (pods, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let stream = reflector::reflector(writer, watcher(Api::<Pod>::all(client), cfg))
            .default_backoff()
            .modify(trim_pod)
            .touched_objects();
        tokio::spawn(stream.for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "Pod watch (retrying)");
            }
            futures::future::ready(())
        }));
        let ready = Arc::new(AtomicBool::new(false));
        let (store, flag) = (pods.clone(), ready.clone());
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
                info!(pods = store.state().len(), "pod watch synced");
            }
        });
        Self { pods, ready }
    }
}

/// Keeps of a pod only what [`crate::csi::pods::PodMounts`] reads: a node runs a few
/// hundred pods at most, but their specs (environment, probes, resources) are large.
fn trim_pod(pod: &mut k8s_openapi::api::core::v1::Pod) {
    use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.annotations = None;
    meta.owner_references = None;
    pod.status = None;
    let Some(spec) = pod.spec.take() else { return };
    let keep = |c: Container| Container {
        name: c.name,
        volume_mounts: c.volume_mounts,
        ..Default::default()
    };
    pod.spec = Some(PodSpec {
        containers: spec.containers.into_iter().map(keep).collect(),
        init_containers: spec
            .init_containers
            .map(|cs| cs.into_iter().map(keep).collect()),
        volumes: spec.volumes.map(|vs| {
            vs.into_iter()
                .map(|v| Volume {
                    name: v.name,
                    csi: v.csi.map(|c| k8s_openapi::api::core::v1::CSIVolumeSource {
                        driver: c.driver,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect()
        }),
        node_name: spec.node_name,
        ..Default::default()
    });
}

impl crate::csi::PodSource for PodWatch {
    fn lookup<'a>(
        &'a self,
        pod: &'a crate::csi::PodRef,
    ) -> futures::future::BoxFuture<'a, Result<Option<crate::csi::PodMounts>, String>> {
        Box::pin(async move {
            if !self.ready.load(Ordering::Relaxed) {
                return Err("the agent's pod watch has not synced yet".into());
            }
            Ok(self
                .pods
                .get(&ObjectRef::new(&pod.name).within(&pod.namespace))
                .map(|p| crate::csi::PodMounts::from_pod(&p)))
        })
    }
}
