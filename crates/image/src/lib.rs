//! GKM's image and trust layer: everything about a kernel cache *image*, with no node
//! state, no mounts and no CSI. The controller, the node agent and the `gkm` CLI all
//! build on it.
//!
//! One module per concern (each uses only those listed after it):
//! - [`promote`]: verify an incoming image and copy it, with its signatures, into the
//!   trusted registry; [`promote::client`] is the developer's side.
//! - [`trust`]: the trust policy and signature verification of images, fail-closed.
//! - [`oci`]: image references, credentials, digest-pinned pulls, hardened extraction,
//!   pushes and cross-registry copies.
//! - [`kernel_cache`]: the kernel cache formats (Triton metadata and group files, Inductor
//!   trees, image labels), path views, and what a pod compiled on a miss.
//! - [`gpu`]: whether a cache's GPU targets fit a set of GPUs (pure; finding the node's
//!   GPUs is `gkm_node::gpu`).
//! - [`cmdline`]: the command-line argument groups and config checks the binaries share.
//! - [`metrics`]: Prometheus metrics; [`health`]: the plain-HTTP health and metrics
//!   endpoints of the agent and the controller.
//!
//! [`api`] is `gkm_api`, re-exported so paths read `crate::api::…` as before the split.

pub use gkm_api as api;

pub mod cmdline;
pub mod gpu;
pub mod health;
pub mod kernel_cache;
pub mod metrics;
pub mod oci;
pub mod promote;
pub mod trust;

/// Installs ring as the process's TLS crypto provider (kube's choice), so every TLS client
/// in the process (kube, the registry client) agrees. Idempotent; binaries call it first.
pub fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only if a provider was installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Logs to stderr (stdout stays for a command's output), as text or JSON lines, filtered
/// by `filter` (e.g. `info` or `info,gkm=debug`).
pub fn init_logging(
    filter: &str,
    json: bool,
) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    Ok(())
}
