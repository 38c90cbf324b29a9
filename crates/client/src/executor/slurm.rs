//! The Slurm executor: each payload becomes an `sbatch` job that runs `bash run.sh` in the
//! payload's work directory, which must therefore be on a file system the compute nodes share.
//!
//! - Submission: `sbatch --parsable --job-name=jobrelay-<node>-<id> --chdir=<work dir>
//!   --output=.jobrelay.stdout --error=.jobrelay.stderr [--partition] [--account]
//!   [--slurm-arg ...]`, the batch script (on stdin) being `exec bash run.sh`.
//! - Watching: one task polls `squeue -t all -j <every followed job>` once per interval, for
//!   all jobs at once, and only while there are jobs to follow; each job's handle waits on a
//!   `watch` channel, so the runner (and the change feed behind it) react to each change as
//!   soon as the poll sees it.
//! - Stopping: `scancel --signal=TERM --full` (the batch script and every process of the job),
//!   then, if the job has not ended after the kill grace, `scancel` (Slurm's own cancel: TERM,
//!   then KILL after the cluster's KillWait). A job still pending is cancelled at once.
//! - Restarts: the job id is in the payload record; a restarted client follows the job again
//!   (a job whose id never reached the record is found by its job name). Jobs the controller
//!   has purged are settled from `sacct` where accounting exists.
//! - An unreachable controller at submission is reported as transient: the runner keeps the
//!   payload Prepared and tries again.
//! - `/load`: the share of usable CPUs allocated, `sinfo -h -o %C` (allocated/idle/other/total)
//!   over the configured partition or the whole cluster: allocated / (allocated + idle).

use crate::allot::Allotment;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use jobrelay_common::protocol::{PayloadStatus, STDERR_FILE, STDOUT_FILE};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{watch, Notify, Semaphore};

use super::{Ended, Progress, StartError, Stopper};
use crate::load::LoadGauge;
use crate::process::MARKER_VAR;

/// The batch script handed to `sbatch`: the payload's own `run.sh` is never parsed by Slurm
/// (its `#SBATCH` lines, if any, have no effect).
const BATCH_SCRIPT: &str = "#!/bin/bash\nexec bash run.sh\n";
/// Longest a Slurm command may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// `sbatch` calls running at once (a burst of submissions must not fork hundreds of them).
const PARALLEL_SUBMISSIONS: usize = 4;
/// Polls in a row a followed job may be missing from `squeue` before it counts as vanished.
const MISSES_BEFORE_VANISHED: u32 = 3;
/// Most job ids or names in one `squeue` argument (a single argument must stay below the
/// kernel's 128 KiB).
const LIST_CHUNK: usize = 1000;
/// How often `/load` asks `sinfo`.
const LOAD_INTERVAL: Duration = Duration::from_secs(5);
/// After a kill, longest wait beyond the grace for Slurm to report the job's end.
const CANCEL_CONFIRM: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Passed to `sbatch` as they are, after jobrelay's own options.
    pub extra_args: Vec<String>,
    /// Interval between two `squeue` calls while jobs are followed.
    pub poll_interval: Duration,
}

/// One line of `squeue` about a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub state: String,
    /// Wait status as Slurm reports it (`exit code << 8 | signal`).
    pub exit_raw: Option<i32>,
    pub reason: String,
}

/// What the watcher knows of a job.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    NotYet,
    Row(JobRow),
    /// `squeue` no longer lists it (purged from the controller's memory).
    Vanished,
}

/// Where a job is in its life, by its Slurm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    Ended,
}

/// Maps a Slurm job state (as `squeue -O State` spells it) to its phase.
pub fn phase(state: &str) -> Phase {
    match state {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" => Phase::Queued,
        "COMPLETED" | "FAILED" | "TIMEOUT" | "OUT_OF_MEMORY" | "NODE_FAIL" | "CANCELLED"
        | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" | "SPECIAL_EXIT" | "REVOKED" => Phase::Ended,
        // RUNNING, COMPLETING (ended, processes being cleaned up), SUSPENDED, STOPPED,
        // SIGNALING, STAGE_OUT, RESIZING, and anything newer: not over yet.
        _ => Phase::Running,
    }
}

/// Exit code and signal from Slurm's wait status.
pub fn decode_exit(raw: Option<i32>) -> (Option<i32>, Option<i32>) {
    match raw {
        Some(raw) => {
            let signal = raw & 0x7f;
            if signal == 0 {
                (Some((raw >> 8) & 0xff), None)
            } else {
                (None, Some(signal))
            }
        }
        None => (None, None),
    }
}

/// The payload's end, from the job's final row.
pub fn ended_from(job_id: u64, row: &JobRow) -> Ended {
    let (exit_code, signal) = decode_exit(row.exit_raw);
    let status = if row.state == "COMPLETED" && exit_code == Some(0) {
        PayloadStatus::Completed
    } else {
        PayloadStatus::Failed
    };
    let mut reason = format!("Slurm job {job_id} {}", row.state);
    match (exit_code, signal) {
        (Some(code), _) => reason.push_str(&format!(", exit code {code}")),
        (None, Some(signal)) => reason.push_str(&format!(", signal {signal}")),
        (None, None) => {}
    }
    if !row.reason.is_empty() && row.reason != "None" {
        reason.push_str(&format!(" ({})", row.reason));
    }
    Ended {
        status,
        exit_code,
        signal,
        reason,
    }
}

/// Parses `squeue -h -O JobID:|,State:|,exit_code:|,Reason:|` output.
pub fn parse_squeue(output: &str) -> HashMap<u64, JobRow> {
    let mut rows = HashMap::new();
    for line in output.lines() {
        let mut fields = line.split('|').map(str::trim);
        let (Some(id), Some(state)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else {
            continue;
        };
        let exit_raw = fields.next().and_then(|v| v.parse().ok());
        let reason = fields.next().unwrap_or("").to_owned();
        // "CANCELLED by 0" in some versions: keep the state word.
        let state = state.split_whitespace().next().unwrap_or("").to_owned();
        rows.insert(
            id,
            JobRow {
                state,
                exit_raw,
                reason,
            },
        );
    }
    rows
}

/// Share of usable CPUs allocated, in percent, from `sinfo -h -o %C` lines (A/I/O/T).
pub fn parse_cpu_load(output: &str) -> Option<f64> {
    let (mut allocated, mut idle) = (0u64, 0u64);
    let mut any = false;
    for line in output.lines() {
        let parts: Vec<u64> = line
            .trim()
            .split('/')
            .filter_map(|v| v.parse().ok())
            .collect();
        if parts.len() != 4 {
            continue;
        }
        any = true;
        allocated += parts[0];
        idle += parts[1];
    }
    if !any {
        return None;
    }
    if allocated + idle == 0 {
        // Nothing usable (all CPUs down or drained): full.
        return Some(100.0);
    }
    Some(((allocated as f64 / (allocated + idle) as f64) * 1000.0).round() / 10.0)
}

/// True for `sbatch` errors that say the controller could not be reached or was busy, not
/// that the job itself was refused.
pub fn is_transient(stderr: &str) -> bool {
    const PASSING: [&str; 7] = [
        "Unable to contact slurm controller",
        "Socket timed out",
        "Connection refused",
        "Zero Bytes were transmitted",
        "temporarily unable",
        "Transport endpoint is not connected",
        "Slurm backup controller in standby mode",
    ];
    let lower = stderr.to_lowercase();
    PASSING.iter().any(|p| lower.contains(&p.to_lowercase()))
}

/// Runs a Slurm command; its stdout on success, a one-line explanation otherwise.
async fn run(program: &str, args: &[String]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, output).await {
        Err(_) => Err(format!(
            "{program} did not answer within {COMMAND_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("could not run {program}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Checks that Slurm's commands are there (at client start).
pub async fn check_commands() -> Result<(), String> {
    for program in ["sbatch", "squeue", "scancel", "sinfo"] {
        run(program, &["--version".to_owned()])
            .await
            .map_err(|e| format!("--executor slurm needs {program} on PATH ({e})"))?;
    }
    Ok(())
}

pub struct SlurmExecutor {
    config: SlurmConfig,
    /// Followed jobs: Slurm job id to what the watcher last saw of it.
    jobs: Mutex<HashMap<u64, watch::Sender<Seen>>>,
    /// Wakes the watcher when the first job is followed.
    followed: Notify,
    submissions: Semaphore,
}

/// A payload's Slurm job, followed until it ends.
pub struct SlurmJob {
    executor: Arc<SlurmExecutor>,
    job_id: u64,
    seen: watch::Receiver<Seen>,
    reported_running: bool,
}

impl SlurmExecutor {
    /// Creates the executor and starts its watcher.
    pub fn start(config: SlurmConfig) -> Arc<Self> {
        let executor = Arc::new(SlurmExecutor {
            config,
            jobs: Mutex::new(HashMap::new()),
            followed: Notify::new(),
            submissions: Semaphore::new(PARALLEL_SUBMISSIONS),
        });
        let watcher = executor.clone();
        tokio::spawn(async move {
            // Every payload on Slurm waits on this loop: a panic in it must not stop it.
            loop {
                let _ = AssertUnwindSafe(watcher.clone().watch_loop())
                    .catch_unwind()
                    .await;
                tracing::error!("the Slurm watcher panicked; restarting it");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        executor
    }

    /// Submits the payload in `dir` as a batch job. When `retrying`, first looks for a job
    /// an earlier, seemingly failed attempt submitted after all.
    pub async fn submit(
        self: &Arc<Self>,
        dir: &Path,
        marker: &str,
        job_name: &str,
        retrying: bool,
        allotment: &Allotment,
    ) -> Result<SlurmJob, StartError> {
        let _turn = self.submissions.acquire().await.expect("never closed");
        if retrying {
            let named = [(0, job_name.to_owned())];
            if let Some(job_id) = self.find_by_names(&named).await.get(&0) {
                tracing::warn!(
                    job_name,
                    slurm_job_id = job_id,
                    "an earlier submission went through after all"
                );
                return Ok(self.follow(*job_id, false));
            }
        }
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={job_name}"),
            format!("--chdir={}", dir.display()),
            // Relative to --chdir: the same files the local executor writes.
            format!("--output={STDOUT_FILE}"),
            format!("--error={STDERR_FILE}"),
        ];
        if let Some(partition) = &self.config.partition {
            args.push(format!("--partition={partition}"));
        }
        if let Some(account) = &self.config.account {
            args.push(format!("--account={account}"));
        }
        args.extend(slurm_resource_args(allotment));
        args.extend(self.config.extra_args.iter().cloned());
        let transient = |reason: String| StartError {
            reason,
            transient: true,
        };
        let mut child = Command::new("sbatch")
            .args(&args)
            .env(MARKER_VAR, marker)
            // sbatch exports the submitting environment: the job sees what it was given.
            .envs(allotment.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StartError {
                reason: format!("could not run sbatch: {e}"),
                transient: false,
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let submitted = async {
            stdin.write_all(BATCH_SCRIPT.as_bytes()).await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let output = match tokio::time::timeout(COMMAND_TIMEOUT, submitted).await {
            Err(_) => {
                return Err(transient(format!(
                    "sbatch did not answer within {COMMAND_TIMEOUT:?}"
                )))
            }
            Ok(Err(e)) => return Err(transient(format!("could not run sbatch: {e}"))),
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        // --parsable: "<job id>" or "<job id>;<cluster>" (on the last line, should a site's
        // wrapper print anything before it).
        let job_id = stdout
            .trim()
            .lines()
            .last()
            .and_then(|line| line.split(';').next())
            .and_then(|id| id.trim().parse::<u64>().ok());
        match job_id {
            Some(job_id) if output.status.success() => {
                tracing::info!(job_name, slurm_job_id = job_id, "submitted to Slurm");
                Ok(self.follow(job_id, false))
            }
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                Err(StartError {
                    transient: is_transient(&stderr),
                    reason: format!("sbatch refused the payload ({}): {stderr}", output.status),
                })
            }
        }
    }

    /// Follows a job from now on (a new one, or one a previous client process submitted).
    pub fn follow(self: &Arc<Self>, job_id: u64, running: bool) -> SlurmJob {
        let seen = {
            let mut jobs = self.jobs.lock().unwrap();
            jobs.entry(job_id)
                .or_insert_with(|| watch::channel(Seen::NotYet).0)
                .subscribe()
        };
        self.followed.notify_one();
        SlurmJob {
            executor: self.clone(),
            job_id,
            seen,
            reported_running: running,
        }
    }

    fn unfollow(&self, job_id: u64) {
        self.jobs.lock().unwrap().remove(&job_id);
    }

    /// `scancel` without waiting for it (a panic while supervising a job).
    pub fn cancel_in_background(&self, job_id: u64) {
        tokio::spawn(async move {
            if let Err(e) = run("scancel", &[job_id.to_string()]).await {
                tracing::error!(slurm_job_id = job_id, error = %e, "scancel failed");
            }
        });
    }

    /// One `squeue` call per interval for every followed job; none while there is none.
    async fn watch_loop(self: Arc<Self>) {
        let mut misses: HashMap<u64, u32> = HashMap::new();
        let mut last_error: Option<String> = None;
        loop {
            let notified = self.followed.notified();
            let ids: Vec<u64> = self.jobs.lock().unwrap().keys().copied().collect();
            if ids.is_empty() {
                misses.clear();
                notified.await;
                continue;
            }
            let mut vanished = Vec::new();
            match squeue(&ids).await {
                Ok(rows) => {
                    if last_error.take().is_some() {
                        tracing::info!("squeue answers again");
                    }
                    let jobs = self.jobs.lock().unwrap();
                    for id in &ids {
                        let Some(sender) = jobs.get(id) else { continue };
                        match rows.get(id) {
                            Some(row) => {
                                misses.remove(id);
                                let seen = Seen::Row(row.clone());
                                sender.send_if_modified(|current| {
                                    let changed = *current != seen;
                                    *current = seen;
                                    changed
                                });
                            }
                            None => {
                                let n = misses.entry(*id).or_insert(0);
                                *n += 1;
                                if *n == MISSES_BEFORE_VANISHED {
                                    vanished.push(*id);
                                }
                            }
                        }
                    }
                    misses.retain(|id, _| jobs.contains_key(id));
                }
                Err(e) => {
                    // Logged once per outage; the jobs keep their last known state.
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(error = %e, "squeue failed; retrying");
                        last_error = Some(e);
                    }
                }
            }
            if !vanished.is_empty() {
                self.settle_vanished(&vanished).await;
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    /// Jobs the controller no longer lists (purged after its MinJobAge, e.g. while the client
    /// was down): their end from the accounting database (`sacct`, one call) where there is
    /// one, otherwise they count as vanished with an unknown outcome.
    async fn settle_vanished(&self, ids: &[u64]) {
        let accounted = match sacct(ids).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, jobs = ?ids, "Slurm forgot these jobs and sacct cannot tell their end");
                HashMap::new()
            }
        };
        let jobs = self.jobs.lock().unwrap();
        for id in ids {
            let Some(sender) = jobs.get(id) else { continue };
            let seen = match accounted.get(id) {
                Some(row) if phase(&row.state) == Phase::Ended => Seen::Row(row.clone()),
                _ => Seen::Vanished,
            };
            sender.send_replace(seen);
        }
    }

    /// Slurm jobs (in any state the controller remembers) carrying the given job names, by
    /// one `squeue --name` call. Errors are logged and answer nothing found.
    pub async fn find_by_names(&self, named: &[(u64, String)]) -> HashMap<u64, u64> {
        if named.is_empty() {
            return HashMap::new();
        }
        let mut output = String::new();
        for chunk in named.chunks(LIST_CHUNK) {
            let names = chunk
                .iter()
                .map(|(_, name)| name.as_str())
                .collect::<Vec<_>>()
                .join(",");
            let args =
                ["-h", "-t", "all", "--name", &names, "-O", "JobID:|,Name:|"].map(String::from);
            match run("squeue", &args).await {
                Ok(out) => output.push_str(&out),
                Err(e) => {
                    tracing::warn!(error = %e, "could not look for jobs submitted before the restart");
                    return HashMap::new();
                }
            }
        }
        let by_name: HashMap<&str, u64> = named.iter().map(|(id, n)| (n.as_str(), *id)).collect();
        let mut found = HashMap::new();
        for line in output.lines() {
            let mut fields = line.split('|').map(str::trim);
            let (Some(Ok(job_id)), Some(name)) =
                (fields.next().map(str::parse::<u64>), fields.next())
            else {
                continue;
            };
            if let Some(payload) = by_name.get(name) {
                // Several (should not happen): follow the newest.
                let newest = found.entry(*payload).or_insert(job_id);
                *newest = (*newest).max(job_id);
            }
        }
        found
    }

    /// Samples `sinfo` in the background for `GET /load`.
    pub fn start_load_sampler(&self, gauge: LoadGauge) {
        let mut args = vec!["-h".to_owned(), "-o".to_owned(), "%C".to_owned()];
        if let Some(partition) = &self.config.partition {
            args.push(format!("--partition={partition}"));
        }
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(LOAD_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match run("sinfo", &args).await.map(|out| parse_cpu_load(&out)) {
                    Ok(Some(percent)) => gauge.set(percent),
                    Ok(None) => tracing::warn!("sinfo reported no CPUs"),
                    Err(e) => tracing::warn!(error = %e, "sinfo failed"),
                }
            }
        });
    }
}

/// One `squeue` call for all `ids` (in every state Slurm still remembers).
async fn squeue(ids: &[u64]) -> Result<HashMap<u64, JobRow>, String> {
    let mut rows = HashMap::new();
    // One call in practice; chunks keep each argument far below the kernel's limit.
    for chunk in ids.chunks(LIST_CHUNK) {
        let list = chunk
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let args = [
            "-h",
            "-t",
            "all",
            "-j",
            &list,
            "-O",
            "JobID:|,State:|,exit_code:|,Reason:|",
        ]
        .map(String::from);
        match run("squeue", &args).await {
            Ok(out) => rows.extend(parse_squeue(&out)),
            // Asked only for jobs the controller has forgotten.
            Err(e) if e.contains("Invalid job id specified") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(rows)
}

/// One `sacct` call (accounting database) for jobs `squeue` no longer lists.
async fn sacct(ids: &[u64]) -> Result<HashMap<u64, JobRow>, String> {
    let mut rows = HashMap::new();
    for chunk in ids.chunks(LIST_CHUNK) {
        let list = chunk
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let args = ["-n", "-P", "-X", "-j", &list, "-o", "JobID,State,ExitCode"].map(String::from);
        rows.extend(parse_sacct(&run("sacct", &args).await?));
    }
    Ok(rows)
}

/// Parses `sacct -n -P -X -o JobID,State,ExitCode` output (exit code as `code:signal`).
pub fn parse_sacct(output: &str) -> HashMap<u64, JobRow> {
    let mut rows = HashMap::new();
    for line in output.lines() {
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        let [id, state, exit] = fields[..] else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else { continue };
        let exit_raw = exit.split_once(':').and_then(|(code, signal)| {
            Some((code.parse::<i32>().ok()? << 8) | signal.parse::<i32>().ok()?)
        });
        rows.insert(
            id,
            JobRow {
                // "CANCELLED by 1000": the state word.
                state: state.split_whitespace().next().unwrap_or("").to_owned(),
                exit_raw,
                reason: "from sacct".to_owned(),
            },
        );
    }
    rows
}

impl SlurmJob {
    pub fn job_id(&self) -> u64 {
        self.job_id
    }

    pub fn stopper(&self) -> Stopper {
        Stopper::Slurm(self.executor.clone(), self.job_id)
    }

    fn current(&mut self) -> Seen {
        self.seen.borrow_and_update().clone()
    }

    fn vanished(&self) -> Ended {
        Ended::failed(format!(
            "Slurm job {} is no longer known to the Slurm controller; its outcome is unknown",
            self.job_id
        ))
    }

    pub async fn next(&mut self) -> Progress {
        loop {
            match self.current() {
                Seen::NotYet => {}
                Seen::Vanished => return Progress::Ended(self.vanished()),
                Seen::Row(row) => match phase(&row.state) {
                    Phase::Queued => {}
                    Phase::Running if self.reported_running => {}
                    Phase::Running => {
                        self.reported_running = true;
                        return Progress::Running { pid: 0 };
                    }
                    // A job that ran and ended between two polls still reports Running
                    // first, so the change feed shows it ran.
                    Phase::Ended if !self.reported_running && row.state != "CANCELLED" => {
                        self.reported_running = true;
                        return Progress::Running { pid: 0 };
                    }
                    Phase::Ended => return Progress::Ended(ended_from(self.job_id, &row)),
                },
            }
            if self.seen.changed().await.is_err() {
                return Progress::Ended(Ended::failed("the Slurm watcher stopped"));
            }
        }
    }

    /// Waits up to `limit` for the job to end.
    async fn ended_within(&mut self, limit: Duration) -> Option<Ended> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.current() {
                Seen::Vanished => return Some(self.vanished()),
                Seen::Row(row) if phase(&row.state) == Phase::Ended => {
                    return Some(ended_from(self.job_id, &row))
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, self.seen.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// `scancel --signal=TERM --full`, then `scancel` after `grace` if the job still runs
    /// (a pending job is cancelled at once). Returns once Slurm reports the job ended.
    pub async fn terminate(&mut self, grace: Duration) -> Ended {
        let id = self.job_id.to_string();
        let running =
            matches!(self.current(), Seen::Row(row) if phase(&row.state) == Phase::Running);
        if running {
            let term = ["--signal=TERM".to_owned(), "--full".to_owned(), id.clone()];
            if let Err(e) = run("scancel", &term).await {
                tracing::warn!(slurm_job_id = self.job_id, error = %e, "scancel --signal=TERM failed");
            }
            if let Some(ended) = self.ended_within(grace).await {
                return ended;
            }
        }
        if let Err(e) = run("scancel", std::slice::from_ref(&id)).await {
            tracing::warn!(slurm_job_id = self.job_id, error = %e, "scancel failed");
        }
        match self.ended_within(CANCEL_CONFIRM).await {
            Some(ended) => ended,
            None => Ended::failed(format!(
                "scancel {id} sent; Slurm did not report the job's end within {CANCEL_CONFIRM:?}"
            )),
        }
    }
}

impl Drop for SlurmJob {
    fn drop(&mut self) {
        self.executor.unfollow(self.job_id);
    }
}

/// The payload's request as Slurm options: `--cpus-per-task`, `--mem` (MiB) and
/// `--gres=gpu:N`; a payload that asked for nothing gets none (the cluster's defaults).
/// Slurm assigns the GPUs itself, so `CUDA_VISIBLE_DEVICES` is Slurm's inside the job.
fn slurm_resource_args(allotment: &Allotment) -> Vec<String> {
    let mut args = Vec::new();
    if allotment.cores > 1 {
        args.push(format!("--cpus-per-task={}", allotment.cores));
    }
    if let Some(mb) = allotment.memory_mb {
        args.push(format!("--mem={mb}M"));
    }
    if !allotment.gpu_ids.is_empty() {
        args.push(format!("--gres=gpu:{}", allotment.gpu_ids.len()));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_slurm_options_and_nothing_asked_adds_none() {
        let nothing = Allotment {
            cores: 1,
            memory_mb: None,
            gpu_ids: Vec::new(),
        };
        assert!(slurm_resource_args(&nothing).is_empty());
        let docking = Allotment {
            cores: 8,
            memory_mb: Some(4096),
            gpu_ids: vec![0],
        };
        assert_eq!(
            slurm_resource_args(&docking),
            ["--cpus-per-task=8", "--mem=4096M", "--gres=gpu:1"]
        );
    }

    #[test]
    fn squeue_lines_become_rows() {
        let rows = parse_squeue("12|RUNNING|0|None|\n13|FAILED|768|NonZeroExitCode|\n\nx|y|\n");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[&12].state, "RUNNING");
        let ended = ended_from(13, &rows[&13]);
        assert_eq!(ended.status, PayloadStatus::Failed);
        assert_eq!(ended.exit_code, Some(3));
        assert!(ended.reason.contains("FAILED") && ended.reason.contains("exit code 3"));
    }

    #[test]
    fn states_map_to_phases_and_outcomes() {
        assert_eq!(phase("PENDING"), Phase::Queued);
        assert_eq!(phase("RUNNING"), Phase::Running);
        assert_eq!(phase("COMPLETING"), Phase::Running);
        for state in [
            "COMPLETED",
            "FAILED",
            "TIMEOUT",
            "OUT_OF_MEMORY",
            "NODE_FAIL",
            "CANCELLED",
        ] {
            assert_eq!(phase(state), Phase::Ended, "{state}");
        }
        let row = |state: &str, raw| JobRow {
            state: state.into(),
            exit_raw: Some(raw),
            reason: "None".into(),
        };
        assert_eq!(
            ended_from(1, &row("COMPLETED", 0)).status,
            PayloadStatus::Completed
        );
        let timeout = ended_from(1, &row("TIMEOUT", 15));
        assert_eq!(timeout.status, PayloadStatus::Failed);
        assert_eq!(timeout.signal, Some(15));
        assert!(timeout.reason.contains("TIMEOUT"));
        assert_eq!(decode_exit(Some(0)), (Some(0), None));
    }

    #[test]
    fn sacct_lines_become_rows() {
        let rows = parse_sacct("41|TIMEOUT|0:15\n42|CANCELLED by 0|0:0\n43|FAILED|2:0\nbad\n");
        assert_eq!(rows.len(), 3);
        assert_eq!(ended_from(41, &rows[&41]).signal, Some(15));
        assert_eq!(rows[&42].state, "CANCELLED");
        assert_eq!(ended_from(43, &rows[&43]).exit_code, Some(2));
    }

    #[test]
    fn load_is_the_allocated_share_of_usable_cpus() {
        assert_eq!(parse_cpu_load("2/6/0/8\n"), Some(25.0));
        assert_eq!(parse_cpu_load("2/6/0/8\n4/4/8/16\n"), Some(37.5));
        assert_eq!(parse_cpu_load("0/0/8/8\n"), Some(100.0));
        assert_eq!(parse_cpu_load(""), None);
    }
}
