//! The jobrelay orchestrator server: accepts jobs over HTTP, stores them durably in SQLite,
//! schedules them fairly under quotas, dispatches them to executor clients, follows them to
//! the end, stores their results and serves them.
//!
//! Modules, each with one job:
//! - [`config`]: flags, TOML file and the reference's environment variables;
//! - [`store`]: the database seam ([`store::JobDb`]) and its SQLite implementation, every
//!   state change committed and guarded;
//! - [`lifecycle`]: the one writer of job state: every event's guarded transition, the
//!   scheduler's update and the side tables, returning the effects to perform;
//! - [`effects`]: performs those effects at the edge (checks asked of the collector, kills,
//!   releases, timers);
//! - [`shared`]: what the running server's parts share;
//! - [`sync`]: the poison-proof lock, and `off_worker` for the database calls;
//! - [`scheduler`]: pure quotas, round-robin or usage-based fair share, reservations and
//!   placement;
//! - [`usage`]: decayed core-seconds of a user, as fair share counts them (pure);
//! - [`clients`]: the pool of executor clients, their health and `/info`;
//! - [`gateway`]: the one way to talk to a client: a typed call per client endpoint, its
//!   URL, timeout and the client's bookkeeping; no other module builds a client URL;
//! - [`probe`]: checks each client periodically (`/info`, `/load`), with backoff while down;
//! - [`ratelimit`]: the token bucket of a rate quota of uploads (pure);
//! - [`dispatcher`]: sends the scheduler's decisions to clients, idempotently;
//! - [`collector`]: follows jobs on clients (change feed or polling) and fetches results;
//! - [`results`]: a job's result ZIP (whole or partial) stored before its final state;
//! - [`stop`]: terminate carried to a client, and runs given away killed there;
//! - [`auth`]: the users file and who may see what (pure);
//! - [`views`]: the read side: what the dashboard and `/clients` show;
//! - [`http`]: thin HTTP handlers, the error shape and the OpenAPI document;
//! - [`janitor`]: removes files of jobs past the retention period;
//! - [`leader`]: which server runs the loops that change jobs: the lease, its terms, and the
//!   notices of other servers' commits;
//! - [`webhooks`]: signed notifications of jobs' ends to their callbacks, from the outbox;
//! - [`supervise`]: runs the background loops, restarts one that panics, reports them;
//! - [`migrate`]: `jobrelay server migrate`, a SQLite database moved whole to PostgreSQL.

pub mod auth;
pub mod clients;
pub mod collector;
pub mod config;
pub mod dispatcher;
pub mod early_events;
pub mod effects;
pub mod gateway;
pub mod http;
pub mod janitor;
pub mod joined;
pub mod leader;
pub mod lifecycle;
pub mod migrate;
pub mod pending_releases;
pub mod probe;
pub mod ratelimit;
pub mod requests;
pub mod results;
pub mod scheduler;
pub mod shared;
pub mod stop;
pub mod store;
pub mod supervise;
pub mod sync;
pub mod telemetry;
pub mod usage;
pub mod views;
pub mod webhooks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use config::{ClientEndpoint, ServerArgs, ServerConfig, ServiceConfig};
use jobrelay_common::fsutil::remove_dir_all_if_exists;
use jobrelay_common::serve::Serving;

use crate::clients::ClientHandle;
use crate::config::Database;
use crate::lifecycle::{JobTable, Lifecycle};
use crate::scheduler::Scheduler;
use crate::store::{PgDb, SqliteDb};

/// Most job checks (`/retrieve` calls and result downloads) in progress at once.
const MAX_CONCURRENT_CHECKS: usize = 64;

/// [`shared::Shared`], at the root since most modules take it.
pub use shared::Shared;
/// [`sync::lock`], at the root since every module uses it.
pub use sync::lock;

/// A server that is serving.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// `http` or `https` (with `ServerConfig.tls`).
    pub scheme: &'static str,
    pub shared: Arc<Shared>,
    serving: Serving,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The term of leadership in force, if this server leads.
    term: Arc<Mutex<Option<(leader::Term, i64)>>>,
}

impl RunningServer {
    /// Stops serving at once and stops every background task. Jobs stay in the database as
    /// they are; the next start resumes them.
    pub async fn shutdown(self) {
        self.serving.abort();
        for task in self.tasks {
            task.abort();
        }
        // Its loops stop with it.
        drop(lock(&self.term).take());
        self.shared.job_tasks.stop().await;
    }

    /// SIGTERM's stop: refuses new connections at once, lets the requests in flight finish
    /// (an upload being received is committed and answered) within the shutdown grace, then
    /// stops the background tasks as [`RunningServer::shutdown`] does.
    pub async fn stop_gracefully(self) {
        self.serving.stop().await;
        for task in self.tasks {
            task.abort();
        }
        let term = lock(&self.term).take();
        if let Some((term, epoch)) = term {
            drop(term);
            self.shared.job_tasks.stop().await;
            // Given back, so a standby takes over at once rather than after the timeout.
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(cluster) = shared.store.cluster() {
                    cluster.fence(0);
                    if let Err(e) = cluster.resign(&shared.role.name, epoch) {
                        tracing::warn!(error = %e, "could not give the lease back");
                    }
                }
            })
            .await;
        }
        self.shared.job_tasks.stop().await;
        // Releases still queued would keep the clients' copies until their max-age.
        let flush = gateway::flush_releases(&self.shared);
        if tokio::time::timeout(RELEASES_AT_STOP, flush).await.is_err() {
            tracing::info!("gave up releasing payloads at the stop; the clients expire them");
        }
    }
}

/// How long a graceful stop spends sending the releases still queued.
const RELEASES_AT_STOP: Duration = Duration::from_secs(2);

/// Opens the database, recovers what a previous process left, and starts serving.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    jobrelay_common::telemetry::install();
    if config.services.is_empty() {
        anyhow::bail!("no service configured");
    }
    webhooks::check_config(&config)?;
    let data_dir = config.data_dir.clone();
    let jobs_dir = data_dir.join("jobs");
    let results_dir = data_dir.join("results");
    let name = server_name();
    let staging_dir = match &config.db {
        Database::Sqlite(_) => {
            let staging_dir = data_dir.join("staging");
            remove_dir_all_if_exists(&staging_dir)?;
            staging_dir
        }
        // Servers sharing the data directory each receive uploads in a folder of their own;
        // those that stopped long ago left theirs.
        Database::Postgres(_) => {
            remove_old_staging(&data_dir.join("staging"));
            data_dir.join("staging").join(&name)
        }
    };
    // Joined clients' sockets: in this server's own staging folder (servers sharing the data
    // directory must not take each other's); an older version kept them in <data>/joined.
    if matches!(config.db, Database::Sqlite(_)) {
        joined::remove_leftovers(&data_dir);
    }
    for dir in [&jobs_dir, &results_dir, &staging_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let db: Box<dyn store::JobDb> = match &config.db {
        Database::Sqlite(path) => {
            Box::new(SqliteDb::open_with_mark(path, &data_dir.join(JOB_ID_MARK))?)
        }
        Database::Postgres(url) => Box::new(PgDb::open(url)?),
    };
    let mut store = JobTable::new(db);
    if config.webhooks.allowed_hosts.is_empty() {
        // No upload can carry a callback: no notification is written.
        store = store.without_callbacks();
    }
    let store = Arc::new(store);
    refuse_a_database_behind_its_files(&store, &describe(&config.db), &jobs_dir, &results_dir)?;

    let client_ca = match &config.client_ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read --client-ca {}: {e}", path.display()))?;
            Some(gateway::certificates(&pem).map_err(|e| {
                anyhow::anyhow!("no usable CA certificate in {}: {e}", path.display())
            })?)
        }
        None => None,
    };
    let tls = config
        .tls
        .as_ref()
        .map(|files| files.acceptor())
        .transpose()
        .map_err(anyhow::Error::msg)?;

    let (sched, endpoints, _, service_ids) = schedule_of(&config);
    let clients = endpoints
        .into_iter()
        .enumerate()
        .map(|(id, endpoint)| {
            gateway::http_for(&endpoint, client_ca.as_deref())
                .map(|http| Arc::new(ClientHandle::new(id, endpoint, http)))
        })
        .collect::<Vec<_>>();
    let mut clients = clients.into_iter().collect::<Result<Vec<_>, _>>()?;
    match &config.users {
        Some(users) => tracing::info!(
            users = users.len(),
            "users file: requests need a user's token; users see only their own jobs"
        ),
        None => tracing::warn!(
            "no users file: every caller is trusted with the user_id it gives and can see, \
             download and terminate every job (give --users-file to change that)"
        ),
    }
    if config.users.is_some() && config.tls.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "users' tokens and results cross the network in clear: give --tls-cert/--tls-key"
        );
    }
    for client in &clients {
        let on_loopback = url::Url::parse(client.base()).is_ok_and(|u| match u.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name == "localhost",
            None => false,
        });
        if client.endpoint.token.is_some() && client.base().starts_with("http://") && !on_loopback {
            tracing::warn!(
                client = client.base(),
                "the client token crosses the network in clear: use an https:// client URL"
            );
        }
        if client.endpoint.token.is_none() {
            tracing::info!(
                client = client.base(),
                "no client token: requests to this client carry no Authorization"
            );
        }
    }
    let mut lifecycle = Lifecycle::new(
        store.clone(),
        sched,
        service_ids.clone(),
        config.max_attempts,
    );
    // Joined clients that active jobs are on: back in the pool before those jobs are
    // recovered, so they are followed there (the clients join again and go on). Seated
    // through the lifecycle, which gives a new leader's scheduler the same ids.
    let mut relays = Vec::new();
    let active = store.in_states(&store::JobStatus::ACTIVE)?;
    for (base, names) in joined::known_from_jobs(&active) {
        let Some(node) = joined::node_of(&base) else {
            continue;
        };
        let id = lifecycle.client_joined(None, &base, &names);
        debug_assert_eq!(id, clients.len());
        let (client, listener) = joined::new_handle(&staging_dir, id, node, &names, "")
            .map_err(|e| anyhow::anyhow!("cannot set up joined client {base}: {e:?}"))?;
        let client = Arc::new(client);
        tracing::info!(client = %base, "a joined client has active jobs: waiting for it to join again");
        relays.push((client.clone(), listener));
        clients.push(client);
    }
    let clustered = store.cluster().is_some();
    if let Some(cluster) = store.cluster() {
        // A standby until the lease is taken: no job-state write of this server commits.
        cluster.fence(0);
    }
    if clustered {
        let config = config.clone();
        lifecycle = lifecycle.for_cluster(Box::new(move || schedule_of(&config).0));
    }
    let role = shared::Role::new(
        name,
        shared::RoleState {
            leading: !clustered,
            since_ms: (!clustered).then(store::now_ms),
            ..Default::default()
        },
    );
    let shared = Arc::new(Shared {
        config,
        store,
        lifecycle,
        clients: clients::Pool::new(clients),
        service_ids,
        loops: supervise::Loops::default(),
        check_requests: shared::CheckRequests::default(),
        job_tasks: shared::JobTasks::default(),
        in_flight: Mutex::new(HashMap::new()),
        checks: tokio::sync::Semaphore::new(MAX_CONCURRENT_CHECKS),
        jobs_dir,
        results_dir,
        staging_dir,
        role,
    });

    // A database of its own: this server leads for ever, starting as a restart does.
    let term = Arc::new(Mutex::new(if clustered {
        None
    } else {
        Some((leader::start_term(&shared)?, 0))
    }));

    let listener = tokio::net::TcpListener::bind(shared.config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", shared.config.listen))?;
    let addr = listener.local_addr()?;
    let app = http::router(shared.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Our accept loop (common::serve): timeouts against slow-loris requests, over TLS or not.
    let serving = match tls {
        Some(acceptor) => {
            let listener = jobrelay_common::tls::TlsListener::new(listener, acceptor)?;
            Serving::spawn(listener, app)
        }
        None => {
            // Without TCP_NODELAY a streamed answer's last small chunk waits for the peer's
            // delayed ACK (about 40 ms on Linux).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            Serving::spawn(listener, app)
        }
    };
    let mut tasks = Vec::new();
    // Each background loop is restarted if it panics (supervise), and /health names one
    // that is down or restarting too often. The leader's loops run in its term (leader).
    for (client, listener) in relays {
        tasks.push(tokio::spawn(joined::relay(client, listener)));
    }
    let s = shared.clone();
    tasks.push(
        shared
            .loops
            .spawn("integrity", None, move || check_integrity(s.clone())),
    );
    if let Some(cluster) = shared.store.cluster() {
        let (notices, received) = tokio::sync::mpsc::unbounded_channel();
        cluster.listen(notices);
        let received = Arc::new(tokio::sync::Mutex::new(received));
        let s = shared.clone();
        tasks.push(shared.loops.spawn("notices", None, move || {
            leader::follow_notices(s.clone(), received.clone())
        }));
        let (s, url) = (shared.clone(), format!("{scheme}://{addr}"));
        tasks.push(shared.loops.spawn("heartbeat", None, move || {
            leader::heartbeat(s.clone(), url.clone())
        }));
        let (s, t) = (shared.clone(), term.clone());
        tasks.push(tokio::spawn(leader::campaign(s, t)));
    }
    tracing::info!(%addr, data_dir = %shared.config.data_dir.display(), db = %describe(&shared.config.db), "server started");
    Ok(RunningServer {
        addr,
        scheme,
        shared,
        serving,
        tasks,
        term,
    })
}

/// The database for people: a SQLite file's path, a PostgreSQL URL without its password.
pub fn describe(db: &Database) -> String {
    match db {
        Database::Sqlite(path) => path.display().to_string(),
        Database::Postgres(url) => store::postgres::redact(url),
    }
}

/// Name of the job-id high-water mark in the data directory ([`SqliteDb::open_with_mark`]).
pub use store::sqlite::JOB_ID_MARK;
/// Time between two integrity checks of the database (the first runs at start).
const INTEGRITY_EVERY: Duration = Duration::from_secs(600);

/// Refuses to start on a database that does not know the jobs whose files are in the data
/// directory: an emptied or recreated database (`truncate -s 0`, a deleted file) or an older
/// copy. Starting would delete those files as leftovers and, without the id mark, hand their
/// ids to new jobs. A result ZIP exists only for a committed job; a job directory without its
/// row is normal only for the upload a crash cut short (the last id handed out).
fn refuse_a_database_behind_its_files(
    store: &JobTable,
    db: &str,
    jobs_dir: &std::path::Path,
    results_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let known = store.all_ids()?;
    let ids_in = |dir: &std::path::Path, suffix: &str| -> anyhow::Result<Vec<i64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(|n| n.parse::<i64>().ok())
            {
                ids.push(id);
            }
        }
        Ok(ids)
    };
    let results = ids_in(results_dir, ".zip")?
        .into_iter()
        .filter(|id| !known.contains(id))
        .count();
    let mark = store.mark_at_open();
    // On a shared database another server may be committing its first upload right now
    // (its folder is renamed in just before its row commits): only old folders count.
    let settled = |id: &i64| {
        store.cluster().is_none()
            || std::fs::metadata(jobs_dir.join(id.to_string()))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(60)))
    };
    let jobs = if known.is_empty() {
        ids_in(jobs_dir, "")?
            .into_iter()
            .filter(|id| mark == 0 || *id < mark)
            .filter(settled)
            .count()
    } else {
        0
    };
    if results == 0 && jobs == 0 {
        return Ok(());
    }
    anyhow::bail!(
        "the database {} does not know {results} stored result(s) and {jobs} job(s) whose files \
         are in {} and {}: it was emptied, recreated or replaced by an older copy. Starting \
         would delete those files. Restore the database from a backup; or, to start afresh \
         without those jobs, move {} and {} out of the way (new job ids continue after {} \
         either way)",
        db,
        jobs_dir.display(),
        results_dir.display(),
        jobs_dir.display(),
        results_dir.display(),
        mark.max(known.iter().copied().max().unwrap_or(0)),
    )
}

/// Checks the database's pages at start and every [`INTEGRITY_EVERY`]: a damaged page then
/// fails `/health`, not only the queries that happen to read it.
async fn check_integrity(shared: Arc<Shared>) {
    loop {
        supervise::fault_point("integrity");
        let store = shared.clone();
        let _ = tokio::task::spawn_blocking(move || store.store.check_integrity()).await;
        tokio::time::sleep(INTEGRITY_EVERY).await;
    }
}

/// The scheduler of `config`'s services and clients, with no job: each client's endpoint
/// (indexed by its id), the client ids by base URL, the service ids by name.
type Schedule = (
    Scheduler,
    Vec<ClientEndpoint>,
    HashMap<String, usize>,
    HashMap<String, scheduler::ServiceId>,
);

fn schedule_of(config: &ServerConfig) -> Schedule {
    let mut sched = Scheduler::new();
    let mut endpoints = Vec::new();
    let mut client_by_base = HashMap::new();
    let mut service_ids = HashMap::new();
    for (name, service) in &config.services {
        let mut ids = Vec::new();
        for endpoint in &service.clients {
            let id = *client_by_base
                .entry(endpoint.base.clone())
                .or_insert_with(|| {
                    let id = sched.add_client();
                    sched.set_client_label(id, endpoint.base.clone());
                    endpoints.push(endpoint.clone());
                    id
                });
            ids.push(id);
        }
        let sid = sched.add_service(service.runs_per_user, service.max_runs, ids);
        sched.set_policy(sid, service.policy);
        sched.set_reserve_after(sid, service.reserve_after.map(|d| d.as_secs_f64()));
        sched.set_send_ahead(sid, service.send_ahead);
        service_ids.insert(name.clone(), sid);
    }
    if let Some(users) = &config.users {
        for share in users.shares() {
            sched.set_weight(share.user_id, share.weight);
        }
    }
    (sched, endpoints, client_by_base, service_ids)
}

/// This process's name among the servers of a database: host, pid and a random part.
fn server_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..8])
}

/// Staging folders of servers on a shared data directory untouched for a day: they stopped
/// in the middle of an upload.
fn remove_old_staging(staging: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(staging) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
            t.elapsed()
                .is_ok_and(|age| age > Duration::from_secs(86400))
        });
        if stale {
            let _ = remove_dir_all_if_exists(&entry.path());
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `jobrelay server`: serves until SIGINT or SIGTERM.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let server = start(config).await?;
    println!(
        "jobrelay server listening on {}://{}",
        server.scheme, server.addr
    );
    shutdown_signal().await;
    tracing::info!("server stopping: no new connections, finishing open requests");
    server.stop_gracefully().await;
    Ok(())
}
