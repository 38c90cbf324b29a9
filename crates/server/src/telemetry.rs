//! The server's Prometheus metrics. Counters and histograms are recorded where a job's state
//! is committed ([`job_changed`]); gauges (jobs per state, queue depth, client health) are
//! computed when `/metrics` is scraped ([`render`]).

use metrics::{counter, gauge, histogram};

use crate::store::{now_ms, Job, JobStatus};
use crate::Shared;

/// Records what a committed state change means for the metrics.
pub fn job_changed(job: &Job) {
    let service = job.service.clone();
    match job.status {
        JobStatus::Processing => {
            counter!("jobrelay_server_dispatch_attempts_total", "service" => service).increment(1);
        }
        JobStatus::Submitted if job.attempts == 1 => {
            let waited = (now_ms() - job.created_ms).max(0) as f64 / 1000.0;
            histogram!("jobrelay_server_dispatch_latency_seconds", "service" => service)
                .record(waited);
        }
        // Jobs are created Queued without a transition: a transition to Queued is a requeue.
        JobStatus::Queued => {
            counter!("jobrelay_server_requeues_total", "service" => service).increment(1);
        }
        status if status.is_finished() && status != JobStatus::Cleaned => {
            counter!(
                "jobrelay_server_jobs_finished_total",
                "service" => service.clone(),
                "status" => status.as_str()
            )
            .increment(1);
            if status == JobStatus::Completed {
                let took = (now_ms() - job.created_ms).max(0) as f64 / 1000.0;
                histogram!("jobrelay_server_end_to_end_latency_seconds", "service" => service)
                    .record(took);
            }
        }
        _ => {}
    }
}

/// Sets the gauges from the current state and renders every metric.
pub fn render(shared: &Shared) -> anyhow::Result<String> {
    for (service, status, count) in shared.store.counts(None)? {
        gauge!("jobrelay_server_jobs", "service" => service, "status" => status).set(count as f64);
    }
    {
        let sched = crate::lock(&shared.sched);
        for (name, &id) in &shared.service_ids {
            gauge!("jobrelay_server_queue_depth", "service" => name.clone())
                .set(sched.queued(id) as f64);
            gauge!("jobrelay_server_active_jobs", "service" => name.clone())
                .set(sched.active(id) as f64);
        }
        for client in &shared.clients {
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
    Ok(jobrelay_common::telemetry::render())
}
