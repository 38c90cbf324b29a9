//! A real Slurm cluster for the tests of the Slurm executor: whether one answers here (the
//! tests skip with the reason printed when not) and what `squeue` says of a job.
//! `/work/shared/slurm/start-slurm.sh` (as root) starts a single-node cluster; on one node
//! any local directory is "shared" with the compute node, so the tests' temporary data
//! directories work.

use std::process::Command;

/// Why the Slurm tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    for program in ["sbatch", "squeue", "scancel", "sinfo", "scontrol"] {
        match Command::new(program).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            _ => return Some(format!("{program} is not installed")),
        }
    }
    match Command::new("scontrol").arg("ping").output() {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("UP") => {}
        _ => return Some("the Slurm controller does not answer (scontrol ping)".into()),
    }
    match Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|s| ["idle", "mixed", "allocated", "completing"].contains(&s.trim())) => {}
        _ => return Some("no Slurm node is up (sinfo)".into()),
    }
    None
}

/// The client flags of the Slurm executor, polling Slurm often enough for tests.
pub const EXECUTOR: [&str; 3] = ["--executor", "slurm", "--slurm-poll-interval=0.2"];

/// What `squeue -t all` says of a job: its state (`COMPLETED`, `CANCELLED`, ...).
pub fn state(job_id: u64) -> String {
    let out = Command::new("squeue")
        .args([
            "-h",
            "-t",
            "all",
            "-j",
            &job_id.to_string(),
            "-O",
            "State:|",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_end_matches('|')
        .to_owned()
}

/// True while plain `squeue` (pending, running, completing, ... jobs) lists the job.
pub fn listed(job_id: u64) -> bool {
    let out = Command::new("squeue")
        .args(["-h", "-j", &job_id.to_string(), "-o", "%i"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == job_id.to_string())
}
