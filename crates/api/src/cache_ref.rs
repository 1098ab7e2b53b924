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

/// Whether `s` is an RFC 1123 label, the form of namespace names
/// (`k8s.io/apimachinery`'s `IsDNS1123Label`): 1 to 63 lower-case alphanumerics or `-`,
/// starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && label_shaped(s)
}

/// Whether `s` is an RFC 1123 subdomain, the form of most object names
/// (`k8s.io/apimachinery`'s `IsDNS1123Subdomain`): at most 253 characters, dot-separated
/// parts each shaped like a label.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(label_shaped)
}

fn label_shaped(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_rfc_1123_labels_and_subdomains() {
        for ok in ["team-a", "a", "0a", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        assert!(is_dns1123_subdomain("cache.v1"));
        assert!(is_dns1123_subdomain(&"a".repeat(253)));
        assert!(!is_dns1123_label("cache.v1"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        for bad in [
            "",
            "Team",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "a,b",
            "a b",
            "é",
            &"a".repeat(254),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
    }

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
