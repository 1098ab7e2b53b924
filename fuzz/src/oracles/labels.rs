//! The cache summary label (`gkm::gpu::compat::Summary::parse`) and an image's cache
//! labels (`gkm::kernel_cache::CacheLabels::read`). Input: UTF-8, read both as one summary
//! label's value and as a set of labels (a JSON object of strings, or `key=value` lines).
//!
//! Checks:
//! - `Summary::parse` never panics, keeps its error short, and a parsed summary serialises
//!   to JSON that parses back to the same summary, with no blank arch;
//! - checking GPUs against a summary judges every GPU once, with one reason per misfit,
//!   and no claim exactly when there are no targets;
//! - `CacheLabels::read` takes a kind only from a `cache.<kind>.image/` label, and reading
//!   what `to_labels` writes gives back the same labels.

use std::collections::BTreeMap;

use gkm::api::{GpuBackend, GpuInfo};
use gkm::gpu::compat::{Summary, Verdict, normalize_arch};
use gkm::kernel_cache::{CacheKind, CacheLabels};

/// A summary error quotes at most 200 characters of the label and of serde's message (the
/// label's escaped, up to 10 bytes a character).
const MAX_ERROR_MESSAGE: usize = 4096;

pub fn check(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check_summary(s);
    if let Some(labels) = labels_of(s) {
        check_labels(&labels);
    }
}

/// A few GPUs of both backends, as inventories report them.
fn gpus() -> Vec<GpuInfo> {
    let gpu = |i: u32, backend, arch: &str, warp_size| GpuInfo {
        index: i,
        uuid: format!("GPU-{i}"),
        vendor: "fuzz".into(),
        product_name: format!("GPU {arch}"),
        backend,
        arch: arch.into(),
        warp_size,
        driver_version: None,
        source: Default::default(),
    };
    vec![
        gpu(0, GpuBackend::Cuda, "90", 32),
        gpu(1, GpuBackend::Cuda, "sm_80", 32),
        gpu(2, GpuBackend::Hip, "gfx942", 64),
        gpu(3, GpuBackend::Hip, "gfx90a:xnack-", 64),
    ]
}

pub fn check_summary(label: &str) {
    let summary = match Summary::parse(label) {
        Ok(s) => s,
        Err(e) => {
            let m = e.to_string();
            assert!(m.len() <= MAX_ERROR_MESSAGE, "a {}-byte error", m.len());
            return;
        }
    };
    for t in &summary.targets {
        assert!(!t.arch.trim().is_empty(), "blank arch in {summary:?}");
        let _ = t.to_string();
    }
    let json = serde_json::to_string(&summary).expect("a summary serialises");
    let again = Summary::parse(&json)
        .unwrap_or_else(|e| panic!("{label:?} parsed, but its JSON {json:?} does not: {e}"));
    assert_eq!(again, summary, "{label:?} → {json:?}");
    let gpus = gpus();
    match summary.check(&gpus) {
        Verdict::NoGpuClaim => assert!(summary.targets.is_empty()),
        Verdict::Checked(c) => {
            assert!(!summary.targets.is_empty());
            assert_eq!(c.compatible.len() + c.incompatible.len(), gpus.len());
            assert_eq!(c.reasons.len(), c.incompatible.len());
            for g in &gpus {
                let fits = summary.targets.iter().any(|t| {
                    t.backend == g.backend
                        && t.warp_size == g.warp_size
                        && normalize_arch(&t.arch) == normalize_arch(&g.arch)
                });
                assert_eq!(c.compatible.contains(&g.uuid), fits, "{g:?} in {summary:?}");
            }
        }
    }
}

/// `s` as labels: a JSON object of strings, or `key=value` lines.
fn labels_of(s: &str) -> Option<BTreeMap<String, String>> {
    if let Ok(map) = serde_json::from_str::<BTreeMap<String, String>>(s) {
        return Some(map);
    }
    let map: BTreeMap<String, String> = s
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (!map.is_empty()).then_some(map)
}

fn check_labels(labels: &BTreeMap<String, String>) {
    let read = CacheLabels::read(labels);
    let Some(kind) = read.kind else {
        assert_eq!(read, CacheLabels::default());
        for k in CacheKind::ALL {
            let prefix = format!("cache.{}.image/", k.as_str());
            assert!(
                !labels.keys().any(|l| l.starts_with(&prefix)),
                "no kind read from {labels:?}"
            );
        }
        return;
    };
    assert!(
        labels
            .keys()
            .any(|l| l.starts_with(&format!("cache.{}.image/", kind.as_str()))),
        "kind {kind} read from {labels:?}"
    );
    if let Some(p) = &read.capture_path {
        assert!(p.starts_with('/'), "{p:?}");
    }
    if let Some(Ok(s)) = read.summary() {
        let _ = s.check(&gpus());
    }
    let written = read.to_labels(kind);
    let again = CacheLabels::read(&written);
    if written.is_empty() {
        assert_eq!(again, CacheLabels::default());
    } else {
        assert_eq!(again, read, "{labels:?} → {written:?}");
    }
}
