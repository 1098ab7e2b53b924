//! A real OCI registry on loopback: `crane registry serve`, which has the referrers API.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{self, ServerProcess};
use crate::tools::{self, Tool};
use crate::{Error, run_detached};

/// A running registry serving plain HTTP on `127.0.0.1:<port>`.
pub struct Registry {
    host: String,
    dir: PathBuf,
    process: ServerProcess,
}

impl Registry {
    /// Starts a registry on a free port.
    pub async fn start() -> Result<Self, Error> {
        Self::start_on(None).await
    }

    /// Starts a registry on `port`, or on a free one.
    pub async fn start_on(port: Option<u16>) -> Result<Self, Error> {
        let crane = tools::locate(Tool::Crane)?;
        let port = match port {
            Some(p) => {
                process::ensure_port_free(p, "registry")?;
                p
            }
            None => process::free_port()?,
        };
        Self::launch("registry", &crane, &["registry", "serve"], port).await
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host)
    }

    pub fn process(&self) -> &ServerProcess {
        &self.process
    }

    /// Every request line the registry logged so far (`GET /v2/.../manifests/...`), for
    /// tests that assert what was (not) fetched.
    pub fn request_log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.process.stop();
        process::remove_work_dir(&self.dir);
    }
}

/// The registry shared by every test of this test binary, started on first use.
pub fn shared_registry() -> &'static Registry {
    static SHARED: OnceLock<Result<Registry, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        run_detached(|| Box::pin(async { Registry::start().await.map_err(|e| e.to_string()) }))
    });
    match started {
        Ok(r) => r,
        Err(e) => panic!("the shared test registry did not start: {e}"),
    }
}

impl Registry {
    /// Starts go-containerregistry's registry with the OCI 1.1 referrers API on (built by
    /// `scripts/install-tools.sh` as `referrers-registry` from `testenv/referrers-registry`),
    /// on a free port. cosign attaches Sigstore bundles to it as referrers, without the
    /// fallback tag that `crane registry serve` (no referrers API) gets.
    pub async fn start_with_referrers() -> Result<Self, Error> {
        let bin = tools::tools_bin_dir().join("referrers-registry");
        if !bin.is_file() {
            return Err(Error::ToolMissing {
                tool: "referrers-registry",
                looked_at: bin,
                hint: "run scripts/install-tools.sh (or set GKM_TOOLS_DIR)".into(),
            });
        }
        Self::launch("referrers-registry", &bin, &[], process::free_port()?).await
    }

    /// Runs `bin ARGS --address=127.0.0.1:PORT --disk=DIR` and waits for `/v2/`.
    async fn launch(
        name: &str,
        bin: &std::path::Path,
        args: &[&str],
        port: u16,
    ) -> Result<Self, Error> {
        let dir = process::work_dir("registry")?;
        let blobs = dir.join("blobs");
        // The registries write uploads into this folder but do not create it.
        std::fs::create_dir_all(&blobs)
            .map_err(|e| Error::io(format!("creating {}", blobs.display()), e))?;
        let host = format!("127.0.0.1:{port}");
        let mut argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        argv.push(format!("--address={host}"));
        argv.push(format!("--disk={}", blobs.display()));
        let process = ServerProcess::start(name, bin, &argv, &[], &dir)?;
        let http = crate::http_builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
        let url = format!("http://{host}/v2/");
        let ports = [(port, "listen port")];
        process
            .wait_ready("/v2/", &ports, Duration::from_secs(20), || {
                let req = http.get(&url);
                async move { matches!(req.send().await, Ok(r) if r.status().is_success()) }
            })
            .await?;
        Ok(Self { host, dir, process })
    }
}
