//! The CSI volume contract: how a pod names a cache in an inline `csi.gkm.io` volume, and
//! what of a cache object the node needs to serve it. The CSI plugin (gkm-node) and the Pod
//! admission webhook (gkm-controller) both read volumes through this one module.

use std::collections::{BTreeMap, HashMap};

use crate::{Cache, CacheRef, ClusterGKMCache, GKMCache, RESOLVED_DIGEST_ANNOTATION, sha256_hex};

/// The CSI driver name (`spec.volumes[].csi.driver`, the CSIDriver object's name).
pub const DRIVER_NAME: &str = "csi.gkm.io";

/// Volume attributes (`volumeAttributes` of the pod's inline CSI volume).
pub const ATTR_CACHE: &str = "csi.gkm.io/GKMCache";
pub const ATTR_NAMESPACE: &str = "csi.gkm.io/namespace";
pub const ATTR_CLUSTER_CACHE: &str = "csi.gkm.io/ClusterGKMCache";
/// `"false"` asks for a strictly read-only volume (no private writable layer: a kernel the
/// cache lacks then fails to compile with EROFS). The default is `"true"`. The volume's
/// `readOnly: true` (CSI's `readonly`) asks for the same.
pub const ATTR_WRITABLE: &str = "csi.gkm.io/writable";

/// Volume attributes that name no cache, or name it ambiguously; the message says which
/// attribute and why. The CSI plugin answers it as `InvalidArgument`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("volume attributes: {0}")]
pub struct VolumeAttributesError(pub String);

/// Which cache the volume attributes (`volumeAttributes`) name: `csi.gkm.io/GKMCache` with
/// `csi.gkm.io/namespace` a GKMCache, without it (or `csi.gkm.io/ClusterGKMCache`) a
/// ClusterGKMCache. The one reading of these attributes, for the plugin and admission.
pub fn cache_ref_of_attributes(
    attrs: &HashMap<String, String>,
) -> Result<CacheRef, VolumeAttributesError> {
    let bad = |m: String| Err(VolumeAttributesError(m));
    let ns = attrs.get(ATTR_NAMESPACE).filter(|s| !s.is_empty());
    match (
        attrs.get(ATTR_CACHE).filter(|s| !s.is_empty()),
        attrs.get(ATTR_CLUSTER_CACHE).filter(|s| !s.is_empty()),
    ) {
        (Some(_), Some(_)) => bad(format!(
            "set either {ATTR_CACHE} or {ATTR_CLUSTER_CACHE}, not both"
        )),
        (None, None) => bad(format!("{ATTR_CACHE} or {ATTR_CLUSTER_CACHE} is required")),
        (Some(name), None) => Ok(match ns {
            Some(ns) => CacheRef::Namespaced {
                namespace: ns.clone(),
                name: name.clone(),
            },
            // Without a namespace, GKMCache names the cluster-wide cache (earlier GKM's rule).
            None => CacheRef::Cluster { name: name.clone() },
        }),
        (None, Some(name)) => {
            if ns.is_some() {
                return bad(format!(
                    "{ATTR_NAMESPACE} does not apply to {ATTR_CLUSTER_CACHE}"
                ));
            }
            Ok(CacheRef::Cluster { name: name.clone() })
        }
    }
}

/// What the node needs of a cache object to serve a volume that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedCache {
    pub key: CacheRef,
    /// `spec.image`: the repository the digest is pulled from.
    pub image: String,
    /// The verified digest (annotation written by the webhook, else the promoted status).
    pub digest: Option<String>,
    /// ClusterGKMCache only: namespaces whose pods may mount it; empty means all.
    pub workload_namespaces: Vec<String>,
    /// `spec.imagePullSecrets` by name: non-empty means the node asks the controller for
    /// the credentials to pull `image` (it never reads the Secrets itself).
    pub image_pull_secrets: Vec<String>,
}

impl ResolvedCache {
    pub fn from_namespaced(c: &GKMCache) -> Option<Self> {
        Self::from_cache(c, Vec::new())
    }

    pub fn from_cluster(c: &ClusterGKMCache) -> Option<Self> {
        Self::from_cache(c, c.spec.workload_namespaces.clone())
    }

    fn from_cache<C: Cache + kube::Resource>(
        c: &C,
        workload_namespaces: Vec<String>,
    ) -> Option<Self> {
        Some(Self {
            key: c.cache_ref()?,
            image: c.image().to_string(),
            digest: trusted_digest(
                &c.meta().annotations,
                c.status().and_then(|s| s.resolved_digest.as_ref()),
            ),
            workload_namespaces,
            image_pull_secrets: c
                .image_pull_secrets()
                .iter()
                .map(|s| s.name.clone())
                .collect(),
        })
    }

    /// Whether pods of `namespace` may mount this cache.
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        match &self.key {
            CacheRef::Namespaced { namespace: ns, .. } => ns == namespace,
            CacheRef::Cluster { .. } => {
                self.workload_namespaces.is_empty()
                    || self.workload_namespaces.iter().any(|n| n == namespace)
            }
        }
    }
}

/// The annotation is the newest verified digest (the webhook writes it on every image
/// change); the status is the controller's promoted copy, used when the annotation is gone.
fn trusted_digest(
    annotations: &Option<BTreeMap<String, String>>,
    status: Option<&String>,
) -> Option<String> {
    annotations
        .as_ref()
        .and_then(|a| a.get(RESOLVED_DIGEST_ANNOTATION))
        .or(status)
        .filter(|d| sha256_hex(d).is_some())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn attributes_name_one_cache_or_say_why_not() {
        assert_eq!(
            cache_ref_of_attributes(&attrs(&[(ATTR_CACHE, "c"), (ATTR_NAMESPACE, "ns")])),
            Ok(CacheRef::Namespaced {
                namespace: "ns".into(),
                name: "c".into()
            })
        );
        assert_eq!(
            cache_ref_of_attributes(&attrs(&[(ATTR_CLUSTER_CACHE, "c")])),
            Ok(CacheRef::Cluster { name: "c".into() })
        );
        let both = cache_ref_of_attributes(&attrs(&[(ATTR_CACHE, "a"), (ATTR_CLUSTER_CACHE, "b")]))
            .unwrap_err()
            .to_string();
        assert!(both.contains("not both"), "{both}");
        let none = cache_ref_of_attributes(&attrs(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            none.starts_with("volume attributes: ") && none.contains("required"),
            "{none}"
        );
        let ns =
            cache_ref_of_attributes(&attrs(&[(ATTR_CLUSTER_CACHE, "c"), (ATTR_NAMESPACE, "n")]))
                .unwrap_err()
                .to_string();
        assert!(ns.contains("does not apply"), "{ns}");
    }

    #[test]
    fn the_annotation_wins_and_a_malformed_digest_is_none() {
        let good = format!("sha256:{}", "a".repeat(64));
        let other = format!("sha256:{}", "b".repeat(64));
        let ann = Some(BTreeMap::from([(
            RESOLVED_DIGEST_ANNOTATION.to_string(),
            good.clone(),
        )]));
        assert_eq!(trusted_digest(&ann, Some(&other)), Some(good));
        assert_eq!(trusted_digest(&None, Some(&other)), Some(other));
        let bad = Some(BTreeMap::from([(
            RESOLVED_DIGEST_ANNOTATION.to_string(),
            "sha256:short".to_string(),
        )]));
        assert_eq!(trusted_digest(&bad, None), None);
    }
}
