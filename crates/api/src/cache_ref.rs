//! [`CacheRef`]: which cache something names, the one model of it for the CSI plugin, the
//! agent, the store's volume records and the controller. Like kube-core's `ObjectRef`, it
//! is IO-free and names an object; unlike it, it knows GKM's two cache kinds, so the kind
//! is matched here, once.

/// A `GKMCache` (namespaced) or a `ClusterGKMCache`, by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CacheRef {
    Namespaced { namespace: String, name: String },
    Cluster { name: String },
}

impl CacheRef {
    /// The reference a kind, namespace and name spell (as volume records store them);
    /// `None` for a kind that is no GKM cache. A cluster cache's namespace is ignored.
    pub fn from_parts(kind: &str, namespace: &str, name: &str) -> Option<CacheRef> {
        match kind {
            "GKMCache" => Some(CacheRef::Namespaced {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
            "ClusterGKMCache" => Some(CacheRef::Cluster {
                name: name.to_string(),
            }),
            _ => None,
        }
    }

    /// `GKMCache` or `ClusterGKMCache`.
    pub fn kind(&self) -> &'static str {
        match self {
            CacheRef::Namespaced { .. } => "GKMCache",
            CacheRef::Cluster { .. } => "ClusterGKMCache",
        }
    }

    /// The namespace; empty for a cluster cache.
    pub fn namespace(&self) -> &str {
        match self {
            CacheRef::Namespaced { namespace, .. } => namespace,
            CacheRef::Cluster { .. } => "",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            CacheRef::Namespaced { name, .. } | CacheRef::Cluster { name } => name,
        }
    }
}

/// `namespace/name`, or `name` for a cluster cache.
impl std::fmt::Display for CacheRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheRef::Namespaced { namespace, name } => write!(f, "{namespace}/{name}"),
            CacheRef::Cluster { name } => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_unknown_kinds_are_none() {
        for r in [
            CacheRef::Namespaced {
                namespace: "ml".into(),
                name: "llama".into(),
            },
            CacheRef::Cluster {
                name: "shared".into(),
            },
        ] {
            assert_eq!(
                CacheRef::from_parts(r.kind(), r.namespace(), r.name()),
                Some(r.clone())
            );
        }
        assert_eq!(CacheRef::from_parts("Pod", "ml", "x"), None);
        assert_eq!(
            CacheRef::from_parts("ClusterGKMCache", "ignored", "x")
                .unwrap()
                .to_string(),
            "x"
        );
    }
}
