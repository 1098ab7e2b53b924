//! The admission rules for `GKMCache` and `ClusterGKMCache`, and the one mapping from their
//! outcomes to AdmissionReview responses.
//!
//! Mutating (CREATE, and UPDATE that changes `spec.image`): resolve and verify the image,
//! then set `gkm.io/resolvedDigest` to that digest, overwriting whatever the user wrote.
//! Validating: the annotation must be exactly what GKM itself resolved and verified on
//! CREATE and on an image change, and must not be added, changed or removed otherwise.
//! Validation never relies on having seen the mutating call (another replica may have
//! served it): it resolves and verifies again, through the verifier's cache.
//! Configured trusted users (service accounts of GKM's own automation) are exempt.
//!
//! [`pods`] holds the trust policy's Pod rules (`podPolicy`: pinning and validation),
//! served on their own paths.

use std::collections::BTreeMap;

use gkm_api::RESOLVED_DIGEST_ANNOTATION;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use tracing::{info, warn};

use crate::verify::{ImageVerifier, VerifiedImage};

pub mod pod_env;
pub mod pods;
pub mod server;

/// What admission decided, before it becomes a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        warnings: Vec<String>,
    },
    /// Allow, setting the annotation to this digest.
    SetDigest {
        digest: String,
        warnings: Vec<String>,
    },
    Deny(String),
    /// Allow, applying this JSON patch (the Pod environment rule).
    Patch {
        patch: json_patch::Patch,
        warnings: Vec<String>,
    },
}

/// The admission rules, with the verifier they ask.
pub struct Admission<V: ImageVerifier> {
    verifier: V,
    /// Usernames (e.g. `system:serviceaccount:gkm-system:gkm-promoter`) exempt from the
    /// annotation rules.
    trusted_users: Vec<String>,
    /// Where the Pod environment rule learns cache kinds (none without API access).
    kinds: Option<std::sync::Arc<dyn pod_env::CacheKindSource>>,
    /// Reads caches' `imagePullSecrets` (none without API access: a cache naming some is
    /// then denied, saying so).
    pull_secrets: Option<crate::pull_secrets::PullSecrets>,
}

/// The parts of a cache object the rules look at.
#[derive(Debug, Default, Clone, PartialEq)]
struct View {
    image: Option<String>,
    digest: Option<String>,
    legacy: Vec<&'static str>,
    pull_secrets: Vec<String>,
}

fn view(obj: Option<&DynamicObject>) -> View {
    let Some(o) = obj else {
        return View::default();
    };
    let spec = o.data.get("spec");
    let field = |k: &str| spec.and_then(|s| s.get(k)).filter(|v| !v.is_null());
    let mut legacy = Vec::new();
    for (k, shown) in [
        ("accessModes", "spec.accessModes"),
        ("storageClassName", "spec.storageClassName"),
        ("podTemplate", "spec.podTemplate"),
    ] {
        if field(k).is_some() {
            legacy.push(shown);
        }
    }
    View {
        image: field("image").and_then(|v| v.as_str()).map(str::to_string),
        digest: o
            .metadata
            .annotations
            .as_ref()
            .and_then(|a: &BTreeMap<String, String>| a.get(RESOLVED_DIGEST_ANNOTATION))
            .cloned(),
        legacy,
        pull_secrets: field("imagePullSecrets")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.get("name").and_then(|n| n.as_str()))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn legacy_warnings(v: &View) -> Vec<String> {
    if v.legacy.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{} ignored: GKM mounts caches through CSI inline volumes (csi.gkm.io), not PVCs",
        v.legacy.join(", ")
    )]
}

impl<V: ImageVerifier> Admission<V> {
    pub fn new(verifier: V, trusted_users: Vec<String>) -> Self {
        Self {
            verifier,
            trusted_users,
            kinds: None,
            pull_secrets: None,
        }
    }

    /// Lets the cache rules read `imagePullSecrets`.
    pub fn with_pull_secrets(mut self, secrets: crate::pull_secrets::PullSecrets) -> Self {
        self.pull_secrets = Some(secrets);
        self
    }

    /// Lets the Pod environment rule look up cache kinds.
    pub fn with_cache_kinds(mut self, kinds: std::sync::Arc<dyn pod_env::CacheKindSource>) -> Self {
        self.kinds = Some(kinds);
        self
    }

    /// The Pod environment rule (`/mutate-pods`).
    pub async fn mutate_pod(&self, req: &AdmissionRequest<DynamicObject>) -> Decision {
        pod_env::mutate(self.kinds.as_deref(), req).await
    }

    fn trusted(&self, req: &AdmissionRequest<DynamicObject>) -> bool {
        self.trusted_users
            .iter()
            .any(|u| *u == req.user_info.username.clone().unwrap_or_default())
    }

    /// `view`'s image resolved and verified, with the cache's own pull secrets when it
    /// names some (read from the namespace [`crate::pull_secrets::secret_namespace`]
    /// gives).
    async fn verified(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        view: &View,
    ) -> Result<VerifiedImage, String> {
        let (kind, name) = (&req.kind.kind, &req.name);
        let Some(image) = view.image.as_deref().filter(|i| !i.is_empty()) else {
            return Err(format!("{kind} {name}: spec.image is required"));
        };
        let credentials = if view.pull_secrets.is_empty() {
            gkm_image::oci::Credentials::anonymous()
        } else {
            let namespace = req.namespace.as_deref().unwrap_or_default();
            let Some(cache) = gkm_api::CacheRef::from_parts(kind, namespace, name) else {
                return Err(format!("{kind} {name}: not a cache kind with pull secrets"));
            };
            crate::pull_secrets::PullSecrets::for_cache(
                self.pull_secrets.as_ref(),
                &cache,
                &view.pull_secrets,
                self.verifier.pull_secret_namespace().as_deref(),
            )
            .await
            .map_err(|e| format!("{kind} {name}: spec.imagePullSecrets: {e}"))?
        };
        self.verifier
            .verify_with(image, crate::verify::Scope::Caches, &credentials)
            .await
            .map_err(|d| format!("{kind} {name}: {d}"))
    }

    /// The Pod pinning rule (`podPolicy.verifySignatures`: `/pin-pods`).
    pub async fn pin_pod(&self, req: &AdmissionRequest<DynamicObject>) -> Decision {
        pods::pin(&self.verifier, req).await
    }

    /// The Pod rule (`podPolicy`).
    pub async fn validate_pod(&self, req: &AdmissionRequest<DynamicObject>) -> Decision {
        pods::validate(&self.verifier, req).await
    }

    /// The mutating rule.
    pub async fn mutate(&self, req: &AdmissionRequest<DynamicObject>) -> Decision {
        let new = view(req.object.as_ref());
        let warnings = legacy_warnings(&new);
        // New credentials are resolved with again, like a new image: they may not reach
        // the image at all, or reach another tag state.
        let image_changed = match req.operation {
            Operation::Create => true,
            Operation::Update => {
                let old = view(req.old_object.as_ref());
                old.image != new.image || old.pull_secrets != new.pull_secrets
            }
            _ => return Decision::Allow { warnings },
        };
        if !image_changed {
            return Decision::Allow { warnings };
        }
        // A trusted user may pin a digest explicitly; the validating rule still checks it
        // is theirs to set.
        if self.trusted(req) && new.digest.is_some() {
            return Decision::Allow { warnings };
        }
        match self.verified(req, &new).await {
            Ok(v) => {
                info!(image = new.image.as_deref().unwrap_or(""), digest = %v.digest, authority = %v.authority, "verified");
                Decision::SetDigest {
                    digest: v.digest,
                    warnings,
                }
            }
            Err(reason) => Decision::Deny(reason),
        }
    }

    /// The validating rule.
    pub async fn validate(&self, req: &AdmissionRequest<DynamicObject>) -> Decision {
        let new = view(req.object.as_ref());
        let warnings = legacy_warnings(&new);
        if self.trusted(req) {
            return Decision::Allow { warnings };
        }
        let (kind, name) = (&req.kind.kind, &req.name);
        let must_verify = match req.operation {
            Operation::Create => true,
            Operation::Update => {
                let old = view(req.old_object.as_ref());
                if old.image == new.image && old.pull_secrets == new.pull_secrets {
                    if old.digest != new.digest {
                        return Decision::Deny(format!(
                            "{kind} {name}: {RESOLVED_DIGEST_ANNOTATION} is set by GKM's admission webhook only and may not be added, changed or removed (was {:?}, request has {:?})",
                            old.digest, new.digest
                        ));
                    }
                    false
                } else {
                    true
                }
            }
            _ => false,
        };
        if !must_verify {
            return Decision::Allow { warnings };
        }
        let Some(claimed) = new.digest.clone() else {
            return Decision::Deny(format!(
                "{kind} {name}: {RESOLVED_DIGEST_ANNOTATION} is missing (is GKM's mutating webhook configured?)"
            ));
        };
        match self.verified(req, &new).await {
            Ok(v) if v.digest == claimed => Decision::Allow { warnings },
            Ok(v) => {
                warn!(claimed = %claimed, resolved = %v.digest, "annotation does not match the verified digest");
                Decision::Deny(format!(
                    "{kind} {name}: {RESOLVED_DIGEST_ANNOTATION} is {claimed}, but GKM resolved and verified {} for {}",
                    v.digest,
                    new.image.as_deref().unwrap_or("")
                ))
            }
            Err(reason) => Decision::Deny(reason),
        }
    }
}

impl Decision {
    /// The AdmissionReview response for this decision.
    pub fn into_response(self, req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let mut resp = AdmissionResponse::from(req);
        let warnings = match self {
            Decision::Deny(reason) => return resp.deny(reason),
            Decision::Allow { warnings } => warnings,
            Decision::SetDigest { digest, warnings } => {
                match resp
                    .clone()
                    .with_patch(digest_patch(req.object.as_ref(), &digest))
                {
                    Ok(r) => resp = r,
                    Err(e) => {
                        return AdmissionResponse::from(req)
                            .deny(format!("building the patch: {e}"));
                    }
                }
                warnings
            }
            Decision::Patch { patch, warnings } => {
                match resp.clone().with_patch(patch) {
                    Ok(r) => resp = r,
                    Err(e) => {
                        return AdmissionResponse::from(req)
                            .deny(format!("building the patch: {e}"));
                    }
                }
                warnings
            }
        };
        if !warnings.is_empty() {
            resp.warnings = Some(warnings);
        }
        resp
    }
}

/// A JSON patch setting the annotation (creating `metadata.annotations` when absent).
pub fn digest_patch(obj: Option<&DynamicObject>, digest: &str) -> json_patch::Patch {
    let has_annotations = obj.and_then(|o| o.metadata.annotations.as_ref()).is_some();
    let op = if has_annotations {
        // `/` in the key is `~1` in a JSON pointer.
        serde_json::json!([{
            "op": "add",
            "path": format!("/metadata/annotations/{}", RESOLVED_DIGEST_ANNOTATION.replace('~', "~0").replace('/', "~1")),
            "value": digest,
        }])
    } else {
        serde_json::json!([{
            "op": "add",
            "path": "/metadata/annotations",
            "value": {RESOLVED_DIGEST_ANNOTATION: digest},
        }])
    };
    serde_json::from_value(op).expect("a well-formed JSON patch")
}

/// What the admission tests of this module and of [`pods`] share.
#[cfg(test)]
mod test_support {
    use kube::core::DynamicObject;
    use kube::core::admission::{AdmissionRequest, AdmissionReview};

    /// An AdmissionRequest for `kind` (group, version, kind, resource) of object
    /// `(namespace, name)`, as the API server sends it.
    pub fn request(
        kind: (&str, &str, &str, &str),
        object: (&str, &str),
        op: &str,
        user: &str,
        new: serde_json::Value,
        old: Option<serde_json::Value>,
    ) -> AdmissionRequest<DynamicObject> {
        let (group, version, kind, resource) = kind;
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": resource},
                "name": object.1,
                "namespace": object.0,
                "operation": op,
                "userInfo": {"username": user},
                "object": new,
                "oldObject": old,
                "dryRun": false,
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::Denial;
    use std::sync::Mutex;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    /// Verifies `r.io/signed:*` to a digest per tag; denies everything else.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }

    impl ImageVerifier for Fake {
        async fn verify(
            &self,
            image: &str,
            _: crate::verify::Scope,
        ) -> Result<VerifiedImage, Denial> {
            self.calls.lock().unwrap().push(image.to_string());
            match image {
                "r.io/signed:v1" => Ok(VerifiedImage {
                    repository: "r.io/signed".into(),
                    digest: D1.into(),
                    authority: "key".into(),
                }),
                "r.io/signed:v2" => Ok(VerifiedImage {
                    repository: "r.io/signed".into(),
                    digest: D2.into(),
                    authority: "key".into(),
                }),
                other => Err(Denial::new(
                    "not_verified",
                    format!("{other}: no signature matches any authority"),
                )),
            }
        }
        fn pod_rules(&self) -> gkm_image::trust::PodRules {
            unreachable!("the cache rules never ask for the pod rules")
        }
    }

    fn obj(image: &str, digest: Option<&str>, legacy: bool) -> serde_json::Value {
        let mut spec = serde_json::json!({"image": image});
        if legacy {
            spec["accessModes"] = serde_json::json!(["ReadWriteOnce"]);
        }
        let mut meta = serde_json::json!({"name": "c", "namespace": "ns"});
        if let Some(d) = digest {
            meta["annotations"] = serde_json::json!({RESOLVED_DIGEST_ANNOTATION: d});
        }
        serde_json::json!({"apiVersion": "gkm.io/v1alpha1", "kind": "GKMCache", "metadata": meta, "spec": spec})
    }

    fn request(
        op: &str,
        user: &str,
        new: serde_json::Value,
        old: Option<serde_json::Value>,
    ) -> AdmissionRequest<DynamicObject> {
        test_support::request(
            ("gkm.io", "v1alpha1", "GKMCache", "gkmcaches"),
            ("ns", "c"),
            op,
            user,
            new,
            old,
        )
    }

    fn admission() -> Admission<Fake> {
        Admission::new(
            Fake::default(),
            vec!["system:serviceaccount:gkm-system:promoter".into()],
        )
    }

    #[tokio::test]
    async fn create_sets_the_verified_digest_over_whatever_the_user_wrote() {
        let a = admission();
        let d = a
            .mutate(&request(
                "CREATE",
                "alice",
                obj("r.io/signed:v1", Some(D2), false),
                None,
            ))
            .await;
        assert_eq!(
            d,
            Decision::SetDigest {
                digest: D1.into(),
                warnings: vec![]
            }
        );
    }

    #[tokio::test]
    async fn unverifiable_images_are_denied_with_the_reason() {
        let a = admission();
        match a
            .mutate(&request(
                "CREATE",
                "alice",
                obj("r.io/unsigned:v1", None, false),
                None,
            ))
            .await
        {
            Decision::Deny(r) => assert!(
                r.contains("r.io/unsigned:v1") && r.contains("no signature"),
                "{r}"
            ),
            d => panic!("{d:?}"),
        }
        match a
            .mutate(&request("CREATE", "alice", obj("", None, false), None))
            .await
        {
            Decision::Deny(r) => assert!(r.contains("spec.image"), "{r}"),
            d => panic!("{d:?}"),
        }
    }

    #[tokio::test]
    async fn legacy_fields_bring_a_warning() {
        let a = admission();
        match a
            .mutate(&request(
                "CREATE",
                "alice",
                obj("r.io/signed:v1", None, true),
                None,
            ))
            .await
        {
            Decision::SetDigest { warnings, .. } => {
                assert!(warnings[0].contains("spec.accessModes"), "{warnings:?}")
            }
            d => panic!("{d:?}"),
        }
    }

    #[tokio::test]
    async fn validation_checks_the_annotation_on_create_without_the_mutating_call() {
        let a = admission();
        let ok = a
            .validate(&request(
                "CREATE",
                "alice",
                obj("r.io/signed:v1", Some(D1), false),
                None,
            ))
            .await;
        assert!(matches!(ok, Decision::Allow { .. }), "{ok:?}");
        for (digest, words) in [(Some(D2), "resolved and verified"), (None, "missing")] {
            match a
                .validate(&request(
                    "CREATE",
                    "alice",
                    obj("r.io/signed:v1", digest, false),
                    None,
                ))
                .await
            {
                Decision::Deny(r) => assert!(r.contains(words), "{r}"),
                d => panic!("{d:?}"),
            }
        }
    }

    #[tokio::test]
    async fn users_cannot_add_change_or_remove_the_annotation() {
        let a = admission();
        let cases = [
            (None, Some(D1)),     // add
            (Some(D1), Some(D2)), // change
            (Some(D1), None),     // remove
        ];
        for (old, new) in cases {
            let req = request(
                "UPDATE",
                "alice",
                obj("r.io/signed:v1", new, false),
                Some(obj("r.io/signed:v1", old, false)),
            );
            assert_eq!(
                a.mutate(&req).await,
                Decision::Allow { warnings: vec![] },
                "the mutator leaves it alone"
            );
            match a.validate(&req).await {
                Decision::Deny(r) => {
                    assert!(r.contains("may not be added, changed or removed"), "{r}")
                }
                d => panic!("{old:?} -> {new:?}: {d:?}"),
            }
        }
        // The trusted service account can.
        let req = request(
            "UPDATE",
            "system:serviceaccount:gkm-system:promoter",
            obj("r.io/signed:v1", Some(D2), false),
            Some(obj("r.io/signed:v1", Some(D1), false)),
        );
        assert!(matches!(a.validate(&req).await, Decision::Allow { .. }));
        // Unchanged image and annotation: nothing to verify.
        let calls_before = a.verifier.calls.lock().unwrap().len();
        let same = request(
            "UPDATE",
            "alice",
            obj("r.io/signed:v1", Some(D1), false),
            Some(obj("r.io/signed:v1", Some(D1), false)),
        );
        assert!(matches!(a.validate(&same).await, Decision::Allow { .. }));
        assert_eq!(a.verifier.calls.lock().unwrap().len(), calls_before);
    }

    #[tokio::test]
    async fn an_image_change_is_verified_again() {
        let a = admission();
        let req = request(
            "UPDATE",
            "alice",
            obj("r.io/signed:v2", Some(D1), false),
            Some(obj("r.io/signed:v1", Some(D1), false)),
        );
        assert_eq!(
            a.mutate(&req).await,
            Decision::SetDigest {
                digest: D2.into(),
                warnings: vec![]
            }
        );
        // Had the mutator not run, the stale annotation is refused.
        assert!(matches!(a.validate(&req).await, Decision::Deny(_)));
        let fixed = request(
            "UPDATE",
            "alice",
            obj("r.io/signed:v2", Some(D2), false),
            Some(obj("r.io/signed:v1", Some(D1), false)),
        );
        assert!(matches!(a.validate(&fixed).await, Decision::Allow { .. }));
    }

    #[test]
    fn the_patch_escapes_the_annotation_key() {
        let with: DynamicObject = serde_json::from_value(obj("r", Some(D2), false)).unwrap();
        let p = serde_json::to_value(digest_patch(Some(&with), D1)).unwrap();
        assert_eq!(p[0]["path"], "/metadata/annotations/gkm.io~1resolvedDigest");
        let without: DynamicObject = serde_json::from_value(obj("r", None, false)).unwrap();
        let p = serde_json::to_value(digest_patch(Some(&without), D1)).unwrap();
        assert_eq!(p[0]["path"], "/metadata/annotations");
        assert_eq!(p[0]["value"][RESOLVED_DIGEST_ANNOTATION], D1);
    }
}
