//! GKM, the GPU Kernel Manager: the library behind the node agent (which is also the CSI
//! node plugin), the `gkm` CLI and the controller crate.
//!
//! One module per concern:
//! - [`agent`]: the node agent's configuration and wiring (`gkm-agent`).
//! - [`api`]: the custom resources and the names other programs depend on.
//! - [`kernel_cache`]: the kernel cache formats (Triton metadata and group files, Inductor
//!   trees, image labels), path views, and what a pod compiled on a miss.
//! - [`gpu`]: this node's GPUs (NVML, KFD sysfs, simulated) and cache compatibility.
//! - [`oci`]: image references, credentials, digest-pinned pulls, hardened extraction,
//!   pushes and cross-registry copies.
//! - [`promote`]: verify an incoming image and copy it, with its signatures, into the
//!   trusted registry.
//! - [`store`]: the node's content-addressed store, volume records, refcounts and GC.
//! - [`trust`]: the trust policy and signature verification of images, fail-closed.
//! - [`csi`]: the CSI node plugin `csi.gkm.io` (Identity and Node services).
//! - [`cli`]: what the `gkm` commands do.
//! - [`metrics`]: the agent's Prometheus metrics; [`health`]: the plain-HTTP health and
//!   metrics endpoints of the agent and the controller.

pub mod agent;
pub mod api;
pub mod build;
pub mod cli;
pub mod cmdline;
pub mod csi;
pub mod gpu;
pub mod health;
pub mod kernel_cache;
pub mod metrics;
pub mod oci;
pub mod promote;
pub mod store;
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
