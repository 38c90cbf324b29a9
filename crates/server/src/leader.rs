//! Who runs the loops that change jobs (scheduler, dispatcher, collector, probes, janitor,
//! webhook delivery): the leader. On a database of its own (SQLite) a server leads for ever.
//! Several servers on one PostgreSQL database campaign for its lease ([`campaign`]): the one
//! holding it leads, renewing it every third of `--leader-timeout`, with every job-state write
//! fenced by the lease's epoch (the store refuses a write of an epoch no longer current); the
//! others stand by, answering the API from the database. A leader that cannot renew in time,
//! finds the lease taken or has a write refused stops its loops at once and stands by; a
//! standby that takes the lease starts a term as a restart would ([`start_term`]: recovery
//! from the database, then the loops, whose collectors reconcile with the clients).
//!
//! Every server also listens to the database's notifications ([`follow_notices`]): other
//! servers' commits wake its long-polls, and the leader queues the jobs uploaded elsewhere
//! and carries out the terminate requests standbys committed. Notifications are hints: after
//! the listening connection is made again (they were lost meanwhile), and every
//! [`CATCH_UP_EVERY`], the leader reads the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jobrelay_common::fsutil::remove_dir_all_if_exists;

use crate::shared::RoleState;
use crate::store::{Cluster, Notice};
use crate::{
    collector, dispatcher, effects, janitor, joined, probe, stop, supervise, webhooks, Shared,
};

/// The loops only a leader runs (retired from `/health` when its term ends).
const LEADER_LOOPS: &[&str] = &[
    "probe",
    "collector",
    "dispatcher",
    "checks",
    "janitor",
    "webhooks",
    "catch-up",
];
/// How often a leader reads the database for jobs and terminate requests it was not told of.
const CATCH_UP_EVERY: Duration = Duration::from_secs(5);
/// A job directory without a row this old is a leftover; younger, it may be an upload a
/// standby is committing right now (its directory is renamed in before its commit).
const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// The tasks of one term of leadership.
pub struct Term {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Term {
    /// Stops the loops of the term and its per-job tasks, and forgets its scheduler.
    pub async fn end(self, shared: &Shared) {
        drop(self);
        shared.loops.retire(LEADER_LOOPS);
        shared.job_tasks.end_term().await;
        shared.lifecycle.stand_by();
        crate::lock(&shared.in_flight).clear();
    }
}

impl Drop for Term {
    /// Its loops stop with it, however it ends (a server stopping drops it).
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts leading: what the previous leader (or process) left is settled as at a restart,
/// then the leader's loops start.
pub fn start_term(shared: &Arc<Shared>) -> anyhow::Result<Term> {
    joined::unclaim_seats(shared);
    joined::seat_from_jobs(shared)?;
    let resend = recover(shared)?;
    let mut tasks = Vec::new();
    let loops = &shared.loops;
    for client in shared.clients.all() {
        let (s, c) = (shared.clone(), client.clone());
        tasks.push(loops.spawn("probe", Some(client.base()), move || {
            probe::run(s.clone(), c.clone())
        }));
        let (s, c) = (shared.clone(), client.clone());
        tasks.push(loops.spawn("collector", Some(client.base()), move || {
            collector::watch(s.clone(), c.clone())
        }));
    }
    let s = shared.clone();
    tasks.push(loops.spawn("dispatcher", None, move || dispatcher::run(s.clone())));
    let s = shared.clone();
    tasks.push(loops.spawn("checks", None, move || {
        collector::serve_check_requests(s.clone())
    }));
    let s = shared.clone();
    tasks.push(loops.spawn("janitor", None, move || janitor::run(s.clone())));
    let s = shared.clone();
    tasks.push(loops.spawn("webhooks", None, move || webhooks::delivery::run(s.clone())));
    if shared.store.cluster().is_some() {
        let s = shared.clone();
        tasks.push(loops.spawn("catch-up", None, move || catch_up(s.clone())));
    }
    for job in resend {
        shared
            .job_tasks
            .spawn(dispatcher::resend(shared.clone(), job));
    }
    Ok(Term { tasks })
}

/// Settles what a previous process left: files of uncommitted uploads and half-fetched
/// results are removed; Queued jobs are queued again in order; active jobs count against the
/// quotas again. Returns the jobs that were being sent (Processing): they are sent again with
/// the same idempotency key.
fn recover(shared: &Arc<Shared>) -> anyhow::Result<Vec<crate::store::Job>> {
    let known = shared.store.ids_with_files()?;
    // Other servers may be committing uploads into the shared directory right now.
    let shared_dir = shared.store.cluster().is_some();
    let old_enough = |path: &std::path::Path| {
        !shared_dir
            || std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > LEFTOVER_AGE))
    };
    for entry in std::fs::read_dir(&shared.jobs_dir)? {
        let entry = entry?;
        let id = entry.file_name().to_string_lossy().parse::<i64>().ok();
        if id.is_none_or(|id| !known.contains(&id)) && old_enough(&entry.path()) {
            tracing::warn!(path = %entry.path().display(), "removing files of an uncommitted upload or a cleaned job");
            let _ = remove_dir_all_if_exists(&entry.path());
        }
    }
    for entry in std::fs::read_dir(&shared.results_dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let id = name
            .strip_suffix(".zip")
            .and_then(|id| id.parse::<i64>().ok());
        // Half-fetched results (`*.part`) and results of cleaned jobs.
        if id.is_none_or(|id| !known.contains(&id)) {
            let _ = std::fs::remove_file(&path);
        }
    }
    shared.lifecycle.load_usage()?;
    let recovered = shared
        .lifecycle
        .recover_at_start(|base| shared.clients.id_of(base))?;
    let shared = shared.clone();
    let performing = shared.clone();
    shared
        .job_tasks
        .spawn(async move { effects::perform(&performing, recovered.effects).await });
    Ok(recovered.resend)
}

/// Runs `work` (a database call) on the blocking pool, at most `limit`: `None` past it.
async fn within<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(value)) => Some(value),
        _ => None,
    }
}

/// The cluster of the shared database (only called where there is one).
fn cluster(shared: &Shared) -> &dyn Cluster {
    shared
        .store
        .cluster()
        .expect("a campaign runs on a shared database")
}

/// Campaigns for the lease for ever: stands by until it can take it, leads until it loses
/// it, and again. The term in force when the server stops is given back by `stop`.
pub async fn campaign(shared: Arc<Shared>, term_out: Arc<std::sync::Mutex<Option<(Term, i64)>>>) {
    let timeout = shared.config.leader_timeout;
    let every = timeout / 3;
    let me = shared.role.name.clone();
    loop {
        cluster(&shared).fence(0);
        let (s, name) = (shared.clone(), me.clone());
        let taken = within(timeout, move || cluster(&s).try_lead(&name, timeout)).await;
        let lease = match taken {
            Some(Ok(Some(lease))) => lease,
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(error = %e, "cannot campaign for the lease");
                }
                tokio::time::sleep(every).await;
                continue;
            }
        };
        // Renewals count from before the call that took it.
        let mut renewed_at = Instant::now() - Duration::from_millis(1);
        cluster(&shared).fence(lease.epoch);
        shared.lifecycle.lead();
        crate::lock(&shared.in_flight).clear();
        shared.role.set(RoleState {
            leading: true,
            leader: Some(me.clone()),
            since_ms: lease.since_ms,
            epoch: Some(lease.epoch),
        });
        metrics::counter!("jobrelay_server_lease_taken_total").increment(1);
        tracing::warn!(epoch = lease.epoch, server = %me, "took the lease: this server leads");
        let s = shared.clone();
        let term = match tokio::task::spawn_blocking(move || start_term(&s)).await {
            Ok(Ok(term)) => term,
            other => {
                let why = match other {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "it panicked".into(),
                };
                tracing::error!(why, "could not start leading; standing by");
                shared.lifecycle.stand_by();
                continue;
            }
        };
        *crate::lock(&term_out) = Some((term, lease.epoch));
        let why = hold(&shared, &me, lease.epoch, &mut renewed_at).await;
        cluster(&shared).fence(0);
        let Some((term, _)) = crate::lock(&term_out).take() else {
            return;
        };
        tracing::error!(
            epoch = lease.epoch,
            why,
            "lost the lease: this server stands by"
        );
        term.end(&shared).await;
        shared.role.set(RoleState {
            leading: false,
            epoch: Some(lease.epoch),
            ..RoleState::default()
        });
    }
}

/// Renews the lease of `epoch` until it is lost; returns why.
async fn hold(shared: &Arc<Shared>, me: &str, epoch: i64, renewed_at: &mut Instant) -> String {
    let timeout = shared.config.leader_timeout;
    let every = timeout / 3;
    let refusals = cluster(shared).refusals();
    loop {
        let refused = refusals.notified();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = refused => return "a job-state write was refused: another server leads".into(),
        }
        let left = timeout.saturating_sub(renewed_at.elapsed());
        if left.is_zero() {
            return format!("not renewed within {timeout:?}");
        }
        let attempt = Instant::now();
        let (s, name) = (shared.clone(), me.to_owned());
        match within(left, move || cluster(&s).renew(&name, epoch, timeout)).await {
            Some(Ok(true)) => *renewed_at = attempt,
            Some(Ok(false)) => return "the lease was taken by another server".into(),
            Some(Err(e)) => tracing::warn!(error = %e, "cannot renew the lease"),
            None => {}
        }
        if renewed_at.elapsed() >= timeout {
            return format!("not renewed within {timeout:?}");
        }
    }
}

/// Every server: its heartbeat, and what it knows of the leader when it is not one.
pub async fn heartbeat(shared: Arc<Shared>, url: String) {
    let every = (shared.config.leader_timeout / 3).min(Duration::from_secs(1));
    loop {
        let (s, url) = (shared.clone(), url.clone());
        let known = within(shared.config.leader_timeout, move || {
            let cluster = cluster(&s);
            cluster.heartbeat(&s.role.name, &url, s.role.started_ms)?;
            cluster.lease()
        })
        .await;
        if let Some(Ok(lease)) = known {
            let role = shared.role.get();
            if !role.leading {
                shared.role.set(RoleState {
                    leading: false,
                    leader: lease.holder.filter(|_| lease.live),
                    since_ms: lease.since_ms.filter(|_| lease.live),
                    epoch: Some(lease.epoch),
                });
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Every server: acts on the notices of other servers' commits.
pub async fn follow_notices(
    shared: Arc<Shared>,
    notices: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Notice>>>,
) {
    let mut notices = notices.lock().await;
    while let Some(notice) = notices.recv().await {
        match notice {
            Notice::Changed(id) => shared.store.changed_elsewhere(id),
            Notice::New(id) => {
                shared.store.changed_elsewhere(id);
                if shared.lifecycle.leading() {
                    let s = shared.clone();
                    let _ = tokio::task::spawn_blocking(move || s.lifecycle.learned_of(id)).await;
                }
            }
            Notice::Terminate(id) => {
                if shared.lifecycle.leading() {
                    let s = shared.clone();
                    shared
                        .job_tasks
                        .spawn(async move { carry_out_terminate(&s, id).await });
                }
            }
            Notice::Listening => {
                // What was sent while the connection was down is lost: everyone looks again.
                shared.store.wake_all();
                if shared.lifecycle.leading() {
                    let s = shared.clone();
                    shared
                        .job_tasks
                        .spawn(async move { catch_up_once(&s).await });
                }
            }
        }
    }
}

/// A terminate request a standby committed, carried out by the leader.
async fn carry_out_terminate(shared: &Arc<Shared>, id: i64) {
    match stop::terminate(shared, id).await {
        Ok(_) => {
            let s = shared.clone();
            if let Some(Err(e)) = within(Duration::from_secs(10), move || {
                cluster(&s).forget_terminate(id)
            })
            .await
            {
                tracing::warn!(job = id, error = %e, "cannot forget a terminate request");
            }
        }
        Err(e) => {
            tracing::warn!(job = id, error = %e, "a terminate request failed; tried again later")
        }
    }
}

/// The leader reads the database for what it may not have been told: Queued jobs and
/// terminate requests.
async fn catch_up_once(shared: &Arc<Shared>) {
    let s = shared.clone();
    let found = tokio::task::spawn_blocking(move || {
        s.lifecycle.catch_up()?;
        cluster(&s).terminate_requests()
    })
    .await;
    match found {
        Ok(Ok(requests)) => {
            for id in requests {
                carry_out_terminate(shared, id).await;
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot catch up with the database"),
        Err(_) => {}
    }
}

/// The leader's loop of [`catch_up_once`].
async fn catch_up(shared: Arc<Shared>) {
    loop {
        supervise::fault_point("catch-up");
        catch_up_once(&shared).await;
        tokio::time::sleep(CATCH_UP_EVERY).await;
    }
}
