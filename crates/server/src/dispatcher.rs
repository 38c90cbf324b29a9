//! Sends the scheduler's decisions to clients.
//!
//! Woken by the lifecycle (upload, freed slot, finished job, client back), it asks it what may
//! go now, and for each job: `sending` commits Processing with a new attempt number and an
//! idempotency key `<server id>:<job id>:<attempt>`, the job's files go to the client's
//! `/submit` with that key, and `submitted` commits Submitted with the payload id and the
//! client's node. A server that dies in between sends again with the same key after
//! restart; a client with the `key` extension answers with the payload it already has.

use std::path::Path;
use std::sync::Arc;

use crate::clients::ClientHandle;
use crate::gateway::{self, FileBody, JobFile, Submitted};
use crate::lifecycle::{Effect, Effects};
use crate::results;
use crate::scheduler::Decision;
use crate::store::{InputFile, Job, JobStatus};
use crate::Shared;
use jobrelay_common::protocol::{PayloadRecord, PayloadStatus};

/// When this environment variable is set, the server exits right after a client accepted a
/// payload and before the payload's id is committed (used by the tests of restarts).
pub const CRASH_AFTER_SUBMIT: &str = "JOBRELAY_TEST_CRASH_AFTER_SUBMIT";
/// Milliseconds to wait at that same point (used by the test of terminate while sending).
pub const PAUSE_AFTER_SUBMIT: &str = "JOBRELAY_TEST_PAUSE_AFTER_SUBMIT_MS";

/// Runs forever: waits for a wake-up, dispatches what the scheduler decides.
pub async fn run(shared: Arc<Shared>) {
    loop {
        for decision in shared.lifecycle.decide() {
            shared.job_tasks.spawn(dispatch(shared.clone(), decision));
        }
        match shared.lifecycle.next_deadline() {
            // A job will have waited long enough for a client to be held for it.
            Some(after) => {
                let _ = tokio::time::timeout(after, shared.lifecycle.woken()).await;
            }
            None => shared.lifecycle.woken().await,
        }
    }
}

async fn dispatch(shared: Arc<Shared>, decision: Decision) {
    let Some(client) = shared.clients.get(decision.client) else {
        return;
    };
    // Terminated (or otherwise moved) since it was queued: nothing to send.
    if let Some(job) = shared.lifecycle.sending(&decision, client.base()) {
        send(&shared, &client, job, Delivery::NeverSent).await;
    }
}

/// Whether an earlier send of this dispatch (same key) may have reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// No request with this key has left the server yet, or none got as far as a connection.
    NeverSent,
    /// This many may have been received: the client may hold a payload under the key (a
    /// connection that broke mid-request or before its answer, a 503, the send of a server
    /// process that stopped).
    MaybeReceived(u32),
}

impl Delivery {
    /// After a send that failed: `reached` tells whether that one may have been received.
    fn after_failure(self, reached: bool) -> Delivery {
        match (self, reached) {
            (Delivery::MaybeReceived(n), true) => Delivery::MaybeReceived(n + 1),
            (Delivery::NeverSent, true) => Delivery::MaybeReceived(1),
            (earlier, false) => earlier,
        }
    }
}

/// Decides what follows a failed send of a job with a dispatch key: `false` when no request
/// may have reached the client (a new attempt is safe), else the same key is sent again later
/// (see [`send_again_when_back`]), or the job fails once `max_attempts` such sends went
/// unanswered: a new attempt could run it twice.
fn send_again(
    shared: &Arc<Shared>,
    client: &Arc<ClientHandle>,
    job: &Job,
    delivery: Delivery,
    why: &str,
) -> bool {
    let Delivery::MaybeReceived(sends) = delivery else {
        return false;
    };
    if sends >= shared.config.max_attempts {
        shared.lifecycle.failed(
            job,
            &[JobStatus::Processing],
            format!("gave up after {sends} sends that may have reached the client; last: {why}"),
        );
    } else {
        shared.job_tasks.spawn(send_again_when_back(
            shared.clone(),
            client.clone(),
            job.clone(),
            sends,
            why.to_owned(),
        ));
    }
    true
}

/// Most time between two looks at a client whose answer to a send never came.
const SEND_AGAIN_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// After a send whose outcome is unknown: waits for the client to answer its probes again and
/// sends the same dispatch (same key) once more, which the client answers with the payload it
/// already made, if any. Given up for a new attempt elsewhere once the client has been
/// unreachable for the client timeout, like a run lost there (RELIABILITY.md says what that
/// leaves). Stops when the job moved on meanwhile (terminated).
fn send_again_when_back(
    shared: Arc<Shared>,
    client: Arc<ClientHandle>,
    job: Job,
    sends: u32,
    why: String,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // Boxed: `send` spawns this and this calls `send`.
    Box::pin(async move {
        let mut wait = std::time::Duration::from_millis(100) * (1 << sends.min(4));
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(SEND_AGAIN_MAX_WAIT);
            match shared.store.get(job.id) {
                Ok(Some(now))
                    if now.status == JobStatus::Processing
                        && now.dispatch_key == job.dispatch_key => {}
                // Terminated, or moved on by a restart of the server: nothing of ours to do.
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(job = job.id, error = %e, "cannot read a job being sent");
                    continue;
                }
            }
            match client.unreachable_for() {
                None => {
                    tracing::info!(
                        job = job.id,
                        client = client.base(),
                        "sending again with the same key"
                    );
                    send(&shared, &client, job, Delivery::MaybeReceived(sends)).await;
                    return;
                }
                Some(down) if down >= shared.config.client_timeout => {
                    let why = format!(
                        "{why}; the client may have received it and stayed unreachable for \
                         {:.1}s (timeout {:.1}s)",
                        down.as_secs_f64(),
                        shared.config.client_timeout.as_secs_f64()
                    );
                    let effects =
                        shared
                            .lifecycle
                            .run_lost_from(&job, &[JobStatus::Processing], &why);
                    crate::effects::perform(&shared, effects).await;
                    return;
                }
                Some(_) => {}
            }
        }
    })
}

/// Sends a job that was Processing when the previous server process stopped, with the key
/// it had then.
pub async fn resend(shared: Arc<Shared>, job: Job) {
    match shared.client_of(job.client.as_deref()) {
        Some(client) => {
            // Give the client's first probe a moment, so its features are known.
            let waiting = client.first_probe.notified();
            if !client.known() {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
            }
            tracing::info!(
                job = job.id,
                client = client.base(),
                "sending again after restart"
            );
            send(&shared, &client, job, Delivery::MaybeReceived(1)).await;
        }
        None => {
            let effects = shared.lifecycle.run_lost_from(
                &job,
                &[JobStatus::Processing],
                "its client is no longer configured",
            );
            crate::effects::perform(&shared, effects).await;
        }
    }
}

/// Lists the regular files below `dir`, by name relative to it: a directory's files by
/// name, then its sub-directories, the last by name first (the order of a stack), each the
/// same way. [`in_listing_order`] gives the same order to files kept in the database.
fn files_of(dir: &Path) -> std::io::Result<Vec<JobFile>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, path)) = stack.pop() {
        let mut entries = std::fs::read_dir(&path)?.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push((format!("{name}/"), entry.path()));
            } else if kind.is_file() {
                out.push(JobFile {
                    name,
                    body: FileBody::Disk {
                        path: entry.path(),
                        len: entry.metadata()?.len(),
                    },
                });
            }
        }
    }
    Ok(out)
}

/// Sorts the files of an upload kept in the database into the order [`files_of`] would list
/// them from its directory, so a client's `/submit` is the same either way.
pub fn in_listing_order(files: &mut [InputFile]) {
    files.sort_by(|a, b| listing_order(&a.name, &b.name));
}

/// [`files_of`]'s order of two names of one upload (relative paths with '/'; never the same
/// name twice, nor a file where the other has a directory: `NameSet` refuses both). Where
/// they part: a file before a directory, files by name, directories the last first.
fn listing_order(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    match (a.get(common), b.get(common)) {
        (Some(x), Some(y)) => match (common + 1 == a.len(), common + 1 == b.len()) {
            (true, true) => x.cmp(y),
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => y.cmp(x),
        },
        _ => a.len().cmp(&b.len()),
    }
}

/// Why a job's files could not be had for a send.
enum Unlisted {
    /// The server is stopping (the blocking task was cancelled): the files are fine.
    Stopping(String),
    /// The database did not answer: worth trying again.
    Store(String),
    /// The job's directory could not be read.
    Unreadable(std::io::Error),
}

/// The job's files: those kept in the database with its row, else those of its directory,
/// read and sized in one blocking call (not one per operation).
async fn job_files(shared: &Arc<Shared>, id: i64) -> Result<Vec<JobFile>, Unlisted> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let kept = shared
            .store
            .input_files(id)
            .map_err(|e| Unlisted::Store(format!("{e:#}")))?;
        if !kept.is_empty() {
            return Ok(kept
                .into_iter()
                .map(|file| JobFile {
                    name: file.name,
                    body: FileBody::Kept(file.bytes),
                })
                .collect());
        }
        files_of(&shared.job_dir(id)).map_err(Unlisted::Unreadable)
    })
    .await
    .map_err(|e| {
        if e.is_cancelled() {
            Unlisted::Stopping(e.to_string())
        } else {
            // A panic: the job's files could not be read.
            Unlisted::Unreadable(std::io::Error::other(e))
        }
    })?
}

/// Streams the job's files to the client and records the payload it became.
async fn send(shared: &Arc<Shared>, client: &Arc<ClientHandle>, job: Job, delivery: Delivery) {
    let key = client
        .has("key")
        .then(|| job.dispatch_key.clone())
        .flatten();
    let files = match job_files(shared, job.id).await {
        Ok(files) => files,
        // The server is stopping: the job stays Processing and the next start sends it again
        // (with the same key), as after a crash. Failing it would lose a job that is whole.
        Err(Unlisted::Stopping(e)) => {
            tracing::warn!(job = job.id, error = %e, "send interrupted by the stop; resent at the next start");
            return;
        }
        // Its inputs may be in the database, which did not answer: a failed send, tried
        // again later, as when the client does not answer.
        Err(Unlisted::Store(e)) => {
            let why = format!("the job's files could not be read from the database: {e}");
            let effects = shared
                .lifecycle
                .send_failed(&job, &why, results::backoff(job.attempts));
            crate::effects::perform(shared, effects).await;
            return;
        }
        Err(Unlisted::Unreadable(e)) => {
            shared.lifecycle.failed(
                &job,
                &[JobStatus::Processing],
                format!("the job's files could not be read: {e}"),
            );
            return;
        }
    };
    let generation = client.early.generation();
    let record = match gateway::submit(shared, client, files, key.as_deref(), &job.resources).await
    {
        Submitted::Accepted(record) => record,
        Submitted::Refused { status, body } => {
            shared.lifecycle.failed(
                &job,
                &[JobStatus::Processing],
                format!(
                    "client {} refused the job ({status}): {}",
                    client.base(),
                    body.chars().take(500).collect::<String>()
                ),
            );
            return;
        }
        Submitted::NoRoom => {
            // The client's disk is full: place the job elsewhere (or here later), and do not
            // count a send that never ran against the job's attempts.
            let why = format!("{} has no disk space for the job (507)", client.base());
            let effects =
                shared
                    .lifecycle
                    .send_refused_for_room(&job, &why, results::backoff(job.attempts));
            crate::effects::perform(shared, effects).await;
            return;
        }
        Submitted::Unreachable {
            why,
            maybe_received,
        }
        | Submitted::Failed {
            why,
            maybe_received,
            ..
        } => {
            let delivery = delivery.after_failure(maybe_received);
            if key.is_some() && send_again(shared, client, &job, delivery, &why) {
                return;
            }
            let effects = shared
                .lifecycle
                .send_failed(&job, &why, results::backoff(job.attempts));
            crate::effects::perform(shared, effects).await;
            return;
        }
    };
    if let Some(ms) = std::env::var(PAUSE_AFTER_SUBMIT)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if std::env::var_os(CRASH_AFTER_SUBMIT).is_some() {
        // Fault injection for the tests: die in the worst place, after the client took the
        // payload and before its id is recorded.
        tracing::error!(job = job.id, "{CRASH_AFTER_SUBMIT} is set: exiting");
        std::process::exit(86);
    }
    let node = record.node.clone().or_else(|| client.node());
    // Submitted, then one look at the payload if the client may have reported it before
    // this commit (see `early_events`); or, terminated while it was being sent, its new
    // payload killed.
    // A commit the database failed (it restarts, say) is tried again until it answers: the
    // client holds the payload, and only this commit tells the collector to follow it. (A
    // stop meanwhile leaves the job Processing: the next start sends it again with its key.)
    let mut tries = 0;
    let effects = loop {
        match shared
            .lifecycle
            .submitted(&job, record.id as i64, node.clone())
        {
            Some(effects) => break effects,
            None => {
                tries += 1;
                tokio::time::sleep(results::backoff(tries)).await;
            }
        }
    };
    let effects = without_needless_look(client, &record, generation, effects);
    crate::effects::perform(shared, effects).await;
}

/// The effects of a Submitted commit less its look at the payload, towards a client whose
/// change feed brings the payload's news to its job from now on and had none of it before
/// the commit (nor a gap since the `/submit` was sent, at `generation`). A payload the
/// client answered as more than Prepared is one it had before (a resend with the same key,
/// after a crash of this server, say): its news may be older than the feed's place, so it
/// keeps the look.
fn without_needless_look(
    client: &ClientHandle,
    record: &PayloadRecord,
    generation: u64,
    mut effects: Effects,
) -> Effects {
    let claimed = client.early.claim(record.id as i64, generation);
    let fresh = record.status == PayloadStatus::Prepared;
    if client.has("events") && fresh && !claimed {
        effects.retain(|effect| !matches!(effect, Effect::Check(_)));
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files kept in the database are sent in the order a directory holding them is listed:
    /// a tree with files and directories at several depths, names that sort differently as
    /// paths and as components (`a.b` and `a/…`, `B` before `a`), shuffled each round.
    #[test]
    fn kept_inputs_are_sent_in_the_order_their_directory_would_be() {
        let names = [
            "run.sh",
            "B",
            "a.b",
            "a/x",
            "a/b/c",
            "a/b/a",
            "a/ab/z",
            "a/a",
            "ab",
            "z/y/x/w",
            "z/0",
            "data/in.pdb",
            "data/sub/1",
            "data/sub2/1",
            "data/sub-2/1",
        ];
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, name).unwrap();
        }
        let listed: Vec<String> = files_of(dir.path())
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(listed.len(), names.len());
        let mut seed = 0x5eed_u64;
        for _ in 0..50 {
            let mut kept: Vec<InputFile> = names
                .iter()
                .map(|name| InputFile {
                    name: (*name).to_owned(),
                    bytes: bytes::Bytes::from_static(b""),
                })
                .collect();
            for i in (1..kept.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                kept.swap(i, (seed >> 33) as usize % (i + 1));
            }
            in_listing_order(&mut kept);
            let sorted: Vec<&str> = kept.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(sorted, listed);
        }
    }
}
