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
    #[command(flatten)]
    pub registry: gkm_image::cmdline::RegistryArgs,
    #[command(flatten)]
    pub kube: gkm_image::cmdline::KubeArgs,
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
    /// The node agent's service account, `<namespace>:<name>`: the only caller served
    /// caches' pull credentials at /pull-credentials.
    #[arg(
        long,
        env = "GKM_AGENT_SERVICE_ACCOUNT",
        default_value = "gkm-system:gkm-agent"
    )]
    pub agent_service_account: String,
    #[command(flatten)]
    pub log: gkm_image::cmdline::LogArgs,
}

/// A checked configuration: every value parsed and checked, nothing raw.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Where the policy was read from (re-read when it changes).
    pub policy_path: PathBuf,
    pub policy: gkm_image::trust::TrustPolicy,
    pub trusted_users: Vec<String>,
    pub registry: gkm_image::cmdline::RegistryArgs,
    pub kube: gkm_image::cmdline::KubeArgs,
    /// Mint the serving certificate for these names and write its CA into the webhook
    /// configurations named `webhook_config`; `None`: use `tls_cert` and `tls_key`.
    pub self_signed: Option<SelfSigned>,
    pub webhook_only: bool,
    /// `system:serviceaccount:<namespace>:<name>` of the node agent.
    pub agent_user: String,
    pub log: gkm_image::cmdline::LogArgs,
}

/// What a self-signed serving certificate is minted for.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    pub service: String,
    pub namespace: String,
    pub cert_hosts: Vec<String>,
    pub webhook_config: String,
}

impl Args {
    /// Checks everything at once; the error lists every problem.
    pub fn check(self) -> Result<Config, gkm_image::cmdline::ConfigErrors> {
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
        let policy = match gkm_image::trust::TrustPolicy::load(&self.policy) {
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
        let agent_user = match self.agent_service_account.split_once(':') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Some(format!("system:serviceaccount:{ns}:{name}"))
            }
            _ => {
                errs.push(format!(
                    "--agent-service-account {:?}: not <namespace>:<name>",
                    self.agent_service_account
                ));
                None
            }
        };
        if self.self_signed_certs && self.webhook_config.trim().is_empty() {
            errs.push("--webhook-config: empty name".into());
        }
        self.registry.check(&mut errs);
        self.kube.check(&mut errs);
        self.log.check(&mut errs);
        match (listen, metrics, policy) {
            (Some(listen), Some(metrics), Some(policy)) if errs.is_empty() => Ok(Config {
                listen,
                metrics,
                tls_cert: self.tls_cert,
                tls_key: self.tls_key,
                policy_path: self.policy,
                policy,
                trusted_users: self.trusted_users,
                registry: self.registry,
                kube: self.kube,
                self_signed: self.self_signed_certs.then_some(SelfSigned {
                    service: self.service,
                    namespace: self.namespace,
                    cert_hosts: self.cert_hosts,
                    webhook_config: self.webhook_config,
                }),
                webhook_only: self.webhook_only,
                agent_user: agent_user.unwrap_or_default(),
                log: self.log,
            }),
            _ => Err(gkm_image::cmdline::ConfigErrors(errs)),
        }
    }
}

/// Runs the admission server and (unless webhook-only) the status controller until
/// `shutdown` completes.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    gkm_image::install_crypto();
    let puller = cfg.registry.puller()?;
    let trust = Arc::new(gkm_image::trust::Verifier::new(
        cfg.policy.clone(),
        puller.clone(),
    ));
    let client = if cfg.self_signed.is_some() || !cfg.webhook_only {
        Some(cfg.kube.client().await?)
    } else {
        None
    };
    let mut admission = Admission::new(
        TrustVerifier::new(trust.clone(), puller.clone()),
        cfg.trusted_users.clone(),
    );
    // The cache variables of pods need the caches' objects, and pull secrets the API:
    // only with API access.
    if let Some(client) = &client {
        admission =
            admission.with_pull_secrets(crate::pull_secrets::PullSecrets::new(client.clone()));
        admission =
            admission.with_cache_kinds(Arc::new(crate::webhook::pod_env::ApiCacheKinds::new(
                client.clone(),
                puller.clone(),
                cfg.policy.verification.timeout,
            )));
    }
    // Promotion checks callers with the API server, so it needs a client.
    let pusher = cfg.registry.pusher()?;
    let promote = client.clone().map(|client| crate::promote::PromoteApi {
        gate: crate::promote::KubeGatekeeper { client },
        promoter: gkm_image::promote::Promoter::new(trust.clone(), pusher),
        trust: trust.clone(),
    });
    let node_credentials = client
        .clone()
        .map(|client| crate::node_credentials::NodeCredentials {
            client,
            agent: cfg.agent_user.clone(),
            trust: trust.clone(),
        });
    let routes = Arc::new(crate::webhook::server::Routes {
        admission,
        promote,
        node_credentials,
    });
    let vouch_puller = puller;
    if let (Some(minting), Some(client)) = (&cfg.self_signed, &client) {
        let mut hosts = crate::certs::service_names(&minting.service, &minting.namespace);
        hosts.extend(minting.cert_hosts.iter().cloned());
        let dir = cfg.tls_cert.parent().unwrap_or(std::path::Path::new("."));
        let minted = crate::certs::mint(dir, &hosts)?;
        if minted.cert != cfg.tls_cert || minted.key != cfg.tls_key {
            std::fs::rename(&minted.cert, &cfg.tls_cert)?;
            std::fs::rename(&minted.key, &cfg.tls_key)?;
        }
        crate::certs::inject_ca_bundle(client.clone(), &minting.webhook_config, &minted.ca_pem)
            .await?;
        info!(webhook_config = %minting.webhook_config, hosts = ?hosts, "minted serving certificate; caBundle written");
    }

    let health = gkm_image::health::bind(cfg.metrics, Arc::new(|| Ok(())), || {
        crate::metrics::global().encode()
    })
    .await
    .with_context(|| format!("--metrics-addr {}", cfg.metrics))?;
    tokio::spawn(health);
    let tls = crate::webhook::server::tls_config(&cfg.tls_cert, &cfg.tls_key)?;
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));

    tokio::spawn(reload_policy(cfg.policy_path.clone(), trust.clone()));
    let server = crate::webhook::server::serve(routes, cfg.listen, tls, shutdown.clone());
    info!(listen = %cfg.listen, "serving admission");
    let Some(client) = client.filter(|_| !cfg.webhook_only) else {
        server.await?;
        return Ok(());
    };
    let vouch: Arc<dyn crate::controller::Vouch> = Arc::new(crate::controller::TrustVouch {
        trust,
        puller: vouch_puller,
    });
    let (served, ()) = tokio::join!(
        server,
        crate::controller::run(client, Some(vouch), shutdown)
    );
    served?;
    Ok(())
}

/// Re-reads the policy file every few seconds (a ConfigMap update replaces it) and puts a
/// changed, valid policy in force; an invalid one is logged and the old one kept.
async fn reload_policy(path: PathBuf, trust: Arc<gkm_image::trust::Verifier>) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        match gkm_image::trust::TrustPolicy::load(&path) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let args = Args::try_parse_from([
            "gkm-controller",
            "--listen=nowhere",
            "--metrics-addr=1.2.3.4",
            "--tls-cert=/no/cert.pem",
            "--tls-key=/no/key.pem",
            "--policy=/no/policy.yaml",
            "--trusted-user= ",
            "--insecure-registry=http://r.io",
            "--kubeconfig=/no/kubeconfig",
            "--log=gkm=loud",
        ])
        .unwrap();
        let all = args.check().unwrap_err().to_string();
        for words in [
            "--listen \"nowhere\"",
            "--metrics-addr \"1.2.3.4\"",
            "--tls-cert /no/cert.pem: no such file",
            "--tls-key /no/key.pem: no such file",
            "--policy /no/policy.yaml",
            "--trusted-user: empty name",
            "--insecure-registry \"http://r.io\": must be host[:port]",
            "--kubeconfig /no/kubeconfig: no such file",
            "--log \"gkm=loud\": not a log filter",
        ] {
            assert!(all.contains(words), "{words} missing from:\n{all}");
        }
    }
}
