//! `gkm build`: a Triton, Inductor (`torch.compile`) or vLLM kernel cache directory
//! packaged as an OCI image in the MCV layout (the image format of the earlier GKM's `mcv`
//! tool, extended with the `inductor` kind), pushed to a registry or written as an OCI
//! image layout, and optionally signed. No container engine is involved.
//!
//! Owns:
//! - the scan of a cache directory ([`scan`]): what may go into an image (files, folders,
//!   symbolic links that stay inside; nothing else; Triton's `tmp.pid_*` staging folders
//!   are left out), the kernel entries found from Triton's per-kernel metadata wherever they
//!   lie in the tree, the distinct GPU targets, the Triton versions, the Python ABI tags of
//!   the launchers, the capture path the group files name, the entry count and the size
//!   (the formats themselves: [`crate::kernel_cache`]);
//! - the image ([`build`]): one deterministic gzip layer holding `io.<kind>.cache/` (the
//!   directory's content) and `io.<kind>.manifest/manifest.json` (sorted entries, mtime 0,
//!   uid/gid 0, permission bits kept but made readable by all: the tree is owned by root in
//!   the image and pods run as any user, so a `0600` file becomes `0644`, a `0700` folder or
//!   program `0755`; setuid, setgid and sticky bits are dropped), the config with the
//!   `cache.<kind>.image/*` labels ([`crate::kernel_cache::labels`]), and the OCI manifest.
//!   The same tree always gives the same digest. The layer is written to a temporary file
//!   while it is hashed, so memory stays small whatever the cache size;
//! - the output: [`Pusher`] uploads the blobs and then the exact manifest bytes (so the
//!   digest printed is the digest built), and signs the pushed digest in cosign's tag format
//!   (keys and signatures: [`crate::trust::sign`]); [`write_oci_layout`] writes an OCI image
//!   layout directory instead.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::GpuBackend;
use crate::gpu::compat::{CacheTarget, normalize_arch};
use crate::kernel_cache::CacheLabels;
use crate::oci::image::OCI_MANIFEST;
use crate::oci::{PinnedRef, Pusher, Reference};
use crate::trust::sign;

/// Media type of the image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the one layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation of `index.json` that names an image in an OCI layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

pub use crate::kernel_cache::CacheKind;

impl From<crate::kernel_cache::UnknownKind> for BuildError {
    fn from(e: crate::kernel_cache::UnknownKind) -> Self {
        BuildError::Usage(format!("--{e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A bad combination or value of options.
    #[error("{0}")]
    Usage(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error(
        "{path} is a symbolic link to {target:?}, which points outside the cache directory; an image may only hold links that stay inside it"
    )]
    LinkOutside { path: String, target: String },
    #[error(
        "{path} is a {what}; a kernel cache image holds only files, folders and symbolic links"
    )]
    SpecialFile { path: String, what: &'static str },
    #[error("{path}: kernel metadata with a target GKM cannot read: {reason}")]
    BadMetadata { path: String, reason: String },
    #[error(
        "--target {value:?}: {reason} (expected BACKEND:ARCH:WARP, e.g. cuda:90:32 or hip:gfx942:64)"
    )]
    BadTarget { value: String, reason: String },
    #[error(
        "no GPU targets found in {dir}: no Triton kernel metadata (a <kernel>.json with \"target\": {{\"backend\", \"arch\", \"warp_size\"}}) anywhere below it{hint}; name the targets with --target BACKEND:ARCH:WARP (e.g. --target cuda:90:32)"
    )]
    NoTargets { dir: String, hint: String },
    #[error("{path} changed while the image was built ({what}); build again")]
    Changed { path: String, what: String },
    #[error(transparent)]
    Push(#[from] crate::oci::PushError),
    #[error("OCI layout {path}: {reason}")]
    Layout { path: String, reason: String },
    #[error(transparent)]
    Sign(#[from] sign::SignError),
}

/// Pushes `image` under `reference` (a tag; `latest` when it names none) and returns the
/// reference pinned to the digest that was pushed.
pub async fn push(
    pusher: &Pusher,
    image: &BuiltImage,
    reference: &Reference,
) -> Result<PinnedRef, BuildError> {
    if reference.digest().is_some() {
        return Err(BuildError::Usage(format!(
            "-t {}: name the image by tag; the digest is what the build computes",
            reference.whole()
        )));
    }
    let tag = reference.tag().unwrap_or("latest");
    if let Some(reason) = crate::trust::tag::reserved_tag(tag) {
        return Err(BuildError::Usage(format!(
            "-t {}: tag {tag:?} is reserved for artifacts: {reason}",
            reference.whole()
        )));
    }
    let tagged = Reference::with_tag(
        reference.registry().to_string(),
        reference.repository().to_string(),
        tag.to_string(),
    );
    let layer = &image.layer;
    pusher
        .push_file(&tagged, &layer.path, &layer.digest, layer.size, "the layer")
        .await?;
    pusher
        .push_bytes(&tagged, &image.config, "the config")
        .await?;
    pusher
        .push_manifest(
            &tagged,
            image.manifest.clone(),
            OCI_MANIFEST,
            "the manifest",
        )
        .await?;
    PinnedRef::new(&tagged, &image.digest).map_err(|e| BuildError::Usage(e.to_string()))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BuildError + use<> {
    let path = path.display().to_string();
    move |source| BuildError::Io { what, path, source }
}

/// Parses `--target BACKEND:ARCH:WARP` (`cuda:90:32`, `cuda:sm_90:32`, `hip:gfx942:64`; an
/// AMD arch may carry features: `hip:gfx90a:xnack-:64`).
pub fn parse_target(value: &str) -> Result<CacheTarget, BuildError> {
    let bad = |reason: &str| BuildError::BadTarget {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let (backend, rest) = value.split_once(':').ok_or_else(|| bad("no `:`"))?;
    let (arch, warp) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("three fields are needed"))?;
    let backend = parse_backend(backend).map_err(|r| bad(&r))?;
    let arch = normalize_arch(arch);
    if arch.is_empty() {
        return Err(bad("the arch is empty"));
    }
    let warp_size: u32 = warp
        .trim()
        .parse()
        .map_err(|_| bad("the warp size is not a number"))?;
    if warp_size == 0 {
        return Err(bad("the warp size is 0"));
    }
    Ok(CacheTarget {
        backend,
        arch,
        warp_size,
    })
}

use crate::kernel_cache::triton::{self, parse_backend};

/// One kernel of the cache, from its Triton metadata JSON: a line of `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelEntry {
    /// The metadata file, relative to the cache directory.
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    #[serde(serialize_with = "ser_backend")]
    pub backend: GpuBackend,
    pub arch: String,
    pub warp_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ptx_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_warps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_stages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triton_version: Option<String>,
}

fn ser_backend<S: serde::Serializer>(b: &GpuBackend, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(crate::gpu::backend_name(*b))
}

impl KernelEntry {
    /// The folder holding the metadata file (the kernel's cache entry).
    fn dir(&self) -> &str {
        self.path.rsplit_once('/').map_or("", |(d, _)| d)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NodeKind {
    Dir,
    File { size: u64 },
    Symlink { target: PathBuf },
}

/// One entry of the tree, in layer order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    /// Relative to the cache directory; empty for the directory itself.
    rel: PathBuf,
    /// Permission bits, as [`readable`] makes them.
    mode: u32,
    kind: NodeKind,
}

/// What a cache directory holds.
#[derive(Clone, Debug)]
pub struct Scan {
    pub kind: CacheKind,
    /// Every kernel metadata file found, sorted by path.
    pub kernels: Vec<KernelEntry>,
    /// The distinct targets of `kernels`, sorted.
    pub found_targets: Vec<CacheTarget>,
    /// Kernel entries (Triton: folders holding kernel metadata; vLLM: torch.compile cache
    /// entries, the folders of `torch_compile_cache/`, or kernel folders when it has none).
    pub entry_count: u64,
    /// Regular files, and their total bytes (the `cache-size-bytes` label).
    pub files: u64,
    pub size_bytes: u64,
    /// The `triton_version`s of the kernels' metadata.
    pub triton_versions: BTreeSet<String>,
    /// The Python ABI tags of the extension modules (Triton's launchers and driver helpers).
    pub python_abis: BTreeSet<String>,
    /// Capture directories the group files name, with how many children name each.
    pub capture_roots: BTreeMap<String, u64>,
    nodes: Vec<Node>,
}

impl Scan {
    /// The directory the cache was captured at: the one most group-file children name.
    pub fn capture_path(&self) -> Option<String> {
        self.capture_roots
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(root, _)| root.clone())
    }
}

/// Walks `dir`, refusing what an image must not hold, and reads the kernel metadata.
pub fn scan(dir: &Path, kind: CacheKind) -> Result<Scan, BuildError> {
    let meta = std::fs::metadata(dir).map_err(io_err("reading", dir))?;
    if !meta.is_dir() {
        return Err(BuildError::NotADirectory(dir.display().to_string()));
    }
    let mut s = Scan {
        kind,
        kernels: Vec::new(),
        found_targets: Vec::new(),
        entry_count: 0,
        files: 0,
        size_bytes: 0,
        triton_versions: BTreeSet::new(),
        python_abis: BTreeSet::new(),
        capture_roots: BTreeMap::new(),
        nodes: vec![Node {
            rel: PathBuf::new(),
            mode: readable(meta.permissions().mode(), true),
            kind: NodeKind::Dir,
        }],
    };
    walk(dir, Path::new(""), &mut s)?;
    s.kernels.sort_by(|a, b| a.path.cmp(&b.path));
    let targets: BTreeSet<(String, String, u32)> = s
        .kernels
        .iter()
        .map(|k| {
            (
                crate::gpu::backend_name(k.backend).to_string(),
                k.arch.clone(),
                k.warp_size,
            )
        })
        .collect();
    s.found_targets = targets
        .into_iter()
        .map(|(b, arch, warp_size)| CacheTarget {
            backend: parse_backend(&b).expect("written from a GpuBackend"),
            arch,
            warp_size,
        })
        .collect();
    let kernel_dirs: BTreeSet<&str> = s.kernels.iter().map(KernelEntry::dir).collect();
    s.entry_count = kernel_dirs.len() as u64;
    if kind == CacheKind::Vllm {
        let tcc = Path::new("torch_compile_cache");
        let entries = s
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Dir && n.rel.parent() == Some(tcc))
            .count() as u64;
        if s.nodes.iter().any(|n| n.rel == tcc) {
            s.entry_count = entries;
        }
    }
    Ok(s)
}

fn walk(root: &Path, rel: &Path, s: &mut Scan) -> Result<(), BuildError> {
    let dir = root.join(rel);
    let mut names: Vec<OsString> = std::fs::read_dir(&dir)
        .map_err(io_err("reading", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err("reading", &dir))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = std::fs::symlink_metadata(&path).map_err(io_err("reading", &path))?;
        let ft = meta.file_type();
        let mode = readable(meta.permissions().mode(), ft.is_dir());
        if ft.is_dir() && name.as_bytes().starts_with(b"tmp.pid_") {
            // Triton's staging folder of a write that was cut short: never part of a cache.
            continue;
        }
        if ft.is_dir() {
            s.nodes.push(Node {
                rel: rel.clone(),
                mode,
                kind: NodeKind::Dir,
            });
            walk(root, &rel, s)?;
        } else if ft.is_file() {
            let size = meta.len();
            s.files += 1;
            s.size_bytes += size;
            s.nodes.push(Node {
                rel: rel.clone(),
                mode,
                kind: NodeKind::File { size },
            });
            let name = name.to_string_lossy();
            if size > triton::MAX_JSON_BYTES {
                // Too big to be Triton's: neither metadata nor a group file.
            } else if triton::is_group_file(&name) {
                let bytes = std::fs::read(&path).map_err(io_err("reading", &path))?;
                if let Some(children) = triton::parse_group(&bytes) {
                    let rel_dir = rel.parent().map(rel_string).unwrap_or_default();
                    for recorded in children.values() {
                        if let Some(root) = triton::capture_root(&rel_dir, recorded) {
                            *s.capture_roots.entry(root).or_default() += 1;
                        }
                    }
                }
            } else if name.ends_with(".json")
                && let Some(k) = read_kernel_metadata(&path, &rel)?
            {
                if let Some(v) = &k.triton_version {
                    s.triton_versions.insert(v.clone());
                }
                s.kernels.push(k);
            } else if let Some(abi) = triton::python_abi(&name) {
                s.python_abis.insert(abi.to_string());
            }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err("reading", &path))?;
            if !link_stays_inside(&rel, &target) {
                return Err(BuildError::LinkOutside {
                    path: path.display().to_string(),
                    target: target.display().to_string(),
                });
            }
            s.nodes.push(Node {
                rel,
                mode: 0o777,
                kind: NodeKind::Symlink { target },
            });
        } else {
            let what = if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "named pipe"
            } else if ft.is_socket() {
                "socket"
            } else {
                "special file"
            };
            return Err(BuildError::SpecialFile {
                path: path.display().to_string(),
                what,
            });
        }
    }
    Ok(())
}

/// The mode an entry gets in the image: its permission bits, readable by everyone, and
/// searchable (folders) or executable (programs: anything its owner, group or others could
/// run) by everyone.
fn readable(mode: u32, dir: bool) -> u32 {
    let mode = mode & 0o777;
    if dir || mode & 0o111 != 0 {
        mode | 0o555
    } else {
        mode | 0o444
    }
}

/// Whether the link at `rel` (relative to the root) with `target` resolves, lexically, to a
/// path inside the root. Absolute targets never do: the tree moves into the image.
fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    let mut depth: usize = rel.parent().map_or(0, |p| p.components().count());
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    !target.as_os_str().is_empty()
}

/// Reads `path` as Triton kernel metadata ([`triton::KernelMetadata::parse`]), as a line
/// of `manifest.json`; an error names the file whose target GKM cannot use.
fn read_kernel_metadata(path: &Path, rel: &Path) -> Result<Option<KernelEntry>, BuildError> {
    let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
    let meta = triton::KernelMetadata::parse(&bytes).map_err(|reason| BuildError::BadMetadata {
        path: path.display().to_string(),
        reason,
    })?;
    Ok(meta.map(|m| KernelEntry {
        path: rel_string(rel),
        name: m.name,
        hash: m.hash,
        backend: m.target.backend,
        arch: m.target.arch,
        warp_size: m.target.warp_size,
        ptx_version: m.ptx_version,
        num_warps: m.num_warps,
        num_stages: m.num_stages,
        debug: m.debug,
        triton_version: m.triton_version,
    }))
}

fn rel_string(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// How to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub kind: CacheKind,
    /// Targets named by the operator (`--target`), replacing those found in the cache.
    /// Empty: use what the cache's kernel metadata says, and fail when it says nothing.
    pub targets: Vec<CacheTarget>,
}

/// The layer blob, written to a temporary file.
#[derive(Debug)]
pub struct LayerBlob {
    pub path: PathBuf,
    /// `sha256:` of the compressed bytes.
    pub digest: String,
    pub size: u64,
    /// `sha256:` of the uncompressed tar (the config's diff id).
    pub diff_id: String,
}

/// A built image, ready to push or write out.
#[derive(Debug)]
pub struct BuiltImage {
    pub kind: CacheKind,
    /// The targets of the summary label.
    pub targets: Vec<CacheTarget>,
    /// The targets the cache's kernel metadata names (equal to `targets` unless
    /// [`BuildOptions::targets`] replaced them).
    pub found_targets: Vec<CacheTarget>,
    pub entry_count: u64,
    pub files: u64,
    pub size_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub layer: LayerBlob,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    /// `sha256:` of `manifest`: the image digest.
    pub digest: String,
    _tmp: tempfile::TempDir,
}

/// The summary label's JSON, in MCV's field order.
#[derive(Serialize)]
struct SummaryJson<'a> {
    targets: Vec<TargetJson<'a>>,
}

#[derive(Serialize)]
struct TargetJson<'a> {
    backend: &'static str,
    arch: &'a str,
    warp_size: u32,
}

fn summary_json(targets: &[CacheTarget]) -> String {
    serde_json::to_string(&SummaryJson {
        targets: targets
            .iter()
            .map(|t| TargetJson {
                backend: crate::gpu::backend_name(t.backend),
                arch: &t.arch,
                warp_size: t.warp_size,
            })
            .collect(),
    })
    .expect("JSON into memory")
}

/// The targets the image will claim: `opts.targets` when given, else those found.
fn choose_targets(
    dir: &Path,
    scan: &Scan,
    opts: &BuildOptions,
) -> Result<Vec<CacheTarget>, BuildError> {
    if !opts.targets.is_empty() {
        let mut seen = BTreeSet::new();
        return Ok(opts
            .targets
            .iter()
            .filter(|t| {
                seen.insert((
                    crate::gpu::backend_name(t.backend),
                    normalize_arch(&t.arch),
                    t.warp_size,
                ))
            })
            .cloned()
            .collect());
    }
    if scan.found_targets.is_empty() {
        let hint = match opts.kind {
            CacheKind::Vllm => {
                " (a vLLM cache holds them in triton_cache/ folders of torch_compile_cache/ once Triton kernels were compiled)"
                    .to_string()
            }
            CacheKind::Inductor => {
                " (an Inductor cache holds them under triton/<device>/ once torch.compile ran on a GPU)"
                    .to_string()
            }
            CacheKind::Triton => String::new(),
        };
        return Err(BuildError::NoTargets {
            dir: dir.display().to_string(),
            hint,
        });
    }
    Ok(scan.found_targets.clone())
}

/// Builds the image of the cache directory `dir` (blocking: reads the whole tree).
pub fn build(dir: &Path, opts: &BuildOptions) -> Result<BuiltImage, BuildError> {
    build_with(dir, opts, &PackProgress::default())
}

/// How far packing has come: bytes of the cache's files read into the layer, out of their
/// total (0 until the directory is scanned). Shared between [`build_with`], which adds to
/// it, and whoever shows it (the `gkm` CLI's progress bar), which reads it when it likes.
#[derive(Debug, Default)]
pub struct PackProgress {
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
}

impl PackProgress {
    /// Bytes of the cache's regular files packed so far (uncompressed).
    pub fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache's regular files' total size in bytes; 0 until the directory is scanned.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// [`build`], counting the bytes packed into `progress`.
pub fn build_with(
    dir: &Path,
    opts: &BuildOptions,
    progress: &PackProgress,
) -> Result<BuiltImage, BuildError> {
    let scan = scan(dir, opts.kind)?;
    progress
        .total
        .store(scan.size_bytes, std::sync::atomic::Ordering::Relaxed);
    let targets = choose_targets(dir, &scan, opts)?;
    let kind = opts.kind;
    let summary = summary_json(&targets);
    let labels = CacheLabels {
        kind: Some(kind),
        summary_raw: Some(summary.clone()),
        entry_count: Some(scan.entry_count),
        size_bytes: Some(scan.size_bytes),
        triton_versions: scan.triton_versions.iter().cloned().collect(),
        python_abis: scan.python_abis.iter().cloned().collect(),
        capture_path: scan.capture_path(),
    }
    .to_labels(kind);
    let manifest_json = cache_manifest_json(&scan, &targets);

    let tmp = tempfile::Builder::new()
        .prefix("gkm-build-")
        .tempdir()
        .map_err(io_err(
            "creating a temporary folder in",
            &std::env::temp_dir(),
        ))?;
    let layer = write_layer(
        dir,
        &scan,
        &manifest_json,
        &tmp.path().join("layer.tar.gz"),
        progress,
    )?;

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": crate::oci::pull::go_arch(),
        "os": "linux",
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created_by": format!("gkm build --kind {kind}")}],
    }))
    .expect("JSON into memory");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}],
    }))
    .expect("JSON into memory");
    Ok(BuiltImage {
        kind,
        targets,
        found_targets: scan.found_targets.clone(),
        entry_count: scan.entry_count,
        files: scan.files,
        size_bytes: scan.size_bytes,
        labels,
        digest: sha256_digest(&manifest),
        layer,
        config,
        manifest,
        _tmp: tmp,
    })
}

/// `io.<kind>.manifest/manifest.json`: the kind, the summary, the entry count and size, and
/// the kernel entries under the kind's name, as MCV lists them (vLLM: grouped by
/// torch.compile cache entry, `vllmHash`).
fn cache_manifest_json(scan: &Scan, targets: &[CacheTarget]) -> Vec<u8> {
    let summary: serde_json::Value =
        serde_json::from_str(&summary_json(targets)).expect("JSON we wrote");
    let entries = match scan.kind {
        CacheKind::Triton | CacheKind::Inductor => {
            serde_json::to_value(&scan.kernels).expect("JSON into memory")
        }
        CacheKind::Vllm => {
            let mut groups: BTreeMap<String, Vec<&KernelEntry>> = BTreeMap::new();
            for k in &scan.kernels {
                let hash = k
                    .path
                    .strip_prefix("torch_compile_cache/")
                    .and_then(|r| r.split('/').next())
                    .unwrap_or_default();
                groups.entry(hash.to_string()).or_default().push(k);
            }
            serde_json::Value::Array(
                groups
                    .into_iter()
                    .map(|(h, ks)| serde_json::json!({"vllmHash": h, "TritonCacheEntries": ks}))
                    .collect(),
            )
        }
    };
    let mut doc = serde_json::json!({
        "kind": scan.kind.as_str(),
        "summary": summary,
        "entries": scan.entry_count,
        "files": scan.files,
        "cacheSizeBytes": scan.size_bytes,
    });
    doc[scan.kind.as_str()] = entries;
    let mut out = serde_json::to_vec_pretty(&doc).expect("JSON into memory");
    out.push(b'\n');
    out
}

/// A writer that hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn write_layer(
    dir: &Path,
    scan: &Scan,
    manifest_json: &[u8],
    out: &Path,
    progress: &PackProgress,
) -> Result<LayerBlob, BuildError> {
    let file = std::fs::File::create(out).map_err(io_err("creating", out))?;
    let compressed = Hashing::new(BufWriter::with_capacity(1 << 20, file));
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(compressed, flate2::Compression::default());
    let mut tar = tar::Builder::new(Hashing::new(gz));
    let prefix = PathBuf::from(scan.kind.cache_dir());
    let w = |e: io::Error| BuildError::Io {
        what: "writing the layer to",
        path: out.display().to_string(),
        source: e,
    };
    for node in &scan.nodes {
        let name = prefix.join(&node.rel);
        let src = dir.join(&node.rel);
        match &node.kind {
            NodeKind::Dir => {
                let mut h = header(tar::EntryType::Directory, node.mode, 0);
                tar.append_data(&mut h, &name, io::empty()).map_err(w)?;
            }
            NodeKind::Symlink { target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut h, &name, target).map_err(w)?;
            }
            NodeKind::File { size } => {
                let f = std::fs::File::open(&src).map_err(io_err("reading", &src))?;
                let mut h = header(tar::EntryType::Regular, node.mode, *size);
                let mut reader = Counting {
                    inner: f.take(*size),
                    count: 0,
                    error: None,
                    progress,
                };
                tar.append_data(&mut h, &name, &mut reader).map_err(|e| {
                    match reader.error.take() {
                        Some(source) => BuildError::Io {
                            what: "reading",
                            path: src.display().to_string(),
                            source,
                        },
                        None => w(e),
                    }
                })?;
                let now = reader
                    .inner
                    .into_inner()
                    .metadata()
                    .map_err(io_err("reading", &src))?
                    .len();
                if reader.count != *size || now != *size {
                    return Err(BuildError::Changed {
                        path: src.display().to_string(),
                        what: format!("{size} bytes when scanned, {now} now"),
                    });
                }
            }
        }
    }
    let mdir = PathBuf::from(scan.kind.manifest_dir());
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, &mdir, io::empty()).map_err(w)?;
    let mut h = header(tar::EntryType::Regular, 0o644, manifest_json.len() as u64);
    tar.append_data(&mut h, mdir.join("manifest.json"), manifest_json)
        .map_err(w)?;
    let uncompressed = tar.into_inner().map_err(w)?;
    let diff_id = uncompressed.digest();
    let mut compressed = uncompressed.inner.finish().map_err(w)?;
    compressed.flush().map_err(w)?;
    let digest = compressed.digest();
    let size = compressed.count;
    let file = compressed
        .inner
        .into_inner()
        .map_err(|e| w(e.into_error()))?;
    file.sync_all().map_err(w)?;
    Ok(LayerBlob {
        path: out.to_path_buf(),
        digest,
        size,
        diff_id,
    })
}

/// A reader that counts (also into the build's `progress`), and keeps the source's own
/// error (tar reports its own words).
struct Counting<'a, R> {
    inner: R,
    count: u64,
    error: Option<io::Error>,
    progress: &'a PackProgress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                self.progress
                    .done
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(io::Error::new(kind, "reading a cache file"))
            }
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub use crate::oci::push::sha256_digest;

/// Writes `image` into the OCI image layout at `dir` (created when missing; an existing
/// layout keeps its other images), named `ref_name` in `index.json` when given (an image
/// of the same name is replaced).
pub fn write_oci_layout(
    image: &BuiltImage,
    dir: &Path,
    ref_name: Option<&str>,
) -> Result<(), BuildError> {
    let layout_err = |reason: String| BuildError::Layout {
        path: dir.display().to_string(),
        reason,
    };
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
    let marker = dir.join("oci-layout");
    match std::fs::read(&marker) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| layout_err(format!("oci-layout is not JSON: {e}")))?;
            if v.get("imageLayoutVersion")
                .and_then(|v| v.as_str())
                .is_none()
            {
                return Err(layout_err("oci-layout has no imageLayoutVersion".into()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Err(e) => return Err(io_err("reading", &marker)(e)),
    }
    let blob_path = |digest: &str| blobs.join(digest.trim_start_matches("sha256:"));
    let layer_dest = blob_path(&image.layer.digest);
    if std::fs::metadata(&layer_dest).map_or(true, |m| m.len() != image.layer.size) {
        let tmp = blobs.join(format!(".tmp-{}", std::process::id()));
        std::fs::copy(&image.layer.path, &tmp).map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &layer_dest).map_err(io_err("writing", &layer_dest))?;
    }
    write_atomic(&blob_path(&sha256_digest(&image.config)), &image.config)?;
    write_atomic(&blob_path(&image.digest), &image.manifest)?;

    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| layout_err(format!("index.json is not JSON: {e}")))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::oci::image::OCI_INDEX,
            "manifests": [],
        }),
        Err(e) => return Err(io_err("reading", &index_path)(e)),
    };
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| layout_err("index.json has no manifests list".into()))?;
    manifests.retain(|m| {
        let name = m
            .get("annotations")
            .and_then(|a| a.get(REF_NAME_ANNOTATION))
            .and_then(|n| n.as_str());
        match ref_name {
            Some(r) => name != Some(r),
            None => {
                !(name.is_none() && m.get("digest").and_then(|d| d.as_str()) == Some(&image.digest))
            }
        }
    });
    let mut desc = serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": image.digest,
        "size": image.manifest.len(),
    });
    if let Some(r) = ref_name {
        desc["annotations"] = serde_json::json!({ REF_NAME_ANNOTATION: r });
    }
    manifests.push(desc);
    write_atomic(
        &index_path,
        &serde_json::to_vec(&index).expect("JSON into memory"),
    )
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::Duration;

    fn kernel(dir: &Path, hash: &str, name: &str, target: &str) {
        let d = dir.join(hash);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("{name}.json")),
            format!(
                r#"{{"hash": "{hash}", "target": {target}, "num_warps": 4, "num_stages": 3, "debug": false, "name": "{name}"}}"#
            ),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("__grp__{name}.json")),
            format!(r#"{{"child_paths": {{"{name}.json": "x"}}}}"#),
        )
        .unwrap();
        std::fs::write(d.join(format!("{name}.cubin")), vec![0x7f; 100]).unwrap();
    }

    fn t(backend: GpuBackend, arch: &str, warp: u32) -> CacheTarget {
        CacheTarget {
            backend,
            arch: arch.into(),
            warp_size: warp,
        }
    }

    #[test]
    fn targets_are_the_distinct_set_over_all_kernels() {
        let d = tempfile::tempdir().unwrap();
        let cuda90 = r#"{"backend": "cuda", "arch": 90, "warp_size": 32}"#;
        kernel(d.path(), "AAA", "add", cuda90);
        kernel(d.path(), "BBB", "mul", cuda90);
        kernel(
            d.path(),
            "CCC",
            "add",
            r#"{"backend": "cuda", "arch": "sm_80", "warp_size": 32}"#,
        );
        kernel(
            d.path(),
            "DDD",
            "add",
            r#"{"backend": "hip", "arch": "gfx942", "warp_size": 64}"#,
        );
        // JSON that is not kernel metadata is ignored, and so is broken JSON.
        std::fs::write(
            d.path().join("cache_key_factors.json"),
            br#"{"target": "x"}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("broken.json"), b"{").unwrap();
        let s = scan(d.path(), CacheKind::Triton).unwrap();
        assert_eq!(
            s.found_targets,
            vec![
                t(GpuBackend::Cuda, "80", 32),
                t(GpuBackend::Cuda, "90", 32),
                t(GpuBackend::Hip, "gfx942", 64)
            ]
        );
        assert_eq!(s.entry_count, 4);
        assert_eq!(s.kernels.len(), 4);
        assert_eq!(s.kernels[0].path, "AAA/add.json");
        assert_eq!(s.kernels[0].num_warps, Some(4));
        assert_eq!(s.files, 4 * 3 + 2);
        assert_eq!(
            summary_json(&s.found_targets),
            r#"{"targets":[{"backend":"cuda","arch":"80","warp_size":32},{"backend":"cuda","arch":"90","warp_size":32},{"backend":"hip","arch":"gfx942","warp_size":64}]}"#
        );
        // And the agent reads that label back.
        let parsed = crate::gpu::Summary::parse(&summary_json(&s.found_targets)).unwrap();
        assert_eq!(parsed.targets, s.found_targets);
    }

    #[test]
    fn vllm_targets_come_from_triton_caches_anywhere_in_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let tcc = d.path().join("torch_compile_cache");
        for h in ["d4ec7c2a7d", "edf531ca35"] {
            let tc = tcc.join(h).join("rank_0_0/triton_cache");
            kernel(
                &tc,
                "CLGERUUZ",
                "triton_poi_fused_cat_1",
                r#"{"backend": "hip", "arch": "gfx90a", "warp_size": 64}"#,
            );
            std::fs::write(tcc.join(h).join("rank_0_0/vllm_compile_cache.py"), b"{}").unwrap();
        }
        std::fs::create_dir_all(d.path().join("modelinfos")).unwrap();
        std::fs::write(d.path().join("modelinfos/llama.json"), br#"{"a": 1}"#).unwrap();
        let s = scan(d.path(), CacheKind::Vllm).unwrap();
        assert_eq!(s.found_targets, vec![t(GpuBackend::Hip, "gfx90a", 64)]);
        assert_eq!(s.entry_count, 2, "torch.compile cache entries");
        let m: serde_json::Value =
            serde_json::from_slice(&cache_manifest_json(&s, &s.found_targets)).unwrap();
        assert_eq!(m["vllm"][1]["vllmHash"], "edf531ca35");
        assert_eq!(m["vllm"][1]["TritonCacheEntries"][0]["arch"], "gfx90a");
    }

    /// Packing counts every byte of the cache's files, out of the total the scan found.
    #[test]
    fn packing_counts_the_files_bytes() {
        let d = tempfile::tempdir().unwrap();
        kernel(
            d.path(),
            "AAA",
            "add",
            r#"{"backend": "cuda", "arch": 90, "warp_size": 32}"#,
        );
        std::fs::write(d.path().join("AAA/big.bin"), vec![3u8; 300_000]).unwrap();
        let opts = BuildOptions {
            kind: CacheKind::Triton,
            targets: vec![],
        };
        let progress = PackProgress::default();
        let image = build_with(d.path(), &opts, &progress).unwrap();
        assert!(image.size_bytes > 300_000, "{}", image.size_bytes);
        assert_eq!(progress.total(), image.size_bytes);
        assert_eq!(progress.done(), image.size_bytes);
    }

    #[test]
    fn no_targets_is_an_error_unless_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("torch_compile_cache/abc")).unwrap();
        std::fs::write(d.path().join("torch_compile_cache/abc/x.py"), b"pass").unwrap();
        let opts = BuildOptions {
            kind: CacheKind::Vllm,
            targets: vec![],
        };
        let e = build(d.path(), &opts).unwrap_err();
        assert!(matches!(e, BuildError::NoTargets { .. }), "{e}");
        assert!(e.to_string().contains("--target"), "{e}");
        let opts = BuildOptions {
            targets: vec![parse_target("cuda:sm_90:32").unwrap()],
            ..opts
        };
        let img = build(d.path(), &opts).unwrap();
        assert_eq!(
            img.labels["cache.vllm.image/summary"],
            r#"{"targets":[{"backend":"cuda","arch":"90","warp_size":32}]}"#
        );
        assert_eq!(img.labels["cache.vllm.image/entry-count"], "1");
    }

    #[test]
    fn target_flags_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_target("hip:gfx90a:xnack-:64").unwrap(),
            t(GpuBackend::Hip, "gfx90a", 64)
        );
        assert_eq!(
            parse_target("CUDA:9.0:32").unwrap(),
            t(GpuBackend::Cuda, "90", 32)
        );
        for bad in [
            "cuda",
            "cuda:90",
            "xpu:pvc:16",
            "cuda::32",
            "cuda:90:x",
            "cuda:90:0",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_with_an_unusable_target_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        kernel(
            d.path(),
            "AAA",
            "k",
            r#"{"backend": "xpu", "arch": "pvc", "warp_size": 16}"#,
        );
        let e = scan(d.path(), CacheKind::Triton).unwrap_err().to_string();
        assert!(e.contains("AAA/k.json") && e.contains("xpu"), "{e}");
        let d = tempfile::tempdir().unwrap();
        kernel(d.path(), "AAA", "k", r#"{"backend": "cuda", "arch": 90}"#);
        let e = scan(d.path(), CacheKind::Triton).unwrap_err().to_string();
        assert!(e.contains("warp_size"), "{e}");
    }

    #[test]
    fn links_must_stay_inside_and_special_files_are_refused() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(link_stays_inside(Path::new("a/l"), Path::new("./x/../y")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../b")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("/etc/passwd")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("..")));

        let d = tempfile::tempdir().unwrap();
        kernel(
            d.path(),
            "AAA",
            "k",
            r#"{"backend": "cuda", "arch": 90, "warp_size": 32}"#,
        );
        symlink("../../etc/passwd", d.path().join("AAA/evil")).unwrap();
        let e = scan(d.path(), CacheKind::Triton).unwrap_err();
        assert!(matches!(e, BuildError::LinkOutside { .. }), "{e}");
        std::fs::remove_file(d.path().join("AAA/evil")).unwrap();
        symlink("k.cubin", d.path().join("AAA/ok")).unwrap();
        assert!(scan(d.path(), CacheKind::Triton).is_ok());

        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = scan(d.path(), CacheKind::Triton).unwrap_err();
        assert!(e.to_string().contains("named pipe"), "{e}");
    }

    #[test]
    fn modes_are_kept_and_made_readable_by_all() {
        assert_eq!(readable(0o600, false), 0o644);
        assert_eq!(readable(0o644, false), 0o644);
        assert_eq!(readable(0o700, false), 0o755);
        assert_eq!(readable(0o4750, false), 0o755);
        assert_eq!(readable(0o700, true), 0o755);
        assert_eq!(readable(0o1777, true), 0o777);
        assert_eq!(readable(0o664, false), 0o664);
    }

    #[test]
    fn an_inductor_tree_records_triton_versions_launcher_abis_and_the_capture_path() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("triton/0/KEYA");
        std::fs::create_dir_all(&key).unwrap();
        std::fs::write(
            key.join("k.json"),
            br#"{"name":"k","triton_version":"3.6.0","target":{"backend":"cuda","arch":90,"warp_size":32}}"#,
        )
        .unwrap();
        std::fs::write(
            key.join("__grp__k.json"),
            br#"{"child_paths":{"k.json":"/tmp/ic/triton/0/KEYA/k.json","k.cubin":"/tmp/ic/triton/0/KEYA/k.cubin"}}"#,
        )
        .unwrap();
        let helper = d.path().join("triton/0/KEYB");
        std::fs::create_dir_all(&helper).unwrap();
        std::fs::write(
            helper.join("__triton_launcher.cpython-312-x86_64-linux-gnu.so"),
            b"\x7fELF",
        )
        .unwrap();
        // Triton's staging folder of an interrupted write is no part of the cache.
        std::fs::create_dir_all(d.path().join("triton/0/KEYA/tmp.pid_7_abc")).unwrap();
        std::fs::create_dir_all(d.path().join("fxgraph/ab")).unwrap();
        std::fs::write(d.path().join("fxgraph/ab/entry"), b"graph").unwrap();

        let img = build(
            d.path(),
            &BuildOptions {
                kind: CacheKind::Inductor,
                targets: vec![],
            },
        )
        .unwrap();
        let labels = CacheLabels::read(&img.labels);
        assert_eq!(labels.kind, Some(CacheKind::Inductor));
        assert_eq!(labels.triton_versions, ["3.6.0"]);
        assert_eq!(labels.python_abis, ["cpython-312-x86_64-linux-gnu"]);
        assert_eq!(labels.capture_path.as_deref(), Some("/tmp/ic"));
        assert!(
            img.labels.contains_key("cache.inductor.image/summary"),
            "{:?}",
            img.labels
        );
        let s = scan(d.path(), CacheKind::Inductor).unwrap();
        assert!(
            !s.nodes
                .iter()
                .any(|n| n.rel.to_string_lossy().contains("tmp.pid_")),
            "staging folders are left out"
        );
    }

    #[test]
    fn the_layer_is_deterministic_and_holds_the_mcv_layout() {
        let d = tempfile::tempdir().unwrap();
        kernel(
            d.path(),
            "BBB",
            "k",
            r#"{"backend": "cuda", "arch": 90, "warp_size": 32}"#,
        );
        kernel(
            d.path(),
            "AAA",
            "k",
            r#"{"backend": "cuda", "arch": 90, "warp_size": 32}"#,
        );
        std::fs::set_permissions(
            d.path().join("AAA/k.cubin"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let opts = BuildOptions {
            kind: CacheKind::Triton,
            targets: vec![],
        };
        let a = build(d.path(), &opts).unwrap();
        // Touch every file: times do not enter the image.
        let f = std::fs::File::options()
            .write(true)
            .open(d.path().join("BBB/k.cubin"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        let b = build(d.path(), &opts).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.layer.digest, b.layer.digest);

        let gz = std::fs::File::open(&a.layer.path).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(
                (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
                (0, 0, 0)
            );
            let p = e.path().unwrap().display().to_string();
            if p == "io.triton.cache/AAA/k.cubin" {
                assert_eq!(h.mode().unwrap(), 0o755);
            }
            names.push(p);
        }
        assert_eq!(names[0].trim_end_matches('/'), "io.triton.cache");
        assert!(names[1].starts_with("io.triton.cache/AAA"), "{names:?}");
        assert_eq!(names.last().unwrap(), "io.triton.manifest/manifest.json");
        let cfg: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"][0], a.layer.diff_id);
        assert_eq!(
            cfg["config"]["Labels"]["cache.triton.image/entry-count"],
            "2"
        );
        assert_eq!(
            cfg["config"]["Labels"]["cache.triton.image/cache-size-bytes"],
            a.size_bytes.to_string()
        );
    }
}
