//! The local executor: `bash run.sh` in a process group of its own on this machine (see
//! `process`). Whatever a payload leaves running in its group when `run.sh` exits is killed.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobrelay_common::protocol::PayloadStatus;
use tokio::process::Child;

use super::{Ended, Progress};
use crate::confine::Confinement;
use crate::process;

/// Starts payloads as local process groups and remembers the live ones, so that a shutdown
/// can kill them all.
#[derive(Default)]
pub struct LocalExecutor {
    groups: Arc<Mutex<HashSet<u32>>>,
    confinement: Confinement,
}

pub struct LocalJob {
    child: Child,
    pgid: u32,
    reported_running: bool,
    groups: Arc<Mutex<HashSet<u32>>>,
}

impl LocalExecutor {
    /// An executor whose payloads run confined (`--run-as`, limits, `--sandbox`).
    pub fn confined(confinement: Confinement) -> Self {
        LocalExecutor {
            groups: Arc::default(),
            confinement,
        }
    }

    pub fn start(&self, dir: &Path, marker: &str) -> Result<LocalJob, String> {
        let child = process::spawn_run_script(dir, marker, &self.confinement).map_err(|e| {
            metrics::counter!("jobrelay_client_spawn_failures_total").increment(1);
            format!("could not start run.sh: {e}")
        })?;
        let pgid = child.id().unwrap_or(0);
        self.groups.lock().unwrap().insert(pgid);
        Ok(LocalJob {
            child,
            pgid,
            reported_running: false,
            groups: self.groups.clone(),
        })
    }

    /// SIGKILL to every live payload group (client shutdown).
    pub fn kill_all_now(&self) {
        for pgid in self.groups.lock().unwrap().iter() {
            process::kill_leftovers(*pgid);
        }
    }
}

impl LocalJob {
    pub fn pgid(&self) -> u32 {
        self.pgid
    }

    pub async fn next(&mut self) -> Progress {
        if !self.reported_running {
            self.reported_running = true;
            return Progress::Running { pid: self.pgid };
        }
        let status = self.child.wait().await;
        process::kill_leftovers(self.pgid);
        Progress::Ended(finish_exited(status))
    }

    pub async fn terminate(&mut self, grace: Duration) -> Ended {
        let status = process::terminate(&mut self.child, self.pgid, grace).await;
        let (exit_code, signal) = status.map(process::describe).unwrap_or((None, None));
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
        self.groups.lock().unwrap().remove(&self.pgid);
    }
}

fn finish_exited(exit: std::io::Result<std::process::ExitStatus>) -> Ended {
    match exit.map(process::describe) {
        Ok((Some(0), _)) => Ended {
            status: PayloadStatus::Completed,
            exit_code: Some(0),
            signal: None,
            reason: "run.sh exited with code 0".into(),
        },
        Ok((Some(code), _)) => Ended {
            status: PayloadStatus::Failed,
            exit_code: Some(code),
            signal: None,
            reason: format!("run.sh exited with code {code}"),
        },
        Ok((None, signal)) => Ended {
            status: PayloadStatus::Failed,
            exit_code: None,
            signal,
            reason: format!("run.sh was killed by signal {}", signal.unwrap_or(0)),
        },
        Err(e) => Ended::failed(format!("could not wait for run.sh: {e}")),
    }
}
