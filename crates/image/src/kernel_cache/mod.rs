//! What GKM knows about kernel caches themselves: the kinds it packages, the image labels
//! that describe them, Triton's on-disk format, and the two things the node does with that
//! knowledge (path views that make a cache hit at the pod's mount path, and counting what a
//! pod compiled because the cache missed).
//!
//! `gkm build`, `gkm inspect`, the CSI plugin and the agent all read caches through this
//! module; nothing else parses Triton metadata or group files.
//!
//! - [`triton`]: kernel metadata (`<kernel>.json`), group files (`__grp__<kernel>.json`),
//!   launcher shared objects and their Python ABI tags.
//! - [`labels`]: the `cache.<kind>.image/*` labels of an image config.
//! - [`view`]: the rewritten group files of a cache for one mount path.
//! - [`misses`]: the kernels a pod compiled into its private layer, and why.

pub mod labels;
pub mod misses;
pub mod triton;
pub mod view;

use std::fmt;
use std::str::FromStr;

pub use labels::CacheLabels;
pub use view::MountBase;

/// The kinds of kernel cache an image carries, each in its own folder of the layer
/// (`io.<kind>.cache/`) with its own labels (`cache.<kind>.image/...`). `triton` and `vllm`
/// are the MCV layouts of the earlier GKM's image tool; `inductor` is GKM's, for
/// `torch.compile` caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheKind {
    /// A Triton cache directory (`TRITON_CACHE_DIR`).
    Triton,
    /// A PyTorch Inductor cache directory (`TORCHINDUCTOR_CACHE_DIR`): FX graphs, AOT
    /// autograd entries, generated modules, and Triton caches under `triton/<device>/`.
    Inductor,
    /// A vLLM cache root (`VLLM_CACHE_ROOT`, holding `torch_compile_cache/`).
    Vllm,
}

impl CacheKind {
    /// Every kind, in the order labels are looked up.
    pub const ALL: [CacheKind; 3] = [CacheKind::Triton, CacheKind::Inductor, CacheKind::Vllm];

    /// `triton`, `inductor` or `vllm`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheKind::Triton => "triton",
            CacheKind::Inductor => "inductor",
            CacheKind::Vllm => "vllm",
        }
    }

    /// `io.<kind>.cache`: the folder of the layer that holds the cache; the pod sees its
    /// content at the volume's mount path.
    pub fn cache_dir(self) -> String {
        format!("io.{}.cache", self.as_str())
    }

    /// `io.<kind>.manifest`: the folder of the layer that holds `manifest.json`.
    pub fn manifest_dir(self) -> String {
        format!("io.{}.manifest", self.as_str())
    }

    /// `cache.<kind>.image/<key>`: a config label.
    pub fn label(self, key: &str) -> String {
        format!("cache.{}.image/{key}", self.as_str())
    }

    /// The environment variable that points the framework at a cache directory of this
    /// kind: Triton's `TRITON_CACHE_DIR` (`triton.knobs.cache.dir`), PyTorch's
    /// `TORCHINDUCTOR_CACHE_DIR` (`torch._inductor.runtime.cache_dir_utils.cache_dir`),
    /// vLLM's `VLLM_CACHE_ROOT` (`vllm.envs`).
    pub fn env_var(self) -> &'static str {
        match self {
            CacheKind::Triton => "TRITON_CACHE_DIR",
            CacheKind::Inductor => "TORCHINDUCTOR_CACHE_DIR",
            CacheKind::Vllm => "VLLM_CACHE_ROOT",
        }
    }
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--kind` value that names no kind.
#[derive(Debug, thiserror::Error)]
#[error("kind {0:?}: expected `triton`, `inductor` or `vllm`")]
pub struct UnknownKind(pub String);

impl FromStr for CacheKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, UnknownKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "triton" => Ok(CacheKind::Triton),
            "inductor" | "torch-compile" | "torchinductor" => Ok(CacheKind::Inductor),
            "vllm" => Ok(CacheKind::Vllm),
            _ => Err(UnknownKind(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_name_their_folders_labels_and_variables() {
        assert_eq!(CacheKind::Inductor.cache_dir(), "io.inductor.cache");
        assert_eq!(CacheKind::Vllm.label("summary"), "cache.vllm.image/summary");
        assert_eq!(CacheKind::Triton.env_var(), "TRITON_CACHE_DIR");
        assert_eq!(CacheKind::Inductor.env_var(), "TORCHINDUCTOR_CACHE_DIR");
        for k in CacheKind::ALL {
            assert_eq!(k.as_str().parse::<CacheKind>().unwrap(), k);
        }
        assert!("cuda".parse::<CacheKind>().is_err());
    }
}
