//! Prometheus metrics: one process-wide recorder (server and client share it when they run
//! in one process, as under `jobrelay up`; their metric names differ by prefix).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of latency histograms, in seconds: from a millisecond to an hour.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0, 3600.0,
];

/// Installs the recorder (once) and returns the handle that renders it. Call it at start,
/// before anything is recorded.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("latency buckets are not empty");
        match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed already (an embedding program's): keep a local one.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// The metrics in Prometheus text format.
pub fn render() -> String {
    install().render()
}

/// Content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
