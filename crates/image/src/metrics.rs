//! The node agent's Prometheus metrics, one registry per process.
//!
//! A process-wide registry (rather than one threaded through every call) because the
//! measurements come from deep inside shared code: the store's extraction, the CSI calls,
//! the reconciler. Error labels are short stable names, never messages, so their
//! cardinality stays bounded.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `publish` or `unpublish`.
    pub op: String,
    /// `OK` or the gRPC code name.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or a short error name.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    /// `<kind>/<namespace>/<name>` of a cache (the namespace is empty for a cluster cache).
    pub cache: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub csi_calls: Family<OpLabels, Counter>,
    pub csi_seconds: Family<OpLabels, Histogram>,
    pub pulls: Family<ResultLabels, Counter>,
    pub extracted_bytes: Counter,
    pub extraction_seconds: Histogram,
    pub gc_removed: Counter,
    pub reconciles: Family<ResultLabels, Counter>,
    pub node_status_writes: Counter,
    pub volumes: Gauge,
    pub pods_served: Family<CacheLabel, Counter>,
    pub kernels_compiled: Family<CacheLabel, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("gkm");
        let m = Metrics {
            csi_calls: Family::default(),
            csi_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 18))
            }),
            pulls: Family::default(),
            extracted_bytes: Counter::default(),
            extraction_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            gc_removed: Counter::default(),
            reconciles: Family::default(),
            node_status_writes: Counter::default(),
            volumes: Gauge::default(),
            pods_served: Family::default(),
            kernels_compiled: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "csi_calls",
            "CSI node calls by operation and gRPC code",
            m.csi_calls.clone(),
        );
        registry.register(
            "csi_call_seconds",
            "CSI node call latency (publish includes any extraction it waited for)",
            m.csi_seconds.clone(),
        );
        registry.register(
            "pulls",
            "Image pulls and extractions by result",
            m.pulls.clone(),
        );
        registry.register(
            "extracted_bytes",
            "Bytes written into the store by extractions",
            m.extracted_bytes.clone(),
        );
        registry.register(
            "extraction_seconds",
            "Time to pull and extract one image",
            m.extraction_seconds.clone(),
        );
        registry.register(
            "gc_removed_digests",
            "Extracted digests removed by garbage collection",
            m.gc_removed.clone(),
        );
        registry.register(
            "reconciles",
            "Node-object reconciliations by result",
            m.reconciles.clone(),
        );
        registry.register(
            "node_status_writes",
            "Server-side applies of node object status",
            m.node_status_writes.clone(),
        );
        registry.register(
            "volumes",
            "Volumes published on this node",
            m.volumes.clone(),
        );
        registry.register(
            "cache_pods_served",
            "Volumes published per cache (pods served)",
            m.pods_served.clone(),
        );
        registry.register(
            "cache_kernels_compiled",
            "Cache entries pods compiled themselves because their cache missed, per cache",
            m.kernels_compiled.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    pub fn csi_call(&self, op: &str, code: &str, seconds: f64) {
        let labels = OpLabels {
            op: op.into(),
            code: code.into(),
        };
        self.csi_calls.get_or_create(&labels).inc();
        self.csi_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Counts `n` on `family` for the cache `cache`.
    pub fn per_cache(family: &Family<CacheLabel, Counter>, cache: &str, n: u64) {
        family
            .get_or_create(&CacheLabel {
                cache: cache.into(),
            })
            .inc_by(n);
    }

    pub fn result(family: &Family<ResultLabels, Counter>, result: &str) {
        family
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }
}

/// The OpenMetrics text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_the_gkm_prefix() {
        let m = Metrics::new();
        m.csi_call("publish", "OK", 0.002);
        Metrics::result(&m.pulls, "ok");
        Metrics::per_cache(&m.kernels_compiled, "GKMCache/ns/c", 3);
        let text = m.encode();
        for name in [
            "gkm_csi_calls_total{op=\"publish\",code=\"OK\"} 1",
            "gkm_csi_call_seconds_bucket",
            "gkm_pulls_total{result=\"ok\"} 1",
            "gkm_extracted_bytes_total",
            "gkm_gc_removed_digests_total",
            "gkm_volumes",
            "gkm_cache_kernels_compiled_total{cache=\"GKMCache/ns/c\"} 3",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
