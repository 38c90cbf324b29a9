//! Process-group control for payloads: starting `run.sh` in its own group, stopping the
//! whole group (SIGTERM, then SIGKILL after a grace period), and finding processes a previous
//! client process left behind.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use jobrelay_common::protocol::{STDERR_FILE, STDOUT_FILE};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::confine::{self, Confinement};
use tokio::time::Instant;

/// Environment variable that marks every process of a payload, so that a restarted client can
/// find the ones it left behind. Value: `<node>:<payload id>`.
pub const MARKER_VAR: &str = "JOBRELAY_PAYLOAD";
const POLL: Duration = Duration::from_millis(10);

pub fn marker(node: &str, id: u64) -> String {
    format!("{node}:{id}")
}

/// Starts `bash run.sh` in `dir`, in a new process group, with stdin from /dev/null and
/// stdout/stderr going to files in `dir`, confined as `confinement` says.
pub fn spawn_run_script(
    dir: &Path,
    marker: &str,
    confinement: &Confinement,
) -> std::io::Result<Child> {
    let stdout = std::fs::File::create(dir.join(STDOUT_FILE))?;
    let stderr = std::fs::File::create(dir.join(STDERR_FILE))?;
    confine::command(dir, confinement)?
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .env(MARKER_VAR, marker)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
}

fn signal_group(pgid: u32, signal: Signal) {
    // ESRCH (nobody left in the group) is the expected outcome once all are gone.
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

fn group_alive(pgid: u32) -> bool {
    killpg(Pid::from_raw(pgid as i32), None).is_ok()
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
/// that died). Returns how many were signalled.
pub fn kill_marked(marker: &str) -> usize {
    let wanted = format!("{MARKER_VAR}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == wanted.as_bytes())
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}
