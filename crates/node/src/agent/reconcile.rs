//! The agent's control loop. The objects it owns are this node's `ClusterGKMCacheNode` and
//! its `GKMCacheNode` in each namespace with caches; each is reconciled on its own
//! ([`Scope`]) when something it depends on changes: a cache of its scope (watch event),
//! a volume of one of its caches (CSI publish or unpublish), or a digest one of its caches
//! names (a pull finished). There is no periodic list-everything loop; failures are retried
//! per scope with exponential backoff.
//!
//! A reconcile reads the caches from the watch cache, starts the work a digest still
//! needs (reading its manifest and config for the GPU check, and extracting it under the
//! eager pull policy), computes the node object's status ([`super::status`]) and applies it
//! with server-side apply when it changed. The agent only ever acts on a cache's trusted
//! digest (the webhook's annotation, or the controller's promoted status), never on a tag.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::PullPolicy;
use super::status::{CacheView, Facts, Phase, Scope, desired_caches};
use super::watch::WatchResolver;
use crate::api::CacheRef;
use crate::api::{ClusterGKMCacheNode, GKMCacheNode, GpuInfo, NodeStatus};
use crate::csi::{CacheResolver, ResolvedCache, VolumeEvent};
use crate::gpu::Fitness;
use crate::metrics::{Metrics, global as metrics};
use crate::oci::{PinnedRef, Puller, parse_reference};
use crate::store::{Extracted, Store, StoreError, VolumeRecord};

/// Field manager of the agent's server-side applies.
pub const FIELD_MANAGER: &str = "gkm-agent";
/// Label on node objects naming their node (for `kubectl get -l`).
pub const NODE_LABEL: &str = "gkm.io/node";

/// Why a reconcile failed. Each variant has a short metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Store(_) => "store",
        }
    }

    fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Kube { what, source }
    }
}

/// Scopes waiting for a reconcile: each is queued at most once at a time.
#[derive(Clone)]
pub struct WorkQueue {
    tx: mpsc::UnboundedSender<Scope>,
    queued: Arc<Mutex<HashSet<Scope>>>,
}

impl WorkQueue {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Scope>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let q = WorkQueue {
            tx,
            queued: Arc::default(),
        };
        (q, rx)
    }

    pub fn add(&self, scope: Scope) {
        if self
            .queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(scope.clone())
        {
            let _ = self.tx.send(scope);
        }
    }

    pub fn add_after(&self, scope: Scope, delay: Duration) {
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(scope);
        });
    }

    /// Called as a scope is taken for a reconcile: changes from now on queue it again.
    fn taken(&self, scope: &Scope) {
        self.queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(scope);
    }
}

/// How the reconciler behaves.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub node: String,
    pub policy: PullPolicy,
    pub allow_unclaimed: bool,
    pub gc_interval: Duration,
    /// How often live volumes' private layers are scanned for compiled kernels.
    pub miss_scan_interval: Duration,
}

/// The two kinds of Kubernetes Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Everything a reconcile needs.
pub struct Context {
    cfg: LoopConfig,
    client: kube::Client,
    store: Arc<Store>,
    puller: Puller,
    caches: Arc<WatchResolver>,
    gpus: Vec<GpuInfo>,
    queue: WorkQueue,
    /// Wakes the GC loop (after an unpublish).
    pub gc_nudge: Notify,
    state: Mutex<LoopState>,
    /// Entries each live volume had compiled at its last scan (counted into metrics).
    misses: Mutex<HashMap<String, u64>>,
    /// This node's `Node` as the owner of the node objects, once it could be read.
    owner: Mutex<Owner>,
}

/// The node objects' owner: this node's `Node`, so Kubernetes' garbage collector removes
/// them with it. Read lazily and retried until the Node exists (an agent may start before
/// its kubelet registered the Node); objects written before are adopted then.
#[derive(Default)]
struct Owner {
    reference: Option<OwnerReference>,
    /// Scopes whose object carries the reference.
    owned: HashSet<Scope>,
    /// Whether the Node's absence was logged already.
    warned: bool,
}

#[derive(Default)]
struct LoopState {
    /// What is known of each digest that is not simply "in the store".
    phases: HashMap<String, Phase>,
    /// Failed attempts per digest, for the retry backoff.
    attempts: HashMap<String, u32>,
    /// The status last applied per scope (`None`: known not to exist).
    written: HashMap<Scope, Option<NodeStatus>>,
    /// The last Event reason per cache and digest, so each transition is told once.
    told: HashMap<(CacheRef, String), &'static str>,
}

impl Context {
    pub fn new(
        cfg: LoopConfig,
        client: kube::Client,
        store: Arc<Store>,
        puller: Puller,
        caches: Arc<WatchResolver>,
        gpus: Vec<GpuInfo>,
        queue: WorkQueue,
    ) -> Self {
        Context {
            cfg,
            client,
            store,
            puller,
            caches,
            gpus,
            queue,
            gc_nudge: Notify::new(),
            state: Mutex::default(),
            misses: Mutex::default(),
            owner: Mutex::default(),
        }
    }

    /// The owner reference to this node's `Node`, reading the Node when it is not known
    /// yet. `None` while there is no such Node (a simulated node name, or kubelet has not
    /// registered it yet) or it cannot be read.
    async fn owner(&self) -> Option<OwnerReference> {
        if let Some(r) = self
            .owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reference
            .clone()
        {
            return Some(r);
        }
        use k8s_openapi::api::core::v1::Node;
        use kube::Resource;
        let node = &self.cfg.node;
        let found = match Api::<Node>::all(self.client.clone()).get_opt(node).await {
            Ok(Some(n)) => n.controller_owner_ref(&()).map(|mut r| {
                // Owned, not controlled: the Node's controller is not GKM's.
                r.controller = None;
                r.block_owner_deletion = None;
                r
            }),
            Ok(None) => None,
            Err(e) => {
                debug!(node, error = %e, "cannot read this Node");
                None
            }
        };
        let mut o = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        match &found {
            Some(_) => info!(node, "node objects are owned by this Node from now on"),
            None if !o.warned => {
                o.warned = true;
                warn!(
                    node,
                    "no Node object of this name yet: node objects are not owned by it (and not removed with it) until it appears"
                );
            }
            None => {}
        }
        o.reference = found.clone();
        found
    }

    /// Whether `scope`'s object still lacks the owner reference.
    fn unowned(&self, scope: &Scope) -> bool {
        !self
            .owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .owned
            .contains(scope)
    }

    /// What the CSI plugin reports of a volume: counts it, queues its cache's node object,
    /// wakes the GC after an unpublish, and tells the pod's owner (Events) what they should
    /// know: a volume that will miss, and kernels a pod compiled.
    pub fn volume_event(self: &Arc<Self>, event: &VolumeEvent) {
        let rec = event.record();
        if let Some(key) = rec.cache_key() {
            self.queue.add(Scope::of(&key));
        }
        let m = metrics();
        match event {
            VolumeEvent::Published(_) => Metrics::per_cache(&m.pods_served, &rec.cache_id(), 1),
            VolumeEvent::Unpublished { compiled, why, .. } => {
                let counted = self
                    .misses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&rec.volume_id)
                    .unwrap_or(0);
                let delta = compiled.entries().saturating_sub(counted);
                Metrics::per_cache(&m.kernels_compiled, &rec.cache_id(), delta);
                if let Some(why) = why.clone().filter(|_| delta > 0) {
                    let (ctx, rec) = (self.clone(), rec.clone());
                    tokio::spawn(async move { ctx.tell_miss(&rec, why).await });
                }
                self.gc_nudge.notify_one();
            }
            VolumeEvent::Warning {
                reason, message, ..
            } => {
                let (ctx, rec, reason, message) =
                    (self.clone(), rec.clone(), *reason, message.clone());
                tokio::spawn(async move {
                    let pod = pod_ref(&rec);
                    ctx.post_event(pod, reason, EventType::Warning, truncate(message, 1000))
                        .await;
                });
            }
        }
    }

    /// Scans each live writable volume's private layer; what grew since the last scan is
    /// counted, reported on the cache as a Warning Event, and shown in node status.
    pub async fn scan_misses(self: &Arc<Self>) {
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            store
                .volumes()
                .into_iter()
                .filter(|r| r.mount.writable())
                .filter_map(|r| {
                    let upper = store.volume_dirs(&r.volume_id).upper;
                    let c = crate::kernel_cache::misses::scan(&upper).ok()?;
                    let why = crate::csi::explain_compiled(&store, &r, &c);
                    Some((r, c.entries(), why))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (rec, entries, why) in found {
            let grew = {
                let mut seen = self.misses.lock().unwrap_or_else(|e| e.into_inner());
                let before = seen.insert(rec.volume_id.clone(), entries).unwrap_or(0);
                entries.saturating_sub(before)
            };
            if grew == 0 {
                continue;
            }
            Metrics::per_cache(&metrics().kernels_compiled, &rec.cache_id(), grew);
            if let Some(key) = rec.cache_key() {
                self.queue.add(Scope::of(&key));
            }
            if let Some(why) = why {
                self.tell_miss(&rec, format!("{why} (so far; the pod still runs)"))
                    .await;
            }
        }
    }

    /// Entries live volumes of `cache_id` and `digest` compiled so far (last scan).
    fn live_misses(&self, cache_id: &str, digest: &str) -> u64 {
        let seen = self.misses.lock().unwrap_or_else(|e| e.into_inner());
        self.store
            .volumes()
            .iter()
            .filter(|v| v.cache_id() == cache_id && v.digest == digest)
            .map(|v| seen.get(&v.volume_id).copied().unwrap_or(0))
            .sum()
    }

    /// A Warning Event on the cache (and this node's object of its scope) about kernels a
    /// pod of `rec` compiled.
    async fn tell_miss(&self, rec: &VolumeRecord, why: String) {
        let Some(key) = rec.cache_key() else { return };
        let note = truncate(format!("node {}: {why}", self.cfg.node), 1000);
        let node = self.node_object_ref(&Scope::of(&key));
        self.post_event(
            node,
            crate::csi::reasons::KERNELS_COMPILED,
            EventType::Warning,
            format!("{key}: {note}"),
        )
        .await;
        if let Some(cache) = self.caches.object_ref(&key) {
            self.post_event(
                cache,
                crate::csi::reasons::KERNELS_COMPILED,
                EventType::Warning,
                note,
            )
            .await;
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LoopState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the scopes whose status depends on `digest`.
    fn requeue_digest(&self, digest: &str) {
        let mut scopes: HashSet<Scope> = self
            .caches
            .all_caches()
            .iter()
            .filter(|c| c.digest.as_deref() == Some(digest))
            .map(|c| Scope::of(&c.key))
            .collect();
        scopes.extend(
            self.store
                .volumes()
                .iter()
                .filter(|v| v.digest == digest)
                .filter_map(|v| v.cache_key().map(|k| Scope::of(&k))),
        );
        for s in scopes {
            self.queue.add(s);
        }
    }

    /// What is known of `digest`: the store first (extracted is final), then the work in
    /// flight or done.
    fn phase(&self, digest: &str) -> Result<Option<Phase>, Error> {
        if let Some(e) = self.store.get(digest)? {
            let fit = Fitness::of(
                e.meta.image.summary_label(),
                &self.gpus,
                self.cfg.allow_unclaimed,
            );
            return Ok(Some(match fit {
                Ok(fit) => Phase::Extracted {
                    size_bytes: e.meta.size_bytes,
                    fit,
                },
                Err(err) => Phase::Failed(err.to_string()),
            }));
        }
        Ok(self.state().phases.get(digest).cloned())
    }

    /// Starts the work `cache`'s digest still needs, unless it is under way or done.
    /// A cache that names pull secrets is left to the first publish on this node, under
    /// either policy: the controller hands a node its credentials only for a pod there
    /// that mounts it.
    fn start_work(self: &Arc<Self>, cache: &ResolvedCache, digest: &str) {
        if !cache.image_pull_secrets.is_empty() {
            return;
        }
        {
            let mut st = self.state();
            match st.phases.get(digest) {
                Some(Phase::Pulling | Phase::Inspected(_) | Phase::Failed(_)) => return,
                // Extracted once, collected since: a cache wants it again.
                Some(Phase::Extracted { .. } | Phase::Pending) | None => {}
            }
            st.phases.insert(digest.to_string(), Phase::Pulling);
        }
        let (ctx, image, digest) = (self.clone(), cache.image.clone(), digest.to_string());
        let span = info_span!("prepare", cache = %cache.key, digest = %digest);
        tokio::spawn(async move { ctx.prepare(&image, &digest).await }.instrument(span));
    }

    /// Pulls and extracts `image` into the store (its progress shows in the node status
    /// through [`Context::watch_pulls`]).
    async fn pull(self: &Arc<Self>, image: &PinnedRef) -> Result<Extracted, StoreError> {
        self.store.ensure(image, &self.puller).await
    }

    /// Reconciles the scopes of every digest being pulled, whoever started the pull (this
    /// loop, or a publish under the on-demand policy), every [`PULL_STATUS_INTERVAL`], so
    /// `pulledBytes` moves; and once more when a pull has ended. Runs until dropped.
    pub async fn watch_pulls(self: Arc<Self>) {
        let mut before: HashSet<String> = HashSet::new();
        loop {
            tokio::time::sleep(PULL_STATUS_INTERVAL).await;
            let now: HashSet<String> = self.store.pulling().into_iter().collect();
            for digest in now.union(&before) {
                self.requeue_digest(digest);
            }
            before = now;
        }
    }

    /// Reads the digest's manifest and config, judges it against the node's GPUs, and
    /// extracts it when the policy says so. Failures are retried with backoff.
    async fn prepare(self: Arc<Self>, image: &str, digest: &str) {
        let result: Result<Phase, String> = async {
            let reference = parse_reference(image).map_err(|e| format!("image {image}: {e}"))?;
            let pinned = PinnedRef::new(&reference, digest).map_err(|e| e.to_string())?;
            let info = self
                .puller
                .resolve(&pinned)
                .await
                .map_err(|e| e.to_string())?;
            let fit = Fitness::of(info.summary_label(), &self.gpus, self.cfg.allow_unclaimed)
                .map_err(|e| e.to_string())?;
            if fit.usable && self.cfg.policy == PullPolicy::Eager {
                let e = self.pull(&pinned).await.map_err(|e| e.to_string())?;
                return Ok(Phase::Extracted {
                    size_bytes: e.meta.size_bytes,
                    fit,
                });
            }
            Ok(Phase::Inspected(fit))
        }
        .await;
        let retry = {
            let mut st = self.state();
            match result {
                Ok(phase) => {
                    info!(?phase, "prepared");
                    st.attempts.remove(digest);
                    st.phases.insert(digest.to_string(), phase);
                    None
                }
                Err(reason) => {
                    let n = st.attempts.entry(digest.to_string()).or_insert(0);
                    *n += 1;
                    let delay = backoff(*n);
                    warn!(%reason, attempt = *n, retry_in = ?delay, "preparing the digest failed");
                    st.phases
                        .insert(digest.to_string(), Phase::Failed(reason.clone()));
                    Some(delay)
                }
            }
        };
        self.requeue_digest(digest);
        if let Some(delay) = retry {
            tokio::time::sleep(delay).await;
            let mut st = self.state();
            if matches!(st.phases.get(digest), Some(Phase::Failed(_))) {
                st.phases.remove(digest);
            }
            drop(st);
            self.requeue_digest(digest);
        }
    }

    /// Publishes an Event on `key`'s cache, once per (cache, digest, reason). Warnings go
    /// on this node's object of the cache's scope too: they are about this node (its GPUs,
    /// its pulls), and there they are not mixed with every other node's reports.
    async fn tell(
        &self,
        key: &CacheRef,
        digest: &str,
        reason: &'static str,
        type_: EventType,
        note: String,
    ) {
        {
            let mut st = self.state();
            let k = (key.clone(), digest.to_string());
            if st.told.get(&k) == Some(&reason) {
                return;
            }
            st.told.insert(k, reason);
        }
        let Some(cache) = self.caches.object_ref(key) else {
            return;
        };
        let note = truncate(note, 1000);
        if type_ == EventType::Warning {
            let node = self.node_object_ref(&Scope::of(key));
            self.post_event(node, reason, type_, format!("{key}: {note}"))
                .await;
        }
        self.post_event(cache, reason, type_, note).await;
    }

    /// A reference to this node's object of `scope`.
    fn node_object_ref(&self, scope: &Scope) -> k8s_openapi::api::core::v1::ObjectReference {
        use kube::Resource;
        let (kind, namespace) = match scope {
            Scope::Cluster => (ClusterGKMCacheNode::kind(&()), None),
            Scope::Namespace(ns) => (GKMCacheNode::kind(&()), Some(ns.clone())),
        };
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(GKMCacheNode::api_version(&()).into()),
            kind: Some(kind.into()),
            name: Some(self.cfg.node.clone()),
            namespace,
            ..Default::default()
        }
    }

    /// Creates one Event about `regarding` (in its namespace; `default` for cluster-scoped
    /// objects, as kubectl looks for them there). Created directly, not through kube's
    /// Recorder: each is told once, so there is no series to aggregate, and the Recorder
    /// would keep a copy of every Event it sent for minutes.
    async fn post_event(
        &self,
        regarding: k8s_openapi::api::core::v1::ObjectReference,
        reason: &'static str,
        type_: EventType,
        note: String,
    ) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let ns = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let event = k8s_openapi::api::events::v1::Event {
            metadata: kube::api::ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(FIELD_MANAGER),
                    now.as_nanosecond()
                )),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            event_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                now,
            )),
            action: Some("Reconcile".into()),
            reason: Some(reason.into()),
            note: Some(note),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(FIELD_MANAGER.into()),
            reporting_instance: Some(self.cfg.node.clone()),
            type_: Some(type_.as_str().into()),
            ..Default::default()
        };
        let api = Api::<k8s_openapi::api::events::v1::Event>::namespaced(self.client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            warn!(
                kind = regarding.kind.as_deref().unwrap_or(""),
                name = regarding.name.as_deref().unwrap_or(""),
                error = %e,
                "publishing an Event"
            );
        }
    }

    /// The status last applied for `scope`, reading it from the API server the first time
    /// (so a restarted agent keeps the `lastUpdated` of unchanged entries).
    async fn previous(&self, scope: &Scope) -> Result<Option<NodeStatus>, Error> {
        if let Some(w) = self.state().written.get(scope) {
            return Ok(w.clone());
        }
        let node = &self.cfg.node;
        let found = match scope {
            Scope::Cluster => Api::<ClusterGKMCacheNode>::all(self.client.clone())
                .get_opt(node)
                .await
                .map(|o| o.map(|o| o.status.unwrap_or_default())),
            Scope::Namespace(ns) => Api::<GKMCacheNode>::namespaced(self.client.clone(), ns)
                .get_opt(node)
                .await
                .map(|o| o.map(|o| o.status.unwrap_or_default())),
        }
        .map_err(Error::kube(format!("reading {scope} {node}")))?;
        self.state().written.insert(scope.clone(), found.clone());
        Ok(found)
    }
}

/// A reference to the pod of a volume, for Events.
fn pod_ref(rec: &VolumeRecord) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(rec.pod_name.clone()),
        namespace: Some(rec.pod_namespace.clone()),
        uid: (!rec.pod_uid.is_empty()).then(|| rec.pod_uid.clone()),
        ..Default::default()
    }
}

/// 1 s, 2 s, 4 s, … up to 5 minutes.
/// How often the node status shows a running pull's progress.
pub const PULL_STATUS_INTERVAL: Duration = Duration::from_secs(5);

fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(8)).min(Duration::from_secs(300))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What a reconcile of one scope sees, gathered by [`observe`], with no decision in it.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The caches of the scope, from the watch cache.
    pub caches: Vec<ResolvedCache>,
    /// The published volumes of the scope's caches.
    pub volumes: Vec<VolumeRecord>,
    /// What this node knows of each digest the caches and volumes name; a digest absent
    /// here has had no work yet.
    pub phases: HashMap<String, Phase>,
    pub facts: Facts,
    /// The node object's status as last written (or read at start).
    pub previous: Option<NodeStatus>,
    /// The owner reference to this node's Node, when the object still lacks it and the
    /// Node is known.
    pub owner: Option<OwnerReference>,
}

/// An Event a reconcile posts on a cache (and, for warnings, on the node object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub cache: CacheRef,
    /// Empty when the Event is about the cache, not one of its digests.
    pub digest: String,
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
}

/// What happens to the node object.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Nothing changed.
    Keep,
    /// No cache or volume is left in a namespace: the object goes.
    Delete,
    /// Server-side apply of `status`, with the object's labels and owner when `metadata`.
    Apply { status: NodeStatus, metadata: bool },
}

/// What a reconcile does: work to start, Events to post, the write. [`plan`] makes it from
/// an [`Observed`] alone, so it is unit-tested without a cluster (as kube-rs's
/// controller-rs separates its reconciler's decisions from their effects).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Digests that need their work started (inspect, or pull under the eager policy),
    /// with the cache that names them.
    pub start: Vec<(CacheRef, String)>,
    pub events: Vec<PlannedEvent>,
    pub write: Write,
}

/// Gathers what a reconcile of `scope` needs: the caches, the volumes, what the node knows
/// of each digest, pod usage and labels, the last status, the owner reference.
pub async fn observe(scope: &Scope, ctx: &Arc<Context>) -> Result<Observed, Error> {
    let caches = ctx.caches.caches_in(scope);
    let volumes: Vec<VolumeRecord> = ctx
        .store
        .volumes()
        .into_iter()
        .filter(|v| v.cache_key().map(|k| Scope::of(&k)).as_ref() == Some(scope))
        .collect();
    let mut phases = HashMap::new();
    let digests = caches
        .iter()
        .filter_map(|c| c.digest.as_ref())
        .chain(volumes.iter().map(|v| &v.digest));
    for d in digests {
        if !phases.contains_key(d)
            && let Some(p) = ctx.phase(d)?
        {
            phases.insert(d.clone(), p);
        }
    }

    let mut facts = Facts::default();
    let digests_of = |key: &CacheRef| -> Vec<String> {
        let mut ds: Vec<String> = volumes
            .iter()
            .filter(|v| v.cache_key().as_ref() == Some(key))
            .map(|v| v.digest.clone())
            .collect();
        ds.extend(
            caches
                .iter()
                .filter(|c| c.key == *key)
                .filter_map(|c| c.digest.clone()),
        );
        ds.sort();
        ds.dedup();
        ds
    };
    for c in &caches {
        let id = format!("{}/{}/{}", c.key.kind(), c.key.namespace(), c.key.name());
        for digest in digests_of(&c.key) {
            let live = ctx.live_misses(&id, &digest);
            let mut u = ctx.store.usage(&id, &digest).unwrap_or_default();
            u.kernels_compiled += live;
            facts
                .usage
                .insert((c.key.name().to_string(), digest.clone()), u);
            if let Some(p) = ctx.store.pull_progress(&digest) {
                facts.pulls.insert(digest.clone(), p);
            }
            if let Some(e) = ctx.store.get(&digest)? {
                facts.labels.insert(digest, e.meta.image.cache_labels());
            }
        }
    }
    let previous = ctx.previous(scope).await?;
    let owner = if ctx.unowned(scope) {
        ctx.owner().await
    } else {
        None
    };
    Ok(Observed {
        caches,
        volumes,
        phases,
        facts,
        previous,
        owner,
    })
}

/// Decides what a reconcile of `scope` on `node` (with `gpus`) does about what it saw.
pub fn plan(scope: &Scope, node: &str, gpus: &[GpuInfo], seen: &Observed, now: &Time) -> Plan {
    let mut start = Vec::new();
    let mut events = Vec::new();
    let mut phases = seen.phases.clone();
    let mut views = Vec::with_capacity(seen.caches.len());
    for c in &seen.caches {
        views.push(CacheView {
            name: c.key.name().to_string(),
            digest: c.digest.clone(),
        });
        let Some(digest) = &c.digest else {
            events.push(PlannedEvent {
                cache: c.key.clone(),
                digest: String::new(),
                reason: "NotVerified",
                warning: true,
                note: format!(
                    "node {node}: the cache has no gkm.io/resolvedDigest annotation (the GKM webhook has not verified {}), so this node ignores it",
                    c.image
                ),
            });
            continue;
        };
        if !phases.contains_key(digest) {
            start.push((c.key.clone(), digest.clone()));
            phases.insert(digest.clone(), Phase::Pulling);
        }
    }
    let volumes: Vec<&VolumeRecord> = seen.volumes.iter().collect();
    let status = NodeStatus {
        node_name: node.to_string(),
        gpus: gpus.to_vec(),
        caches: desired_caches(
            &views,
            &phases,
            &volumes,
            &seen.facts,
            &seen
                .previous
                .as_ref()
                .map(|p| p.caches.clone())
                .unwrap_or_default(),
            now,
        ),
    };
    for c in &seen.caches {
        let Some(digest) = &c.digest else { continue };
        let Some(e) = status.caches.get(c.key.name()).and_then(|m| m.get(digest)) else {
            continue;
        };
        use crate::api::CacheState::*;
        let (reason, warning, note) = match e.state {
            Extracted => (
                "Extracted",
                false,
                format!(
                    "node {node}: {digest} extracted ({} bytes); compatible GPUs: {:?}",
                    e.size_bytes.unwrap_or(0),
                    e.compatible_gpus
                ),
            ),
            Incompatible => (
                "Incompatible",
                true,
                format!(
                    "node {node}: no GPU can use {digest}: {}",
                    e.reasons.join("; ")
                ),
            ),
            Error => (
                "PullFailed",
                true,
                format!("node {node}: {digest}: {}", e.reasons.join("; ")),
            ),
            _ => continue,
        };
        events.push(PlannedEvent {
            cache: c.key.clone(),
            digest: digest.clone(),
            reason,
            warning,
            note,
        });
    }
    let wanted = !seen.caches.is_empty() || !seen.volumes.is_empty() || *scope == Scope::Cluster;
    let write = if !wanted {
        if seen.previous.is_some() {
            Write::Delete
        } else {
            Write::Keep
        }
    } else {
        // The object's metadata is applied when it is created, and once more when the
        // Node becomes known (adopting an object created before).
        let metadata = seen.previous.is_none() || seen.owner.is_some();
        if seen.previous.as_ref() == Some(&status) && !metadata {
            Write::Keep
        } else {
            Write::Apply { status, metadata }
        }
    };
    Plan {
        start,
        events,
        write,
    }
}

/// Brings one node object in line with the caches of its scope and this node's state:
/// [`observe`], [`plan`], then carry the plan out.
pub async fn reconcile(scope: &Scope, ctx: &Arc<Context>) -> Result<(), Error> {
    let seen = observe(scope, ctx).await?;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let plan = plan(scope, &ctx.cfg.node, &ctx.gpus, &seen, &now);
    apply(scope, ctx, &seen, plan).await
}

/// Carries out `plan`: starts the work, posts the Events, writes the node object.
async fn apply(
    scope: &Scope,
    ctx: &Arc<Context>,
    seen: &Observed,
    plan: Plan,
) -> Result<(), Error> {
    for (key, digest) in &plan.start {
        if let Some(c) = seen.caches.iter().find(|c| c.key == *key) {
            ctx.start_work(c, digest);
        }
    }
    for e in plan.events {
        let type_ = if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.tell(&e.cache, &e.digest, e.reason, type_, e.note).await;
    }
    let node = &ctx.cfg.node;
    let (status, metadata) = match plan.write {
        Write::Keep => {
            debug!(%scope, "node status unchanged");
            return Ok(());
        }
        Write::Delete => {
            info!(%node, %scope, "no caches left in scope: deleting the node object");
            let dp = DeleteParams::default();
            let r = match scope {
                Scope::Namespace(ns) => Api::<GKMCacheNode>::namespaced(ctx.client.clone(), ns)
                    .delete(node, &dp)
                    .await
                    .map(|_| ()),
                Scope::Cluster => unreachable!("plan never deletes the cluster object"),
            };
            match r {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::kube(format!("deleting {scope} {node}"))(e)),
            }
            ctx.state().written.insert(scope.clone(), None);
            return Ok(());
        }
        Write::Apply { status, metadata } => (status, metadata),
    };
    let meta = metadata.then_some(seen.owner.as_ref());
    match scope {
        Scope::Cluster => {
            apply_status(
                &Api::<ClusterGKMCacheNode>::all(ctx.client.clone()),
                node,
                meta,
                &status,
            )
            .await
        }
        Scope::Namespace(ns) => {
            apply_status(
                &Api::<GKMCacheNode>::namespaced(ctx.client.clone(), ns),
                node,
                meta,
                &status,
            )
            .await
        }
    }
    .map_err(Error::kube(format!(
        "applying the status of {scope} {node}"
    )))?;
    if seen.owner.is_some() {
        ctx.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .owned
            .insert(scope.clone());
    }
    metrics().node_status_writes.inc();
    info!(%scope, caches = status.caches.len(), "node status applied");
    ctx.state().written.insert(scope.clone(), Some(status));
    Ok(())
}

/// Server-side applies a node object's status, applying its metadata first when `create`
/// is `Some` (owned by the given Node, if any; creating the object if it does not exist).
async fn apply_status<K>(
    api: &Api<K>,
    node: &str,
    create: Option<Option<&OwnerReference>>,
    status: &NodeStatus,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let (api_version, kind) = (K::api_version(&()), K::kind(&()));
    if let Some(owner) = create {
        let mut obj = serde_json::json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": { "name": node, "labels": { NODE_LABEL: node } },
            "spec": {},
        });
        if let Some(owner) = owner {
            obj["metadata"]["ownerReferences"] = serde_json::json!([owner]);
        }
        api.patch(node, &pp, &Patch::Apply(obj)).await?;
    }
    let patch = serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "status": status,
    });
    api.patch_status(node, &pp, &Patch::Apply(patch)).await?;
    Ok(())
}

/// Runs reconciles as scopes are queued, one at a time, until `shutdown` completes.
pub async fn run_loop(
    ctx: Arc<Context>,
    mut rx: mpsc::UnboundedReceiver<Scope>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut failures: HashMap<Scope, u32> = HashMap::new();
    let mut since_trim = 0;
    tokio::pin!(shutdown);
    loop {
        let scope = tokio::select! {
            _ = &mut shutdown => return,
            s = rx.recv() => match s { Some(s) => s, None => return },
        };
        ctx.queue.taken(&scope);
        if !ctx.caches.ready() {
            // Reconciling before the watch synced would drop the entries of caches not yet
            // listed: look again shortly.
            ctx.queue.add_after(scope, Duration::from_millis(200));
            continue;
        }
        let span = info_span!("reconcile", node = %ctx.cfg.node, scope = %scope);
        match reconcile(&scope, &ctx).instrument(span).await {
            Ok(()) => {
                failures.remove(&scope);
                Metrics::result(&metrics().reconciles, "ok");
            }
            Err(e) => {
                let n = failures.entry(scope.clone()).or_insert(0);
                *n += 1;
                let delay = backoff(*n);
                warn!(%scope, error = %e, retry_in = ?delay, "reconcile failed");
                Metrics::result(&metrics().reconciles, e.metric_label());
                ctx.queue.add_after(scope, delay);
            }
        }
        // A burst (the start, many caches changed at once) is over.
        since_trim += 1;
        if rx.is_empty() && since_trim >= 8 {
            super::memory::trim();
            since_trim = 0;
        }
    }
}

/// Collects unreferenced, unwanted digests every `gc_interval` and when nudged.
pub async fn gc_loop(ctx: Arc<Context>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctx.cfg.gc_interval) => {}
            _ = ctx.gc_nudge.notified() => {}
        }
        // Before the watch synced, every digest would look unwanted.
        if !ctx.caches.ready() {
            continue;
        }
        let wanted: HashSet<String> = ctx
            .caches
            .all_caches()
            .into_iter()
            .filter_map(|c| c.digest)
            .collect();
        match ctx.store.gc(&wanted).await {
            Ok(removed) => {
                let mut st = ctx.state();
                for d in &removed {
                    st.phases.remove(d);
                }
            }
            Err(e) => warn!(error = %e, "garbage collection"),
        }
        super::memory::trim();
    }
}

/// Until this node's `Node` can be read, looks for it every 10 s; when it appears, queues
/// every scope the agent wrote, so their objects are adopted.
pub async fn owner_loop(ctx: Arc<Context>) {
    loop {
        if ctx.owner().await.is_some() {
            let scopes: Vec<Scope> = ctx.state().written.keys().cloned().collect();
            for s in scopes {
                ctx.queue.add(s);
            }
            ctx.queue.add(Scope::Cluster);
            return;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Scans live volumes for compiled kernels every `miss_scan_interval`.
pub async fn miss_loop(ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(ctx.cfg.miss_scan_interval).await;
        ctx.scan_misses().await;
    }
}

/// Queues what a starting agent must look at: the cluster object, the scopes of the
/// volumes it published before, and the namespaces where it left node objects (their
/// caches may have gone while it was down).
pub async fn queue_startup_work(ctx: &Context) {
    ctx.queue.add(Scope::Cluster);
    for v in ctx.store.volumes() {
        if let Some(k) = v.cache_key() {
            ctx.queue.add(Scope::of(&k));
        }
    }
    let lp = ListParams::default().fields(&format!("metadata.name={}", ctx.cfg.node));
    match Api::<GKMCacheNode>::all(ctx.client.clone()).list(&lp).await {
        Ok(list) => {
            for o in list.items {
                if let Some(ns) = o.metadata.namespace {
                    ctx.queue.add(Scope::Namespace(ns));
                }
            }
        }
        Err(e) => warn!(error = %e, "listing this node's GKMCacheNode objects"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn cache(ns: &str, name: &str, digest: Option<&str>) -> ResolvedCache {
        ResolvedCache {
            key: CacheRef::Namespaced {
                namespace: ns.into(),
                name: name.into(),
            },
            image: format!("r.io/kernels/{name}:v1"),
            digest: digest.map(str::to_string),
            workload_namespaces: Vec::new(),
            image_pull_secrets: Vec::new(),
        }
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn ns() -> Scope {
        Scope::Namespace("ml".into())
    }

    #[test]
    fn a_cache_without_a_digest_is_told_and_gets_no_work() {
        let seen = Observed {
            caches: vec![cache("ml", "llama", None)],
            ..Default::default()
        };
        let p = plan(&ns(), "n1", &[], &seen, &at(1));
        assert!(p.start.is_empty());
        assert_eq!(p.events.len(), 1);
        let e = &p.events[0];
        assert_eq!((e.reason, e.warning), ("NotVerified", true));
        assert!(e.note.contains("r.io/kernels/llama:v1"), "{}", e.note);
        // The object is still written: the cache is in scope.
        assert!(matches!(p.write, Write::Apply { metadata: true, .. }));
    }

    #[test]
    fn a_new_digest_starts_its_work_once_and_shows_as_pulling() {
        let seen = Observed {
            caches: vec![cache("ml", "a", Some(D1)), cache("ml", "b", Some(D1))],
            ..Default::default()
        };
        let p = plan(&ns(), "n1", &[], &seen, &at(1));
        assert_eq!(
            p.start.len(),
            1,
            "one digest, one piece of work: {:?}",
            p.start
        );
        let Write::Apply { status, .. } = &p.write else {
            panic!("{:?}", p.write)
        };
        for name in ["a", "b"] {
            assert_eq!(
                status.caches[name][D1].state,
                crate::api::CacheState::Pulling
            );
        }
        // Known already: nothing to start.
        let seen = Observed {
            phases: [(D1.to_string(), Phase::Pulling)].into(),
            ..seen
        };
        assert!(plan(&ns(), "n1", &[], &seen, &at(1)).start.is_empty());
    }

    #[test]
    fn an_unchanged_status_is_kept_and_a_new_owner_rewrites_the_metadata() {
        let mut seen = Observed {
            caches: vec![cache("ml", "a", Some(D1))],
            phases: [(D1.to_string(), Phase::Pulling)].into(),
            ..Default::default()
        };
        let Write::Apply { status, metadata } = plan(&ns(), "n1", &[], &seen, &at(1)).write else {
            panic!()
        };
        assert!(metadata, "a new object gets its metadata");
        seen.previous = Some(status);
        assert_eq!(plan(&ns(), "n1", &[], &seen, &at(9)).write, Write::Keep);
        seen.owner = Some(OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "n1".into(),
            uid: "u".into(),
            ..Default::default()
        });
        assert!(matches!(
            plan(&ns(), "n1", &[], &seen, &at(9)).write,
            Write::Apply { metadata: true, .. }
        ));
    }

    #[test]
    fn an_empty_namespace_object_is_deleted_and_the_cluster_one_never() {
        let previous = NodeStatus {
            node_name: "n1".into(),
            ..Default::default()
        };
        let seen = Observed {
            previous: Some(previous),
            ..Default::default()
        };
        assert_eq!(plan(&ns(), "n1", &[], &seen, &at(1)).write, Write::Delete);
        assert_eq!(
            plan(&ns(), "n1", &[], &Observed::default(), &at(1)).write,
            Write::Keep,
            "nothing to delete"
        );
        // The cluster object stays (it carries the node's GPUs), unchanged here.
        assert_eq!(
            plan(&Scope::Cluster, "n1", &[], &seen, &at(1)).write,
            Write::Keep
        );
    }

    #[test]
    fn outcomes_are_told_normal_or_warning() {
        let seen = Observed {
            caches: vec![cache("ml", "ok", Some(D1)), cache("ml", "bad", Some(D2))],
            phases: [
                (
                    D1.to_string(),
                    Phase::Extracted {
                        size_bytes: 42,
                        fit: Fitness {
                            usable: true,
                            ..Default::default()
                        },
                    },
                ),
                (D2.to_string(), Phase::Failed("registry said 404".into())),
            ]
            .into(),
            ..Default::default()
        };
        let p = plan(&ns(), "n1", &[], &seen, &at(1));
        let told: Vec<(&str, bool)> = p.events.iter().map(|e| (e.reason, e.warning)).collect();
        assert_eq!(told, vec![("Extracted", false), ("PullFailed", true)]);
        assert!(
            p.events[1].note.contains("registry said 404"),
            "{:?}",
            p.events[1]
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), Duration::from_secs(256));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(256));
    }

    #[tokio::test]
    async fn a_scope_is_queued_once_until_taken() {
        let (q, mut rx) = WorkQueue::new();
        q.add(Scope::Cluster);
        q.add(Scope::Cluster);
        q.add(Scope::Namespace("a".into()));
        assert_eq!(rx.recv().await, Some(Scope::Cluster));
        assert_eq!(rx.recv().await, Some(Scope::Namespace("a".into())));
        assert!(rx.try_recv().is_err());
        q.taken(&Scope::Cluster);
        q.add(Scope::Cluster);
        assert_eq!(rx.recv().await, Some(Scope::Cluster));
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        let s = truncate("é".repeat(600), 1001);
        assert!(s.len() <= 1001);
        assert!(s.chars().all(|c| c == 'é'));
    }
}
