//! What every part of a running server shares: its configuration, the lifecycle (and the job
//! table to read), the pool of clients, the background loops and the data directory's
//! folders. Built once by [`crate::start`]; the modules it holds (config, lifecycle,
//! clients, supervise) never take it, so it sits above them and below the modules that do.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::clients::ClientHandle;
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
    pub clients: Vec<Arc<ClientHandle>>,
    pub client_by_base: HashMap<String, usize>,
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
    /// The background loops, for `/health`.
    pub loops: supervise::Loops,
}

impl Shared {
    pub fn job_dir(&self, id: i64) -> PathBuf {
        self.jobs_dir.join(id.to_string())
    }

    pub fn result_path(&self, id: i64) -> PathBuf {
        self.results_dir.join(format!("{id}.zip"))
    }

    pub fn client_of(&self, base: Option<&str>) -> Option<Arc<ClientHandle>> {
        base.and_then(|b| self.client_by_base.get(b))
            .map(|&i| self.clients[i].clone())
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
