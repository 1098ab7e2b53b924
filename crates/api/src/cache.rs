//! `GKMCache` (namespaced) and `ClusterGKMCache` (cluster-wide): what a user applies.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema::{dns_label_list, opaque_object, secret_ref_list};

/// A kernel cache image that pods of this namespace may mount.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "gkm.io",
    version = "v1alpha1",
    kind = "GKMCache",
    plural = "gkmcaches",
    shortname = "gkmc",
    namespaced,
    status = "CacheStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.shortDigest"}"#,
    printcolumn = r#"{"name":"Ready-Nodes","type":"integer","jsonPath":".status.counts.nodesReady"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Full-Digest","type":"string","jsonPath":".status.resolvedDigest","priority":1}"#,
    printcolumn = r#"{"name":"Authority","type":"string","jsonPath":".status.provenance.authority","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GKMCacheSpec {
    /// OCI reference of the cache image, by tag or by digest
    /// (`registry[:port]/path[:tag][@sha256:…]`). The admission webhook resolves it to a
    /// digest once; every later step uses that digest.
    #[schemars(length(min = 1, max = 4096))]
    pub image: String,

    /// Secrets of type `kubernetes.io/dockerconfigjson` with credentials for `image`'s
    /// registry, by name: for a `GKMCache`, in its own namespace; for a `ClusterGKMCache`,
    /// in the namespace the trust policy names (`pullSecretNamespace`). The controller
    /// reads them to resolve and verify the image; a node receives the entry for the
    /// image's registry only, from the controller, and only while a pod on that node
    /// mounts the cache (docs/security.md, "Pull credentials").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "secret_ref_list")]
    pub image_pull_secrets: Vec<PullSecretRef>,

    #[serde(flatten)]
    pub compat: LegacyFields,
}

/// A kernel cache image that pods of the listed namespaces (or all) may mount.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "gkm.io",
    version = "v1alpha1",
    kind = "ClusterGKMCache",
    plural = "clustergkmcaches",
    shortname = "cgkmc",
    status = "CacheStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.shortDigest"}"#,
    printcolumn = r#"{"name":"Ready-Nodes","type":"integer","jsonPath":".status.counts.nodesReady"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Full-Digest","type":"string","jsonPath":".status.resolvedDigest","priority":1}"#,
    printcolumn = r#"{"name":"Authority","type":"string","jsonPath":".status.provenance.authority","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterGKMCacheSpec {
    /// OCI reference of the cache image, by tag or by digest.
    #[schemars(length(min = 1, max = 4096))]
    pub image: String,

    /// Secrets of type `kubernetes.io/dockerconfigjson` with credentials for `image`'s
    /// registry, by name: for a `GKMCache`, in its own namespace; for a `ClusterGKMCache`,
    /// in the namespace the trust policy names (`pullSecretNamespace`). The controller
    /// reads them to resolve and verify the image; a node receives the entry for the
    /// image's registry only, from the controller, and only while a pod on that node
    /// mounts the cache (docs/security.md, "Pull credentials").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "secret_ref_list")]
    pub image_pull_secrets: Vec<PullSecretRef>,

    /// Namespaces whose pods may mount this cache. Empty or absent: every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "dns_label_list")]
    pub workload_namespaces: Vec<String>,

    #[serde(flatten)]
    pub compat: LegacyFields,
}

/// A Secret named by a cache's `imagePullSecrets` (the shape of a Pod's
/// `imagePullSecrets` entries, Kubernetes' `LocalObjectReference`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct PullSecretRef {
    /// The Secret's name (a DNS subdomain).
    pub name: String,
}

/// Fields of the earlier GKM's cache manifests, which provisioned a PVC per cache.
/// GKM mounts caches through CSI inline volumes instead, so these are accepted (manifests
/// written for the earlier GKM apply unchanged) and otherwise ignored; the admission
/// webhook warns when they are set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LegacyFields {
    /// Ignored (earlier GKM: access modes of the PVC it created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_modes: Option<Vec<String>>,

    /// Ignored (earlier GKM: storage class of the PVC it created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Ignored (earlier GKM: template of its extraction pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "opaque_object")]
    pub pod_template: Option<serde_json::Value>,
}

impl LegacyFields {
    /// The names of the legacy fields that are set, for the admission warning.
    pub fn set_fields(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        if self.access_modes.is_some() {
            set.push("spec.accessModes");
        }
        if self.storage_class_name.is_some() {
            set.push("spec.storageClassName");
        }
        if self.pod_template.is_some() {
            set.push("spec.podTemplate");
        }
        set
    }
}

/// Status of a cache, written only by the controller (RBAC on the status subresource).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// The verified digest, promoted from the `gkm.io/resolvedDigest` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_digest: Option<String>,

    /// `sha256:` and the first 12 hex digits of `resolvedDigest`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_digest: Option<String>,

    /// When `resolvedDigest` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,

    /// Standard conditions; at least `Verified` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Node and pod counts aggregated from the node objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<CacheCounts>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Who vouched for `resolvedDigest`, as the controller's own verification found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// Who vouched for a cache's digest: what the controller's verification under the trust
/// policy found. Written by the controller only, from its own verification; nothing in
/// it comes from the cache's spec or annotations.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    /// The digest this describes (the `resolvedDigest` it was verified for).
    pub digest: String,
    /// The name of the trust policy's authority whose signature verified.
    pub authority: String,
    /// `sha256:<hex>` of the authority key's SubjectPublicKeyInfo (key authorities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// The signing certificate's OIDC issuer (keyless authorities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The signing certificate's subject, its email or URI SAN (keyless authorities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Where the signature was found: `tag` (cosign's `.sig` tag) or `bundle` (a Sigstore
    /// bundle referrer).
    pub signature_format: String,
    /// Whether the trust policy required attestations of caches.
    pub attestation_required: bool,
    /// The predicate types of the required attestations found (empty when none required).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<String>,
    /// When the digest was verified under this authority (the first such verification
    /// the controller made; re-verifications with the same outcome keep it).
    pub verified_at: Time,
}

/// How many nodes and pods a cache reaches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CacheCounts {
    /// Nodes on which the current digest is extracted and compatible.
    pub nodes_ready: u32,
    /// Nodes that report an error for the current digest.
    pub nodes_error: u32,
    /// Nodes none of whose GPUs the current digest is compatible with.
    pub nodes_incompatible: u32,
    /// Pods that mount the cache, on all nodes.
    pub pods: u32,
}

/// `sha256:` plus the first 12 hex digits, as `kubectl get` shows a digest.
pub fn short_digest(digest: &str) -> String {
    match digest.split_once(':') {
        Some((algo, hex)) => format!("{algo}:{}", &hex[..hex.len().min(12)]),
        None => digest[..digest.len().min(19)].to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_digest_keeps_algorithm_and_twelve_digits() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(short_digest(d), "sha256:0123456789ab");
        assert_eq!(short_digest("sha256:abc"), "sha256:abc");
    }

    #[test]
    fn legacy_manifest_round_trips() {
        let spec: GKMCacheSpec = serde_json::from_value(serde_json::json!({
            "image": "quay.io/gkm/cache-examples:vector-add-cache-rocm-v2",
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "standard",
            "podTemplate": {"spec": {"tolerations": []}}
        }))
        .unwrap();
        assert_eq!(
            spec.compat.set_fields(),
            [
                "spec.accessModes",
                "spec.storageClassName",
                "spec.podTemplate"
            ]
        );
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["accessModes"][0], "ReadWriteOnce");
        assert_eq!(
            back["podTemplate"]["spec"]["tolerations"],
            serde_json::json!([])
        );
    }

    #[test]
    fn empty_workload_namespaces_is_omitted() {
        let spec = ClusterGKMCacheSpec {
            image: "r.example/c:1".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v, serde_json::json!({"image": "r.example/c:1"}));
    }
}

/// What GKM reads and writes of either cache kind, so code over both is written once.
pub trait Cache {
    /// Which cache this is; `None` for an object without a name (or a namespaced one
    /// without a namespace), which the API server never returns.
    fn cache_ref(&self) -> Option<super::CacheRef>;
    fn image(&self) -> &str;
    /// `spec.imagePullSecrets`: Secret names, in the namespace [`Cache::cache_ref`] and
    /// the trust policy determine.
    fn image_pull_secrets(&self) -> &[PullSecretRef];
    fn status(&self) -> Option<&CacheStatus>;
    fn status_mut(&mut self) -> &mut Option<CacheStatus>;
    fn legacy_mut(&mut self) -> &mut LegacyFields;
}

macro_rules! impl_cache {
    ($kind:ty, |$c:ident| $cache_ref:expr) => {
        impl Cache for $kind {
            fn cache_ref(&self) -> Option<super::CacheRef> {
                let $c = self;
                $cache_ref
            }
            fn image(&self) -> &str {
                &self.spec.image
            }
            fn image_pull_secrets(&self) -> &[PullSecretRef] {
                &self.spec.image_pull_secrets
            }
            fn status(&self) -> Option<&CacheStatus> {
                self.status.as_ref()
            }
            fn status_mut(&mut self) -> &mut Option<CacheStatus> {
                &mut self.status
            }
            fn legacy_mut(&mut self) -> &mut LegacyFields {
                &mut self.spec.compat
            }
        }
    };
}

impl_cache!(GKMCache, |c| Some(super::CacheRef::Namespaced {
    namespace: c.metadata.namespace.clone()?,
    name: c.metadata.name.clone()?,
}));
impl_cache!(ClusterGKMCache, |c| Some(super::CacheRef::Cluster {
    name: c.metadata.name.clone()?,
}));
