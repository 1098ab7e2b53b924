//! GKM, the GPU Kernel Manager: the library behind the node agent (which is also the CSI
//! node plugin), the `gkm` CLI and the controller crate.
//!
//! One module per concern:
//! - [`api`]: the custom resources and the names other programs depend on.
//! - [`gpu`]: this node's GPUs (NVML, KFD sysfs, simulated) and cache compatibility.
//! - [`oci`]: image references, credentials, digest-pinned pulls, hardened extraction.
//! - [`store`]: the node's content-addressed store, volume records, refcounts and GC.
//! - [`cli`]: what the `gkm` commands do.

pub mod api;
pub mod cli;
pub mod gpu;
pub mod oci;
pub mod store;
