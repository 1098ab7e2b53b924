//! A `gkm-controller` process for end-to-end runs: serving certificate from a throwaway CA,
//! a trust policy that trusts one cosign key, the cache webhooks and the Pod environment
//! webhook registered by URL for the namespaces carrying one label. The caller passes the
//! binary (cargo's `CARGO_BIN_EXE_gkm-controller`, or a build directory).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::pki::Ca;
use crate::process::{ServerProcess, free_port};
use crate::{Cluster, Error};

/// How to start a controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// The `gkm-controller` binary.
    pub binary: PathBuf,
    /// The trust policy (YAML).
    pub policy: String,
    /// Registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The namespace label the webhooks apply to.
    pub label: (String, String),
}

/// A trust policy trusting `public_key_pem` for images under `trusted_registry`
/// (`host:port/` or a repository prefix).
pub fn key_policy(public_key_pem: &str, trusted_registry: &str) -> String {
    let indented: String = public_key_pem
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    format!(
        "authorities:\n  - name: test-key\n    key: |\n{indented}trustedRegistries:\n  - {trusted_registry}\n"
    )
}

/// A running controller with its webhooks registered.
pub struct ControllerProcess {
    process: ServerProcess,
    port: u16,
}

impl ControllerProcess {
    /// Starts the controller in `dir` against `cluster` (as admin) and registers its cache
    /// webhooks and Pod environment webhook (configurations named after the label value).
    pub async fn start(
        cluster: &Cluster,
        dir: &Path,
        o: &ControllerOptions,
    ) -> Result<Self, Error> {
        let ca = Ca::new("gkm-controller-ca")?;
        let serving = ca.server("gkm-webhook", &[])?;
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text)
                .map_err(|e| Error::io(format!("writing {name}"), e))
        };
        write("tls.crt", &serving.cert_pem)?;
        write("tls.key", &serving.key_pem)?;
        write("policy.yaml", &o.policy)?;
        let port = free_port()?;
        let mut args = vec![
            format!("--listen=127.0.0.1:{port}"),
            "--metrics-addr=127.0.0.1:0".to_string(),
            format!("--tls-cert={}", dir.join("tls.crt").display()),
            format!("--tls-key={}", dir.join("tls.key").display()),
            format!("--policy={}", dir.join("policy.yaml").display()),
            format!("--kubeconfig={}", cluster.admin_kubeconfig().display()),
            "--log=gkm=debug,gkm_controller=debug".to_string(),
        ];
        for r in &o.insecure_registries {
            args.push(format!("--insecure-registry={r}"));
        }
        let process = ServerProcess::start(
            &crate::unique_name("gkm-controller"),
            &o.binary,
            &args,
            &[],
            dir,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if process.exited().is_some() || Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: "gkm-controller".into(),
                    what: format!("admission on 127.0.0.1:{port}"),
                    after: Duration::from_secs(30),
                    log_tail: process.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let label = (o.label.0.as_str(), o.label.1.as_str());
        let name = format!("gkm-{}", o.label.1);
        crate::webhooks::register(cluster, &name, port, &ca.cert_pem, label).await?;
        crate::webhooks::register_pod_env(
            cluster,
            &format!("{name}-pod-env"),
            port,
            &ca.cert_pem,
            label,
        )
        .await?;
        Ok(Self { process, port })
    }

    /// The admission port.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log(&self) -> String {
        self.process.log_tail()
    }
}
