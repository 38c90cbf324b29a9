//! The local executor: `bash run.sh` under its supervisor (`supervisor`), in a process group
//! of its own on this machine and, where the machine has cgroup v2, in a cgroup of its own
//! (`cgroup`), with its memory request as a cgroup limit where the machine allows (`memcg`).
//! Whatever a payload leaves running when `run.sh` exits, in its group or not, is
//! killed (`process::Tracker`). The supervisor records how `run.sh` ended in `runs/` (`exits`), so a
//! client restarted after `kill -9` settles a payload that finished meanwhile from what
//! happened, and follows one that still runs ([`LocalExecutor::reattach`]).
//!
//! Where payloads have cgroup leaves, their supervisors are forked by the client's fork
//! server (`spawner`, `forkserver`), started at the first payload; without cgroups (and if
//! no fork server can be had) each supervisor is an exec of this binary, since a forked
//! supervisor does not carry the payload's environment marker a restarted client would look
//! for.

use crate::allot::Allotment;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobrelay_common::protocol::{PayloadRecord, PayloadStatus};
use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Ended, Progress};
use crate::cgroup::CgroupTree;
use crate::confine::Confinement;
use crate::exits::ExitFiles;
use crate::memcg::{Enforcement, PayloadMemory};
use crate::pid_window;
use crate::process::{self, Marked, Tracker};
use crate::spawner::{self, Spawner};
use crate::supervisor::Exit;

/// Starts payloads locally and remembers the live ones, so that a shutdown can kill them all.
pub struct LocalExecutor {
    live: Arc<Mutex<HashMap<u64, (u32, Tracker)>>>,
    confinement: Confinement,
    /// `<data>/runs`: the supervisors' exit files.
    /// Where supervisors record how runs ended (`runs/`).
    exits: Arc<ExitFiles>,
    cgroups: Option<Arc<CgroupTree>>,
    /// How a payload's memory request is enforced.
    memory: Enforcement,
    /// The fork server that starts the supervisors of payloads with a cgroup leaf.
    spawner: Arc<Spawner>,
}

/// What tells a job that its supervisor ended.
enum Waiter {
    /// The supervisor this client process exec'd (no cgroups, or no fork server).
    Child(Box<Child>),
    /// A supervisor the fork server forked: its "ended".
    Spawned(oneshot::Receiver<std::process::ExitStatus>),
    /// What that said.
    Ended(std::process::ExitStatus),
    /// Nothing to wait on: adopted after a restart, or the fork server went away (the run is
    /// then followed by its exit record and its supervisor's presence).
    Nothing,
}

pub struct LocalJob {
    id: u64,
    /// Which run of payload `id` it is (its record's `created_ms`): only an exit record of
    /// this run counts (a wiped client gives ids again; an orphan of the old run may end).
    run: Option<u64>,
    waiter: Waiter,
    /// Adopted after a restart (not started by this client process).
    adopted: bool,
    /// Its process group; 0 when unknown (adopted after a restart).
    pgid: u32,
    reported_running: Option<u32>,
    tracker: Tracker,
    /// Its memory cgroup, if its memory is limited by one.
    memory: Option<PayloadMemory>,
    exits: Arc<ExitFiles>,
    live: Arc<Mutex<HashMap<u64, (u32, Tracker)>>>,
}

/// How often an adopted payload (no child to wait for) is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(10);

impl LocalExecutor {
    /// An executor for the data directory `data_dir` (node `node`) whose payloads run
    /// confined (`--run-as`, limits, `--sandbox`).
    pub fn new(confinement: Confinement, data_dir: &Path, node: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let runs_dir = data_dir.join("runs");
        std::fs::create_dir_all(&runs_dir)?;
        std::fs::set_permissions(&runs_dir, std::fs::Permissions::from_mode(0o700))?;
        let cgroups = match CgroupTree::detect(node) {
            Ok(tree) => {
                tracing::info!(cgroup = %tree.root().display(), "payloads run in cgroups of their own");
                Some(Arc::new(tree))
            }
            Err(why) => {
                tracing::warn!(
                    reason = %why,
                    "no cgroup v2 for payloads: their processes are tracked by an environment \
                     marker, which a process that clears its environment escapes"
                );
                None
            }
        };
        let memory = Enforcement::detect(node, cgroups.as_ref().map(|t| t.root()));
        match &memory {
            Enforcement::CgroupV2 { tree } => {
                tracing::info!(memory_limits = %memory.describe(), cgroup = %tree.display(), "a job's memory is a limit on its cgroup")
            }
            Enforcement::CgroupV1 { root } => {
                tracing::info!(memory_limits = %memory.describe(), cgroup = %root.display(), "a job's memory is a limit on its cgroup")
            }
            Enforcement::Rlimit { .. } => tracing::info!(
                memory_limits = %memory.describe(),
                "a job's memory is the address-space limit (RLIMIT_AS) of each of its processes"
            ),
        }
        if !confinement.sandbox {
            tracing::warn!(
                "payloads run without --sandbox: they share this machine's view, and (even \
                 with --run-as, all as one user) one payload can read and change another's \
                 files and processes; see SECURITY.md"
            );
        }
        Ok(LocalExecutor {
            live: Arc::default(),
            confinement,
            exits: Arc::new(ExitFiles::new(&runs_dir)),
            cgroups,
            memory,
            spawner: Arc::default(),
        })
    }

    /// How a payload's memory request is enforced here.
    pub fn memory_enforcement(&self) -> &Enforcement {
        &self.memory
    }

    pub async fn start(
        &self,
        dir: &Path,
        marker: &str,
        run: Option<u64>,
        allotment: &Allotment,
    ) -> Result<LocalJob, String> {
        let id = id_of(dir)?;
        let exit_file = self.exits.claim(id);
        let leaf = match &self.cgroups {
            Some(tree) => Some(
                tree.create_leaf(&id.to_string())
                    .map_err(|e| format!("could not make the payload's cgroup: {e}"))?,
            ),
            None => None,
        };
        let remove_leaf = || {
            self.exits.release(id);
            if let Some(leaf) = &leaf {
                let _ = std::fs::remove_dir(leaf);
            }
        };
        // The payload's memory as a limit on its memory cgroup, or else as its address-space
        // limit (RLIMIT_AS), unless the client's own --limit-memory is lower: an allocation
        // past it fails. Never both: RLIMIT_AS breaks programs that reserve address space.
        let mut confinement = self.confinement.clone();
        let mut memory = None;
        if let Some(mb) = allotment.memory_mb {
            let bytes = mb.saturating_mul(1 << 20);
            memory = self
                .memory
                .limit(&id.to_string(), leaf.as_deref(), bytes)
                .map_err(|e| {
                    remove_leaf();
                    format!("could not give the payload its memory cgroup: {e}")
                })?;
            if memory.is_none() {
                let limit = &mut confinement.limits.address_space;
                *limit = Some(limit.map_or(bytes, |l| l.min(bytes)));
            }
        }
        let failed = |e: String| {
            metrics::counter!("jobrelay_client_spawn_failures_total").increment(1);
            remove_leaf();
            if let Some(PayloadMemory::V1(dir)) = &memory {
                let _ = std::fs::remove_dir(dir);
            }
            format!("could not start run.sh: {e}")
        };
        let prepared = process::prepare_run(
            dir,
            marker,
            &confinement,
            &allotment.env(),
            (&exit_file, id, run),
            leaf.as_deref(),
            memory.as_ref().and_then(PayloadMemory::to_join),
        )
        .map_err(|e| failed(e.to_string()))?;
        let another_user = confinement
            .run_as
            .as_ref()
            .is_some_and(|r| r.uid != nix::unistd::geteuid().as_raw());
        // Before its supervisor starts: every process that can carry its marker starts
        // after this, so the sweeps at its end read only those (`pid_window`). A payload of
        // another user in a leaf is never swept: nothing to read for it.
        let swept = !(leaf.is_some() && another_user);
        let since = swept.then(pid_window::Since::now).flatten();
        let tracker_of = |supervisor: Option<u32>| {
            let marked = Marked::since(marker, since.zip(supervisor).map(|(s, p)| s.started(p)));
            match &leaf {
                // A payload of another user cannot leave its leaf, and its supervisor (the
                // client's user) joins it before it starts the payload, by either path.
                Some(leaf) if another_user => Tracker::Cgroup(leaf.clone(), None),
                Some(leaf) => Tracker::Cgroup(leaf.clone(), Some(marked)),
                None => Tracker::Marker(marked),
            }
        };
        // With a leaf, the fork server; without (a forked supervisor would not carry the
        // marker a restarted client looks for), or when no fork server can be had, an exec.
        let forked = match &leaf {
            Some(_) => match self.spawner.start(prepared.start_request()).await {
                Ok(started) => Some(started),
                Err(spawner::StartError::Unavailable(why)) => {
                    tracing::warn!(reason = %why, "payload supervisor exec'd instead of forked");
                    None
                }
                Err(spawner::StartError::Failed(e)) => return Err(failed(e)),
                Err(spawner::StartError::Lost) => {
                    // A supervisor may have been forked before the fork server went: nothing
                    // of this payload may run on (its pid unknown, every process is looked at).
                    tracker_of(None).kill_all().await;
                    return Err(failed(
                        "the payload fork server went away before it answered".into(),
                    ));
                }
            },
            None => None,
        };
        let (waiter, pgid) = match forked {
            Some(started) => (Waiter::Spawned(started.ended), started.pid),
            None => {
                let child = prepared
                    .exec_supervisor()
                    .map_err(|e| failed(e.to_string()))?;
                let pgid = child.id().unwrap_or(0);
                (Waiter::Child(Box::new(child)), pgid)
            }
        };
        let tracker = tracker_of(Some(pgid).filter(|pid| *pid != 0));
        self.live
            .lock()
            .unwrap()
            .insert(id, (pgid, tracker.clone()));
        Ok(LocalJob {
            id,
            run,
            waiter,
            adopted: false,
            pgid,
            reported_running: None,
            tracker,
            memory,
            exits: self.exits.clone(),
            live: self.live.clone(),
        })
    }

    /// After a restart: follows a payload the previous client process started, if its run
    /// ended meanwhile (its exit file is there) or any of its processes still runs. `None`:
    /// nothing of it is left and nothing was recorded (it is settled as interrupted).
    pub fn reattach(&self, record: &PayloadRecord, marker: &str) -> Option<LocalJob> {
        let id = record.id;
        let leaf = self.cgroups.as_ref().map(|t| t.leaf(&id.to_string()));
        let memory = self.memory.of_payload(&id.to_string(), leaf.as_deref());
        let tracker = match leaf {
            // Its supervisor may not have joined the leaf before the last client died.
            Some(leaf) if leaf.exists() => Tracker::Cgroup(leaf, Some(Marked::anywhere(marker))),
            _ => Tracker::Marker(Marked::anywhere(marker)),
        };
        if self.exits.read(id, record.created_ms).is_none() && !tracker.supervisor_alive() {
            // Nothing to follow; the caller kills what is left (`kill_leftovers_of`).
            return None;
        }
        self.exits.adopt(id);
        self.live.lock().unwrap().insert(id, (0, tracker.clone()));
        Some(LocalJob {
            id,
            run: record.created_ms,
            waiter: Waiter::Nothing,
            adopted: true,
            pgid: 0,
            // A Running record gets no second Running.
            reported_running: (record.status == PayloadStatus::Running).then_some(record.pid),
            tracker,
            memory,
            exits: self.exits.clone(),
            live: self.live.clone(),
        })
    }

    /// After a restart, for a payload that [`LocalExecutor::reattach`] could not follow:
    /// kills whatever of it is left, in its cgroup or carrying its marker.
    pub async fn kill_leftovers_of(&self, id: u64, marker: &str) -> usize {
        let left = process::marked(marker).len();
        // The cgroup tracker sweeps the marker too.
        let leaf = self.cgroups.as_ref().map(|tree| tree.leaf(&id.to_string()));
        let memory = self.memory.of_payload(&id.to_string(), leaf.as_deref());
        let tracker = match leaf {
            Some(leaf) => process::Tracker::Cgroup(leaf, Some(Marked::anywhere(marker))),
            None => process::Tracker::Marker(Marked::anywhere(marker)),
        };
        tracker.kill_all().await;
        if let Some(memory) = memory {
            memory.remove(LEFTOVER_LIMIT).await;
        }
        left
    }

    /// The payload's record is final: its exit file is no longer needed. (Given up only now,
    /// so a client killed before the record was written still finds it after a restart.)
    pub fn settled(&self, id: u64) {
        self.exits.release(id);
    }

    /// Payload ids with a recorded end (after a restart: some may belong to payloads whose
    /// final record was written just before the previous client process died).
    pub fn exit_files(&self) -> Vec<u64> {
        self.exits.recorded()
    }

    /// SIGKILL to every live payload (client shutdown).
    pub fn kill_all_now(&self) {
        for (pgid, tracker) in self.live.lock().unwrap().values() {
            process::kill_leftovers(*pgid);
            tracker.kill_now();
        }
    }

    /// Removes the client's cgroup sub-trees if they are empty (clean shutdown).
    pub fn release(&self) {
        if let Some(tree) = &self.cgroups {
            tree.remove_if_empty();
        }
        self.memory.release();
    }
}

/// The payload id of a work directory `work/<id>`.
fn id_of(dir: &Path) -> Result<u64, String> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("work directory {} is not named by an id", dir.display()))
}

impl LocalJob {
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    pub fn tracker(&self) -> Tracker {
        self.tracker.clone()
    }

    /// Waits for the supervisor's end where this process can: `None` when there is nothing
    /// to wait on (adopted, or the fork server went away).
    async fn wait_status(&mut self) -> Option<std::io::Result<std::process::ExitStatus>> {
        loop {
            let next = match &mut self.waiter {
                Waiter::Child(child) => return Some(child.wait().await),
                Waiter::Ended(status) => return Some(Ok(*status)),
                Waiter::Nothing => return None,
                Waiter::Spawned(ended) => match ended.await {
                    Ok(status) => Waiter::Ended(status),
                    Err(_) => Waiter::Nothing,
                },
            };
            self.waiter = next;
        }
    }

    pub async fn next(&mut self) -> Progress {
        if self.reported_running.is_none() {
            self.reported_running = Some(self.pgid);
            return Progress::Running { pid: self.pgid };
        }
        let status = self.wait_status().await;
        if status.is_none() {
            // No child to wait for: its supervisor's exit file, or nobody left.
            while self.exits.read(self.id, self.run).is_none() && self.tracker.supervisor_alive() {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
        }
        let mut ended = match (self.exits.read(self.id, self.run), status) {
            (Some(exit), _) => finish(exit),
            (None, Some(status)) => finish_exited(status),
            // Its supervisor died with it and recorded nothing: an interruption.
            (None, None) if self.adopted => Ended::failed("client restarted"),
            (None, None) => Ended::failed(
                "run.sh's supervisor ended without recording how run.sh ended (its fork \
                 server had gone)",
            ),
        };
        // Asked before the leftovers go: the v2 leaf, and its counters, go with them.
        let verdict = self
            .memory
            .as_ref()
            .filter(|_| ended.status == PayloadStatus::Failed)
            .and_then(|memory| memory.verdict(ended_by_sigkill(&ended)));
        process::kill_leftovers(self.pgid);
        self.tracker.kill_all().await;
        if let Some(memory) = &self.memory {
            memory.remove(LEFTOVER_LIMIT).await;
        }
        if let Some(verdict) = verdict {
            ended.reason = format!("{verdict}; {}", ended.reason);
        }
        Progress::Ended(ended)
    }

    pub async fn terminate(&mut self, grace: Duration) -> Ended {
        process::signal_group(self.pgid, Signal::SIGTERM);
        self.tracker.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        let mut status = tokio::time::timeout_at(deadline, self.wait_status())
            .await
            .ok()
            .flatten();
        while (process::group_alive(self.pgid) || self.tracker.alive()) && Instant::now() < deadline
        {
            tokio::time::sleep(POLL).await;
        }
        process::kill_leftovers(self.pgid);
        self.tracker.kill_all().await;
        if let Some(memory) = &self.memory {
            memory.remove(LEFTOVER_LIMIT).await;
        }
        if status.is_none() {
            status = self.wait_status().await;
        }
        let (exit_code, signal) = match (self.exits.read(self.id, self.run), status) {
            (Some(exit), _) => exit.parts(),
            (None, Some(status)) => status.map(process::describe).unwrap_or((None, None)),
            (None, None) => (None, Some(Signal::SIGKILL as i32)),
        };
        Ended {
            status: PayloadStatus::Failed,
            exit_code,
            signal,
            reason: "stopped".into(),
        }
    }
}

impl Drop for LocalJob {
    fn drop(&mut self) {
        self.live.lock().unwrap().remove(&self.id);
    }
}

/// Longest the memory cgroup of an ended payload is emptied before it is left in place.
const LEFTOVER_LIMIT: Duration = Duration::from_secs(5);

/// Whether the run ended by SIGKILL, its own or its script's child's (bash: code 137).
fn ended_by_sigkill(ended: &Ended) -> bool {
    ended.signal == Some(Signal::SIGKILL as i32) || ended.exit_code == Some(128 + 9)
}

fn finish(exit: Exit) -> Ended {
    match exit {
        Exit::Code(0) => Ended {
            status: PayloadStatus::Completed,
            exit_code: Some(0),
            signal: None,
            reason: "run.sh exited with code 0".into(),
        },
        Exit::Code(code) => Ended {
            status: PayloadStatus::Failed,
            exit_code: Some(code),
            signal: None,
            reason: format!("run.sh exited with code {code}"),
        },
        Exit::Signal(signal) => Ended {
            status: PayloadStatus::Failed,
            exit_code: None,
            signal: Some(signal),
            reason: format!("run.sh was killed by signal {signal}"),
        },
    }
}

fn finish_exited(exit: std::io::Result<std::process::ExitStatus>) -> Ended {
    match exit.map(process::describe) {
        Ok((Some(code), _)) => finish(Exit::Code(code)),
        Ok((None, Some(signal))) => finish(Exit::Signal(signal)),
        Ok((None, None)) => Ended::failed("run.sh ended in an unknown way"),
        Err(e) => Ended::failed(format!("could not wait for run.sh: {e}")),
    }
}
