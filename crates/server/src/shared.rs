//! What every part of a running server shares: its configuration, the lifecycle (and the job
//! table to read), the pool of clients, the background loops and the data directory's
//! folders. Built once by [`crate::start`]; the modules it holds (config, lifecycle,
//! clients, supervise) never take it, so it sits above them and below the modules that do.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::clients::{ClientHandle, Pool};
use crate::config::ServerConfig;
use crate::lifecycle::{JobTable, Lifecycle};
use crate::scheduler::ServiceId;
use crate::store::Job;
use crate::supervise;

/// State shared by every part of a running server.
pub struct Shared {
    pub config: ServerConfig,
    /// The jobs, to read; every change goes through `lifecycle`.
    pub store: Arc<JobTable>,
    /// The one writer of job state (and owner of the scheduler).
    pub lifecycle: Lifecycle,
    /// Every client, configured or joined.
    pub clients: Pool,
    pub service_ids: HashMap<String, ServiceId>,
    /// Jobs whose state is being checked on their client right now; `true` when another
    /// check was asked for meanwhile.
    pub in_flight: Mutex<HashMap<i64, bool>>,
    /// Bounds the checks of jobs running at once (a reconcile of thousands of jobs).
    pub checks: tokio::sync::Semaphore,
    /// `<data>/jobs/<id>/`: the uploaded files of each job.
    pub jobs_dir: PathBuf,
    /// `<data>/results/<id>.zip`: the stored work directory of each finished job.
    pub results_dir: PathBuf,
    /// `<data>/staging/`: uploads being received.
    pub staging_dir: PathBuf,
    /// Checks asked for by the effects, served by the collector.
    pub check_requests: CheckRequests,
    /// The per-job tasks (a send, a check, a timer), stopped with the server.
    pub job_tasks: JobTasks,
    /// The background loops, for `/health`.
    pub loops: supervise::Loops,
    /// Whether this server leads, and who does.
    pub role: Role,
}

impl Shared {
    pub fn job_dir(&self, id: i64) -> PathBuf {
        self.jobs_dir.join(id.to_string())
    }

    pub fn result_path(&self, id: i64) -> PathBuf {
        self.results_dir.join(format!("{id}.zip"))
    }

    pub fn client_of(&self, base: Option<&str>) -> Option<Arc<ClientHandle>> {
        base.and_then(|b| self.clients.by_base(b))
    }
}

/// Checks of jobs on their clients asked for by the effects ([`crate::effects`]) and served by
/// the collector's loop ([`crate::collector::serve_check_requests`]). A message rather than a
/// call: a check ends in effects of its own, so the effects cannot call the collector.
pub struct CheckRequests {
    sender: tokio::sync::mpsc::UnboundedSender<Job>,
    receiver: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Job>>,
}

impl Default for CheckRequests {
    fn default() -> Self {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        CheckRequests {
            sender,
            receiver: tokio::sync::Mutex::new(receiver),
        }
    }
}

impl CheckRequests {
    /// Asks for a check of `job` (as committed) on its client.
    pub fn ask(&self, job: Job) {
        // The receiver lives as long as this: sending cannot fail.
        let _ = self.sender.send(job);
    }

    /// Hands every request to `serve`, for ever. One loop at a time takes them; a loop
    /// restarted after a panic takes over the requests not yet served.
    pub async fn serve(&self, mut serve: impl FnMut(Job)) {
        let mut receiver = self.receiver.lock().await;
        while let Some(job) = receiver.recv().await {
            serve(job);
        }
    }
}

/// The per-job tasks a server starts (a send, a check, a backoff timer): spawned here, so
/// that stopping the server stops them too (a task left running would go on changing jobs of
/// a server that was stopped, with another one maybe started on the same data). A stopped
/// task is dropped at its next await: as after a crash, the next start takes the job up
/// where its last commit left it.
/// A leader's term ends the same way ([`JobTasks::end_term`]): its tasks stop, and the next
/// term starts with none.
#[derive(Default)]
pub struct JobTasks {
    term: Mutex<Term>,
    /// Tasks that outlive a term and stop only with the server (a joined client's relay:
    /// the next term needs it, the client's tunnels come to whichever term leads).
    process: Term,
}

#[derive(Default, Clone)]
struct Term {
    tracker: tokio_util::task::TaskTracker,
    stopping: tokio_util::sync::CancellationToken,
}

impl JobTasks {
    fn current(&self) -> Term {
        crate::lock(&self.term).clone()
    }

    /// Runs `task` on a task of its own, until it ends or the server stops.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let term = self.current();
        if term.stopping.is_cancelled() {
            return;
        }
        let stopping = term.stopping.clone();
        term.tracker.spawn(async move {
            stopping.run_until_cancelled_owned(task).await;
        });
    }

    /// Runs `task` until it ends or the server stops; a change of leader does not stop it.
    pub fn spawn_for_process(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.process.stopping.is_cancelled() {
            return;
        }
        let stopping = self.process.stopping.clone();
        self.process.tracker.spawn(async move {
            stopping.run_until_cancelled_owned(task).await;
        });
    }

    /// Stops every task and resolves once they are all gone.
    pub async fn stop(&self) {
        let term = self.current();
        for scope in [&term, &self.process] {
            scope.stopping.cancel();
            scope.tracker.close();
        }
        term.tracker.wait().await;
        self.process.tracker.wait().await;
    }

    /// Stops every task of this leader's term (as [`JobTasks::stop`]); tasks spawned later
    /// run again, for the next term.
    pub async fn end_term(&self) {
        let ending = std::mem::take(&mut *crate::lock(&self.term));
        ending.stopping.cancel();
        ending.tracker.close();
        ending.tracker.wait().await;
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.current().tracker.len()
    }
}

/// This server's part in a cluster of servers on one database, as `/health`, `/metrics` and
/// the dashboard show it. Changed only by the leader's campaign (`crate::leader`).
pub struct Role {
    /// This server's name (unique per process).
    pub name: String,
    pub started_ms: i64,
    state: Mutex<RoleState>,
}

/// What a server knows of the leadership.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleState {
    /// Whether this server leads.
    pub leading: bool,
    /// The leader (this server or another), when known.
    pub leader: Option<String>,
    /// Unix ms since which it leads.
    pub since_ms: Option<i64>,
    /// The lease's epoch; `None` without a lease (a database of one server's own).
    pub epoch: Option<i64>,
}

impl Role {
    pub fn new(name: String, state: RoleState) -> Self {
        Role {
            name,
            started_ms: crate::store::now_ms(),
            state: Mutex::new(state),
        }
    }

    /// The role of a server on a database of its own: it leads, without a lease.
    pub fn alone() -> Self {
        Role::new(
            "this-server".into(),
            RoleState {
                leading: true,
                ..RoleState::default()
            },
        )
    }

    pub fn get(&self) -> RoleState {
        crate::lock(&self.state).clone()
    }

    pub fn set(&self, state: RoleState) {
        *crate::lock(&self.state) = state;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::config::{ClientEndpoint, ServerConfig, ServiceConfig};
    use crate::store::JobStatus;

    /// A seed-contract client whose `/submit` never answers: a send stays in flight.
    async fn client_that_never_answers_a_submission() -> String {
        use axum::routing::{get, post};
        let router = axum::Router::new()
            .route("/health", get(|| async { "ok" }))
            .route(
                "/submit",
                post(|| async {
                    std::future::pending::<()>().await;
                    "never"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }

    /// `shutdown` stops the per-job tasks too (here, a send in flight), not only the loops: a
    /// task left behind would go on acting for a server that was stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_server_leaves_no_task_of_its_own_behind() {
        let dir = tempfile::tempdir().unwrap();
        let base = client_that_never_answers_a_submission().await;
        let service = ServiceConfig::new(vec![ClientEndpoint::from_base(&base).unwrap()]);
        let config = ServerConfig::new(
            dir.path().to_path_buf(),
            [("example".to_owned(), service)].into(),
        );
        let server = crate::start(config).await.unwrap();
        let shared = server.shared.clone();
        let job = shared
            .lifecycle
            .uploaded(1, "example", None, &Default::default(), &[], |id| {
                std::fs::create_dir_all(shared.job_dir(id))?;
                std::fs::write(shared.job_dir(id).join("run.sh"), "true\n")
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while shared.store.get(job.id).unwrap().unwrap().status != JobStatus::Processing {
            assert!(Instant::now() < deadline, "the job was never sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            shared.job_tasks.running() > 0,
            "the send runs on a job task"
        );

        server.shutdown().await;
        assert_eq!(shared.job_tasks.running(), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&shared) > 1 {
            assert!(
                Instant::now() < deadline,
                "{} holders of the stopped server's state are left",
                Arc::strong_count(&shared) - 1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Stopped mid-send, as a crash would: the next start sends it again with its key.
        let after = shared.store.get(job.id).unwrap().unwrap();
        assert_eq!(after.status, JobStatus::Processing);
    }
}
