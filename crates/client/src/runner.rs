//! Runs payloads: a first-in first-out queue of Prepared payloads, a fixed number of slots,
//! and one task per started payload that owns its executor job until it has ended.
//!
//! A payload starts the moment it is queued and a slot is free (no polling). Kill requests
//! and the walltime limit reach the payload's task through a `Notify`. Where the payload runs
//! (a local process group, a Slurm job) is the executor's business: the runner only sees
//! `Job::next` (started / ended) and `Job::terminate`.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use jobrelay_common::protocol::{PayloadRecord, PayloadStatus, RUN_SCRIPT};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use jobrelay_common::resources::Capacity;

use crate::allot::{Allotment, GpuLease, GpuPool};
use crate::executor::{Ended, Executor, Job, Progress, Stopper};
use crate::process;
use crate::store::{now_ms, PayloadStore, Refused};

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub slots: usize,
    pub kill_grace: Duration,
    pub max_runtime: Option<Duration>,
    /// What the client advertises (`/info`).
    pub capacity: Capacity,
    /// The GPUs payloads are given, each to one payload at a time.
    pub gpu_ids: Vec<u32>,
}

/// Handle to a started payload's task.
struct Running {
    kill: Arc<Notify>,
    done: watch::Receiver<bool>,
}

/// Outcome of a kill request.
pub enum KillOutcome {
    Killed(PayloadRecord),
    AlreadyFinished(PayloadRecord),
    NotFound,
}

pub struct Runner {
    store: Arc<PayloadStore>,
    executor: Executor,
    config: RunnerConfig,
    queue: Mutex<VecDeque<u64>>,
    queued: Notify,
    slots: Arc<Semaphore>,
    gpus: Arc<GpuPool>,
    /// Payloads handed to the executor whose task has not ended yet. A payload in here may
    /// still be Prepared (a Slurm job waiting in Slurm's queue).
    running: Mutex<HashMap<u64, Running>>,
    /// Set when the client shuts down: the ends it causes are not recorded, so that the next
    /// start settles those payloads as interrupted ("client restarted") rather than Failed.
    stopping: std::sync::atomic::AtomicBool,
}

impl Runner {
    pub fn new(store: Arc<PayloadStore>, executor: Executor, config: RunnerConfig) -> Arc<Self> {
        Arc::new(Runner {
            store,
            executor,
            slots: Arc::new(Semaphore::new(config.slots)),
            gpus: Arc::new(GpuPool::new(config.gpu_ids.clone())),
            config,
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            running: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn slots(&self) -> usize {
        self.config.slots
    }

    pub fn capacity(&self) -> Capacity {
        self.config.capacity
    }

    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Payloads handed to the executor and not ended (for Slurm, also those still queued in
    /// Slurm).
    pub fn running_count(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    /// Starts the loop that hands free slots to queued payloads.
    pub fn start(self: &Arc<Self>) {
        let runner = self.clone();
        tokio::spawn(async move { runner.dispatch_loop().await });
    }

    /// Queues a Prepared payload, or marks it Invalid at once when it has no usable run.sh.
    pub fn enqueue(&self, id: u64) {
        let loc = self.store.work_dir_of(id);
        if let Err(why) = check_run_script(&loc) {
            let _ = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
                r.status = PayloadStatus::Invalid;
                r.reason = Some(why);
            });
            return;
        }
        self.queue.lock().unwrap().push_back(id);
        self.queued.notify_one();
    }

    async fn next_queued(&self) -> u64 {
        loop {
            let notified = self.queued.notified();
            if let Some(id) = self.queue.lock().unwrap().pop_front() {
                return id;
            }
            notified.await;
        }
    }

    async fn dispatch_loop(self: Arc<Self>) {
        loop {
            let permit = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the slot semaphore is never closed");
            let id = self.next_queued().await;
            // Its GPUs before it starts (first in first out: a payload waiting for GPUs holds
            // the queue, as one waiting for a slot does). The server places a job only where
            // its GPUs are free, so this waits only for a payload whose end it saw first.
            let wanted = self
                .store
                .get(id)
                .and_then(|r| r.resources)
                .map_or(0, |r| r.gpus as usize);
            let gpus = match self.gpus.take(wanted).await {
                Ok(lease) => Some(lease),
                Err(why) => {
                    let _ = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
                        r.status = PayloadStatus::Failed;
                        r.reason = Some(why);
                    });
                    continue;
                }
            };
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                // Shutting down: it stays Prepared and runs at the next start.
                return;
            }
            self.clone().launch(id, None, Some(permit), gpus);
        }
    }

    /// Takes over a payload the previous client process handed to the executor (a Slurm job
    /// that kept running). Call before `start`, so that it holds a slot like the others.
    pub fn adopt(self: &Arc<Self>, id: u64, job: Job) {
        let permit = self.slots.clone().try_acquire_owned().ok();
        // The GPUs it was given are still in use: not free for the payloads queued next.
        let gpus = self
            .store
            .get(id)
            .filter(|r| !r.gpu_ids.is_empty())
            .map(|r| self.gpus.claim(&r.gpu_ids));
        self.clone().launch(id, Some(job), permit, gpus);
    }

    /// Registers the payload as started and spawns the task that owns it until it ends.
    fn launch(
        self: Arc<Self>,
        id: u64,
        adopted: Option<Job>,
        permit: Option<OwnedSemaphorePermit>,
        gpus: Option<GpuLease>,
    ) {
        let kill = Arc::new(Notify::new());
        let (done_tx, done_rx) = watch::channel(false);
        {
            // The running-map lock is held across the check and the registration, and `kill`
            // takes it too: a kill request sees either a Prepared payload that is not
            // registered (and kills it in place) or a registered one (and asks its task),
            // never a gap in between.
            let mut running = self.running.lock().unwrap();
            if running.contains_key(&id) {
                // Already handed to the executor (never start a payload twice).
                tracing::error!(id, "payload queued while it is already started; ignored");
                return;
            }
            match self.store.get(id) {
                Some(r) if matches!(r.status, PayloadStatus::Prepared | PayloadStatus::Running) => {
                }
                // Killed (or gone) while it waited: it must not run.
                _ => return,
            }
            running.insert(
                id,
                Running {
                    kill: kill.clone(),
                    done: done_rx,
                },
            );
        }

        tokio::spawn(async move {
            let _permit = permit;
            let gpu_ids = gpus.as_ref().map_or(Vec::new(), |g| g.ids().to_vec());
            let _gpus = gpus;
            let stopper: Mutex<Option<Stopper>> = Mutex::new(None);
            // A panic while supervising must not leave the payload Running forever.
            let ended = AssertUnwindSafe(self.run_payload(id, adopted, gpu_ids, &kill, &stopper))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    if let Some(stopper) = stopper.lock().unwrap().take() {
                        stopper.stop_now();
                    }
                    Ended::failed("internal error while supervising the payload")
                });
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let mut ended = ended;
            let memory_mb = self
                .store
                .get(id)
                .and_then(|r| r.resources)
                .and_then(|r| r.memory_mb);
            let rlimit = self.executor.allocation_failing_limit();
            if let (Some(mb), Some(how)) = (
                memory_mb.filter(|_| ended.status == PayloadStatus::Failed),
                rlimit,
            ) {
                if crate::allot::stderr_says_out_of_memory(&self.store.work_dir_of(id)) {
                    ended.reason = format!(
                        "the job's memory limit of {mb} MiB ({how}) ended it: an allocation \
                         failed; {}",
                        ended.reason
                    );
                }
            }
            if ended.status == PayloadStatus::Failed && disk_full(&self.store.work_dir_of(id)) {
                // The script's own error message may not have fit on the disk either.
                ended
                    .reason
                    .push_str("; its work directory's file system is full");
            }
            let _ = self.store.transition(
                id,
                &[PayloadStatus::Prepared, PayloadStatus::Running],
                |r| {
                    r.status = ended.status;
                    r.exit_code = ended.exit_code;
                    r.signal = ended.signal;
                    r.reason = Some(ended.reason);
                    r.killed = ended.status == PayloadStatus::Killed;
                },
            );
            self.executor.settled(id);
            self.running.lock().unwrap().remove(&id);
            let _ = done_tx.send(true);
        });
    }

    /// Starts the payload (unless it was adopted already started) and follows it to its end.
    async fn run_payload(
        &self,
        id: u64,
        adopted: Option<Job>,
        gpu_ids: Vec<u32>,
        kill: &Notify,
        stopper: &Mutex<Option<Stopper>>,
    ) -> Ended {
        let mut job = match adopted {
            Some(job) => job,
            None => {
                if kill.notified().now_or_never().is_some() {
                    return killed_before_start();
                }
                let dir = self.store.work_dir_of(id);
                let marker = process::marker(self.store.node(), id);
                let name = job_name(self.store.node(), id);
                // Write-ahead: the record says a start was attempted before any process
                // exists, so a client killed between the start and the Running record does not
                // start the payload a second time after a restart (recovery fails it instead).
                let allotment = self.allotment(id, gpu_ids.clone());
                let run = self
                    .store
                    .transition(id, &[PayloadStatus::Prepared], |r| {
                        r.started_ms = Some(now_ms());
                        r.gpu_ids = gpu_ids.clone();
                    })
                    .ok()
                    .and_then(|r| r.created_ms);
                let mut attempt: u32 = 0;
                let accepted = loop {
                    match self
                        .executor
                        .start(&dir, &marker, run, &name, attempt > 0, &allotment)
                        .await
                    {
                        Ok(accepted) => break accepted,
                        Err(e) if e.transient => {
                            // The payload stays Prepared and keeps its slot; a kill ends the
                            // wait (a start in progress is never interrupted, so nothing is
                            // left submitted behind our back).
                            attempt += 1;
                            let backoff = Duration::from_secs(1 << attempt.min(6)).min(RETRY_MAX);
                            tracing::warn!(id, error = %e.reason, retry_in = ?backoff, "could not start the payload; trying again");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = kill.notified() => return killed_before_start(),
                            }
                        }
                        Err(e) => return Ended::failed(e.reason),
                    }
                };
                if let Some(job_id) = accepted.slurm_job_id {
                    let _ = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
                        r.slurm_job_id = Some(job_id);
                    });
                }
                accepted.job
            }
        };
        *stopper.lock().unwrap() = Some(job.stopper());
        self.supervise(id, &mut job, kill).await
    }

    /// What payload `id` is given: the cores and memory it asked for (one core, no memory
    /// limit without a request) and the GPUs it was assigned.
    fn allotment(&self, id: u64, gpu_ids: Vec<u32>) -> Allotment {
        let asked = self.store.get(id).and_then(|r| r.resources);
        Allotment {
            cores: asked.map_or(1, |r| r.cores.max(1)),
            memory_mb: asked.and_then(|r| r.memory_mb),
            gpu_ids,
        }
    }

    /// The longest payload `id` may run: the shorter of its own walltime and the client's
    /// `--max-runtime`; with which of the two it is.
    fn walltime_of(&self, id: u64) -> Option<(Duration, &'static str)> {
        let asked = self
            .store
            .get(id)
            .and_then(|r| r.resources)
            .and_then(|r| r.walltime_s)
            .map(Duration::from_secs);
        match (asked, self.config.max_runtime) {
            (Some(job), Some(client)) if client < job => Some((client, "--max-runtime")),
            (Some(job), _) => Some((job, "the job's walltime")),
            (None, Some(client)) => Some((client, "--max-runtime")),
            (None, None) => None,
        }
    }

    /// Waits for the payload's end: its own, a kill request or the walltime (counted from the
    /// moment it runs).
    async fn supervise(&self, id: u64, job: &mut Job, kill: &Notify) -> Ended {
        let walltime_limit = self.walltime_of(id);
        let limit = walltime_limit.map(|(limit, _)| limit);
        let mut deadline = self.store.get(id).and_then(|r| {
            (r.status == PayloadStatus::Running)
                .then(|| deadline_from(limit, r.started_ms.unwrap_or_else(now_ms)))
                .flatten()
        });
        let grace = self.config.kill_grace;
        loop {
            let walltime = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                progress = job.next() => match progress {
                    Progress::Running { pid } => {
                        let started = now_ms();
                        let _ = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
                            r.status = PayloadStatus::Running;
                            r.pid = pid;
                            r.started_ms = Some(started);
                        });
                        deadline = deadline_from(limit, started);
                    }
                    Progress::Ended(ended) => return ended,
                },
                _ = kill.notified() => {
                    let ended = job.terminate(grace).await;
                    return Ended {
                        status: PayloadStatus::Killed,
                        reason: "killed on request".into(),
                        ..ended
                    };
                }
                _ = walltime => {
                    let ended = job.terminate(grace).await;
                    let (limit, whose) = walltime_limit.unwrap_or((Duration::ZERO, ""));
                    let limit = limit.as_secs_f64();
                    return Ended {
                        status: PayloadStatus::Failed,
                        reason: format!("walltime of {limit} s exceeded ({whose}), killed"),
                        ..ended
                    };
                }
            }
        }
    }

    /// Stops a payload: a Prepared one that was not handed to the executor never starts, a
    /// started one is stopped by its executor. Answers once the payload has reached Killed.
    pub async fn kill(&self, id: u64) -> KillOutcome {
        let handle = {
            let running = self.running.lock().unwrap();
            match running.get(&id) {
                Some(r) => Some((r.kill.clone(), r.done.clone())),
                None => {
                    let killed_before_start =
                        self.store.transition(id, &[PayloadStatus::Prepared], |r| {
                            r.status = PayloadStatus::Killed;
                            r.killed = true;
                            r.reason = Some("killed on request before it started".into());
                        });
                    match killed_before_start {
                        Ok(record) => return KillOutcome::Killed(record),
                        Err(Refused::NotFound) => return KillOutcome::NotFound,
                        Err(Refused::InState(_)) => None,
                    }
                }
            }
        };
        let Some((kill, mut done)) = handle else {
            // Finished before this request arrived.
            return match self.store.get(id) {
                Some(record) => KillOutcome::AlreadyFinished(record),
                None => KillOutcome::NotFound,
            };
        };
        kill.notify_one();
        let _ = done.wait_for(|finished| *finished).await;
        match self.store.get(id) {
            // Killed by this request (or by a concurrent one: the same outcome).
            Some(record) if record.status == PayloadStatus::Killed => KillOutcome::Killed(record),
            // It finished on its own before the signal reached it.
            Some(record) => KillOutcome::AlreadyFinished(record),
            None => KillOutcome::NotFound,
        }
    }

    /// Stops every started payload at once (the client is shutting down): local process
    /// groups get SIGKILL and their records stay Running, settled at the next start; Slurm
    /// jobs keep running and are re-attached at the next start.
    pub fn kill_all_now(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.executor.stop_all_now();
    }
}

/// When a payload started at `started_ms` must end, with a walltime `limit`.
fn deadline_from(limit: Option<Duration>, started_ms: u64) -> Option<Instant> {
    let limit = limit?;
    let elapsed = Duration::from_millis(now_ms().saturating_sub(started_ms));
    Some(Instant::now() + limit.saturating_sub(elapsed))
}

/// Longest wait between two attempts to start a payload whose executor is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Whether the file system holding `dir` has (next to) no space left.
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between platforms
fn disk_full(dir: &Path) -> bool {
    nix::sys::statvfs::statvfs(dir).is_ok_and(|st| {
        (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64) < 64 * 1024
    })
}

fn killed_before_start() -> Ended {
    Ended {
        status: PayloadStatus::Killed,
        exit_code: None,
        signal: None,
        reason: "killed on request before it started".into(),
    }
}

/// The name a payload carries where its executor names jobs (Slurm's `--job-name`):
/// `jobrelay-<first 8 characters of the node id>-<payload id>`.
pub fn job_name(node: &str, id: u64) -> String {
    let short: String = node.chars().take(8).collect();
    format!("jobrelay-{short}-{id}")
}

/// A payload can run only with a regular file `run.sh` at the top of its work directory.
pub fn check_run_script(dir: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(dir.join(RUN_SCRIPT)) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(_) => Err(format!("{RUN_SCRIPT} is not a regular file")),
        Err(_) => Err(format!("no {RUN_SCRIPT} among the payload's files")),
    }
}
