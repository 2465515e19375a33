//! Prometheus metrics: reconciles, failures and durations per kind.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: String,
    pub reason: String,
}

/// The agent's metrics, registered in one registry served at `/metrics`.
pub struct Metrics {
    pub registry: Registry,
    reconciles: Family<KindLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    durations: Family<KindLabel, Histogram>,
    /// Live App log follows being relayed to the hub.
    pub app_log_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shapeblock");
        let reconciles = Family::<KindLabel, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let durations = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register("reconciles", "Reconciles started, per kind", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, per kind and reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration, per kind",
            durations.clone(),
        );
        let app_log_streams = Gauge::default();
        registry.register(
            "app_log_streams",
            "Live App log follows being relayed to the hub",
            app_log_streams.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            durations,
            app_log_streams,
        }
    }
}

impl Metrics {
    /// Counts a reconcile; the returned guard records its duration when dropped.
    pub fn reconcile(&self, kind: &str) -> ReconcileTimer<'_> {
        let label = KindLabel { kind: kind.into() };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            metrics: self,
            label,
            start: Instant::now(),
        }
    }

    pub fn failure(&self, kind: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    label: KindLabel,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&self.label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}
