//! The embedded store: SQLite in WAL mode, one file in the data directory, and the job-id
//! high-water mark beside it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::snapshot::{EventRow, JobRow, OutboxRow, Snapshot};
use super::{
    now_ms, rfc3339, AbandonedRun, Callback, Change, Delivery, DeliveryEnd, InputFile, Job, JobDb,
    JobEvent, JobResources, JobStatus, ListFilter, Notification, UsageRow,
};

/// A status column the server does not know (written by a newer version, or by hand) is an
/// error naming it, never read as some other state: read as Failed it would be final, its
/// quota freed and its files cleaned while a run may still be going.
impl rusqlite::types::FromSql for JobStatus {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        JobStatus::parse(text).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(
                format!("unknown job status {text:?} in the database").into(),
            )
        })
    }
}

const COLUMNS: &str = "id, status, message, user_id, service, attempts, client, dest_id, node, \
                       dispatch_key, exit_code, created_ms, updated_ms, finished_ms, \
                       cores, memory_mb, gpus, walltime_s, priority";

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let created_ms: i64 = row.get(11)?;
    let updated_ms: i64 = row.get(12)?;
    let finished_ms: Option<i64> = row.get(13)?;
    Ok(Job {
        id: row.get(0)?,
        status: row.get(1)?,
        message: row.get(2)?,
        user_id: row.get(3)?,
        service: row.get(4)?,
        attempts: row.get(5)?,
        client: row.get(6)?,
        dest_id: row.get(7)?,
        node: row.get(8)?,
        dispatch_key: row.get(9)?,
        exit_code: row.get(10)?,
        created_ms,
        updated_ms,
        finished_ms,
        created_at: rfc3339(created_ms),
        updated_at: rfc3339(updated_ms),
        finished_at: finished_ms.map(rfc3339),
        resources: JobResources {
            cores: row.get(14)?,
            memory_mb: row.get(15)?,
            gpus: row.get(16)?,
            walltime_s: row.get(17)?,
            priority: row.get(18)?,
        },
    })
}

fn record_event(
    conn: &Connection,
    id: i64,
    at_ms: i64,
    status: JobStatus,
    message: &str,
    attempts: u32,
    client: Option<&str>,
) -> anyhow::Result<()> {
    conn.prepare_cached(
        "INSERT INTO job_events (job_id, at_ms, status, message, attempts, client)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            at_ms,
            status.as_str(),
            message,
            attempts,
            client
        ])
    })
    .map_err(sql_err)?;
    Ok(())
}

/// `ALTER TABLE ADD COLUMN` for each of `columns` (name, type) that `table` lacks.
fn add_missing_columns(
    conn: &Connection,
    table: &str,
    columns: &[(&str, &str)],
) -> anyhow::Result<()> {
    let present: HashSet<String> = conn
        .prepare(&format!("PRAGMA table_info({table})"))
        .and_then(|mut stmt| {
            stmt.query_map([], |r| r.get::<_, String>(1))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(sql_err)?;
    for (name, kind) in columns {
        if !present.contains(*name) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {kind}"))
                .map_err(sql_err)?;
        }
    }
    Ok(())
}

/// How `callback_events` is stored: the states that are announced.
fn events_column(callback: &Callback) -> &'static str {
    if callback.on_running {
        "running,final"
    } else {
        "final"
    }
}

/// Writes job `job`'s notification of the state it just reached, if its callback asks for
/// it; part of the caller's transaction.
fn queue_notification(conn: &Connection, job: &Job, now: i64) -> anyhow::Result<()> {
    let announced = match job.status {
        JobStatus::Running => "running",
        s if s.is_finished() && s != JobStatus::Cleaned => "final",
        _ => return Ok(()),
    };
    let callback: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached("SELECT callback_url, callback_events FROM jobs WHERE id = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([job.id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql_err)?;
    let Some((Some(url), events)) = callback else {
        return Ok(());
    };
    if !events
        .as_deref()
        .unwrap_or("final")
        .split(',')
        .any(|e| e == announced)
    {
        return Ok(());
    }
    let body = serde_json::to_string(job)?;
    conn.prepare_cached(
        "INSERT INTO webhook_outbox (id, job_id, event, url, body, created_ms, next_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            uuid::Uuid::new_v4().to_string(),
            job.id,
            job.status.as_str(),
            url,
            body,
            now
        ])
    })
    .map_err(sql_err)?;
    Ok(())
}

/// Name of the job-id high-water mark in the data directory ([`SqliteDb::open_with_mark`]).
pub const JOB_ID_MARK: &str = "last-job-id";

/// The SQLite implementation of [`JobDb`].
pub struct SqliteDb {
    conn: Mutex<Connection>,
    /// The database file: the integrity check reads it through a connection of its own.
    path: std::path::PathBuf,
    server_id: String,
    /// The job-id high-water mark beside the database (see [`SqliteDb::open_with_mark`]).
    mark: Option<Mutex<std::fs::File>>,
    /// The mark as found at open: ids up to it were handed out in this data directory.
    mark_at_open: i64,
    /// Why the database is known to be damaged (a query met a corrupt page, or the last
    /// integrity check failed); `/health` reports it.
    damaged: Mutex<Option<String>>,
}

/// Writes the job-id mark in place: one `pwrite` of a fixed width, no new inode.
fn write_mark(file: &std::fs::File, id: i64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(format!("{id:>20}\n").as_bytes(), 0)
}

fn sql_err(e: rusqlite::Error) -> anyhow::Error {
    anyhow::anyhow!("database error: {e}")
}

impl SqliteDb {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let conn = Connection::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open database {}: {e}", path.display()))?;
        // Room for every per-job statement (the state changes vary by the fields they set).
        conn.set_prepared_statement_cache_capacity(64);
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 status TEXT NOT NULL,
                 message TEXT NOT NULL DEFAULT '',
                 user_id INTEGER NOT NULL,
                 service TEXT NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 client TEXT,
                 dest_id INTEGER,
                 node TEXT,
                 dispatch_key TEXT,
                 exit_code INTEGER,
                 created_ms INTEGER NOT NULL,
                 updated_ms INTEGER NOT NULL,
                 finished_ms INTEGER
             );
             CREATE TABLE IF NOT EXISTS job_events (
                 job_id INTEGER NOT NULL,
                 at_ms INTEGER NOT NULL,
                 status TEXT NOT NULL,
                 message TEXT NOT NULL,
                 attempts INTEGER NOT NULL,
                 client TEXT
             );
             CREATE TABLE IF NOT EXISTS abandoned_runs (
                 client TEXT NOT NULL,
                 dest_id INTEGER NOT NULL,
                 dispatch_key TEXT,
                 job_id INTEGER NOT NULL,
                 PRIMARY KEY (client, dest_id)
             );
             -- The notifications of jobs with a callback (the webhook outbox): written in the
             -- transaction of the state change they announce; next_ms is NULL once ended.
             CREATE TABLE IF NOT EXISTS webhook_outbox (
                 id TEXT PRIMARY KEY,
                 job_id INTEGER NOT NULL,
                 event TEXT NOT NULL,
                 url TEXT NOT NULL,
                 body TEXT NOT NULL,
                 created_ms INTEGER NOT NULL,
                 attempts INTEGER NOT NULL DEFAULT 0,
                 last_status TEXT,
                 next_ms INTEGER,
                 outcome TEXT
             );
             -- Fair-share usage (issue 15): decayed core-seconds of a user as of at_ms.
             CREATE TABLE IF NOT EXISTS user_usage (
                 service TEXT NOT NULL,
                 user_id INTEGER NOT NULL,
                 core_seconds REAL NOT NULL,
                 at_ms INTEGER NOT NULL,
                 PRIMARY KEY (service, user_id)
             );
             -- Rate quotas of uploads: the token bucket of a user (see ratelimit.rs).
             CREATE TABLE IF NOT EXISTS upload_rate (
                 service TEXT NOT NULL,
                 user_id INTEGER NOT NULL,
                 tat_ms INTEGER NOT NULL,
                 PRIMARY KEY (service, user_id)
             );
             -- Result ZIPs of at most MAX_RESULT_IN_DB (issue 18), written in the commit of
             -- the final state they come with, deleted in the one that marks the job Cleaned.
             CREATE TABLE IF NOT EXISTS result_zips (
                 job_id INTEGER PRIMARY KEY,
                 zip BLOB NOT NULL
             );
             -- Input files of uploads of at most MAX_INPUTS_IN_DB (issue 18), a row per file
             -- in the order they are sent, written in the transaction that inserts the job;
             -- deleted with its results' final state or with Cleaned. WITHOUT ROWID: one
             -- B-tree keyed (job_id, pos), no rowid table beside an index; a trivial job's
             -- run.sh is far below the size where such rows go slower.
             CREATE TABLE IF NOT EXISTS input_files (
                 job_id INTEGER NOT NULL,
                 pos INTEGER NOT NULL,
                 name TEXT NOT NULL,
                 bytes BLOB NOT NULL,
                 PRIMARY KEY (job_id, pos)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(next_ms)
                 WHERE next_ms IS NOT NULL;
             CREATE INDEX IF NOT EXISTS webhook_outbox_by_job ON webhook_outbox(job_id);
             CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events(job_id);
             CREATE INDEX IF NOT EXISTS jobs_by_finished ON jobs(finished_ms);
             CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status);
             CREATE INDEX IF NOT EXISTS jobs_by_dest ON jobs(client, dest_id);",
        )
        .map_err(sql_err)?;
        // Columns added after the first release: a database made by an older version gets them.
        add_missing_columns(
            &conn,
            "jobs",
            &[
                ("callback_url", "TEXT"),
                ("callback_events", "TEXT"),
                // A job's request (issue 15); rows of an older database asked for nothing.
                ("cores", "INTEGER NOT NULL DEFAULT 1"),
                ("memory_mb", "INTEGER"),
                ("gpus", "INTEGER NOT NULL DEFAULT 0"),
                ("walltime_s", "INTEGER"),
                ("priority", "INTEGER NOT NULL DEFAULT 0"),
            ],
        )?;
        let existing: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'server_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_err)?;
        let server_id = match existing {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('server_id', ?1)",
                    [&id],
                )
                .map_err(sql_err)?;
                id
            }
        };
        // Once per database: the timelines of jobs cleaned by a version that kept them.
        conn.execute_batch(
            "BEGIN;
             DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE status = 'Cleaned')
                 AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'cleaned_events_pruned');
             INSERT OR IGNORE INTO meta (key, value) VALUES ('cleaned_events_pruned', '1');
             COMMIT;",
        )
        .map_err(sql_err)?;
        Ok(SqliteDb {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            server_id,
            mark: None,
            mark_at_open: 0,
            damaged: Mutex::new(None),
        })
    }
    /// [`SqliteDb::open`], keeping the highest job id ever handed out in `mark` (a small file
    /// beside the database, rewritten in place at each upload). Ids continue above it even if
    /// the database was emptied, replaced by an older copy or recreated: an id a platform
    /// still holds never names another job of this data directory.
    pub fn open_with_mark(path: &Path, mark: &Path) -> anyhow::Result<Self> {
        use std::io::Read;
        let mut store = Self::open(path)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(mark)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", mark.display()))?;
        // Held (shared) while the server runs: `jobrelay server migrate` takes it alone, so
        // it refuses a database a server is serving, and a server cannot start mid-move.
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "{} is held by `jobrelay server migrate`: start the server once it is done",
                mark.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {e}", mark.display())
            }
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", mark.display()))?;
        let marked = match text.trim() {
            "" => 0,
            t => t.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} should hold the highest job id handed out, not {t:?}; \
                     put the highest id you know of there (or remove it if none was ever used)",
                    mark.display()
                )
            })?,
        };
        let highest = {
            let conn = crate::lock(&store.conn);
            let highest: i64 = conn
                .query_row(
                    "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),
                            COALESCE((SELECT MAX(id) FROM jobs), 0))",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql_err)?;
            if marked > highest {
                tracing::warn!(
                    mark = marked,
                    database = highest,
                    "the database is behind the job ids handed out in this data directory; \
                     new ids continue after {marked}"
                );
                conn.execute_batch(&format!(
                    "INSERT INTO sqlite_sequence (name, seq) SELECT 'jobs', 0
                         WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'jobs');
                     UPDATE sqlite_sequence SET seq = {marked} WHERE name = 'jobs';"
                ))
                .map_err(sql_err)?;
            }
            highest.max(marked)
        };
        write_mark(&file, highest)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", mark.display()))?;
        store.mark = Some(Mutex::new(file));
        store.mark_at_open = marked;
        Ok(store)
    }
    /// Every row `sql` answers for `params`, read by `row`, gathered into `C` (a `Vec`, a
    /// set); the statement is prepared once and cached.
    fn all<T, C: FromIterator<T>>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> anyhow::Result<C> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        let mut stmt = conn.prepare_cached(sql).map_err(|e| self.sql_err(e))?;
        let rows = stmt.query_map(params, row).map_err(|e| self.sql_err(e))?;
        rows.collect::<rusqlite::Result<C>>()
            .map_err(|e| self.sql_err(e))
    }

    /// [`sql_err`], remembering a corrupt database for [`SqliteDb::health`].
    fn sql_err(&self, e: rusqlite::Error) -> anyhow::Error {
        if matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        ) {
            let mut damaged = crate::lock(&self.damaged);
            if damaged.is_none() {
                tracing::error!(error = %e, "the database is damaged");
                *damaged = Some(format!("the database is damaged: {e}"));
            }
        }
        sql_err(e)
    }
}

impl SqliteDb {
    /// Every row of the database in one read transaction, for a move to another database
    /// (`jobrelay server migrate`); `mark` is the job-id mark of its data directory (0 when
    /// there is none), so the highest id counts ids handed out by uploads that never committed.
    pub fn snapshot(&self, mark: i64) -> anyhow::Result<Snapshot> {
        let mut conn = crate::lock(&self.conn);
        let tx = conn.transaction().map_err(|e| self.sql_err(e))?;
        let read = |sql: &str| tx.prepare(sql).map_err(|e| self.sql_err(e));
        let jobs = read(&format!(
            "SELECT {COLUMNS}, callback_url, callback_events FROM jobs ORDER BY id"
        ))?
        .query_map([], |row| {
            Ok(JobRow {
                job: job_from_row(row)?,
                callback_url: row.get(19)?,
                callback_events: row.get(20)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| self.sql_err(e))?;
        let events = read(
            "SELECT job_id, at_ms, status, message, attempts, client FROM job_events
             ORDER BY rowid",
        )?
        .query_map([], |r| {
            Ok(EventRow {
                job_id: r.get(0)?,
                at_ms: r.get(1)?,
                status: r.get(2)?,
                message: r.get(3)?,
                attempts: r.get(4)?,
                client: r.get(5)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| self.sql_err(e))?;
        let outbox = read(
            "SELECT id, job_id, event, url, body, created_ms, attempts, last_status, next_ms,
                    outcome
             FROM webhook_outbox ORDER BY rowid",
        )?
        .query_map([], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                job_id: r.get(1)?,
                event: r.get(2)?,
                url: r.get(3)?,
                body: r.get(4)?,
                created_ms: r.get(5)?,
                attempts: r.get(6)?,
                last_status: r.get(7)?,
                next_ms: r.get(8)?,
                outcome: r.get(9)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| self.sql_err(e))?;
        let abandoned = read(
            "SELECT client, dest_id, dispatch_key, job_id FROM abandoned_runs
             ORDER BY client, dest_id",
        )?
        .query_map([], |r| {
            Ok(AbandonedRun {
                client: r.get(0)?,
                dest_id: r.get(1)?,
                key: r.get(2)?,
                job_id: r.get(3)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| self.sql_err(e))?;
        let usage = read(
            "SELECT service, user_id, core_seconds, at_ms FROM user_usage
             ORDER BY service, user_id",
        )?
        .query_map([], |r| {
            Ok(UsageRow {
                service: r.get(0)?,
                user_id: r.get(1)?,
                core_seconds: r.get(2)?,
                at_ms: r.get(3)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| self.sql_err(e))?;
        let rates =
            read("SELECT service, user_id, tat_ms FROM upload_rate ORDER BY service, user_id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| self.sql_err(e))?;
        let result_zips = read("SELECT job_id, zip FROM result_zips ORDER BY job_id")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.sql_err(e))?;
        let input_files =
            read("SELECT job_id, pos, name, bytes FROM input_files ORDER BY job_id, pos")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| self.sql_err(e))?;
        let highest: i64 = tx
            .query_row(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),
                        COALESCE((SELECT MAX(id) FROM jobs), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql_err(e))?;
        tx.commit().map_err(|e| self.sql_err(e))?;
        Ok(Snapshot {
            server_id: self.server_id.clone(),
            jobs,
            events,
            outbox,
            abandoned,
            usage,
            rates,
            result_zips,
            input_files,
            highest_id: highest.max(mark),
        })
    }
}

impl JobDb for SqliteDb {
    fn mark_at_open(&self) -> i64 {
        self.mark_at_open
    }
    fn all_ids(&self) -> anyhow::Result<HashSet<i64>> {
        self.all("SELECT id FROM jobs", [], |r| r.get(0))
    }
    fn health(&self) -> Result<(), String> {
        if let Some(why) = crate::lock(&self.damaged).clone() {
            return Err(why);
        }
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get::<_, i64>(0))
            .map(|_| ())
            .map_err(|e| self.sql_err(e).to_string())
    }
    fn check_integrity(&self) -> Result<(), String> {
        // A read-only connection of its own: WAL lets it read beside the store's, so a check
        // of a large database holds up no upload or status call.
        let result: Result<Vec<String>, rusqlite::Error> =
            Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|conn| {
                    conn.prepare("PRAGMA quick_check(5)").and_then(|mut stmt| {
                        stmt.query_map([], |r| r.get::<_, String>(0))?
                            .collect::<Result<Vec<_>, _>>()
                    })
                });
        let why = match result {
            Ok(lines) if lines == ["ok"] => return Ok(()),
            Ok(lines) => format!("database integrity check failed: {}", lines.join("; ")),
            Err(e) => format!("database integrity check failed: {e}"),
        };
        tracing::error!("{why}");
        *crate::lock(&self.damaged) = Some(why.clone());
        Err(why)
    }
    fn server_id(&self) -> &str {
        &self.server_id
    }
    fn insert_job(
        &self,
        user_id: i64,
        service: &str,
        callback: Option<&Callback>,
        resources: &JobResources,
        inputs: &[InputFile],
        place_files: &mut dyn FnMut(i64) -> std::io::Result<()>,
    ) -> anyhow::Result<Job> {
        let mut conn = crate::sync::lock_off_worker(&self.conn);
        let tx = conn.transaction().map_err(|e| self.sql_err(e))?;
        let now = now_ms();
        tx.prepare_cached(
            "INSERT INTO jobs (status, message, user_id, service, created_ms, updated_ms,
                               callback_url, callback_events,
                               cores, memory_mb, gpus, walltime_s, priority)
             VALUES ('Queued', 'Job queued', ?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                user_id,
                service,
                now,
                callback.map(|c| c.url.as_str()),
                callback.map(events_column),
                resources.cores,
                resources.memory_mb.map(|m| m as i64),
                resources.gpus,
                resources.walltime_s.map(|w| w as i64),
                resources.priority,
            ])
        })
        .map_err(|e| self.sql_err(e))?;
        let id = tx.last_insert_rowid();
        // Before the commit: a mark ahead of the database skips an id, never reuses one.
        if let Some(mark) = &self.mark {
            write_mark(&crate::lock(mark), id)
                .map_err(|e| anyhow::anyhow!("cannot record the job-id mark: {e}"))?;
        }
        record_event(&tx, id, now, JobStatus::Queued, "Job queued", 0, None)?;
        if !inputs.is_empty() {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO input_files (job_id, pos, name, bytes) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| self.sql_err(e))?;
            for (pos, file) in inputs.iter().enumerate() {
                stmt.execute(params![id, pos as i64, file.name, &file.bytes[..]])
                    .map_err(|e| self.sql_err(e))?;
            }
        }
        place_files(id)?;
        let job = tx
            .prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))
            .and_then(|mut stmt| stmt.query_row([id], job_from_row))
            .map_err(|e| self.sql_err(e))?;
        tx.commit().map_err(|e| self.sql_err(e))?;
        Ok(job)
    }
    fn get(&self, id: i64) -> anyhow::Result<Option<Job>> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))
            .and_then(|mut stmt| stmt.query_row([id], job_from_row).optional())
            .map_err(|e| self.sql_err(e))
    }
    fn result_zip(&self, id: i64) -> anyhow::Result<Option<bytes::Bytes>> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached("SELECT zip FROM result_zips WHERE job_id = ?1")
            .and_then(|mut stmt| stmt.query_row([id], |r| r.get::<_, Vec<u8>>(0)).optional())
            .map(|zip| zip.map(bytes::Bytes::from))
            .map_err(|e| self.sql_err(e))
    }
    fn input_files(&self, id: i64) -> anyhow::Result<Vec<InputFile>> {
        self.all(
            "SELECT name, bytes FROM input_files WHERE job_id = ?1 ORDER BY pos",
            [id],
            |r| {
                Ok(InputFile {
                    name: r.get(0)?,
                    bytes: bytes::Bytes::from(r.get::<_, Vec<u8>>(1)?),
                })
            },
        )
    }
    fn drop_inputs(&self, id: i64) -> anyhow::Result<()> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached("DELETE FROM input_files WHERE job_id = ?1")
            .and_then(|mut stmt| stmt.execute([id]))
            .map(|_| ())
            .map_err(|e| self.sql_err(e))
    }
    fn transition(
        &self,
        id: i64,
        from: &[JobStatus],
        to: JobStatus,
        change: Change,
    ) -> anyhow::Result<Option<Job>> {
        let mut conn = crate::sync::lock_off_worker(&self.conn);
        let tx = conn.transaction().map_err(|e| self.sql_err(e))?;
        let now = now_ms();
        let mut sets = vec!["status = ?1".to_owned(), "updated_ms = ?2".to_owned()];
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(to.as_str()), Box::new(now)];
        let mut push = |column: &str, value: Box<dyn rusqlite::ToSql>| {
            values.push(value);
            sets.push(format!("{column} = ?{}", values.len()));
        };
        if let Some(v) = change.message.clone() {
            push("message", Box::new(v));
        }
        if let Some(v) = change.attempts {
            push("attempts", Box::new(v));
        }
        if let Some(v) = change.client.clone() {
            push("client", Box::new(v));
        }
        if let Some(v) = change.dest_id {
            push("dest_id", Box::new(v));
        }
        if let Some(v) = change.node.clone() {
            push("node", Box::new(v));
        }
        if let Some(v) = change.dispatch_key.clone() {
            push("dispatch_key", Box::new(v));
        }
        if let Some(v) = change.exit_code {
            push("exit_code", Box::new(v));
        }
        if to.is_finished() && to != JobStatus::Cleaned {
            push("finished_ms", Box::new(now));
        }
        values.push(Box::new(id));
        let id_param = values.len();
        let states = from
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        // Only while the job is still in the run the change is about (its dispatch key).
        let (run_guard, run_key) = match &change.only_run {
            Some(key) => ("AND dispatch_key IS ?2", key.clone()),
            None => ("", None),
        };
        if change.abandon_run {
            // Read before the update clears them: the run this change gives away.
            tx.prepare_cached(&format!(
                "INSERT OR REPLACE INTO abandoned_runs (client, dest_id, dispatch_key, job_id)
                 SELECT client, dest_id, dispatch_key, id FROM jobs
                 WHERE id = ?1 AND status IN ({states}) {run_guard}
                 AND client IS NOT NULL AND dest_id IS NOT NULL"
            ))
            .and_then(|mut stmt| {
                if change.only_run.is_some() {
                    stmt.execute(params![id, run_key])
                } else {
                    stmt.execute([id])
                }
            })
            .map_err(|e| self.sql_err(e))?;
        }
        let run_guard = if change.only_run.is_some() {
            values.push(Box::new(run_key));
            format!("AND dispatch_key IS ?{}", values.len())
        } else {
            String::new()
        };
        let sql = format!(
            "UPDATE jobs SET {} WHERE id = ?{id_param} AND status IN ({states}) {run_guard} \
             RETURNING {COLUMNS}",
            sets.join(", ")
        );
        // A handful of distinct statements (by the fields set): parsed once, then cached.
        let job = tx
            .prepare_cached(&sql)
            .and_then(|mut stmt| {
                stmt.query_row(
                    rusqlite::params_from_iter(values.iter().map(|v| v.as_ref())),
                    job_from_row,
                )
                .optional()
            })
            .map_err(|e| self.sql_err(e))?;
        match &job {
            // A Cleaned job keeps its row (its id answers) but not its timeline: the events
            // table would otherwise grow with every job ever run.
            // So do its ended notifications; pending ones go on until they end.
            Some(_) if to == JobStatus::Cleaned => {
                tx.prepare_cached("DELETE FROM job_events WHERE job_id = ?1")
                    .and_then(|mut stmt| stmt.execute([id]))
                    .map_err(|e| self.sql_err(e))?;
                tx.prepare_cached(
                    "DELETE FROM webhook_outbox WHERE job_id = ?1 AND next_ms IS NULL",
                )
                .and_then(|mut stmt| stmt.execute([id]))
                .map_err(|e| self.sql_err(e))?;
                tx.prepare_cached("DELETE FROM result_zips WHERE job_id = ?1")
                    .and_then(|mut stmt| stmt.execute([id]))
                    .map_err(|e| self.sql_err(e))?;
                tx.prepare_cached("DELETE FROM input_files WHERE job_id = ?1")
                    .and_then(|mut stmt| stmt.execute([id]))
                    .map_err(|e| self.sql_err(e))?;
            }
            Some(job) => {
                if change.drop_inputs {
                    tx.prepare_cached("DELETE FROM input_files WHERE job_id = ?1")
                        .and_then(|mut stmt| stmt.execute([id]))
                        .map_err(|e| self.sql_err(e))?;
                }
                if let Some(zip) = &change.result_zip {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO result_zips (job_id, zip) VALUES (?1, ?2)",
                    )
                    .and_then(|mut stmt| stmt.execute(params![id, &zip.0[..]]))
                    .map_err(|e| self.sql_err(e))?;
                }
                record_event(
                    &tx,
                    id,
                    now,
                    to,
                    &job.message,
                    job.attempts,
                    job.client.as_deref(),
                )?;
                queue_notification(&tx, job, now)?;
            }
            None => {}
        }
        tx.commit().map_err(|e| self.sql_err(e))?;
        Ok(job)
    }
    fn history(&self, id: i64) -> anyhow::Result<Vec<JobEvent>> {
        self.all(
            "SELECT at_ms, status, message, attempts, client FROM job_events
                 WHERE job_id = ?1 ORDER BY rowid",
            [id],
            |row| {
                let at_ms: i64 = row.get(0)?;
                Ok(JobEvent {
                    at_ms,
                    at: rfc3339(at_ms),
                    status: row.get(1)?,
                    message: row.get(2)?,
                    attempts: row.get(3)?,
                    client: row.get(4)?,
                })
            },
        )
    }
    fn counts(&self, user: Option<i64>) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.all(
            "SELECT service, status, COUNT(*) FROM jobs
                 WHERE ?1 IS NULL OR user_id = ?1 GROUP BY service, status",
            [user],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
    }
    fn finished_per_minute(
        &self,
        since_ms: i64,
        user: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        self.all(
            "SELECT finished_ms / 60000 * 60000 AS minute, COUNT(*) FROM jobs
                 WHERE finished_ms >= ?1 AND (?2 IS NULL OR user_id = ?2)
                 GROUP BY minute ORDER BY minute",
            params![since_ms, user],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
    }
    fn in_states(&self, states: &[JobStatus]) -> anyhow::Result<Vec<Job>> {
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        self.all(
            &format!("SELECT {COLUMNS} FROM jobs WHERE status IN ({list}) ORDER BY id"),
            [],
            job_from_row,
        )
    }
    fn on_client(&self, base: &str) -> anyhow::Result<Vec<Job>> {
        self.all(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE client = ?1 AND status IN ('Submitted', 'Running') ORDER BY id"
            ), [base], job_from_row)
    }
    fn abandoned_on(&self, base: &str) -> anyhow::Result<Vec<AbandonedRun>> {
        self.all(
            "SELECT client, dest_id, dispatch_key, job_id FROM abandoned_runs
                 WHERE client = ?1 ORDER BY dest_id",
            [base],
            |r| {
                Ok(AbandonedRun {
                    client: r.get(0)?,
                    dest_id: r.get(1)?,
                    key: r.get(2)?,
                    job_id: r.get(3)?,
                })
            },
        )
    }
    fn usage(&self) -> anyhow::Result<Vec<UsageRow>> {
        self.all(
            "SELECT service, user_id, core_seconds, at_ms FROM user_usage
                 ORDER BY service, user_id",
            [],
            |r| {
                Ok(UsageRow {
                    service: r.get(0)?,
                    user_id: r.get(1)?,
                    core_seconds: r.get(2)?,
                    at_ms: r.get(3)?,
                })
            },
        )
    }
    fn save_usage(&self, row: &UsageRow) -> anyhow::Result<()> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached(
            "INSERT INTO user_usage (service, user_id, core_seconds, at_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (service, user_id)
                 DO UPDATE SET core_seconds = excluded.core_seconds, at_ms = excluded.at_ms",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                row.service,
                row.user_id,
                row.core_seconds,
                row.at_ms
            ])
        })
        .map_err(|e| self.sql_err(e))?;
        Ok(())
    }
    fn take_upload_slot(
        &self,
        service: &str,
        user_id: i64,
        quota: crate::ratelimit::RateQuota,
        now_ms: i64,
    ) -> anyhow::Result<Result<(), i64>> {
        // One connection behind one lock: the read and the write cannot interleave with
        // another upload's.
        let conn = crate::sync::lock_off_worker(&self.conn);
        let tat: Option<i64> = conn
            .prepare_cached("SELECT tat_ms FROM upload_rate WHERE service = ?1 AND user_id = ?2")
            .and_then(|mut stmt| {
                stmt.query_row(params![service, user_id], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.sql_err(e))?;
        match quota.take(tat, now_ms) {
            Err(wait) => Ok(Err(wait)),
            Ok(tat) => {
                conn.prepare_cached(
                    "INSERT INTO upload_rate (service, user_id, tat_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT (service, user_id) DO UPDATE SET tat_ms = excluded.tat_ms",
                )
                .and_then(|mut stmt| stmt.execute(params![service, user_id, tat]))
                .map_err(|e| self.sql_err(e))?;
                Ok(Ok(()))
            }
        }
    }
    fn forget_abandoned(&self, base: &str, dest_id: i64) -> anyhow::Result<()> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached("DELETE FROM abandoned_runs WHERE client = ?1 AND dest_id = ?2")
            .and_then(|mut stmt| stmt.execute(params![base, dest_id]))
            .map_err(|e| self.sql_err(e))?;
        Ok(())
    }
    fn by_dest(&self, base: &str, dest_id: i64) -> anyhow::Result<Option<Job>> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE client = ?1 AND dest_id = ?2 ORDER BY id DESC LIMIT 1"
            ))
            .map_err(|e| self.sql_err(e))?;
        stmt.query_row(params![base, dest_id], job_from_row)
            .optional()
            .map_err(|e| self.sql_err(e))
    }
    fn finished_before(&self, cutoff_ms: i64) -> anyhow::Result<Vec<i64>> {
        self.all(
            "SELECT id FROM jobs WHERE status IN ('Completed', 'Failed', 'Invalid', 'Killed')
             AND COALESCE(finished_ms, updated_ms) < ?1 ORDER BY id",
            [cutoff_ms],
            |r| r.get(0),
        )
    }
    fn ids_with_files(&self) -> anyhow::Result<HashSet<i64>> {
        self.all("SELECT id FROM jobs WHERE status != 'Cleaned'", [], |r| {
            r.get(0)
        })
    }
    fn list(&self, filter: &ListFilter) -> anyhow::Result<(Vec<Job>, i64)> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        let mut conditions = Vec::new();
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(user) = filter.user_id {
            values.push(Box::new(user));
            conditions.push(format!("user_id = ?{}", values.len()));
        }
        if let Some(service) = &filter.service {
            values.push(Box::new(service.clone()));
            conditions.push(format!("service = ?{}", values.len()));
        }
        if let Some(status) = filter.status {
            values.push(Box::new(status.as_str()));
            conditions.push(format!("status = ?{}", values.len()));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let total: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM jobs {clause}"),
                rusqlite::params_from_iter(values.iter().map(|v| v.as_ref())),
                |r| r.get(0),
            )
            .map_err(|e| self.sql_err(e))?;
        values.push(Box::new(filter.limit));
        values.push(Box::new(filter.offset));
        let n = values.len();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?{} OFFSET ?{n}",
                n - 1
            ))
            .map_err(|e| self.sql_err(e))?;
        let jobs = stmt
            .query_map(
                rusqlite::params_from_iter(values.iter().map(|v| v.as_ref())),
                job_from_row,
            )
            .map_err(|e| self.sql_err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql_err(e))?;
        Ok((jobs, total))
    }
    fn count(&self) -> anyhow::Result<i64> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .map_err(|e| self.sql_err(e))
    }
    fn due_deliveries(&self, now_ms: i64, limit: usize) -> anyhow::Result<Vec<Delivery>> {
        self.all(
            "SELECT o.id, o.job_id, j.service, o.event, o.url, o.body, o.created_ms,
                        o.attempts
                 FROM webhook_outbox o JOIN jobs j ON j.id = o.job_id
                 WHERE o.next_ms IS NOT NULL AND o.next_ms <= ?1
                 ORDER BY o.next_ms LIMIT ?2",
            params![now_ms, limit as i64],
            |r| {
                Ok(Delivery {
                    id: r.get(0)?,
                    job_id: r.get(1)?,
                    service: r.get(2)?,
                    event: r.get(3)?,
                    url: r.get(4)?,
                    body: r.get(5)?,
                    created_ms: r.get(6)?,
                    attempts: r.get(7)?,
                })
            },
        )
    }
    fn next_delivery_ms(&self) -> anyhow::Result<Option<i64>> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.query_row(
            "SELECT MIN(next_ms) FROM webhook_outbox WHERE next_ms IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .map_err(|e| self.sql_err(e))
    }
    fn retry_delivery(&self, id: &str, status: &str, next_ms: i64) -> anyhow::Result<()> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = ?2, next_ms = ?3
             WHERE id = ?1 AND next_ms IS NOT NULL",
        )
        .and_then(|mut stmt| stmt.execute(params![id, status, next_ms]))
        .map_err(|e| self.sql_err(e))?;
        Ok(())
    }
    fn finish_delivery(
        &self,
        id: &str,
        status: &str,
        tried: bool,
        end: DeliveryEnd,
    ) -> anyhow::Result<()> {
        let conn = crate::sync::lock_off_worker(&self.conn);
        conn.prepare_cached(
            "UPDATE webhook_outbox SET attempts = attempts + ?2, last_status = ?3,
                    next_ms = NULL, outcome = ?4
             WHERE id = ?1 AND next_ms IS NOT NULL",
        )
        .and_then(|mut stmt| stmt.execute(params![id, i64::from(tried), status, end.as_str()]))
        .map_err(|e| self.sql_err(e))?;
        Ok(())
    }
    fn notifications(&self, id: i64) -> anyhow::Result<Vec<Notification>> {
        self.all(
            "SELECT id, event, url, attempts, last_status, next_ms, outcome
                 FROM webhook_outbox WHERE job_id = ?1 ORDER BY created_ms, rowid",
            [id],
            |r| {
                Ok(Notification {
                    id: r.get(0)?,
                    event: r.get(1)?,
                    url: r.get(2)?,
                    attempts: r.get(3)?,
                    last_status: r.get(4)?,
                    next_try_ms: r.get(5)?,
                    outcome: r.get(6)?,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_of_an_older_version_gains_the_callback_columns() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "CREATE TABLE jobs (
                     id INTEGER PRIMARY KEY AUTOINCREMENT, status TEXT NOT NULL,
                     message TEXT NOT NULL DEFAULT '', user_id INTEGER NOT NULL,
                     service TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, client TEXT,
                     dest_id INTEGER, node TEXT, dispatch_key TEXT, exit_code INTEGER,
                     created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
                     finished_ms INTEGER);
                 INSERT INTO jobs (status, user_id, service, created_ms, updated_ms)
                     VALUES ('Running', 1, 'x', 0, 0);",
            )
            .unwrap();
        let store = SqliteDb::open(&db).unwrap();
        // The old job asked for nothing: one core, priority 0.
        assert_eq!(
            store.get(1).unwrap().unwrap().resources,
            JobResources::default()
        );
        // The old job has no callback: finishing it announces nothing.
        store
            .transition(
                1,
                &[JobStatus::Running],
                JobStatus::Failed,
                Change::default(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(store.next_delivery_ms().unwrap(), None);
        let callback = Callback {
            url: "http://hooks/".into(),
            on_running: false,
        };
        let job = store
            .insert_job(
                1,
                "x",
                Some(&callback),
                &JobResources::default(),
                &[],
                &mut |_| Ok(()),
            )
            .unwrap();
        store
            .transition(
                job.id,
                &[JobStatus::Queued],
                JobStatus::Killed,
                Change::default(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(store.due_deliveries(now_ms(), 10).unwrap().len(), 1);
        drop(store);
        // Opening again adds nothing twice.
        SqliteDb::open(&db).unwrap();
    }

    #[test]
    fn job_ids_continue_above_the_mark_when_the_database_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mark) = (dir.path().join("db.sqlite"), dir.path().join("last-job-id"));
        let store = SqliteDb::open_with_mark(&db, &mark).unwrap();
        for _ in 0..3 {
            store
                .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap();
        }
        drop(store);
        assert_eq!(std::fs::read_to_string(&mark).unwrap().trim(), "3");
        // `truncate -s 0` of the database (its WAL was merged when it was closed).
        std::fs::write(&db, b"").unwrap();
        let store = SqliteDb::open_with_mark(&db, &mark).unwrap();
        assert_eq!(store.count().unwrap(), 0);
        assert_eq!(store.mark_at_open(), 3);
        assert_eq!(
            store
                .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap()
                .id,
            4
        );
        drop(store);
        // A database that is ahead of a lost mark sets it.
        std::fs::remove_file(&mark).unwrap();
        let store = SqliteDb::open_with_mark(&db, &mark).unwrap();
        assert_eq!(
            store
                .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap()
                .id,
            5
        );
        drop(store);
        std::fs::write(&mark, "five").unwrap();
        assert!(SqliteDb::open_with_mark(&db, &mark).is_err());
    }

    #[test]
    fn a_damaged_page_fails_the_health_check() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteDb::open(&db).unwrap();
        for _ in 0..50 {
            let job = store
                .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap();
            store
                .transition(
                    job.id,
                    &[JobStatus::Queued],
                    JobStatus::Killed,
                    Change::message("x".repeat(200)),
                )
                .unwrap();
        }
        assert_eq!(store.health(), Ok(()));
        assert_eq!(store.check_integrity(), Ok(()));
        drop(store);
        // Overwrite the root page of the job timeline, which nothing reads at start.
        let (page, size): (i64, i64) = {
            let conn = Connection::open(&db).unwrap();
            let page = conn
                .query_row(
                    "SELECT rootpage FROM sqlite_master WHERE name = 'job_events'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let size = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap();
            (page, size)
        };
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            file.write_all_at(&vec![0xA5; size as usize], ((page - 1) * size) as u64)
                .unwrap();
        }
        let store = SqliteDb::open(&db).unwrap();
        assert!(store.check_integrity().is_err());
        let why = store.health().unwrap_err();
        assert!(why.contains("integrity"), "{why}");
    }

    /// The suite's `a_cleaned_job_keeps_no_timeline` on a database of an older version, which
    /// kept the timelines of Cleaned jobs: they are pruned once, at open.
    #[test]
    fn the_timelines_an_older_version_kept_of_cleaned_jobs_are_pruned_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let store = SqliteDb::open(&db).unwrap();
        let cleaned = store
            .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
            .unwrap()
            .id;
        let kept = store
            .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
            .unwrap()
            .id;
        for id in [cleaned, kept] {
            store
                .transition(
                    id,
                    &[JobStatus::Queued],
                    JobStatus::Killed,
                    Change::message("k"),
                )
                .unwrap()
                .unwrap();
        }
        store
            .transition(
                cleaned,
                &JobStatus::FINISHED,
                JobStatus::Cleaned,
                Change::message("files removed"),
            )
            .unwrap()
            .unwrap();
        drop(store);
        {
            let conn = Connection::open(&db).unwrap();
            conn.execute(
                "INSERT INTO job_events (job_id, at_ms, status, message, attempts)
                 VALUES (?1, 0, 'Queued', 'old', 0)",
                [cleaned],
            )
            .unwrap();
            conn.execute("DELETE FROM meta WHERE key = 'cleaned_events_pruned'", [])
                .unwrap();
        }
        let store = SqliteDb::open(&db).unwrap();
        assert_eq!(store.history(cleaned).unwrap(), vec![]);
        assert_eq!(store.history(kept).unwrap().len(), 2);
    }

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_859_341_823), "2026-11-28T09:49:01.823Z");
    }
}
