//! The server's Prometheus metrics. Counters and histograms are recorded where a job's state
//! is committed ([`crate::lifecycle::JobTable`]); gauges (jobs per state, queue depth, client health) are
//! computed when `/metrics` is scraped ([`render`]).

use metrics::gauge;

use crate::Shared;

/// Sets the gauges from the current state and renders every metric.
pub fn render(shared: &Shared) -> anyhow::Result<String> {
    for (service, status, count) in shared.store.counts(None)? {
        gauge!("jobrelay_server_jobs", "service" => service, "status" => status).set(count as f64);
    }
    {
        let sched = shared.lifecycle.scheduler();
        for (name, &id) in &shared.service_ids {
            gauge!("jobrelay_server_queue_depth", "service" => name.clone())
                .set(sched.queued(id) as f64);
            gauge!("jobrelay_server_active_jobs", "service" => name.clone())
                .set(sched.active(id) as f64);
        }
        let clients = shared.clients.all();
        let joined = clients.iter().filter(|c| c.joined.is_some());
        gauge!("jobrelay_server_joined_clients").set(joined.clone().count() as f64);
        gauge!("jobrelay_server_joined_clients_healthy")
            .set(joined.filter(|c| sched.client_healthy(c.id)).count() as f64);
        for client in clients {
            let base = client.base().to_owned();
            gauge!("jobrelay_server_client_healthy", "client" => base.clone()).set(
                if sched.client_healthy(client.id) {
                    1.0
                } else {
                    0.0
                },
            );
            gauge!("jobrelay_server_client_load_percent", "client" => base.clone())
                .set(sched.client_load(client.id));
            gauge!("jobrelay_server_client_active_jobs", "client" => base)
                .set(sched.active_on_client(client.id) as f64);
        }
    }
    let role = shared.role.get();
    gauge!("jobrelay_server_leader", "server" => shared.role.name.clone()).set(if role.leading {
        1.0
    } else {
        0.0
    });
    if let Some(epoch) = role.epoch {
        gauge!("jobrelay_server_lease_epoch").set(epoch as f64);
    }
    if let Some(since) = role.since_ms {
        gauge!("jobrelay_server_leader_since_seconds").set(since as f64 / 1000.0);
    }
    Ok(jobrelay_common::telemetry::render())
}
