//! A cache's pull credentials, as the node gets them: never from Secrets (the agent has
//! no right to read any), but from the controller's `POST /pull-credentials`, which
//! answers only for caches a pod on this node mounts, and with the entry for the cache's
//! registry only (docs/security.md, "Pull credentials").
//!
//! The agent authenticates with a projected service-account token of audience
//! `gkm.io/pull-credentials` (re-read at each request: kubelet rotates it) and trusts the
//! controller's serving certificate through `--controller-ca`, or else through the
//! `caBundle` of the controller's MutatingWebhookConfiguration (which the controller
//! writes when it mints its certificate, and cert-manager's CA injector otherwise).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gkm_api::CacheRef;
use gkm_api::volume::ResolvedCache;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use tracing::{debug, info};

use crate::oci::{Credentials, Puller};

/// The path of the controller's endpoint (`gkm_controller::node_credentials::PATH`).
pub const PATH: &str = "/pull-credentials";
/// How long fetched credentials are reused for the same cache before asking again.
pub const REUSE_FOR: Duration = Duration::from_secs(60);
/// The longest answer read from the controller, in bytes (a docker config of one registry's
/// entry is a few hundred).
pub const MAX_ANSWER: usize = 64 << 10;

/// Why a cache's pull credentials could not be had. The messages name the cache and,
/// for the controller's refusals, quote its reason; never a credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "{cache} names imagePullSecrets, but this agent has no --controller-url to ask for them"
    )]
    NotConfigured { cache: String },
    #[error("reading the agent's token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the controller's CA: {0}")]
    Ca(String),
    #[error("asking {url} for the pull credentials of {cache}: {reason}")]
    Unreachable {
        url: String,
        cache: String,
        reason: String,
    },
    #[error("the controller refused the pull credentials of {cache} ({status}): {message}")]
    Refused {
        cache: String,
        status: u16,
        message: String,
    },
    #[error("the controller's answer for {cache} is no docker config: {reason}")]
    BadAnswer { cache: String, reason: String },
}

impl CredentialsError {
    /// Whether asking again later may succeed: not for a missing configuration, nor a
    /// refusal about the request itself (400, 404, 413); 401 (a token read just before
    /// kubelet rotated it), 403 (a pod arriving), 409 (a Secret being fixed) and 5xx may.
    pub fn is_retryable(&self) -> bool {
        match self {
            CredentialsError::NotConfigured { .. } | CredentialsError::BadAnswer { .. } => false,
            CredentialsError::Refused { status, .. } => {
                !(400..500).contains(status) || matches!(status, 401 | 403 | 409)
            }
            _ => true,
        }
    }
}

/// Where the controller's serving CA comes from.
#[derive(Clone, Debug)]
pub enum ControllerCa {
    /// A PEM file (`--controller-ca`).
    File(PathBuf),
    /// The first `caBundle` of this MutatingWebhookConfiguration (`--webhook-config`).
    Webhook(String),
}

/// How the agent reaches the controller's endpoint.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// The controller's base URL (`https://host[:port]`).
    pub url: String,
    /// The projected token file.
    pub token_file: PathBuf,
    pub ca: ControllerCa,
    /// Per request.
    pub timeout: Duration,
}

/// Asks the controller for caches' pull credentials and keeps a puller per cache for
/// [`REUSE_FOR`].
pub struct Broker {
    cfg: BrokerConfig,
    kube: kube::Client,
    reuse: Mutex<HashMap<CacheRef, (Instant, Puller)>>,
}

impl Broker {
    pub fn new(cfg: BrokerConfig, kube: kube::Client) -> Self {
        Self {
            cfg,
            kube,
            reuse: Mutex::default(),
        }
    }

    /// The puller for `cache`: `base` itself when the cache names no pull secrets, else
    /// `base` with the cache's credentials, from the controller (or reused).
    pub async fn puller_for(
        this: Option<&Self>,
        base: &Puller,
        cache: &ResolvedCache,
    ) -> Result<Puller, CredentialsError> {
        if cache.image_pull_secrets.is_empty() {
            return Ok(base.clone());
        }
        let Some(this) = this else {
            return Err(CredentialsError::NotConfigured {
                cache: shown(&cache.key),
            });
        };
        {
            let mut reuse = this.reuse.lock().unwrap_or_else(|e| e.into_inner());
            // Expired credentials leave memory rather than waiting to be replaced.
            reuse.retain(|_, (at, _)| at.elapsed() < REUSE_FOR);
            if let Some((_, p)) = reuse.get(&cache.key) {
                return Ok(p.clone());
            }
        }
        let credentials = this.fetch(&cache.key).await?;
        let puller = base.with_credentials(&credentials);
        this.reuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cache.key.clone(), (Instant::now(), puller.clone()));
        Ok(puller)
    }

    /// Forgets reused credentials of `cache` (after the registry refused a pull with them:
    /// the Secret may have been rotated since).
    pub fn forget(&self, cache: &CacheRef) {
        self.reuse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cache);
    }

    async fn fetch(&self, cache: &CacheRef) -> Result<Credentials, CredentialsError> {
        let shown = shown(cache);
        let url = format!("{}{PATH}", self.cfg.url.trim_end_matches('/'));
        let token = std::fs::read_to_string(&self.cfg.token_file).map_err(|source| {
            CredentialsError::Token {
                path: self.cfg.token_file.clone(),
                source,
            }
        })?;
        let client = self.http().await?;
        let unreachable = |reason: String| CredentialsError::Unreachable {
            url: url.clone(),
            cache: shown.clone(),
            reason,
        };
        let mut answer = client
            .post(&url)
            .bearer_auth(token.trim())
            .json(&serde_json::json!({
                "kind": cache.kind(),
                "namespace": match cache {
                    CacheRef::Namespaced { namespace, .. } => namespace.as_str(),
                    CacheRef::Cluster { .. } => "",
                },
                "name": cache.name(),
            }))
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = answer.status();
        // One registry's entry is a few hundred bytes: a longer answer is not the
        // controller's, and is not read into memory.
        let mut raw = Vec::new();
        while let Some(chunk) = answer
            .chunk()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?
        {
            if raw.len() + chunk.len() > MAX_ANSWER {
                return Err(CredentialsError::BadAnswer {
                    cache: shown,
                    reason: format!("an answer of more than {MAX_ANSWER} bytes"),
                });
            }
            raw.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&raw);
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| body.chars().take(512).collect());
            return Err(CredentialsError::Refused {
                cache: shown,
                status: status.as_u16(),
                message,
            });
        }
        let credentials =
            Credentials::from_json(&body).map_err(|reason| CredentialsError::BadAnswer {
                cache: shown.clone(),
                reason,
            })?;
        info!(cache = %shown, "pull credentials received from the controller");
        Ok(credentials)
    }

    /// An HTTPS client trusting the controller's CA (read now: it rotates).
    async fn http(&self) -> Result<reqwest::Client, CredentialsError> {
        let pem = match &self.cfg.ca {
            ControllerCa::File(path) => std::fs::read(path)
                .map_err(|e| CredentialsError::Ca(format!("{}: {e}", path.display())))?,
            ControllerCa::Webhook(name) => {
                let config = Api::<MutatingWebhookConfiguration>::all(self.kube.clone())
                    .get(name)
                    .await
                    .map_err(|e| {
                        CredentialsError::Ca(format!(
                            "reading the caBundle of MutatingWebhookConfiguration {name}: {e}"
                        ))
                    })?;
                config
                    .webhooks
                    .iter()
                    .flatten()
                    .find_map(|w| w.client_config.ca_bundle.clone())
                    .map(|b| b.0)
                    .ok_or_else(|| {
                        CredentialsError::Ca(format!(
                            "MutatingWebhookConfiguration {name} has no caBundle"
                        ))
                    })?
            }
        };
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| CredentialsError::Ca(e.to_string()))?;
        if certs.is_empty() {
            return Err(CredentialsError::Ca("holds no PEM certificate".into()));
        }
        debug!(certificates = certs.len(), "controller CA loaded");
        gkm_image::install_crypto();
        reqwest::Client::builder()
            .tls_certs_only(certs)
            // The token goes to the controller only, never where a redirect points.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.cfg.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CredentialsError::Ca(e.to_string()))
    }
}

fn shown(cache: &CacheRef) -> String {
    format!("{} {cache}", cache.kind())
}

/// `e` and its sources, joined: reqwest's own message hides the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_a_pod_or_a_fixed_secret_can_change_are_retried() {
        let refused = |status| CredentialsError::Refused {
            cache: "GKMCache a/b".into(),
            status,
            message: String::new(),
        };
        assert!(refused(401).is_retryable());
        assert!(refused(403).is_retryable());
        assert!(refused(409).is_retryable());
        assert!(refused(503).is_retryable());
        assert!(!refused(404).is_retryable());
        assert!(!refused(400).is_retryable());
        assert!(
            !CredentialsError::NotConfigured {
                cache: "GKMCache a/b".into()
            }
            .is_retryable()
        );
    }

    #[tokio::test]
    async fn a_cache_without_pull_secrets_uses_the_base_puller_and_no_broker() {
        let base = Puller::new(Default::default(), Credentials::anonymous());
        let mut cache = ResolvedCache {
            key: CacheRef::Cluster { name: "c".into() },
            image: "r.io/k:v1".into(),
            digest: None,
            workload_namespaces: vec![],
            image_pull_secrets: vec![],
        };
        assert!(Broker::puller_for(None, &base, &cache).await.is_ok());
        cache.image_pull_secrets = vec!["regcred".into()];
        let Err(e) = Broker::puller_for(None, &base, &cache).await else {
            panic!("a cache with pull secrets got a puller without a broker");
        };
        assert!(e.to_string().contains("ClusterGKMCache c"), "{e}");
        assert!(!e.is_retryable());
    }
}
