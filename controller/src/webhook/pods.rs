//! The Pod admission rules of the trust policy's `podPolicy`: in the namespaces it names
//! (glob patterns), every container image (init, app and ephemeral) must come from a
//! trusted registry and, with `requireDigest` (the default), be pinned by `@sha256:`
//! digest; with `verifySignatures`, its signature must also verify under the policy.
//!
//! A verification binds a digest, so with `verifySignatures` a pod runs only the digest
//! that was verified: [`pin`] (the mutating `/pin-pods`, failing closed) resolves each
//! tag the pod names, now, verifies that digest and rewrites the image to `repo@digest`;
//! [`validate`] (`/validate-pods`) then admits only images pinned by digest whose digest
//! itself verifies, whatever a later mutating webhook did to them.
//!
//! On UPDATE only images the request adds are checked, so a pod admitted before the policy
//! covered its namespace can still be labelled or have ephemeral containers added under
//! the rule. Every violation of a request is reported at once, each naming its container.

use gkm_image::trust::PodRules;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, Operation};
use serde_json::Value;
use tracing::info;

use super::Decision;
use crate::verify::ImageVerifier;

/// One container's image, as the pod spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerImage {
    /// `containers[0] "app"`, `initContainers[1] "setup"`, `ephemeralContainers[0] "dbg"`.
    pub container: String,
    pub image: String,
    /// The JSON pointer of its `image` field (`/spec/containers/0/image`).
    pub pointer: String,
}

const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];

/// Every container image of a Pod object (its `spec`), in spec order.
pub fn container_images(pod: &Value) -> Vec<ContainerImage> {
    let Some(spec) = pod.get("spec") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list in CONTAINER_LISTS {
        for (i, c) in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            out.push(ContainerImage {
                container: format!("{list}[{i}] {name:?}"),
                pointer: format!("/spec/{list}/{i}/image"),
                image: c
                    .get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
    }
    out
}

fn pod_name(obj: Option<&DynamicObject>, req: &AdmissionRequest<DynamicObject>) -> String {
    if !req.name.is_empty() {
        return req.name.clone();
    }
    obj.and_then(|o| o.metadata.generate_name.clone())
        .map(|g| format!("{g}*"))
        .unwrap_or_default()
}

/// The images a request brings into a namespace the policy covers: every image on
/// CREATE, those not already in the pod on UPDATE; `None` when the rule does not apply.
fn added_images(
    rules: &PodRules,
    req: &AdmissionRequest<DynamicObject>,
) -> Option<Vec<ContainerImage>> {
    let namespace = req.namespace.clone().unwrap_or_default();
    if !matches!(req.operation, Operation::Create | Operation::Update)
        || !rules.policy.covers(&namespace)
    {
        return None;
    }
    let as_value = |o: Option<&DynamicObject>| {
        o.and_then(|o| serde_json::to_value(o).ok())
            .unwrap_or(Value::Null)
    };
    let before: Vec<String> = match req.operation {
        Operation::Update => container_images(&as_value(req.old_object.as_ref()))
            .into_iter()
            .map(|c| c.image)
            .collect(),
        _ => Vec::new(),
    };
    Some(
        container_images(&as_value(req.object.as_ref()))
            .into_iter()
            .filter(|c| !before.contains(&c.image))
            .collect(),
    )
}

/// The denial naming the pod and each of its `violations`.
fn deny(
    rules: &PodRules,
    req: &AdmissionRequest<DynamicObject>,
    violations: &[String],
) -> Decision {
    let namespace = req.namespace.clone().unwrap_or_default();
    let pod = format!("{namespace}/{}", pod_name(req.object.as_ref(), req));
    info!(pod = %pod, violations = violations.len(), "pod denied by podPolicy");
    Decision::Deny(format!(
        "Pod {pod}: namespace {namespace} runs only images from a trusted registry{}{}; {}",
        if rules.policy.require_digest || rules.policy.verify_signatures {
            ", pinned by digest"
        } else {
            ""
        },
        if rules.policy.verify_signatures {
            ", with a verified signature"
        } else {
            ""
        },
        violations.join("; ")
    ))
}

/// Why a pinned image may not run under `verifySignatures`: not pinned by digest, or its
/// digest does not verify. `None` when it may.
async fn unverified<V: ImageVerifier>(verifier: &V, image: &str) -> Option<String> {
    let digest = gkm_image::oci::parse_reference(image)
        .ok()
        .and_then(|r| r.digest().map(str::to_string));
    let Some(digest) = digest else {
        return Some(format!(
            "image {image:?} is not pinned by digest: with verifySignatures a pod runs only the digest GKM verified (its webhook pod-pin.gkm.io rewrites a tag to it; was that webhook skipped, or did a later one change the image?)"
        ));
    };
    match verifier.verify(image, crate::verify::Scope::Pods).await {
        Ok(v) if v.digest == digest => None,
        Ok(v) => Some(format!(
            "image {image:?} names {digest}, but GKM verified {}",
            v.digest
        )),
        Err(d) => Some(d.to_string()),
    }
}

/// The pod rule for one admission request (`/validate-pods`).
pub async fn validate<V: ImageVerifier>(
    verifier: &V,
    req: &AdmissionRequest<DynamicObject>,
) -> Decision {
    let rules = verifier.pod_rules();
    let Some(added) = added_images(&rules, req) else {
        return Decision::Allow {
            warnings: Vec::new(),
        };
    };
    let mut violations = Vec::new();
    for c in &added {
        let problem = match rules.static_violation(&c.image) {
            Some(p) => Some(p),
            None if rules.policy.verify_signatures => unverified(verifier, &c.image).await,
            None => None,
        };
        if let Some(p) = problem {
            violations.push(format!("{}: {p}", c.container));
        }
    }
    if violations.is_empty() {
        return Decision::Allow {
            warnings: Vec::new(),
        };
    }
    deny(&rules, req, &violations)
}

/// The pinning rule for one admission request (`/pin-pods`): with `verifySignatures`, each
/// image the request adds that names a tag is resolved now (never from a memory of earlier
/// resolutions), verified, and rewritten to `repo@digest`, the digest verified. An image
/// that cannot be pinned so denies the pod. Images already pinned are left to
/// [`validate`], which verifies every digest it admits.
pub async fn pin<V: ImageVerifier>(
    verifier: &V,
    req: &AdmissionRequest<DynamicObject>,
) -> Decision {
    let allow = Decision::Allow {
        warnings: Vec::new(),
    };
    let rules = verifier.pod_rules();
    let Some(added) = added_images(&rules, req).filter(|_| rules.policy.verify_signatures) else {
        return allow;
    };
    let (mut patch, mut warnings, mut violations) = (Vec::new(), Vec::new(), Vec::new());
    for c in &added {
        if let Some(p) = rules.static_violation(&c.image) {
            violations.push(format!("{}: {p}", c.container));
            continue;
        }
        if gkm_image::oci::parse_reference(&c.image).is_ok_and(|r| r.digest().is_some()) {
            continue;
        }
        match verifier
            .verify_now(&c.image, crate::verify::Scope::Pods)
            .await
        {
            Ok(v) => {
                let pinned = format!("{}@{}", v.repository, v.digest);
                info!(container = %c.container, image = %c.image, pinned = %pinned, "pinned to the verified digest");
                warnings.push(format!(
                    "{}: image {:?} pinned to {pinned}, the digest GKM verified",
                    c.container, c.image
                ));
                patch
                    .push(serde_json::json!({"op": "replace", "path": c.pointer, "value": pinned}));
            }
            Err(d) => violations.push(format!("{}: {d}", c.container)),
        }
    }
    if !violations.is_empty() {
        return deny(&rules, req, &violations);
    }
    if patch.is_empty() {
        return allow;
    }
    Decision::Patch {
        patch: serde_json::from_value(Value::Array(patch)).expect("a well-formed JSON patch"),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Denial, VerifiedImage};
    use gkm_image::trust::{PodPolicy, RegistryPrefix};

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    struct Fake {
        rules: PodRules,
    }

    impl ImageVerifier for Fake {
        async fn verify(
            &self,
            image: &str,
            _: crate::verify::Scope,
        ) -> Result<VerifiedImage, Denial> {
            // A tag of the signed image names D; a digest is what it says.
            if image.contains("/signed@") || image.ends_with("/signed:v1") {
                Ok(VerifiedImage {
                    repository: "r.io/trusted/signed".into(),
                    digest: D.into(),
                    authority: "key".into(),
                })
            } else {
                Err(Denial::new(
                    "not_verified",
                    format!("{image}: no signature matches any authority"),
                ))
            }
        }
        fn pod_rules(&self) -> PodRules {
            self.rules.clone()
        }
    }

    fn fake(verify: bool) -> Fake {
        Fake {
            rules: PodRules {
                policy: PodPolicy {
                    namespaces: vec!["ml-*".into()],
                    require_digest: true,
                    verify_signatures: verify,
                },
                trusted_registries: vec![RegistryPrefix::parse("r.io/trusted").unwrap()],
            },
        }
    }

    fn pod(images: &[(&str, &str)]) -> Value {
        let (init, rest): (Vec<_>, Vec<_>) = images.iter().partition(|(k, _)| *k == "init");
        let list = |v: &[&(&str, &str)]| {
            v.iter()
                .enumerate()
                .map(|(i, (_, img))| serde_json::json!({"name": format!("c{i}"), "image": img}))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ml-a"},
            "spec": {"initContainers": list(&init), "containers": list(&rest)},
        })
    }

    fn request(
        op: &str,
        ns: &str,
        new: Value,
        old: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        crate::webhook::test_support::request(
            ("", "v1", "Pod", "pods"),
            (ns, "p"),
            op,
            "alice",
            new,
            old,
        )
    }

    fn denial(d: Decision) -> String {
        match d {
            Decision::Deny(r) => r,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn every_bad_container_is_named_at_once() {
        let f = fake(false);
        let p = pod(&[
            ("init", "busybox"),
            ("app", "r.io/trusted/app:v1"),
            ("app", &format!("r.io/trusted/app@{D}")),
        ]);
        let r = denial(validate(&f, &request("CREATE", "ml-a", p, None)).await);
        assert!(r.starts_with("Pod ml-a/p: "), "{r}");
        assert!(
            r.contains(r#"initContainers[0] "c0": image "busybox" is not from a trusted registry (trusted: r.io/trusted)"#),
            "{r}"
        );
        assert!(
            r.contains(
                r#"containers[0] "c0": image "r.io/trusted/app:v1" is not pinned by digest"#
            ),
            "{r}"
        );
        assert!(!r.contains("containers[1]"), "{r}");
    }

    #[tokio::test]
    async fn namespaces_outside_the_globs_are_not_checked() {
        let f = fake(true);
        let d = validate(
            &f,
            &request("CREATE", "web", pod(&[("app", "busybox")]), None),
        )
        .await;
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
    }

    #[tokio::test]
    async fn a_lookalike_registry_is_not_trusted() {
        let f = fake(false);
        for image in [
            format!("r.io/trustedx/app@{D}"),
            format!("r.io.evil.com/trusted/app@{D}"),
            format!("evil.com/r.io/trusted/app@{D}"),
        ] {
            let r = denial(
                validate(
                    &f,
                    &request("CREATE", "ml-a", pod(&[("app", &image)]), None),
                )
                .await,
            );
            assert!(r.contains("not from a trusted registry"), "{image}: {r}");
        }
    }

    #[tokio::test]
    async fn signatures_are_checked_when_the_policy_asks() {
        let unsigned = format!("r.io/trusted/unsigned@{D}");
        let signed = format!("r.io/trusted/signed@{D}");
        let without = validate(
            &fake(false),
            &request("CREATE", "ml-a", pod(&[("app", &unsigned)]), None),
        )
        .await;
        assert!(matches!(without, Decision::Allow { .. }), "{without:?}");
        let r = denial(
            validate(
                &fake(true),
                &request("CREATE", "ml-a", pod(&[("app", &unsigned)]), None),
            )
            .await,
        );
        assert!(r.contains("no signature matches") && r.contains("with a verified signature"));
        let ok = validate(
            &fake(true),
            &request("CREATE", "ml-a", pod(&[("app", &signed)]), None),
        )
        .await;
        assert!(matches!(ok, Decision::Allow { .. }), "{ok:?}");
    }

    #[tokio::test]
    async fn updates_check_only_the_images_they_add() {
        let f = fake(false);
        let old = pod(&[("app", "busybox")]);
        let mut relabelled = old.clone();
        relabelled["metadata"]["labels"] = serde_json::json!({"x": "y"});
        let d = validate(
            &f,
            &request("UPDATE", "ml-a", relabelled, Some(old.clone())),
        )
        .await;
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
        let mut debug = old.clone();
        debug["spec"]["ephemeralContainers"] =
            serde_json::json!([{"name": "dbg", "image": "debian:12"}]);
        let r = denial(validate(&f, &request("UPDATE", "ml-a", debug, Some(old))).await);
        assert!(
            r.contains(r#"ephemeralContainers[0] "dbg": image "debian:12""#),
            "{r}"
        );
        assert!(!r.contains("busybox"), "{r}");
    }

    /// The issue's policy: tags allowed, signatures verified.
    fn fake_tags() -> Fake {
        let mut f = fake(true);
        f.rules.policy.require_digest = false;
        f
    }

    fn patched(pod: &Value, d: Decision) -> Value {
        let Decision::Patch { patch, warnings } = d else {
            panic!("expected a patch, got {d:?}");
        };
        assert!(
            warnings
                .iter()
                .all(|w| w.contains(&format!("pinned to r.io/trusted/signed@{D}"))),
            "{warnings:?}"
        );
        let mut out = pod.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    #[tokio::test]
    async fn a_verified_tag_is_pinned_to_its_digest_in_every_container_kind() {
        let f = fake_tags();
        let tag = "r.io/trusted/signed:v1";
        let pinned = format!("r.io/trusted/signed@{D}");
        let p = pod(&[("init", tag), ("app", tag), ("app", &pinned)]);
        let created = patched(
            &p,
            pin(&f, &request("CREATE", "ml-a", p.clone(), None)).await,
        );
        let images: Vec<String> = container_images(&created)
            .into_iter()
            .map(|c| c.image)
            .collect();
        assert_eq!(images, [pinned.clone(), pinned.clone(), pinned.clone()]);
        // What the pinning rule leaves, the validating rule admits.
        let d = validate(&f, &request("CREATE", "ml-a", created.clone(), None)).await;
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");

        // An ephemeral container added later (kubectl debug) is pinned too, and only it.
        let mut debug = created.clone();
        debug["spec"]["ephemeralContainers"] = serde_json::json!([{"name": "dbg", "image": tag}]);
        let req = request("UPDATE", "ml-a", debug.clone(), Some(created.clone()));
        let Decision::Patch { patch, .. } = pin(&f, &req).await else {
            panic!("the ephemeral container is not pinned");
        };
        let ops = serde_json::to_value(&patch).unwrap();
        assert_eq!(
            ops,
            serde_json::json!([{"op": "replace", "path": "/spec/ephemeralContainers/0/image", "value": pinned}])
        );

        // An unsigned tag is denied at once, naming its container.
        let p = pod(&[("app", "r.io/trusted/unsigned:v1")]);
        let r = denial(pin(&f, &request("CREATE", "ml-a", p, None)).await);
        assert!(
            r.contains(r#"containers[0] "c0": r.io/trusted/unsigned:v1: no signature"#),
            "{r}"
        );
        // Without verifySignatures there is nothing to bind: tags are left as they are.
        let mut unverified = fake_tags();
        unverified.rules.policy.verify_signatures = false;
        let p = pod(&[("app", tag)]);
        let d = pin(&unverified, &request("CREATE", "ml-a", p, None)).await;
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
    }

    #[tokio::test]
    async fn with_verify_signatures_only_the_verified_digest_is_admitted() {
        let f = fake_tags();
        // A tag that reached validation unpinned (the pinning webhook skipped, or a later
        // mutating webhook put the tag back) is denied, in every container kind.
        let mut p = pod(&[
            ("init", "r.io/trusted/signed:v1"),
            ("app", "r.io/trusted/signed:v1"),
        ]);
        p["spec"]["ephemeralContainers"] =
            serde_json::json!([{"name": "dbg", "image": "r.io/trusted/signed:v1"}]);
        let r = denial(validate(&f, &request("CREATE", "ml-a", p, None)).await);
        for c in [
            r#"initContainers[0] "c0""#,
            r#"containers[0] "c0""#,
            r#"ephemeralContainers[0] "dbg""#,
        ] {
            assert!(
                r.contains(&format!(
                    r#"{c}: image "r.io/trusted/signed:v1" is not pinned by digest"#
                )),
                "{c}: {r}"
            );
        }
        // A digest other than the one verified is denied.
        let other = format!("r.io/trusted/signed@sha256:{}", "2".repeat(64));
        let r = denial(
            validate(
                &f,
                &request("CREATE", "ml-a", pod(&[("app", &other)]), None),
            )
            .await,
        );
        assert!(r.contains(&format!("but GKM verified {D}")), "{r}");
    }

    #[test]
    fn require_digest_off_allows_tags_from_trusted_registries() {
        let mut rules = fake(false).rules;
        rules.policy.require_digest = false;
        assert_eq!(rules.static_violation("r.io/trusted/app:v1"), None);
        assert!(rules.static_violation("").is_some());
        assert!(
            rules
                .static_violation("r.io/trusted/app@sha256:short")
                .is_some()
        );
    }
}
