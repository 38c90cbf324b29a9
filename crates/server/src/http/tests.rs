//! The blocking rule of the handlers, observed: a store that does not answer (held, as a
//! long query or a stalled disk holds SQLite) must not stall the requests that need no store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ServerConfig, ServiceConfig};
use crate::lifecycle::{JobTable, Lifecycle};
use crate::scheduler::Scheduler;
use crate::store::{
    AbandonedRun, Callback, Change, Delivery, DeliveryEnd, Job, JobDb, JobEvent, JobResources,
    JobStatus, ListFilter, Notification, SqliteDb,
};
use crate::Shared;

/// How long the store is held; a ping stalled behind it takes about this long.
const HELD: Duration = Duration::from_secs(4);

/// The SQLite store, each call of which first waits for `gate` (held by the test).
struct GatedDb {
    inner: SqliteDb,
    gate: Arc<Mutex<()>>,
}

impl GatedDb {
    /// Held by the test as a long query holds SQLite's connection: waited for as
    /// `SqliteDb` waits for its connection.
    fn pass(&self) -> std::sync::MutexGuard<'_, ()> {
        crate::sync::lock_off_worker(&self.gate)
    }
}

impl JobDb for GatedDb {
    fn server_id(&self) -> &str {
        self.inner.server_id()
    }
    fn mark_at_open(&self) -> i64 {
        self.inner.mark_at_open()
    }
    fn insert_job(
        &self,
        user_id: i64,
        service: &str,
        callback: Option<&Callback>,
        resources: &JobResources,
        inputs: &[crate::store::InputFile],
        place_files: &mut dyn FnMut(i64) -> std::io::Result<()>,
    ) -> anyhow::Result<Job> {
        let _gate = self.pass();
        self.inner
            .insert_job(user_id, service, callback, resources, inputs, place_files)
    }
    fn input_files(&self, id: i64) -> anyhow::Result<Vec<crate::store::InputFile>> {
        let _gate = self.pass();
        self.inner.input_files(id)
    }
    fn drop_inputs(&self, id: i64) -> anyhow::Result<()> {
        let _gate = self.pass();
        self.inner.drop_inputs(id)
    }
    fn get(&self, id: i64) -> anyhow::Result<Option<Job>> {
        let _gate = self.pass();
        self.inner.get(id)
    }
    fn result_zip(&self, id: i64) -> anyhow::Result<Option<bytes::Bytes>> {
        let _gate = self.pass();
        self.inner.result_zip(id)
    }
    fn transition(
        &self,
        id: i64,
        from: &[JobStatus],
        to: JobStatus,
        change: Change,
    ) -> anyhow::Result<Option<Job>> {
        let _gate = self.pass();
        self.inner.transition(id, from, to, change)
    }
    fn history(&self, id: i64) -> anyhow::Result<Vec<JobEvent>> {
        let _gate = self.pass();
        self.inner.history(id)
    }
    fn counts(&self, user: Option<i64>) -> anyhow::Result<Vec<(String, String, i64)>> {
        let _gate = self.pass();
        self.inner.counts(user)
    }
    fn finished_per_minute(
        &self,
        since_ms: i64,
        user: Option<i64>,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        let _gate = self.pass();
        self.inner.finished_per_minute(since_ms, user)
    }
    fn in_states(&self, states: &[JobStatus]) -> anyhow::Result<Vec<Job>> {
        let _gate = self.pass();
        self.inner.in_states(states)
    }
    fn on_client(&self, base: &str) -> anyhow::Result<Vec<Job>> {
        let _gate = self.pass();
        self.inner.on_client(base)
    }
    fn abandoned_on(&self, base: &str) -> anyhow::Result<Vec<AbandonedRun>> {
        let _gate = self.pass();
        self.inner.abandoned_on(base)
    }
    fn forget_abandoned(&self, base: &str, dest_id: i64) -> anyhow::Result<()> {
        let _gate = self.pass();
        self.inner.forget_abandoned(base, dest_id)
    }
    fn by_dest(&self, base: &str, dest_id: i64) -> anyhow::Result<Option<Job>> {
        let _gate = self.pass();
        self.inner.by_dest(base, dest_id)
    }
    fn finished_before(&self, cutoff_ms: i64) -> anyhow::Result<Vec<i64>> {
        let _gate = self.pass();
        self.inner.finished_before(cutoff_ms)
    }
    fn ids_with_files(&self) -> anyhow::Result<HashSet<i64>> {
        let _gate = self.pass();
        self.inner.ids_with_files()
    }
    fn all_ids(&self) -> anyhow::Result<HashSet<i64>> {
        let _gate = self.pass();
        self.inner.all_ids()
    }
    fn list(&self, filter: &ListFilter) -> anyhow::Result<(Vec<Job>, i64)> {
        let _gate = self.pass();
        self.inner.list(filter)
    }
    fn count(&self) -> anyhow::Result<i64> {
        let _gate = self.pass();
        self.inner.count()
    }
    fn due_deliveries(&self, now_ms: i64, limit: usize) -> anyhow::Result<Vec<Delivery>> {
        let _gate = self.pass();
        self.inner.due_deliveries(now_ms, limit)
    }
    fn next_delivery_ms(&self) -> anyhow::Result<Option<i64>> {
        let _gate = self.pass();
        self.inner.next_delivery_ms()
    }
    fn retry_delivery(&self, id: &str, status: &str, next_ms: i64) -> anyhow::Result<()> {
        let _gate = self.pass();
        self.inner.retry_delivery(id, status, next_ms)
    }
    fn finish_delivery(
        &self,
        id: &str,
        status: &str,
        tried: bool,
        end: DeliveryEnd,
    ) -> anyhow::Result<()> {
        let _gate = self.pass();
        self.inner.finish_delivery(id, status, tried, end)
    }
    fn notifications(&self, id: i64) -> anyhow::Result<Vec<Notification>> {
        let _gate = self.pass();
        self.inner.notifications(id)
    }
    fn usage(&self) -> anyhow::Result<Vec<crate::store::UsageRow>> {
        let _gate = self.pass();
        self.inner.usage()
    }
    fn save_usage(&self, row: &crate::store::UsageRow) -> anyhow::Result<()> {
        let _gate = self.pass();
        self.inner.save_usage(row)
    }
    fn take_upload_slot(
        &self,
        service: &str,
        user_id: i64,
        quota: crate::ratelimit::RateQuota,
        now_ms: i64,
    ) -> anyhow::Result<Result<(), i64>> {
        let _gate = self.pass();
        self.inner.take_upload_slot(service, user_id, quota, now_ms)
    }
    fn health(&self) -> Result<(), String> {
        let _gate = self.pass();
        self.inner.health()
    }
    fn check_integrity(&self) -> Result<(), String> {
        let _gate = self.pass();
        self.inner.check_integrity()
    }
}

/// The shared state of a server of one service without clients, on `db`.
fn shared_on(dir: &std::path::Path, db: Box<dyn JobDb>) -> Arc<Shared> {
    let config = ServerConfig::new(
        dir.to_path_buf(),
        [("example".to_owned(), ServiceConfig::new(Vec::new()))].into(),
    );
    let mut sched = Scheduler::new();
    let service = sched.add_service(1, 1, Vec::new());
    let (jobs_dir, results_dir, staging_dir) =
        (dir.join("jobs"), dir.join("results"), dir.join("staging"));
    for d in [&jobs_dir, &results_dir, &staging_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let store = Arc::new(JobTable::new(db));
    let service_ids: HashMap<String, _> = [("example".to_owned(), service)].into();
    let lifecycle = Lifecycle::new(
        store.clone(),
        sched,
        service_ids.clone(),
        config.max_attempts,
    );
    Arc::new(Shared {
        config,
        store,
        lifecycle,
        clients: crate::clients::Pool::default(),
        service_ids,
        loops: crate::supervise::Loops::default(),
        check_requests: crate::shared::CheckRequests::default(),
        job_tasks: crate::shared::JobTasks::default(),
        in_flight: Mutex::new(HashMap::new()),
        checks: tokio::sync::Semaphore::new(4),
        jobs_dir,
        results_dir,
        staging_dir,
        role: crate::shared::Role::alone(),
    })
}

/// A server on a store held by the test, on a runtime of two async workers (as on a small
/// machine: work that waited on the store on one of them would take a worker per wait).
struct HeldStore {
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    gate: Arc<Mutex<()>>,
    shared: Arc<Shared>,
    base: String,
    http: reqwest::Client,
}

impl HeldStore {
    fn start() -> HeldStore {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Mutex::new(()));
        let db = GatedDb {
            inner: SqliteDb::open(&dir.path().join("jobs.sqlite")).unwrap(),
            gate: gate.clone(),
        };
        let shared = shared_on(dir.path(), Box::new(db));
        let app = super::router(shared.clone());
        let base = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            base
        });
        HeldStore {
            runtime,
            _dir: dir,
            gate,
            shared,
            base,
            http: reqwest::Client::new(),
        }
    }

    /// Holds the store for [`HELD`], starts `waiters` (work that waits on it; more than there
    /// are workers), and checks that `GET /` answers meanwhile; then that every waiter ends.
    fn ping_answers_while(&self, waiters: impl FnOnce() -> Vec<tokio::task::JoinHandle<()>>) {
        std::thread::scope(|scope| {
            let (held, holding) = std::sync::mpsc::channel::<()>();
            let gate = self.gate.clone();
            scope.spawn(move || {
                let _held = crate::lock(&gate);
                held.send(()).unwrap();
                std::thread::sleep(HELD);
            });
            holding.recv().unwrap();
            let waiting = waiters();
            std::thread::sleep(Duration::from_millis(300));
            // The ping needs no store: it answers at once while those wait.
            let asked = Instant::now();
            let ping = self
                .runtime
                .block_on(self.http.get(format!("{}/", self.base)).send())
                .unwrap();
            let took = asked.elapsed();
            assert!(ping.status().is_success());
            assert!(
                took < HELD / 2,
                "GET / took {took:?} while the store was held: a wait blocks an async worker"
            );
            for waiter in waiting {
                self.runtime.block_on(waiter).unwrap();
            }
        });
    }
}

#[test]
fn a_held_store_does_not_stall_requests_that_need_none() {
    let server = HeldStore::start();
    server.ping_answers_while(|| {
        (0..8)
            .map(|i| {
                let url = match i % 3 {
                    0 => format!("{}/jobs", server.base),
                    1 => format!("{}/jobs/1", server.base),
                    _ => format!("{}/jobs/1/events", server.base),
                };
                let http = server.http.clone();
                server.runtime.spawn(async move {
                    // Once the store is free, the waiting requests are answered as usual.
                    let status = http.get(url).send().await.unwrap().status();
                    assert!(status == 200 || status == 404, "{status}");
                })
            })
            .collect()
    });
}

/// The same rule for the background loops: they call the lifecycle's events and the job
/// table's reads from async tasks, and a held database must not take the workers from the
/// requests that need none (the job table runs each call off the worker).
#[test]
fn a_held_store_does_not_let_the_loops_stall_requests_that_need_none() {
    let server = HeldStore::start();
    server.ping_answers_while(|| {
        (0..8)
            .map(|i| {
                let shared = server.shared.clone();
                server.runtime.spawn(async move {
                    // What the collector and the dispatcher do, on async workers.
                    if i % 2 == 0 {
                        assert!(shared.store.get(1).unwrap().is_none());
                    } else {
                        assert_eq!(shared.lifecycle.decide().len(), 0);
                        let none = shared.store.on_client("http://c").unwrap();
                        assert!(none.is_empty());
                    }
                })
            })
            .collect()
    });
}
