//! What GKM reads from an image: manifests (and indexes), layer media types, config labels,
//! and the kernel-cache (MCV) layout.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Compression;
use crate::kernel_cache::CacheKind;

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

    /// The `cache.<kind>.image/summary` label and its kind (`triton`, `inductor`, `vllm`),
    /// if present.
    pub fn summary_label(&self) -> Option<(&'static str, &str)> {
        CacheKind::ALL.into_iter().find_map(|kind| {
            self.labels
                .get(&kind.label(crate::kernel_cache::labels::SUMMARY))
                .map(|v| (kind.as_str(), v.as_str()))
        })
    }

    /// What the `cache.<kind>.image/*` labels say.
    pub fn cache_labels(&self) -> crate::kernel_cache::CacheLabels {
        crate::kernel_cache::CacheLabels::read(&self.labels)
    }
}

/// Where in an extracted image the pod's view starts: the `io.<kind>.cache/` folder of an
/// MCV-layout image, else the image root. Written as `triton`, `inductor`, `vllm` or
/// `plain` in the store's metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum CacheLayout {
    /// An MCV-layout cache of this kind.
    Mcv(CacheKind),
    /// Any other image: the pod sees the image root.
    Plain,
}

impl CacheLayout {
    /// Detects the layout of an extracted root (the first kind whose folder exists).
    pub fn detect(rootfs: &Path) -> Self {
        let is_dir = |p: &str| std::fs::symlink_metadata(rootfs.join(p)).is_ok_and(|m| m.is_dir());
        CacheKind::ALL
            .into_iter()
            .find(|k| is_dir(&k.cache_dir()))
            .map_or(CacheLayout::Plain, CacheLayout::Mcv)
    }

    /// The folder below the image root that the pod sees, if not the root.
    pub fn subdir(self) -> Option<String> {
        match self {
            CacheLayout::Mcv(kind) => Some(kind.cache_dir()),
            CacheLayout::Plain => None,
        }
    }

    /// The kind of cache, if the image has the MCV layout.
    pub fn kind(self) -> Option<CacheKind> {
        match self {
            CacheLayout::Mcv(kind) => Some(kind),
            CacheLayout::Plain => None,
        }
    }
}

impl From<CacheLayout> for String {
    fn from(l: CacheLayout) -> String {
        l.kind().map_or("plain", CacheKind::as_str).to_string()
    }
}

impl TryFrom<String> for CacheLayout {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "plain" {
            return Ok(CacheLayout::Plain);
        }
        s.parse()
            .map(CacheLayout::Mcv)
            .map_err(|e: crate::kernel_cache::UnknownKind| e.to_string())
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
        assert_eq!(
            CacheLayout::detect(d.path()),
            CacheLayout::Mcv(CacheKind::Vllm)
        );
        std::fs::create_dir(d.path().join("io.triton.cache")).unwrap();
        assert_eq!(
            CacheLayout::detect(d.path()).subdir().as_deref(),
            Some("io.triton.cache")
        );
        for l in [CacheLayout::Plain, CacheLayout::Mcv(CacheKind::Inductor)] {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(serde_json::from_str::<CacheLayout>(&json).unwrap(), l);
        }
        assert_eq!(
            serde_json::from_str::<CacheLayout>("\"triton\"").unwrap(),
            CacheLayout::Mcv(CacheKind::Triton),
            "metadata written before the inductor kind still reads"
        );
    }
}
