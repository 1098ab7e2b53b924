//! gkm-controller's Prometheus metrics, one registry per process (served on
//! `--metrics-addr` with `/healthz` and `/readyz`). Labels are short stable names (the
//! `label()` of each error type), never messages, so their cardinality stays bounded.

use std::sync::LazyLock;

use gkm_image::metrics::ResultLabels;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `mutate`, `validate` or `validate-pods`.
    pub endpoint: String,
    /// `allowed`, `mutated` or `denied`.
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub admission_seconds: Family<EndpointLabels, Histogram>,
    pub verifications: Family<ResultLabels, Counter>,
    pub promotions: Family<ResultLabels, Counter>,
    pub pull_credentials: Family<ResultLabels, Counter>,
    pub reconciles: Family<ResultLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("gkm_controller");
        let m = Metrics {
            admissions: Family::default(),
            admission_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            verifications: Family::default(),
            promotions: Family::default(),
            pull_credentials: Family::default(),
            reconciles: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "admissions",
            "Admission requests by endpoint and decision",
            m.admissions.clone(),
        );
        registry.register(
            "admission_seconds",
            "Time to decide an admission request",
            m.admission_seconds.clone(),
        );
        registry.register(
            "verifications",
            "Image verifications for admission by result (verified, or why not)",
            m.verifications.clone(),
        );
        registry.register(
            "promotions",
            "Calls of verify-and-promote by result (promoted, or why not)",
            m.promotions.clone(),
        );
        registry.register(
            "pull_credentials",
            "Requests of nodes for a cache's pull credentials by result (served, or why not)",
            m.pull_credentials.clone(),
        );
        registry.register(
            "reconciles",
            "Status reconciles of caches by result",
            m.reconciles.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        gkm_image::metrics::encode(&self.registry)
    }

    pub fn admission(&self, endpoint: &str, decision: &str, seconds: f64) {
        self.admissions
            .get_or_create(&AdmissionLabels {
                endpoint: endpoint.into(),
                decision: decision.into(),
            })
            .inc();
        self.admission_seconds
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.into(),
            })
            .observe(seconds);
    }
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
    fn names_carry_the_controller_prefix() {
        let m = Metrics::new();
        m.admission("validate-pods", "denied", 0.01);
        gkm_image::metrics::Metrics::result(&m.verifications, "no_signatures");
        let text = m.encode();
        for line in [
            r#"gkm_controller_admissions_total{endpoint="validate-pods",decision="denied"} 1"#,
            r#"gkm_controller_verifications_total{result="no_signatures"} 1"#,
            "gkm_controller_admission_seconds_count{endpoint=\"validate-pods\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
