//! A cache's `spec.imagePullSecrets`: Secrets of type `kubernetes.io/dockerconfigjson`
//! read into registry credentials. The controller reads them to resolve and verify the
//! cache's image; nodes never read them: they ask the controller's
//! `POST /pull-credentials` (the `node_credentials` module).
//!
//! Where they live: a `GKMCache`'s in its own namespace (as a Pod's do); a
//! `ClusterGKMCache`'s in the namespace the trust policy names (`pullSecretNamespace`),
//! never in a namespace its creator picks.

use gkm_api::CacheRef;
use gkm_image::oci::Credentials;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

/// The Secret type a pull secret must have (Kubernetes' `SecretTypeDockerConfigJson`).
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// The key of a `kubernetes.io/dockerconfigjson` Secret that holds the docker config.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// Why a cache's pull secrets give no credentials. Every message names the Secret (or
/// the cache) and the reason; none quotes a Secret's content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PullSecretError {
    #[error("pull secret {namespace}/{name} does not exist")]
    NotFound { namespace: String, name: String },
    #[error("pull secret {namespace}/{name} could not be read: {reason}")]
    Read {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "pull secret {namespace}/{name} has type {found:?}; imagePullSecrets must be of type {DOCKER_CONFIG_JSON_TYPE}"
    )]
    WrongType {
        namespace: String,
        name: String,
        found: String,
    },
    #[error("pull secret {namespace}/{name} has no {DOCKER_CONFIG_JSON_KEY} key")]
    NoKey { namespace: String, name: String },
    #[error("pull secret {namespace}/{name}: {reason}")]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "{cache} names imagePullSecrets, but the trust policy names no pullSecretNamespace for the pull secrets of ClusterGKMCaches"
    )]
    NoNamespace { cache: String },
    #[error("{cache} names imagePullSecrets, but the controller has no API access to read them")]
    NoApiAccess { cache: String },
}

impl PullSecretError {
    /// A short, stable label for metrics and admission denials.
    pub fn label(&self) -> &'static str {
        match self {
            PullSecretError::NotFound { .. } => "pull_secret_not_found",
            PullSecretError::Read { .. } | PullSecretError::NoApiAccess { .. } => {
                "pull_secret_unreadable"
            }
            PullSecretError::WrongType { .. }
            | PullSecretError::NoKey { .. }
            | PullSecretError::Invalid { .. } => "pull_secret_invalid",
            PullSecretError::NoNamespace { .. } => "pull_secret_namespace_unset",
        }
    }
}

/// The namespace `cache`'s pull secrets are read from: its own for a `GKMCache`, the
/// trust policy's `pullSecretNamespace` for a `ClusterGKMCache`.
pub fn secret_namespace(
    cache: &CacheRef,
    policy_namespace: Option<&str>,
) -> Result<String, PullSecretError> {
    match cache {
        CacheRef::Namespaced { namespace, .. } => Ok(namespace.clone()),
        CacheRef::Cluster { .. } => {
            policy_namespace
                .map(str::to_string)
                .ok_or_else(|| PullSecretError::NoNamespace {
                    cache: format!("{} {cache}", cache.kind()),
                })
        }
    }
}

/// The credentials in one pull secret `secret` (of `namespace`).
pub fn credentials_of(namespace: &str, secret: &Secret) -> Result<Credentials, PullSecretError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let found = secret.type_.clone().unwrap_or_else(|| "Opaque".into());
    if found != DOCKER_CONFIG_JSON_TYPE {
        return Err(PullSecretError::WrongType {
            namespace: namespace.into(),
            name,
            found,
        });
    }
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(DOCKER_CONFIG_JSON_KEY))
        .ok_or_else(|| PullSecretError::NoKey {
            namespace: namespace.into(),
            name: name.clone(),
        })?;
    let text = std::str::from_utf8(&data.0).map_err(|_| PullSecretError::Invalid {
        namespace: namespace.into(),
        name: name.clone(),
        reason: format!("{DOCKER_CONFIG_JSON_KEY} is not UTF-8"),
    })?;
    Credentials::from_json(text).map_err(|reason| PullSecretError::Invalid {
        namespace: namespace.into(),
        name,
        reason: format!("{DOCKER_CONFIG_JSON_KEY} is not a docker config: {reason}"),
    })
}

/// Reads pull secrets through the API server (`get` on `secrets`).
#[derive(Clone)]
pub struct PullSecrets {
    client: Client,
}

impl PullSecrets {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The credentials of Secrets `names` of `namespace`; for a registry several of them
    /// name, the first one's entry (as kubelet tries a Pod's pull secrets in order).
    pub async fn credentials(
        &self,
        namespace: &str,
        names: &[String],
    ) -> Result<Credentials, PullSecretError> {
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        let mut all = Credentials::anonymous();
        for name in names {
            let secret = match api.get_opt(name).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    return Err(PullSecretError::NotFound {
                        namespace: namespace.into(),
                        name: name.clone(),
                    });
                }
                Err(e) => {
                    return Err(PullSecretError::Read {
                        namespace: namespace.into(),
                        name: name.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            // Earlier names' entries stay on top.
            all = credentials_of(namespace, &secret)?.overlaid_with(&all);
        }
        Ok(all)
    }

    /// The credentials of `cache`'s pull secrets `names` (none: anonymous, with no API
    /// call), from the namespace [`secret_namespace`] gives.
    pub async fn for_cache(
        this: Option<&Self>,
        cache: &CacheRef,
        names: &[String],
        policy_namespace: Option<&str>,
    ) -> Result<Credentials, PullSecretError> {
        if names.is_empty() {
            return Ok(Credentials::anonymous());
        }
        let namespace = secret_namespace(cache, policy_namespace)?;
        let Some(this) = this else {
            return Err(PullSecretError::NoApiAccess {
                cache: format!("{} {cache}", cache.kind()),
            });
        };
        this.credentials(&namespace, names).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: Option<&str>, data: Option<&[u8]>) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("regcred".into()),
                ..Default::default()
            },
            type_: type_.map(str::to_string),
            data: data.map(|d| {
                [(DOCKER_CONFIG_JSON_KEY.to_string(), ByteString(d.to_vec()))]
                    .into_iter()
                    .collect()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_docker_config_secret_gives_its_credentials() {
        let s = secret(
            Some(DOCKER_CONFIG_JSON_TYPE),
            Some(br#"{"auths":{"r.io":{"username":"u","password":"p"}}}"#),
        );
        let c = credentials_of("team", &s).unwrap();
        assert!(!c.only_for("r.io").is_empty());
    }

    #[test]
    fn every_bad_secret_is_named_with_its_reason_and_never_quoted() {
        let cases = [
            (secret(None, Some(b"{}")), "type \"Opaque\""),
            (
                secret(Some("kubernetes.io/dockercfg"), Some(b"{}")),
                "kubernetes.io/dockerconfigjson",
            ),
            (
                secret(Some(DOCKER_CONFIG_JSON_TYPE), None),
                "no .dockerconfigjson",
            ),
            (
                secret(Some(DOCKER_CONFIG_JSON_TYPE), Some(b"hunter2-not-json")),
                "not a docker config",
            ),
            (
                secret(Some(DOCKER_CONFIG_JSON_TYPE), Some(&[0xff, 0xfe])),
                "not UTF-8",
            ),
        ];
        for (s, want) in cases {
            let e = credentials_of("team", &s).unwrap_err().to_string();
            assert!(e.contains("team/regcred") && e.contains(want), "{e}");
            assert!(!e.contains("hunter2"), "quotes the secret: {e}");
        }
    }

    #[test]
    fn cluster_caches_read_only_the_policy_namespace() {
        let cluster = CacheRef::Cluster { name: "c".into() };
        let ns = CacheRef::Namespaced {
            namespace: "team".into(),
            name: "c".into(),
        };
        assert_eq!(secret_namespace(&ns, Some("gkm-system")).unwrap(), "team");
        assert_eq!(
            secret_namespace(&cluster, Some("gkm-system")).unwrap(),
            "gkm-system"
        );
        let e = secret_namespace(&cluster, None).unwrap_err();
        assert_eq!(e.label(), "pull_secret_namespace_unset");
        assert!(e.to_string().contains("ClusterGKMCache c"), "{e}");
    }
}
