//! A probe per client: asks it what it is (`/info`, else `/health`) and its load every few
//! seconds while it answers, with backoff while it does not, and keeps the scheduler's view
//! of it (healthy, slots, load) up to date. A client that answers again gets the runs given
//! away while it was unreachable killed ([`crate::stop::kill_abandoned`]).

use std::sync::Arc;
use std::time::Duration;

use crate::clients::ClientHandle;
use crate::gateway::{self, Probe, REFUSES_TOKEN, SMALL_REQUEST};
use crate::Shared;

/// Time between two probes of a healthy client.
const PROBE_HEALTHY: Duration = Duration::from_secs(3);
/// First and longest wait between two probes of an unhealthy client.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(200);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Timeout of a probe: the usual one, but never longer than the client timeout, so a client
/// that stops answering (SIGSTOP, a hung host: connections open, no answer) is given up
/// within about `client_timeout` after its last answer rather than after several probe
/// timeouts.
pub fn probe_timeout(client_timeout: Duration) -> Duration {
    SMALL_REQUEST
        .min(client_timeout)
        .max(Duration::from_millis(500))
}

/// Time between two probes of a healthy client: the usual 3 s, but at most half the client
/// timeout, so a client that stops answering is noticed and given up within 1.5 times it.
pub fn probe_interval(client_timeout: Duration) -> Duration {
    PROBE_HEALTHY
        .min(client_timeout / 2)
        .max(Duration::from_millis(250))
}

/// Probes one client forever: every few seconds while it answers, with backoff while not.
pub async fn run(shared: Arc<Shared>, client: Arc<ClientHandle>) {
    let mut backoff = PROBE_BACKOFF_MIN;
    let timeout = probe_timeout(shared.config.client_timeout);
    loop {
        crate::supervise::fault_point("probe");
        let wait = match gateway::probe(&shared, &client, timeout).await {
            Ok(probe) => {
                backoff = PROBE_BACKOFF_MIN;
                let load = gateway::load(&client, timeout).await;
                let (slots, capacity, has_info) = match probe {
                    Probe::Info(info) => {
                        let slots = Some(info.slots.max(1));
                        let capacity = info.resources;
                        let previous = crate::lock(&client.info).replace((*info).clone());
                        if let Some(previous) = previous {
                            if previous.node != info.node {
                                tracing::warn!(client = client.base(), old = %previous.node, new = %info.node, "client lost its data directory");
                            }
                        }
                        (slots, capacity, true)
                    }
                    Probe::Seed => {
                        *crate::lock(&client.info) = None;
                        (None, None, false)
                    }
                };
                let first = crate::lock(&client.probed).replace(has_info).is_none();
                // Reachable, but a full disk keeps it out of placement a while longer; the
                // dispatcher is woken when it came back or its slots changed.
                let was_healthy = shared
                    .lifecycle
                    .client_probed(
                        client.id,
                        !client.is_full() && !client.is_leaving(),
                        slots,
                        capacity,
                        load,
                    )
                    .was_healthy;
                if !was_healthy {
                    tracing::info!(
                        client = client.base(),
                        slots,
                        seed_only = !has_info,
                        "client healthy"
                    );
                }
                if first {
                    client.first_probe.notify_waiters();
                }
                // Runs given away while it was unreachable are killed now that it answers.
                if !client
                    .killing
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let (killing, client) = (shared.clone(), client.clone());
                    shared.job_tasks.spawn(async move {
                        crate::stop::kill_abandoned(&killing, &client).await;
                        client
                            .killing
                            .store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                probe_interval(shared.config.client_timeout)
            }
            Err(why) => {
                if backoff == PROBE_BACKOFF_MIN && why.contains(REFUSES_TOKEN) {
                    tracing::error!(client = client.base(), "{why}");
                }
                crate::collector::check_unreachable(&shared, &client);
                let wait = backoff;
                backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = client.kick.notified() => {
                // A burst of failures probes once, not once each.
                tokio::time::sleep(PROBE_BACKOFF_MIN.min(wait)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_never_waits_longer_than_the_client_timeout() {
        assert_eq!(
            probe_timeout(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        assert_eq!(probe_timeout(Duration::from_secs(60)), SMALL_REQUEST);
        assert_eq!(
            probe_timeout(Duration::from_millis(100)),
            Duration::from_millis(500)
        );
        assert_eq!(probe_interval(Duration::from_secs(30)), PROBE_HEALTHY);
        assert_eq!(
            probe_interval(Duration::from_secs(3)),
            Duration::from_millis(1500)
        );
    }
}
