//! Configuration (parsed and checked in one place) and the wiring of the admission server,
//! the trust policy (reloaded when its file changes) and the status controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tracing::{info, warn};

use crate::verify::TrustVerifier;
use crate::webhook::Admission;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gkm-controller",
    version,
    about = "GKM admission webhook and status controller"
)]
pub struct Args {
    /// Address of the HTTPS admission server.
    #[arg(long, env = "GKM_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Serving certificate (PEM chain) and key of the admission server.
    #[arg(long, env = "GKM_TLS_CERT", default_value = "/etc/gkm/tls/tls.crt")]
    pub tls_cert: PathBuf,
    #[arg(long, env = "GKM_TLS_KEY", default_value = "/etc/gkm/tls/tls.key")]
    pub tls_key: PathBuf,
    /// The trust policy (a mounted ConfigMap); reloaded when it changes.
    #[arg(
        long,
        env = "GKM_POLICY",
        default_value = "/etc/gkm/policy/policy.yaml"
    )]
    pub policy: PathBuf,
    /// Usernames exempt from the annotation rules (GKM's own automation). Repeatable.
    #[arg(
        long = "trusted-user",
        env = "GKM_TRUSTED_USERS",
        value_delimiter = ','
    )]
    pub trusted_users: Vec<String>,
    /// Registries (host[:port]) spoken to over plain HTTP. Repeatable.
    #[arg(
        long = "insecure-registry",
        env = "GKM_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Registry credentials: a docker config file.
    #[arg(long, env = "GKM_REGISTRY_AUTH")]
    pub registry_auth: Option<PathBuf>,
    /// Kubeconfig (default: in-cluster, then $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Mint the serving certificate at start (no cert-manager needed) and write its CA into
    /// the webhook configurations named by --webhook-config. --tls-cert/--tls-key are
    /// then where the minted pair is written.
    #[arg(long, env = "GKM_SELF_SIGNED_CERTS", default_value_t = false)]
    pub self_signed_certs: bool,
    /// The Service the API server reaches the webhook through (its DNS names go into the
    /// minted certificate).
    #[arg(long, env = "GKM_SERVICE", default_value = "gkm-controller")]
    pub service: String,
    /// This pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "gkm-system")]
    pub namespace: String,
    /// Extra names (DNS or IP) for the minted certificate. Repeatable.
    #[arg(long = "cert-host", value_delimiter = ',')]
    pub cert_hosts: Vec<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose caBundle is written.
    #[arg(long, env = "GKM_WEBHOOK_CONFIG", default_value = "gkm")]
    pub webhook_config: String,
    /// Plain-HTTP address of /metrics (Prometheus), /healthz and /readyz.
    #[arg(long, env = "GKM_METRICS_ADDR", default_value = "0.0.0.0:9811")]
    pub metrics_addr: String,
    /// Serve admission only (no status controller).
    #[arg(long, default_value_t = false)]
    pub webhook_only: bool,
    #[arg(long, env = "GKM_LOG", default_value = "info")]
    pub log: String,
    #[arg(long, env = "GKM_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub args: Args,
    pub policy: gkm::trust::TrustPolicy,
}

impl Args {
    /// Checks everything at once; the error lists every problem.
    pub fn check(self) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| errs.push(format!("--listen {:?}: {e}", self.listen)))
            .ok();
        let metrics = self
            .metrics_addr
            .parse::<SocketAddr>()
            .map_err(|e| errs.push(format!("--metrics-addr {:?}: {e}", self.metrics_addr)))
            .ok();
        for (flag, f) in [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key)] {
            if !self.self_signed_certs && !f.is_file() {
                errs.push(format!("{flag} {}: no such file", f.display()));
            }
        }
        let policy = match gkm::trust::TrustPolicy::load(&self.policy) {
            Ok(p) => Some(p),
            Err(e) => {
                errs.push(format!("--policy {}: {e}", self.policy.display()));
                None
            }
        };
        for u in &self.trusted_users {
            if u.trim().is_empty() {
                errs.push("--trusted-user: empty name".into());
            }
        }
        match (listen, metrics, policy) {
            (Some(listen), Some(metrics), Some(policy)) if errs.is_empty() => Ok(Config {
                listen,
                metrics,
                args: self,
                policy,
            }),
            _ => Err(errs),
        }
    }
}

/// Runs the admission server and (unless webhook-only) the status controller until
/// `shutdown` completes.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    gkm::install_crypto();
    let creds = match &cfg.args.registry_auth {
        Some(f) => gkm::oci::Credentials::from_file(f)?,
        None => gkm::oci::Credentials::anonymous(),
    };
    let pull = gkm::oci::PullConfig {
        insecure_registries: cfg.args.insecure_registries.clone(),
        ..Default::default()
    };
    let puller = gkm::oci::Puller::new(pull, creds.clone());
    let trust = Arc::new(gkm::trust::Verifier::new(
        cfg.policy.clone(),
        puller.clone(),
    ));
    let client = if cfg.args.self_signed_certs || !cfg.args.webhook_only {
        Some(kube_client(cfg.args.kubeconfig.as_ref()).await?)
    } else {
        None
    };
    let mut admission = Admission::new(
        TrustVerifier::new(trust.clone(), puller.clone()),
        cfg.args.trusted_users.clone(),
    );
    // The cache variables of pods need the caches' objects: only with API access.
    if let Some(client) = &client {
        admission =
            admission.with_cache_kinds(Arc::new(crate::webhook::pod_env::ApiCacheKinds::new(
                client.clone(),
                puller,
                cfg.policy.verification.timeout,
            )));
    }
    // Promotion checks callers with the API server, so it needs a client.
    let promote = client.clone().map(|client| crate::promote::PromoteApi {
        gate: crate::promote::KubeGatekeeper { client },
        promoter: gkm::promote::Promoter::new(
            trust.clone(),
            gkm::oci::Pusher::new(cfg.args.insecure_registries.clone(), creds.clone()),
        ),
        trust: trust.clone(),
    });
    let routes = Arc::new(crate::webhook::server::Routes { admission, promote });
    if let (true, Some(client)) = (cfg.args.self_signed_certs, &client) {
        let mut hosts = crate::certs::service_names(&cfg.args.service, &cfg.args.namespace);
        hosts.extend(cfg.args.cert_hosts.iter().cloned());
        let dir = cfg
            .args
            .tls_cert
            .parent()
            .unwrap_or(std::path::Path::new("."));
        let minted = crate::certs::mint(dir, &hosts)?;
        if minted.cert != cfg.args.tls_cert || minted.key != cfg.args.tls_key {
            std::fs::rename(&minted.cert, &cfg.args.tls_cert)?;
            std::fs::rename(&minted.key, &cfg.args.tls_key)?;
        }
        crate::certs::inject_ca_bundle(client.clone(), &cfg.args.webhook_config, &minted.ca_pem)
            .await?;
        info!(webhook_config = %cfg.args.webhook_config, hosts = ?hosts, "minted serving certificate; caBundle written");
    }
    let health = gkm::health::bind(cfg.metrics, Arc::new(|| Ok(())), || {
        crate::metrics::global().encode()
    })
    .await
    .with_context(|| format!("--metrics-addr {}", cfg.metrics))?;
    tokio::spawn(health);
    let tls = crate::webhook::server::tls_config(&cfg.args.tls_cert, &cfg.args.tls_key)?;
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));

    tokio::spawn(reload_policy(cfg.args.policy.clone(), trust.clone()));
    let server = crate::webhook::server::serve(routes, cfg.listen, tls, shutdown.clone());
    info!(listen = %cfg.listen, "serving admission");
    let Some(client) = client.filter(|_| !cfg.args.webhook_only) else {
        server.await?;
        return Ok(());
    };
    let vouch: Arc<dyn crate::controller::Vouch> = trust;
    let (served, ()) = tokio::join!(
        server,
        crate::controller::run(client, Some(vouch), shutdown)
    );
    served?;
    Ok(())
}

/// Re-reads the policy file every few seconds (a ConfigMap update replaces it) and puts a
/// changed, valid policy in force; an invalid one is logged and the old one kept.
async fn reload_policy(path: PathBuf, trust: Arc<gkm::trust::Verifier>) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        match gkm::trust::TrustPolicy::load(&path) {
            Ok(p) => {
                trust.set_policy(p);
                info!(path = %path.display(), "trust policy reloaded");
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "new trust policy is invalid; keeping the old one")
            }
        }
        last = now;
    }
}

async fn kube_client(path: Option<&PathBuf>) -> Result<kube::Client> {
    let config = match path {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("finding the cluster")?,
    };
    Ok(kube::Client::try_from(config)?)
}
