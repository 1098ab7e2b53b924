//! What one node object reports, as a pure function of the caches in its scope, what this
//! node knows about each digest, and the volumes it has published. No I/O here: the
//! reconciler gathers the inputs and writes the result.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{CacheDigestStatus, CacheState, PodRef};
use crate::gpu::Fitness;
use crate::kernel_cache::CacheLabels;
use crate::store::{Usage, VolumeRecord};

/// The node object a change lands in: the node's `ClusterGKMCacheNode`, or its
/// `GKMCacheNode` in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Cluster,
    Namespace(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Cluster => f.write_str("ClusterGKMCacheNode"),
            Scope::Namespace(ns) => write!(f, "GKMCacheNode in {ns}"),
        }
    }
}

impl Scope {
    pub fn of(key: &crate::api::CacheRef) -> Scope {
        match key {
            crate::api::CacheRef::Namespaced { namespace, .. } => {
                Scope::Namespace(namespace.clone())
            }
            crate::api::CacheRef::Cluster { .. } => Scope::Cluster,
        }
    }
}

/// What this node knows about one digest.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Nothing done yet.
    Pending,
    /// Reading its manifest and config, or extracting it.
    Pulling,
    /// Manifest and config read (GPU verdict known), not extracted: on-demand pulls wait
    /// for the first publish.
    Inspected(Fitness),
    /// In the node's store.
    Extracted { size_bytes: u64, fit: Fitness },
    /// The last attempt failed; retried with backoff.
    Failed(String),
}

/// A cache of the scope, as the node sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheView {
    pub name: String,
    /// The trusted digest, if the cache has one.
    pub digest: Option<String>,
}

/// What pods did with each digest of each cache on this node (cache name, digest) →
/// usage, the live volumes' compiled entries included; and what each digest's labels say.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub usage: HashMap<(String, String), Usage>,
    pub labels: HashMap<String, CacheLabels>,
    /// Digest -> (bytes received, total bytes) of the pulls under way.
    pub pulls: HashMap<String, (u64, u64)>,
}

/// The `caches` map of a node object's status. `previous` is what was last written:
/// an entry that has not changed keeps its `lastUpdated`.
pub fn desired_caches(
    caches: &[CacheView],
    phases: &HashMap<String, Phase>,
    volumes: &[&VolumeRecord],
    facts: &Facts,
    previous: &BTreeMap<String, BTreeMap<String, CacheDigestStatus>>,
    now: &Time,
) -> BTreeMap<String, BTreeMap<String, CacheDigestStatus>> {
    let mut out = BTreeMap::new();
    for cache in caches {
        let Some(current) = &cache.digest else {
            continue;
        };
        // Digest -> pods, for this cache's volumes.
        let mut pods: BTreeMap<&str, Vec<PodRef>> = BTreeMap::new();
        for v in volumes.iter().filter(|v| v.cache_name == cache.name) {
            pods.entry(v.digest.as_str()).or_default().push(PodRef {
                namespace: v.pod_namespace.clone(),
                name: v.pod_name.clone(),
                uid: v.pod_uid.clone(),
            });
        }
        let mut entries = BTreeMap::new();
        let phase = phases.get(current).cloned().unwrap_or(Phase::Pending);
        let in_use = pods.remove(current.as_str()).unwrap_or_default();
        entries.insert(current.clone(), entry(&phase, in_use, false));
        for (digest, pods) in pods {
            let phase = phases.get(digest).cloned().unwrap_or(Phase::Pending);
            entries.insert(digest.to_string(), entry(&phase, pods, true));
        }
        for (digest, e) in entries.iter_mut() {
            if let Some(u) = facts.usage.get(&(cache.name.clone(), digest.clone())) {
                e.pods_served = Some(u.pods_served as i64);
                e.kernels_compiled = Some(u.kernels_compiled as i64);
                e.last_miss = u.last_miss.clone();
            }
            // A pull the loop did not start (a publish, under on-demand) shows too.
            if matches!(e.state, CacheState::Pulling | CacheState::Pending)
                && let Some((done, total)) = facts.pulls.get(digest)
            {
                e.state = CacheState::Pulling;
                if *total > 0 {
                    e.pulled_bytes = Some(*done as i64);
                    e.pull_total_bytes = Some(*total as i64);
                }
            }
            if let Some(l) = facts.labels.get(digest) {
                e.triton_versions = l.triton_versions.clone();
                e.python_abis = l.python_abis.clone();
                e.capture_path = l.capture_path.clone();
            }
            let before = previous.get(&cache.name).and_then(|m| m.get(digest));
            e.last_updated = match before {
                Some(b) if same_but_time(b, e) => b.last_updated.clone(),
                _ => Some(now.clone()),
            };
        }
        out.insert(cache.name.clone(), entries);
    }
    out
}

/// `pod_refs`: one per pod (two pods of one name, one after the other, are two).
fn entry(phase: &Phase, mut pod_refs: Vec<PodRef>, outdated: bool) -> CacheDigestStatus {
    pod_refs.sort();
    pod_refs.dedup();
    let pods: Vec<String> = pod_refs.iter().map(ToString::to_string).collect();
    let in_use = !pods.is_empty();
    let (state, fit, size, error) = match phase {
        Phase::Pending => (CacheState::Pending, None, None, None),
        Phase::Pulling => (CacheState::Pulling, None, None, None),
        Phase::Inspected(fit) => (
            if fit.usable {
                CacheState::Pending
            } else {
                CacheState::Incompatible
            },
            Some(fit),
            None,
            None,
        ),
        Phase::Extracted { size_bytes, fit } => (
            if fit.usable {
                CacheState::Extracted
            } else {
                CacheState::Incompatible
            },
            Some(fit),
            Some(*size_bytes as i64),
            None,
        ),
        Phase::Failed(reason) => (CacheState::Error, None, None, Some(reason.clone())),
    };
    // A mounted digest is in use whatever else is known; a superseded one is Outdated.
    let state = match (outdated, in_use) {
        (true, _) => CacheState::Outdated,
        (false, true) => CacheState::InUse,
        (false, false) => state,
    };
    CacheDigestStatus {
        state,
        compatible_gpus: fit.map(|f| f.compatible.clone()).unwrap_or_default(),
        incompatible_gpus: fit.map(|f| f.incompatible.clone()).unwrap_or_default(),
        reasons: match error {
            Some(e) => vec![e],
            None => fit.map(|f| f.reasons.clone()).unwrap_or_default(),
        },
        size_bytes: size,
        pods,
        pod_refs,
        ..Default::default()
    }
}

fn same_but_time(a: &CacheDigestStatus, b: &CacheDigestStatus) -> bool {
    let strip = |s: &CacheDigestStatus| CacheDigestStatus {
        last_updated: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn now(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    fn fit(usable: bool) -> Fitness {
        Fitness {
            usable,
            claimed: true,
            compatible: if usable { vec!["GPU-a".into()] } else { vec![] },
            incompatible: vec!["GPU-b".into()],
            reasons: vec!["GPU-b: arch 80 is not among the targets [90]".into()],
        }
    }

    fn vol(cache: &str, digest: &str, pod: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: format!("v-{pod}"),
            target_path: format!("/t/{pod}").into(),
            digest: digest.into(),
            cache_kind: "GKMCache".into(),
            cache_namespace: "ns".into(),
            cache_name: cache.into(),
            pod_namespace: "ns".into(),
            pod_name: pod.into(),
            pod_uid: "u".into(),
            mount: Default::default(),
        }
    }

    fn cache(name: &str, digest: Option<&str>) -> Vec<CacheView> {
        vec![CacheView {
            name: name.into(),
            digest: digest.map(str::to_string),
        }]
    }

    fn one(out: &BTreeMap<String, BTreeMap<String, CacheDigestStatus>>, d: &str) -> CacheState {
        out["c"][d].state
    }

    #[test]
    fn states_follow_what_the_node_knows() {
        let empty = BTreeMap::new();
        let cases = [
            (None, CacheState::Pending),
            (Some(Phase::Pulling), CacheState::Pulling),
            (Some(Phase::Inspected(fit(true))), CacheState::Pending),
            (Some(Phase::Inspected(fit(false))), CacheState::Incompatible),
            (
                Some(Phase::Extracted {
                    size_bytes: 5,
                    fit: fit(true),
                }),
                CacheState::Extracted,
            ),
            (
                Some(Phase::Extracted {
                    size_bytes: 5,
                    fit: fit(false),
                }),
                CacheState::Incompatible,
            ),
            (Some(Phase::Failed("boom".into())), CacheState::Error),
        ];
        for (phase, want) in cases {
            let phases: HashMap<_, _> = phase
                .clone()
                .map(|p| (D1.to_string(), p))
                .into_iter()
                .collect();
            let out = desired_caches(
                &cache("c", Some(D1)),
                &phases,
                &[],
                &Facts::default(),
                &empty,
                &now(1),
            );
            assert_eq!(one(&out, D1), want, "{phase:?}");
        }
    }

    #[test]
    fn incompatible_entries_carry_gpu_ids_and_reasons() {
        let phases = HashMap::from([(D1.to_string(), Phase::Inspected(fit(false)))]);
        let out = desired_caches(
            &cache("c", Some(D1)),
            &phases,
            &[],
            &Facts::default(),
            &BTreeMap::new(),
            &now(1),
        );
        let e = &out["c"][D1];
        assert_eq!(e.incompatible_gpus, vec!["GPU-b"]);
        assert!(e.reasons[0].contains("arch 80"), "{:?}", e.reasons);
    }

    #[test]
    fn a_mounted_digest_is_in_use_and_a_superseded_one_outdated() {
        let phases = HashMap::from([
            (
                D1.to_string(),
                Phase::Extracted {
                    size_bytes: 1,
                    fit: fit(true),
                },
            ),
            (
                D2.to_string(),
                Phase::Extracted {
                    size_bytes: 2,
                    fit: fit(true),
                },
            ),
        ]);
        let (a, b) = (vol("c", D1, "old"), vol("c", D2, "new"));
        let out = desired_caches(
            &cache("c", Some(D2)),
            &phases,
            &[&a, &b],
            &Facts::default(),
            &BTreeMap::new(),
            &now(1),
        );
        assert_eq!(one(&out, D2), CacheState::InUse);
        assert_eq!(out["c"][D2].pods, vec!["ns/new"]);
        assert_eq!(one(&out, D1), CacheState::Outdated);
        assert_eq!(out["c"][D1].pods, vec!["ns/old"]);

        // Two pods of one name (a StatefulSet's pod replaced while the old one ends) are
        // two entries, told apart by uid.
        let (mut x, mut y) = (vol("c", D2, "same"), vol("c", D2, "same"));
        x.pod_uid = "uid-1".into();
        y.pod_uid = "uid-2".into();
        y.volume_id = "v-same-2".into();
        let out = desired_caches(
            &cache("c", Some(D2)),
            &phases,
            &[&x, &y],
            &Facts::default(),
            &BTreeMap::new(),
            &now(1),
        );
        let e = &out["c"][D2];
        assert_eq!(e.pods, ["ns/same", "ns/same"]);
        assert_eq!(
            e.pod_refs
                .iter()
                .map(|p| p.uid.as_str())
                .collect::<Vec<_>>(),
            ["uid-1", "uid-2"]
        );
        // After the old pod's unpublish, the old digest's entry is gone.
        let out = desired_caches(
            &cache("c", Some(D2)),
            &phases,
            &[&b],
            &Facts::default(),
            &BTreeMap::new(),
            &now(1),
        );
        assert_eq!(out["c"].len(), 1);
    }

    #[test]
    fn caches_without_a_trusted_digest_and_deleted_caches_have_no_entries() {
        let v = vol("gone", D1, "p");
        let out = desired_caches(
            &cache("c", None),
            &HashMap::new(),
            &[&v],
            &Facts::default(),
            &BTreeMap::new(),
            &now(1),
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn usage_and_label_facts_show_beside_the_state() {
        let phases = HashMap::from([(D1.to_string(), Phase::Pulling)]);
        let mut facts = Facts::default();
        facts.usage.insert(
            ("c".into(), D1.into()),
            Usage {
                pods_served: 4,
                kernels_compiled: 3,
                pods_with_misses: 1,
                last_miss: Some("pod ns/p compiled 3 kernel(s)".into()),
            },
        );
        facts.labels.insert(
            D1.into(),
            CacheLabels {
                triton_versions: vec!["3.6.0".into()],
                capture_path: Some("/tmp/tc".into()),
                ..Default::default()
            },
        );
        let out = desired_caches(
            &cache("c", Some(D1)),
            &phases,
            &[],
            &facts,
            &BTreeMap::new(),
            &now(1),
        );
        let e = &out["c"][D1];
        assert_eq!((e.pods_served, e.kernels_compiled), (Some(4), Some(3)));
        assert!(e.last_miss.as_deref().unwrap().contains("ns/p"));
        assert_eq!(e.triton_versions, ["3.6.0"]);
        assert_eq!(e.capture_path.as_deref(), Some("/tmp/tc"));
    }

    #[test]
    fn a_pull_under_way_shows_its_bytes_and_only_while_pulling() {
        let mut facts = Facts::default();
        facts.pulls.insert(D1.into(), (3 << 20, 8 << 20));
        let at = |phase: Phase| {
            let out = desired_caches(
                &cache("c", Some(D1)),
                &HashMap::from([(D1.to_string(), phase)]),
                &[],
                &facts,
                &BTreeMap::new(),
                &now(1),
            );
            let e = &out["c"][D1];
            (e.state, e.pulled_bytes, e.pull_total_bytes)
        };
        assert_eq!(
            at(Phase::Pulling),
            (CacheState::Pulling, Some(3 << 20), Some(8 << 20))
        );
        assert_eq!(
            at(Phase::Failed("gone".into())),
            (CacheState::Error, None, None)
        );
    }

    #[test]
    fn unchanged_entries_keep_their_time_and_changed_ones_get_a_new_one() {
        let phases = HashMap::from([(D1.to_string(), Phase::Pulling)]);
        let first = desired_caches(
            &cache("c", Some(D1)),
            &phases,
            &[],
            &Facts::default(),
            &BTreeMap::new(),
            &now(1),
        );
        let again = desired_caches(
            &cache("c", Some(D1)),
            &phases,
            &[],
            &Facts::default(),
            &first,
            &now(2),
        );
        assert_eq!(again, first);
        let phases = HashMap::from([(
            D1.to_string(),
            Phase::Extracted {
                size_bytes: 1,
                fit: fit(true),
            },
        )]);
        let changed = desired_caches(
            &cache("c", Some(D1)),
            &phases,
            &[],
            &Facts::default(),
            &first,
            &now(3),
        );
        assert_eq!(changed["c"][D1].last_updated, Some(now(3)));
    }
}
