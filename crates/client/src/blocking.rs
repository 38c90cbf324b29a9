//! The blocking work the client's HTTP API starts, bounded ([`jobrelay_common::blocking`],
//! the rule the server's handlers follow too), counted in the client's metrics. `/health` and
//! `/info` ask [`pool_responsive`] whether the blocking pool still starts a task promptly: a
//! client whose pool is used up (every thread parked) reports itself unhealthy instead of
//! healthy.

use std::time::Duration;

pub use jobrelay_common::blocking::{pool_responsive, Failed, POOL_PROBE};

/// Runs `work` on the blocking pool and waits at most `limit` for its result; a timeout
/// counts in `jobrelay_client_blocking_timeouts_total`.
pub async fn run<T: Send + 'static>(
    what: &'static str,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failed> {
    jobrelay_common::blocking::run(what, limit, work)
        .await
        .inspect_err(|e| {
            if matches!(e, Failed::TimedOut(..)) {
                metrics::counter!("jobrelay_client_blocking_timeouts_total").increment(1);
            }
        })
}
