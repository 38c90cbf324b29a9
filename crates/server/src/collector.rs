//! Follows the jobs on each client to their end.
//!
//! Towards a client with the change feed (`/info` lists `events`), one long-poll of
//! `/events` per client tells at once which payload changed; towards a client without it,
//! every job there is checked with `/retrieve/{id}` each poll interval. Either way a check of
//! one job is [`check_job`]: `/retrieve` answers a ZIP once the payload is Completed (stored,
//! then the job is Completed, then the client's copy released), or the record otherwise.
//!
//! A run is lost, and the job queued again, when the client answers 404 for it, reports it
//! Failed with reason "client restarted", reports a different node (its data directory was
//! lost) or another dispatch key for its payload id (its records went back: [`same_run`]),
//! or stays unreachable longer than the client timeout. In that last case the run may still
//! be there: it is recorded as abandoned and killed once the client answers again
//! ([`crate::stop::kill_abandoned`]).

use std::sync::Arc;
use std::time::Duration;

use jobrelay_common::protocol::PayloadStatus;

use crate::clients::ClientHandle;
use crate::gateway::{self, Retrieved};
use crate::results::{self, CheckError};
use crate::store::{Job, JobStatus};
use crate::Shared;

/// Pause after a failed request before the next one.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Serves the checks the effects ask for ([`crate::shared::CheckRequests`]): each runs as
/// [`check_job`] on its own task.
pub async fn serve_check_requests(shared: Arc<Shared>) {
    let serving = shared.clone();
    serving
        .check_requests
        .serve(|job| {
            if let Some(client) = shared.client_of(job.client.as_deref()) {
                shared
                    .job_tasks
                    .spawn(check_job(shared.clone(), client, job));
            }
        })
        .await;
}

/// Follows one client forever.
pub async fn watch(shared: Arc<Shared>, client: Arc<ClientHandle>) {
    // Wait for the first probe, to know whether the client has the change feed.
    loop {
        let waiting = client.first_probe.notified();
        if client.known() {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), waiting).await;
    }
    let mut feed = Feed::default();
    loop {
        crate::supervise::fault_point("collector");
        if client.has("events") {
            events_round(&shared, &client, &mut feed).await;
        } else {
            feed.instance = None;
            poll_round(&shared, &client).await;
            tokio::time::sleep(shared.config.poll_interval).await;
        }
    }
}

#[derive(Default)]
struct Feed {
    instance: Option<String>,
    after: u64,
}

async fn events_round(shared: &Arc<Shared>, client: &Arc<ClientHandle>, feed: &mut Feed) {
    // Until the feed's instance is known (first call, or after the client went away) ask
    // without waiting: a restarted client of an older version holds the call for the whole
    // wait before saying that our sequence number is from its previous instance.
    let long_poll = feed.instance.is_some();
    let page = match gateway::events(shared, client, feed.after, long_poll).await {
        Ok(page) => page,
        Err(_) => {
            check_unreachable(shared, client);
            // Whatever happened meanwhile is learnt by reconciling once it answers again.
            if feed.instance.take().is_some() {
                client.early.gap();
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            return;
        }
    };
    let restarted = feed.instance.as_deref() != Some(page.instance.as_str());
    if restarted || page.truncated {
        if restarted && feed.instance.is_some() {
            tracing::info!(
                client = client.base(),
                "client restarted; reconciling its jobs"
            );
        }
        client.set_node(&page.node);
        // Before the listing: a job committed after it, with news in the events skipped
        // here, must be looked at by its dispatcher.
        client.early.gap();
        if reconcile(shared, client) {
            feed.instance = Some(page.instance.clone());
            feed.after = page.next;
        } else {
            // The database did not answer: reconcile again at the next round.
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        return;
    }
    let read_from = feed.after;
    feed.after = page.next;
    for event in page.events {
        if matches!(
            event.status,
            PayloadStatus::Prepared | PayloadStatus::Unknown
        ) {
            // Nothing to act on, so no lookup (one read of the database per job saved) and no
            // note (the dispatcher's look is not needed for it).
            continue;
        }
        let dest = event.id as i64;
        let looked_up = client
            .early
            .note_unless_known(dest, || shared.store.by_dest(client.base(), dest));
        let job = match looked_up {
            Ok(Some(job)) if JobStatus::ON_CLIENT.contains(&job.status) => job,
            Ok(_) => continue,
            Err(e) => {
                // The database did not answer (it restarts, say): the page is read again
                // (what was done for its first events is done again harmlessly), so no
                // end of a run goes unseen.
                tracing::warn!(client = client.base(), error = %e, "cannot look up a payload's job; reading the client's events again");
                feed.after = read_from;
                tokio::time::sleep(RETRY_PAUSE).await;
                return;
            }
        };
        match event.status {
            PayloadStatus::Prepared | PayloadStatus::Unknown => {}
            PayloadStatus::Running => shared.lifecycle.running(&job),
            _ => {
                // The payload no longer takes a slot there: the next job may go while
                // this one's results are fetched (its quotas stay taken until then).
                if event.status.is_finished() {
                    shared.lifecycle.left_client(job.id);
                }
                shared
                    .job_tasks
                    .spawn(check_job(shared.clone(), client.clone(), job));
            }
        }
    }
}

/// Checks every job on the client (after a restart of the client or of the feed); `false`
/// when the database could not list them (to be tried again).
fn reconcile(shared: &Arc<Shared>, client: &Arc<ClientHandle>) -> bool {
    match shared.store.on_client(client.base()) {
        Ok(list) => {
            for job in list {
                shared
                    .job_tasks
                    .spawn(check_job(shared.clone(), client.clone(), job));
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot list jobs on client; trying again");
            false
        }
    }
}

async fn poll_round(shared: &Arc<Shared>, client: &Arc<ClientHandle>) {
    reconcile(shared, client);
}

/// Requeues the jobs of a client that has been unreachable longer than the client timeout.
pub fn check_unreachable(shared: &Arc<Shared>, client: &ClientHandle) {
    let Some(down) = client.unreachable_for() else {
        return;
    };
    if down < shared.config.client_timeout {
        return;
    }
    let Ok(list) = shared.store.on_client(client.base()) else {
        return;
    };
    for job in list {
        let effects = shared.lifecycle.run_abandoned(
            &job,
            &format!(
                "client {} unreachable for {:.1}s (timeout {:.1}s); its run there will be \
                 killed once it answers again",
                client.base(),
                down.as_secs_f64(),
                shared.config.client_timeout.as_secs_f64()
            ),
        );
        let performing = shared.clone();
        shared
            .job_tasks
            .spawn(async move { crate::effects::perform(&performing, effects).await });
    }
}

/// Removes the job from the in-flight map if the checks end early (an error, a panic, a
/// cancelled task); a normal end removes it under the same lock as its last look for a new
/// request (see [`check_job`]) and disarms this.
struct InFlight<'a>(&'a Shared, i64, bool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.2 {
            crate::lock(&self.0.in_flight).remove(&self.1);
        }
    }
}

/// Asks the client where one job is and acts on the answer. At most one check per job runs
/// at a time; a check asked for while one runs makes that one check again when it is done,
/// so no news is lost between its request and its end.
pub async fn check_job(shared: Arc<Shared>, client: Arc<ClientHandle>, job: Job) {
    {
        let mut in_flight = crate::lock(&shared.in_flight);
        if let Some(again) = in_flight.get_mut(&job.id) {
            *again = true;
            return;
        }
        in_flight.insert(job.id, false);
    }
    let mut guard = InFlight(&shared, job.id, true);
    let Ok(permit) = shared.checks.acquire().await else {
        return;
    };
    let mut outcome;
    loop {
        outcome = check_once(&shared, &client, job.id).await;
        let mut in_flight = crate::lock(&shared.in_flight);
        match in_flight.get_mut(&job.id) {
            Some(again) if *again => *again = false,
            _ => {
                // Under the lock that a new request takes to set `again`: a request either
                // came before (and made this loop check again) or finds no check running
                // and starts its own. None falls in between and is lost.
                in_flight.remove(&job.id);
                guard.2 = false;
                break;
            }
        }
    }
    drop(permit);
    drop(guard);
    match outcome {
        Ok(()) => shared.lifecycle.check_succeeded(job.id),
        Err(error) => retry_later(shared, client, job, error),
    }
}

/// A check that failed short of the client being unreachable (an error answer, a broken
/// ZIP): check again with backoff, and fail the job once this has lasted longer than the
/// client timeout (a work directory that cannot be archived must not stay Running forever).
/// A disk full here is not the job's fault: it is fetched again (backoff up to 10 s) for as
/// long as it lasts, and the deadline starts again after it.
fn retry_later(shared: Arc<Shared>, client: Arc<ClientHandle>, job: Job, error: CheckError) {
    let why = error.why;
    let (since, tries) = shared
        .lifecycle
        .check_failed(job.id, error.disk_full || error.store_down);
    if error.disk_full && tries == 1 {
        tracing::warn!(
            job = job.id,
            "no disk space for the job's results; fetching them again until there is"
        );
    }
    if since.elapsed() > shared.config.client_timeout {
        shared.lifecycle.failed(
            &job,
            &JobStatus::ON_CLIENT,
            format!(
                "its state or results could not be fetched from {} for {}s: {why}",
                client.base(),
                since.elapsed().as_secs()
            ),
        );
        return;
    }
    let delay = results::backoff(tries);
    let checking = shared.clone();
    shared.job_tasks.spawn(async move {
        tokio::time::sleep(delay).await;
        check_job(checking, client, job).await;
    });
}

/// Acts on what the client says of one job. `Err` when it should be asked again later.
async fn check_once(
    shared: &Arc<Shared>,
    client: &Arc<ClientHandle>,
    id: i64,
) -> Result<(), CheckError> {
    let (shared, client) = (shared.clone(), client.clone());
    // Read again: the job may have moved since it was listed.
    let job = match shared.store.get(id) {
        Ok(Some(job)) if JobStatus::ON_CLIENT.contains(&job.status) => job,
        Ok(_) => return Ok(()),
        Err(e) => {
            return Err(CheckError {
                why: format!("the job could not be read from the database: {e:#}"),
                disk_full: false,
                store_down: true,
            })
        }
    };
    let Some(dest) = job.dest_id else {
        return Ok(());
    };
    if let (Some(theirs), Some(ours)) = (client.node(), job.node.as_deref()) {
        if theirs != ours {
            lost(
                &shared,
                &job,
                "the client lost its data directory (its node changed)",
            );
            return Ok(());
        }
    }
    let record = match gateway::retrieve(&shared, &client, dest).await {
        Retrieved::Unreachable(_) => {
            check_unreachable(&shared, &client);
            return Ok(());
        }
        Retrieved::NotFound(_) => {
            lost(&shared, &job, "the client no longer knows the payload");
            return Ok(());
        }
        Retrieved::Gone(_) => {
            lost(&shared, &job, "the client removed the payload's files");
            return Ok(());
        }
        Retrieved::Failed(why) => {
            tracing::warn!(job = job.id, why, "client could not tell the job's state");
            return Err(why.into());
        }
        Retrieved::Zip(zip) => {
            if let Err(why) = same_run(&client, &job, zip.key, zip.node.as_deref()) {
                lost(&shared, &job, &why);
                return Ok(());
            }
            return results::complete(&shared, &job, zip.body).await;
        }
        Retrieved::Record(record) => record,
    };
    if let Err(why) = same_run(
        &client,
        &job,
        Some(record.key.clone()),
        record.node.as_deref(),
    ) {
        lost(&shared, &job, &why);
        return Ok(());
    }
    match record.status {
        PayloadStatus::Prepared | PayloadStatus::Unknown => {}
        // Completed answers a ZIP; a record saying Completed is a race: ask again.
        PayloadStatus::Completed => {
            return Err("the client reported Completed without its ZIP".into())
        }
        PayloadStatus::Running => shared.lifecycle.running(&job),
        PayloadStatus::Cleaned => lost(
            &shared,
            &job,
            "the client removed the payload before its results were fetched",
        ),
        PayloadStatus::Failed if record.reason.as_deref() == Some("client restarted") => {
            lost(&shared, &job, "the client restarted while the job ran")
        }
        finished => {
            let status = match finished {
                PayloadStatus::Invalid => JobStatus::Invalid,
                PayloadStatus::Killed => JobStatus::Killed,
                _ => JobStatus::Failed,
            };
            results::finish_on_client(
                &shared,
                &client,
                &job,
                status,
                record.exit_code,
                record.reason,
            )
            .await;
        }
    }
    Ok(())
}

/// Whether what the client reports for the job's payload id is the job's run: the same node
/// and, towards a client with idempotency keys, the key of the job's dispatch. A client whose
/// data directory went back (a snapshot restored, records wiped with `node-id` kept) hands
/// out payload ids again, so the id alone may name another job's run, another user's even.
/// `their_key`: `None` when the answer does not say (a ZIP of a client without
/// `result_key`), `Some(None)` when it says the payload has no key.
pub fn same_run(
    client: &ClientHandle,
    job: &Job,
    their_key: Option<Option<String>>,
    their_node: Option<&str>,
) -> Result<(), String> {
    if let (Some(theirs), Some(ours)) = (their_node, job.node.as_deref()) {
        if theirs != ours {
            return Err("the client lost its data directory (its node changed)".into());
        }
    }
    let dest = job.dest_id.unwrap_or_default();
    match (client.has("key"), job.dispatch_key.as_deref(), their_key) {
        // The other key is not quoted: it names another job, maybe another user's.
        (true, Some(ours), Some(theirs)) if theirs.as_deref() != Some(ours) => Err(format!(
            "payload {dest} on {} is not this job's run ({}): the client's records went back \
             (restored or wiped) and it gave the id again",
            client.base(),
            if theirs.is_some() {
                "it carries another dispatch key"
            } else {
                "it carries no dispatch key"
            },
        )),
        _ => Ok(()),
    }
}

/// What a client says of one payload, checked against the run the server expects there.
pub enum Looked {
    /// The run expected, in this state (a ZIP answer is Completed).
    Ours(PayloadStatus),
    /// Another run holds that payload id, or the client no longer knows it: nothing of ours
    /// is there.
    NotThere(String),
    /// No usable answer (unreachable, an error answer).
    Unknown(String),
}

/// Asks the client about payload `job.dest_id` without acting on the job: the check made
/// before killing a payload, so a kill never reaches another job's run.
pub async fn look_at(shared: &Shared, client: &ClientHandle, job: &Job) -> Looked {
    let Some(dest) = job.dest_id else {
        return Looked::NotThere("the job has no payload".into());
    };
    let (state, key, node) = match gateway::look(shared, client, dest).await {
        Retrieved::Zip(zip) => (PayloadStatus::Completed, zip.key, zip.node),
        Retrieved::Record(record) => (record.status, Some(record.key), record.node),
        Retrieved::NotFound(why) | Retrieved::Gone(why) => return Looked::NotThere(why),
        Retrieved::Failed(why) | Retrieved::Unreachable(why) => return Looked::Unknown(why),
    };
    match same_run(client, job, key, node.as_deref()) {
        Ok(()) => Looked::Ours(state),
        Err(why) => Looked::NotThere(why),
    }
}

fn lost(shared: &Arc<Shared>, job: &Job, why: &str) {
    tracing::warn!(
        job = job.id,
        client = job.client.as_deref().unwrap_or(""),
        why,
        "run lost"
    );
    let effects = shared.lifecycle.run_lost(job, why);
    let performing = shared.clone();
    shared
        .job_tasks
        .spawn(async move { crate::effects::perform(&performing, effects).await });
}
