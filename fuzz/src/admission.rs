//! Admission requests (`gkm_controller::webhook`): arbitrary bytes POSTed as an
//! AdmissionReview to `/mutate`, `/validate`, `/mutate-pods` or `/validate-pods`, through
//! `webhook::server::answer`, the code the HTTPS handler runs on a request's body, with a
//! fake verifier and a fake cache-kind source that never touch the network.
//!
//! Input: byte 0 chooses the endpoint (bits 0-1), whether the Pod rule verifies
//! signatures (bit 2) and whether cache kinds can be looked up (bit 3); the rest is the
//! request body.
//!
//! Checks:
//! - no panic; a body that is not an AdmissionReview gets 400, anything else 200 and an
//!   AdmissionReview whose response carries the request's uid;
//! - a patch comes only with an allowed response, and applies cleanly to the object;
//! - `/validate`: outside the trusted users, an UPDATE that keeps `spec.image` but adds,
//!   changes or removes `gkm.io/resolvedDigest` is denied, and an allowed CREATE carries
//!   exactly the digest the verifier resolved;
//! - `/mutate`: a patched object's annotation is the digest the verifier resolved;
//! - `/validate-pods`: in a namespace the policy covers, an allowed CREATE has only
//!   images from the trusted registry, pinned by sha256 digest (and signed, when the rule
//!   verifies signatures);
//! - `/mutate-pods`: every cache variable the patch adds points at a path where that
//!   container mounts a volume.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use gkm::api::CacheRef;
use gkm::kernel_cache::CacheKind;
use gkm::trust::{PodPolicy, PodRules, RegistryPrefix};
use gkm_controller::verify::{Denial, ImageVerifier, VerifiedImage};
use gkm_controller::webhook::pod_env::CacheKindSource;
use gkm_controller::webhook::{Admission, server};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde_json::Value;

pub const ENDPOINTS: [&str; 4] = ["/mutate", "/validate", "/mutate-pods", "/validate-pods"];
pub const TRUSTED_USER: &str = "system:serviceaccount:gkm-system:gkm-promoter";
pub const TRUSTED_REGISTRY: &str = "trusted.example.com";
const ANNOTATION: &str = gkm::api::RESOLVED_DIGEST_ANNOTATION;

/// Resolves every well-formed reference to a digest (its own sha256 digest, or one made
/// from the string), refuses references containing `unsigned`.
pub struct FakeVerifier {
    pub verify_signatures: bool,
}

/// What [`FakeVerifier`] answers for `image`, without a future.
pub fn resolve(image: &str) -> Result<VerifiedImage, Denial> {
    let r = gkm::oci::parse_reference(image).map_err(Denial::from)?;
    if image.contains("unsigned") {
        return Err(Denial::new(
            "not_verified",
            format!("{image}: no valid signature"),
        ));
    }
    let digest = match r.digest().filter(|d| gkm::oci::sha256_hex(d).is_some()) {
        Some(d) => d.to_string(),
        None => {
            // FNV-1a, four times over: a stable stand-in for the manifest's digest.
            let mut hex = String::from("sha256:");
            for round in 0u64..4 {
                let mut h = 0xcbf2_9ce4_8422_2325u64 ^ round;
                for b in image.bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                }
                hex.push_str(&format!("{h:016x}"));
            }
            hex
        }
    };
    Ok(VerifiedImage {
        repository: format!("{}/{}", r.registry(), r.repository()),
        digest,
        authority: "fuzz".into(),
    })
}

impl ImageVerifier for FakeVerifier {
    fn verify(
        &self,
        image: &str,
        _: gkm_controller::verify::Scope,
    ) -> impl Future<Output = Result<VerifiedImage, Denial>> + Send {
        std::future::ready(resolve(image))
    }

    fn pod_rules(&self) -> PodRules {
        PodRules {
            policy: PodPolicy {
                namespaces: vec!["ml-*".into(), "prod".into()],
                require_digest: true,
                verify_signatures: self.verify_signatures,
            },
            trusted_registries: vec![
                RegistryPrefix::parse(TRUSTED_REGISTRY).expect("a registry prefix"),
            ],
        }
    }
}

/// Cache kinds by the cache's name: `t…` Triton, `i…` Inductor, `v…` vLLM, others unknown.
pub struct FakeKinds;

impl CacheKindSource for FakeKinds {
    fn kind<'a>(&'a self, key: &'a CacheRef) -> BoxFuture<'a, Result<CacheKind, String>> {
        let name = match key {
            CacheRef::Namespaced { name, .. } | CacheRef::Cluster { name } => name,
        };
        let kind = match name.as_bytes().first() {
            Some(b't') => Ok(CacheKind::Triton),
            Some(b'i') => Ok(CacheKind::Inductor),
            Some(b'v') => Ok(CacheKind::Vllm),
            _ => Err(format!("{} {name} not found", key.kind())),
        };
        Box::pin(std::future::ready(kind))
    }
}

pub fn check(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let endpoint = server::Endpoint::from_path(ENDPOINTS[usize::from(mode & 3)])
        .expect("an admission endpoint");
    let verify_signatures = mode & 4 != 0;
    let mut admission = Admission::new(
        FakeVerifier { verify_signatures },
        vec![TRUSTED_USER.to_string()],
    );
    if mode & 8 != 0 {
        admission = admission.with_cache_kinds(Arc::new(FakeKinds));
    }
    let answered = futures::executor::block_on(server::answer(&admission, endpoint, body));

    let Ok(review) = serde_json::from_slice::<AdmissionReview<DynamicObject>>(body) else {
        let status = answered.map_or_else(|e| e.status().as_u16(), |_| 200);
        assert_eq!(status, 400, "a body that is not an AdmissionReview");
        return;
    };
    let out = answered.expect("an AdmissionReview is answered");
    let answer: AdmissionReview<DynamicObject> =
        serde_json::from_slice(&out).expect("the answer is an AdmissionReview");
    let response = answer.response.expect("the answer has a response");
    let req: Result<AdmissionRequest<DynamicObject>, _> = review.try_into();
    let Ok(req) = req else {
        assert!(!response.allowed, "allowed without a request");
        return;
    };
    assert_eq!(response.uid, req.uid);

    let object = to_value(req.object.as_ref());
    let patched = response.patch.as_ref().map(|bytes| {
        assert!(response.allowed, "a patch on a denial");
        let patch: json_patch::Patch =
            serde_json::from_slice(bytes).expect("the patch is a JSON patch");
        let mut doc = object.clone();
        json_patch::patch(&mut doc, &patch)
            .unwrap_or_else(|e| panic!("the patch {patch:?} does not apply: {e}"));
        doc
    });
    let trusted = req.user_info.username.as_deref() == Some(TRUSTED_USER);
    let image = |v: &Value| {
        v.pointer("/spec/image")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let digest = |v: &Value| {
        v.pointer("/metadata/annotations")
            .and_then(|a| a.get(ANNOTATION))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    match endpoint.path() {
        "/validate" if !trusted => {
            let old = to_value(req.old_object.as_ref());
            if req.operation == Operation::Update
                && image(&old) == image(&object)
                && digest(&old) != digest(&object)
            {
                assert!(!response.allowed, "the annotation was changed: {req:?}");
            }
            if req.operation == Operation::Create && response.allowed {
                let resolved = image(&object).and_then(|i| resolve(&i).ok());
                assert_eq!(
                    digest(&object),
                    resolved.map(|v| v.digest),
                    "allowed a CREATE whose annotation is not the resolved digest"
                );
            }
        }
        "/mutate" => {
            if let Some(doc) = &patched {
                let resolved = image(&object).and_then(|i| resolve(&i).ok());
                assert_eq!(digest(doc), resolved.map(|v| v.digest));
            }
        }
        "/validate-pods" => {
            let covered = req
                .namespace
                .as_deref()
                .is_some_and(|n| n == "prod" || n.starts_with("ml-"));
            if req.operation == Operation::Create && covered && response.allowed {
                for image in images(&object) {
                    check_pod_image(&image, verify_signatures);
                }
            }
        }
        "/mutate-pods" => {
            if let Some(doc) = &patched {
                check_cache_variables(&object, doc);
            }
        }
        _ => {}
    }
}

fn to_value(o: Option<&DynamicObject>) -> Value {
    o.and_then(|o| serde_json::to_value(o).ok())
        .unwrap_or(Value::Null)
}

/// Every container image of a Pod (init, app, ephemeral), read independently of the rule.
fn images(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        for c in pod
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push(
                c.get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    out
}

fn check_pod_image(image: &str, verify_signatures: bool) {
    let r = gkm::oci::parse_reference(image)
        .unwrap_or_else(|e| panic!("allowed an image that does not parse: {e}"));
    let registry = r.registry().to_ascii_lowercase();
    assert_eq!(registry, TRUSTED_REGISTRY, "allowed {image:?}");
    assert!(
        r.digest().and_then(gkm::oci::sha256_hex).is_some(),
        "allowed {image:?} without a sha256 digest"
    );
    if verify_signatures {
        assert!(resolve(image).is_ok(), "allowed unsigned {image:?}");
    }
}

const CACHE_VARIABLES: [&str; 3] = [
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "VLLM_CACHE_ROOT",
];

/// The cache variables a container gained point at one of its mount paths.
fn check_cache_variables(before: &Value, after: &Value) {
    for list in ["initContainers", "containers"] {
        let containers = |v: &Value| {
            v.pointer(&format!("/spec/{list}"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let (old, new) = (containers(before), containers(after));
        assert_eq!(old.len(), new.len(), "the patch changed the containers");
        for (o, n) in old.iter().zip(&new) {
            let env = |c: &Value| -> BTreeSet<(String, String)> {
                c.get("env")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| {
                        Some((
                            e.get("name")?.as_str()?.to_string(),
                            e.get("value")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        ))
                    })
                    .collect()
            };
            let mounts: BTreeSet<&str> = n
                .get("volumeMounts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("mountPath")?.as_str())
                .collect();
            let (had, has) = (env(o), env(n));
            for (name, value) in has.difference(&had) {
                assert!(
                    CACHE_VARIABLES.contains(&name.as_str()),
                    "the patch added {name}"
                );
                assert!(
                    mounts.contains(value.as_str()),
                    "{name}={value} is not a mount path of {n}"
                );
            }
        }
    }
}
