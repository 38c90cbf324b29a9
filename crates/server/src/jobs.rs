//! Job state changes that touch the store, the scheduler and the files together. The order
//! is always: commit the new state, then free the quota and wake the dispatcher.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::clients::ClientHandle;
use crate::gateway::{self, Download, Failure, Killed};
use crate::scheduler::ServiceId;
use crate::store::{Change, Job, JobStatus};
use crate::Shared;

/// Longest wait before a job that could not be sent is offered to the scheduler again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The job's run ended here: its transition out of the run committed. Frees its quota and
/// forgets the failed checks of that run. Only after a transition that happened: a change
/// that found the job elsewhere (`Ok(None)`) may be a late word about an old run, and the
/// slot and the check failures are the new run's.
fn free_slot(shared: &Shared, id: i64) {
    forget_checks(shared, id);
    if crate::lock(&shared.sched).finish(id) {
        shared.wake.notify_one();
    }
}

/// Forgets since when the checks of the job's run have been failing (the collector's
/// `fetch_failures`): that run is over, and the next one starts with a clean slate.
fn forget_checks(shared: &Shared, id: i64) {
    crate::lock(&shared.fetch_failures).remove(&id);
}

/// Ends a job as Failed with `reason`, from any of `from`.
pub fn fail(shared: &Shared, job: &Job, from: &[JobStatus], reason: String) {
    match shared
        .store
        .transition(job.id, from, JobStatus::Failed, Change::message(reason))
    {
        Ok(Some(_)) => free_slot(shared, job.id),
        // The job is no longer in `from`: someone else moved it, maybe into a new run.
        Ok(None) => {}
        Err(e) => tracing::error!(job = job.id, error = %e, "could not record failure"),
    }
}

/// The job's run was lost (client unreachable, restarted, lost its data; or the job could
/// not be sent): queue it again, after `delay`, or fail it once `max_attempts` are used up.
pub fn requeue(shared: &Arc<Shared>, job: &Job, from: &[JobStatus], reason: &str, delay: Duration) {
    requeue_inner(shared, job, from, reason, delay, false, false)
}

/// [`requeue`] for a run the server gives away while its client cannot be reached: the run
/// may still go on there, so it is recorded (in the same commit) to be killed as soon as the
/// client answers again ([`kill_abandoned`]); its late result is never taken, since the job
/// no longer points at that payload.
pub fn requeue_abandoned(shared: &Arc<Shared>, job: &Job, reason: &str) {
    requeue_inner(
        shared,
        job,
        &JobStatus::ON_CLIENT,
        reason,
        Duration::ZERO,
        false,
        true,
    )
}

/// [`requeue`] for a send the client refused for lack of room (507): the job never ran, so
/// the attempt is given back and cannot make the job fail.
pub fn requeue_not_counted(
    shared: &Arc<Shared>,
    job: &Job,
    from: &[JobStatus],
    reason: &str,
    delay: Duration,
) {
    requeue_inner(shared, job, from, reason, delay, true, false)
}

fn requeue_inner(
    shared: &Arc<Shared>,
    job: &Job,
    from: &[JobStatus],
    reason: &str,
    delay: Duration,
    refund: bool,
    abandon_run: bool,
) {
    if !refund && job.attempts >= shared.config.max_attempts {
        let change = Change {
            message: Some(format!(
                "gave up after {} attempts; last: {reason}",
                job.attempts
            )),
            abandon_run,
            ..Default::default()
        };
        match shared
            .store
            .transition(job.id, from, JobStatus::Failed, change)
        {
            Ok(Some(_)) => free_slot(shared, job.id),
            Ok(None) => {}
            Err(e) => tracing::error!(job = job.id, error = %e, "could not record failure"),
        }
        return;
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
        ..Default::default()
    };
    match shared
        .store
        .transition(job.id, from, JobStatus::Queued, change)
    {
        Ok(Some(_)) => {}
        Ok(None) => return,
        Err(e) => {
            tracing::error!(job = job.id, error = %e, "could not queue job again");
            return;
        }
    }
    let Some(&service) = shared.service_ids.get(&job.service) else {
        return;
    };
    let (id, user) = (job.id, job.user_id);
    if delay.is_zero() {
        forget_checks(shared, id);
        // Freed and queued again under one lock: no other job of the user takes its place.
        let mut sched = crate::lock(&shared.sched);
        sched.finish(id);
        sched.push_front(service, user, id);
        drop(sched);
        shared.wake.notify_one();
    } else {
        // The quota is freed now; the job is offered again after the delay.
        free_slot(shared, id);
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay.min(MAX_BACKOFF)).await;
            offer_again(&shared, service, user, id);
        });
    }
}

/// Puts a job queued again after a delay back into the scheduler, if it is still Queued: a
/// job terminated meanwhile is Killed and must not take dispatch turns. The state is read
/// under the scheduler's lock, and `terminate` commits Killed before it takes that lock to
/// take the job out of its queue: either this sees Killed, or that finds the job queued.
fn offer_again(shared: &Shared, service: ServiceId, user: i64, id: i64) {
    let mut sched = crate::lock(&shared.sched);
    match shared.store.get(id) {
        Ok(Some(job)) if job.status == JobStatus::Queued => {}
        Ok(_) => return,
        // Offered anyway: the dispatcher's guarded Queued -> Processing refuses a job that
        // is no longer Queued, while a job left out would wait until the next start.
        Err(e) => tracing::error!(job = id, error = %e, "cannot read a job queued again"),
    }
    sched.push_front(service, user, id);
    drop(sched);
    shared.wake.notify_one();
}

/// Removes a finished job's uploaded files once its results (whole or partial) are stored:
/// they are in the result ZIP too, and may be large. Without stored results they stay, for
/// `/download_partial`, until the janitor.
pub async fn drop_inputs(shared: &Shared, id: i64) {
    if !shared.result_path(id).is_file() {
        return;
    }
    let dir = shared.job_dir(id);
    let _ = tokio::task::spawn_blocking(move || {
        jobrelay_common::fsutil::remove_dir_all_if_exists(&dir)
    })
    .await;
}

/// Backoff before sending a job again after `attempts` failed sends.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(6);
    (Duration::from_millis(500) * (1 << exp)).min(MAX_BACKOFF)
}

/// ZIP answers up to this size are gathered in memory and written, synced, checked and
/// renamed in one blocking call; larger ones are streamed to disk chunk by chunk. At most
/// `MAX_CONCURRENT_CHECKS` (64) are gathered at once: 16 MiB.
const SMALL_ZIP: usize = 256 * 1024;

/// Why a result ZIP was not stored.
#[derive(Debug)]
pub enum StoreError {
    /// The answer grew past the service's `max_result`; it was cut off there.
    TooLarge { limit: u64 },
    /// The server's disk is full (or the quota reached): worth trying again later.
    DiskFull(String),
    /// Anything else (a cut answer, a broken archive).
    Other(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::TooLarge { limit } => write!(
                f,
                "the result ZIP is larger than the service's max_result of {limit} bytes"
            ),
            StoreError::DiskFull(why) | StoreError::Other(why) => f.write_str(why),
        }
    }
}

impl From<String> for StoreError {
    fn from(why: String) -> Self {
        StoreError::Other(why)
    }
}

/// Why a check of a job on its client should be tried again later.
#[derive(Debug)]
pub struct CheckError {
    pub why: String,
    /// The results could not be stored for lack of disk space here: the run is fine, and
    /// is fetched again (with backoff, without a deadline) until space returns.
    pub disk_full: bool,
}

impl From<String> for CheckError {
    fn from(why: String) -> Self {
        CheckError {
            why,
            disk_full: false,
        }
    }
}

impl From<&str> for CheckError {
    fn from(why: &str) -> Self {
        why.to_owned().into()
    }
}

/// An I/O error while storing a ZIP, with what was being done.
fn io_error(what: String, e: std::io::Error) -> StoreError {
    let why = format!("{what}: {e}");
    if jobrelay_common::fsutil::is_disk_full(&e) {
        StoreError::DiskFull(why)
    } else {
        StoreError::Other(why)
    }
}

/// The largest result ZIP the job's service stores.
pub fn max_result(shared: &Shared, job: &Job) -> u64 {
    shared
        .config
        .services
        .get(&job.service)
        .map_or(crate::config::DEFAULT_MAX_RESULT, |s| s.max_result)
}

/// Streams a ZIP answer into `dest` through `dest.part`, checks it is a whole archive, and
/// renames it into place. Nothing is left at `dest` unless the archive is complete. An
/// answer longer than `limit` bytes is cut off as soon as it passes the limit (its part file
/// removed): no more than `limit` bytes of it ever reach the disk.
pub async fn store_zip(zip: Download, dest: &Path, limit: u64) -> Result<(), StoreError> {
    if zip.announced_len().is_some_and(|n| n > limit) {
        return Err(StoreError::TooLarge { limit });
    }
    // A name of its own: two fetches of one job (terminate and the collector) never share it.
    let part = dest.with_file_name(format!(
        "{}.{}.part",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        jobrelay_common::fsutil::unique_name("")
    ));
    let mut body = zip.into_stream();
    // The result of a short job is small: one blocking call instead of one per file
    // operation (create, each write, sync, open, rename) saves as many thread hand-overs.
    let mut head = Vec::new();
    let mut small = true;
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading the ZIP: {e}"))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(StoreError::TooLarge { limit });
        }
        head.extend_from_slice(&chunk);
        if head.len() > SMALL_ZIP {
            small = false;
            break;
        }
    }
    if small {
        let dest = dest.to_path_buf();
        return tokio::task::spawn_blocking(move || {
            let result = store_small_zip(&head, &part, &dest);
            if result.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            result
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    let result = async {
        let mut file = tokio::fs::File::create(&part)
            .await
            .map_err(|e| io_error(format!("create {}", part.display()), e))?;
        file.write_all(&head)
            .await
            .map_err(|e| io_error("writing the ZIP".into(), e))?;
        drop(head);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("reading the ZIP: {e}"))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(StoreError::TooLarge { limit });
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| io_error("writing the ZIP".into(), e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| io_error("writing the ZIP".into(), e))?;
        drop(file);
        let check = part.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&check).map_err(|e| e.to_string())?;
            check_zip(file)
        })
        .await
        .map_err(|e| e.to_string())??;
        tokio::fs::rename(&part, dest)
            .await
            .map_err(|e| io_error(format!("rename into {}", dest.display()), e))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    result
}

/// Checks an archive is whole: its central directory and each entry's header can be read
/// (which catches an archive cut inside its entries).
fn check_zip<R: std::io::Read + std::io::Seek>(reader: R) -> Result<(), String> {
    let mut archive = zip::ZipArchive::new(reader)
        .map_err(|e| format!("the ZIP is not a complete archive: {e}"))?;
    for i in 0..archive.len() {
        archive
            .by_index_raw(i)
            .map_err(|e| format!("the ZIP is not a complete archive: {e}"))?;
    }
    Ok(())
}

/// The blocking half of [`store_zip`] for an archive held in memory: check, write, sync,
/// rename.
fn store_small_zip(bytes: &[u8], part: &Path, dest: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    check_zip(std::io::Cursor::new(bytes))?;
    let mut file = std::fs::File::create(part)
        .map_err(|e| io_error(format!("create {}", part.display()), e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| io_error("writing the ZIP".into(), e))?;
    drop(file);
    std::fs::rename(part, dest).map_err(|e| io_error(format!("rename into {}", dest.display()), e))
}

/// Fetches the job's work directory as it is now from its client into the results, best
/// effort (used for Failed, Invalid and Killed jobs), before the final state is committed.
/// With `keep_existing` a result already stored is not replaced: the partial ZIP is put in
/// place only where there is none (atomically: a hard link fails if the name exists), else
/// held, for the caller to put in place once its final state is committed ([`Held`]).
pub async fn fetch_partial(
    shared: &Shared,
    client: &ClientHandle,
    job: &Job,
    keep_existing: bool,
) -> Option<Held> {
    let dest = job.dest_id?;
    let zip = match gateway::retrieve_partial(shared, client, dest).await {
        Ok(zip) => zip,
        Err(e) => {
            tracing::info!(job = job.id, error = %e, "no partial results from the client");
            return None;
        }
    };
    let limit = max_result(shared, job);
    let result = shared.result_path(job.id);
    if !keep_existing {
        if let Err(e) = store_zip(zip, &result, limit).await {
            tracing::warn!(job = job.id, error = %e, "partial results not stored");
        }
        return None;
    }
    // Beside the results, under a name a start-up removes if a crash leaves it.
    let staged = shared.results_dir.join(format!(
        "{}.partial-{}",
        job.id,
        jobrelay_common::fsutil::unique_name("")
    ));
    if let Err(e) = store_zip(zip, &staged, limit).await {
        tracing::warn!(job = job.id, error = %e, "partial results not stored");
        return None;
    }
    let held = Held(Some(staged.clone()));
    match tokio::fs::hard_link(&staged, &result).await {
        Ok(()) => None, // `held` is dropped: the staged name goes, the result stays.
        Err(e) => {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                tracing::info!(job = job.id, error = %e, "cannot link the partial ZIP into place");
            }
            Some(held)
        }
    }
}

/// A partial ZIP that found a result stored already (the whole ZIP of a completion racing
/// `terminate`, or one a lost run left): put it in place with [`Held::replace`] once the
/// job's final state is committed; dropped, it is removed. A completion renames its whole
/// ZIP into place (replacing a partial one) before it commits Completed and a partial one
/// replaces a stored result only after its Killed is committed, so a Completed job always
/// holds its whole ZIP.
pub struct Held(Option<std::path::PathBuf>);

impl Held {
    pub async fn replace(mut self, result: &Path) {
        let Some(path) = self.0.take() else { return };
        if let Err(e) = tokio::fs::rename(&path, result).await {
            tracing::warn!(error = %e, "partial results not stored");
            let _ = tokio::fs::remove_file(&path).await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Records a final state reported by the client (Failed, Invalid, Killed), after fetching
/// what the job left in its work directory.
pub async fn finish_on_client(
    shared: &Arc<Shared>,
    client: &ClientHandle,
    job: &Job,
    status: JobStatus,
    exit_code: Option<i32>,
    reason: Option<String>,
) {
    fetch_partial(shared, client, job, false).await;
    let message = reason.unwrap_or_else(|| match (status, exit_code) {
        (JobStatus::Failed, Some(code)) => format!("run.sh exited with code {code}"),
        (JobStatus::Invalid, _) => "the job has no usable run.sh".into(),
        (JobStatus::Killed, _) => "killed on the client".into(),
        _ => format!("{status} on the client"),
    });
    let change = Change {
        message: Some(message),
        exit_code: exit_code.map(Some),
        ..Default::default()
    };
    match shared
        .store
        .transition(job.id, &JobStatus::ON_CLIENT, status, change)
    {
        Ok(Some(_)) => {
            free_slot(shared, job.id);
            drop_inputs(shared, job.id).await;
            if let Some(dest) = job.dest_id {
                gateway::release(shared, client, dest).await;
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!(job = job.id, error = %e, "could not record final state"),
    }
}

/// Stores the result ZIP of a Completed payload, then marks the job Completed, then releases
/// the client's copy. Results over the service's `max_result` fail the job (nothing of them
/// is kept, the client's copy is released); other failures leave the job where it is for the
/// collector to fetch again.
pub async fn complete(
    shared: &Arc<Shared>,
    client: &ClientHandle,
    job: &Job,
    zip: Download,
) -> Result<(), CheckError> {
    let limit = max_result(shared, job);
    match store_zip(zip, &shared.result_path(job.id), limit).await {
        Ok(()) => {}
        Err(StoreError::TooLarge { limit }) => {
            tracing::warn!(
                job = job.id,
                limit,
                "result larger than max_result; not stored"
            );
            let reason = format!(
                "the job ran, but its results are larger than the service's max_result of \
                 {limit} bytes (after compression): nothing was stored"
            );
            let done = shared.store.transition(
                job.id,
                &JobStatus::ON_CLIENT,
                JobStatus::Failed,
                Change::message(reason),
            );
            match done {
                Ok(Some(_)) => {
                    free_slot(shared, job.id);
                    if let Some(dest) = job.dest_id {
                        gateway::release(shared, client, dest).await;
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(job = job.id, error = %e, "could not record failure"),
            }
            return Ok(());
        }
        Err(e) => {
            // The job stays where it is; the collector fetches again.
            tracing::warn!(job = job.id, error = %e, "result not stored; will fetch again");
            return Err(CheckError {
                disk_full: matches!(e, StoreError::DiskFull(_)),
                why: format!("the result ZIP could not be stored: {e}"),
            });
        }
    }
    let change = Change {
        message: Some("Job completed".into()),
        exit_code: Some(Some(0)),
        ..Default::default()
    };
    match shared
        .store
        .transition(job.id, &JobStatus::ON_CLIENT, JobStatus::Completed, change)
    {
        Ok(Some(_)) => {
            free_slot(shared, job.id);
            drop_inputs(shared, job.id).await;
            if let Some(dest) = job.dest_id {
                gateway::release(shared, client, dest).await;
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!(job = job.id, error = %e, "could not record completion"),
    }
    Ok(())
}

/// Kills on `client` the runs the server gave away while it could not be reached (see
/// [`requeue_abandoned`]), now that it answers. Each is looked at first: only a payload that
/// still carries the abandoned run's key is killed (a client whose records went back may have
/// given its id to another job); a finished one is released, its result never taken. A run
/// stays recorded until this is done, across restarts of the server.
pub async fn kill_abandoned(shared: &Arc<Shared>, client: &ClientHandle) {
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
                let done = shared.store.transition(
                    id,
                    &[JobStatus::Queued],
                    JobStatus::Killed,
                    Change::message("terminated while queued; never sent to a client"),
                )?;
                if let Some(done) = done {
                    forget_checks(shared, id);
                    if let Some(&service) = shared.service_ids.get(&job.service) {
                        crate::lock(&shared.sched).remove_queued(service, job.user_id, id);
                    }
                    return Ok(Terminated::Done(done));
                }
            }
            JobStatus::Processing => {
                // The dispatcher sees the change when it records the submission, and kills
                // the payload it just created.
                let done = shared.store.transition(
                    id,
                    &[JobStatus::Processing],
                    JobStatus::Killed,
                    Change::message("terminated while being sent to a client"),
                )?;
                if let Some(done) = done {
                    free_slot(shared, id);
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
        let done = shared.store.transition(
            job.id,
            &JobStatus::ON_CLIENT,
            JobStatus::Killed,
            Change::message("terminated; its client is no longer configured"),
        )?;
        return Ok(done.map(|d| {
            free_slot(shared, job.id);
            Terminated::Done(d)
        }));
    };
    if let crate::collector::Looked::NotThere(why) =
        crate::collector::look_at(shared, &client, job).await
    {
        // Another job's run holds that payload id now (the client's records went back), or
        // the client lost it: there is nothing of this job to stop, and nothing to kill.
        let done = shared.store.transition(
            job.id,
            &JobStatus::ON_CLIENT,
            JobStatus::Killed,
            Change::message(format!("terminated; its run on the client was lost: {why}")),
        )?;
        return Ok(done.map(|d| {
            free_slot(shared, job.id);
            Terminated::Done(d)
        }));
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
    let held = fetch_partial(shared, &client, job, true).await;
    let done = shared.store.transition(
        job.id,
        &JobStatus::ON_CLIENT,
        JobStatus::Killed,
        Change {
            abandon_run,
            ..Change::message(message)
        },
    )?;
    Ok(match done {
        Some(done) => {
            free_slot(shared, job.id);
            if let Some(held) = held {
                held.replace(&shared.result_path(job.id)).await;
            }
            drop_inputs(shared, job.id).await;
            gateway::release(shared, &client, dest).await;
            Some(Terminated::Done(done))
        }
        None => {
            // The collector saw the kill first and recorded it: still our doing.
            let now = shared.store.get(job.id)?.expect("job exists");
            (now.status == JobStatus::Killed).then_some(Terminated::Done(now))
        }
    })
}
