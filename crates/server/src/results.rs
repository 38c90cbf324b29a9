//! A job's results, at the edge: the result ZIP stored whole (through a part file, its central
//! directory checked, cut off past `max_result`) before `completed` is committed, the partial
//! ZIP before a final state reported by the client. A ZIP of at most
//! [`crate::store::MAX_RESULT_IN_DB`] is not a file at all: checked in memory, it is kept in
//! the database by the very commit of that final state. The state changes are the lifecycle's
//! events; the order is always: store the files, commit the new state, then act on the
//! effects (release the client's copy, drop the inputs).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::clients::ClientHandle;
use crate::gateway::{self, Download};
use crate::store::{Job, JobStatus, ResultZip};
use crate::Shared;

/// Longest wait before a job that could not be sent is offered to the scheduler again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Backoff before sending a job again after `attempts` failed sends.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(6);
    (Duration::from_millis(500) * (1 << exp)).min(MAX_BACKOFF)
}

/// ZIP answers up to this size are gathered in memory and checked there, then kept in the
/// database with the final state ([`crate::store::MAX_RESULT_IN_DB`]) or, where a file is
/// asked for, written, synced and renamed in one blocking call; larger ones are streamed to
/// disk chunk by chunk. At most `MAX_CONCURRENT_CHECKS` (64) are gathered at once: 16 MiB.
const SMALL_ZIP: usize = crate::store::MAX_RESULT_IN_DB;

/// Where [`store_zip`] put a ZIP.
#[derive(Debug)]
pub enum Stored {
    /// In `dest`, whole.
    File,
    /// Checked and held in memory, for the commit of the job's final state to keep in the
    /// database ([`crate::store::Change::result_zip`]): nothing on disk.
    InDb(ResultZip),
}

impl Stored {
    /// The ZIP to commit with the final state, if it goes to the database.
    pub fn into_db(self) -> Option<ResultZip> {
        match self {
            Stored::File => None,
            Stored::InDb(zip) => Some(zip),
        }
    }
}

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
    /// The database could not be read or written (it restarts, say): nothing is wrong with
    /// the run either, so it is asked again (with backoff, without a deadline).
    pub store_down: bool,
}

impl From<String> for CheckError {
    fn from(why: String) -> Self {
        CheckError {
            why,
            disk_full: false,
            store_down: false,
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
/// removed): no more than `limit` bytes of it ever reach the disk. With `in_db`, an archive
/// of at most [`SMALL_ZIP`] is checked in memory and handed back instead ([`Stored::InDb`]),
/// for the caller to commit with the job's final state; nothing is written here.
pub async fn store_zip(
    zip: Download,
    dest: &Path,
    limit: u64,
    in_db: bool,
) -> Result<Stored, StoreError> {
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
    if small && in_db {
        // Reading a central directory of at most 256 KiB held in memory: no I/O, no reason
        // for a thread hand-over.
        check_zip(std::io::Cursor::new(&head[..]))?;
        return Ok(Stored::InDb(ResultZip(head.into())));
    }
    if small {
        let dest = dest.to_path_buf();
        return tokio::task::spawn_blocking(move || {
            let result = store_small_zip(&head, &part, &dest);
            if result.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            result.map(|()| Stored::File)
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
            .map(|()| Stored::File)
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

/// Fetches the job's work directory as it is now from its client, best effort, for the
/// final state the client reported (Failed, Invalid, Killed): a small ZIP is handed back to
/// be committed with that state ([`Stored::InDb`]), a larger one is stored as the job's result
/// file before the state is committed.
pub async fn fetch_partial_for_end(
    shared: &Shared,
    client: &ClientHandle,
    job: &Job,
) -> Option<ResultZip> {
    let dest = job.dest_id?;
    let zip = match gateway::retrieve_partial(shared, client, dest).await {
        Ok(zip) => zip,
        Err(e) => {
            tracing::info!(job = job.id, error = %e, "no partial results from the client");
            return None;
        }
    };
    let limit = max_result(shared, job);
    match store_zip(zip, &shared.result_path(job.id), limit, true).await {
        Ok(stored) => stored.into_db(),
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "partial results not stored");
            None
        }
    }
}

/// Fetches the job's work directory as it is now from its client into the results, best
/// effort, before a terminate commits Killed. A result already stored is not replaced: the
/// partial ZIP is put in place only where there is none (atomically: a hard link fails if
/// the name exists), else held, for the caller to put in place once Killed is committed
/// ([`Held`]). Always a file (a terminate is rare; a completion racing it commits its ZIP,
/// in the database or as a file, with Completed, and Killed then fails to commit).
pub async fn fetch_partial(shared: &Shared, client: &ClientHandle, job: &Job) -> Partial {
    let Some(dest) = job.dest_id else {
        return Partial::Nothing;
    };
    let zip = match gateway::retrieve_partial(shared, client, dest).await {
        Ok(zip) => zip,
        Err(e) => {
            tracing::info!(job = job.id, error = %e, "no partial results from the client");
            return Partial::Nothing;
        }
    };
    let limit = max_result(shared, job);
    let result = shared.result_path(job.id);
    // Beside the results, under a name a start-up removes if a crash leaves it.
    let staged = shared.results_dir.join(format!(
        "{}.partial-{}",
        job.id,
        jobrelay_common::fsutil::unique_name("")
    ));
    if let Err(e) = store_zip(zip, &staged, limit, false).await {
        tracing::warn!(job = job.id, error = %e, "partial results not stored");
        return Partial::Nothing;
    }
    let held = Held(Some(staged.clone()));
    match tokio::fs::hard_link(&staged, &result).await {
        Ok(()) => Partial::Placed, // `held` is dropped: the staged name goes, the result stays.
        Err(e) => {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                tracing::info!(job = job.id, error = %e, "cannot link the partial ZIP into place");
            }
            Partial::Held(held)
        }
    }
}

/// What [`fetch_partial`] did with a terminate's partial ZIP.
pub enum Partial {
    /// There was none (or it could not be stored).
    Nothing,
    /// Put in place as the result file, none being there. A completion racing the terminate
    /// may still commit its ZIP in the database: it is the job's result then, and the caller
    /// removes this file once its Killed failed to commit.
    Placed,
    /// A result file was there: held, to replace it once Killed is committed.
    Held(Held),
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
    let zip = fetch_partial_for_end(shared, client, job).await;
    let effects = shared
        .lifecycle
        .ended_on_client(job, status, exit_code, reason, zip);
    crate::effects::perform(shared, effects).await;
}

/// Stores the result ZIP of a Completed payload (a small one in the commit itself), then marks
/// the job Completed, then releases the client's copy. Results over the service's `max_result` fail the job (nothing of them
/// is kept, the client's copy is released); other failures leave the job where it is for the
/// collector to fetch again.
pub async fn complete(shared: &Arc<Shared>, job: &Job, zip: Download) -> Result<(), CheckError> {
    let limit = max_result(shared, job);
    let zip = match store_zip(zip, &shared.result_path(job.id), limit, true).await {
        Ok(stored) => stored.into_db(),
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
            let effects = shared.lifecycle.results_too_large(job, reason);
            crate::effects::perform(shared, effects).await;
            return Ok(());
        }
        Err(e) => {
            // The job stays where it is; the collector fetches again.
            tracing::warn!(job = job.id, error = %e, "result not stored; will fetch again");
            return Err(CheckError {
                disk_full: matches!(e, StoreError::DiskFull(_)),
                store_down: false,
                why: format!("the result ZIP could not be stored: {e}"),
            });
        }
    };
    // A small ZIP goes into the database in this commit; if it fails, nothing was kept and
    // the collector fetches again (`CheckLater`).
    let effects = shared.lifecycle.completed(job, zip);
    crate::effects::perform(shared, effects).await;
    Ok(())
}
