//! The store on PostgreSQL: the same tables and the same guarded transactions as the SQLite
//! store, for a server whose database is a PostgreSQL server (`--db postgres://...`).
//!
//! Driver: tokio-postgres with a deadpool pool of connections. [`JobDb`] is synchronous and
//! its calls arrive from anywhere: a tokio worker inside `block_in_place` (the job table's
//! `off_worker`), a blocking-pool thread, a current-thread runtime's only thread, or a plain
//! thread (tests, start-up). `Handle::block_on` or `Runtime::block_on` would panic on some
//! of those (a thread that is inside a runtime), so every call is a task on a small runtime
//! that this store owns (one worker thread, which also drives the pool's connections), and
//! the calling thread waits for its answer on a standard channel: that works from every one
//! of those places, and the connections outlive whichever runtime the caller runs on.
//!
//! TLS to the database: `sslmode` (`disable`, `prefer`, `require`, `verify-ca`,
//! `verify-full`) and `sslrootcert` in the URL, read as libpq reads them, through a rustls
//! connector ([`tls`]).

mod import;
mod migrate;
#[cfg(test)]
pub mod testing;
pub mod tls;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

pub use tls::TlsMode;

use super::snapshot::{Moved, Snapshot};
use super::{
    now_ms, AbandonedRun, Callback, Change, Cluster, Delivery, DeliveryEnd, Fenced, InputFile, Job,
    JobDb, JobEvent, JobResources, JobStatus, Lease, ListFilter, Notice, Notification, ServerBeat,
    Unavailable, UsageRow,
};

const COLUMNS: &str = "id, status, message, user_id, service, attempts, client, dest_id, node, \
                       dispatch_key, exit_code, created_ms, updated_ms, finished_ms, \
                       cores, memory_mb, gpus, walltime_s, priority";
/// Where the callback columns follow [`COLUMNS`] in a transition's `RETURNING`.
const CALLBACK_AT: usize = 19;

/// Connections kept open to the database: the server's calls are short, a few at a time.
const POOL_SIZE: usize = 16;
/// Longest wait for a new connection (TCP connect and authentication).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a free connection of the pool when all are busy: past it a request that
/// needs the database answers 503 rather than hanging (a database down or restarting).
const WAIT_TIMEOUT: Duration = Duration::from_secs(3);
/// A session left idle inside a transaction this long is ended by the database: a server
/// stopped (SIGSTOP, a frozen VM) in the middle of a job-state write holds the lease row's
/// share lock, which would keep every other server from taking the lease.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);
/// Fence value while fencing is off (a store used by one process, the tests of the suite).
const NO_FENCE: i64 = -1;
/// Pause between two attempts to make the listening connection again.
const LISTEN_RETRY: Duration = Duration::from_millis(500);

type Param = Box<dyn ToSql + Sync + Send>;

/// The PostgreSQL implementation of [`JobDb`].
pub struct PgDb {
    /// Runs every database call (see the module's documentation); `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    server_id: String,
    /// For the listening connection, which is not pooled.
    config: tokio_postgres::Config,
    tls: TlsMode,
    /// The NOTIFY channel of this database (its identity: channels are per database, and
    /// tests share one database between schemas).
    channel: String,
    /// The lease epoch job-state writes carry ([`Cluster::fence`]); [`NO_FENCE`] by default.
    fence: Arc<AtomicI64>,
    refused: Arc<tokio::sync::Notify>,
}

/// The URL without its password, for messages and logs: the one in the user info (which
/// ends at the last `@` before the query, since a password may hold a `/`) and a `password`
/// query parameter.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let main = match before_query.rsplit_once('@') {
        Some((userinfo, host_and_path)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host_and_path}"),
            None => before_query.to_owned(),
        },
        None => before_query.to_owned(),
    };
    let Some(query) = query else {
        return format!("{scheme}://{main}");
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}://{main}?{query}")
}

/// Reads a `postgres://` (or `postgresql://`) URL into the driver's configuration (see
/// [`parse_url_with_tls`]; this one is for callers that connect without TLS).
pub fn parse_url(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    parse_url_with_tls(url).map(|(config, _)| config)
}

/// Reads a `postgres://` (or `postgresql://`) URL into the driver's configuration and what it
/// asks of TLS (`sslmode`, `sslrootcert`, read as libpq reads them: [`tls`]), refusing what
/// this store does not support with the reason.
pub fn parse_url_with_tls(url: &str) -> anyhow::Result<(tokio_postgres::Config, TlsMode)> {
    let shown = redact(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        anyhow::bail!("{shown} is not a PostgreSQL URL: it starts with postgres://");
    }
    // The TLS keys are ours to read (the driver knows neither verify-* nor sslrootcert);
    // every other parameter goes to the driver as it was written.
    let (mut mode, mut root_cert) = (None, None);
    let driver_url = match url.split_once('?') {
        None => url.to_owned(),
        Some((base, query)) => {
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let parsed = url::form_urlencoded::parse(pair.as_bytes()).next();
                match parsed {
                    Some((key, value)) if key == "sslmode" => mode = Some(value.into_owned()),
                    Some((key, value)) if key == "sslrootcert" => {
                        root_cert = Some(value.into_owned())
                    }
                    Some((key, _)) if matches!(&*key, "sslcert" | "sslkey" | "sslpassword") => {
                        anyhow::bail!(
                            "{shown}: {key} is not supported: jobrelay does not present a                              client certificate; authenticate with a password"
                        )
                    }
                    _ => kept.push(pair),
                }
            }
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
    };
    let tls = TlsMode::from_params(mode.as_deref(), root_cert.as_deref())
        .map_err(|why| anyhow::anyhow!("{shown}: {why}"))?;
    let mut config: tokio_postgres::Config = driver_url
        .parse()
        .map_err(|e| anyhow::anyhow!("bad PostgreSQL URL {shown}: {e}"))?;
    config.ssl_mode(tls.ssl_mode());
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("jobrelay");
    }
    Ok((config, tls))
}

impl PgDb {
    /// Connects to the database at `url`, brings its schema up to date and reads (or makes)
    /// its identity. Fails with the URL (without password) when it cannot.
    pub fn open(url: &str) -> anyhow::Result<Self> {
        let shown = redact(url);
        let (config, tls) = parse_url_with_tls(url)?;
        Self::connect_with(config, &tls, &shown)
    }

    /// [`PgDb::open`] with a configuration already read, without TLS; `shown` names it in
    /// errors.
    pub fn connect(config: tokio_postgres::Config, shown: &str) -> anyhow::Result<Self> {
        Self::connect_with(config, &TlsMode::Off, shown)
    }

    /// [`PgDb::connect`] over TLS as `tls` says.
    pub fn connect_with(
        mut config: tokio_postgres::Config,
        tls: &TlsMode,
        shown: &str,
    ) -> anyhow::Result<Self> {
        let idle = format!(
            "-c idle_in_transaction_session_timeout={}",
            IDLE_IN_TRANSACTION.as_millis()
        );
        let options = match config.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {idle}"),
            _ => idle,
        };
        config.options(&options);
        config.keepalives_idle(Duration::from_secs(10));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("jobrelay-postgres")
            .enable_all()
            .build()?;
        let manager_config = || ManagerConfig {
            // A connection is checked by its state, not a query: a broken one is closed
            // (the driver sees the socket end) and replaced at the next call.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls
            .connector()
            .map_err(|e| anyhow::anyhow!("cannot open the PostgreSQL database {shown}: {e:#}"))?
        {
            Some(connector) => Manager::from_config(config.clone(), connector, manager_config()),
            None => Manager::from_config(config.clone(), NoTls, manager_config()),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(WAIT_TIMEOUT))
            .build()?;
        let mut db = PgDb {
            runtime: Some(runtime),
            pool,
            server_id: String::new(),
            config,
            tls: tls.clone(),
            channel: String::new(),
            fence: Arc::new(AtomicI64::new(NO_FENCE)),
            refused: Arc::new(tokio::sync::Notify::new()),
        };
        let fresh_id = uuid::Uuid::new_v4().to_string();
        db.server_id = db
            .run(|pool| async move {
                let mut client = pool.get().await?;
                let applied = migrate::migrate(&mut client).await?;
                if !applied.is_empty() {
                    tracing::info!(?applied, "database schema migrated");
                }
                client
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('server_id', $1)
                         ON CONFLICT (key) DO NOTHING",
                        &[&fresh_id],
                    )
                    .await?;
                let row = client
                    .query_one("SELECT value FROM meta WHERE key = 'server_id'", &[])
                    .await?;
                Ok(row.get::<_, String>(0))
            })
            .map_err(|e| anyhow::anyhow!("cannot open the PostgreSQL database {shown}: {e:#}"))?;
        db.channel = format!("jobrelay_{}", db.server_id.replace('-', ""));
        Ok(db)
    }

    /// Writes a whole database (read from SQLite by `jobrelay server migrate`) into this one,
    /// in one transaction, keeping its ids and identity; refused, with nothing written, when
    /// this database already holds a job.
    pub fn import(&mut self, snapshot: Snapshot) -> anyhow::Result<Moved> {
        let server_id = snapshot.server_id.clone();
        let moved = self.with_client(move |mut client| async move {
            import::import(&mut client, &snapshot).await
        })?;
        self.channel = format!("jobrelay_{}", server_id.replace('-', ""));
        self.server_id = server_id;
        Ok(moved)
    }

    /// Runs `work` on the store's runtime and waits for its answer on this thread.
    fn run<T, Fut>(&self, work: impl FnOnce(Pool) -> Fut) -> anyhow::Result<T>
    where
        Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let task = work(self.pool.clone());
        runtime.spawn(async move {
            let _ = answer.send(task.await);
        });
        // A round trip to the database: waited for off the async worker.
        crate::sync::off_worker(|| answered.recv())
            .map_err(|_| anyhow::Error::new(Unavailable("the call was cut short".into())))?
            .map_err(classify)
    }

    /// Runs `work` with a pooled connection.
    fn with_client<T, Fut>(
        &self,
        work: impl FnOnce(Object) -> Fut + Send + 'static,
    ) -> anyhow::Result<T>
    where
        Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        self.run(|pool| async move { work(pool.get().await?).await })
    }

    /// Every job `sql` selects (its columns [`COLUMNS`]).
    fn jobs(&self, sql: String, params: Vec<Param>) -> anyhow::Result<Vec<Job>> {
        self.with_client(move |client| async move {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client.query(&statement, &refs(&params)).await?;
            rows.iter().map(job_from_row).collect()
        })
    }

    /// The first column of every row `sql` selects.
    fn column<T>(&self, sql: &'static str, params: Vec<Param>) -> anyhow::Result<Vec<T>>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a> + Send + 'static,
    {
        self.with_client(move |client| async move {
            let statement = client.prepare_cached(sql).await?;
            let rows = client.query(&statement, &refs(&params)).await?;
            rows.iter()
                .map(|r| r.try_get(0).map_err(anyhow::Error::from))
                .collect()
        })
    }

    /// Runs one statement that changes rows.
    fn execute(&self, sql: &'static str, params: Vec<Param>) -> anyhow::Result<()> {
        self.with_client(move |client| async move {
            let statement = client.prepare_cached(sql).await?;
            client.execute(&statement, &refs(&params)).await?;
            Ok(())
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Dropping a runtime blocks on its tasks, which panics inside an async context (the
        // last holder of the store may be a task); nothing of ours is left to wait for.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// A failed call as the server needs to see it: refused by the fence ([`Fenced`]), the
/// database out of reach ([`Unavailable`]: no connection, a broken one, the server shutting
/// down), or another error.
fn classify(e: anyhow::Error) -> anyhow::Error {
    if e.is::<Fenced>() || e.is::<Unavailable>() {
        return e;
    }
    let out_of_reach = e.chain().any(|cause| {
        if cause
            .downcast_ref::<deadpool_postgres::PoolError>()
            .is_some()
        {
            return true;
        }
        cause
            .downcast_ref::<tokio_postgres::Error>()
            .is_some_and(|pg| match pg.as_db_error() {
                // Connection exceptions (08) and operator intervention (57: shutdown).
                Some(db) => ["08", "57"].iter().any(|c| db.code().code().starts_with(c)),
                // The connection closed or broke under the call.
                None => {
                    pg.is_closed()
                        || std::error::Error::source(pg).is_some_and(|s| s.is::<std::io::Error>())
                }
            })
    });
    if out_of_reach {
        anyhow::Error::new(Unavailable(format!("{e:#}")))
    } else {
        anyhow::anyhow!("database error: {e:#}")
    }
}

/// Tells the other servers (and this one's listener) that job `id` changed; part of the
/// caller's transaction, so sent only if it commits.
async fn notify_changed(
    client: &impl GenericClient,
    channel: &str,
    what: String,
) -> anyhow::Result<()> {
    let statement = client.prepare_cached("SELECT pg_notify($1, $2)").await?;
    client.execute(&statement, &[&channel, &what]).await?;
    Ok(())
}

/// The fence of a job-state write, first in its transaction: the lease row is read under a
/// share lock and must still carry `epoch`. A takeover's update of that row waits for every
/// write holding the lock, and every write after it sees the new epoch and is refused, so no
/// write of a deposed leader commits once another server leads.
async fn check_fence(client: &impl GenericClient, epoch: i64) -> anyhow::Result<()> {
    if epoch == NO_FENCE {
        return Ok(());
    }
    let statement = client
        .prepare_cached("SELECT 1 FROM leader_lease WHERE id = 1 AND epoch = $1 FOR SHARE")
        .await?;
    match client.query_opt(&statement, &[&epoch]).await? {
        Some(_) if epoch > 0 => Ok(()),
        _ => Err(Fenced(epoch).into()),
    }
}

fn status_of(text: &str) -> anyhow::Result<JobStatus> {
    // A status the server does not know is an error naming it, never another state (see the
    // SQLite store's `FromSql`).
    JobStatus::parse(text)
        .ok_or_else(|| anyhow::anyhow!("unknown job status {text:?} in the database"))
}

fn count(value: i64) -> anyhow::Result<u32> {
    u32::try_from(value).map_err(|_| anyhow::anyhow!("count {value} out of range in the database"))
}

fn amount(value: Option<i64>) -> anyhow::Result<Option<u64>> {
    value
        .map(|v| {
            u64::try_from(v).map_err(|_| anyhow::anyhow!("amount {v} out of range in the database"))
        })
        .transpose()
}

/// A request's amount as stored (BIGINT); past `i64::MAX` it is refused, never wrapped.
fn stored(value: Option<u64>) -> anyhow::Result<Option<i64>> {
    value
        .map(|v| i64::try_from(v).map_err(|_| anyhow::anyhow!("amount {v} is too large")))
        .transpose()
}

fn job_from_row(row: &Row) -> anyhow::Result<Job> {
    let created_ms: i64 = row.try_get(11)?;
    let updated_ms: i64 = row.try_get(12)?;
    let finished_ms: Option<i64> = row.try_get(13)?;
    Ok(Job {
        id: row.try_get(0)?,
        status: status_of(row.try_get(1)?)?,
        message: row.try_get(2)?,
        user_id: row.try_get(3)?,
        service: row.try_get(4)?,
        attempts: count(row.try_get(5)?)?,
        client: row.try_get(6)?,
        dest_id: row.try_get(7)?,
        node: row.try_get(8)?,
        dispatch_key: row.try_get(9)?,
        exit_code: row.try_get(10)?,
        created_ms,
        updated_ms,
        finished_ms,
        created_at: super::rfc3339(created_ms),
        updated_at: super::rfc3339(updated_ms),
        finished_at: finished_ms.map(super::rfc3339),
        resources: JobResources {
            cores: count(row.try_get(14)?)?,
            memory_mb: amount(row.try_get(15)?)?,
            gpus: count(row.try_get(16)?)?,
            walltime_s: amount(row.try_get(17)?)?,
            priority: row.try_get(18)?,
        },
    })
}

async fn record_event(
    client: &impl GenericClient,
    job: &Job,
    at_ms: i64,
    status: JobStatus,
) -> anyhow::Result<()> {
    let statement = client
        .prepare_cached(
            "INSERT INTO job_events (job_id, at_ms, status, message, attempts, client)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    client
        .execute(
            &statement,
            &[
                &job.id,
                &at_ms,
                &status.as_str(),
                &job.message,
                &i64::from(job.attempts),
                &job.client,
            ],
        )
        .await?;
    Ok(())
}

/// How `callback_events` is stored: the states that are announced (as in SQLite).
fn events_column(callback: &Callback) -> &'static str {
    if callback.on_running {
        "running,final"
    } else {
        "final"
    }
}

/// Writes `job`'s notification of the state it just reached if its callback (`url`, `events`)
/// asks for it; part of the caller's transaction.
async fn queue_notification(
    client: &impl GenericClient,
    job: &Job,
    url: Option<String>,
    events: Option<String>,
    now: i64,
) -> anyhow::Result<()> {
    let announced = match job.status {
        JobStatus::Running => "running",
        s if s.is_finished() && s != JobStatus::Cleaned => "final",
        _ => return Ok(()),
    };
    let Some(url) = url else {
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
    let statement = client
        .prepare_cached(
            "INSERT INTO webhook_outbox (id, job_id, event, url, body, created_ms, next_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .await?;
    client
        .execute(
            &statement,
            &[
                &uuid::Uuid::new_v4().to_string(),
                &job.id,
                &job.status.as_str(),
                &url,
                &body,
                &now,
            ],
        )
        .await?;
    Ok(())
}

/// A connection inside a transaction opened by hand (`BEGIN`), for the upload, whose files
/// are put in place on the caller's thread between the insert and the commit. Dropped without
/// [`OpenTransaction::commit`] (an error, a panic of the caller), the connection is closed
/// rather than given back to the pool: the server rolls the transaction back, and no later
/// call finds itself inside it.
struct OpenTransaction(Option<Object>);

impl OpenTransaction {
    fn client(&self) -> &Object {
        self.0.as_ref().expect("open until committed or dropped")
    }

    async fn commit(mut self) -> anyhow::Result<()> {
        let client = self.0.take().expect("committed once");
        match client.batch_execute("COMMIT").await {
            Ok(()) => Ok(()),
            Err(e) => {
                drop(Object::take(client));
                Err(e.into())
            }
        }
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

impl JobDb for PgDb {
    fn server_id(&self) -> &str {
        &self.server_id
    }
    /// No mark file: ids come from a sequence, which never hands one out twice.
    fn mark_at_open(&self) -> i64 {
        0
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
        let service = service.to_owned();
        // The input files as column arrays: one statement, one round trip, however many.
        let names: Vec<String> = inputs.iter().map(|f| f.name.clone()).collect();
        let contents: Vec<Vec<u8>> = inputs.iter().map(|f| f.bytes.to_vec()).collect();
        let (cores, gpus, priority) = (
            i64::from(resources.cores),
            i64::from(resources.gpus),
            resources.priority,
        );
        let (memory_mb, walltime_s) = (stored(resources.memory_mb)?, stored(resources.walltime_s)?);
        let url = callback.map(|c| c.url.clone());
        let events = callback.map(events_column);
        let channel = self.channel.clone();
        let (open, job) = self.with_client(move |client| async move {
            client.batch_execute("BEGIN").await?;
            let open = OpenTransaction(Some(client));
            let now = now_ms();
            let statement = open
                .client()
                .prepare_cached(&format!(
                    "INSERT INTO jobs (status, message, user_id, service, created_ms, updated_ms,
                                       callback_url, callback_events,
                                       cores, memory_mb, gpus, walltime_s, priority)
                     VALUES ('Queued', 'Job queued', $1, $2, $3, $3, $4, $5, $6, $7, $8, $9, $10)
                     RETURNING {COLUMNS}"
                ))
                .await?;
            let row = open
                .client()
                .query_one(
                    &statement,
                    &[
                        &user_id,
                        &service,
                        &now,
                        &url,
                        &events,
                        &cores,
                        &memory_mb,
                        &gpus,
                        &walltime_s,
                        &priority,
                    ],
                )
                .await?;
            let job = job_from_row(&row)?;
            if !names.is_empty() {
                let statement = open
                    .client()
                    .prepare_cached(
                        "INSERT INTO input_files (job_id, pos, name, bytes)
                         SELECT $1, pos::INTEGER - 1, name, bytes
                         FROM UNNEST($2::TEXT[], $3::BYTEA[]) WITH ORDINALITY AS f(name, bytes, pos)",
                    )
                    .await?;
                open.client()
                    .execute(&statement, &[&job.id, &names, &contents])
                    .await?;
            }
            record_event(open.client(), &job, now, JobStatus::Queued).await?;
            notify_changed(open.client(), &channel, format!("n{}", job.id)).await?;
            Ok((open, job))
        })?;
        // On the caller's thread, inside the transaction: the job exists if and only if its
        // files were put in place (an error here drops `open`, which rolls back).
        place_files(job.id)?;
        self.run(move |_| open.commit())?;
        Ok(job)
    }
    fn get(&self, id: i64) -> anyhow::Result<Option<Job>> {
        let jobs = self.jobs(
            format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"),
            vec![Box::new(id)],
        )?;
        Ok(jobs.into_iter().next())
    }
    fn result_zip(&self, id: i64) -> anyhow::Result<Option<bytes::Bytes>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached("SELECT zip FROM result_zips WHERE job_id = $1")
                .await?;
            let row = client.query_opt(&statement, &[&id]).await?;
            Ok(match row {
                Some(row) => Some(bytes::Bytes::from(row.try_get::<_, Vec<u8>>(0)?)),
                None => None,
            })
        })
    }
    fn input_files(&self, id: i64) -> anyhow::Result<Vec<InputFile>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT name, bytes FROM input_files WHERE job_id = $1 ORDER BY pos",
                )
                .await?;
            let rows = client.query(&statement, &[&id]).await?;
            rows.iter()
                .map(|row| {
                    Ok(InputFile {
                        name: row.try_get(0)?,
                        bytes: bytes::Bytes::from(row.try_get::<_, Vec<u8>>(1)?),
                    })
                })
                .collect()
        })
    }
    fn drop_inputs(&self, id: i64) -> anyhow::Result<()> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached("DELETE FROM input_files WHERE job_id = $1")
                .await?;
            client.execute(&statement, &[&id]).await?;
            Ok(())
        })
    }
    fn transition(
        &self,
        id: i64,
        from: &[JobStatus],
        to: JobStatus,
        change: Change,
    ) -> anyhow::Result<Option<Job>> {
        let now = now_ms();
        let mut sets = vec!["status = $1".to_owned(), "updated_ms = $2".to_owned()];
        let mut values: Vec<Param> = vec![Box::new(to.as_str()), Box::new(now)];
        let mut push = |column: &str, value: Param| {
            values.push(value);
            sets.push(format!("{column} = ${}", values.len()));
        };
        if let Some(v) = change.message.clone() {
            push("message", Box::new(v));
        }
        if let Some(v) = change.attempts {
            push("attempts", Box::new(i64::from(v)));
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
        let states: Vec<&'static str> = from.iter().map(|s| s.as_str()).collect();
        values.push(Box::new(id));
        let id_param = values.len();
        values.push(Box::new(states.clone()));
        let states_param = values.len();
        // Only while the job is still in the run the change is about (its dispatch key).
        let run_guard = match &change.only_run {
            Some(key) => {
                values.push(Box::new(key.clone()));
                format!("AND dispatch_key IS NOT DISTINCT FROM ${}", values.len())
            }
            None => String::new(),
        };
        let update = format!(
            "UPDATE jobs SET {} WHERE id = ${id_param} AND status = ANY(${states_param}) \
             {run_guard} RETURNING {COLUMNS}, callback_url, callback_events",
            sets.join(", ")
        );
        // The run this change gives away, read under the row's lock before the update
        // clears it: no other change can slip between the read and the update.
        let abandoned = change.abandon_run.then(|| {
            let guard = if change.only_run.is_some() {
                "AND dispatch_key IS NOT DISTINCT FROM $3"
            } else {
                ""
            };
            let sql = format!(
                "SELECT client, dest_id, dispatch_key FROM jobs
                 WHERE id = $1 AND status = ANY($2) {guard} FOR UPDATE"
            );
            let mut params: Vec<Param> = vec![Box::new(id), Box::new(states)];
            if let Some(key) = change.only_run.clone() {
                params.push(Box::new(key));
            }
            (sql, params)
        });
        let (channel, epoch) = (self.channel.clone(), self.fence.load(Ordering::SeqCst));
        let refused = self.refused.clone();
        let (result_zip, drop_inputs) = (change.result_zip, change.drop_inputs);
        self.with_client(move |mut client| async move {
            let tx = client.transaction().await?;
            if let Err(e) = check_fence(&tx, epoch).await {
                if e.is::<Fenced>() {
                    refused.notify_waiters();
                }
                return Err(e);
            }
            let mut run_given_away = None;
            if let Some((sql, params)) = &abandoned {
                let statement = tx.prepare_cached(sql).await?;
                if let Some(row) = tx.query_opt(&statement, &refs(params)).await? {
                    let (client, dest_id): (Option<String>, Option<i64>) =
                        (row.try_get(0)?, row.try_get(1)?);
                    if let (Some(client), Some(dest_id)) = (client, dest_id) {
                        run_given_away =
                            Some((client, dest_id, row.try_get::<_, Option<String>>(2)?));
                    }
                }
            }
            let statement = tx.prepare_cached(&update).await?;
            let Some(row) = tx.query_opt(&statement, &refs(&values)).await? else {
                tx.rollback().await?;
                return Ok(None);
            };
            let job = job_from_row(&row)?;
            if let Some((client, dest_id, key)) = run_given_away {
                let statement = tx
                    .prepare_cached(
                        "INSERT INTO abandoned_runs (client, dest_id, dispatch_key, job_id)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (client, dest_id) DO UPDATE
                         SET dispatch_key = EXCLUDED.dispatch_key, job_id = EXCLUDED.job_id",
                    )
                    .await?;
                tx.execute(&statement, &[&client, &dest_id, &key, &id])
                    .await?;
            }
            if to == JobStatus::Cleaned {
                // A Cleaned job keeps its row (its id answers) but not its timeline, nor its
                // ended notifications; pending ones go on until they end.
                let statement = tx
                    .prepare_cached("DELETE FROM job_events WHERE job_id = $1")
                    .await?;
                tx.execute(&statement, &[&id]).await?;
                let statement = tx
                    .prepare_cached(
                        "DELETE FROM webhook_outbox WHERE job_id = $1 AND next_ms IS NULL",
                    )
                    .await?;
                tx.execute(&statement, &[&id]).await?;
                let statement = tx
                    .prepare_cached("DELETE FROM result_zips WHERE job_id = $1")
                    .await?;
                tx.execute(&statement, &[&id]).await?;
                let statement = tx
                    .prepare_cached("DELETE FROM input_files WHERE job_id = $1")
                    .await?;
                tx.execute(&statement, &[&id]).await?;
            } else {
                if drop_inputs {
                    let statement = tx
                        .prepare_cached("DELETE FROM input_files WHERE job_id = $1")
                        .await?;
                    tx.execute(&statement, &[&id]).await?;
                }
                if let Some(zip) = &result_zip {
                    let statement = tx
                        .prepare_cached(
                            "INSERT INTO result_zips (job_id, zip) VALUES ($1, $2)
                             ON CONFLICT (job_id) DO UPDATE SET zip = EXCLUDED.zip",
                        )
                        .await?;
                    tx.execute(&statement, &[&id, &&zip.0[..]]).await?;
                }
                record_event(&tx, &job, now, to).await?;
                let (url, events) = (row.try_get(CALLBACK_AT)?, row.try_get(CALLBACK_AT + 1)?);
                queue_notification(&tx, &job, url, events, now).await?;
            }
            notify_changed(&tx, &channel, format!("j{id}")).await?;
            tx.commit().await?;
            Ok(Some(job))
        })
    }
    fn history(&self, id: i64) -> anyhow::Result<Vec<JobEvent>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT at_ms, status, message, attempts, client FROM job_events
                     WHERE job_id = $1 ORDER BY seq",
                )
                .await?;
            let rows = client.query(&statement, &[&id]).await?;
            rows.iter()
                .map(|row| {
                    let at_ms: i64 = row.try_get(0)?;
                    Ok(JobEvent {
                        at_ms,
                        at: super::rfc3339(at_ms),
                        status: row.try_get(1)?,
                        message: row.try_get(2)?,
                        attempts: count(row.try_get(3)?)?,
                        client: row.try_get(4)?,
                    })
                })
                .collect()
        })
    }
    fn counts(&self, user: Option<i64>) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT service, status, COUNT(*) FROM jobs
                     WHERE $1::BIGINT IS NULL OR user_id = $1 GROUP BY service, status",
                )
                .await?;
            let rows = client.query(&statement, &[&user]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect()
        })
    }
    fn finished_per_minute(
        &self,
        since_ms: i64,
        user: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT finished_ms / 60000 * 60000 AS minute, COUNT(*) FROM jobs
                     WHERE finished_ms >= $1 AND ($2::BIGINT IS NULL OR user_id = $2)
                     GROUP BY minute ORDER BY minute",
                )
                .await?;
            let rows = client.query(&statement, &[&since_ms, &user]).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }
    fn in_states(&self, states: &[JobStatus]) -> anyhow::Result<Vec<Job>> {
        let states: Vec<&'static str> = states.iter().map(|s| s.as_str()).collect();
        self.jobs(
            format!("SELECT {COLUMNS} FROM jobs WHERE status = ANY($1) ORDER BY id"),
            vec![Box::new(states)],
        )
    }
    fn on_client(&self, base: &str) -> anyhow::Result<Vec<Job>> {
        self.jobs(
            format!(
                "SELECT {COLUMNS} FROM jobs
                 WHERE client = $1 AND status IN ('Submitted', 'Running') ORDER BY id"
            ),
            vec![Box::new(base.to_owned())],
        )
    }
    fn abandoned_on(&self, base: &str) -> anyhow::Result<Vec<AbandonedRun>> {
        let base = base.to_owned();
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT client, dest_id, dispatch_key, job_id FROM abandoned_runs
                     WHERE client = $1 ORDER BY dest_id",
                )
                .await?;
            let rows = client.query(&statement, &[&base]).await?;
            rows.iter()
                .map(|r| {
                    Ok(AbandonedRun {
                        client: r.try_get(0)?,
                        dest_id: r.try_get(1)?,
                        key: r.try_get(2)?,
                        job_id: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }
    fn usage(&self) -> anyhow::Result<Vec<UsageRow>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT service, user_id, core_seconds, at_ms FROM user_usage
                     ORDER BY service, user_id",
                )
                .await?;
            let rows = client.query(&statement, &[]).await?;
            rows.iter()
                .map(|r| {
                    Ok(UsageRow {
                        service: r.try_get(0)?,
                        user_id: r.try_get(1)?,
                        core_seconds: r.try_get(2)?,
                        at_ms: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }
    fn save_usage(&self, row: &UsageRow) -> anyhow::Result<()> {
        self.execute(
            "INSERT INTO user_usage (service, user_id, core_seconds, at_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (service, user_id)
             DO UPDATE SET core_seconds = EXCLUDED.core_seconds, at_ms = EXCLUDED.at_ms",
            vec![
                Box::new(row.service.clone()),
                Box::new(row.user_id),
                Box::new(row.core_seconds),
                Box::new(row.at_ms),
            ],
        )
    }
    fn take_upload_slot(
        &self,
        service: &str,
        user_id: i64,
        quota: crate::ratelimit::RateQuota,
        now_ms: i64,
    ) -> anyhow::Result<Result<(), i64>> {
        let service = service.to_owned();
        self.with_client(move |client| async move {
            client.batch_execute("BEGIN").await?;
            let open = OpenTransaction(Some(client));
            // The row exists, then is locked: uploads of the user through any server of the
            // database take their turn.
            open.client()
                .execute(
                    "INSERT INTO upload_rate (service, user_id, tat_ms) VALUES ($1, $2, NULL)
                     ON CONFLICT (service, user_id) DO NOTHING",
                    &[&service, &user_id],
                )
                .await?;
            let tat: Option<i64> = open
                .client()
                .query_one(
                    "SELECT tat_ms FROM upload_rate WHERE service = $1 AND user_id = $2
                     FOR UPDATE",
                    &[&service, &user_id],
                )
                .await?
                .try_get(0)?;
            let answer = match quota.take(tat, now_ms) {
                Err(wait) => Err(wait),
                Ok(tat) => {
                    open.client()
                        .execute(
                            "UPDATE upload_rate SET tat_ms = $3
                             WHERE service = $1 AND user_id = $2",
                            &[&service, &user_id, &tat],
                        )
                        .await?;
                    Ok(())
                }
            };
            open.commit().await?;
            Ok(answer)
        })
    }
    fn forget_abandoned(&self, base: &str, dest_id: i64) -> anyhow::Result<()> {
        self.execute(
            "DELETE FROM abandoned_runs WHERE client = $1 AND dest_id = $2",
            vec![Box::new(base.to_owned()), Box::new(dest_id)],
        )
    }
    fn by_dest(&self, base: &str, dest_id: i64) -> anyhow::Result<Option<Job>> {
        let jobs = self.jobs(
            format!(
                "SELECT {COLUMNS} FROM jobs WHERE client = $1 AND dest_id = $2
                 ORDER BY id DESC LIMIT 1"
            ),
            vec![Box::new(base.to_owned()), Box::new(dest_id)],
        )?;
        Ok(jobs.into_iter().next())
    }
    fn finished_before(&self, cutoff_ms: i64) -> anyhow::Result<Vec<i64>> {
        self.column(
            "SELECT id FROM jobs WHERE status IN ('Completed', 'Failed', 'Invalid', 'Killed')
             AND COALESCE(finished_ms, updated_ms) < $1 ORDER BY id",
            vec![Box::new(cutoff_ms)],
        )
    }
    fn ids_with_files(&self) -> anyhow::Result<HashSet<i64>> {
        let ids = self.column("SELECT id FROM jobs WHERE status != 'Cleaned'", vec![])?;
        Ok(ids.into_iter().collect())
    }
    fn all_ids(&self) -> anyhow::Result<HashSet<i64>> {
        let ids = self.column("SELECT id FROM jobs", vec![])?;
        Ok(ids.into_iter().collect())
    }
    fn list(&self, filter: &ListFilter) -> anyhow::Result<(Vec<Job>, i64)> {
        let mut conditions = Vec::new();
        let mut values: Vec<Param> = Vec::new();
        if let Some(user) = filter.user_id {
            values.push(Box::new(user));
            conditions.push(format!("user_id = ${}", values.len()));
        }
        if let Some(service) = &filter.service {
            values.push(Box::new(service.clone()));
            conditions.push(format!("service = ${}", values.len()));
        }
        if let Some(status) = filter.status {
            values.push(Box::new(status.as_str()));
            conditions.push(format!("status = ${}", values.len()));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let count_sql = format!("SELECT COUNT(*) FROM jobs {clause}");
        let n = values.len();
        let page_sql = format!(
            "SELECT {COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let (limit, offset) = (filter.limit, filter.offset);
        self.with_client(move |mut client| async move {
            // One snapshot for the page and its total.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let total: i64 = tx.query_one(&count_sql, &refs(&values)).await?.try_get(0)?;
            values.push(Box::new(limit));
            values.push(Box::new(offset));
            let rows = tx.query(&page_sql, &refs(&values)).await?;
            let jobs = rows
                .iter()
                .map(job_from_row)
                .collect::<anyhow::Result<_>>()?;
            tx.commit().await?;
            Ok((jobs, total))
        })
    }
    fn count(&self) -> anyhow::Result<i64> {
        let total = self.column("SELECT COUNT(*) FROM jobs", vec![])?;
        Ok(total.into_iter().next().unwrap_or(0))
    }
    fn due_deliveries(&self, now_ms: i64, limit: usize) -> anyhow::Result<Vec<Delivery>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT o.id, o.job_id, j.service, o.event, o.url, o.body, o.created_ms,
                            o.attempts
                     FROM webhook_outbox o JOIN jobs j ON j.id = o.job_id
                     WHERE o.next_ms IS NOT NULL AND o.next_ms <= $1
                     ORDER BY o.next_ms LIMIT $2",
                )
                .await?;
            let rows = client.query(&statement, &[&now_ms, &limit]).await?;
            rows.iter()
                .map(|r| {
                    Ok(Delivery {
                        id: r.try_get(0)?,
                        job_id: r.try_get(1)?,
                        service: r.try_get(2)?,
                        event: status_of(r.try_get(3)?)?,
                        url: r.try_get(4)?,
                        body: r.try_get(5)?,
                        created_ms: r.try_get(6)?,
                        attempts: count(r.try_get(7)?)?,
                    })
                })
                .collect()
        })
    }
    fn next_delivery_ms(&self) -> anyhow::Result<Option<i64>> {
        let next = self.column::<Option<i64>>(
            "SELECT MIN(next_ms) FROM webhook_outbox WHERE next_ms IS NOT NULL",
            vec![],
        )?;
        Ok(next.into_iter().next().flatten())
    }
    fn retry_delivery(&self, id: &str, status: &str, next_ms: i64) -> anyhow::Result<()> {
        self.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = $2, next_ms = $3
             WHERE id = $1 AND next_ms IS NOT NULL",
            vec![
                Box::new(id.to_owned()),
                Box::new(status.to_owned()),
                Box::new(next_ms),
            ],
        )
    }
    fn finish_delivery(
        &self,
        id: &str,
        status: &str,
        tried: bool,
        end: DeliveryEnd,
    ) -> anyhow::Result<()> {
        self.execute(
            "UPDATE webhook_outbox SET attempts = attempts + $2, last_status = $3,
                    next_ms = NULL, outcome = $4
             WHERE id = $1 AND next_ms IS NOT NULL",
            vec![
                Box::new(id.to_owned()),
                Box::new(i64::from(tried)),
                Box::new(status.to_owned()),
                Box::new(end.as_str()),
            ],
        )
    }
    fn notifications(&self, id: i64) -> anyhow::Result<Vec<Notification>> {
        self.with_client(move |client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT id, event, url, attempts, last_status, next_ms, outcome
                     FROM webhook_outbox WHERE job_id = $1 ORDER BY created_ms, seq",
                )
                .await?;
            let rows = client.query(&statement, &[&id]).await?;
            rows.iter()
                .map(|r| {
                    Ok(Notification {
                        id: r.try_get(0)?,
                        event: r.try_get(1)?,
                        url: r.try_get(2)?,
                        attempts: count(r.try_get(3)?)?,
                        last_status: r.try_get(4)?,
                        next_try_ms: r.try_get(5)?,
                        outcome: r.try_get(6)?,
                    })
                })
                .collect()
        })
    }
    /// A round trip to the database through the pool: a database that is down, unreachable
    /// or refusing this server's connections is an `Err` with the driver's reason.
    fn health(&self) -> Result<(), String> {
        self.with_client(|client| async move {
            client.simple_query("SELECT 1").await?;
            Ok(())
        })
        .map_err(|e| e.to_string())
    }
    /// PostgreSQL checks its own pages as it reads them (and with data checksums, if the
    /// cluster has them); there is no whole-database check a client can run cheaply, so this
    /// is the round trip of [`JobDb::health`], which reports any failure as it happens.
    fn check_integrity(&self) -> Result<(), String> {
        self.health()
    }
    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }
}

/// `timeout` as the milliseconds of an SQL interval.
fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

impl Cluster for PgDb {
    fn try_lead(&self, me: &str, timeout: Duration) -> anyhow::Result<Option<Lease>> {
        let me = me.to_owned();
        self.with_client(move |mut client| async move {
            let tx = client.transaction().await?;
            // Waits for the writes of the old epoch to end, not for a stopped server.
            tx.batch_execute("SET LOCAL lock_timeout = '1s'").await?;
            let row = tx
                .query_opt(
                    "UPDATE leader_lease
                     SET holder = $1, epoch = epoch + 1, since_ms = $2,
                         expires_at = now() + $3::BIGINT * interval '1 millisecond'
                     WHERE id = 1 AND (holder IS NULL OR expires_at IS NULL OR expires_at < now())
                     RETURNING epoch, since_ms",
                    &[&me, &now_ms(), &millis(timeout)],
                )
                .await;
            let row = match row {
                Ok(row) => row,
                // 55P03: the lock was not free in time; another attempt will follow.
                Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            tx.commit().await?;
            Ok(row.map(|row| Lease {
                holder: Some(me),
                epoch: row.get(0),
                since_ms: row.get(1),
                live: true,
            }))
        })
    }
    fn renew(&self, me: &str, epoch: i64, timeout: Duration) -> anyhow::Result<bool> {
        let me = me.to_owned();
        self.with_client(move |mut client| async move {
            let tx = client.transaction().await?;
            tx.batch_execute("SET LOCAL lock_timeout = '1s'").await?;
            let n = tx
                .execute(
                    "UPDATE leader_lease SET expires_at = now() + $3::BIGINT * interval '1 millisecond'
                     WHERE id = 1 AND holder = $1 AND epoch = $2",
                    &[&me, &epoch, &millis(timeout)],
                )
                .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }
    fn resign(&self, me: &str, epoch: i64) -> anyhow::Result<()> {
        self.execute(
            "UPDATE leader_lease SET holder = NULL, expires_at = NULL
             WHERE id = 1 AND holder = $1 AND epoch = $2",
            vec![Box::new(me.to_owned()), Box::new(epoch)],
        )
    }
    fn lease(&self) -> anyhow::Result<Lease> {
        self.with_client(move |client| async move {
            let row = client
                .query_one(
                    "SELECT holder, epoch, since_ms, COALESCE(expires_at > now(), false)
                     FROM leader_lease WHERE id = 1",
                    &[],
                )
                .await?;
            Ok(Lease {
                holder: row.try_get(0)?,
                epoch: row.try_get(1)?,
                since_ms: row.try_get(2)?,
                live: row.try_get(3)?,
            })
        })
    }
    fn fence(&self, epoch: i64) {
        self.fence.store(epoch.max(0), Ordering::SeqCst);
    }
    fn refusals(&self) -> Arc<tokio::sync::Notify> {
        self.refused.clone()
    }
    fn heartbeat(&self, me: &str, url: &str, started_ms: i64) -> anyhow::Result<()> {
        self.execute(
            "INSERT INTO servers (name, url, started_ms, seen_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, seen_ms = EXCLUDED.seen_ms",
            vec![
                Box::new(me.to_owned()),
                Box::new(url.to_owned()),
                Box::new(started_ms),
                Box::new(now_ms()),
            ],
        )
    }
    fn servers(&self, since_ms: i64) -> anyhow::Result<Vec<ServerBeat>> {
        self.with_client(move |client| async move {
            let rows = client
                .query(
                    "SELECT name, url, started_ms, seen_ms FROM servers
                     WHERE seen_ms >= $1 ORDER BY name",
                    &[&since_ms],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ServerBeat {
                        name: r.try_get(0)?,
                        url: r.try_get(1)?,
                        started_ms: r.try_get(2)?,
                        seen_ms: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }
    fn request_terminate(&self, id: i64) -> anyhow::Result<()> {
        let channel = self.channel.clone();
        self.with_client(move |mut client| async move {
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO terminate_requests (job_id, requested_ms) VALUES ($1, $2)
                 ON CONFLICT (job_id) DO NOTHING",
                &[&id, &now_ms()],
            )
            .await?;
            notify_changed(&tx, &channel, format!("t{id}")).await?;
            tx.commit().await?;
            Ok(())
        })
    }
    fn terminate_requests(&self) -> anyhow::Result<Vec<i64>> {
        self.column(
            "SELECT job_id FROM terminate_requests ORDER BY requested_ms, job_id",
            vec![],
        )
    }
    fn forget_terminate(&self, id: i64) -> anyhow::Result<()> {
        self.execute(
            "DELETE FROM terminate_requests WHERE job_id = $1",
            vec![Box::new(id)],
        )
    }
    fn listen(&self, to: tokio::sync::mpsc::UnboundedSender<Notice>) {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        runtime.spawn(listen(
            self.config.clone(),
            self.tls.clone(),
            self.channel.clone(),
            to,
        ));
    }
}

/// The listening connection: made, `LISTEN`ed on, read until it breaks, made again; ends when
/// nobody takes the notices any more.
async fn listen(
    config: tokio_postgres::Config,
    tls: TlsMode,
    channel: String,
    to: tokio::sync::mpsc::UnboundedSender<Notice>,
) {
    while !to.is_closed() {
        match tls.connector() {
            Ok(Some(connector)) => listen_once(&config, connector, &channel, &to).await,
            Ok(None) => listen_once(&config, NoTls, &channel, &to).await,
            Err(e) => tracing::error!(error = %e, "cannot listen to the database's notifications"),
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

/// One listening connection, until it breaks.
async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    channel: &str,
    to: &tokio::sync::mpsc::UnboundedSender<Notice>,
) where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    use futures_util::StreamExt;
    let Ok((client, mut connection)) = config.connect(tls).await else {
        return;
    };
    let forward = to.clone();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let reading = tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                if let Some(notice) = notice_of(n.payload()) {
                    if forward.send(notice).is_err() {
                        return;
                    }
                }
            }
        }
    });
    if client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .is_ok()
    {
        let _ = to.send(Notice::Listening);
        tracing::info!("listening to the database's notifications");
    }
    let _ = reading.await;
    drop(client);
    tracing::warn!("the database's notification connection broke; making it again");
}

fn notice_of(payload: &str) -> Option<Notice> {
    let (kind, id) = payload.split_at_checked(1)?;
    let id = id.parse().ok()?;
    match kind {
        "n" => Some(Notice::New(id)),
        "j" => Some(Notice::Changed(id)),
        "t" => Some(Notice::Terminate(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Scratch;
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_their_password() {
        assert_eq!(
            redact("postgres://jr:s3cret@db:5432/jobs?sslmode=disable"),
            "postgres://jr:***@db:5432/jobs?sslmode=disable"
        );
        assert_eq!(redact("postgres://jr@db/jobs"), "postgres://jr@db/jobs");
        // A password holding a '/' (the user info ends at the last '@'), or given as a query
        // parameter, is hidden too.
        assert_eq!(
            redact("postgres://jr:pa/ss@db/jobs"),
            "postgres://jr:***@db/jobs"
        );
        assert_eq!(
            redact("postgres://jr@db/jobs?sslmode=disable&password=s3cret"),
            "postgres://jr@db/jobs?sslmode=disable&password=***"
        );
        assert!(parse_url("postgres://jr@db:5432/jobs").is_ok());
        assert!(parse_url("postgresql://jr@db/jobs?sslmode=disable").is_ok());
        let why = parse_url("postgres://jr:s3cret@db/jobs?sslmode=allow")
            .unwrap_err()
            .to_string();
        assert!(why.contains("sslmode=allow is not supported"), "{why}");
        assert!(!why.contains("s3cret"), "{why}");
        let why = parse_url("postgres://jr@db/jobs?sslcert=/c.pem&sslkey=/k.pem")
            .unwrap_err()
            .to_string();
        assert!(why.contains("sslcert is not supported"), "{why}");
        // The TLS keys are read here, the others reach the driver as written.
        let (config, tls) = parse_url_with_tls(
            "postgres://jr@db/jobs?sslmode=verify-full&options=-c%20search_path%3Dx\
             &sslrootcert=/etc/ca%20file.pem&application_name=a",
        )
        .unwrap();
        assert_eq!(
            tls,
            TlsMode::VerifyFull(tls::Roots::File("/etc/ca file.pem".into()))
        );
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(config.get_options(), Some("-c search_path=x"));
        assert_eq!(config.get_application_name(), Some("a"));
        let (config, tls) = parse_url_with_tls("postgres://jr@db/jobs?sslmode=require").unwrap();
        assert_eq!(tls, TlsMode::Unverified);
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let (config, tls) = parse_url_with_tls("postgres://jr@db/jobs").unwrap();
        assert_eq!(tls, TlsMode::Off);
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        let why = parse_url("mysql://jr@db/jobs").unwrap_err().to_string();
        assert!(why.contains("not a PostgreSQL URL"), "{why}");
        let why = parse_url("postgres://jr@db:port/jobs")
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("bad PostgreSQL URL postgres://jr@db:port/jobs"),
            "{why}"
        );
    }

    #[test]
    fn an_unreachable_database_is_an_error_naming_it() {
        // Nothing listens on port 1.
        let url = "postgres://jr:s3cret@127.0.0.1:1/jobs";
        let why = match PgDb::open(url) {
            Ok(_) => panic!("opened a database on port 1"),
            Err(e) => e.to_string(),
        };
        assert!(
            why.contains("cannot open the PostgreSQL database postgres://jr:***@127.0.0.1:1/jobs"),
            "{why}"
        );
        assert!(!why.contains("s3cret"), "{why}");
    }

    #[test]
    fn servers_starting_at_once_migrate_the_schema_once() {
        let Some(scratch) = Scratch::new() else {
            return;
        };
        let ids: Vec<String> = std::thread::scope(|s| {
            let opening: Vec<_> = (0..4)
                .map(|_| s.spawn(|| scratch.open().server_id().to_owned()))
                .collect();
            opening.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        let db = scratch.open();
        assert_eq!(db.server_id(), ids[0]);
        let versions = db
            .column::<i32>("SELECT version FROM schema_migrations", vec![])
            .unwrap();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
        // A database migrated by a newer version is refused, by name.
        scratch.exec("INSERT INTO schema_migrations VALUES (999, 'future', 0)");
        drop(db);
        let why = match PgDb::connect(scratch.config(), "scratch") {
            Ok(_) => panic!("opened a database of a newer schema"),
            Err(e) => e.to_string(),
        };
        assert!(why.contains("newer jobrelay (schema version 999"), "{why}");
    }

    #[test]
    fn a_database_of_the_first_schema_gains_the_request_columns() {
        let Some(scratch) = Scratch::new() else {
            return;
        };
        let db = scratch.open();
        db.insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
            .unwrap();
        drop(db);
        // As the first version left it: schema 1 only, one job.
        scratch.exec(
            "ALTER TABLE jobs DROP COLUMN cores, DROP COLUMN memory_mb, DROP COLUMN gpus,
                 DROP COLUMN walltime_s, DROP COLUMN priority;
             DROP TABLE user_usage, upload_rate, result_zips, input_files;
             DELETE FROM schema_migrations WHERE version > 1;",
        );
        let db = scratch.open();
        assert_eq!(
            db.get(1).unwrap().unwrap().resources,
            JobResources::default()
        );
        let versions = db
            .column::<i32>(
                "SELECT version FROM schema_migrations ORDER BY version",
                vec![],
            )
            .unwrap();
        assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn job_ids_are_never_handed_out_twice() {
        let Some(scratch) = Scratch::new() else {
            return;
        };
        let db = scratch.open();
        for _ in 0..3 {
            db.insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap();
        }
        // An upload that failed used an id too.
        assert!(db
            .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Err(
                std::io::Error::other("disk")
            ))
            .is_err());
        scratch.exec("DELETE FROM job_events; DELETE FROM jobs;");
        drop(db);
        let db = scratch.open();
        assert_eq!(db.mark_at_open(), 0);
        assert_eq!(
            db.insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap()
                .id,
            5
        );
    }

    #[test]
    fn an_upload_whose_placement_panics_leaves_no_transaction_open() {
        let Some(scratch) = Scratch::new() else {
            return;
        };
        let db = scratch.open();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            db.insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| {
                panic!("placing files")
            })
        }));
        assert!(panicked.is_err());
        // Every connection of the pool is usable and none commits the half-made upload.
        for _ in 0..(POOL_SIZE + 2) {
            db.insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
                .unwrap();
        }
        assert_eq!(db.count().unwrap(), POOL_SIZE as i64 + 2);
        assert_eq!(db.get(1).unwrap(), None);
    }

    #[test]
    fn calls_work_from_every_kind_of_thread() {
        let Some(scratch) = Scratch::new() else {
            return;
        };
        let db = std::sync::Arc::new(scratch.open());
        let job = db
            .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
            .unwrap();
        let id = job.id;
        let read = move |db: &PgDb| db.get(id).unwrap().unwrap().id;
        // A plain thread.
        assert_eq!(read(&db), job.id);
        // A multi-threaded runtime's worker inside block_in_place (the job table's way), and
        // its blocking pool.
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let on_worker = db.clone();
        let from_worker = multi.block_on(async move {
            tokio::spawn(async move { tokio::task::block_in_place(|| read(&on_worker)) }).await
        });
        assert_eq!(from_worker.unwrap(), job.id);
        let on_pool = db.clone();
        let from_pool = multi
            .block_on(async move { tokio::task::spawn_blocking(move || read(&on_pool)).await });
        assert_eq!(from_pool.unwrap(), job.id);
        // A current-thread runtime's own thread.
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { read(&db) }), job.id);
        // The last holder may be an async task: dropping the store there must not panic.
        drop(multi);
        current.block_on(async move { drop(db) });
    }

    #[test]
    fn health_fails_while_the_database_refuses_the_server_and_recovers_after() {
        let Some(scratch) = Scratch::new() else {
            return;
        };
        let db = scratch.open();
        assert_eq!(db.health(), Ok(()));
        let role = &scratch.name;
        scratch
            .admin(&format!(
                "ALTER ROLE {role} NOLOGIN;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}';"
            ))
            .unwrap();
        let why = db.health().unwrap_err();
        assert!(why.contains("not permitted to log in"), "{why}");
        assert!(db.get(1).is_err());
        assert_eq!(db.check_integrity(), Err(why));
        scratch.admin(&format!("ALTER ROLE {role} LOGIN")).unwrap();
        assert_eq!(db.health(), Ok(()));
        assert_eq!(db.get(1).unwrap(), None);
    }
}
