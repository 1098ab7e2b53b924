//! GKM, the GPU Kernel Manager: the library behind the node agent (which is also the CSI
//! node plugin), the `gkm` CLI and the controller crate.
//!
//! One module per concern:
//! - [`api`]: the custom resources and the names other programs depend on.

pub mod api;
