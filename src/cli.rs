//! What the `gkm` commands do. `src/bin/gkm.rs` only parses arguments and calls these.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::api::GpuInfo;
use crate::cmdline::RegistryArgs;
use crate::gpu::{self, Inventory, Summary, Verdict};
use crate::oci::{self, ImageInfo, PinnedRef};
use crate::store::{Store, StoreConfig, TreeCheck, check_tree};

/// `gkm gpus`: this node's GPUs as a table (or JSON).
pub fn gpus(inventory: &Inventory, json: bool) -> Result<String> {
    let gpus = inventory.discover().context("discovering GPUs")?;
    if json {
        return Ok(serde_json::to_string_pretty(&gpus)? + "\n");
    }
    Ok(gpu::render_table(&gpus))
}

/// What `gkm inspect` found.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    pub image: String,
    pub info: ImageInfo,
    pub kind: Option<String>,
    pub targets: Vec<String>,
    /// The Triton versions, Python ABI tags and capture path the labels record.
    pub triton_versions: Vec<String>,
    pub python_abis: Vec<String>,
    pub capture_path: Option<String>,
    /// The variable a pod sets to the mount path (`TRITON_CACHE_DIR`, ...).
    pub env: Option<String>,
    pub gpus: Vec<GpuInfo>,
    pub compatible: Vec<String>,
    pub incompatible: Vec<String>,
    pub reasons: Vec<String>,
}

/// `gkm inspect IMAGE`: labels, targets, size, and compatibility with this node's GPUs. A
/// tag is resolved to its digest first (this is a workstation command; nodes never do).
pub async fn inspect(
    image: &str,
    registry: &RegistryArgs,
    inventory: &Inventory,
) -> Result<Inspection> {
    let reference = oci::parse_reference(image)?;
    let puller = registry.puller()?;
    let pinned = puller.resolve_tag(&reference).await?;
    let info = puller.resolve(&pinned).await?;
    let inv = inventory.clone();
    let gpus = tokio::task::spawn_blocking(move || inv.discover())
        .await?
        .context("discovering GPUs")?;
    let mut out = Inspection {
        image: pinned.to_string(),
        kind: None,
        targets: Vec::new(),
        triton_versions: Vec::new(),
        python_abis: Vec::new(),
        capture_path: None,
        env: None,
        gpus,
        compatible: Vec::new(),
        incompatible: Vec::new(),
        reasons: Vec::new(),
        info,
    };
    let labels = out.info.cache_labels();
    out.env = labels.kind.map(|k| k.env_var().to_string());
    out.triton_versions = labels.triton_versions;
    out.python_abis = labels.python_abis;
    out.capture_path = labels.capture_path;
    if let Some((kind, label)) = out.info.summary_label() {
        out.kind = Some(kind.to_string());
        let summary =
            Summary::parse(label).with_context(|| format!("label cache.{kind}.image/summary"))?;
        out.targets = summary.targets.iter().map(|t| t.to_string()).collect();
        match summary.check(&out.gpus) {
            Verdict::NoGpuClaim => {}
            Verdict::Checked(c) => {
                out.compatible = c.compatible;
                out.incompatible = c.incompatible;
                out.reasons = c.reasons;
            }
        }
    }
    Ok(out)
}

impl Inspection {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let _ = writeln!(s, "Image:     {}", self.image);
        if self.info.manifest_digest != self.info.digest {
            let _ = writeln!(
                s,
                "Manifest:  {} (this platform)",
                self.info.manifest_digest
            );
        }
        let _ = writeln!(
            s,
            "Layers:    {} ({:.1} MiB compressed)",
            self.info.layers.len(),
            mib(self.info.compressed_size())
        );
        match &self.kind {
            Some(kind) => {
                let label = |k: &str| {
                    self.info
                        .labels
                        .get(&format!("cache.{kind}.image/{k}"))
                        .map(String::as_str)
                        .unwrap_or("?")
                };
                let _ = writeln!(
                    s,
                    "Cache:     {kind} ({} entries, {} bytes)",
                    label("entry-count"),
                    label("cache-size-bytes")
                );
                let _ = writeln!(
                    s,
                    "Targets:   {}",
                    if self.targets.is_empty() {
                        "none (no GPU claim)".to_string()
                    } else {
                        self.targets.join(", ")
                    }
                );
                let or_unknown = |v: &[String]| {
                    if v.is_empty() {
                        "not recorded".to_string()
                    } else {
                        v.join(", ")
                    }
                };
                let _ = writeln!(s, "Triton:    {}", or_unknown(&self.triton_versions));
                let _ = writeln!(s, "Python:    {}", or_unknown(&self.python_abis));
                let _ = writeln!(
                    s,
                    "Captured:  {}",
                    self.capture_path.as_deref().unwrap_or("not recorded")
                );
                if let Some(env) = &self.env {
                    let _ = writeln!(s, "Use:       {env}=<the volume's mountPath>");
                }
            }
            None => {
                let _ = writeln!(
                    s,
                    "Cache:     not a kernel-cache image (no cache.*.image/summary label)"
                );
            }
        }
        if !self.info.labels.is_empty() {
            let _ = writeln!(s, "Labels:");
            for (k, v) in &self.info.labels {
                let _ = writeln!(s, "  {k}={v}");
            }
        }
        let _ = writeln!(s, "This node's GPUs: {}", self.gpus.len());
        for g in &self.gpus {
            let verdict = if self.compatible.contains(&g.uuid) {
                "compatible".to_string()
            } else if self.incompatible.contains(&g.uuid) {
                "incompatible".to_string()
            } else {
                "no claim to check".to_string()
            };
            let _ = writeln!(
                s,
                "  {} {} ({} {}): {verdict}",
                g.index,
                g.uuid,
                gpu::backend_name(g.backend),
                g.arch
            );
        }
        for r in &self.reasons {
            let _ = writeln!(s, "  - {r}");
        }
        s
    }
}

/// A progress bar on stderr (`{verb} bytes/total [bar] rate ETA`) for what `read` returns,
/// `(total, done)` in bytes, redrawn ten times a second until the returned guard is
/// dropped, which clears it; nothing at all when `quiet` or when stderr is not a terminal,
/// so logs and pipes get only the final lines.
fn progress_bar(
    verb: &str,
    quiet: bool,
    read: impl Fn() -> (u64, u64) + Send + 'static,
) -> impl Drop {
    use std::io::IsTerminal as _;
    let bar = if quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} {verb} {{bytes}}/{{total_bytes}} [{{wide_bar}}] {{binary_bytes_per_sec}} ETA {{eta}}",
            ))
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    };
    let drawn = bar.clone();
    let ticker = tokio::spawn(async move {
        loop {
            let (total, done) = read();
            drawn.set_length(total);
            drawn.set_position(done);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    struct Guard(indicatif::ProgressBar, tokio::task::JoinHandle<()>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.1.abort();
            self.0.finish_and_clear();
        }
    }
    Guard(bar, ticker)
}

/// One blob (a layer pulled, a blob pushed or copied) as [`blob_bars`] draws it.
struct BlobView {
    digest: String,
    total: u64,
    done: u64,
    state: oci::BlobState,
}

/// The uploads of `progress`, as [`blob_bars`] draws them.
fn uploads(progress: &oci::PushProgress) -> Vec<BlobView> {
    progress
        .blobs()
        .iter()
        .map(|b| BlobView {
            digest: b.digest.clone(),
            total: b.total,
            done: b.done(),
            state: b.state(),
        })
        .collect()
}

/// The layers of a pull that have started, as [`blob_bars`] draws them: layers are
/// streamed one after the other, so layer `i` has `done - (sizes of layers before i)`.
fn layers(progress: &oci::PullProgress) -> Vec<BlobView> {
    let done = progress.done();
    let mut offset = 0;
    let mut out = Vec::new();
    // The layers before the one being fetched are complete; later ones have not started.
    for (digest, size) in progress.layers() {
        if done < offset {
            break;
        }
        let mine = (done - offset).min(size);
        out.push(BlobView {
            digest,
            total: size,
            done: mine,
            state: if mine == size {
                oci::BlobState::Done
            } else {
                oci::BlobState::Sending
            },
        });
        offset += size;
    }
    out
}

/// One progress bar per blob that `snapshot` lists, on stderr (bytes, rate, ETA), as
/// `docker push` and `docker pull` show them, redrawn ten times a second until the returned
/// guard is dropped. `snapshot` lists the blobs started so far, oldest first, always in the
/// same order. `verbs` name the work while it runs and once done (`("pushing", "pushed")`);
/// a finished blob leaves one line (`  pushed sha256:<12 hex>: 1.50 MiB in 2s`), a failed
/// one none (the error says what failed). Nothing at all when `quiet` or when stderr is not
/// a terminal, so logs and pipes get only the final lines.
fn blob_bars(
    snapshot: impl Fn() -> Vec<BlobView> + Send + 'static,
    verbs: (&'static str, &'static str),
    quiet: bool,
) -> impl Drop {
    use std::io::IsTerminal as _;
    use std::sync::{Arc, Mutex};

    type Snapshot = Box<dyn Fn() -> Vec<BlobView> + Send>;
    struct Bars {
        multi: indicatif::MultiProgress,
        snapshot: Snapshot,
        /// One per blob of `snapshot()`, in the same order.
        bars: Vec<indicatif::ProgressBar>,
        verbs: (&'static str, &'static str),
    }
    impl Bars {
        /// Brings the bars up to the blobs' state: new bars for new blobs, positions, and
        /// the finished ones turned into their last line.
        fn update(&mut self) {
            let blobs = (self.snapshot)();
            let (doing, done) = self.verbs;
            for blob in &blobs[self.bars.len()..] {
                let bar = self.multi.add(indicatif::ProgressBar::new(blob.total));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(&format!(
                        "{{spinner}} {doing} {{prefix}} {{bytes}}/{{total_bytes}} [{{wide_bar}}] {{binary_bytes_per_sec}} ETA {{eta}}"
                    ))
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                // Docker's short form: the digest's first 12 hex digits.
                let short = match blob.digest.split_once(':') {
                    Some((alg, hex)) => {
                        format!("{alg}:{}", hex.chars().take(12).collect::<String>())
                    }
                    None => blob.digest.clone(),
                };
                bar.set_prefix(short);
                self.bars.push(bar);
            }
            for (bar, blob) in self.bars.iter().zip(&blobs) {
                if bar.is_finished() {
                    continue;
                }
                bar.set_position(blob.done.min(blob.total));
                match blob.state {
                    oci::BlobState::Sending => {}
                    oci::BlobState::Done => {
                        // A printed line rather than a finished bar: indicatif leaves the
                        // cursor after its last bar, where the final output would follow.
                        let _ = self.multi.println(format!(
                            "  {done} {}: {} in {:#}",
                            bar.prefix(),
                            indicatif::HumanBytes(blob.total),
                            indicatif::HumanDuration(bar.elapsed())
                        ));
                        bar.finish_and_clear();
                    }
                    oci::BlobState::Failed => bar.finish_and_clear(),
                }
            }
        }
    }

    struct Guard(Option<(Arc<Mutex<Bars>>, tokio::task::JoinHandle<()>)>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some((bars, ticker)) = self.0.take() {
                ticker.abort();
                let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
                // The last state, so that uploads done since the last tick get their line.
                bars.update();
                for bar in &bars.bars {
                    if !bar.is_finished() {
                        bar.finish_and_clear();
                    }
                }
            }
        }
    }

    if quiet || !std::io::stderr().is_terminal() {
        return Guard(None);
    }
    let bars = Arc::new(Mutex::new(Bars {
        multi: indicatif::MultiProgress::new(),
        snapshot: Box::new(snapshot),
        bars: Vec::new(),
        verbs,
    }));
    let drawn = bars.clone();
    let ticker = tokio::spawn(async move {
        loop {
            drawn.lock().unwrap_or_else(|e| e.into_inner()).update();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    Guard(Some((bars, ticker)))
}

/// `gkm pull IMAGE@DIGEST --store DIR`: pull and extract into a store, as the agent does,
/// with a progress bar on a terminal unless `quiet`.
pub async fn pull(
    image: &str,
    store_dir: PathBuf,
    sync: bool,
    quiet: bool,
    registry: &RegistryArgs,
) -> Result<String> {
    let pinned = PinnedRef::parse(image)?;
    let puller = registry.puller()?;
    let store = Store::open(StoreConfig {
        root: store_dir,
        sync,
        ..Default::default()
    })?;
    let start = Instant::now();
    let progress = std::sync::Arc::new(oci::PullProgress::new());
    let shown = progress.clone();
    let bar = blob_bars(move || layers(&shown), ("pulling", "pulled"), quiet);
    let e = store.ensure_with(&pinned, &puller, Some(progress)).await;
    drop(bar);
    let e = e?;
    let secs = start.elapsed().as_secs_f64();
    let mut s = String::new();
    let _ = writeln!(s, "digest:       {}", e.digest);
    let _ = writeln!(s, "stored at:    {}", e.dir.display());
    let _ = writeln!(s, "pods see:     {}", e.mount_source().display());
    let _ = writeln!(
        s,
        "files:        {} ({} bytes)",
        e.meta.files, e.meta.size_bytes
    );
    let _ = writeln!(s, "seconds:      {secs:.3}");
    Ok(s)
}

/// What `gkm fsck` found: one line per tree, and the counts.
#[derive(Debug)]
pub struct FsckReport {
    pub text: String,
    pub checked: usize,
    pub damaged: usize,
}

/// `gkm fsck --store DIR [--repair] [DIGEST...]`: checks trees against their records
/// (`tree.json`). Without `repair` it only reads (no lock: it runs beside the agent); with
/// it, it opens the store (its lock) and removes each damaged tree that no volume uses.
pub async fn fsck(store_dir: PathBuf, digests: Vec<String>, repair: bool) -> Result<FsckReport> {
    let store = if repair {
        Some(Store::open(StoreConfig {
            root: store_dir.clone(),
            ..Default::default()
        })?)
    } else {
        None
    };
    let digests = if digests.is_empty() {
        let dir = store_dir.join("store/sha256");
        let mut all: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .flatten()
            .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
            .collect();
        all.sort();
        all
    } else {
        digests
    };
    let mut report = FsckReport {
        text: String::new(),
        checked: 0,
        damaged: 0,
    };
    for digest in digests {
        let started = Instant::now();
        let (root, d) = (store_dir.clone(), digest.clone());
        let check = tokio::task::spawn_blocking(move || check_tree(&root, &d)).await??;
        let secs = started.elapsed().as_secs_f64();
        report.checked += 1;
        match check {
            TreeCheck::Intact { files, bytes } => {
                let _ = writeln!(
                    report.text,
                    "{digest} intact: {files} files, {bytes} bytes, {secs:.3} s"
                );
            }
            TreeCheck::Unrecorded => {
                let _ = writeln!(
                    report.text,
                    "{digest} not checked: no tree.json (extracted before GKM recorded trees)"
                );
            }
            TreeCheck::Damaged { differences } => {
                report.damaged += 1;
                let _ = writeln!(
                    report.text,
                    "{digest} DAMAGED: {} differences, {secs:.3} s",
                    differences.len()
                );
                for d in differences.iter().take(20) {
                    let _ = writeln!(report.text, "  {d}");
                }
                if differences.len() > 20 {
                    let _ = writeln!(report.text, "  ... and {} more", differences.len() - 20);
                }
                if let Some(store) = &store {
                    let line = if store.repair(&digest).await? {
                        "  removed: it is extracted again at its next use"
                    } else {
                        "  in use by a volume: left for its pods; repaired once idle"
                    };
                    let _ = writeln!(report.text, "{line}");
                }
            }
        }
    }
    Ok(report)
}

/// `gkm gc --store DIR`: collect every digest no volume uses (no grace period: an operator
/// asked for it).
pub async fn gc(store_dir: PathBuf) -> Result<Vec<String>> {
    let store = Store::open(StoreConfig {
        root: store_dir,
        gc_grace: std::time::Duration::ZERO,
        ..Default::default()
    })?;
    Ok(store.gc(&HashSet::new()).await?)
}

/// What `gkm build` was asked to do.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// The cache directory.
    pub dir: PathBuf,
    /// `triton` or `vllm`.
    pub kind: String,
    /// `-t`: the registry reference to push to (a tag), or with `oci_layout` the name the
    /// image gets in the layout's `index.json`.
    pub reference: Option<String>,
    /// `--target BACKEND:ARCH:WARP`: replaces the targets found in the cache.
    pub targets: Vec<String>,
    /// `--sign-key`: a cosign (or PKCS#8/SEC1 P-256) private key to sign the pushed digest.
    pub sign_key: Option<PathBuf>,
    /// `--oci-layout`: write an OCI image layout directory instead of pushing.
    pub oci_layout: Option<PathBuf>,
    /// `--quiet`: no progress bars for packing and uploading (they are shown only when
    /// stderr is a terminal).
    pub quiet: bool,
}

/// `gkm build DIR --kind triton|inductor|vllm -t REF`: packages a kernel cache directory as an MCV
/// image, pushes it (or writes an OCI layout) and signs it when asked. Progress goes to
/// stderr (on a terminal, unless `quiet`, also bars for packing and for each blob
/// uploaded); the returned line (`REPO@sha256:…`, or `PATH@sha256:…` for a layout) is what
/// the command prints on stdout.
pub async fn build(req: &BuildRequest, registry: &RegistryArgs) -> Result<String> {
    use crate::build::{self as b, BuildOptions};
    use crate::trust::sign::{SigningKey, password_from_env};

    let kind: b::CacheKind = req.kind.parse()?;
    let targets = req
        .targets
        .iter()
        .map(|t| b::parse_target(t))
        .collect::<Result<Vec<_>, _>>()?;
    // Check everything that can be checked before the (possibly long) build.
    let reference = match (&req.oci_layout, &req.reference) {
        (Some(_), _) if req.sign_key.is_some() => anyhow::bail!(
            "--sign-key signs a pushed image; it cannot be combined with --oci-layout \
             (push the image with -t, or sign it after copying the layout to a registry)"
        ),
        (Some(_), _) => None,
        (None, None) => anyhow::bail!("-t REF is required: the registry reference to push to"),
        (None, Some(r)) => {
            let r = oci::parse_reference(r)?;
            if r.digest().is_some() {
                anyhow::bail!(
                    "-t {}: name the image by tag; its digest is what the build computes",
                    r.whole()
                );
            }
            Some(r)
        }
    };
    let key = match &req.sign_key {
        Some(path) => {
            let path = path.clone();
            // scrypt takes a moment; keep it off the async threads.
            let key = tokio::task::spawn_blocking(move || {
                SigningKey::from_file(&path, &password_from_env())
            })
            .await??;
            Some(key)
        }
        None => None,
    };

    eprintln!("Building a {kind} cache image of {}", req.dir.display());
    let dir = req.dir.clone();
    let opts = BuildOptions { kind, targets };
    let progress = std::sync::Arc::new(b::PackProgress::default());
    let shown = progress.clone();
    let bar = progress_bar("packing", req.quiet, move || (shown.total(), shown.done()));
    let image = tokio::task::spawn_blocking(move || b::build_with(&dir, &opts, &progress)).await;
    drop(bar);
    let image = image??;
    let render = |ts: &[crate::gpu::CacheTarget]| {
        ts.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if image.targets != image.found_targets && !image.found_targets.is_empty() {
        eprintln!(
            "  --target replaces the targets found in the cache: {}",
            render(&image.found_targets)
        );
    }
    eprintln!(
        "  {} entries, {} files, {} bytes; targets: {}",
        image.entry_count,
        image.files,
        image.size_bytes,
        render(&image.targets)
    );
    eprintln!(
        "  layer {} ({} bytes compressed); image {}",
        image.layer.digest, image.layer.size, image.digest
    );

    let Some(reference) = reference else {
        let layout = req.oci_layout.clone().expect("checked above");
        let name = req.reference.clone();
        let digest = image.digest.clone();
        let shown = layout.display().to_string();
        tokio::task::spawn_blocking(move || b::write_oci_layout(&image, &layout, name.as_deref()))
            .await??;
        eprintln!("Wrote OCI layout {shown}");
        return Ok(format!("{shown}@{digest}"));
    };

    let progress = std::sync::Arc::new(oci::PushProgress::new());
    let pusher = registry.pusher()?.with_progress(progress.clone());
    eprintln!("Pushing to {}", reference.whole());
    let bars = blob_bars(move || uploads(&progress), ("pushing", "pushed"), req.quiet);
    let pinned = b::push(&pusher, &image, &reference).await;
    drop(bars);
    let pinned = pinned?;
    if let Some(key) = key {
        let sig = crate::trust::sign::push_signature(&pusher, &pinned, &key).await?;
        eprintln!("Signed {} ({sig})", pinned.digest());
    }
    Ok(pinned.to_string())
}

/// `gkm verify`: resolves `image` (a tag is resolved once) and verifies its signatures
/// under the trust policy at `policy`, as admission does, registry check included.
pub async fn verify(
    image: &str,
    policy: &std::path::Path,
    registry: &RegistryArgs,
) -> Result<String> {
    let policy = crate::trust::TrustPolicy::load(policy)
        .with_context(|| format!("--policy {}", policy.display()))?;
    let reference = oci::parse_reference(image)?;
    policy.check_registry(image, &reference)?;
    let puller = registry.puller()?;
    let pinned = match reference.digest() {
        Some(d) => PinnedRef::new(&reference, d)?,
        None => puller.resolve_tag(&reference).await?,
    };
    let verifier = crate::trust::Verifier::new(policy, puller);
    let v = verifier.verify(&pinned).await?;
    Ok(format!(
        "{pinned}: verified by {} ({:?})\n",
        v.authority, v.format
    ))
}

/// What `gkm promote` is asked.
#[derive(Clone, Debug)]
pub struct PromoteRequest {
    /// The incoming image, by tag or digest.
    pub image: String,
    pub digest: Option<String>,
    /// The trust policy: its authorities and its `promotion` section.
    pub policy: PathBuf,
    /// Overrides `promotion.signKey`.
    pub sign_key: Option<PathBuf>,
    /// `--quiet`: no copy progress bars (they are shown only when stderr is a terminal).
    pub quiet: bool,
}

/// `gkm promote`: verifies the incoming image and copies it, with its signatures, into the
/// trusted registry, as the controller's verify-and-promote API does (without its
/// authentication: the caller's registry credentials are the authority here). On a
/// terminal, unless `quiet`, each blob copied shows a progress bar on stderr.
pub async fn promote(
    req: &PromoteRequest,
    registry: &RegistryArgs,
) -> Result<crate::promote::Promoted> {
    let mut policy = crate::trust::TrustPolicy::load(&req.policy)
        .with_context(|| format!("--policy {}", req.policy.display()))?;
    match (&mut policy.promotion, &req.sign_key) {
        (Some(p), Some(key)) => p.sign_key = Some(key.clone()),
        (None, _) => anyhow::bail!(
            "--policy {}: no `promotion` section (promotion: {{incoming: ..., trusted: ...}})",
            req.policy.display()
        ),
        _ => {}
    }
    let progress = std::sync::Arc::new(oci::PushProgress::new());
    let pusher = registry.pusher()?.with_progress(progress.clone());
    let trust = std::sync::Arc::new(crate::trust::Verifier::new(policy, pusher.puller().clone()));
    let promoter = crate::promote::Promoter::new(trust, pusher);
    let bars = blob_bars(move || uploads(&progress), ("copying", "copied"), req.quiet);
    let promoted = promoter
        .promote(&req.image, req.digest.as_deref(), None)
        .await;
    drop(bars);
    Ok(promoted?)
}

/// `gkm promote --server`: asks the cluster's promoter to verify and promote `image` at
/// `digest` (default: the image's own digest, or its tag resolved now in the incoming
/// registry with `registry`'s credentials, which a developer has).
pub async fn promote_via_server(
    image: &str,
    digest: Option<&str>,
    server: &crate::promote::client::ServerOptions,
    registry: &RegistryArgs,
) -> Result<crate::promote::Promoted> {
    let reference = oci::parse_reference(image).with_context(|| format!("image {image}"))?;
    let digest = match (digest, reference.digest()) {
        (Some(d), _) => d.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => registry
            .puller()?
            .resolve_tag(&reference)
            .await
            .with_context(|| format!("resolving the tag of {image} (or pass --digest)"))?
            .digest()
            .to_string(),
    };
    Ok(crate::promote::client::promote_via_server(server, image, &digest).await?)
}

/// `e` and its causes joined by `": "` (anyhow's `{:#}`), each cause once: many of our
/// errors (thiserror's `"{image}: {source}"` with `#[source]`) already show their cause in
/// their own message, and `{:#}` would print it again. A cause is left out when the text
/// so far already contains it.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Shows(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Hides(#[source] std::io::Error);

    #[test]
    fn a_report_names_each_cause_once() {
        let io = || std::io::Error::other("disk full");
        let shown = anyhow::Error::new(Shows(io())).context("pulling x");
        assert_eq!(report(&shown), "pulling x: outer: disk full");
        let hidden = anyhow::Error::new(Hides(io())).context("pulling x");
        assert_eq!(report(&hidden), "pulling x: outer: disk full");
    }
}
