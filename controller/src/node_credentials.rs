//! `POST /pull-credentials`: the pull credentials of one cache, for the node agent of a
//! node that runs a pod mounting that cache, and for nobody else.
//!
//! Why a controller endpoint rather than RBAC on Secrets: RBAC cannot scope `get secrets`
//! to one node's needs, so an agent allowed to read pull secrets could read every one of
//! them in the cluster. Here a node gets, for one cache at a time, only the entry for the
//! cache's registry, only while one of its pods mounts the cache — the rule kubelet's
//! Node authorizer applies to a Pod's own `imagePullSecrets`.
//!
//! The caller proves who and where it is with a bound service-account token of audience
//! [`AUDIENCE`] (a projected volume in the agent's DaemonSet). The API server's
//! TokenReview names the service account, and for a token bound to a Pod it adds the
//! node the Pod runs on ([`NODE_NAME_EXTRA`], Kubernetes ≥ 1.30); a token with no node is
//! refused.
//!
//! Request: `{"kind": "GKMCache"|"ClusterGKMCache", "namespace": "…", "name": "…"}` with
//! `Authorization: Bearer <token>`. Answer: 200 with a docker config
//! (`{"auths": {"<registry>": {…}}}`); refusals are JSON `{"reason", "message"}` with the
//! status [`CredentialsError::status`] gives.

use gkm_api::volume::{DRIVER_NAME, cache_ref_of_attributes};
use gkm_api::{CacheRef, ClusterGKMCache, GKMCache};
use hyper::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use serde::Deserialize;
use tracing::{info, warn};

use crate::pull_secrets::{PullSecretError, PullSecrets};

/// The path the endpoint is served at.
pub const PATH: &str = "/pull-credentials";
/// The audience an agent's token must be issued for (and no other component accepts).
pub const AUDIENCE: &str = "gkm.io/pull-credentials";
/// The TokenReview `extra` key that names the node of the Pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The TokenReview `extra` key that names the Pod a token is bound to. Required: a token
/// bound to a Node object (not a Pod) carries a node name too, and could be requested by
/// anyone allowed to create tokens for the agent's account without running a pod there.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The annotation kubelet puts on the mirror Pod of a static pod. A node can create
/// those in any namespace, naming any cache: they never entitle it.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Request bodies are one small JSON object.
pub const MAX_BODY: usize = 4 << 10;

/// The cache a node asks credentials for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsRequest {
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
}

/// Why a request gets no credentials. [`CredentialsError::status`] is this endpoint's one
/// mapping to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("no bearer token: send the agent's projected token of audience {AUDIENCE}")]
    NoToken,
    #[error("the token was not accepted: {0}")]
    Unauthenticated(String),
    #[error("{user} is not the node agent's service account ({agent})")]
    NotTheAgent { user: String, agent: String },
    #[error(
        "the token of {user} is bound to no pod on a node: use a token bound to the agent's pod (a projected service account token)"
    )]
    NoNode { user: String },
    #[error("a request body of more than {MAX_BODY} bytes")]
    TooLarge,
    #[error("{cache} names no registry the node could be given credentials for: {reason}")]
    BadCache { cache: String, reason: String },
    #[error("the imagePullSecrets of {cache} hold no entry for its registry {registry}")]
    NoEntry { cache: String, registry: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{cache} does not exist")]
    NoSuchCache { cache: String },
    #[error("{cache} names no imagePullSecrets")]
    NoPullSecrets { cache: String },
    #[error("no pod on node {node} mounts {cache}")]
    NotEntitled { node: String, cache: String },
    #[error("{cache}: {source}")]
    Secret {
        cache: String,
        source: PullSecretError,
    },
    #[error("asking the API server: {0}")]
    Api(String),
    #[error("this controller serves no pull credentials (it has no API access)")]
    NotServed,
}

impl CredentialsError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            CredentialsError::NoToken | CredentialsError::Unauthenticated(_) => {
                StatusCode::UNAUTHORIZED
            }
            CredentialsError::NotTheAgent { .. }
            | CredentialsError::NoNode { .. }
            | CredentialsError::NotEntitled { .. } => StatusCode::FORBIDDEN,
            CredentialsError::BadRequest(_) => StatusCode::BAD_REQUEST,
            CredentialsError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            CredentialsError::NoSuchCache { .. } | CredentialsError::NoPullSecrets { .. } => {
                StatusCode::NOT_FOUND
            }
            // Reading a Secret failed for a reason that may pass (the API server).
            CredentialsError::Secret {
                source: PullSecretError::Read { .. } | PullSecretError::NoApiAccess { .. },
                ..
            } => StatusCode::SERVICE_UNAVAILABLE,
            // The cache or its Secrets are wrong: fixing them changes the answer.
            CredentialsError::Secret { .. }
            | CredentialsError::BadCache { .. }
            | CredentialsError::NoEntry { .. } => StatusCode::CONFLICT,
            CredentialsError::Api(_) | CredentialsError::NotServed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// What the node is told: the error, except that a problem with the cache's Secrets
    /// is named by its label only (the Secret's name, its other registries and the parse
    /// error stay in the controller's log).
    pub fn public_message(&self) -> String {
        match self {
            CredentialsError::Secret { cache, source } => format!(
                "{cache}: its imagePullSecrets cannot be used ({}); the controller's log names the Secret and why",
                source.label()
            ),
            other => other.to_string(),
        }
    }

    /// A short, stable label for metrics and the JSON body's `reason`.
    pub fn label(&self) -> &'static str {
        match self {
            CredentialsError::NoToken => "no_token",
            CredentialsError::Unauthenticated(_) => "unauthenticated",
            CredentialsError::NotTheAgent { .. } => "not_the_agent",
            CredentialsError::NoNode { .. } => "no_node",
            CredentialsError::BadRequest(_) => "bad_request",
            CredentialsError::TooLarge => "too_large",
            CredentialsError::BadCache { .. } => "bad_cache",
            CredentialsError::NoEntry { .. } => "no_entry_for_registry",
            CredentialsError::NoSuchCache { .. } => "no_such_cache",
            CredentialsError::NoPullSecrets { .. } => "no_pull_secrets",
            CredentialsError::NotEntitled { .. } => "not_entitled",
            CredentialsError::Secret { source, .. } => source.label(),
            CredentialsError::Api(_) => "api_unavailable",
            CredentialsError::NotServed => "not_served",
        }
    }
}

/// The node named by a reviewed token of `username` with `extra`, if `username` is
/// `agent` (`system:serviceaccount:<namespace>:<name>`).
pub fn node_of(
    username: &str,
    extra: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    agent: &str,
) -> Result<String, CredentialsError> {
    if username != agent {
        return Err(CredentialsError::NotTheAgent {
            user: username.into(),
            agent: agent.into(),
        });
    }
    let one = |key: &str| {
        extra
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|n| !n.is_empty())
            .cloned()
    };
    match (one(POD_NAME_EXTRA), one(NODE_NAME_EXTRA)) {
        (Some(_), Some(node)) => Ok(node),
        _ => Err(CredentialsError::NoNode {
            user: username.into(),
        }),
    }
}

/// Whether `pod` (which runs on the node in question) mounts `cache` through a GKM volume
/// and may: a finished or terminating pod does not count (a volume already mounted needs
/// no credentials), nor a node's own mirror pod (a static pod: the node made it), nor one
/// of a namespace the cache does not admit (`workload_namespaces` of a cluster cache;
/// empty: all).
pub fn pod_mounts(pod: &Pod, cache: &CacheRef, workload_namespaces: &[String]) -> bool {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let running = !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) && pod.metadata.deletion_timestamp.is_none();
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
        || pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "Node");
    if mirror {
        return false;
    }
    let admitted = match cache {
        CacheRef::Namespaced { namespace, .. } => namespace == ns,
        CacheRef::Cluster { .. } => {
            workload_namespaces.is_empty() || workload_namespaces.iter().any(|w| w == ns)
        }
    };
    let names_it = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.csi.as_ref())
        .filter(|c| c.driver == DRIVER_NAME)
        .filter_map(|c| c.volume_attributes.as_ref())
        .any(|attrs| {
            let attrs: std::collections::HashMap<String, String> =
                attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            cache_ref_of_attributes(&attrs).is_ok_and(|r| r == *cache)
        });
    running && admitted && names_it
}

/// The endpoint: the API server for reviews, caches, pods and Secrets.
pub struct NodeCredentials {
    pub client: kube::Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node agent.
    pub agent: String,
    /// The policy in force (for `pullSecretNamespace`).
    pub trust: std::sync::Arc<gkm_image::trust::Verifier>,
}

impl NodeCredentials {
    /// Answers one request: the status and the JSON body. Every answer is counted under
    /// its label in `gkm_controller_pull_credentials_total`.
    pub async fn call(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let result = self.try_call(authorization, body).await;
        let label = result.as_ref().map_or_else(|e| e.label(), |_| "served");
        gkm_image::metrics::Metrics::result(&crate::metrics::global().pull_credentials, label);
        match result {
            Ok(json) => (StatusCode::OK, json),
            Err(e) => refuse(e),
        }
    }

    async fn try_call(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Result<serde_json::Value, CredentialsError> {
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(CredentialsError::NoToken)?;
        let req: CredentialsRequest = serde_json::from_slice(body)
            .map_err(|e| CredentialsError::BadRequest(e.to_string()))?;
        let cache =
            CacheRef::from_parts(&req.kind, &req.namespace, &req.name).ok_or_else(|| {
                CredentialsError::BadRequest(format!(
                    "kind {:?} is neither GKMCache nor ClusterGKMCache",
                    req.kind
                ))
            })?;
        if matches!(&cache, CacheRef::Namespaced { namespace, .. } if namespace.is_empty()) {
            return Err(CredentialsError::BadRequest(
                "a GKMCache needs its namespace".into(),
            ));
        }
        // Checked before they reach an API path or a field selector.
        // (A cluster cache has no namespace: empty is allowed there, and only there.)
        for (field, value, may_be_empty) in [
            ("namespace", &req.namespace, true),
            ("name", &req.name, false),
        ] {
            let empty_allowed = may_be_empty && value.is_empty();
            if !empty_allowed && !gkm_api::is_dns1123_subdomain(value) {
                return Err(CredentialsError::BadRequest(format!(
                    "{field} is not a Kubernetes name (RFC 1123 subdomain, at most 253 characters)"
                )));
            }
        }
        let node = self.review(token).await?;
        let shown = format!("{} {cache}", cache.kind());
        let span = tracing::info_span!("pull_credentials", node = %node, cache = %shown);
        tracing::Instrument::instrument(self.serve(node, cache, shown.clone()), span).await
    }

    /// The credentials of `cache` for `node`, once the caller is known to be its agent.
    async fn serve(
        &self,
        node: String,
        cache: CacheRef,
        shown: String,
    ) -> Result<serde_json::Value, CredentialsError> {
        // Entitlement first: a node learns whether a cache exists, and whether it names
        // pull secrets, only for caches its own pods mount.
        let found = self.cache(&cache).await?;
        let workload_namespaces = found.as_ref().map(|f| f.2.as_slice()).unwrap_or_default();
        if !self.entitled(&node, &cache, workload_namespaces).await? {
            return Err(CredentialsError::NotEntitled { node, cache: shown });
        }
        let (image, secrets, _) = found.ok_or_else(|| CredentialsError::NoSuchCache {
            cache: shown.clone(),
        })?;
        if secrets.is_empty() {
            return Err(CredentialsError::NoPullSecrets { cache: shown });
        }
        let registry = gkm_image::oci::parse_reference(&image)
            .map_err(|e| CredentialsError::BadCache {
                cache: shown.clone(),
                reason: e.to_string(),
            })?
            .registry()
            .to_string();
        let all = PullSecrets::for_cache(
            Some(&PullSecrets::new(self.client.clone())),
            &cache,
            &secrets,
            self.trust.policy().pull_secret_namespace.as_deref(),
        )
        .await
        .map_err(|source| CredentialsError::Secret {
            cache: shown.clone(),
            source,
        })?;
        let one = all.only_for(&registry);
        if one.is_empty() {
            return Err(CredentialsError::NoEntry {
                cache: shown,
                registry,
            });
        }
        info!(registry = %registry, secrets = ?secrets, "pull credentials served");
        serde_json::from_str(&one.to_json()).map_err(|e| CredentialsError::Api(e.to_string()))
    }

    /// The node of the agent whose token this is.
    async fn review(&self, token: &str) -> Result<String, CredentialsError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let done = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| CredentialsError::Api(format!("TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user))
                if status
                    .audiences
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|a| a == AUDIENCE)) =>
            {
                user
            }
            _ => {
                return Err(CredentialsError::Unauthenticated(format!(
                    "not a valid token of audience {AUDIENCE}{}",
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                )));
            }
        };
        node_of(
            user.username.as_deref().unwrap_or_default(),
            user.extra.as_ref(),
            &self.agent,
        )
    }

    /// `cache`'s image, pull secret names and workload namespaces; `None` if it does not
    /// exist.
    async fn cache(
        &self,
        cache: &CacheRef,
    ) -> Result<Option<(String, Vec<String>, Vec<String>)>, CredentialsError> {
        let shown = format!("{} {cache}", cache.kind());
        let api_err = |e: kube::Error| CredentialsError::Api(format!("reading {shown}: {e}"));
        let names =
            |s: &[gkm_api::PullSecretRef]| s.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        match cache {
            CacheRef::Namespaced { namespace, name } => {
                let c = Api::<GKMCache>::namespaced(self.client.clone(), namespace)
                    .get_opt(name)
                    .await
                    .map_err(api_err)?;
                Ok(c.map(|c| (c.spec.image, names(&c.spec.image_pull_secrets), Vec::new())))
            }
            CacheRef::Cluster { name } => {
                let c = Api::<ClusterGKMCache>::all(self.client.clone())
                    .get_opt(name)
                    .await
                    .map_err(api_err)?;
                Ok(c.map(|c| {
                    (
                        c.spec.image,
                        names(&c.spec.image_pull_secrets),
                        c.spec.workload_namespaces,
                    )
                }))
            }
        }
    }

    /// Whether a pod bound to `node` mounts `cache`.
    async fn entitled(
        &self,
        node: &str,
        cache: &CacheRef,
        workload_namespaces: &[String],
    ) -> Result<bool, CredentialsError> {
        // Only the namespaces whose pods may mount the cache.
        let apis: Vec<Api<Pod>> = match cache {
            CacheRef::Namespaced { namespace, .. } => {
                vec![Api::namespaced(self.client.clone(), namespace)]
            }
            CacheRef::Cluster { .. } if workload_namespaces.is_empty() => {
                vec![Api::all(self.client.clone())]
            }
            CacheRef::Cluster { .. } => workload_namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect(),
        };
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        for pods in apis {
            let list = pods.list(&on_node).await.map_err(|e| {
                CredentialsError::Api(format!("listing the pods of node {node}: {e}"))
            })?;
            if list
                .items
                .iter()
                .any(|p| pod_mounts(p, cache, workload_namespaces))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The answer to a refused request. The controller's log has the whole error; the node
/// gets [`CredentialsError::public_message`], which names no Secret and no other
/// registry (the agent passes it on into the pod's `FailedMount` event, which the
/// tenant reads; a cluster cache's Secrets are the administrator's).
pub fn refuse(e: CredentialsError) -> (StatusCode, serde_json::Value) {
    warn!(reason = e.label(), error = %e, "pull credentials refused");
    (
        e.status(),
        serde_json::json!({"reason": e.label(), "message": e.public_message()}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{CSIVolumeSource, PodSpec, PodStatus, Volume};

    const AGENT: &str = "system:serviceaccount:gkm-system:gkm-agent";

    #[test]
    fn only_the_agent_with_a_pod_bound_token_is_served() {
        let extra = |n: &str| {
            [
                (NODE_NAME_EXTRA.to_string(), vec![n.to_string()]),
                (POD_NAME_EXTRA.to_string(), vec!["gkm-agent-x7".to_string()]),
            ]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(node_of(AGENT, Some(&extra("n1")), AGENT).unwrap(), "n1");
        // Bound to a Node object, not a pod: a node name but no pod.
        let node_bound = [(NODE_NAME_EXTRA.to_string(), vec!["n1".to_string()])]
            .into_iter()
            .collect();
        assert_eq!(
            node_of(AGENT, Some(&node_bound), AGENT)
                .unwrap_err()
                .label(),
            "no_node"
        );
        let e = node_of(
            "system:serviceaccount:team:default",
            Some(&extra("n1")),
            AGENT,
        )
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.label(), "not_the_agent");
        let e = node_of(AGENT, None, AGENT).unwrap_err();
        assert_eq!(e.label(), "no_node");
        let e = node_of(AGENT, Some(&extra("")), AGENT).unwrap_err();
        assert_eq!(e.label(), "no_node");
    }

    fn pod(ns: &str, attrs: &[(&str, &str)], phase: Option<&str>) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some("p".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                volumes: Some(vec![Volume {
                    name: "kernels".into(),
                    csi: Some(CSIVolumeSource {
                        driver: DRIVER_NAME.into(),
                        volume_attributes: Some(
                            attrs
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: phase.map(|p| PodStatus {
                phase: Some(p.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_pod_entitles_its_node_only_to_caches_it_may_mount() {
        use gkm_api::volume::{ATTR_CACHE, ATTR_CLUSTER_CACHE, ATTR_NAMESPACE};
        let mine = CacheRef::Namespaced {
            namespace: "team".into(),
            name: "k".into(),
        };
        let cluster = CacheRef::Cluster {
            name: "shared".into(),
        };
        let p = pod("team", &[(ATTR_CACHE, "k"), (ATTR_NAMESPACE, "team")], None);
        assert!(pod_mounts(&p, &mine, &[]));
        assert!(!pod_mounts(&p, &cluster, &[]));
        // Another namespace's pod naming this namespace's cache does not count.
        let other = pod("evil", &[(ATTR_CACHE, "k"), (ATTR_NAMESPACE, "team")], None);
        assert!(!pod_mounts(&other, &mine, &[]));
        // Finished pods do not count.
        let done = pod(
            "team",
            &[(ATTR_CACHE, "k"), (ATTR_NAMESPACE, "team")],
            Some("Succeeded"),
        );
        assert!(!pod_mounts(&done, &mine, &[]));
        // Terminating pods do not count either.
        let mut leaving = p.clone();
        leaving.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        assert!(!pod_mounts(&leaving, &mine, &[]));
        // Nor a node's mirror pod of a static pod, in whatever namespace.
        let mut mirror = p.clone();
        mirror.metadata.annotations = Some(
            [(MIRROR_POD_ANNOTATION.to_string(), "abc".to_string())]
                .into_iter()
                .collect(),
        );
        assert!(!pod_mounts(&mirror, &mine, &[]));
        let mut owned = p.clone();
        owned.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                kind: "Node".into(),
                name: "n1".into(),
                api_version: "v1".into(),
                uid: "u".into(),
                ..Default::default()
            },
        ]);
        assert!(!pod_mounts(&owned, &mine, &[]));
        // A cluster cache: only from the namespaces it admits.
        let c = pod("team", &[(ATTR_CLUSTER_CACHE, "shared")], Some("Running"));
        assert!(pod_mounts(&c, &cluster, &[]));
        assert!(pod_mounts(&c, &cluster, &["team".into()]));
        assert!(!pod_mounts(&c, &cluster, &["ml".into()]));
    }

    #[test]
    fn every_refusal_has_one_status_and_a_label() {
        let all = [
            CredentialsError::NoToken,
            CredentialsError::Unauthenticated("x".into()),
            CredentialsError::NotTheAgent {
                user: "u".into(),
                agent: AGENT.into(),
            },
            CredentialsError::NoNode { user: "u".into() },
            CredentialsError::BadRequest("x".into()),
            CredentialsError::NoSuchCache { cache: "c".into() },
            CredentialsError::NoPullSecrets { cache: "c".into() },
            CredentialsError::NotEntitled {
                node: "n".into(),
                cache: "c".into(),
            },
            CredentialsError::Api("x".into()),
            CredentialsError::NotServed,
            CredentialsError::TooLarge,
            CredentialsError::BadCache {
                cache: "c".into(),
                reason: "r".into(),
            },
            CredentialsError::NoEntry {
                cache: "c".into(),
                registry: "r.io".into(),
            },
        ];
        for e in all {
            let (status, body) = refuse(e);
            assert!(status.is_client_error() || status.is_server_error());
            assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()));
        }
    }

    #[test]
    fn a_node_is_not_told_which_secret_failed_or_what_it_holds() {
        let e = CredentialsError::Secret {
            cache: "ClusterGKMCache llama".into(),
            source: PullSecretError::Invalid {
                namespace: "gkm-pull".into(),
                name: "admin-creds".into(),
                reason: "auths[\"other.io/team\"] names a repository path".into(),
            },
        };
        let (status, body) = refuse(e);
        assert_eq!(status, StatusCode::CONFLICT);
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("ClusterGKMCache llama"), "{message}");
        assert!(message.contains("pull_secret_invalid"), "{message}");
        for hidden in ["admin-creds", "gkm-pull", "other.io"] {
            assert!(!message.contains(hidden), "{hidden} in {message}");
        }
    }
}
