//! Test images, built here and pushed to a [`Registry`] over the distribution API.
//!
//! The builder writes layers with the `tar` crate and pushes blobs and manifests itself, so
//! tests control every byte: compression (gzip, zstd, none), OCI or Docker media types,
//! whiteouts, multi-platform indexes, and the kernel-cache (MCV) layout with its labels.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Error, Registry};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaTypes {
    Oci,
    Docker,
}

/// The two kinds of kernel cache that MCV images carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    Triton,
    Inductor,
    Vllm,
}

impl CacheKind {
    /// `triton`, `inductor` or `vllm`: `io.<kind>.cache/` in the layer,
    /// `cache.<kind>.image/` labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheKind::Triton => "triton",
            CacheKind::Inductor => "inductor",
            CacheKind::Vllm => "vllm",
        }
    }
}

/// One GPU target a cache was compiled for (the `summary` label's `targets[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub backend: String,
    pub arch: String,
    pub warp_size: u32,
}

impl Target {
    pub fn new(backend: &str, arch: &str, warp_size: u32) -> Self {
        Self {
            backend: backend.into(),
            arch: arch.into(),
            warp_size,
        }
    }
}

/// A compressed layer blob and the digest of its uncompressed tar (the config's diff id).
#[derive(Clone, Debug)]
pub struct Layer {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub diff_id: String,
}

/// Writes one layer's tar stream.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Complete);
        Self { tar }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, path, std::io::empty())
            .expect("appending to an in-memory tar");
        self
    }

    pub fn file(&mut self, path: &str, content: &[u8], mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, content.len() as u64);
        self.tar
            .append_data(&mut h, path, content)
            .expect("appending to an in-memory tar");
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path, target)
            .expect("appending to an in-memory tar");
        self
    }

    /// An OCI whiteout: `<dir>/.wh.<name>` deletes `<name>` of lower layers.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, b"", 0o644)
    }

    /// An opaque whiteout: lower layers' content of `dir` is hidden.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// Appends `bytes` as they are: whole 512-byte blocks from [`raw_entry`], for entries
    /// tar-rs refuses to write.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.tar.get_mut().extend_from_slice(bytes);
        self
    }

    /// Adds every entry below `src` under `prefix/`, in sorted order, with its mode.
    /// Returns the number of regular files and their total size.
    pub fn tree(&mut self, src: &Path, prefix: &str) -> Result<(u64, u64), Error> {
        let mut files = 0;
        let mut bytes = 0;
        self.dir(prefix, 0o755);
        walk(src, &mut |path, meta| {
            use std::os::unix::fs::PermissionsExt;
            let rel = path
                .strip_prefix(src)
                .expect("walk yields paths below its root");
            let name = format!("{prefix}/{}", rel.display());
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(path)
                    .map_err(|e| Error::io(format!("reading link {}", path.display()), e))?;
                self.symlink(&name, &target.to_string_lossy());
            } else if meta.is_dir() {
                self.dir(&name, mode);
            } else {
                let content = std::fs::read(path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                files += 1;
                bytes += content.len() as u64;
                self.file(&name, &content, mode);
            }
            Ok(())
        })?;
        Ok((files, bytes))
    }

    /// Finishes the tar stream and compresses it.
    pub fn finish(self, compression: Compression, media: MediaTypes) -> Layer {
        let tar = self.tar.into_inner().expect("finishing an in-memory tar");
        let diff_id = sha256_digest(&tar);
        let (bytes, suffix) = match compression {
            Compression::None => (tar, ""),
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&tar).expect("gzip into memory");
                (enc.finish().expect("gzip into memory"), "+gzip")
            }
            Compression::Zstd => (
                zstd::encode_all(&tar[..], 3).expect("zstd into memory"),
                "+zstd",
            ),
        };
        let media_type = match (media, compression) {
            (MediaTypes::Oci, _) => format!("application/vnd.oci.image.layer.v1.tar{suffix}"),
            (MediaTypes::Docker, Compression::Gzip) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip".into()
            }
            (MediaTypes::Docker, _) => "application/vnd.docker.image.rootfs.diff.tar".into(),
        };
        Layer {
            media_type,
            bytes,
            diff_id,
        }
    }
}

/// One tar entry as raw bytes with unchecked fields, what an attacker can write and tar-rs
/// will not (`.wh...`, PAX and GNU extension headers of any size): a ustar header of type
/// `kind` whose size field says `size` (whatever `data` is), then `data` padded to whole
/// 512-byte blocks. `name` and `link` are at most 100 bytes.
pub fn raw_entry(name: &[u8], kind: u8, size: u64, link: &[u8], mode: u32, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    let fields = h.as_old_mut();
    fields.name[..name.len()].copy_from_slice(name);
    fields.linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn walk(
    dir: &Path,
    f: &mut dyn FnMut(&Path, &std::fs::Metadata) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        f(&path, &meta)?;
        if meta.is_dir() {
            walk(&path, f)?;
        }
    }
    Ok(())
}

/// An image to push: layers, config labels, media types and platform.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    pub layers: Vec<Layer>,
    pub labels: BTreeMap<String, String>,
    pub media: MediaTypes,
    pub os: String,
    pub architecture: String,
    /// The config's `Entrypoint` (a runnable image; empty for data images).
    pub entrypoint: Vec<String>,
    /// The config's `Env` (`NAME=value`).
    pub env: Vec<String>,
}

impl ImageBuilder {
    pub fn new(media: MediaTypes) -> Self {
        Self {
            layers: Vec::new(),
            labels: BTreeMap::new(),
            media,
            os: "linux".into(),
            architecture: "amd64".into(),
            entrypoint: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A runnable image: `Entrypoint` and `Env` of its config.
    pub fn runnable(mut self, entrypoint: &[&str], env: &[&str]) -> Self {
        self.entrypoint = entrypoint.iter().map(|s| s.to_string()).collect();
        self.env = env.iter().map(|s| s.to_string()).collect();
        self
    }

    /// A kernel-cache image in the MCV layout: one layer holding `io.<kind>.cache/` (the
    /// content of `cache_dir`) and `io.<kind>.manifest/manifest.json`, with the
    /// `cache.<kind>.image/{summary,entry-count,cache-size-bytes}` labels.
    pub fn mcv(
        kind: CacheKind,
        cache_dir: &Path,
        targets: &[Target],
        compression: Compression,
    ) -> Result<Self, Error> {
        let k = kind.as_str();
        let summary = json!({
            "targets": targets.iter().map(|t| json!({
                "backend": t.backend, "arch": t.arch, "warp_size": t.warp_size,
            })).collect::<Vec<_>>(),
        });
        let mut layer = LayerBuilder::new();
        let (entries, size) = layer.tree(cache_dir, &format!("io.{k}.cache"))?;
        let manifest = json!({"kind": k, "summary": summary, "entries": entries});
        layer.dir(&format!("io.{k}.manifest"), 0o755);
        layer.file(
            &format!("io.{k}.manifest/manifest.json"),
            manifest.to_string().as_bytes(),
            0o644,
        );
        let mut image = Self::new(MediaTypes::Oci);
        image
            .layers
            .push(layer.finish(compression, MediaTypes::Oci));
        image
            .labels
            .insert(format!("cache.{k}.image/summary"), summary.to_string());
        image
            .labels
            .insert(format!("cache.{k}.image/entry-count"), entries.to_string());
        image.labels.insert(
            format!("cache.{k}.image/cache-size-bytes"),
            size.to_string(),
        );
        Ok(image)
    }

    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn platform(mut self, os: &str, architecture: &str) -> Self {
        self.os = os.into();
        self.architecture = architecture.into();
        self
    }

    /// The config blob.
    pub fn config(&self) -> Vec<u8> {
        let mut config = json!({"Labels": self.labels});
        if !self.entrypoint.is_empty() {
            config["Entrypoint"] = json!(self.entrypoint);
        }
        if !self.env.is_empty() {
            config["Env"] = json!(self.env);
        }
        let doc = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": self.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()},
        });
        serde_json::to_vec(&doc).expect("JSON into memory")
    }

    /// The manifest for `config`.
    pub fn manifest(&self, config: &[u8]) -> (String, Vec<u8>) {
        let (mt, cfg_mt) = match self.media {
            MediaTypes::Oci => (OCI_MANIFEST, OCI_CONFIG),
            MediaTypes::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
        };
        let doc = json!({
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": cfg_mt, "digest": sha256_digest(config), "size": config.len()},
            "layers": self.layers.iter().map(|l| json!({
                "mediaType": l.media_type, "digest": sha256_digest(&l.bytes), "size": l.bytes.len(),
            })).collect::<Vec<_>>(),
        });
        (
            mt.to_string(),
            serde_json::to_vec(&doc).expect("JSON into memory"),
        )
    }

    /// Pushes blobs and manifest; `tag` None pushes by digest only.
    pub async fn push(
        &self,
        registry: &Registry,
        repo: &str,
        tag: Option<&str>,
    ) -> Result<PushedImage, Error> {
        let config = self.config();
        for layer in &self.layers {
            push_blob(registry, repo, &layer.bytes).await?;
        }
        push_blob(registry, repo, &config).await?;
        let (media_type, manifest) = self.manifest(&config);
        let digest = sha256_digest(&manifest);
        push_manifest(
            registry,
            repo,
            tag.unwrap_or(&digest),
            &media_type,
            &manifest,
        )
        .await?;
        Ok(PushedImage {
            repository: format!("{}/{repo}", registry.host()),
            tag: tag.map(str::to_string),
            digest,
            media_type,
            manifest,
        })
    }
}

/// What a push left in the registry.
#[derive(Clone, Debug)]
pub struct PushedImage {
    /// `host:port/repo`.
    pub repository: String,
    pub tag: Option<String>,
    /// Digest of the manifest (or index) bytes.
    pub digest: String,
    pub media_type: String,
    pub manifest: Vec<u8>,
}

impl PushedImage {
    /// `host:port/repo@sha256:…`.
    pub fn by_digest(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }

    /// `host:port/repo:tag` (panics for an image pushed without a tag).
    pub fn by_tag(&self) -> String {
        format!(
            "{}:{}",
            self.repository,
            self.tag.as_deref().expect("image was pushed with a tag")
        )
    }
}

/// Pushes an index of already pushed images, each with its `(os, architecture)`.
pub async fn push_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
    images: &[(&PushedImage, &str, &str)],
) -> Result<PushedImage, Error> {
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": images.iter().map(|(img, os, arch)| json!({
            "mediaType": img.media_type, "digest": img.digest, "size": img.manifest.len(),
            "platform": {"os": os, "architecture": arch},
        })).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&doc).expect("JSON into memory");
    push_manifest(registry, repo, tag, OCI_INDEX, &bytes).await?;
    Ok(PushedImage {
        repository: format!("{}/{repo}", registry.host()),
        tag: Some(tag.into()),
        digest: sha256_digest(&bytes),
        media_type: OCI_INDEX.into(),
        manifest: bytes,
    })
}

fn http() -> reqwest::Client {
    crate::http_builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("building an HTTP client")
}

/// Uploads `bytes` as a blob (monolithic upload) unless the registry has it; returns its
/// digest.
pub async fn push_blob(registry: &Registry, repo: &str, bytes: &[u8]) -> Result<String, Error> {
    let digest = sha256_digest(bytes);
    let base = registry.base_url();
    let http = http();
    let err =
        |what: &str, e: reqwest::Error| Error::Registry(format!("{what} {repo} {digest}: {e}"));
    let head = http
        .head(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .map_err(|e| err("HEAD blob", e))?;
    if head.status().is_success() {
        return Ok(digest);
    }
    let start = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .map_err(|e| err("starting upload of", e))?;
    let location = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Error::Registry(format!(
                "upload start for {repo} returned {} without Location",
                start.status()
            ))
        })?
        .to_string();
    let mut url = if location.starts_with("http") {
        location
    } else {
        format!("{base}{location}")
    };
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str(&format!("digest={digest}"));
    let put = http
        .put(url)
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .map_err(|e| err("uploading", e))?;
    if !put.status().is_success() {
        return Err(Error::Registry(format!(
            "uploading blob {digest} to {repo}: {}",
            put.status()
        )));
    }
    Ok(digest)
}

/// Puts a manifest (or index) under `reference` (a tag or its digest); returns the digest.
pub async fn push_manifest(
    registry: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<String, Error> {
    let url = format!("{}/v2/{repo}/manifests/{reference}", registry.base_url());
    let put = http()
        .put(url)
        .header("content-type", media_type)
        .body(bytes.to_vec())
        .send()
        .await
        .map_err(|e| Error::Registry(format!("pushing manifest {repo}:{reference}: {e}")))?;
    if !put.status().is_success() {
        let status = put.status();
        let body = put.text().await.unwrap_or_default();
        return Err(Error::Registry(format!(
            "pushing manifest {repo}:{reference}: {status} {body}"
        )));
    }
    Ok(sha256_digest(bytes))
}
