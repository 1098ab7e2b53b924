//! What GKM reads from an image: manifests (and indexes), layer media types, config labels,
//! and the kernel-cache (MCV) layout.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Compression;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Media types a node accepts for a manifest fetch.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// The compression of a layer media type, or None for a type GKM does not extract.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    // OCI: ...layer.v1.tar[+gzip|+zstd] (and the nondistributable variants);
    // Docker: ...rootfs.diff.tar[.gzip].
    let mt = media_type.trim();
    if !(mt.starts_with("application/vnd.oci.image.layer.")
        || mt.starts_with("application/vnd.docker.image.rootfs."))
    {
        return None;
    }
    if mt.ends_with("tar+gzip") || mt.ends_with("tar.gzip") {
        Some(Compression::Gzip)
    } else if mt.ends_with("tar+zstd") {
        Some(Compression::Zstd)
    } else if mt.ends_with(".tar") || mt.ends_with("v1.tar") {
        Some(Compression::None)
    } else {
        None
    }
}

/// A content descriptor as manifests carry it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest or an index, as far as GKM reads them.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawManifest {
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub config: Option<RawConfigInner>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawConfigInner {
    #[serde(default, rename = "Labels")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// An image resolved down to one platform manifest: everything needed to extract it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageInfo {
    /// The repository it was pulled from (`registry/repo`).
    pub repository: String,
    /// The digest the image was named by (an index or a manifest).
    pub digest: String,
    /// The platform manifest's digest (equal to `digest` when that is no index).
    pub manifest_digest: String,
    pub layers: Vec<Descriptor>,
    /// Config labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ImageInfo {
    /// Total compressed bytes of the layers.
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// The `cache.<kind>.image/summary` label and its kind (`triton`, `vllm`), if present.
    pub fn summary_label(&self) -> Option<(&'static str, &str)> {
        for kind in ["triton", "vllm"] {
            if let Some(v) = self.labels.get(&format!("cache.{kind}.image/summary")) {
                return Some((kind, v.as_str()));
            }
        }
        None
    }
}

/// Where in an extracted image the pod's view starts.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheLayout {
    /// MCV Triton cache: the pod sees `io.triton.cache/`.
    Triton,
    /// MCV vLLM cache: the pod sees `io.vllm.cache/`.
    Vllm,
    /// Any other image: the pod sees the image root.
    Plain,
}

impl CacheLayout {
    /// Detects the layout of an extracted root.
    pub fn detect(rootfs: &Path) -> Self {
        let is_dir = |p: &str| std::fs::symlink_metadata(rootfs.join(p)).is_ok_and(|m| m.is_dir());
        if is_dir("io.triton.cache") {
            CacheLayout::Triton
        } else if is_dir("io.vllm.cache") {
            CacheLayout::Vllm
        } else {
            CacheLayout::Plain
        }
    }

    /// The folder below the image root that the pod sees, if not the root.
    pub fn subdir(self) -> Option<&'static str> {
        match self {
            CacheLayout::Triton => Some("io.triton.cache"),
            CacheLayout::Vllm => Some("io.vllm.cache"),
            CacheLayout::Plain => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_media_types_map_to_compression() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some(None)),
            (
                "application/vnd.dev.cosign.simplesigning.v1+json",
                Option::None,
            ),
            ("application/vnd.oci.image.layer.v1.tar+bzip2", Option::None),
        ] {
            assert_eq!(layer_compression(mt), c, "{mt}");
        }
    }

    #[test]
    fn layout_is_detected_from_the_tree() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(CacheLayout::detect(d.path()), CacheLayout::Plain);
        std::fs::create_dir(d.path().join("io.vllm.cache")).unwrap();
        assert_eq!(CacheLayout::detect(d.path()), CacheLayout::Vllm);
        std::fs::create_dir(d.path().join("io.triton.cache")).unwrap();
        assert_eq!(
            CacheLayout::detect(d.path()).subdir(),
            Some("io.triton.cache")
        );
    }
}
