//! GKM, the GPU Kernel Manager: the `gkm` CLI and the `gkm-agent` binary, and one library
//! that re-exports the crates below them so every GKM path reads `gkm::<module>`.
//!
//! The crates, from the bottom (docs/architecture.md draws them):
//! - `gkm-api` ([`api`]): the custom resources, [`api::CacheRef`], statuses, the CSI
//!   volume contract. Plain types, no IO.
//! - `gkm-image`: [`gpu`] compatibility, [`kernel_cache`] formats, [`oci`], [`trust`],
//!   [`promote`], [`cmdline`], [`metrics`], [`health`]. What the controller links.
//! - `gkm-node`: [`store`], [`csi`], [`agent`], GPU discovery ([`gpu`] here is the
//!   node's, which re-exports the compatibility check). What only a node runs.
//! - this crate: [`cli`] (what the `gkm` commands do) and [`build`] (`gkm build`).

pub use gkm_api as api;
pub use gkm_image::{
    cmdline, health, init_logging, install_crypto, kernel_cache, metrics, oci, promote, trust,
};
pub use gkm_node::{agent, csi, gpu, store};

pub mod build;
pub mod cli;
