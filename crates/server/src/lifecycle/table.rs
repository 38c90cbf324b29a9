//! The jobs as the rest of the server sees them: reads go to the database ([`JobDb`]); every
//! committed change also wakes the long-polls waiting on its job, counts in the metrics and is
//! logged, here and nowhere else. The database only stores. Changes are committed only by the
//! lifecycle (`insert_job` and `transition` are private to it); reads are open to all.
//!
//! Every database call may come from an async task (a loop, an event): the databases wait off
//! the async worker when they must wait (`sync::lock_off_worker` for SQLite's connection
//! held by a long query, `sync::off_worker` for PostgreSQL's round trip), so a held database
//! does not stall requests that need none; a free one costs no hand-over of the worker.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use metrics::{counter, histogram};
use tokio::sync::Notify;

use crate::store::{
    now_ms, AbandonedRun, Callback, Change, Delivery, DeliveryEnd, InputFile, Job, JobDb, JobEvent,
    JobResources, JobStatus, ListFilter, Notification,
};

pub struct JobTable {
    db: Box<dyn JobDb>,
    /// Long-polls waiting on a job (`GET /jobs/{id}?wait=`): woken after each committed
    /// change of that job. An entry lives while a [`JobWatch`] holds it.
    watchers: Mutex<HashMap<i64, Arc<Notify>>>,
    /// Wakes the webhook delivery loop: a change that may have written a notification
    /// (to a final state, or Running) was committed.
    pub deliveries: Notify,
    /// Whether uploads may carry callbacks at all (an allowlist is configured). Without one no
    /// notification is written, and the loop is not woken (two queries per finished job).
    callbacks: bool,
}

/// Registration of a long-poll on one job: [`JobWatch::notify`] is woken after every
/// committed state change of the job. Removed from the table when the last one is dropped.
pub struct JobWatch<'a> {
    table: &'a JobTable,
    id: i64,
    pub notify: Arc<Notify>,
}

impl Drop for JobWatch<'_> {
    fn drop(&mut self) {
        let mut watchers = crate::lock(&self.table.watchers);
        // Ours and the map's: nobody else waits on this job.
        if Arc::strong_count(&self.notify) <= 2 {
            watchers.remove(&self.id);
        }
    }
}

impl JobTable {
    pub fn new(db: Box<dyn JobDb>) -> Self {
        JobTable {
            db,
            watchers: Mutex::new(HashMap::new()),
            deliveries: Notify::new(),
            callbacks: true,
        }
    }

    /// A table on which uploads take no callback (no `[webhooks] allowed_hosts`): committed
    /// changes do not wake the delivery loop, which still sends what an earlier configuration
    /// left in the outbox on its own schedule.
    pub fn without_callbacks(mut self) -> Self {
        self.callbacks = false;
        self
    }

    /// Registers a long-poll on job `id`. Create the `notified()` future (and `enable` it)
    /// before reading the job, so that no change between the read and the wait is missed.
    pub fn watch(&self, id: i64) -> JobWatch<'_> {
        let notify = crate::lock(&self.watchers).entry(id).or_default().clone();
        JobWatch {
            table: self,
            id,
            notify,
        }
    }

    fn changed(&self, id: i64) {
        if let Some(notify) = crate::lock(&self.watchers).get(&id) {
            notify.notify_waiters();
        }
    }

    /// Another server committed a change of job `id`: its long-polls here look again.
    pub fn changed_elsewhere(&self, id: i64) {
        self.changed(id);
    }

    /// Every long-poll looks again (notifications may have been lost meanwhile).
    pub fn wake_all(&self) {
        for notify in crate::lock(&self.watchers).values() {
            notify.notify_waiters();
        }
    }

    /// What servers sharing the database share; `None` on a database of one server's own.
    pub fn cluster(&self) -> Option<&dyn crate::store::Cluster> {
        self.db.cluster()
    }

    /// [`JobDb::insert_job`], counted and logged once committed.
    pub(super) fn insert_job(
        &self,
        user_id: i64,
        service: &str,
        callback: Option<&Callback>,
        resources: &JobResources,
        inputs: &[InputFile],
        place_files: impl FnOnce(i64) -> std::io::Result<()>,
    ) -> anyhow::Result<Job> {
        let mut place_files = Some(place_files);
        let job = self
            .db
            .insert_job(user_id, service, callback, resources, inputs, &mut |id| {
                place_files.take().expect("files are placed once")(id)
            })?;
        counter!("jobrelay_server_jobs_uploaded_total", "service" => service.to_owned())
            .increment(1);
        tracing::info!(
            job = job.id,
            user_id,
            service,
            status = "Queued",
            "job state"
        );
        Ok(job)
    }

    /// [`JobDb::transition`]; once committed, the job's long-polls are woken, the change is
    /// counted and logged.
    pub(super) fn transition(
        &self,
        id: i64,
        from: &[JobStatus],
        to: JobStatus,
        change: Change,
    ) -> anyhow::Result<Option<Job>> {
        let job = self.db.transition(id, from, to, change)?;
        if let Some(job) = &job {
            count_in_metrics(job);
            self.changed(id);
            if self.callbacks
                && (to == JobStatus::Running || (to.is_finished() && to != JobStatus::Cleaned))
            {
                self.deliveries.notify_one();
            }
            tracing::info!(
                job = id,
                status = %to,
                attempts = job.attempts,
                client = job.client.as_deref().unwrap_or(""),
                dest_id = job.dest_id,
                message = %job.message,
                "job state"
            );
        }
        Ok(job)
    }

    pub fn server_id(&self) -> &str {
        self.db.server_id()
    }
    pub fn mark_at_open(&self) -> i64 {
        self.db.mark_at_open()
    }
    pub fn get(&self, id: i64) -> anyhow::Result<Option<Job>> {
        self.db.get(id)
    }
    pub fn history(&self, id: i64) -> anyhow::Result<Vec<JobEvent>> {
        self.db.history(id)
    }
    /// The input files kept in the database for job `id` (empty: on disk, or none).
    pub fn input_files(&self, id: i64) -> anyhow::Result<Vec<InputFile>> {
        self.db.input_files(id)
    }
    /// Deletes the input files kept in the database for job `id`.
    pub fn drop_inputs(&self, id: i64) -> anyhow::Result<()> {
        self.db.drop_inputs(id)
    }
    /// The result ZIP kept in the database for job `id`, if any.
    pub fn result_zip(&self, id: i64) -> anyhow::Result<Option<bytes::Bytes>> {
        self.db.result_zip(id)
    }
    pub fn counts(&self, user: Option<i64>) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.db.counts(user)
    }
    pub fn finished_per_minute(
        &self,
        since_ms: i64,
        user: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        self.db.finished_per_minute(since_ms, user)
    }
    pub fn in_states(&self, states: &[JobStatus]) -> anyhow::Result<Vec<Job>> {
        self.db.in_states(states)
    }
    pub fn on_client(&self, base: &str) -> anyhow::Result<Vec<Job>> {
        self.db.on_client(base)
    }
    pub fn abandoned_on(&self, base: &str) -> anyhow::Result<Vec<AbandonedRun>> {
        self.db.abandoned_on(base)
    }
    pub fn forget_abandoned(&self, base: &str, dest_id: i64) -> anyhow::Result<()> {
        self.db.forget_abandoned(base, dest_id)
    }
    pub fn by_dest(&self, base: &str, dest_id: i64) -> anyhow::Result<Option<Job>> {
        self.db.by_dest(base, dest_id)
    }
    pub fn finished_before(&self, cutoff_ms: i64) -> anyhow::Result<Vec<i64>> {
        self.db.finished_before(cutoff_ms)
    }
    pub fn ids_with_files(&self) -> anyhow::Result<HashSet<i64>> {
        self.db.ids_with_files()
    }
    pub fn all_ids(&self) -> anyhow::Result<HashSet<i64>> {
        self.db.all_ids()
    }
    pub fn list(&self, filter: &ListFilter) -> anyhow::Result<(Vec<Job>, i64)> {
        self.db.list(filter)
    }
    pub fn count(&self) -> anyhow::Result<i64> {
        self.db.count()
    }
    pub fn due_deliveries(&self, now_ms: i64, limit: usize) -> anyhow::Result<Vec<Delivery>> {
        self.db.due_deliveries(now_ms, limit)
    }
    pub fn next_delivery_ms(&self) -> anyhow::Result<Option<i64>> {
        self.db.next_delivery_ms()
    }
    pub fn retry_delivery(&self, id: &str, status: &str, next_ms: i64) -> anyhow::Result<()> {
        self.db.retry_delivery(id, status, next_ms)
    }
    pub fn finish_delivery(
        &self,
        id: &str,
        status: &str,
        tried: bool,
        end: DeliveryEnd,
    ) -> anyhow::Result<()> {
        self.db.finish_delivery(id, status, tried, end)
    }
    pub fn notifications(&self, id: i64) -> anyhow::Result<Vec<Notification>> {
        self.db.notifications(id)
    }
    pub fn usage(&self) -> anyhow::Result<Vec<crate::store::UsageRow>> {
        self.db.usage()
    }
    pub fn save_usage(&self, row: &crate::store::UsageRow) -> anyhow::Result<()> {
        self.db.save_usage(row)
    }
    pub fn take_upload_slot(
        &self,
        service: &str,
        user_id: i64,
        quota: crate::ratelimit::RateQuota,
        now_ms: i64,
    ) -> anyhow::Result<Result<(), i64>> {
        self.db.take_upload_slot(service, user_id, quota, now_ms)
    }
    pub fn health(&self) -> Result<(), String> {
        self.db.health()
    }
    pub fn check_integrity(&self) -> Result<(), String> {
        self.db.check_integrity()
    }
}

/// Records what a committed state change means for the metrics.
fn count_in_metrics(job: &Job) {
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
