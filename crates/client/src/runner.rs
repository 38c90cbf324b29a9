//! Runs payloads: a first-in first-out queue of Prepared payloads, a fixed number of slots,
//! and one task per running payload that owns its process group until it has ended.
//!
//! A payload starts the moment it is queued and a slot is free (no polling). Kill requests
//! and the walltime limit reach the running task through a `Notify`.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use jobrelay_common::protocol::{PayloadRecord, PayloadStatus, RUN_SCRIPT};
use tokio::process::Child;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::process;
use crate::store::{now_ms, PayloadStore, Refused};

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub slots: usize,
    pub kill_grace: Duration,
    pub max_runtime: Option<Duration>,
}

/// Handle to a running payload's task.
struct Running {
    kill: Arc<Notify>,
    done: watch::Receiver<bool>,
    pgid: u32,
}

/// Outcome of a kill request.
pub enum KillOutcome {
    Killed(PayloadRecord),
    AlreadyFinished(PayloadRecord),
    NotFound,
}

pub struct Runner {
    store: Arc<PayloadStore>,
    config: RunnerConfig,
    queue: Mutex<VecDeque<u64>>,
    queued: Notify,
    slots: Arc<Semaphore>,
    running: Mutex<HashMap<u64, Running>>,
}

enum Ending {
    Exited(std::io::Result<std::process::ExitStatus>),
    KillRequested,
    Walltime,
}

impl Runner {
    pub fn new(store: Arc<PayloadStore>, config: RunnerConfig) -> Arc<Self> {
        Arc::new(Runner {
            store,
            slots: Arc::new(Semaphore::new(config.slots)),
            config,
            queue: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            running: Mutex::new(HashMap::new()),
        })
    }

    pub fn slots(&self) -> usize {
        self.config.slots
    }

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
            self.clone().start_payload(id, permit);
        }
    }

    fn start_payload(self: Arc<Self>, id: u64, permit: OwnedSemaphorePermit) {
        let loc = self.store.work_dir_of(id);
        let marker = process::marker(self.store.node(), id);
        let kill = Arc::new(Notify::new());
        let (done_tx, done_rx) = watch::channel(false);
        // Hold the running-map lock across the state change, so that a kill request sees
        // either a Prepared payload or a registered running one, never a gap in between.
        let mut running = self.running.lock().unwrap();
        let mut child = match process::spawn_run_script(&loc, &marker) {
            Ok(child) => child,
            Err(e) => {
                drop(running);
                let _ = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
                    r.status = PayloadStatus::Failed;
                    r.reason = Some(format!("could not start run.sh: {e}"));
                });
                return;
            }
        };
        let pgid = child.id().unwrap_or(0);
        let started = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
            r.status = PayloadStatus::Running;
            r.pid = pgid;
            r.started_ms = Some(now_ms());
        });
        if started.is_err() {
            // Killed (or gone) while it waited: it must not run.
            drop(running);
            process::kill_leftovers(pgid);
            tokio::spawn(async move { child.wait().await });
            return;
        }
        running.insert(
            id,
            Running {
                kill: kill.clone(),
                done: done_rx,
                pgid,
            },
        );
        drop(running);

        tokio::spawn(async move {
            let _permit = permit;
            // A panic while supervising must not leave the payload Running forever.
            let finished = AssertUnwindSafe(self.supervise(&mut child, pgid, &kill))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    process::kill_leftovers(pgid);
                    Finished {
                        status: PayloadStatus::Failed,
                        exit_code: None,
                        signal: None,
                        reason: "internal error while supervising the payload".into(),
                    }
                });
            let _ = self.store.transition(id, &[PayloadStatus::Running], |r| {
                r.status = finished.status;
                r.exit_code = finished.exit_code;
                r.signal = finished.signal;
                r.reason = Some(finished.reason);
                r.killed = finished.status == PayloadStatus::Killed;
            });
            self.running.lock().unwrap().remove(&id);
            let _ = done_tx.send(true);
        });
    }

    /// Waits for the payload's end: its own exit, a kill request or the walltime.
    async fn supervise(&self, child: &mut Child, pgid: u32, kill: &Notify) -> Finished {
        let walltime = async {
            match self.config.max_runtime {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let ending = tokio::select! {
            status = child.wait() => Ending::Exited(status),
            _ = kill.notified() => Ending::KillRequested,
            _ = walltime => Ending::Walltime,
        };
        let grace = self.config.kill_grace;
        match ending {
            Ending::Exited(status) => {
                process::kill_leftovers(pgid);
                finish_exited(status)
            }
            Ending::KillRequested => {
                let status = process::terminate(child, pgid, grace).await;
                Finished::from_status(PayloadStatus::Killed, status, "killed on request")
            }
            Ending::Walltime => {
                let status = process::terminate(child, pgid, grace).await;
                let limit = self.config.max_runtime.unwrap_or_default().as_secs_f64();
                Finished::from_status(
                    PayloadStatus::Failed,
                    status,
                    &format!("walltime of {limit} s exceeded, killed"),
                )
            }
        }
    }

    /// Stops a payload: a Prepared one never starts, a Running one has its whole process
    /// group terminated. Answers once the payload has reached Killed.
    pub async fn kill(&self, id: u64) -> KillOutcome {
        let killed_before_start = self.store.transition(id, &[PayloadStatus::Prepared], |r| {
            r.status = PayloadStatus::Killed;
            r.killed = true;
            r.reason = Some("killed on request before it started".into());
        });
        match killed_before_start {
            Ok(record) => return KillOutcome::Killed(record),
            Err(Refused::NotFound) => return KillOutcome::NotFound,
            Err(Refused::InState(_)) => {}
        }
        let handle = self
            .running
            .lock()
            .unwrap()
            .get(&id)
            .map(|r| (r.kill.clone(), r.done.clone()));
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

    /// Sends SIGKILL to every running payload's group (used when the client shuts down; the
    /// records stay Running and are settled at the next start).
    pub fn kill_all_now(&self) {
        for running in self.running.lock().unwrap().values() {
            process::kill_leftovers(running.pgid);
        }
    }
}

struct Finished {
    status: PayloadStatus,
    exit_code: Option<i32>,
    signal: Option<i32>,
    reason: String,
}

impl Finished {
    fn from_status(
        status: PayloadStatus,
        exit: std::io::Result<std::process::ExitStatus>,
        reason: &str,
    ) -> Self {
        let (exit_code, signal) = exit.map(process::describe).unwrap_or((None, None));
        Finished {
            status,
            exit_code,
            signal,
            reason: reason.to_owned(),
        }
    }
}

fn finish_exited(exit: std::io::Result<std::process::ExitStatus>) -> Finished {
    match exit.map(process::describe) {
        Ok((Some(0), _)) => Finished {
            status: PayloadStatus::Completed,
            exit_code: Some(0),
            signal: None,
            reason: "run.sh exited with code 0".into(),
        },
        Ok((Some(code), _)) => Finished {
            status: PayloadStatus::Failed,
            exit_code: Some(code),
            signal: None,
            reason: format!("run.sh exited with code {code}"),
        },
        Ok((None, signal)) => Finished {
            status: PayloadStatus::Failed,
            exit_code: None,
            signal,
            reason: format!("run.sh was killed by signal {}", signal.unwrap_or(0)),
        },
        Err(e) => Finished {
            status: PayloadStatus::Failed,
            exit_code: None,
            signal: None,
            reason: format!("could not wait for run.sh: {e}"),
        },
    }
}

/// A payload can run only with a regular file `run.sh` at the top of its work directory.
pub fn check_run_script(dir: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(dir.join(RUN_SCRIPT)) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(_) => Err(format!("{RUN_SCRIPT} is not a regular file")),
        Err(_) => Err(format!("no {RUN_SCRIPT} among the payload's files")),
    }
}
