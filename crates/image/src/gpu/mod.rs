//! Whether a kernel cache fits a set of GPUs: the pure half of GKM's GPU handling.
//!
//! - [`compat`]: the cache image's summary label (`{"targets":[...]}`) checked against
//!   GPUs: same backend, same arch, same warp size; [`Fitness`] is the one rule the CSI
//!   publish and the agent's node status share.
//!
//! Finding a node's GPUs (NVML, KFD sysfs, a simulated inventory) is IO and lives in
//! `gkm_node::gpu`, which re-exports this module's items beside its own.

pub mod compat;

pub use compat::{CacheTarget, Compatibility, Fitness, Summary, Verdict};

use crate::api::GpuBackend;

/// A cache's summary label is not the JSON GKM expects; `reason` names the label and says
/// what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("cache summary label: {reason}")]
pub struct SummaryError {
    pub reason: String,
}

/// The wire name of a backend (`cuda`, `hip`).
pub fn backend_name(backend: GpuBackend) -> &'static str {
    match backend {
        GpuBackend::Cuda => "cuda",
        GpuBackend::Hip => "hip",
    }
}
