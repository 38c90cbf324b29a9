//! Process control for payloads: starting `run.sh` (under its supervisor) in its own group,
//! stopping the whole group (SIGTERM, then SIGKILL after a grace period), and [`Tracker`],
//! which reaches every process of a payload, also those that left the group.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use jobrelay_common::protocol::{STDERR_FILE, STDOUT_FILE};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::cgroup;
use crate::confine::{self, Confinement};
use crate::forkserver::Start;
use crate::pid_window::{self, Candidates};
use crate::supervisor::{self, Spec};
use tokio::time::Instant;

/// Environment variable that marks every process of a payload, so that a restarted client can
/// find the ones it left behind. Value: `<node>:<payload id>`.
pub const MARKER_VAR: &str = "JOBRELAY_PAYLOAD";
const POLL: Duration = Duration::from_millis(10);

pub fn marker(node: &str, id: u64) -> String {
    format!("{node}:{id}")
}

/// Creates (or empties) a log file of the payload without following a link in its place. No
/// process of the job exists yet, so only uploaded regular files can be there; this keeps it
/// so should an upload ever bring something else.
fn create_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// What starts one payload's supervisor, by either path: its logs made (empty), its work
/// directory given to its user, its spec and environment.
pub struct Prepared {
    dir: PathBuf,
    stdout: std::fs::File,
    stderr: std::fs::File,
    spec: Spec,
    /// The supervisor's environment on top of the client's: `confine::launch`'s, the
    /// allotment's, the marker.
    env: Vec<(String, String)>,
}

/// Prepares the supervisor (`supervisor`) of `bash run.sh` in `dir`: stdin from /dev/null and
/// stdout/stderr going to files in `dir`, confined as `confinement` says; it records the
/// run's end in `exit` (a file, the payload and the run the record names) and runs in `cgroup` and `memory_cgroup` (a v1 one, `memcg`) if
/// given.
pub fn prepare_run(
    dir: &Path,
    marker: &str,
    confinement: &Confinement,
    extra_env: &[(String, String)],
    exit: (&Path, u64, Option<u64>),
    cgroup: Option<&Path>,
    memory_cgroup: Option<&Path>,
) -> std::io::Result<Prepared> {
    let stdout = create_log(&dir.join(STDOUT_FILE))?;
    let stderr = create_log(&dir.join(STDERR_FILE))?;
    let launch = confine::launch(dir, confinement)?;
    let mut env = launch.env;
    env.extend(extra_env.iter().cloned());
    env.push((MARKER_VAR.to_owned(), marker.to_owned()));
    let spec = Spec {
        exit_file: exit.0.to_path_buf(),
        payload: Some(exit.1),
        run: exit.2,
        cgroup: cgroup.map(Path::to_path_buf),
        memory_cgroup: memory_cgroup.map(Path::to_path_buf),
        run_as: launch.run_as,
        limits: launch.limits,
        argv: launch.argv,
        env: Vec::new(),
    };
    Ok(Prepared {
        dir: dir.to_path_buf(),
        stdout,
        stderr,
        spec,
        env,
    })
}

impl Prepared {
    /// The fork server's request for it (`forkserver`): the supervisor it forks has the fork
    /// server's environment, so the payload's additions travel in the spec; the logs, made
    /// here, are opened there.
    pub fn start_request(&self) -> Start {
        Start {
            req: 0,
            dir: self.dir.clone(),
            stdout: self.dir.join(STDOUT_FILE),
            stderr: self.dir.join(STDERR_FILE),
            spec: Spec {
                env: self.env.clone(),
                ..self.spec.clone()
            },
        }
    }

    /// Starts the supervisor by exec'ing this binary with the spec as its argument, in a new
    /// process group (where payloads have no cgroup leaf, or the fork server is unavailable).
    pub fn exec_supervisor(self) -> std::io::Result<Child> {
        let spec = serde_json::to_string(&self.spec).map_err(std::io::Error::other)?;
        // /proc/self/exe: this very binary, even if a newer one replaced it on disk.
        // No `pre_exec`, uid or gid here: std then starts it with posix_spawn (vfork), which
        // neither copies this multi-threaded client's page tables nor makes it fault on each
        // page it writes afterwards (copy-on-write), as a fork did: about 480 page faults per
        // payload in the client (BENCHMARKS.md). The supervisor joins the payload's cgroup as
        // its first step, before it starts anything; until then a restarted client finds it
        // by its environment marker (`Tracker::supervisor_alive`).
        let mut command = tokio::process::Command::new("/proc/self/exe");
        command
            .arg(supervisor::ARG)
            .arg(spec)
            .envs(self.env)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(self.stdout)
            .stderr(self.stderr)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
    }
}

/// Every process of one payload, however it detached itself from the process group: its
/// cgroup where the machine has cgroup v2, else the processes carrying its environment
/// marker (which a process can shed by exec'ing with a clean environment; see SECURITY.md).
#[derive(Debug, Clone)]
pub enum Tracker {
    /// The payload's cgroup leaf, and its marker when the leaf alone does not hold all of it:
    /// a process running as the client's own user can move itself out of the leaf, so the
    /// marker is swept too at every end. A payload of another user (`--run-as`) cannot (the
    /// cgroup tree is the client's), so its leaf is the whole story and no sweep reads any
    /// process's environment at its end.
    Cgroup(PathBuf, Option<Marked>),
    Marker(Marked),
}

/// A payload's marker, and when known, the moment its processes started from: a sweep then
/// reads only the processes started since ([`pid_window`]).
#[derive(Debug, Clone)]
pub struct Marked {
    marker: String,
    since: Option<pid_window::Since>,
}

impl Marked {
    /// Found by reading every process's environment (a payload the client did not start in
    /// this run of its own).
    pub fn anywhere(marker: &str) -> Marked {
        Marked {
            marker: marker.to_owned(),
            since: None,
        }
    }

    /// Started after `since` (taken before its supervisor started, with its pid).
    pub fn since(marker: &str, since: Option<pid_window::Since>) -> Marked {
        Marked {
            marker: marker.to_owned(),
            since,
        }
    }

    /// The live processes carrying the marker.
    pub fn pids(&self) -> Vec<i32> {
        let candidates = self
            .since
            .map_or(Candidates::Any, |since| since.candidates_now());
        marked_among(&self.marker, candidates)
    }

    /// SIGKILL to each; how many were signalled.
    pub fn kill(&self) -> usize {
        kill_pids(self.pids())
    }
}

impl Tracker {
    /// Whether any process of the payload is left.
    pub fn alive(&self) -> bool {
        match self {
            Tracker::Cgroup(leaf, _) => cgroup::populated(leaf),
            Tracker::Marker(marked) => !marked.pids().is_empty(),
        }
    }

    /// Whether the payload's supervisor still runs (it alone decides whether there is a run
    /// to follow: processes left without it are leftovers).
    pub fn supervisor_alive(&self) -> bool {
        let pids = match self {
            // Its own first step joins the leaf: until then it carries only the marker.
            Tracker::Cgroup(leaf, marked) => {
                let mut pids = cgroup::pids(leaf);
                if let Some(marked) = marked.as_ref().filter(|_| pids.is_empty()) {
                    pids = marked.pids();
                }
                pids
            }
            Tracker::Marker(marked) => marked.pids(),
        };
        // This very binary with the supervisor's argument: a script named like the argument
        // (`bash __jobrelay-payload-supervisor &`) is not taken for it.
        // (" (deleted)" aside: a supervisor started by the binary an upgrade replaced.)
        let exe = |pid: &str| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| {
                    p.to_string_lossy()
                        .trim_end_matches(" (deleted)")
                        .to_owned()
                })
        };
        // And run by the client's own user: a `--run-as` payload can exec this binary with
        // the argument too, but only as its own user, so it cannot pose as a supervisor and
        // keep a restarted client following a run that has ended.
        let ours = exe("self");
        pids.into_iter().any(|pid| {
            ours.is_some()
                && runs_as_us(pid)
                && exe(&pid.to_string()) == ours
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(supervisor::ARG.as_bytes()))
        })
    }

    /// Sends `signal` to every process of the payload.
    pub fn signal(&self, signal: Signal) {
        let pids = match self {
            Tracker::Cgroup(leaf, _) if signal == Signal::SIGKILL => return cgroup::kill(leaf),
            Tracker::Cgroup(leaf, _) => cgroup::pids(leaf),
            Tracker::Marker(marked) => marked.pids(),
        };
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGKILL to every process of the payload until none is left (bounded), and removes its
    /// cgroup. Called at every end of a payload: its own, a kill, a restart.
    pub async fn kill_all(&self) {
        match self {
            Tracker::Cgroup(leaf, marked) => {
                cgroup::kill_and_remove(leaf, LEFTOVER_LIMIT).await;
                if let Some(marked) = marked {
                    kill_all_marked(marked).await;
                }
            }
            Tracker::Marker(marked) => kill_all_marked(marked).await,
        }
    }

    /// SIGKILL to every process of the payload, without waiting (client shutdown).
    pub fn kill_now(&self) {
        match self {
            Tracker::Cgroup(leaf, marked) => {
                cgroup::kill(leaf);
                if let Some(marked) = marked {
                    marked.kill();
                }
            }
            Tracker::Marker(marked) => {
                marked.kill();
            }
        }
    }
}

/// Whether process `pid` runs with this process's effective user id (the owner of its
/// `/proc` entry).
fn runs_as_us(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw())
}

/// SIGKILL to every process carrying the marker, again until a scan finds nobody (a process
/// may fork between scan and kill), within [`LEFTOVER_LIMIT`].
async fn kill_all_marked(marked: &Marked) {
    let deadline = Instant::now() + LEFTOVER_LIMIT;
    while marked.kill() > 0 && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
}

/// Longest the client keeps killing a payload's leftovers before it gives up (logged).
const LEFTOVER_LIMIT: Duration = Duration::from_secs(5);

pub fn signal_group(pgid: u32, signal: Signal) {
    if pgid == 0 {
        // Unknown group (a payload adopted after a restart): killpg(0) would be our own.
        return;
    }
    // ESRCH (nobody left in the group) is the expected outcome once all are gone.
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

pub fn group_alive(pgid: u32) -> bool {
    pgid != 0 && killpg(Pid::from_raw(pgid as i32), None).is_ok()
}

/// Kills whatever is left of a group whose leader has exited (background children).
pub fn kill_leftovers(pgid: u32) {
    signal_group(pgid, Signal::SIGKILL);
}

/// Stops a payload: SIGTERM to the whole group, SIGKILL to whatever is left after `grace`.
/// Returns the leader's exit status once it is reaped.
pub async fn terminate(
    child: &mut Child,
    pgid: u32,
    grace: Duration,
) -> std::io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut status = tokio::time::timeout_at(deadline, child.wait()).await.ok();
    while group_alive(pgid) && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    signal_group(pgid, Signal::SIGKILL);
    let status = match status.take() {
        Some(status) => status?,
        None => child.wait().await?,
    };
    Ok(status)
}

/// Exit code, or the signal that ended the process.
pub fn describe(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
}

/// Kills every process whose environment carries `marker` (left behind by a client process
/// that died, or detached from its payload's group). Returns how many were signalled.
pub fn kill_marked(marker: &str) -> usize {
    kill_pids(marked(marker))
}

fn kill_pids(pids: Vec<i32>) -> usize {
    pids.into_iter()
        .filter(|pid| kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok())
        .count()
}

/// Pids of the live processes whose environment carries `marker`, reading every process's.
pub fn marked(marker: &str) -> Vec<i32> {
    marked_among(marker, Candidates::Any)
}

/// A window at most this long is looked at pid by pid (a pid nobody has is one failed open);
/// a longer one by listing `/proc`.
const PROBE_AT_MOST: u64 = 2_048;

/// Pids of the live processes among `candidates` whose environment carries `marker`.
fn marked_among(marker: &str, candidates: Candidates) -> Vec<i32> {
    let scope = if candidates == Candidates::Any {
        "all"
    } else {
        "window"
    };
    metrics::counter!("jobrelay_client_marker_sweeps_total", "scope" => scope).increment(1);
    let wanted = format!("{MARKER_VAR}={marker}");
    let own = std::process::id() as i32;
    // A zombie's environ reads empty, so the dead are not found.
    let carries = |pid: i32| {
        pid != own
            && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == wanted.as_bytes())
            })
    };
    if let Some(pids) = candidates
        .pids()
        .filter(|_| candidates.len() <= PROBE_AT_MOST)
    {
        // A thread's id reads its process's environment: the signal goes to the process.
        return pids
            .filter_map(|pid| i32::try_from(pid).ok())
            .filter(|pid| carries(*pid))
            .collect();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| candidates.contains(*pid))
        .filter_map(|pid| i32::try_from(pid).ok())
        .filter(|pid| carries(*pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_of_another_user_is_not_taken_for_ours() {
        assert!(runs_as_us(std::process::id() as i32));
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: starting a process as nobody needs root");
            return;
        }
        use std::os::unix::process::CommandExt;
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .uid(65534)
            .gid(65534)
            .spawn()
            .expect("sleep as nobody");
        let theirs = runs_as_us(other.id() as i32);
        let _ = other.kill();
        let _ = other.wait();
        assert!(!theirs, "a process of nobody counted as the client's");
        assert!(!runs_as_us(i32::MAX), "no such process");
    }
}
