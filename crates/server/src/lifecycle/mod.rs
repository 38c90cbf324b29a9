//! The one writer of job state.
//!
//! Every change of a job's state is an event method here, named for what happened (uploaded,
//! sending, submitted, running, send failed, run lost, ended on the client, completed,
//! terminated, expired, recovered at start). Each does the guarded transition in the database,
//! the scheduler's update and the side tables' (the collector's failing checks), wakes the
//! dispatcher when a slot or a job came free, and **returns the effects to perform** (check
//! the job on its client, kill or release a payload there, drop the inputs, offer the job
//! again later) instead of doing I/O itself: the callers, at the edges, perform them
//! ([`crate::effects`]). Commit first, act after: a crash between the two leaves a state the
//! next start settles.
//!
//! Synchronous on purpose (the database calls block): async code calls it from the blocking
//! pool or, for the short in-memory parts, directly (ARCHITECTURE.md, "sync core").
//!
//! The read side (`JobTable`'s reads) stays open to every module; only this module can commit
//! a change (`JobTable::transition` is private to it).

mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::scheduler::{Ask, Capacity, Decision, Scheduler, ServiceId, Waiting};
use crate::store::{Change, Job, JobResources, JobStatus, ResultZip};
pub use table::{JobTable, JobWatch};

/// Longest wait before a job that could not be sent is offered to the scheduler again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What an event asks the edges to do once its change is committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Ask the job's client where its run is, and act on the answer.
    Check(Box<Job>),
    /// Stop payload `dest` on client `client` (a payload made for a job that moved on).
    Kill { client: String, dest: i64 },
    /// Tell client `client` that payload `dest`'s copy may go.
    Release { client: String, dest: i64 },
    /// The job's uploaded files may go once its results are stored (the ZIP holds them too):
    /// `with_commit` when the commit of its final state stored them (its ZIP kept in the
    /// database, or its result file put in place before it) and so deleted the input files
    /// kept in the database ([`Change::drop_inputs`]); else only if its result file is there,
    /// and then the rows too.
    DropInputs { id: i64, with_commit: bool },
    /// Offer job `id` to the scheduler again after `after` ([`Lifecycle::offer_again`]).
    OfferAgain { id: i64, after: Duration },
    /// The run's end could not be committed (the database failed): ask the job's client
    /// again after `after`, so the end is not lost (the client keeps the payload until it
    /// is released, which only a committed end does).
    CheckLater { job: Box<Job>, after: Duration },
}

/// How long after a failed commit of a run's end its client is asked again.
const CHECK_AGAIN_AFTER_A_FAILED_COMMIT: Duration = Duration::from_secs(1);

/// What [`Lifecycle::end`] did.
enum Ending {
    Ended,
    /// The job was not in one of the states the end is from (or not the same run).
    Elsewhere,
    /// The database refused or failed: nothing was committed.
    NotRecorded,
}

/// Effects to perform, in order.
pub type Effects = Vec<Effect>;

/// What [`Lifecycle::recover_at_start`] leaves for the caller.
pub struct Recovered {
    /// Jobs that were being sent (Processing): to be sent again with the same key.
    pub resend: Vec<Job>,
    pub effects: Effects,
}

/// The lifecycle: the job table, the scheduler and the per-job side tables, changed together.
pub struct Lifecycle {
    jobs: Arc<JobTable>,
    sched: Mutex<Scheduler>,
    services: HashMap<String, ServiceId>,
    /// Jobs whose checks keep failing short of their client being unreachable: since when,
    /// and how many times. Forgotten with every end of a run.
    failing_checks: Mutex<HashMap<i64, (Instant, u32)>>,
    /// Wakes the dispatcher: a new job, a freed slot, a client back.
    wake: Notify,
    max_attempts: u32,
    /// Whether this server leads (always, on a database of its own): a standby keeps no jobs
    /// in its scheduler, the leader learns of its uploads from the database.
    leading: AtomicBool,
    /// Makes the scheduler afresh (services and clients, no job), for a change of leader.
    fresh: Option<SchedulerFactory>,
    /// The clients that joined at run time, in the order their ids were handed out: a new
    /// term's scheduler gets them back under the same ids (the pool keeps them), after the
    /// configured ones [`SchedulerFactory`] makes.
    joined: Mutex<Vec<JoinedSeat>>,
}

/// A joined client's place in the scheduler: its id, label and services.
struct JoinedSeat {
    id: crate::scheduler::ClientId,
    label: String,
    services: Vec<String>,
}

/// Builds a [`Scheduler`] with the services and clients and no job.
pub type SchedulerFactory = Box<dyn Fn() -> Scheduler + Send + Sync>;

impl Lifecycle {
    pub fn new(
        jobs: Arc<JobTable>,
        sched: Scheduler,
        services: HashMap<String, ServiceId>,
        max_attempts: u32,
    ) -> Self {
        Lifecycle {
            jobs,
            sched: Mutex::new(sched),
            services,
            failing_checks: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            max_attempts,
            leading: AtomicBool::new(true),
            fresh: None,
            joined: Mutex::new(Vec::new()),
        }
    }

    /// A lifecycle that starts as a standby and can change role ([`Lifecycle::lead`],
    /// [`Lifecycle::stand_by`]): `fresh` makes the empty scheduler of each new term.
    pub fn for_cluster(mut self, fresh: SchedulerFactory) -> Self {
        self.leading = AtomicBool::new(false);
        self.fresh = Some(fresh);
        self
    }

    /// Whether this server leads now.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// This server took the lease: an empty scheduler, filled by
    /// [`Lifecycle::recover_at_start`] next, as after a restart.
    pub fn lead(&self) {
        self.renew_term();
        self.leading.store(true, Ordering::SeqCst);
    }

    /// This server lost the lease: it forgets the jobs it scheduled (the next leader
    /// rebuilds them from the database).
    pub fn stand_by(&self) {
        self.leading.store(false, Ordering::SeqCst);
        self.renew_term();
    }

    fn renew_term(&self) {
        if let Some(fresh) = &self.fresh {
            let mut sched = fresh();
            for seat in crate::lock(&self.joined).iter() {
                let id = sched.add_client();
                debug_assert_eq!(id, seat.id, "joined clients keep their ids");
                sched.set_client_label(id, &seat.label);
                self.seat_in_services(&mut sched, id, &seat.services);
            }
            *crate::lock(&self.sched) = sched;
        }
        crate::lock(&self.failing_checks).clear();
    }

    /// Another server committed a change of job `id` (or this one missed it): a Queued job
    /// this scheduler does not hold yet is queued (an upload on a standby). Notifications are
    /// hints: the state is read from the database, under the scheduler's lock (as
    /// [`Lifecycle::offer_again`] does), so a job is never queued twice.
    pub fn learned_of(&self, id: i64) {
        if !self.leading() {
            return;
        }
        let mut sched = self.sched();
        if sched.knows(id) {
            return;
        }
        let job = match self.jobs.get(id) {
            Ok(Some(job)) if job.status == JobStatus::Queued => job,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(job = id, error = %e, "cannot read a job another server changed");
                return;
            }
        };
        let Some(&service) = self.services.get(&job.service) else {
            return;
        };
        sched.enqueue(service, job.user_id, id, ask(&job));
        drop(sched);
        self.wake.notify_one();
    }

    /// Queues every Queued job of the database this scheduler does not hold: after a lost
    /// notification (the listening connection broke), and now and then.
    pub fn catch_up(&self) -> anyhow::Result<()> {
        if !self.leading() {
            return Ok(());
        }
        let mut woken = false;
        let queued = self.jobs.in_states(&[JobStatus::Queued])?;
        let mut sched = self.sched();
        for job in queued {
            if sched.knows(job.id) {
                continue;
            }
            // Read again under the lock: it may have been sent and finished meanwhile.
            if !matches!(self.jobs.get(job.id), Ok(Some(now)) if now.status == JobStatus::Queued) {
                continue;
            }
            if let Some(&service) = self.services.get(&job.service) {
                sched.enqueue(service, job.user_id, job.id, ask(&job));
                woken = true;
            }
        }
        drop(sched);
        if woken {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The jobs, to read.
    pub fn jobs(&self) -> &JobTable {
        &self.jobs
    }

    /// The scheduler, locked, told the time first (usage accrues and waits count with it).
    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        let mut sched = crate::lock(&self.sched);
        sched.set_time(now_secs());
        sched
    }

    /// How long until a queued job will have waited long enough for a client to be held for
    /// it (the dispatcher decides again then, even if nothing else happens).
    pub fn next_deadline(&self) -> Option<Duration> {
        let sched = self.sched();
        let at = sched.next_deadline()?;
        Some(Duration::from_secs_f64((at - sched.now()).max(0.0)))
    }

    /// Puts back the usage kept by earlier runs (fair share), before the jobs are recovered.
    pub fn load_usage(&self) -> anyhow::Result<()> {
        let rows = self.jobs.usage()?;
        let mut sched = self.sched();
        for row in rows {
            if let Some(&service) = self.services.get(&row.service) {
                sched.load_usage(
                    service,
                    row.user_id,
                    row.core_seconds,
                    row.at_ms as f64 / 1000.0,
                );
            }
        }
        Ok(())
    }

    /// Resolves when the dispatcher has something to look at (a permit is kept if nobody
    /// waits, so no wake-up is lost).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Wakes the dispatcher (a client came back, or its slots changed).
    pub fn wake_dispatcher(&self) {
        self.wake.notify_one();
    }

    /// The scheduler, to read (gauges, the dashboard's quotas): held locked while the view
    /// lives, so keep it short.
    pub fn scheduler(&self) -> SchedulerView<'_> {
        SchedulerView(self.sched())
    }

    /// Client health and capacity as its probes find them; the dispatcher is woken when the
    /// client came back or its slots changed.
    pub fn client_probed(
        &self,
        client: crate::scheduler::ClientId,
        placeable: bool,
        slots: Option<usize>,
        capacity: Option<Capacity>,
        load: f64,
    ) -> ClientChange {
        let mut sched = self.sched();
        let was_healthy = sched.client_healthy(client);
        let old_slots = sched.client_slots(client);
        let old_capacity = sched.client_capacity(client);
        sched.set_client(client, placeable, slots, load);
        sched.set_client_capacity(client, capacity);
        drop(sched);
        if !was_healthy || old_slots != slots || old_capacity != capacity {
            self.wake.notify_one();
        }
        ClientChange { was_healthy }
    }

    /// A client joined at run time: a new scheduler id (unless `existing`), serving these
    /// services (names the lifecycle does not know are skipped). Unhealthy until probed.
    pub fn client_joined(
        &self,
        existing: Option<crate::scheduler::ClientId>,
        label: &str,
        services: &[String],
    ) -> crate::scheduler::ClientId {
        let mut sched = crate::lock(&self.sched);
        let mut seats = crate::lock(&self.joined);
        let id = existing.unwrap_or_else(|| {
            let id = sched.add_client();
            sched.set_client_label(id, label);
            seats.push(JoinedSeat {
                id,
                label: label.to_owned(),
                services: Vec::new(),
            });
            id
        });
        if let Some(seat) = seats.iter_mut().find(|seat| seat.id == id) {
            for name in services {
                if !seat.services.contains(name) {
                    seat.services.push(name.clone());
                }
            }
        }
        self.seat_in_services(&mut sched, id, services);
        id
    }

    fn seat_in_services(
        &self,
        sched: &mut Scheduler,
        id: crate::scheduler::ClientId,
        services: &[String],
    ) {
        for name in services {
            if let Some(&service) = self.services.get(name) {
                sched.add_client_to_service(service, id);
            }
        }
    }

    /// No job goes to the client until it is found healthy again.
    pub fn client_out(&self, client: crate::scheduler::ClientId) -> ClientChange {
        let mut sched = self.sched();
        let was_healthy = sched.client_healthy(client);
        sched.set_client_health(client, false);
        ClientChange { was_healthy }
    }

    /// An upload: the job's row and its files together ([`JobTable::insert_job`]: `inputs`
    /// kept in the database, or files `place_files` puts in place), then its place in the
    /// queue.
    pub fn uploaded(
        &self,
        user_id: i64,
        service: &str,
        callback: Option<&crate::store::Callback>,
        resources: &JobResources,
        inputs: &[crate::store::InputFile],
        place_files: impl FnOnce(i64) -> std::io::Result<()>,
    ) -> anyhow::Result<Job> {
        let &service_id = self
            .services
            .get(service)
            .ok_or_else(|| anyhow::anyhow!("unknown service {service:?}"))?;
        let job =
            self.jobs
                .insert_job(user_id, service, callback, resources, inputs, place_files)?;
        if self.leading() {
            // A leader that just took over may have found it in the database already.
            let mut sched = self.sched();
            if !sched.knows(job.id) {
                sched.enqueue(service_id, user_id, job.id, ask(&job));
            }
            drop(sched);
            self.wake.notify_one();
        }
        Ok(job)
    }

    /// Why a job asking for `resources` could never run in `service` (no client of it has
    /// that much, even idle), naming the largest client; `None` when it could, or when that
    /// is not known (a client that does not advertise its resources, or not probed yet).
    pub fn never_fits(&self, service: &str, resources: &JobResources) -> Option<String> {
        let &id = self.services.get(service)?;
        self.sched().never_fits(id, service, &ask_of(resources))
    }

    /// Why job `id` waits, while it is queued (a query of the scheduler, nothing changes).
    pub fn waiting_for(&self, id: i64) -> Option<Waiting> {
        self.sched().waiting_for(id)
    }

    /// What may be sent now, and where.
    pub fn decide(&self) -> Vec<Decision> {
        let mut sched = self.sched();
        // Under the lock, so the tests also see a poisoned scheduler lock survived.
        crate::supervise::fault_point("dispatcher");
        sched.decide()
    }

    /// The dispatcher takes a decision: the job goes Processing with a new attempt and its
    /// key. `None` when it moved meanwhile (terminated): its slot is given back.
    pub fn sending(&self, decision: &Decision, client: &str) -> Option<Job> {
        let job = match self.jobs.get(decision.job) {
            Ok(Some(job)) => job,
            _ => {
                self.release_slot(decision.job);
                return None;
            }
        };
        let attempt = job.attempts + 1;
        let key = format!("{}:{}:{attempt}", self.jobs.server_id(), job.id);
        let change = Change {
            message: Some(format!("sending to {client}")),
            attempts: Some(attempt),
            client: Some(Some(client.to_owned())),
            dest_id: Some(None),
            node: Some(None),
            dispatch_key: Some(Some(key)),
            ..Default::default()
        };
        match self
            .jobs
            .transition(job.id, &[JobStatus::Queued], JobStatus::Processing, change)
        {
            Ok(Some(job)) => Some(job),
            _ => {
                self.release_slot(decision.job);
                None
            }
        }
    }

    fn release_slot(&self, id: i64) {
        let Some((service, user, usage)) = self.sched().finish_with_usage(id) else {
            return;
        };
        self.wake.notify_one();
        // Fair share: the user's usage as it stands after this run, kept for a restart.
        if let Some(usage) = usage {
            let name = self
                .services
                .iter()
                .find(|(_, id)| **id == service)
                .map(|(name, _)| name.clone());
            if let Some(service) = name {
                let row = crate::store::UsageRow {
                    service,
                    user_id: user,
                    core_seconds: usage.value,
                    at_ms: (usage.at * 1000.0) as i64,
                };
                if let Err(e) = self.jobs.save_usage(&row) {
                    tracing::warn!(error = %e, user, "could not keep the user's fair-share usage");
                }
            }
        }
    }

    /// The client took the job as payload `dest`: Submitted, and one look at the payload (so
    /// nothing the client reported before this commit is missed). A job terminated while it
    /// was being sent has its new payload killed and released instead.
    /// `None` when the database failed (nothing committed): the caller tries again.
    pub fn submitted(&self, job: &Job, dest: i64, node: Option<String>) -> Option<Effects> {
        let client = job.client.clone().unwrap_or_default();
        let change = Change {
            message: Some(format!("submitted to {client} as payload {dest}")),
            dest_id: Some(Some(dest)),
            node: Some(node),
            only_run: Some(job.dispatch_key.clone()),
            ..Default::default()
        };
        match self.jobs.transition(
            job.id,
            &[JobStatus::Processing],
            JobStatus::Submitted,
            change,
        ) {
            Ok(Some(job)) => Some(vec![Effect::Check(Box::new(job))]),
            Ok(None) => {
                tracing::info!(
                    job = job.id,
                    dest,
                    "job terminated while being sent; killing its payload"
                );
                Some(vec![
                    Effect::Kill {
                        client: client.clone(),
                        dest,
                    },
                    Effect::Release { client, dest },
                ])
            }
            Err(e) => {
                tracing::error!(job = job.id, error = %e, "could not record submission; trying again");
                None
            }
        }
    }

    /// The client says the job's payload runs.
    pub fn running(&self, job: &Job) {
        if job.status == JobStatus::Submitted {
            let _ = self.jobs.transition(
                job.id,
                &[JobStatus::Submitted],
                JobStatus::Running,
                Change {
                    only_run: Some(job.dispatch_key.clone()),
                    ..Change::message("Job running")
                },
            );
        }
    }

    /// The client reported the payload's end (before its results are fetched): the job no
    /// longer counts on that client's slots. Its quotas stay taken until its results are in.
    pub fn left_client(&self, id: i64) {
        if self.sched().leave_client(id) {
            self.wake.notify_one();
        }
    }

    /// Ends a job as Failed with `reason`, from any of `from`. `true` if this did it.
    pub fn failed(&self, job: &Job, from: &[JobStatus], reason: String) -> bool {
        matches!(
            self.end(job, from, JobStatus::Failed, Change::message(reason)),
            Ending::Ended
        )
    }

    /// A send failed (the client could not be reached, or answered an error): queued again
    /// after `delay`, or Failed once `max_attempts` are used up.
    pub fn send_failed(&self, job: &Job, reason: &str, delay: Duration) -> Effects {
        self.requeue(job, &[JobStatus::Processing], reason, delay, false, false)
    }

    /// The client had no room for the job (507): queued again after `delay`, the attempt
    /// given back (the job never ran, so this cannot make it fail).
    pub fn send_refused_for_room(&self, job: &Job, reason: &str, delay: Duration) -> Effects {
        self.requeue(job, &[JobStatus::Processing], reason, delay, true, false)
    }

    /// The job's run was lost (client restarted, lost its data, removed the payload): queued
    /// again at once, or Failed once `max_attempts` are used up.
    pub fn run_lost(&self, job: &Job, reason: &str) -> Effects {
        self.requeue(
            job,
            &JobStatus::ON_CLIENT,
            reason,
            Duration::ZERO,
            false,
            false,
        )
    }

    /// [`Lifecycle::run_lost`] from wherever the job is (a service or client no longer
    /// configured at start).
    pub fn run_lost_from(&self, job: &Job, from: &[JobStatus], reason: &str) -> Effects {
        self.requeue(job, from, reason, Duration::ZERO, false, false)
    }

    /// The server gives the run away while its client cannot be reached: the run may still go
    /// on there, so it is recorded (in the same commit) to be killed as soon as the client
    /// answers again; its late result is never taken, since the job no longer points at it.
    pub fn run_abandoned(&self, job: &Job, reason: &str) -> Effects {
        self.requeue(
            job,
            &JobStatus::ON_CLIENT,
            reason,
            Duration::ZERO,
            false,
            true,
        )
    }

    fn requeue(
        &self,
        job: &Job,
        from: &[JobStatus],
        reason: &str,
        delay: Duration,
        refund: bool,
        abandon_run: bool,
    ) -> Effects {
        if !refund && job.attempts >= self.max_attempts {
            let change = Change {
                message: Some(format!(
                    "gave up after {} attempts; last: {reason}",
                    job.attempts
                )),
                abandon_run,
                ..Default::default()
            };
            self.end(job, from, JobStatus::Failed, change);
            return vec![];
        }
        let change = Change {
            message: Some(format!(
                "queued again after attempt {}: {reason}",
                job.attempts
            )),
            client: Some(None),
            dest_id: Some(None),
            node: Some(None),
            attempts: refund.then(|| job.attempts.saturating_sub(1)),
            abandon_run,
            only_run: Some(job.dispatch_key.clone()),
            ..Default::default()
        };
        match self
            .jobs
            .transition(job.id, from, JobStatus::Queued, change)
        {
            Ok(Some(_)) => {}
            Ok(None) => return vec![],
            Err(e) => {
                tracing::error!(job = job.id, error = %e, "could not queue job again");
                return vec![];
            }
        }
        self.forget_checks(job.id);
        let Some(&service) = self.services.get(&job.service) else {
            return vec![];
        };
        if delay.is_zero() {
            // Freed and queued again under one lock: no other job of the user takes its place.
            let mut sched = self.sched();
            sched.finish(job.id);
            sched.push_front(service, job.user_id, job.id, ask(job));
            drop(sched);
            self.wake.notify_one();
            vec![]
        } else {
            // The quota is freed now; the job is offered again after the delay.
            self.release_slot(job.id);
            vec![Effect::OfferAgain {
                id: job.id,
                after: delay.min(MAX_BACKOFF),
            }]
        }
    }

    /// Puts a job queued again after a delay back into the scheduler, if it is still Queued:
    /// a job terminated meanwhile is Killed and must not take dispatch turns. The state is
    /// read under the scheduler's lock, which [`Lifecycle::terminated`] takes after it commits
    /// Killed: either this sees Killed, or that finds the job queued.
    pub fn offer_again(&self, id: i64) {
        let mut sched = self.sched();
        if sched.knows(id) {
            // Queued meanwhile by a catch-up with the database.
            return;
        }
        let job = match self.jobs.get(id) {
            Ok(Some(job)) if job.status == JobStatus::Queued => job,
            Ok(_) => return,
            Err(e) => {
                // Left out, it would wait until the next start; offered, the dispatcher's
                // guarded Queued -> Processing refuses it if it is no longer Queued. But
                // without its row its service and user are unknown: the next start it is.
                tracing::error!(job = id, error = %e, "cannot read a job queued again");
                return;
            }
        };
        let Some(&service) = self.services.get(&job.service) else {
            return;
        };
        sched.push_front(service, job.user_id, id, ask(&job));
        drop(sched);
        self.wake.notify_one();
    }

    /// The client reports a final state other than Completed (Failed, Invalid, Killed); the
    /// partial results are already stored as a file, or are `zip`, kept in the same commit.
    pub fn ended_on_client(
        &self,
        job: &Job,
        status: JobStatus,
        exit_code: Option<i32>,
        reason: Option<String>,
        zip: Option<ResultZip>,
    ) -> Effects {
        let message = reason.unwrap_or_else(|| match (status, exit_code) {
            (JobStatus::Failed, Some(code)) => format!("run.sh exited with code {code}"),
            (JobStatus::Invalid, _) => "the job has no usable run.sh".into(),
            (JobStatus::Killed, _) => "killed on the client".into(),
            _ => format!("{status} on the client"),
        });
        // With its partial ZIP in this commit, the inputs kept in the database go with it.
        let with_commit = zip.is_some();
        let change = Change {
            message: Some(message),
            exit_code: exit_code.map(Some),
            result_zip: zip,
            drop_inputs: with_commit,
            ..Default::default()
        };
        let ending = self.end(job, &JobStatus::ON_CLIENT, status, change);
        Self::after_end(job, ending, || {
            with_release(
                job,
                vec![Effect::DropInputs {
                    id: job.id,
                    with_commit,
                }],
            )
        })
    }

    /// The job's result ZIP is stored as a file, or is `zip`, kept in the database by this
    /// very commit: Completed.
    pub fn completed(&self, job: &Job, zip: Option<ResultZip>) -> Effects {
        // Its results are stored either way: the inputs kept in the database go with this
        // commit.
        let change = Change {
            message: Some("Job completed".into()),
            exit_code: Some(Some(0)),
            result_zip: zip,
            drop_inputs: true,
            ..Default::default()
        };
        let ending = self.end(job, &JobStatus::ON_CLIENT, JobStatus::Completed, change);
        Self::after_end(job, ending, || {
            with_release(
                job,
                vec![Effect::DropInputs {
                    id: job.id,
                    with_commit: true,
                }],
            )
        })
    }

    /// The job ran, but its results were over the service's `max_result`: Failed, nothing
    /// kept, the client's copy released.
    pub fn results_too_large(&self, job: &Job, reason: String) -> Effects {
        let ending = self.end(
            job,
            &JobStatus::ON_CLIENT,
            JobStatus::Failed,
            Change::message(reason),
        );
        Self::after_end(job, ending, || with_release(job, vec![]))
    }

    /// A terminate request ended the job (Killed) from one of `from`; `abandon_run` when its
    /// run on the client could not be stopped (it is killed there once the client answers).
    /// `None` when the job was elsewhere.
    pub fn terminated(
        &self,
        job: &Job,
        from: &[JobStatus],
        message: String,
        abandon_run: bool,
    ) -> anyhow::Result<Option<Job>> {
        // Only the run the request was carried to: if the job moved into a new run meanwhile
        // (lost, sent again), this changes nothing and the caller looks again.
        let change = Change {
            abandon_run,
            only_run: Some(job.dispatch_key.clone()),
            ..Change::message(message)
        };
        let Some(done) = self
            .jobs
            .transition(job.id, from, JobStatus::Killed, change)?
        else {
            return Ok(None);
        };
        self.forget_checks(job.id);
        if job.status == JobStatus::Queued {
            // Out of its queue: Killed is committed, so a delayed offer that reads the state
            // under this lock from now on sees it (see `offer_again`).
            if let Some(&service) = self.services.get(&job.service) {
                self.sched().remove_queued(service, job.user_id, job.id);
            }
        } else {
            self.release_slot(job.id);
        }
        Ok(Some(done))
    }

    /// The retention period is over: Cleaned (its timeline, and a result ZIP and input files
    /// kept in the database, dropped in the same commit).
    /// `true` if this did it; the files go after.
    pub fn expired(&self, id: i64) -> anyhow::Result<bool> {
        Ok(self
            .jobs
            .transition(
                id,
                &JobStatus::FINISHED,
                JobStatus::Cleaned,
                Change::message("files removed after the retention period"),
            )?
            .is_some())
    }

    /// A check of the job on its client failed short of the client being unreachable:
    /// since when the checks of this run fail, and how many times. A disk full on our side
    /// restarts the clock (it is not the job's fault).
    pub fn check_failed(&self, id: i64, disk_full: bool) -> (Instant, u32) {
        let mut failures = crate::lock(&self.failing_checks);
        let entry = failures.entry(id).or_insert_with(|| (Instant::now(), 0));
        entry.1 += 1;
        if disk_full {
            entry.0 = Instant::now();
        }
        *entry
    }

    /// A check of the job went through: its failures so far are forgotten.
    pub fn check_succeeded(&self, id: i64) {
        self.forget_checks(id);
    }

    fn forget_checks(&self, id: i64) {
        crate::lock(&self.failing_checks).remove(&id);
    }

    /// Moves the job into a final state; on success, its quota slot and its failing checks
    /// are freed. Only after a transition that happened: one that found the job elsewhere
    /// (`Ok(None)`) may be a late word about an old run, and the slot is the new run's.
    fn end(&self, job: &Job, from: &[JobStatus], to: JobStatus, change: Change) -> Ending {
        let change = Change {
            only_run: Some(job.dispatch_key.clone()),
            ..change
        };
        match self.jobs.transition(job.id, from, to, change) {
            Ok(Some(_)) => {
                self.forget_checks(job.id);
                self.release_slot(job.id);
                Ending::Ended
            }
            Ok(None) => Ending::Elsewhere,
            Err(e) => {
                tracing::error!(job = job.id, error = %e, status = %to, "could not record the job's end; its client is asked again");
                Ending::NotRecorded
            }
        }
    }

    /// The effects of a run's end as seen on its client: `ended`'s when committed, a check
    /// later when the database failed, none when the job had moved on.
    fn after_end(job: &Job, ending: Ending, ended: impl FnOnce() -> Effects) -> Effects {
        match ending {
            Ending::Ended => ended(),
            Ending::Elsewhere => vec![],
            Ending::NotRecorded => vec![Effect::CheckLater {
                job: Box::new(job.clone()),
                after: CHECK_AGAIN_AFTER_A_FAILED_COMMIT,
            }],
        }
    }

    /// Puts back what a previous process left: Queued jobs into their queues in order, active
    /// ones against their quotas (and their client's slots); a job of a service no longer
    /// configured fails, one on a client no longer configured is queued again. `client_of`
    /// maps a client's base URL to its id.
    pub fn recover_at_start(
        &self,
        client_of: impl Fn(&str) -> Option<crate::scheduler::ClientId>,
    ) -> anyhow::Result<Recovered> {
        let mut resend = Vec::new();
        let mut orphans = Vec::new();
        let mut gone_services = Vec::new();
        {
            let mut sched = self.sched();
            for job in self.jobs.in_states(&JobStatus::NOT_FINISHED)? {
                let Some(&service) = self.services.get(&job.service) else {
                    gone_services.push(job);
                    continue;
                };
                if job.status == JobStatus::Queued {
                    // An upload committed since this term began may be queued already.
                    if !sched.knows(job.id) {
                        sched.enqueue(service, job.user_id, job.id, ask(&job));
                    }
                    continue;
                }
                let client = job.client.as_deref().and_then(&client_of);
                sched.activate(service, job.user_id, job.id, client, ask(&job));
                if job.status == JobStatus::Processing {
                    if client.is_some() {
                        resend.push(job);
                    } else {
                        orphans.push(job);
                    }
                } else if client.is_none() {
                    orphans.push(job);
                }
            }
        }
        let mut effects = Vec::new();
        for job in gone_services {
            let reason = format!("service {:?} is no longer configured", job.service);
            self.end(
                &job,
                &JobStatus::NOT_FINISHED,
                JobStatus::Failed,
                Change::message(reason),
            );
        }
        for job in orphans {
            effects.extend(self.run_lost_from(
                &job,
                &JobStatus::ACTIVE,
                "its client is no longer configured",
            ));
        }
        self.wake.notify_one();
        Ok(Recovered { resend, effects })
    }
}

/// Read access to the scheduler; only the lifecycle changes it.
pub struct SchedulerView<'a>(std::sync::MutexGuard<'a, Scheduler>);

impl std::ops::Deref for SchedulerView<'_> {
    type Target = Scheduler;
    fn deref(&self) -> &Scheduler {
        &self.0
    }
}

/// What [`Lifecycle::client_probed`] and [`Lifecycle::client_out`] found before the change.
pub struct ClientChange {
    pub was_healthy: bool,
}

/// Seconds since the Unix epoch: the scheduler's clock (usage is kept across restarts, so
/// wall time rather than a monotonic clock).
fn now_secs() -> f64 {
    crate::store::now_ms() as f64 / 1000.0
}

/// What the scheduler counts of a job: its cores, memory and GPUs, and its priority.
fn ask(job: &Job) -> Ask {
    ask_of(&job.resources)
}

fn ask_of(r: &JobResources) -> Ask {
    Ask {
        cores: r.cores,
        memory_mb: r.memory_mb.unwrap_or(0),
        gpus: r.gpus,
        priority: r.priority,
    }
}

/// `effects`, then the release of the job's payload on its client (when it has one).
fn with_release(job: &Job, mut effects: Effects) -> Effects {
    if let (Some(client), Some(dest)) = (job.client.clone(), job.dest_id) {
        effects.push(Effect::Release { client, dest });
    }
    effects
}
