//! `POST /api/images/verify-and-promote`: who may promote, and the one mapping from
//! promotion outcomes to HTTP answers. The work itself is `gkm_image::promote`.
//!
//! The caller sends `Authorization: Bearer <token>` (a service account token, say, from a
//! CI job). The token is checked with a TokenReview, and the caller's right with a
//! SubjectAccessReview for verb `create` on `promotions.gkm.io` (grant it with RBAC, e.g.
//! the `gkm-promoter` ClusterRole); with `promotion.allowedGroups` set, the caller must also
//! be in one of them. Nothing is read from or written to a registry before both pass.

use std::sync::Arc;

use gkm_image::promote::{PromoteError, Promoted, Promoter};
use hyper::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use serde::Deserialize;
use tracing::{Instrument, info, info_span, warn};

/// The path of the API (one definition, shared with the `gkm promote --server` client).
pub const PATH: &str = gkm_image::promote::client::PROMOTE_PATH;
/// What RBAC must grant a caller: `create` on this resource of this group.
pub const RESOURCE: (&str, &str) = ("gkm.io", "promotions");

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub image: String,
    pub digest: String,
}

/// Why a call was refused, before or during promotion.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("checking the caller with the API server: {0}")]
    Review(String),
    #[error("promotion is not served: the controller runs without API server access")]
    NotServed,
    #[error(transparent)]
    Promote(#[from] PromoteError),
}

impl ApiError {
    /// The one mapping from outcomes to HTTP status codes.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Review(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotServed => StatusCode::NOT_IMPLEMENTED,
            ApiError::Promote(e) => match e {
                PromoteError::BadRequest(_)
                | PromoteError::NotVerified { .. }
                | PromoteError::ReservedTag { .. } => StatusCode::BAD_REQUEST,
                PromoteError::TagNamesArtifact { .. } => StatusCode::CONFLICT,
                PromoteError::NotConfigured => StatusCode::NOT_IMPLEMENTED,
                PromoteError::Read { .. }
                | PromoteError::Write(_)
                | PromoteError::Artifact { .. } => StatusCode::BAD_GATEWAY,
                PromoteError::SignKey { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// A short, stable label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Review(_) => "review_failed",
            ApiError::NotServed => "not_configured",
            ApiError::Promote(e) => e.label(),
        }
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.to_string(), "reason": self.label()})
    }
}

/// The caller, as the API server knows them.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    pub user: UserInfo,
}

/// Authenticates and authorises callers.
pub trait Gatekeeper: Send + Sync + 'static {
    fn authenticate(
        &self,
        token: &str,
    ) -> impl std::future::Future<Output = Result<Caller, ApiError>> + Send;
    fn may_promote(
        &self,
        caller: &Caller,
    ) -> impl std::future::Future<Output = Result<bool, ApiError>> + Send;
}

/// The API server's TokenReview and SubjectAccessReview.
pub struct KubeGatekeeper {
    pub client: kube::Client,
}

impl Gatekeeper for KubeGatekeeper {
    async fn authenticate(&self, token: &str) -> Result<Caller, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let done = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::Review(format!("TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        match (status.authenticated, status.user) {
            (Some(true), Some(user)) => Ok(Caller { user }),
            _ => Err(ApiError::Unauthenticated(format!(
                "the bearer token was not accepted by the API server{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            ))),
        }
    }

    async fn may_promote(&self, caller: &Caller) -> Result<bool, ApiError> {
        let u = &caller.user;
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: u.username.clone(),
                groups: u.groups.clone(),
                uid: u.uid.clone(),
                extra: u.extra.clone(),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(RESOURCE.0.into()),
                    resource: Some(RESOURCE.1.into()),
                    verb: Some("create".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let done = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError::Review(format!("SubjectAccessReview: {e}")))?;
        Ok(done.status.is_some_and(|s| s.allowed))
    }
}

/// The answer to a refused call, counted in the promotions metric under its label: every
/// refusal, the server's own (not served, an unreadable body) included, goes through here.
pub fn refuse(e: ApiError) -> (StatusCode, serde_json::Value) {
    gkm_image::metrics::Metrics::result(&crate::metrics::global().promotions, e.label());
    warn!(reason = e.label(), error = %e, "promotion refused");
    (e.status(), e.body())
}

/// The verify-and-promote API: gate, then promote.
pub struct PromoteApi<G: Gatekeeper> {
    pub gate: G,
    pub promoter: Promoter,
    pub trust: Arc<gkm_image::trust::Verifier>,
}

impl<G: Gatekeeper> PromoteApi<G> {
    /// Answers one call: the status and the JSON body.
    pub async fn call(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        match self.try_call(authorization, body).await {
            Ok(done) => {
                gkm_image::metrics::Metrics::result(
                    &crate::metrics::global().promotions,
                    "promoted",
                );
                (
                    StatusCode::OK,
                    serde_json::to_value(done).expect("JSON into memory"),
                )
            }
            Err(e) => refuse(e),
        }
    }

    async fn try_call(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Result<Promoted, ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthenticated(
                    "an `Authorization: Bearer <token>` header is required".into(),
                )
            })?;
        let caller = self.gate.authenticate(token).await?;
        let who = caller.user.username.clone().unwrap_or_default();
        if !self.gate.may_promote(&caller).await? {
            return Err(ApiError::Forbidden(format!(
                "{who} may not promote images (RBAC: create on {}.{})",
                RESOURCE.1, RESOURCE.0
            )));
        }
        let groups = self
            .trust
            .policy()
            .promotion
            .as_ref()
            .map(|p| p.allowed_groups.clone())
            .unwrap_or_default();
        let in_group = caller
            .user
            .groups
            .iter()
            .flatten()
            .any(|g| groups.contains(g));
        if !groups.is_empty() && !in_group {
            return Err(ApiError::Forbidden(format!(
                "{who} is in none of promotion.allowedGroups ({})",
                groups.join(", ")
            )));
        }
        let req: PromoteRequest = serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body must be {{\"image\": \"<incoming repository>[:tag]\", \"digest\": \"sha256:<hex>\"}}: {e}"
            ))
        })?;
        let span =
            info_span!("verify_and_promote", user = %who, image = %req.image, digest = %req.digest);
        async {
            let vouched = gkm_image::trust::attest::Caller {
                username: who.clone(),
                uid: caller.user.uid.clone(),
                groups: caller.user.groups.clone().unwrap_or_default(),
            };
            let done = self
                .promoter
                .promote(&req.image, Some(&req.digest), Some(&vouched))
                .await?;
            info!(promoted = %done.promoted, "promotion done");
            Ok(done)
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Token `good-<name>` is user `<name>` in group `ci`; `may` lists who may promote.
    struct FakeGate {
        may: Vec<&'static str>,
        asked: Mutex<Vec<String>>,
    }

    impl Gatekeeper for FakeGate {
        async fn authenticate(&self, token: &str) -> Result<Caller, ApiError> {
            self.asked.lock().unwrap().push(format!("token {token}"));
            match token.strip_prefix("good-") {
                Some(name) => Ok(Caller {
                    user: UserInfo {
                        username: Some(name.into()),
                        groups: Some(vec!["ci".into()]),
                        ..Default::default()
                    },
                }),
                None => Err(ApiError::Unauthenticated("not accepted".into())),
            }
        }
        async fn may_promote(&self, caller: &Caller) -> Result<bool, ApiError> {
            let who = caller.user.username.clone().unwrap_or_default();
            self.asked.lock().unwrap().push(format!("sar {who}"));
            Ok(self.may.contains(&who.as_str()))
        }
    }

    fn api(policy: &str) -> PromoteApi<FakeGate> {
        let policy =
            gkm_image::trust::TrustPolicy::from_yaml(policy, std::path::Path::new(".")).unwrap();
        let pusher = gkm_image::oci::Pusher::new(vec![], gkm_image::oci::Credentials::anonymous());
        let trust = Arc::new(gkm_image::trust::Verifier::new(
            policy,
            pusher.puller().clone(),
        ));
        PromoteApi {
            gate: FakeGate {
                may: vec!["ci-bot"],
                asked: Default::default(),
            },
            promoter: Promoter::new(trust.clone(), pusher),
            trust,
        }
    }

    const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAzJLRQRTkMeTTlRQlzaJCVoRf2VZwvfIRDRLdVI1i/78=\n-----END PUBLIC KEY-----\n";

    fn policy(groups: &str) -> String {
        let key: String = KEY.lines().map(|l| format!("      {l}\n")).collect();
        format!(
            "authorities:\n  - name: k\n    key: |\n{key}trustedRegistries: [reg.io/kernels]\npromotion:\n  incoming: in.io/dev\n  trusted: reg.io/kernels\n{groups}"
        )
    }

    const BODY: &[u8] = br#"{"image": "elsewhere.io/x:v1", "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111"}"#;

    #[tokio::test]
    async fn no_token_is_401_and_nothing_is_asked() {
        let a = api(&policy(""));
        for header in [None, Some("Basic abc"), Some("Bearer "), Some("Bearer  ")] {
            let (status, body) = a.call(header, BODY).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{header:?}: {body}");
        }
        assert!(a.gate.asked.lock().unwrap().is_empty());
        let (status, _) = a.call(Some("Bearer bad"), BODY).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn no_right_is_403_before_the_body_is_read() {
        let a = api(&policy(""));
        let (status, body) = a.call(Some("Bearer good-alice"), b"not json").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("alice may not promote")
        );
        let a = api(&policy("  allowedGroups: [release]\n"));
        let (status, body) = a.call(Some("Bearer good-ci-bot"), BODY).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("allowedGroups (release)")
        );
    }

    #[tokio::test]
    async fn bad_bodies_and_images_outside_incoming_are_400() {
        let a = api(&policy("  allowedGroups: [ci]\n"));
        let (status, body) = a.call(Some("Bearer good-ci-bot"), b"{\"image\": 1}").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, body) = a.call(Some("Bearer good-ci-bot"), BODY).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("not in the incoming registry in.io/dev"),
            "{body}"
        );
        assert_eq!(body["reason"], "bad_request");
    }

    #[test]
    fn every_outcome_has_one_status() {
        let cases = [
            (ApiError::Unauthenticated(String::new()), 401),
            (ApiError::Forbidden(String::new()), 403),
            (ApiError::BadRequest(String::new()), 400),
            (ApiError::Review(String::new()), 503),
            (ApiError::NotServed, 501),
            (PromoteError::NotConfigured.into(), 501),
            (
                PromoteError::NotVerified {
                    image: "i".into(),
                    reason: "r".into(),
                }
                .into(),
                400,
            ),
            (
                PromoteError::ReservedTag {
                    tag: "t".into(),
                    reason: "r".into(),
                }
                .into(),
                400,
            ),
            (
                PromoteError::TagNamesArtifact {
                    image: "i".into(),
                    what: "w".into(),
                }
                .into(),
                409,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e:?}");
        }
    }
}
