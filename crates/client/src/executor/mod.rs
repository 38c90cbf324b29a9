//! The executor seam: where a payload's `run.sh` actually runs. The runner (queue, slots, kill
//! requests, walltime, state changes) drives an [`Executor`] and the [`Job`] handles it returns,
//! and never learns whether a payload is a local process group or a Slurm job.
//!
//! - [`local`]: `bash run.sh` under a supervisor, in a process group and (cgroup v2) a
//!   cgroup of its own on this machine, followed again after a client restart.
//! - [`slurm`]: an `sbatch` job on a Slurm cluster, watched with one `squeue` call per interval
//!   for all jobs, re-attached after a client restart.
//!
//! Executors change no payload state themselves: they report progress ([`Progress`]) and the
//! runner applies it through `PayloadStore::transition`, the one place a state changes.

pub mod local;
pub mod slurm;

use crate::allot::Allotment;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jobrelay_common::protocol::{PayloadRecord, PayloadStatus};

use crate::load::LoadGauge;

/// Where payloads run.
pub enum Executor {
    Local(local::LocalExecutor),
    Slurm(Arc<slurm::SlurmExecutor>),
}

/// What a payload did, as its executor saw it.
pub enum Progress {
    /// It has started running (for Slurm: the job left PENDING). `pid` is the process group of
    /// a local payload, 0 for a Slurm job.
    Running { pid: u32 },
    /// It has ended on its own.
    Ended(Ended),
}

/// How a payload ended.
#[derive(Debug, Clone)]
pub struct Ended {
    /// Completed or Failed for an end on its own; the runner sets Killed or the walltime
    /// failure when it stopped the payload.
    pub status: PayloadStatus,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
}

impl Ended {
    pub fn failed(reason: impl Into<String>) -> Self {
        Ended {
            status: PayloadStatus::Failed,
            exit_code: None,
            signal: None,
            reason: reason.into(),
        }
    }
}

/// A started payload, owned by the runner's task for that payload.
pub enum Job {
    Local(local::LocalJob),
    Slurm(slurm::SlurmJob),
}

/// A cheap handle that stops a payload at once, usable when its [`Job`] is out of reach (a
/// panic while supervising it).
#[derive(Clone)]
pub enum Stopper {
    Local(u32, crate::process::Tracker),
    Slurm(Arc<slurm::SlurmExecutor>, u64),
}

impl Stopper {
    pub fn stop_now(&self) {
        match self {
            Stopper::Local(pgid, tracker) => {
                crate::process::kill_leftovers(*pgid);
                tracker.kill_now();
            }
            Stopper::Slurm(executor, job_id) => executor.cancel_in_background(*job_id),
        }
    }
}

/// What a payload's record needs once its executor accepted it.
pub struct Accepted {
    pub job: Job,
    /// Slurm job id to store in the record.
    pub slurm_job_id: Option<u64>,
}

/// Why a payload could not be started.
#[derive(Debug)]
pub struct StartError {
    pub reason: String,
    /// The cause may pass (Slurm's controller unreachable): the payload stays Prepared and
    /// the runner tries again, instead of failing it.
    pub transient: bool,
}

impl Executor {
    pub fn name(&self) -> &'static str {
        match self {
            Executor::Local(_) => "local",
            Executor::Slurm(_) => "slurm",
        }
    }

    /// Starts the payload in `dir`. `marker` tags its processes (see `process::MARKER_VAR`),
    /// `job_name` names it where the executor has names (Slurm). `retrying`: an earlier
    /// attempt failed in a way that may still have started it (Slurm: look the job up by its
    /// name before submitting again). `allotment`: what the payload is given (its
    /// environment says so; the memory is a limit where the executor can set one). `run`:
    /// which run of the payload id this is (its record's `created_ms`), for its exit record.
    pub async fn start(
        &self,
        dir: &Path,
        marker: &str,
        run: Option<u64>,
        job_name: &str,
        retrying: bool,
        allotment: &Allotment,
    ) -> Result<Accepted, StartError> {
        match self {
            Executor::Local(local) => local
                .start(dir, marker, run, allotment)
                .await
                .map(|job| Accepted {
                    job: Job::Local(job),
                    slurm_job_id: None,
                })
                .map_err(|reason| StartError {
                    reason,
                    transient: false,
                }),
            Executor::Slurm(slurm) => {
                let job = slurm
                    .submit(dir, marker, job_name, retrying, allotment)
                    .await?;
                let id = job.job_id();
                Ok(Accepted {
                    job: Job::Slurm(job),
                    slurm_job_id: Some(id),
                })
            }
        }
    }

    /// After a client restart: takes over a payload that the previous client process had
    /// started, if this executor can (a Slurm job keeps running without us; a local payload
    /// whose processes still run, or whose supervisor recorded its end meanwhile). `None`
    /// means it cannot be followed and must be settled as interrupted.
    pub fn reattach(&self, record: &PayloadRecord, marker: &str) -> Option<Job> {
        match self {
            Executor::Local(local) => local.reattach(record, marker).map(Job::Local),
            Executor::Slurm(slurm) => record.slurm_job_id.map(|job_id| {
                Job::Slurm(slurm.follow(job_id, record.status == PayloadStatus::Running))
            }),
        }
    }

    /// After a client restart: finds jobs that were submitted for Prepared payloads whose
    /// record did not get the job id (the client died between `sbatch` and writing the
    /// record), so that they are followed instead of submitted twice. Takes (payload id, job
    /// name) pairs; returns payload id to Slurm job id.
    pub async fn find_unrecorded(&self, named: &[(u64, String)]) -> HashMap<u64, u64> {
        match self {
            Executor::Local(_) => HashMap::new(),
            Executor::Slurm(slurm) => slurm.find_by_names(named).await,
        }
    }

    /// Stops every payload at once (client shutdown). Local process groups are killed; Slurm
    /// jobs are left running in Slurm and re-attached at the next start.
    pub fn stop_all_now(&self) {
        match self {
            Executor::Local(local) => local.kill_all_now(),
            Executor::Slurm(_) => {}
        }
    }

    /// After a client restart, for a payload [`Executor::reattach`] could not follow: kills
    /// what is left of it locally (never a Slurm job). Returns how many processes it found.
    pub async fn kill_leftovers_of(&self, id: u64, marker: &str) -> usize {
        match self {
            Executor::Local(local) => local.kill_leftovers_of(id, marker).await,
            Executor::Slurm(_) => crate::process::kill_marked(marker),
        }
    }

    /// The payload's final state is recorded: drop what was kept to find it after a restart
    /// (a local payload's exit file).
    pub fn settled(&self, id: u64) {
        match self {
            Executor::Local(local) => local.settled(id),
            Executor::Slurm(_) => {}
        }
    }

    /// Payloads that have something kept for them to settle after a restart (local exit
    /// files); see [`Executor::settled`].
    pub fn kept(&self) -> Vec<u64> {
        match self {
            Executor::Local(local) => local.exit_files(),
            Executor::Slurm(_) => Vec::new(),
        }
    }

    /// Clean shutdown, after [`Executor::stop_all_now`]: releases what the executor made
    /// for itself (the local executor's empty cgroup sub-tree).
    pub fn release(&self) {
        match self {
            Executor::Local(local) => local.release(),
            Executor::Slurm(_) => {}
        }
    }

    /// How a payload's memory request is enforced, as `/info` says it.
    pub fn memory_limits(&self) -> String {
        match self {
            Executor::Local(local) => local.memory_enforcement().describe(),
            Executor::Slurm(_) => "Slurm (sbatch --mem)".to_owned(),
        }
    }

    /// The limit that makes an allocation fail when a payload passes its memory request, so
    /// that a failed run whose stderr ends on an allocation failure was ended by it; `None`
    /// when the executor reports itself that the limit ended a run (a memory cgroup).
    pub fn allocation_failing_limit(&self) -> Option<&'static str> {
        match self {
            Executor::Local(local) if local.memory_enforcement().uses_rlimit() => Some("RLIMIT_AS"),
            Executor::Local(_) => None,
            Executor::Slurm(_) => Some("sbatch --mem"),
        }
    }

    /// Starts the background sampler behind `GET /load`.
    pub fn start_load_sampler(&self, gauge: &LoadGauge) {
        match self {
            Executor::Local(_) => gauge.start_sampler(),
            Executor::Slurm(slurm) => slurm.start_load_sampler(gauge.clone()),
        }
    }
}

impl Job {
    /// Waits for the next thing the payload does: it starts running, or it ends.
    pub async fn next(&mut self) -> Progress {
        match self {
            Job::Local(job) => job.next().await,
            Job::Slurm(job) => job.next().await,
        }
    }

    /// Stops the payload: asks it to end, forces it after `grace`, and returns once it has
    /// ended (the runner decides the final state).
    pub async fn terminate(&mut self, grace: Duration) -> Ended {
        match self {
            Job::Local(job) => job.terminate(grace).await,
            Job::Slurm(job) => job.terminate(grace).await,
        }
    }

    pub fn stopper(&self) -> Stopper {
        match self {
            Job::Local(job) => Stopper::Local(job.pgid(), job.tracker()),
            Job::Slurm(job) => job.stopper(),
        }
    }
}
