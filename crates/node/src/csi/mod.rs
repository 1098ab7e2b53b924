//! The CSI node plugin `csi.gkm.io`: Identity and Node services for inline ephemeral
//! volumes that mount a kernel cache into a pod.
//!
//! Publishing a volume: validate the request; if the volume is already published, check
//! its mount and finish what a crash may have left undone; otherwise resolve the cache to
//! its verified digest, check the pod's namespace may use it, extract the digest (bounded
//! in time; kubelet retries on UNAVAILABLE), check the node's GPUs against the cache's
//! targets, learn where the pod mounts the volume and build the path view that makes the
//! cache hit there, record the volume durably, and mount it: by default a private overlay
//! (the shared tree read-only below, the view above it, a writable layer of the volume's
//! own on top, so a miss compiles without crashing and without touching the shared tree),
//! or strictly read-only when asked. Unpublishing undoes it and counts what the pod
//! compiled. Every error maps to its gRPC code in one table ([`CsiError::code`]).

pub mod error;
pub mod mount;
pub mod pods;
pub mod resolver;
pub mod server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::{Instrument, info, info_span, warn};

pub use error::CsiError;
pub use mount::{
    KernelMounter, MountOwner, MountSpec, MountState, Mounter, RecordingMounter, UpperDirs,
};
pub use pods::{PodMounts, PodRef, PodSource, StaticPods};
pub use resolver::{ApiResolver, CacheResolver, ResolvedCache, StaticResolver};

use crate::api::{CacheRef, GpuInfo};
use crate::gpu::Fitness;
use crate::kernel_cache::MountBase;
use crate::kernel_cache::misses::{self, Compiled};
use crate::oci::{PinnedRef, Puller, parse_reference};
use crate::store::{Extracted, Store, StoreError, VolumeMount, VolumeRecord};

/// Generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

pub use crate::api::volume::{
    ATTR_CACHE, ATTR_CLUSTER_CACHE, ATTR_NAMESPACE, ATTR_WRITABLE, DRIVER_NAME,
    cache_ref_of_attributes,
};
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/plugins/csi.gkm.io/csi.sock";

/// Pod information kubelet adds because the CSIDriver sets `podInfoOnMount`.
pub const CTX_POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const CTX_POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const CTX_POD_UID: &str = "csi.storage.k8s.io/pod.uid";

/// How the plugin behaves.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// Kubernetes node name: the CSI node id.
    pub node_name: String,
    /// Longest a publish waits for an extraction before answering UNAVAILABLE (kubelet's
    /// call timeout is 2 minutes; the extraction goes on and the retry finds it done).
    pub publish_timeout: Duration,
    /// Whether caches without GPU targets (no `cache.*.image/summary` label) may be used.
    pub allow_unclaimed: bool,
    pub max_volumes_per_node: i64,
    /// Longest a publish waits for the pod to appear in the pod source (the agent's watch
    /// may see a new pod a moment after kubelet does).
    pub pod_wait: Duration,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            publish_timeout: Duration::from_secs(90),
            allow_unclaimed: true,
            max_volumes_per_node: 1024,
            pod_wait: Duration::from_secs(2),
        }
    }
}

/// A validated NodePublishVolume request.
#[derive(Clone, Debug)]
pub struct PublishRequest {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub cache: CacheRef,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// Strictly read-only: CSI's `readonly`, or `csi.gkm.io/writable: "false"`.
    pub read_only: bool,
}

impl PublishRequest {
    fn pod(&self) -> PodRef {
        PodRef {
            namespace: self.pod_namespace.clone(),
            name: self.pod_name.clone(),
            uid: self.pod_uid.clone(),
        }
    }
}

/// The plugin's state, shared by the Identity and Node services.
pub struct Plugin<R: CacheResolver, M: Mounter> {
    cfg: PluginConfig,
    store: Arc<Store>,
    puller: Puller,
    resolver: Arc<R>,
    mounter: M,
    gpus: RwLock<Vec<GpuInfo>>,
    busy: Mutex<HashSet<String>>,
    ready: AtomicBool,
    on_change: std::sync::OnceLock<VolumeListener>,
    pods: std::sync::OnceLock<Arc<dyn PodSource>>,
    /// Whether the store can hold a writable overlay layer, or why not.
    upper_layers: RwLock<Result<(), String>>,
    /// Where caches' pull credentials come from (none: caches naming pull secrets fail).
    credentials: Option<Arc<crate::pull_credentials::Broker>>,
    /// (cache, digest) pairs whose cache has shown it can read the digest itself.
    access: Mutex<HashMap<(CacheRef, String), Instant>>,
}

/// How long a cache's shown access to a privately pulled digest is trusted before it is
/// checked again with the registry.
pub const ACCESS_CHECK_TTL: Duration = Duration::from_secs(600);

/// What happened to a volume, for the agent: each publish and unpublish that changed
/// something (it reconciles that cache's node object and runs its GC), and what the pod's
/// owner should know (it becomes a Warning Event on the pod or the cache).
#[derive(Clone, Debug)]
pub enum VolumeEvent {
    Published(VolumeRecord),
    Unpublished {
        record: VolumeRecord,
        /// What the pod compiled into its private layer.
        compiled: Compiled,
        /// Why, in words, when it compiled anything.
        why: Option<String>,
    },
    /// A published volume will not hit for some or all of the pod's containers.
    Warning {
        record: VolumeRecord,
        /// A CamelCase Event reason.
        reason: &'static str,
        message: String,
    },
}

impl VolumeEvent {
    pub fn record(&self) -> &VolumeRecord {
        match self {
            VolumeEvent::Published(r) => r,
            VolumeEvent::Unpublished { record, .. } | VolumeEvent::Warning { record, .. } => record,
        }
    }
}

/// Told of every [`VolumeEvent`].
pub type VolumeListener = Box<dyn Fn(&VolumeEvent) + Send + Sync>;

/// Event reasons of [`VolumeEvent::Warning`].
pub mod reasons {
    /// The store's filesystem cannot hold a writable overlay layer: the volume is
    /// read-only.
    pub const READ_ONLY_FALLBACK: &str = "CacheReadOnly";
    /// Where the pod sees the volume is not (fully) known: some kernels will miss.
    pub const MOUNT_PATH: &str = "CacheMountPath";
    /// A pod compiled kernels the cache did not hold.
    pub const KERNELS_COMPILED: &str = "KernelsCompiled";
}

/// Marks a volume busy for the duration of one call.
struct VolumeGuard<'a> {
    busy: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for VolumeGuard<'_> {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl<R: CacheResolver, M: Mounter> Plugin<R, M> {
    pub fn new(
        cfg: PluginConfig,
        store: Arc<Store>,
        puller: Puller,
        resolver: Arc<R>,
        mounter: M,
        gpus: Vec<GpuInfo>,
    ) -> Self {
        Self {
            cfg,
            store,
            puller,
            resolver,
            mounter,
            gpus: RwLock::new(gpus),
            busy: Mutex::new(HashSet::new()),
            ready: AtomicBool::new(true),
            on_change: std::sync::OnceLock::new(),
            pods: std::sync::OnceLock::new(),
            upper_layers: RwLock::new(Ok(())),
            credentials: None,
            access: Mutex::default(),
        }
    }

    /// Lets publishes pull caches that name `imagePullSecrets`, with credentials asked of
    /// the controller through `broker`.
    pub fn with_credentials(mut self, broker: Arc<crate::pull_credentials::Broker>) -> Self {
        self.credentials = Some(broker);
        self
    }

    /// Sets the listener told of every volume event (once; later calls are ignored).
    pub fn on_volume_change(&self, listener: VolumeListener) {
        let _ = self.on_change.set(listener);
    }

    /// Sets where the plugin reads pods' mount paths (once; later calls are ignored).
    /// Without one, views are never built and every publish warns that the path is unknown.
    pub fn set_pod_source(&self, pods: Arc<dyn PodSource>) {
        let _ = self.pods.set(pods);
    }

    fn tell(&self, event: VolumeEvent) {
        if matches!(
            event,
            VolumeEvent::Published(_) | VolumeEvent::Unpublished { .. }
        ) {
            crate::metrics::global()
                .volumes
                .set(self.store.volumes().len() as i64);
        }
        if let Some(f) = self.on_change.get() {
            f(&event);
        }
    }

    /// Finds out, with a scratch overlay under the store root, whether the store's
    /// filesystem can hold a volume's writable layer (overlayfs refuses an upper layer on
    /// overlayfs itself, as on kind nodes, and on some network filesystems). Until this
    /// runs, writable layers are assumed to work. Returns the reason when they do not;
    /// volumes are then strictly read-only, each with a Warning Event.
    pub fn probe_upper_layers(&self) -> Result<(), String> {
        let result = self.try_upper_layer();
        if let Err(why) = &result {
            warn!(reason = %why, "volumes will be read-only");
        }
        *self.upper_layers.write().unwrap_or_else(|e| e.into_inner()) = result.clone();
        result
    }

    fn try_upper_layer(&self) -> Result<(), String> {
        let root = self.store.root().join("overlays");
        let dir = tempfile::Builder::new()
            .prefix(".probe-")
            .tempdir_in(&root)
            .map_err(|e| format!("creating a scratch directory in {}: {e}", root.display()))?;
        let p = |n: &str| {
            let p = dir.path().join(n);
            std::fs::create_dir(&p)
                .map(|()| p.clone())
                .map_err(|e| format!("creating {}: {e}", p.display()))
        };
        let (lower, upper, work, target) = (p("lower")?, p("upper")?, p("work")?, p("mnt")?);
        let spec = MountSpec::Overlay {
            lowers: vec![lower],
            upper: Some(UpperDirs { upper, work }),
        };
        self.mounter.mount(&spec, &target).map_err(|e| {
            format!(
                "the store {} cannot hold an overlay's writable layer ({e})",
                self.store.root().display()
            )
        })?;
        self.mounter
            .unmount(&target)
            .map_err(|e| format!("unmounting the probe {}: {e}", target.display()))
    }

    fn upper_layers(&self) -> Result<(), String> {
        self.upper_layers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config(&self) -> &PluginConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn mounter(&self) -> &M {
        &self.mounter
    }

    /// The node's GPU inventory.
    pub fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the node's GPU inventory (e.g. after a rescan).
    pub fn set_gpus(&self, gpus: Vec<GpuInfo>) {
        *self.gpus.write().unwrap_or_else(|e| e.into_inner()) = gpus;
    }

    /// Whether Probe reports ready: the store is open and the resolver can answer.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.resolver.ready()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn lock_volume(&self, id: &str) -> Result<VolumeGuard<'_>, CsiError> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(id.to_string()) {
            return Err(CsiError::Busy(id.to_string()));
        }
        Ok(VolumeGuard {
            busy: &self.busy,
            id: id.to_string(),
        })
    }

    /// NodePublishVolume after validation.
    pub async fn publish(&self, req: &PublishRequest) -> Result<(), CsiError> {
        let span = info_span!(
            "publish",
            volume_id = %req.volume_id,
            pod = %format!("{}/{}", req.pod_namespace, req.pod_name),
            cache = %req.cache,
            digest = tracing::field::Empty,
        );
        async {
            let _guard = self.lock_volume(&req.volume_id)?;
            if let Some(rec) = self.store.volume(&req.volume_id) {
                tracing::Span::current().record("digest", rec.digest.as_str());
                return self.republish(req, &rec).await;
            }

            // A new volume goes onto an empty directory, never over someone's mount.
            match self.target_owner(&req.target_path)? {
                MountOwner::Nobody => {}
                MountOwner::Gkm => {
                    return Err(CsiError::ForeignMount {
                        target: req.target_path.clone(),
                        what: "a GKM mount of no volume GKM knows of".into(),
                    });
                }
                MountOwner::Other(what) => {
                    return Err(CsiError::ForeignMount {
                        target: req.target_path.clone(),
                        what,
                    });
                }
            }
            let cache = self.lookup(&req.cache).await?;
            if !cache.allows_namespace(&req.pod_namespace) {
                let reason = match &req.cache {
                    CacheRef::Namespaced { namespace, .. } => format!(
                        "the cache is in namespace {namespace}, the pod in {}",
                        req.pod_namespace
                    ),
                    CacheRef::Cluster { .. } => format!(
                        "namespace {} is not in its workloadNamespaces {:?}",
                        req.pod_namespace, cache.workload_namespaces
                    ),
                };
                return Err(CsiError::Denied {
                    pod: format!("{}/{}", req.pod_namespace, req.pod_name),
                    kind: req.cache.kind(),
                    cache: req.cache.to_string(),
                    reason,
                });
            }
            let digest = cache.digest.clone().ok_or_else(|| CsiError::NotVerified {
                kind: req.cache.kind(),
                cache: req.cache.to_string(),
            })?;
            tracing::Span::current().record("digest", digest.as_str());

            let extracted = self.extract(&cache, &digest).await?;
            self.check_gpus(&req.cache, &extracted)?;

            let mut warnings = Vec::new();
            let writable = match (req.read_only, self.upper_layers()) {
                (true, _) => false,
                (false, Ok(())) => true,
                (false, Err(why)) => {
                    warnings.push((
                        reasons::READ_ONLY_FALLBACK,
                        format!(
                            "{why}: the volume is read-only, so a kernel the cache lacks fails to compile (EROFS)"
                        ),
                    ));
                    false
                }
            };
            let (base, path_warning) = self.mount_base(req).await;
            if let Some(w) = path_warning {
                warnings.push((reasons::MOUNT_PATH, w));
            }
            let view = match &base {
                Some(b) => self.view(&req.cache, &extracted, b, &req.volume_id).await?,
                None => None,
            };
            let mount = if writable || view.is_some() {
                VolumeMount::Overlay {
                    writable,
                    view,
                    base,
                }
            } else {
                VolumeMount::ReadOnlyBind
            };
            let rec = VolumeRecord {
                volume_id: req.volume_id.clone(),
                target_path: req.target_path.clone(),
                digest: digest.clone(),
                cache_kind: req.cache.kind().to_string(),
                cache_namespace: req.cache.namespace().to_string(),
                cache_name: req.cache.name().to_string(),
                pod_namespace: req.pod_namespace.clone(),
                pod_name: req.pod_name.clone(),
                pod_uid: req.pod_uid.clone(),
                mount,
            };
            // Durable before the mount: a restarted agent must know every mount it made.
            self.store
                .record_volume(&rec)
                .map_err(|e| CsiError::Records(Box::new(e)))?;
            if let Err(e) = self.mount(&rec, &extracted) {
                // kubelet sees the mount's error and retries; a record left behind names
                // no mount and is reconciled away at the next start, but say so.
                if let Err(undo) = self.store.remove_volume(&req.volume_id) {
                    warn!(error = %e, rollback_error = %undo, "publish failed and its record could not be removed; the next start reconciles it");
                }
                return Err(e);
            }
            self.store.count_served(&rec);
            info!(writable, view = ?rec_view(&rec), "published");
            self.tell(VolumeEvent::Published(rec.clone()));
            for (reason, message) in warnings {
                warn!(reason, %message, "volume published with a warning");
                self.tell(VolumeEvent::Warning {
                    record: rec.clone(),
                    reason,
                    message,
                });
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Where the pod sees the volume, and what the pod's owner should know when that is
    /// not (fully) known. Never fails: without a path the volume works and misses.
    async fn mount_base(&self, req: &PublishRequest) -> (Option<MountBase>, Option<String>) {
        let Some(source) = self.pods.get() else {
            return (
                None,
                Some("the agent does not watch pods, so it cannot tell where the pod mounts the volume: kernels the cache holds are compiled again".into()),
            );
        };
        let pod = req.pod();
        let deadline = tokio::time::Instant::now() + self.cfg.pod_wait;
        let found = loop {
            match source.lookup(&pod).await {
                Ok(Some(p)) if pod.uid.is_empty() || p.uid == pod.uid => break Ok(p),
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(_) => {
                    break Err(format!(
                        "pod {pod} (uid {}) is not in the agent's view of this node's pods after {:?}",
                        pod.uid, self.cfg.pod_wait
                    ));
                }
                Err(e) => break Err(e),
            }
        };
        match found {
            Ok(p) => {
                let volume = pods::volume_of_target(&req.target_path, &pod.uid);
                let d = pods::decide(&p, volume.as_deref());
                (d.base, d.warning)
            }
            Err(why) => (
                None,
                Some(format!(
                    "{why}: GKM cannot tell where the pod mounts the volume, so kernels the cache holds are compiled again"
                )),
            ),
        }
    }

    /// The path view of `extracted` for `base`, built off the async threads.
    async fn view(
        &self,
        cache: &CacheRef,
        extracted: &Extracted,
        base: &MountBase,
        volume_id: &str,
    ) -> Result<Option<PathBuf>, CsiError> {
        let (store, e, b, id) = (
            self.store.clone(),
            extracted.clone(),
            base.clone(),
            volume_id.to_string(),
        );
        tokio::task::spawn_blocking(move || store.ensure_view(&e, &b, &id))
            .await
            .map_err(|join| CsiError::Io {
                op: "building the path view of",
                path: extracted.dir.clone(),
                source: std::io::Error::other(join),
            })?
            .map_err(|e| CsiError::Store {
                cache: cache.to_string(),
                source: Box::new(e),
            })
    }

    /// Who made the mount at `target`, if any.
    fn target_owner(&self, target: &Path) -> Result<MountOwner, CsiError> {
        self.mounter
            .owner(target, self.store.root())
            .map_err(|e| CsiError::Io {
                op: "inspecting",
                path: target.to_path_buf(),
                source: e,
            })
    }

    /// The cache `key` names, or NOT_FOUND.
    async fn lookup(&self, key: &CacheRef) -> Result<ResolvedCache, CsiError> {
        self.resolver
            .resolve(key)
            .await
            .map_err(|e| CsiError::ResolverUnavailable(e.to_string()))?
            .ok_or_else(|| CsiError::NotFound {
                kind: key.kind(),
                cache: key.to_string(),
            })
    }

    /// The volume was published before (or a crash stopped between record and mount).
    async fn republish(&self, req: &PublishRequest, rec: &VolumeRecord) -> Result<(), CsiError> {
        if rec.target_path != req.target_path {
            return Err(CsiError::AlreadyPublished {
                volume: req.volume_id.clone(),
                existing: rec.target_path.clone(),
                requested: req.target_path.clone(),
            });
        }
        // A running pod keeps the digest it was published with, whatever the cache says now.
        let extracted = match self.store.get(&rec.digest).map_err(|e| CsiError::Store {
            cache: req.cache.to_string(),
            source: Box::new(e),
        })? {
            Some(e) => e,
            None => {
                let cache = self.lookup(&req.cache).await?;
                self.extract(&cache, &rec.digest).await?
            }
        };
        let spec = self.spec(rec, &extracted);
        match self
            .mounter
            .state(&req.target_path, Some(&spec))
            .map_err(|e| CsiError::Io {
                op: "inspecting",
                path: req.target_path.clone(),
                source: e,
            })? {
            MountState::MountedFrom => Ok(()),
            MountState::MountedOther => Err(CsiError::AlreadyPublished {
                volume: req.volume_id.clone(),
                existing: req.target_path.clone(),
                requested: req.target_path.clone(),
            }),
            MountState::Absent | MountState::NotMounted => {
                warn!("volume recorded but not mounted; finishing the publish");
                // A view the record names is complete or absent (built by one rename);
                // absent only if someone removed it: build it again.
                if let VolumeMount::Overlay {
                    view: Some(v),
                    base: Some(b),
                    ..
                } = &rec.mount
                    && !v.is_dir()
                {
                    self.view(&req.cache, &extracted, b, &rec.volume_id).await?;
                }
                self.mount(rec, &extracted)
            }
        }
    }

    /// What `rec`'s mount shows.
    fn spec(&self, rec: &VolumeRecord, extracted: &Extracted) -> MountSpec {
        match &rec.mount {
            VolumeMount::ReadOnlyBind => MountSpec::Bind {
                source: extracted.mount_source(),
            },
            VolumeMount::Overlay { writable, view, .. } => {
                let mut lowers: Vec<PathBuf> = view.iter().cloned().collect();
                lowers.push(extracted.mount_source());
                let upper = writable.then(|| {
                    let d = self.store.volume_dirs(&rec.volume_id);
                    UpperDirs {
                        upper: d.upper,
                        work: d.work,
                    }
                });
                MountSpec::Overlay { lowers, upper }
            }
        }
    }

    /// Extracts `digest` of `cache`'s repository, waiting at most the publish timeout. The
    /// extraction runs on its own task, so a retry after a timeout finds it done.
    async fn extract(&self, cache: &ResolvedCache, digest: &str) -> Result<Extracted, CsiError> {
        let store_err = |e| CsiError::Store {
            cache: cache.key.to_string(),
            source: Box::new(e),
        };
        let reference = parse_reference(&cache.image).map_err(|e| {
            CsiError::BadAttributes(format!("cache {} has a bad image: {e}", cache.key))
        })?;
        let pinned = PinnedRef::new(&reference, digest)
            .map_err(|e| CsiError::BadAttributes(format!("cache {}: {e}", cache.key)))?;
        if let Some(e) = self.store.get(digest).map_err(store_err)? {
            if e.meta.private {
                self.check_access(cache, &pinned).await?;
            }
            return Ok(e);
        }
        let puller = self.puller_for(cache).await?;
        let store = self.store.clone();
        let target = pinned.clone();
        let job = tokio::spawn(
            async move { store.ensure_reporting(&target, &puller, None).await }.in_current_span(),
        );
        let granted = (cache.key.clone(), digest.to_string());
        match tokio::time::timeout(self.cfg.publish_timeout, job).await {
            Ok(Ok(r)) => {
                if let Err(StoreError::Pull(p)) = &r
                    && !p.is_retryable()
                    && let Some(b) = &self.credentials
                {
                    // Refused with these credentials: ask for them again next time.
                    b.forget(&cache.key);
                }
                let (e, pulled) = r.map_err(store_err)?;
                if pulled {
                    // This cache read it with its own credentials.
                    self.access
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(granted, Instant::now());
                } else if e.meta.private {
                    // Another call pulled it while this one waited, perhaps with another
                    // cache's credentials: this cache proves its own access first.
                    self.check_access(cache, &pinned).await?;
                }
                Ok(e)
            }
            Ok(Err(join)) => Err(CsiError::Io {
                op: "extracting",
                path: PathBuf::from(digest),
                source: std::io::Error::other(join),
            }),
            Err(_) => Err(CsiError::StillExtracting {
                cache: cache.key.to_string(),
                digest: digest.to_string(),
                after: self.cfg.publish_timeout,
            }),
        }
    }

    /// The puller for `cache`: the node's, or with the cache's own credentials.
    async fn puller_for(&self, cache: &ResolvedCache) -> Result<Puller, CsiError> {
        crate::pull_credentials::Broker::puller_for(
            self.credentials.as_deref(),
            &self.puller,
            cache,
        )
        .await
        .map_err(CsiError::Credentials)
    }

    /// A tree pulled with another cache's own credentials serves `cache` only once
    /// `cache` has read the digest's manifest from its registry with its own (or the
    /// node's) credentials; a success is remembered for [`ACCESS_CHECK_TTL`].
    async fn check_access(
        &self,
        cache: &ResolvedCache,
        pinned: &PinnedRef,
    ) -> Result<(), CsiError> {
        let key = (cache.key.clone(), pinned.digest().to_string());
        {
            let mut access = self.access.lock().unwrap_or_else(|e| e.into_inner());
            access.retain(|_, at| at.elapsed() < ACCESS_CHECK_TTL);
            if access.contains_key(&key) {
                return Ok(());
            }
        }
        let puller = self.puller_for(cache).await?;
        puller.resolve(pinned).await.map_err(|e| {
            info!(cache = %cache.key, digest = %pinned.digest(), error = %e, "cache may not read a privately pulled digest");
            CsiError::Store {
                cache: cache.key.to_string(),
                source: Box::new(StoreError::Pull(e)),
            }
        })?;
        self.access
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Instant::now());
        Ok(())
    }

    fn check_gpus(&self, cache: &CacheRef, e: &Extracted) -> Result<(), CsiError> {
        let gpus = self.gpus.read().unwrap_or_else(|e| e.into_inner());
        let fit = Fitness::of(
            e.meta.image.summary_label(),
            &gpus,
            self.cfg.allow_unclaimed,
        )
        .map_err(|err| CsiError::BadAttributes(format!("cache {cache}: {err}")))?;
        match (fit.usable, fit.claimed) {
            (true, _) => Ok(()),
            (false, true) => Err(CsiError::Incompatible {
                cache: cache.to_string(),
                digest: e.digest.clone(),
                node: self.cfg.node_name.clone(),
                reasons: fit.reasons,
            }),
            (false, false) => Err(CsiError::NoGpuClaim {
                cache: cache.to_string(),
                digest: e.digest.clone(),
            }),
        }
    }

    /// Mounts `rec` at its target: creates the target and, for a writable volume, fresh
    /// private directories (what an earlier mount of the volume left there is discarded).
    fn mount(&self, rec: &VolumeRecord, extracted: &Extracted) -> Result<(), CsiError> {
        let target = &rec.target_path;
        let io = |op, source| CsiError::Io {
            op,
            path: target.to_path_buf(),
            source,
        };
        match std::fs::create_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("creating the target", e)),
        }
        if rec.mount.writable() {
            self.store
                .create_volume_dirs(&rec.volume_id)
                .map_err(|e| CsiError::Records(Box::new(e)))?;
        }
        let spec = self.spec(rec, extracted);
        self.mounter
            .mount(&spec, target)
            .map_err(|e| io("mounting onto", e))
    }

    /// At start: drops the records (and private directories) of volumes whose mount is
    /// gone (the node rebooted, or someone unmounted it), so they pin no digest. Kubelet
    /// publishes again any volume it still wants. Returns how many were dropped.
    pub fn reconcile_records(&self) -> Result<usize, CsiError> {
        let mut dropped = 0;
        for rec in self.store.volumes() {
            let state = self
                .mounter
                .state(&rec.target_path, None)
                .map_err(|e| CsiError::Io {
                    op: "inspecting",
                    path: rec.target_path.clone(),
                    source: e,
                })?;
            if matches!(state, MountState::Absent | MountState::NotMounted) {
                warn!(volume_id = %rec.volume_id, target = %rec.target_path.display(), digest = %rec.digest, "dropping the record of a volume whose mount is gone");
                self.store
                    .remove_volume(&rec.volume_id)
                    .map_err(|e| CsiError::Records(Box::new(e)))?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// NodeUnpublishVolume after validation. Idempotent: an unknown volume, a missing
    /// target and a mount that vanished are all fine.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        let span = info_span!("unpublish", volume_id = %volume_id, target = %target.display());
        async {
            let _guard = self.lock_volume(volume_id)?;
            let io = |op, source| CsiError::Io {
                op,
                path: target.to_path_buf(),
                source,
            };
            // Unmount GKM's mounts at the target, top-most first; never anyone else's.
            for _ in 0..8 {
                match self.target_owner(target)? {
                    MountOwner::Nobody => break,
                    MountOwner::Gkm => {
                        self.mounter.unmount(target).map_err(|e| io("unmounting", e))?
                    }
                    MountOwner::Other(what) => {
                        return Err(CsiError::ForeignMount {
                            target: target.to_path_buf(),
                            what,
                        });
                    }
                }
            }
            remove_target(target).map_err(|e| io("removing", e))?;
            match self.store.volume(volume_id) {
                Some(rec) if rec.target_path != target => {
                    warn!(recorded = %rec.target_path.display(), "unpublish of another target; keeping the record");
                }
                Some(rec) => {
                    // Counted before the private layer goes with the record.
                    let compiled = if rec.mount.writable() {
                        let upper = self.store.volume_dirs(volume_id).upper;
                        tokio::task::spawn_blocking(move || misses::scan(&upper))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or_default()
                    } else {
                        Compiled::default()
                    };
                    let why = explain_compiled(&self.store, &rec, &compiled);
                    self.store.count_compiled(&rec, compiled.entries(), why.clone());
                    self.store.remove_volume(volume_id).map_err(|e| CsiError::Records(Box::new(e)))?;
                    info!(compiled = compiled.entries(), "unpublished");
                    self.tell(VolumeEvent::Unpublished {
                        record: rec,
                        compiled,
                        why,
                    });
                }
                None => {}
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}

/// Why a pod of `rec` compiled `c`, from the digest's labels and targets, naming the pod;
/// `None` when it compiled nothing.
pub fn explain_compiled(store: &Store, rec: &VolumeRecord, c: &Compiled) -> Option<String> {
    let labels = store
        .get(&rec.digest)
        .ok()
        .flatten()
        .map(|e| e.meta.image.cache_labels())
        .unwrap_or_default();
    let targets = labels
        .summary()
        .and_then(Result::ok)
        .map(|s| {
            s.targets
                .iter()
                .map(|t| {
                    format!(
                        "{}:{}:{}",
                        crate::gpu::backend_name(t.backend),
                        crate::gpu::compat::normalize_arch(&t.arch),
                        t.warp_size
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    misses::explain(c, &labels, &targets)
        .map(|why| format!("pod {}/{} {why}", rec.pod_namespace, rec.pod_name))
}

/// The view a record's mount uses, for logs.
fn rec_view(rec: &VolumeRecord) -> Option<String> {
    match &rec.mount {
        VolumeMount::Overlay { view: Some(v), .. } => Some(v.display().to_string()),
        _ => None,
    }
}

/// Removes an empty target directory. Never recursive: if the unmount did not happen, a
/// recursive delete would reach into the cache.
fn remove_target(target: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Validates a NodePublishVolume request into a [`PublishRequest`].
pub fn validate_publish(r: &pb::NodePublishVolumeRequest) -> Result<PublishRequest, CsiError> {
    validate_volume_id(&r.volume_id)?;
    let target_path = validate_target(&r.target_path)?;
    let cap = r
        .volume_capability
        .as_ref()
        .ok_or(CsiError::Missing("volume_capability"))?;
    match &cap.access_type {
        Some(pb::volume_capability::AccessType::Mount(_)) => {}
        Some(pb::volume_capability::AccessType::Block(_)) => {
            return Err(CsiError::BadCapability(
                "block volumes are not supported: a kernel cache is a file tree".into(),
            ));
        }
        None => return Err(CsiError::Missing("volume_capability.access_type")),
    }
    if cap.access_mode.is_none() {
        return Err(CsiError::Missing("volume_capability.access_mode"));
    }
    let ctx = &r.volume_context;
    let cache = cache_ref_of_attributes(ctx).map_err(|e| CsiError::BadAttributes(e.0))?;
    let pod_namespace = ctx
        .get(CTX_POD_NAMESPACE)
        .filter(|s| !s.is_empty())
        .ok_or(CsiError::Missing("volume_context[csi.storage.k8s.io/pod.namespace] (the CSIDriver must set podInfoOnMount)"))?
        .clone();
    let writable = match ctx
        .get(ATTR_WRITABLE)
        .map(|v| v.trim().to_ascii_lowercase())
    {
        None => true,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            return Err(CsiError::BadAttributes(format!(
                "{ATTR_WRITABLE} is {v:?}; it takes \"true\" (the default) or \"false\""
            )));
        }
    };
    Ok(PublishRequest {
        volume_id: r.volume_id.clone(),
        target_path,
        cache,
        pod_namespace,
        pod_name: ctx.get(CTX_POD_NAME).cloned().unwrap_or_default(),
        pod_uid: ctx.get(CTX_POD_UID).cloned().unwrap_or_default(),
        read_only: r.readonly || !writable,
    })
}

/// A volume id as CSI allows it: not empty, at most 128 bytes ("the maximum size of a
/// string field is 128 bytes", CSI spec, Size Limits); any bytes otherwise (the store
/// names its files by a hash of the id).
pub fn validate_volume_id(id: &str) -> Result<(), CsiError> {
    if id.is_empty() {
        return Err(CsiError::Missing("volume_id"));
    }
    if id.len() > 128 {
        let mut cut = 32;
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(CsiError::VolumeIdTooLong {
            prefix: id[..cut].to_string(),
            len: id.len(),
        });
    }
    Ok(())
}

/// An absolute, normalised path: no empty, `.` or `..` components, no trailing slash.
pub fn validate_target(t: &str) -> Result<PathBuf, CsiError> {
    if t.is_empty() {
        return Err(CsiError::Missing("target_path"));
    }
    let bad = |reason| {
        Err(CsiError::BadTargetPath {
            path: t.to_string(),
            reason,
        })
    };
    if !t.starts_with('/') {
        return bad("is not absolute");
    }
    if t == "/" {
        return bad("is the root directory");
    }
    if t[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("is not normalised (empty, '.' or '..' components, or a trailing slash)");
    }
    Ok(PathBuf::from(t))
}

/// The plugin's manifest for GetPluginInfo.
pub fn plugin_manifest() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "url".to_string(),
        "https://github.com/gkm-dev/gkm".to_string(),
    )])
}

#[cfg(test)]
mod tests;
