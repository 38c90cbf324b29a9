//! What the server keeps of its jobs, and the seam behind which a database keeps it.
//!
//! [`JobDb`] is everything the server asks of its database: a guarded state change, the
//! reads its API and loops need, the runs given away. [`sqlite::SqliteDb`] is the embedded
//! implementation (WAL, one file), [`postgres::PgDb`] the one on a PostgreSQL server; both
//! pass the same tests (`suite.rs`). A store only
//! stores: waking long-polls, metrics and logs of committed changes are the caller's
//! ([`crate::lifecycle::JobTable`]).

pub mod postgres;
pub mod snapshot;
pub mod sqlite;
#[cfg(test)]
mod suite;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use postgres::PgDb;
pub use sqlite::SqliteDb;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// State of a job on the server.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, utoipa::ToSchema)]
pub enum JobStatus {
    Queued,
    Processing,
    Submitted,
    Running,
    Completed,
    Failed,
    Invalid,
    Killed,
    Cleaned,
}

impl JobStatus {
    pub const ACTIVE: [JobStatus; 3] = [
        JobStatus::Processing,
        JobStatus::Submitted,
        JobStatus::Running,
    ];
    pub const ON_CLIENT: [JobStatus; 2] = [JobStatus::Submitted, JobStatus::Running];
    pub const NOT_FINISHED: [JobStatus; 4] = [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Submitted,
        JobStatus::Running,
    ];
    pub const FINISHED: [JobStatus; 4] = [
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Invalid,
        JobStatus::Killed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "Queued",
            JobStatus::Processing => "Processing",
            JobStatus::Submitted => "Submitted",
            JobStatus::Running => "Running",
            JobStatus::Completed => "Completed",
            JobStatus::Failed => "Failed",
            JobStatus::Invalid => "Invalid",
            JobStatus::Killed => "Killed",
            JobStatus::Cleaned => "Cleaned",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            JobStatus::Queued,
            JobStatus::Processing,
            JobStatus::Submitted,
            JobStatus::Running,
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Invalid,
            JobStatus::Killed,
            JobStatus::Cleaned,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        !JobStatus::NOT_FINISHED.contains(&self)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One job, as stored.
#[derive(Serialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct Job {
    pub id: i64,
    pub status: JobStatus,
    pub message: String,
    pub user_id: i64,
    pub service: String,
    /// Dispatch attempts made so far.
    pub attempts: u32,
    /// Base URL of the client the job was last sent to.
    pub client: Option<String>,
    /// Payload id on that client.
    pub dest_id: Option<i64>,
    /// Identity of that client's data directory when the job was sent.
    pub node: Option<String>,
    /// Idempotency key of the last dispatch.
    #[serde(skip)]
    pub dispatch_key: Option<String>,
    pub exit_code: Option<i32>,
    /// Unix time in milliseconds.
    pub created_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
    /// The same times in RFC 3339 (UTC), for people.
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// What the job asked for (new fields after the reference's).
    #[serde(flatten)]
    pub resources: JobResources,
}

/// What a job asks for, fixed at upload (its own fields, else its service's defaults).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
pub struct JobResources {
    /// Cores (1 unless asked).
    pub cores: u32,
    /// Memory in MiB, if asked.
    pub memory_mb: Option<u64>,
    /// GPUs (0 unless asked).
    pub gpus: u32,
    /// Longest run in seconds, if asked.
    pub walltime_s: Option<u64>,
    /// Order within its user's queue: higher first, then first in first out.
    pub priority: i64,
}

impl Default for JobResources {
    /// A job that asked for nothing: one core, priority 0.
    fn default() -> Self {
        JobResources {
            cores: 1,
            memory_mb: None,
            gpus: 0,
            walltime_s: None,
            priority: 0,
        }
    }
}

/// Formats Unix milliseconds as RFC 3339 UTC, e.g. `2026-11-28T09:37:47.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86400);
    let rest = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// One state a job went through.
#[derive(Serialize, utoipa::ToSchema, Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub at_ms: i64,
    /// RFC 3339 time of the change.
    pub at: String,
    pub status: String,
    pub message: String,
    /// Dispatch attempts so far.
    pub attempts: u32,
    /// Client the job was on, if any.
    pub client: Option<String>,
}

/// Fields a transition may set besides the status. `None` leaves a field as it is.
#[derive(Default, Debug, Clone)]
pub struct Change {
    pub message: Option<String>,
    pub attempts: Option<u32>,
    pub client: Option<Option<String>>,
    pub dest_id: Option<Option<i64>>,
    pub node: Option<Option<String>>,
    pub dispatch_key: Option<Option<String>>,
    pub exit_code: Option<Option<i32>>,
    /// The job's run on its client is given away (requeued or failed while the client could
    /// not be reached): remember it in `abandoned_runs`, in the same transaction, so it is
    /// killed there once the client answers again (see [`JobDb::abandoned_on`]).
    pub abandon_run: bool,
    /// Commit only while the job is in this run (its dispatch key): an event about a run
    /// (its end, its loss, a failing check) must never move a later run of the same job.
    pub only_run: Option<Option<String>>,
    /// The job's result ZIP (at most [`MAX_RESULT_IN_DB`]), kept in the database in the same
    /// transaction as the final state it comes with (replacing one kept before): the job is
    /// Completed if and only if its ZIP is there, with no file, fsync or rename of its own.
    pub result_zip: Option<ResultZip>,
    /// Delete the input files kept in the database for the job ([`JobDb::insert_job`]'s
    /// `inputs`) in the same transaction: its results are stored by this commit (or were put
    /// in place before it), and hold the inputs too. The commit that marks a job Cleaned
    /// deletes them whatever this says.
    pub drop_inputs: bool,
}

/// Result ZIPs up to this size (256 KiB) are kept in the database, in the commit of the
/// final state that comes with them (`result_zips`, keyed by job id), rather than as
/// `<data>/results/<id>.zip`; larger ones stay files. The results of short jobs are small,
/// and on this machine a new inode, its fsync and its rename cost more than a trivial job's
/// whole database work. The same size bounds what a result fetch gathers in memory.
pub const MAX_RESULT_IN_DB: usize = 256 * 1024;

/// Uploads whose files total at most this (64 KiB) are kept in the database, in the
/// transaction that inserts the job (`input_files`, a row per file), rather than as
/// `<data>/jobs/<id>/`: no staging directory, no inode, no rename for them. Larger uploads
/// stay files. A trivial job's `run.sh` is a few hundred bytes; the bound also caps what an
/// upload holds in memory before it spills to disk.
pub const MAX_INPUTS_IN_DB: usize = 64 * 1024;

/// One input file of a job kept in the database: its name relative to the job's directory
/// (with '/'), and its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct InputFile {
    pub name: String,
    pub bytes: bytes::Bytes,
}

impl std::fmt::Debug for InputFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InputFile({:?}, {} bytes)", self.name, self.bytes.len())
    }
}

/// A result ZIP held in memory on its way into the database (cheap to clone).
#[derive(Clone, PartialEq, Eq)]
pub struct ResultZip(pub bytes::Bytes);

impl std::fmt::Debug for ResultZip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResultZip({} bytes)", self.0.len())
    }
}

/// Where a job's notifications go, given at upload (or the service's default) and stored
/// with the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    pub url: String,
    /// Also notify when the job starts running (besides its final state).
    pub on_running: bool,
}

/// One notification of the outbox: a job's JSON as it was when the state change committed,
/// to be POSTed to its callback until a receiver takes it or the retry period is over.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Stays the same on every try, so receivers can deduplicate.
    pub id: String,
    pub job_id: i64,
    pub service: String,
    /// The state the job reached (`Running`, `Completed`, ...).
    pub event: JobStatus,
    pub url: String,
    pub body: String,
    pub created_ms: i64,
    pub attempts: u32,
}

/// How a delivery ended, for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryEnd {
    /// A receiver answered 2xx.
    Delivered,
    /// A receiver answered 410 Gone: it wants no more.
    Gone,
    /// Retried for the whole retry period without success.
    Expired,
    /// The server may no longer send it (callback host off the allowlist, no secret).
    Refused,
}

impl DeliveryEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryEnd::Delivered => "delivered",
            DeliveryEnd::Gone => "gone",
            DeliveryEnd::Expired => "expired",
            DeliveryEnd::Refused => "refused",
        }
    }
}

/// A job's notification as `GET /jobs/{id}` shows it.
#[derive(Serialize, Debug, Clone, PartialEq, utoipa::ToSchema)]
pub struct Notification {
    /// Delivery id (the `X-Jobrelay-Delivery` header).
    pub id: String,
    /// The state it announces.
    pub event: String,
    pub url: String,
    /// Tries made so far.
    pub attempts: u32,
    /// The receiver's last HTTP status, or why the last try failed (`connect: ...`).
    pub last_status: Option<String>,
    /// Unix ms of the next try; `None` once it has ended.
    pub next_try_ms: Option<i64>,
    /// `delivered`, `gone`, `expired` or `refused` once it has ended; `None` while pending.
    pub outcome: Option<String>,
}

/// A run the server gave away while its client could not be reached: to be killed there.
#[derive(Debug, Clone, PartialEq)]
pub struct AbandonedRun {
    pub client: String,
    pub dest_id: i64,
    /// Dispatch key of that run: only a payload carrying it is killed.
    pub key: Option<String>,
    pub job_id: i64,
}

impl Change {
    pub fn message(message: impl Into<String>) -> Self {
        Change {
            message: Some(message.into()),
            ..Default::default()
        }
    }
}

/// A user's recent usage in a fair-share service, as kept: decayed core-seconds as of
/// `at_ms` (see [`crate::usage`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub service: String,
    pub user_id: i64,
    pub core_seconds: f64,
    pub at_ms: i64,
}

/// Which jobs `GET /jobs` lists.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub user_id: Option<i64>,
    pub service: Option<String>,
    pub status: Option<JobStatus>,
    pub limit: i64,
    pub offset: i64,
}

/// The database behind the server. Every state change is one committed transaction guarded
/// by the states it may come from, so two actors racing on a job (terminate and completion,
/// say) cannot both win, and a restart finds each job where the last commit left it.
pub trait JobDb: Send + Sync {
    /// Identity of this database, part of every dispatch key.
    fn server_id(&self) -> &str;
    /// The job-id mark as found at open (0 without one).
    fn mark_at_open(&self) -> i64;
    /// Inserts a Queued job asking for `resources`, writes `inputs` (files kept in the
    /// database, at most [`MAX_INPUTS_IN_DB`] together; empty when its files are on disk) and
    /// runs `place_files(id)` inside the same transaction: the job exists if and only if its
    /// files were put in place. A job with a `callback` gets a
    /// notification in the outbox, in the same transaction, each time [`JobDb::transition`]
    /// moves it to a final state (or to Running, if asked).
    fn insert_job(
        &self,
        user_id: i64,
        service: &str,
        callback: Option<&Callback>,
        resources: &JobResources,
        inputs: &[InputFile],
        place_files: &mut dyn FnMut(i64) -> std::io::Result<()>,
    ) -> anyhow::Result<Job>;
    /// The input files kept in the database for job `id`, in the order they were given to
    /// [`JobDb::insert_job`]; empty when it has none there (its files are on disk, or were
    /// dropped: [`Change::drop_inputs`], [`JobDb::drop_inputs`], Cleaned).
    fn input_files(&self, id: i64) -> anyhow::Result<Vec<InputFile>>;
    /// Deletes the input files kept in the database for job `id` (a finished job whose
    /// results were stored after its final state's commit: a terminate's partial ZIP).
    fn drop_inputs(&self, id: i64) -> anyhow::Result<()>;
    fn get(&self, id: i64) -> anyhow::Result<Option<Job>>;
    /// Moves job `id` from one of `from` to `to`, setting the fields of `change`. Returns the
    /// job as it is after the change, or `None` if it was in none of `from` (nothing changed).
    /// The change writes the job's notification, if its callback asks for this state, in the
    /// same transaction: a committed change is never left unannounced.
    fn transition(
        &self,
        id: i64,
        from: &[JobStatus],
        to: JobStatus,
        change: Change,
    ) -> anyhow::Result<Option<Job>>;
    /// The result ZIP kept in the database for job `id` ([`Change::result_zip`]); `None`
    /// when it has none there (its results are a file, or it has none). Removed by the
    /// commit that marks the job Cleaned.
    fn result_zip(&self, id: i64) -> anyhow::Result<Option<bytes::Bytes>>;
    /// Every state a job went through, oldest first.
    fn history(&self, id: i64) -> anyhow::Result<Vec<JobEvent>>;
    /// Number of jobs per (service, status), of one user or of all.
    fn counts(&self, user: Option<i64>) -> anyhow::Result<Vec<(String, String, i64)>>;
    /// Jobs (of one user or of all) that finished in each minute since `since_ms`
    /// (minute start in ms, count).
    fn finished_per_minute(
        &self,
        since_ms: i64,
        user: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, i64)>>;
    /// Jobs in any of `states`, oldest first.
    fn in_states(&self, states: &[JobStatus]) -> anyhow::Result<Vec<Job>>;
    /// Jobs on client `base` in Submitted or Running.
    fn on_client(&self, base: &str) -> anyhow::Result<Vec<Job>>;
    /// Runs given away on client `base` that are still to be killed there.
    fn abandoned_on(&self, base: &str) -> anyhow::Result<Vec<AbandonedRun>>;
    /// An abandoned run is dealt with (killed, or found gone or not ours).
    fn forget_abandoned(&self, base: &str, dest_id: i64) -> anyhow::Result<()>;
    /// The job that payload `dest_id` of client `base` belongs to.
    fn by_dest(&self, base: &str, dest_id: i64) -> anyhow::Result<Option<Job>>;
    /// Finished jobs whose end is older than `cutoff_ms`.
    fn finished_before(&self, cutoff_ms: i64) -> anyhow::Result<Vec<i64>>;
    /// Ids of the jobs that may have files (all but Cleaned ones).
    fn ids_with_files(&self) -> anyhow::Result<HashSet<i64>>;
    /// Every job id the database holds.
    fn all_ids(&self) -> anyhow::Result<HashSet<i64>>;
    /// A page of jobs, newest first, filtered by user, service and status; and how many
    /// jobs match in all.
    fn list(&self, filter: &ListFilter) -> anyhow::Result<(Vec<Job>, i64)>;
    fn count(&self) -> anyhow::Result<i64>;
    /// Pending notifications due at `now_ms` (their next try has come), oldest due first, at
    /// most `limit`.
    fn due_deliveries(&self, now_ms: i64, limit: usize) -> anyhow::Result<Vec<Delivery>>;
    /// Unix ms of the earliest next try of a pending notification.
    fn next_delivery_ms(&self) -> anyhow::Result<Option<i64>>;
    /// A try of delivery `id` failed with `status`: try again at `next_ms`.
    fn retry_delivery(&self, id: &str, status: &str, next_ms: i64) -> anyhow::Result<()>;
    /// Delivery `id` has ended (`tried`: a request was made, counted as an attempt), its last
    /// status `status`.
    fn finish_delivery(
        &self,
        id: &str,
        status: &str,
        tried: bool,
        end: DeliveryEnd,
    ) -> anyhow::Result<()>;
    /// The notifications of job `id`, oldest first.
    fn notifications(&self, id: i64) -> anyhow::Result<Vec<Notification>>;
    /// Every user's kept fair-share usage.
    fn usage(&self) -> anyhow::Result<Vec<UsageRow>>;
    /// Keeps a user's fair-share usage (replacing what was kept for that service and user).
    fn save_usage(&self, row: &UsageRow) -> anyhow::Result<()>;
    /// One upload of `user_id` to `service` under its rate `quota` at `now_ms`, checked and
    /// counted in one transaction (servers sharing the database count together):
    /// `Ok(Ok(()))` when it may go, `Ok(Err(ms))` when the user must wait `ms` first.
    fn take_upload_slot(
        &self,
        service: &str,
        user_id: i64,
        quota: crate::ratelimit::RateQuota,
        now_ms: i64,
    ) -> anyhow::Result<Result<(), i64>>;
    /// `Err` with the reason when the database is known to be damaged or cannot be read.
    fn health(&self) -> Result<(), String>;
    /// Reads every page of the database and remembers a failure for [`JobDb::health`].
    fn check_integrity(&self) -> Result<(), String>;
    /// What several servers on this database share (PostgreSQL); `None` for a database only
    /// one server uses (SQLite), which is then always the leader.
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }
}

/// The lease as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The leader's name; `None` when nobody holds it (never taken, or given up).
    pub holder: Option<String>,
    /// Raised by every takeover.
    pub epoch: i64,
    /// Unix ms when the holder took it.
    pub since_ms: Option<i64>,
    /// Whether it is still in force (not expired), in the database's clock.
    pub live: bool,
}

/// A server's last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ServerBeat {
    pub name: String,
    /// Where it listens, as it says.
    pub url: String,
    pub started_ms: i64,
    pub seen_ms: i64,
}

/// What another server's commit tells this one (a hint: the database is the truth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Job `id` was inserted (uploaded, Queued).
    New(i64),
    /// Job `id` changed state.
    Changed(i64),
    /// A standby asked the leader to terminate job `id`.
    Terminate(i64),
    /// The listening connection was (re)made: whatever was sent while it was down is lost.
    Listening,
}

/// A write refused because this server's lease epoch is no longer the current one: another
/// server took the lease (or this one never held it). The server must stop acting as leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced(pub i64);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused: this server is not the leader (its lease epoch {} is not the current one)",
            self.0
        )
    }
}

impl std::error::Error for Fenced {}

/// The database cannot be reached now (down, restarting, no free connection in time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the database is unavailable: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// The shared part of a database several servers use: the leader's lease, the fencing of
/// job-state writes by its epoch, the servers' heartbeats, terminate requests for the leader,
/// and notifications of other servers' commits.
pub trait Cluster: Send + Sync {
    /// Takes the lease for `me` if nobody holds it in force, for `timeout`: the new lease
    /// (with a raised epoch), or `None` when another server holds it.
    fn try_lead(&self, me: &str, timeout: Duration) -> anyhow::Result<Option<Lease>>;
    /// Extends `me`'s lease of `epoch` by `timeout`; `false` when it is no longer ours.
    fn renew(&self, me: &str, epoch: i64, timeout: Duration) -> anyhow::Result<bool>;
    /// Gives the lease up (a graceful stop), so a standby takes over at once.
    fn resign(&self, me: &str, epoch: i64) -> anyhow::Result<()>;
    /// The lease as it is now.
    fn lease(&self) -> anyhow::Result<Lease>;
    /// From now on every job-state write checks, in its transaction, that `epoch` is still
    /// the lease's, and is refused ([`Fenced`]) otherwise; 0 refuses them all (a standby).
    fn fence(&self, epoch: i64);
    /// Woken when a write was refused by the fence.
    fn refusals(&self) -> Arc<tokio::sync::Notify>;
    /// Records that `me` (listening at `url`, started at `started_ms`) is alive.
    fn heartbeat(&self, me: &str, url: &str, started_ms: i64) -> anyhow::Result<()>;
    /// The servers heard from since `since_ms`, by name.
    fn servers(&self, since_ms: i64) -> anyhow::Result<Vec<ServerBeat>>;
    /// Asks the leader to terminate job `id` (committed, then notified).
    fn request_terminate(&self, id: i64) -> anyhow::Result<()>;
    /// Terminate requests not yet carried out, oldest first.
    fn terminate_requests(&self) -> anyhow::Result<Vec<i64>>;
    /// The request for job `id` was carried out.
    fn forget_terminate(&self, id: i64) -> anyhow::Result<()>;
    /// Sends every notice of other servers' commits to `to`, from a connection of its own
    /// made again whenever it breaks ([`Notice::Listening`] after each).
    fn listen(&self, to: tokio::sync::mpsc::UnboundedSender<Notice>);
}
