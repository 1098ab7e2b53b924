//! GKM's test harness: the real components GKM meets in production, started on this
//! machine for a test and stopped after it.
//!
//! - [`Cluster`]: etcd and kube-apiserver on free loopback ports with a throwaway PKI,
//!   GKM's CRDs installed, and `kube::Client`s for an admin, static-token users and
//!   service accounts.
//! - [`Registry`]: an OCI registry (`crane registry serve`, with the referrers API).
//! - [`image`]: builds and pushes images in the kernel-cache (MCV) layout.
//! - [`Cosign`]: a cosign key pair; signs and verifies with the real cosign.
//! - [`node::TestNode`]: a real kubelet, containerd and runc node running `gkm-agent`,
//!   in a private mount namespace; [`controller::ControllerProcess`]: `gkm-controller`
//!   with its webhooks registered.
//! - [`triton::Triton`]: PyPI's Triton, compiling real kernels for GPU targets on the CPU and
//!   deciding, with its own cache manager, whether a delivered cache hits.
//!
//! Processes never outlive the test process (see [`process`]). One cluster and one
//! registry may be shared across a test binary ([`shared_cluster`], [`shared_registry`]);
//! tests keep apart by using unique namespaces and repositories, and make their own
//! clients (a `kube::Client` belongs to the tokio runtime it was made on).

pub mod agent;
pub mod auth_registry;
pub mod cluster;
pub mod controller;
pub mod cosign;
pub mod faulty;
pub mod fixtures;
pub mod image;
pub mod node;
pub mod pki;
pub mod process;
pub mod registry;
pub mod tools;
pub mod triton;
pub mod webhooks;

use std::path::PathBuf;
use std::time::Duration;

pub use cluster::{Cluster, ClusterOptions, shared_cluster};
pub use cosign::Cosign;
pub use registry::{Registry, shared_registry};
pub use tools::Tool;

/// Everything that can go wrong while starting or driving the real components.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{tool} not found at {looked_at}: {hint}")]
    ToolMissing {
        tool: &'static str,
        looked_at: PathBuf,
        hint: String,
    },
    #[error("port {port} ({what}) is already in use on 127.0.0.1")]
    PortInUse { port: u16, what: String },
    #[error("could not start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}) before it was ready; its log ends with:\n{log_tail}")]
    Exited {
        name: String,
        status: String,
        log_tail: String,
    },
    #[error("{name}: {what} not ready after {after:?}; its log ends with:\n{log_tail}")]
    NotReady {
        name: String,
        what: String,
        after: Duration,
        log_tail: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("kubernetes: {context}: {source}")]
    Kube {
        context: String,
        source: kube::Error,
    },
    #[error("registry: {0}")]
    Registry(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            context: context.into(),
            source,
        }
    }
}

/// A `reqwest` client builder whose TLS uses the same crypto provider (ring) as kube's.
pub fn http_builder() -> reqwest::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Err only when another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// The workspace root (where `deploy/` lives), found at run time: cargo sets
/// `CARGO_MANIFEST_DIR` for test and bench processes; otherwise the working directory.
/// Never a path baked in at compile time: builds are shared between clones through the
/// target directory, and a baked-in path would point at another checkout.
pub fn workspace_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    start
        .ancestors()
        .find(|d| d.join("deploy/crds").is_dir() && d.join("Cargo.toml").is_file())
        .map(std::path::Path::to_path_buf)
        .unwrap_or(start)
}

/// A binary of this workspace, next to the running test's own build (`target/<profile>/`),
/// built with cargo first when it is not there: a test of one package may run another
/// package's program, which cargo builds only for that package's own tests.
///
/// Panics when the build fails: a test cannot run without it.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("a test binary under target/<profile>/deps");
    let path = dir.join(bin);
    if !path.exists() {
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args(["build", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
    }
    path
}

/// A name unique within this machine, for namespaces and repositories: `<prefix>-<suffix>`.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{:x}{:x}{n}",
        std::process::id() & 0xffff,
        nanos & 0xfff
    )
}

/// Runs a blocking start function's future on a private runtime in its own thread, so a
/// shared component can be started from any test, async or not.
pub(crate) fn run_detached<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime")
            .block_on(f())
    })
    .join()
    .expect("a testenv start thread panicked")
}
