//! Everything a database holds, read in one snapshot, as `jobrelay server migrate` moves it
//! from SQLite to PostgreSQL: every column of every row, in the order it was written.

use super::{AbandonedRun, Job, UsageRow};

/// A job row: the job as the API sees it and its callback columns.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub job: Job,
    pub callback_url: Option<String>,
    pub callback_events: Option<String>,
}

/// One row of a job's timeline (`job_events`).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub job_id: i64,
    pub at_ms: i64,
    pub status: String,
    pub message: String,
    pub attempts: i64,
    pub client: Option<String>,
}

/// One row of the webhook outbox, pending or ended.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: String,
    pub job_id: i64,
    pub event: String,
    pub url: String,
    pub body: String,
    pub created_ms: i64,
    pub attempts: i64,
    pub last_status: Option<String>,
    pub next_ms: Option<i64>,
    pub outcome: Option<String>,
}

/// A whole database. Timeline and outbox rows are in the order they were written, which is
/// the order the API lists them in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The database's identity, part of every dispatch key: kept, so a run sent before the
    /// move is still recognised as this server's by its key.
    pub server_id: String,
    pub jobs: Vec<JobRow>,
    pub events: Vec<EventRow>,
    pub outbox: Vec<OutboxRow>,
    pub abandoned: Vec<AbandonedRun>,
    /// Fair-share usage of each user and service.
    pub usage: Vec<UsageRow>,
    /// Each user's upload token bucket: (service, user id, kept instant in ms).
    pub rates: Vec<(String, i64, i64)>,
    /// Result ZIPs kept in the database (job id, the ZIP's bytes), by job id; each at most
    /// [`super::MAX_RESULT_IN_DB`].
    pub result_zips: Vec<(i64, Vec<u8>)>,
    /// Input files kept in the database (job id, position, name, bytes), by job id and
    /// position; each job's at most [`super::MAX_INPUTS_IN_DB`] together.
    pub input_files: Vec<(i64, i64, String, Vec<u8>)>,
    /// The highest job id ever handed out (the database's sequence, its rows and the mark):
    /// new ids continue after it.
    pub highest_id: i64,
}

/// What a move wrote, for its report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub jobs: usize,
    pub events: usize,
    pub notifications: usize,
    pub abandoned_runs: usize,
    /// Result ZIPs kept in the database.
    pub result_zips: usize,
    /// Input files kept in the database (files, not jobs).
    pub input_files: usize,
    /// The id the next upload gets.
    pub next_id: i64,
}
