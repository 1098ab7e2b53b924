//! The labels of a kernel cache image's config, `cache.<kind>.image/<key>`:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `summary` | `{"targets":[{"backend":"cuda","arch":"90","warp_size":32}]}` | MCV and GKM |
//! | `entry-count` | kernel (or torch.compile) entries, decimal | MCV and GKM |
//! | `cache-size-bytes` | bytes of the cache's files, decimal | MCV and GKM |
//! | `triton-versions` | the `triton_version`s of its kernels, comma-separated | GKM |
//! | `python-abis` | the ABI tags of its launcher `.so` files, comma-separated | GKM |
//! | `capture-path` | the directory the cache was captured at | GKM |
//!
//! An image without a summary label carries no GPU claim (policy decides); the others are
//! informational: they explain misses (another Triton, another Python) and are shown by
//! `gkm inspect` and in node status.

use std::collections::BTreeMap;

use super::CacheKind;
use crate::gpu::compat::Summary;

pub const SUMMARY: &str = "summary";
pub const ENTRY_COUNT: &str = "entry-count";
pub const SIZE_BYTES: &str = "cache-size-bytes";
pub const TRITON_VERSIONS: &str = "triton-versions";
pub const PYTHON_ABIS: &str = "python-abis";
pub const CAPTURE_PATH: &str = "capture-path";

/// What an image's labels say about the cache it carries. Values that do not parse are
/// left out, except the summary, whose error [`CacheLabels::summary`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheLabels {
    pub kind: Option<CacheKind>,
    /// The raw summary label, if any.
    pub summary_raw: Option<String>,
    pub entry_count: Option<u64>,
    pub size_bytes: Option<u64>,
    pub triton_versions: Vec<String>,
    pub python_abis: Vec<String>,
    pub capture_path: Option<String>,
}

impl CacheLabels {
    /// Reads the labels of the first kind that has a summary label (or, failing that, any
    /// `cache.<kind>.image/` label).
    pub fn read(labels: &BTreeMap<String, String>) -> CacheLabels {
        let kind = CacheKind::ALL
            .into_iter()
            .find(|k| labels.contains_key(&k.label(SUMMARY)))
            .or_else(|| {
                CacheKind::ALL.into_iter().find(|k| {
                    let prefix = format!("cache.{}.image/", k.as_str());
                    labels.keys().any(|l| l.starts_with(&prefix))
                })
            });
        let Some(kind) = kind else {
            return CacheLabels::default();
        };
        let get = |key: &str| labels.get(&kind.label(key)).map(|v| v.trim().to_string());
        let list = |key: &str| -> Vec<String> {
            get(key)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        CacheLabels {
            kind: Some(kind),
            summary_raw: labels.get(&kind.label(SUMMARY)).cloned(),
            entry_count: get(ENTRY_COUNT).and_then(|v| v.parse().ok()),
            size_bytes: get(SIZE_BYTES).and_then(|v| v.parse().ok()),
            triton_versions: list(TRITON_VERSIONS),
            python_abis: list(PYTHON_ABIS),
            capture_path: get(CAPTURE_PATH).filter(|p| p.starts_with('/')),
        }
    }

    /// The parsed summary: `None` without one, `Err` when it does not parse.
    pub fn summary(&self) -> Option<Result<Summary, crate::gpu::SummaryError>> {
        self.summary_raw.as_deref().map(Summary::parse)
    }

    /// The labels to write for `kind` (the summary is written by the caller, which knows
    /// the targets).
    pub fn to_labels(&self, kind: CacheKind) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(s) = &self.summary_raw {
            out.insert(kind.label(SUMMARY), s.clone());
        }
        if let Some(n) = self.entry_count {
            out.insert(kind.label(ENTRY_COUNT), n.to_string());
        }
        if let Some(n) = self.size_bytes {
            out.insert(kind.label(SIZE_BYTES), n.to_string());
        }
        if !self.triton_versions.is_empty() {
            out.insert(kind.label(TRITON_VERSIONS), self.triton_versions.join(","));
        }
        if !self.python_abis.is_empty() {
            out.insert(kind.label(PYTHON_ABIS), self.python_abis.join(","));
        }
        if let Some(p) = &self.capture_path {
            out.insert(kind.label(CAPTURE_PATH), p.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_for_every_kind() {
        for kind in CacheKind::ALL {
            let l = CacheLabels {
                kind: Some(kind),
                summary_raw: Some(r#"{"targets":[]}"#.into()),
                entry_count: Some(6),
                size_bytes: Some(1234),
                triton_versions: vec!["3.5.1".into(), "3.6.0".into()],
                python_abis: vec!["cpython-312-x86_64-linux-gnu".into()],
                capture_path: Some("/tmp/tc".into()),
            };
            assert_eq!(CacheLabels::read(&l.to_labels(kind)), l);
        }
    }

    #[test]
    fn mcv_labels_without_gkm_extras_read_as_far_as_they_go() {
        let labels: BTreeMap<String, String> = [
            ("cache.vllm.image/summary".to_string(), "{}".to_string()),
            ("cache.vllm.image/entry-count".to_string(), "x".to_string()),
            (
                "cache.vllm.image/capture-path".to_string(),
                "relative".to_string(),
            ),
        ]
        .into();
        let l = CacheLabels::read(&labels);
        assert_eq!(l.kind, Some(CacheKind::Vllm));
        assert_eq!(l.entry_count, None, "not a number");
        assert_eq!(l.capture_path, None, "not absolute");
        assert!(CacheLabels::read(&BTreeMap::new()).kind.is_none());
    }
}
