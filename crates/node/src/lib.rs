//! GKM's node side: what runs on a GPU node, privileged.
//!
//! One module per concern (each uses only those listed after it):
//! - [`agent`]: the node agent's configuration, watch, reconcile and node status
//!   (`gkm-agent`).
//! - [`csi`]: the CSI node plugin `csi.gkm.io` (Identity and Node services over gRPC,
//!   overlay mounts).
//! - [`pull_credentials`]: a cache's pull credentials, asked of the controller.
//! - [`store`]: the node's content-addressed store, volume records, refcounts and GC.
//! - [`gpu`]: this node's GPUs (NVML, KFD sysfs, simulated), with the compatibility check
//!   of `gkm_image::gpu` re-exported beside them.
//!
//! Below it: `gkm_image` (images, trust, formats) and `gkm_api` (types), imported at the
//! crate root so paths read `crate::oci::…` as before the split.

use gkm_api as api;
use gkm_image::{cmdline, health, kernel_cache, metrics, oci};

pub mod agent;
pub mod csi;
pub mod gpu;
pub mod pull_credentials;
pub mod store;
