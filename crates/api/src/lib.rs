//! The GKM API (`gkm.io/v1alpha1`): the custom resources as Rust types, the names other
//! programs depend on, the CSI volume contract ([`volume`]), and the CRD manifests
//! generated from the types. Plain types and pure functions: this crate does no IO.
//!
//! The CRD YAML under `deploy/crds/` is generated from these types (`gkm crds --write`) and
//! committed; a test fails when the committed files differ from what the types generate.

mod cache;
mod cache_ref;
mod node;
mod schema;
pub mod volume;

pub use cache::{
    Cache, CacheCounts, CacheStatus, ClusterGKMCache, ClusterGKMCacheSpec, GKMCache, GKMCacheSpec,
    LegacyFields, Provenance, PullSecretRef, short_digest,
};
pub use cache_ref::{CacheRef, is_dns1123_label, is_dns1123_subdomain};
pub use node::{
    CacheDigestStatus, CacheState, ClusterGKMCacheNode, ClusterGKMCacheNodeSpec, GKMCacheNode,
    GKMCacheNodeSpec, GpuBackend, GpuInfo, GpuSource, NodeStatus, PodRef,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every GKM resource.
pub const GROUP: &str = "gkm.io";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";

/// The verified digest of `spec.image`; written only by GKM's mutating webhook.
pub const RESOLVED_DIGEST_ANNOTATION: &str = "gkm.io/resolvedDigest";
/// Checks that `digest` is `sha256:` and 64 lowercase hex digits; returns the hex part.
/// The one digest check: the annotation, statuses, the store and pulls all use it.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// Label of earlier GKM manifests naming the cosign format; accepted, GKM detects it itself.
pub const SIGNATURE_FORMAT_LABEL: &str = "gkm.io/signature-format";

/// The CRDs of GKM, each with the file name it has under `deploy/crds/`.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("gkm.io_gkmcaches.yaml", GKMCache::crd()),
        ("gkm.io_clustergkmcaches.yaml", ClusterGKMCache::crd()),
        ("gkm.io_gkmcachenodes.yaml", GKMCacheNode::crd()),
        (
            "gkm.io_clustergkmcachenodes.yaml",
            ClusterGKMCacheNode::crd(),
        ),
    ]
}

/// A CRD as the YAML document committed under `deploy/crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_norway::to_string(crd).expect("a CRD always serialises to YAML");
    format!(
        "# Generated from the Rust types in crates/api by `gkm crds --write`. Do not edit.\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_are_in_the_gkm_group_with_short_names() {
        let names: Vec<_> = crds()
            .into_iter()
            .map(|(_, c)| {
                assert_eq!(c.spec.group, GROUP);
                assert_eq!(c.spec.versions[0].name, VERSION);
                let short = c.spec.names.short_names.unwrap_or_default();
                (c.spec.names.kind, c.spec.scope, short)
            })
            .collect();
        assert_eq!(
            names,
            [
                (
                    "GKMCache".into(),
                    "Namespaced".into(),
                    vec!["gkmc".to_string()]
                ),
                (
                    "ClusterGKMCache".into(),
                    "Cluster".into(),
                    vec!["cgkmc".to_string()]
                ),
                (
                    "GKMCacheNode".into(),
                    "Namespaced".into(),
                    vec!["gkmcn".to_string()]
                ),
                (
                    "ClusterGKMCacheNode".into(),
                    "Cluster".into(),
                    vec!["cgkmcn".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn every_crd_has_a_status_subresource() {
        for (file, crd) in crds() {
            let sub = crd.spec.versions[0].subresources.as_ref();
            assert!(sub.and_then(|s| s.status.as_ref()).is_some(), "{file}");
        }
    }
}
