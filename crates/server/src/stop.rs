//! Stopping runs on clients: a terminate request carried to the job's client (its partial
//! results kept), and the runs the server gave away while their client was unreachable,
//! killed there once it answers again. The state changes are the lifecycle's events.

use std::sync::Arc;
use std::time::Duration;

use crate::clients::ClientHandle;
use crate::gateway::{self, Failure, Killed};
use crate::lifecycle::Effect;
use crate::results::{fetch_partial, Partial};
use crate::store::{Job, JobStatus};
use crate::Shared;

/// Kills on `client` the runs the server gave away while it could not be reached (see
/// [`crate::lifecycle::Lifecycle::run_abandoned`]), now that it answers. Each is looked at first: only a payload that
/// still carries the abandoned run's key is killed (a client whose records went back may have
/// given its id to another job); a finished one is released, its result never taken. A run
/// stays recorded until this is done, across restarts of the server.
pub async fn kill_abandoned(shared: &Arc<Shared>, client: &Arc<ClientHandle>) {
    let runs = match shared.store.abandoned_on(client.base()) {
        Ok(runs) => runs,
        Err(e) => {
            tracing::error!(error = %e, "cannot list abandoned runs");
            return;
        }
    };
    for run in runs {
        let job = match shared.store.get(run.job_id) {
            Ok(Some(job)) => job,
            Ok(None) => {
                let _ = shared.store.forget_abandoned(client.base(), run.dest_id);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the job of an abandoned run");
                return;
            }
        };
        if run.key.is_none() {
            // A client without dispatch keys (seed contract): its payload id cannot be told
            // from one a wiped client handed out again, and a kill might reach another job's
            // run. Better left than killed wrongly (RELIABILITY.md).
            tracing::info!(
                job = run.job_id,
                dest = run.dest_id,
                "a run given away on a client without keys is not killed"
            );
            let _ = shared.store.forget_abandoned(client.base(), run.dest_id);
            continue;
        }
        // Checked against the job as it was when the run was given away.
        let as_sent = Job {
            dest_id: Some(run.dest_id),
            dispatch_key: run.key.clone(),
            node: None,
            ..job
        };
        let done = match crate::collector::look_at(shared, client, &as_sent).await {
            crate::collector::Looked::Ours(state) if state.is_finished() => {
                tracing::info!(job = run.job_id, dest = run.dest_id, %state, "a run given away ended meanwhile; its result is not taken");
                gateway::release(shared, client, run.dest_id).await;
                true
            }
            crate::collector::Looked::Ours(_) => {
                match gateway::kill(shared, client, run.dest_id).await {
                    Killed::Done | Killed::Finished => {
                        tracing::warn!(
                            job = run.job_id,
                            dest = run.dest_id,
                            client = client.base(),
                            "killed a run the server had given away while the client was unreachable"
                        );
                        gateway::release(shared, client, run.dest_id).await;
                        true
                    }
                    // A seed-contract client cannot kill: nothing more to do.
                    Killed::Unsupported(_) => true,
                    Killed::Failed { why, .. } => {
                        tracing::warn!(
                            job = run.job_id,
                            error = why,
                            "could not kill a run given away; will try again"
                        );
                        false
                    }
                }
            }
            crate::collector::Looked::NotThere(_) => true,
            crate::collector::Looked::Unknown(why) => {
                tracing::info!(
                    job = run.job_id,
                    why,
                    "abandoned run not checked; will try again"
                );
                false
            }
        };
        if !done {
            // Tried again the next time the client answers; the other runs are still tried.
            continue;
        }
        if let Err(e) = shared.store.forget_abandoned(client.base(), run.dest_id) {
            tracing::error!(error = %e, "could not forget an abandoned run");
        }
    }
}

/// What `/terminate` did.
pub enum Terminated {
    Done(Job),
    AlreadyFinished(Job),
    NotFound,
    /// A standby passed the request on to the leader, which had not carried it out yet
    /// when the wait was over (the job as it was then).
    Requested(Job),
}

/// Longest wait of a standby for the leader to carry out a terminate request.
const REQUEST_WAIT: Duration = Duration::from_secs(30);

/// Cancels a job wherever it is, from any server: the leader does it; a standby commits a
/// request the leader acts on (told by a notification, or finding it when it takes over)
/// and waits for the job's end.
pub async fn terminate_from_any_server(
    shared: &Arc<Shared>,
    id: i64,
) -> anyhow::Result<Terminated> {
    let Some(cluster) = shared
        .store
        .cluster()
        .filter(|_| !shared.lifecycle.leading())
    else {
        return terminate(shared, id).await;
    };
    let watch = shared.store.watch(id);
    let deadline = tokio::time::Instant::now() + REQUEST_WAIT;
    let mut requested = false;
    loop {
        let notified = watch.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(job) = shared.store.get(id)? else {
            return Ok(Terminated::NotFound);
        };
        if job.status.is_finished() {
            return Ok(match (requested, job.status) {
                (true, JobStatus::Killed) => Terminated::Done(job),
                _ => Terminated::AlreadyFinished(job),
            });
        }
        if !requested {
            cluster.request_terminate(id)?;
            requested = true;
            continue;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(Terminated::Requested(job));
        }
    }
}

/// Cancels a job wherever it is.
pub async fn terminate(shared: &Arc<Shared>, id: i64) -> anyhow::Result<Terminated> {
    // A job may move while we look at it; retry with its new state.
    for _ in 0..10 {
        let Some(job) = shared.store.get(id)? else {
            return Ok(Terminated::NotFound);
        };
        match job.status {
            JobStatus::Queued => {
                let done = shared.lifecycle.terminated(
                    &job,
                    &[JobStatus::Queued],
                    "terminated while queued; never sent to a client".into(),
                    false,
                )?;
                if let Some(done) = done {
                    return Ok(Terminated::Done(done));
                }
            }
            JobStatus::Processing => {
                // The dispatcher sees the change when it records the submission, and kills
                // the payload it just created.
                let done = shared.lifecycle.terminated(
                    &job,
                    &[JobStatus::Processing],
                    "terminated while being sent to a client".into(),
                    false,
                )?;
                if let Some(done) = done {
                    return Ok(Terminated::Done(done));
                }
            }
            JobStatus::Submitted | JobStatus::Running => {
                if let Some(done) = terminate_on_client(shared, &job).await? {
                    return Ok(done);
                }
            }
            _ => return Ok(Terminated::AlreadyFinished(job)),
        }
    }
    anyhow::bail!("job {id} kept changing state; try again")
}

async fn terminate_on_client(
    shared: &Arc<Shared>,
    job: &Job,
) -> anyhow::Result<Option<Terminated>> {
    let client = shared.client_of(job.client.as_deref());
    let (Some(client), Some(dest)) = (client, job.dest_id) else {
        let done = shared.lifecycle.terminated(
            job,
            &JobStatus::ON_CLIENT,
            "terminated; its client is no longer configured".into(),
            false,
        )?;
        return Ok(done.map(Terminated::Done));
    };
    if let crate::collector::Looked::NotThere(why) =
        crate::collector::look_at(shared, &client, job).await
    {
        // Another job's run holds that payload id now (the client's records went back), or
        // the client lost it: there is nothing of this job to stop, and nothing to kill.
        let done = shared.lifecycle.terminated(
            job,
            &JobStatus::ON_CLIENT,
            format!("terminated; its run on the client was lost: {why}"),
            false,
        )?;
        return Ok(done.map(Terminated::Done));
    }
    // A run the client could not be told to stop (unreachable, or failing with a 5xx) is
    // remembered with Killed, so it is killed there once the client answers again; a client
    // that does not know `/kill` (404/405, seed contract) is not asked again.
    let (message, abandon_run) = match gateway::kill(shared, &client, dest).await {
        Killed::Done => ("terminated by request".to_owned(), false),
        Killed::Finished => {
            // It finished on the client first: take its real outcome.
            crate::collector::check_job(shared.clone(), client.clone(), job.clone()).await;
            let now = shared.store.get(job.id)?.expect("job exists");
            if now.status.is_finished() {
                return Ok(Some(Terminated::AlreadyFinished(now)));
            }
            // Someone else is fetching its outcome; look again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(None);
        }
        Killed::Unsupported(why) => (
            format!("terminated; the client could not stop it ({why})"),
            false,
        ),
        Killed::Failed {
            failure: Failure::Answered(status),
            why,
        } => (
            format!("terminated; the client could not stop it ({why})"),
            status.is_server_error(),
        ),
        Killed::Failed {
            failure: Failure::Unreachable(_),
            why,
        } => (
            format!("terminated; the client could not be reached to stop it: {why}"),
            true,
        ),
    };
    // Not over a stored result before Killed is committed: a completion racing this one
    // (its whole ZIP stored, then Completed) keeps its ZIP.
    let partial = fetch_partial(shared, &client, job).await;
    let done = shared
        .lifecycle
        .terminated(job, &JobStatus::ON_CLIENT, message, abandon_run)?;
    Ok(match done {
        Some(done) => {
            if let Partial::Held(held) = partial {
                held.replace(&shared.result_path(job.id)).await;
            }
            let effects = vec![
                Effect::DropInputs {
                    id: job.id,
                    with_commit: false,
                },
                Effect::Release {
                    client: client.base().to_owned(),
                    dest,
                },
            ];
            crate::effects::perform(shared, effects).await;
            Some(Terminated::Done(done))
        }
        None => {
            // A final state committed with its ZIP in the database (a completion that won,
            // or the collector's Killed) is the job's result: the partial file put in place
            // before would only take room until the janitor.
            if matches!(partial, Partial::Placed) && shared.store.result_zip(job.id)?.is_some() {
                let _ = tokio::fs::remove_file(shared.result_path(job.id)).await;
            }
            // The collector saw the kill first and recorded it: still our doing.
            let now = shared.store.get(job.id)?.expect("job exists");
            (now.status == JobStatus::Killed).then_some(Terminated::Done(now))
        }
    })
}
