//! The node's content-addressed store: one extracted tree per image digest, the durable
//! records of the volumes that use them, reference counts, and garbage collection.
//!
//! Layout under the root (default `/var/lib/gkm`):
//! - `store/sha256/<hex>/rootfs/`: the extracted image, shared by every cache, namespace and
//!   pod that uses that digest; `store/sha256/<hex>/meta.json`: what was extracted;
//!   `store/sha256/<hex>/tree.json`: every entry of `rootfs/` with its hash ([`tree`]), so
//!   a tree changed behind GKM's back is found ([`check_tree`], [`Store::verify_idle`]).
//! - `store/tmp/`: extractions in progress and trees being deleted. A tree becomes visible
//!   only complete, by one rename from here; whatever is left here at start is removed.
//! - `volumes/<key>.json`: one record per published volume ([`volume_key`] of its id),
//!   written atomically (a temporary file, fsync, rename), so a restarted agent knows every mount it made.
//!   The folder is not fsynced: a rename lost to a power failure loses a record whose
//!   mount did not survive the reboot either, and the agent drops records whose mount is
//!   gone when it starts. An unreadable record is set aside, not fatal.
//! - `overlays/<key>/{upper,work}`: a writable volume's private layer, created empty at
//!   publish and removed at unpublish; directories without a record are removed at start.
//! - `store/sha256/<hex>/views/<base key>/`: path views of a digest (group files rewritten
//!   for one mount path), shared by the volumes that mount the digest there.
//! - `usage.json`: per cache and digest, pods served and kernels they compiled.
//! - `lock`: held (flock) by the one agent that owns this root.
//!
//! Garbage collection removes a digest only when no volume references it, no cache on this
//! node wants it, and both have been true for a grace period, so swapping an image back
//! and forth does not thrash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use crate::oci::{
    CacheLayout, ImageInfo, Limits, PinnedRef, PullError, PullProgress, Puller, Totals,
};

pub mod tree;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {0} is in use by another process (its lock is held)")]
    Locked(PathBuf),
    #[error("volume record {path} is unreadable: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("{0}: not a sha256 digest")]
    BadDigest(String),
    #[error("building a path view: {0}")]
    View(Box<crate::kernel_cache::view::ViewError>),
}

/// The usage counts' file under the store root.
const USAGE_FILE: &str = "usage.json";

/// Most shared path views one digest keeps (see [`Store::ensure_view`]).
pub const MAX_VIEWS: usize = 64;

/// The name of a volume's directory: 32 hex digits of the sha256 of its id, so any id CSI
/// allows (up to 128 bytes of anything) makes a short, safe file name.
pub fn volume_key(volume_id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(volume_id.as_bytes())[..16])
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the store lives and how it behaves.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub root: PathBuf,
    pub limits: Limits,
    /// How long a digest must stay unused and unwanted before GC removes it.
    pub gc_grace: Duration,
    /// Flush the filesystem before a tree becomes visible, so a power loss cannot leave a
    /// visible tree with missing data.
    pub sync: bool,
    /// fsync each volume record before it is renamed into place.
    pub sync_records: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/gkm"),
            limits: Limits::default(),
            gc_grace: Duration::from_secs(600),
            sync: true,
            sync_records: true,
        }
    }
}

/// An extracted image in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extracted {
    pub digest: String,
    /// `store/sha256/<hex>`.
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Extracted {
    /// The extracted image root.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// What a pod sees: the cache tree of an MCV image, else the image root.
    pub fn mount_source(&self) -> PathBuf {
        match self.meta.layout.subdir() {
            Some(sub) => self.rootfs().join(sub),
            None => self.rootfs(),
        }
    }
}

/// `meta.json` of an extracted digest.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub image: ImageInfo,
    pub layout: CacheLayout,
    pub files: u64,
    pub size_bytes: u64,
    pub entries: u64,
    /// Pulled with one cache's own credentials (`imagePullSecrets`): another cache may use
    /// the tree only once it has shown it can read the digest itself (as kubelet's
    /// "ensure secret pulled images", KEP-2535, does for container images).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

/// Who uses a published volume: written before the mount, removed after the unmount.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub digest: String,
    /// `GKMCache` or `ClusterGKMCache`.
    pub cache_kind: String,
    /// Empty for a ClusterGKMCache.
    pub cache_namespace: String,
    pub cache_name: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// How the volume is mounted. Records written before overlay volumes existed read as
    /// [`VolumeMount::ReadOnlyBind`], which is what they were.
    #[serde(default)]
    pub mount: VolumeMount,
}

/// How a published volume is mounted.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum VolumeMount {
    /// The shared tree, bound read-only.
    #[default]
    ReadOnlyBind,
    /// An overlay of the shared tree (and, when `view` is set, the path view above it),
    /// writable into the volume's own upper directory when `writable`.
    #[serde(rename_all = "camelCase")]
    Overlay {
        writable: bool,
        /// The path view stacked above the tree (`store/sha256/<hex>/views/<key>`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        view: Option<PathBuf>,
        /// Where the pod sees the volume, when known (what the view was made for).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<crate::kernel_cache::MountBase>,
    },
}

impl VolumeMount {
    pub fn writable(&self) -> bool {
        matches!(self, VolumeMount::Overlay { writable: true, .. })
    }
}

/// A volume's private directories: `overlays/<key>/{upper,work}` under the store root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDirs {
    pub dir: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// What pods did with one digest of one cache on this node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Volumes published.
    pub pods_served: u64,
    /// Cache entries (kernels and launchers) compiled in volumes already unpublished.
    pub kernels_compiled: u64,
    /// Volumes that compiled anything.
    pub pods_with_misses: u64,
    /// The last miss, in words: the pod, the count and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_miss: Option<String>,
}

impl VolumeRecord {
    /// `<kind>/<namespace>/<name>`: the cache this volume mounts, as the usage table keys it.
    pub fn cache_id(&self) -> String {
        format!(
            "{}/{}/{}",
            self.cache_kind, self.cache_namespace, self.cache_name
        )
    }

    /// The cache this volume mounts, or `None` for a record of an unknown kind.
    pub fn cache_key(&self) -> Option<crate::api::CacheRef> {
        crate::api::CacheRef::from_parts(&self.cache_kind, &self.cache_namespace, &self.cache_name)
    }
}

/// `usage.json`: `<cache>` (as [`VolumeRecord::cache_id`]) → digest → usage.
type UsageTable = BTreeMap<String, BTreeMap<String, Usage>>;

#[derive(Default)]
struct State {
    volumes: BTreeMap<String, VolumeRecord>,
    usage: UsageTable,
    /// When each unreferenced, unwanted digest was first seen so.
    idle_since: HashMap<String, Instant>,
}

/// The store of one node. Share it behind an `Arc`.
pub struct Store {
    cfg: StoreConfig,
    _lock: OwnedFd,
    state: Mutex<State>,
    /// Extracted digests already read from disk: a publish does not re-read meta.json.
    extracted: Mutex<HashMap<String, Extracted>>,
    /// One lock per digest: extraction and GC of a digest never overlap, and concurrent
    /// requests for one digest extract it once.
    digest_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The pulls under way, by digest, whoever started them (a publish or the agent's
    /// loop): what the node status shows as `pulledBytes` of `pullTotalBytes`.
    pulls: Mutex<HashMap<String, Arc<PullProgress>>>,
}

impl Store {
    /// Opens (creating) the store at `cfg.root`: takes its lock, removes leftovers of
    /// interrupted extractions and deletions, and loads the volume records.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        let root = cfg.root.clone();
        for dir in [
            root.join("store/sha256"),
            root.join("store/tmp"),
            root.join("volumes"),
            root.join("overlays"),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        let lock_path = root.join("lock");
        let lock = rustix::fs::open(
            &lock_path,
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| StoreError::Io {
            op: "opening",
            path: lock_path.clone(),
            source: e.into(),
        })?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| StoreError::Locked(root.clone()))?;

        let tmp = root.join("store/tmp");
        for entry in fs::read_dir(&tmp)
            .map_err(io_err("listing", &tmp))?
            .flatten()
        {
            warn!(path = %entry.path().display(), "removing leftover of an interrupted extraction or deletion");
            remove_tree(&entry.path())?;
        }

        let mut state = State::default();
        let vdir = root.join("volumes");
        for entry in fs::read_dir(&vdir)
            .map_err(io_err("listing", &vdir))?
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") {
                let _ = fs::remove_file(&path); // an interrupted record write
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
            match serde_json::from_str::<VolumeRecord>(&text) {
                Ok(rec) => {
                    state.volumes.insert(rec.volume_id.clone(), rec);
                }
                Err(e) => {
                    // Only a power failure leaves one; its mount is gone with the reboot.
                    let aside = vdir.join(format!(".corrupt-{name}"));
                    warn!(path = %path.display(), error = %e, "setting an unreadable volume record aside");
                    fs::rename(&path, &aside).map_err(io_err("setting aside", &path))?;
                }
            }
        }
        // Volume directories whose record is gone: a crash between removing the record
        // and the directories, or a record dropped while the agent was down.
        let keys: HashSet<String> = state.volumes.keys().map(|id| volume_key(id)).collect();
        let odir = root.join("overlays");
        for entry in fs::read_dir(&odir)
            .map_err(io_err("listing", &odir))?
            .flatten()
        {
            if !keys.contains(&*entry.file_name().to_string_lossy()) {
                warn!(path = %entry.path().display(), "removing the directories of a volume that has no record");
                remove_tree(&entry.path())?;
            }
        }
        let usage_path = root.join(USAGE_FILE);
        state.usage = match fs::read(&usage_path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(path = %usage_path.display(), error = %e, "unreadable usage counts; starting from zero");
                UsageTable::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => UsageTable::default(),
            Err(e) => return Err(io_err("reading", &usage_path)(e)),
        };
        info!(root = %root.display(), volumes = state.volumes.len(), "store opened");
        Ok(Self {
            cfg,
            _lock: lock,
            state: Mutex::new(state),
            extracted: Mutex::new(HashMap::new()),
            digest_locks: Mutex::new(HashMap::new()),
            pulls: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    fn digest_dir(&self, digest: &str) -> Result<PathBuf> {
        let hex = crate::oci::sha256_hex(digest)
            .ok_or_else(|| StoreError::BadDigest(digest.to_string()))?;
        Ok(self.cfg.root.join("store/sha256").join(hex))
    }

    fn digest_lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.digest_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(digest.to_string()).or_default().clone()
    }

    /// The extracted image for `digest`, if the store has it.
    pub fn get(&self, digest: &str) -> Result<Option<Extracted>> {
        if let Some(e) = self
            .extracted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Ok(Some(e.clone()));
        }
        let dir = self.digest_dir(digest)?;
        let meta_path = dir.join("meta.json");
        let text = match fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &meta_path)(e)),
        };
        let meta: Meta = serde_json::from_str(&text).map_err(|e| StoreError::BadRecord {
            path: meta_path,
            reason: e.to_string(),
        })?;
        let e = Extracted {
            digest: digest.to_string(),
            dir,
            meta,
        };
        self.remember(&e);
        Ok(Some(e))
    }

    fn remember(&self, e: &Extracted) {
        self.extracted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(e.digest.clone(), e.clone());
    }

    /// Every digest the store holds.
    pub fn digests(&self) -> Result<Vec<String>> {
        let dir = self.cfg.root.join("store/sha256");
        let mut out: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err("listing", &dir))?
            .flatten()
            .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Returns the extracted image, pulling and extracting it first if needed. Concurrent
    /// calls for one digest extract it once; the others wait for that extraction.
    pub async fn ensure(&self, image: &PinnedRef, puller: &Puller) -> Result<Extracted> {
        self.ensure_with(image, puller, None).await
    }

    /// [`Store::ensure`], counting the bytes received into `progress` when this call does
    /// the pull. While a pull runs, a line is logged every [`PROGRESS_LOG_INTERVAL`].
    pub async fn ensure_with(
        &self,
        image: &PinnedRef,
        puller: &Puller,
        progress: Option<Arc<PullProgress>>,
    ) -> Result<Extracted> {
        self.ensure_reporting(image, puller, progress)
            .await
            .map(|(e, _)| e)
    }

    /// [`Store::ensure_with`], also saying whether this call pulled the image (`true`) or
    /// found it extracted, by an earlier call or by one it waited for (`false`). A caller
    /// that must know `puller`'s credentials read the digest (a tree pulled with another
    /// cache's credentials, `meta.private`) checks access itself when this is `false`.
    pub async fn ensure_reporting(
        &self,
        image: &PinnedRef,
        puller: &Puller,
        progress: Option<Arc<PullProgress>>,
    ) -> Result<(Extracted, bool)> {
        let digest = image.digest().to_string();
        self.touch(&digest);
        if let Some(e) = self.get(&digest)? {
            return Ok((e, false));
        }
        let lock = self.digest_lock(&digest);
        let _guard = lock.lock().await;
        if let Some(e) = self.get(&digest)? {
            return Ok((e, false));
        }
        let span = info_span!("extract", image = %image, digest = %digest);
        let progress = progress.unwrap_or_default();
        let logger = tokio::spawn(log_progress(progress.clone()).instrument(span.clone()));
        self.lock_pulls().insert(digest.clone(), progress.clone());
        // Removed however the pull ends, a dropped (cancelled) call included.
        struct Done<'a>(&'a Store, &'a str);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.lock_pulls().remove(self.1);
            }
        }
        let done = Done(self, &digest);
        let result = self
            .extract(image, puller, &progress)
            .instrument(span)
            .await;
        drop(done);
        logger.abort();
        self.touch(&digest);
        result.map(|e| (e, true))
    }

    fn lock_pulls(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PullProgress>>> {
        self.pulls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(bytes received, total bytes)` of the pull of `digest` under way, if one is; the
    /// total is 0 until the manifest is read.
    pub fn pull_progress(&self, digest: &str) -> Option<(u64, u64)> {
        self.lock_pulls().get(digest).map(|p| (p.done(), p.total()))
    }

    /// The digests being pulled now.
    pub fn pulling(&self) -> Vec<String> {
        self.lock_pulls().keys().cloned().collect()
    }

    async fn extract(
        &self,
        image: &PinnedRef,
        puller: &Puller,
        progress: &PullProgress,
    ) -> Result<Extracted> {
        let started = Instant::now();
        let info = puller.resolve(image).await?;
        let attempts = puller.config().attempts.max(1);
        let mut delay = puller.config().backoff;
        let mut attempt = 1;
        loop {
            match self.extract_once(image, puller, &info, progress).await {
                Ok(e) => {
                    let seconds = started.elapsed().as_secs_f64();
                    info!(
                        files = e.meta.files,
                        bytes = e.meta.size_bytes,
                        seconds,
                        "extracted"
                    );
                    let m = crate::metrics::global();
                    crate::metrics::Metrics::result(&m.pulls, "ok");
                    m.extracted_bytes.inc_by(e.meta.size_bytes);
                    m.extraction_seconds.observe(seconds);
                    return Ok(e);
                }
                Err(StoreError::Pull(e)) if e.is_retryable() && attempt < attempts => {
                    warn!(attempt, error = %e, "extraction failed; retrying from scratch");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    crate::metrics::Metrics::result(&crate::metrics::global().pulls, "error");
                    return Err(e);
                }
            }
        }
    }

    async fn extract_once(
        &self,
        image: &PinnedRef,
        puller: &Puller,
        info: &ImageInfo,
        progress: &PullProgress,
    ) -> Result<Extracted> {
        let digest = image.digest();
        let tmp_root = self.cfg.root.join("store/tmp");
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}.", image.hex()))
            .tempdir_in(&tmp_root)
            .map_err(io_err("creating a temporary directory in", &tmp_root))?;
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(io_err("creating", &rootfs))?;

        let totals: Totals = puller
            .extract_into_with(image, info, &rootfs, self.cfg.limits, Some(progress))
            .await?;
        let meta = Meta {
            image: info.clone(),
            layout: CacheLayout::detect(&rootfs),
            files: totals.files,
            size_bytes: totals.bytes,
            entries: totals.entries,
            private: puller.has_own_credentials(),
        };
        let meta_path = tmp.path().join("meta.json");
        write_atomic(
            false,
            &meta_path,
            &serde_json::to_vec_pretty(&meta).expect("meta serialises"),
        )?;
        // What the tree holds, while it is still only ours: the reference for later checks.
        let walked = rootfs.clone();
        let record = tokio::task::spawn_blocking(move || tree::record(&walked))
            .await
            .map_err(|e| StoreError::Io {
                op: "recording",
                path: rootfs.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err("recording", &rootfs))?;
        let record_path = tmp.path().join(tree::RECORD_FILE);
        write_atomic(
            false,
            &record_path,
            &serde_json::to_vec(&record).expect("a tree record serialises"),
        )?;

        let final_dir = self.digest_dir(digest)?;
        let tmp_path = tmp.keep();
        let sync = self.cfg.sync;
        let (from, to) = (tmp_path.clone(), final_dir.clone());
        let published = tokio::task::spawn_blocking(move || -> Result<bool> {
            if sync {
                // One flush of the filesystem instead of an fsync per file.
                let fd = rustix::fs::open(
                    &from,
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
                    rustix::fs::Mode::empty(),
                )
                .map_err(|e| io_err("opening", &from)(e.into()))?;
                rustix::fs::syncfs(&fd).map_err(|e| io_err("syncing", &from)(e.into()))?;
            }
            match rustix::fs::rename(&from, &to) {
                Ok(()) => {
                    fsync_dir(to.parent().expect("digest dirs have a parent"))?;
                    Ok(true)
                }
                // Someone else's complete tree is already there.
                Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => Ok(false),
                Err(e) => Err(io_err("renaming into place", &to)(e.into())),
            }
        })
        .await
        .map_err(|e| StoreError::Io {
            op: "publishing",
            path: final_dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let published = match published {
            Ok(p) => p,
            Err(e) => {
                let _ = remove_tree(&tmp_path);
                return Err(e);
            }
        };
        if !published {
            remove_tree(&tmp_path)?;
        }
        let e = Extracted {
            digest: digest.to_string(),
            dir: final_dir,
            meta,
        };
        self.remember(&e);
        Ok(e)
    }

    /// Marks a digest as just used, restarting its GC grace period.
    fn touch(&self, digest: &str) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle_since
            .remove(digest);
    }

    /// Durably records a published volume (before its mount is made).
    pub fn record_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let path = self.record_path(&rec.volume_id);
        write_atomic(
            self.cfg.sync_records,
            &path,
            &serde_json::to_vec_pretty(rec).expect("record serialises"),
        )?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.idle_since.remove(&rec.digest);
        state.volumes.insert(rec.volume_id.clone(), rec.clone());
        Ok(())
    }

    /// A volume's private directories (whether or not they exist).
    pub fn volume_dirs(&self, volume_id: &str) -> VolumeDirs {
        let dir = self.cfg.root.join("overlays").join(volume_key(volume_id));
        VolumeDirs {
            upper: dir.join("upper"),
            work: dir.join("work"),
            dir,
        }
    }

    /// Creates a volume's upper and work directories empty, discarding what an earlier
    /// mount of the same volume left there.
    pub fn create_volume_dirs(&self, volume_id: &str) -> Result<VolumeDirs> {
        let d = self.volume_dirs(volume_id);
        fs::create_dir_all(&d.dir).map_err(io_err("creating", &d.dir))?;
        for p in [&d.upper, &d.work] {
            remove_tree(p)?;
            fs::create_dir(p).map_err(io_err("creating", p))?;
        }
        // Pods run as any user: the upper directory becomes the mount's root, so it must
        // let them in as the shared tree does.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&d.upper, fs::Permissions::from_mode(0o755))
            .map_err(io_err("setting the mode of", &d.upper))?;
        Ok(d)
    }

    /// The path view of `e` for `base` (see [`crate::kernel_cache::view`]), built once per
    /// digest and base and shared by every volume that mounts the digest there; `None`
    /// when the cache needs none (no group file names a child elsewhere than the pod sees
    /// it). Past [`MAX_VIEWS`] views of one digest, the view is built in the volume's own
    /// directory instead (removed with the volume), so pods choosing ever new paths cannot
    /// fill the store. Blocking.
    pub fn ensure_view(
        &self,
        e: &Extracted,
        base: &crate::kernel_cache::MountBase,
        volume_id: &str,
    ) -> Result<Option<PathBuf>> {
        let views = e.dir.join("views");
        let shared = views.join(base.key());
        let none_marker = views.join(format!("{}.none", base.key()));
        if shared.is_dir() {
            return Ok(Some(shared));
        }
        if none_marker.exists() {
            return Ok(None);
        }
        let count = fs::read_dir(&views).map(|d| d.count()).unwrap_or(0);
        let private = count >= MAX_VIEWS;
        let tmp_root = self.cfg.root.join("store/tmp");
        let tmp = tempfile::Builder::new()
            .prefix("view-")
            .tempdir_in(&tmp_root)
            .map_err(io_err("creating a temporary directory in", &tmp_root))?;
        let stats = crate::kernel_cache::view::build(&e.mount_source(), base, tmp.path())
            .map_err(|err| StoreError::View(Box::new(err)))?;
        let dest = if private {
            self.volume_dirs(volume_id).dir.join("view")
        } else {
            shared
        };
        if stats.rewritten == 0 {
            if !private {
                fs::create_dir_all(&views).map_err(io_err("creating", &views))?;
                write_atomic(false, &none_marker, b"")?;
            }
            return Ok(None);
        }
        let parent = dest.parent().expect("views live in a folder");
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        if private {
            remove_tree(&dest)?;
        }
        let from = tmp.keep();
        match rustix::fs::rename(&from, &dest) {
            Ok(()) => {}
            // Another publish built the same view first: use that one.
            Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => {
                remove_tree(&from)?;
            }
            Err(err) => {
                let _ = remove_tree(&from);
                return Err(io_err("renaming into place", &dest)(err.into()));
            }
        }
        info!(digest = %e.digest, base = %base, groups = stats.groups, rewritten = stats.rewritten, private, "path view built");
        Ok(Some(dest))
    }

    /// Counts a published volume of `rec`'s cache and digest.
    pub fn count_served(&self, rec: &VolumeRecord) {
        self.update_usage(rec, |u| u.pods_served += 1);
    }

    /// Counts the entries a volume of `rec` compiled, with the sentence that explains them.
    pub fn count_compiled(&self, rec: &VolumeRecord, entries: u64, why: Option<String>) {
        if entries == 0 {
            return;
        }
        self.update_usage(rec, |u| {
            u.kernels_compiled += entries;
            u.pods_with_misses += 1;
            u.last_miss = why;
        });
    }

    /// What pods did with `digest` of the cache `cache_id` ([`VolumeRecord::cache_id`]).
    pub fn usage(&self, cache_id: &str, digest: &str) -> Option<Usage> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .usage
            .get(cache_id)
            .and_then(|m| m.get(digest))
            .cloned()
    }

    fn update_usage(&self, rec: &VolumeRecord, f: impl FnOnce(&mut Usage)) {
        let bytes = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            f(state
                .usage
                .entry(rec.cache_id())
                .or_default()
                .entry(rec.digest.clone())
                .or_default());
            serde_json::to_vec(&state.usage).expect("usage serialises")
        };
        // Counts, not state: a write lost to a crash loses a few counts, nothing else.
        if let Err(e) = write_atomic(false, &self.cfg.root.join(USAGE_FILE), &bytes) {
            warn!(error = %e, "could not save the usage counts");
        }
    }

    /// Removes a volume's record and its private directories (after its unmount). Returns
    /// the record, or None if unknown.
    pub fn remove_volume(&self, volume_id: &str) -> Result<Option<VolumeRecord>> {
        remove_tree(&self.volume_dirs(volume_id).dir)?;
        for path in [
            self.record_path(volume_id),
            self.legacy_record_path(volume_id),
        ] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // An id whose escaped form is no file name never had a legacy record.
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::NAMETOOLONG.raw_os_error()) => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        Ok(self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .volumes
            .remove(volume_id))
    }

    pub fn volume(&self, volume_id: &str) -> Option<VolumeRecord> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .volumes
            .get(volume_id)
            .cloned()
    }

    pub fn volumes(&self) -> Vec<VolumeRecord> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .volumes
            .values()
            .cloned()
            .collect()
    }

    /// How many volumes use `digest`.
    pub fn refcount(&self, digest: &str) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .volumes
            .values()
            .filter(|v| v.digest == digest)
            .count()
    }

    /// `volumes/<key>.json`, named by [`volume_key`]: any id CSI allows fits a file name.
    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .root
            .join("volumes")
            .join(format!("{}.json", volume_key(volume_id)))
    }

    /// Where releases before the hashed names wrote the record: the id escaped.
    fn legacy_record_path(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .root
            .join("volumes")
            .join(format!("{}.json", escape(volume_id)))
    }

    /// Removes every digest that no volume references and no cache `wanted` on this node,
    /// once it has been so for the grace period. Returns the digests removed.
    pub async fn gc(&self, wanted: &HashSet<String>) -> Result<Vec<String>> {
        self.gc_at(wanted, Instant::now()).await
    }

    /// [`Store::gc`] with an explicit clock, for tests of the grace period.
    pub async fn gc_at(&self, wanted: &HashSet<String>, now: Instant) -> Result<Vec<String>> {
        let digests = self.digests()?;
        let mut doomed = Vec::new();
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let used: HashSet<&str> = state.volumes.values().map(|v| v.digest.as_str()).collect();
            let idle: Vec<String> = digests
                .iter()
                .filter(|d| !used.contains(d.as_str()) && !wanted.contains(*d))
                .cloned()
                .collect();
            state.idle_since.retain(|d, _| idle.contains(d));
            for d in idle {
                let since = *state.idle_since.entry(d.clone()).or_insert(now);
                if now.duration_since(since) >= self.cfg.gc_grace {
                    doomed.push(d);
                }
            }
        }
        let mut removed = Vec::new();
        for digest in doomed {
            let lock = self.digest_lock(&digest);
            // An extraction of it is under way: it is wanted after all.
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            if self.refcount(&digest) > 0 {
                continue;
            }
            self.remove_digest(&digest).await?;
            info!(%digest, "garbage-collected");
            crate::metrics::global().gc_removed.inc();
            removed.push(digest);
        }
        Ok(removed)
    }

    /// Removes `digest`'s tree: it disappears at once (one rename into `store/tmp/`), then
    /// is deleted; its usage counts go with it. The caller holds the digest's lock and has
    /// checked that no volume uses it.
    async fn remove_digest(&self, digest: &str) -> Result<()> {
        let dir = self.digest_dir(digest)?;
        let grave = self.cfg.root.join("store/tmp").join(format!(
            "gc-{}",
            dir.file_name().and_then(OsStr::to_str).unwrap_or("x")
        ));
        self.extracted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
        // Disappear atomically, then delete at leisure (a crash leaves it in tmp/).
        fs::rename(&dir, &grave).map_err(io_err("moving aside", &dir))?;
        let g = grave.clone();
        tokio::task::spawn_blocking(move || remove_tree(&g))
            .await
            .map_err(|e| StoreError::Io {
                op: "removing",
                path: grave.clone(),
                source: std::io::Error::other(e),
            })??;
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.idle_since.remove(digest);
            for per_digest in state.usage.values_mut() {
                per_digest.remove(digest);
            }
            state.usage.retain(|_, m| !m.is_empty());
        }
        Ok(())
    }

    /// Checks every digest no volume uses against its `tree.json` and removes each that
    /// differs, so the next use extracts it afresh; digests in use are only reported (their
    /// pods read them now). Run by the agent at start. Returns each digest with its result.
    pub async fn verify_idle(&self) -> Result<Vec<(String, TreeCheck)>> {
        let mut out = Vec::new();
        for digest in self.digests()? {
            if self.refcount(&digest) > 0 {
                continue;
            }
            let lock = self.digest_lock(&digest);
            let Ok(_guard) = lock.try_lock() else {
                continue; // being extracted or collected right now
            };
            let root = self.cfg.root.clone();
            let d = digest.clone();
            let check = tokio::task::spawn_blocking(move || check_tree(&root, &d))
                .await
                .map_err(|e| StoreError::Io {
                    op: "verifying",
                    path: self.cfg.root.clone(),
                    source: std::io::Error::other(e),
                })??;
            if let TreeCheck::Damaged { differences, .. } = &check {
                warn!(%digest, differences = differences.len(), first = %differences[0], "the tree differs from what was extracted; removing it to extract it again");
                if self.refcount(&digest) == 0 {
                    self.remove_digest(&digest).await?;
                }
            }
            out.push((digest, check));
        }
        Ok(out)
    }

    /// Removes a damaged tree so the next use extracts it again (`gkm fsck --repair`).
    /// `Ok(false)` when a volume uses it: it is left for its pods, and repaired once idle.
    pub async fn repair(&self, digest: &str) -> Result<bool> {
        let lock = self.digest_lock(digest);
        let _guard = lock.lock().await;
        if self.refcount(digest) > 0 {
            return Ok(false);
        }
        self.remove_digest(digest).await?;
        Ok(true)
    }
}

/// The result of checking one extracted tree against its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeCheck {
    /// Every entry as extracted.
    Intact { files: u64, bytes: u64 },
    /// What differs, in path order (never empty).
    Damaged { differences: Vec<tree::Difference> },
    /// No `tree.json` (extracted by a GKM before records existed): not checked.
    Unrecorded,
}

/// Checks `digest`'s tree under store root `root` against its `tree.json`, reading every
/// file. Takes no lock: it only reads, so `gkm fsck` can run beside the agent. A tree that
/// is gone by the time it is walked (collected meanwhile) reads as damaged.
pub fn check_tree(root: &Path, digest: &str) -> Result<TreeCheck> {
    let hex = crate::oci::sha256_hex(digest).ok_or_else(|| StoreError::BadDigest(digest.into()))?;
    let dir = root.join("store/sha256").join(hex);
    let record_path = dir.join(tree::RECORD_FILE);
    let expected: tree::Record = match fs::read(&record_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::BadRecord {
            path: record_path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TreeCheck::Unrecorded),
        Err(e) => return Err(io_err("reading", &record_path)(e)),
    };
    if expected.version != tree::RECORD_VERSION {
        return Ok(TreeCheck::Unrecorded);
    }
    let rootfs = dir.join("rootfs");
    let actual = tree::record(&rootfs).map_err(io_err("walking", &rootfs))?;
    let differences = tree::compare(&expected, &actual);
    Ok(if differences.is_empty() {
        TreeCheck::Intact {
            files: expected
                .entries
                .iter()
                .filter(|e| matches!(e, tree::Entry::File { .. }))
                .count() as u64,
            bytes: expected.bytes(),
        }
    } else {
        TreeCheck::Damaged { differences }
    })
}

/// How often a running pull logs how far it has come.
pub const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs `progress` every [`PROGRESS_LOG_INTERVAL`] until aborted: a bounded rate however
/// large the image.
async fn log_progress(progress: Arc<PullProgress>) {
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::time::sleep(PROGRESS_LOG_INTERVAL).await;
        let (done, total) = (progress.done(), progress.total());
        let rate = (done.saturating_sub(last.1)) as f64 / last.0.elapsed().as_secs_f64();
        info!(
            bytes_done = done,
            bytes_total = total,
            mib_per_second = rate / (1 << 20) as f64,
            "pulling"
        );
        last = (Instant::now(), done);
    }
}

/// Writes `path` atomically: a temporary file in the same folder (fsynced when `sync`),
/// renamed over `path`. Readers see the old content or the new, never a part.
pub(crate) fn write_atomic(sync: bool, path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("records live in a folder");
    let name = path.file_name().and_then(OsStr::to_str).unwrap_or("record");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{name}-"))
        .tempfile_in(dir)
        .map_err(io_err("creating a temporary file in", dir))?;
    tmp.write_all(bytes).map_err(io_err("writing", path))?;
    if sync {
        tmp.as_file().sync_data().map_err(io_err("syncing", path))?;
    }
    tmp.persist(path)
        .map_err(|e| io_err("renaming into place", path)(e.error))?;
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", dir))
}

/// Removes a tree without following symlinks.
fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err("removing", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("removing", path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("inspecting", path)(e)),
    }
}

/// A file name for any volume id: `[A-Za-z0-9._-]` kept, every other byte `%XX`.
fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, digest: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: id.into(),
            target_path: PathBuf::from(format!(
                "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/{id}/mount"
            )),
            digest: digest.into(),
            cache_kind: "GKMCache".into(),
            cache_namespace: "ns".into(),
            cache_name: "c".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "uid".into(),
            mount: VolumeMount::Overlay {
                writable: true,
                view: None,
                base: None,
            },
        }
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn cfg(root: &Path) -> StoreConfig {
        StoreConfig {
            root: root.to_path_buf(),
            gc_grace: Duration::from_secs(60),
            sync: false,
            ..Default::default()
        }
    }

    /// Plants an extracted digest as an extraction would leave it.
    fn plant(root: &Path, digest: &str) {
        let dir = root.join("store/sha256").join(&digest[7..]);
        fs::create_dir_all(dir.join("rootfs/io.triton.cache")).unwrap();
        let meta = Meta {
            image: ImageInfo {
                repository: "r/x".into(),
                digest: digest.into(),
                manifest_digest: digest.into(),
                layers: vec![],
                labels: Default::default(),
            },
            layout: CacheLayout::Mcv(crate::kernel_cache::CacheKind::Triton),
            files: 0,
            size_bytes: 0,
            entries: 0,
            private: false,
        };
        fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    #[test]
    fn records_survive_a_restart_and_rebuild_refcounts() {
        let root = tempfile::tempdir().unwrap();
        {
            let store = Store::open(cfg(root.path())).unwrap();
            store.record_volume(&record("vol-a", D1)).unwrap();
            store.record_volume(&record("vol-b", D1)).unwrap();
            store
                .record_volume(&record("weird/id with spaces", D2))
                .unwrap();
            store.remove_volume("vol-b").unwrap();
        }
        let store = Store::open(cfg(root.path())).unwrap();
        assert_eq!(store.refcount(D1), 1);
        assert_eq!(store.refcount(D2), 1);
        assert_eq!(store.volume("weird/id with spaces").unwrap().digest, D2);
        assert_eq!(
            store.remove_volume("never-existed").unwrap(),
            None,
            "unknown is not an error"
        );
    }

    #[test]
    fn an_unreadable_record_is_set_aside_not_fatal() {
        let root = tempfile::tempdir().unwrap();
        {
            let store = Store::open(cfg(root.path())).unwrap();
            store.record_volume(&record("good", D1)).unwrap();
        }
        // What a power failure can leave: a record renamed into place before its data.
        fs::write(root.path().join("volumes/bad.json"), b"").unwrap();
        let store = Store::open(cfg(root.path())).unwrap();
        assert_eq!(store.volumes().len(), 1);
        assert!(root.path().join("volumes/.corrupt-bad.json").exists());
    }

    #[test]
    fn a_second_store_on_the_same_root_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let _first = Store::open(cfg(root.path())).unwrap();
        assert!(matches!(
            Store::open(cfg(root.path())),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn leftovers_of_a_crash_are_removed_at_open() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("store/tmp/abc.123/rootfs/half")).unwrap();
        fs::create_dir_all(root.path().join("volumes")).unwrap();
        fs::write(root.path().join("volumes/.tmp-vol.json-xyz"), b"{\"half").unwrap();
        let _store = Store::open(cfg(root.path())).unwrap();
        assert_eq!(
            fs::read_dir(root.path().join("store/tmp")).unwrap().count(),
            0
        );
        assert!(!root.path().join("volumes/.tmp-vol.json-xyz").exists());
    }

    #[tokio::test]
    async fn gc_waits_for_the_grace_period_and_spares_used_and_wanted_digests() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(cfg(root.path())).unwrap();
        plant(root.path(), D1);
        plant(root.path(), D2);
        let d3 = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
        plant(root.path(), d3);
        store.record_volume(&record("v1", D1)).unwrap();
        let wanted: HashSet<String> = [D2.to_string()].into();

        let t0 = Instant::now();
        assert!(
            store.gc_at(&wanted, t0).await.unwrap().is_empty(),
            "grace starts now"
        );
        assert!(
            store
                .gc_at(&wanted, t0 + Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store
                .gc_at(&wanted, t0 + Duration::from_secs(61))
                .await
                .unwrap(),
            [d3]
        );
        assert!(store.get(d3).unwrap().is_none());
        assert!(store.get(D1).unwrap().is_some(), "referenced by a volume");
        assert!(store.get(D2).unwrap().is_some(), "wanted by a cache");

        // Unpublished and unwanted: collected only after its own grace period.
        store.remove_volume("v1").unwrap();
        let t1 = t0 + Duration::from_secs(100);
        assert!(store.gc_at(&HashSet::new(), t1).await.unwrap().is_empty());
        let mut gone = store
            .gc_at(&HashSet::new(), t1 + Duration::from_secs(60))
            .await
            .unwrap();
        gone.sort();
        assert_eq!(gone, [D1, D2]);
        assert!(store.digests().unwrap().is_empty());
    }

    #[test]
    fn private_layers_without_a_record_are_removed_at_open_and_others_kept() {
        let root = tempfile::tempdir().unwrap();
        {
            let store = Store::open(cfg(root.path())).unwrap();
            store.record_volume(&record("kept", D1)).unwrap();
            let kept = store.create_volume_dirs("kept").unwrap();
            std::fs::write(kept.upper.join("compiled"), b"x").unwrap();
            // A crash after the record went and before its directories did.
            let orphan = store.create_volume_dirs("orphan").unwrap();
            std::fs::write(orphan.upper.join("compiled"), b"x").unwrap();
        }
        let store = Store::open(cfg(root.path())).unwrap();
        assert!(store.volume_dirs("kept").upper.join("compiled").exists());
        assert!(!store.volume_dirs("orphan").dir.exists());
        store.remove_volume("kept").unwrap();
        assert!(!store.volume_dirs("kept").dir.exists());
    }

    #[test]
    fn any_volume_id_makes_a_short_file_name() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(cfg(root.path())).unwrap();
        let long = "x/".repeat(64);
        store.record_volume(&record(&long, D1)).unwrap();
        store.create_volume_dirs(&long).unwrap();
        assert_eq!(store.volume(&long).unwrap().volume_id, long);
        assert_eq!(volume_key(&long).len(), 32);
        assert!(store.remove_volume(&long).unwrap().is_some());
    }

    #[test]
    fn escape_keeps_ids_readable_and_safe() {
        assert_eq!(escape("csi-0123abcd"), "csi-0123abcd");
        assert_eq!(escape("../x"), "%2E.%2Fx");
        assert_eq!(escape("a/b c"), "a%2Fb%20c");
    }
}
