//! Real `jobrelay` processes started by the harness, stopped when dropped (also on error or
//! panic): SIGTERM, then SIGKILL if still alive after a grace.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Proc {
    child: Option<Child>,
    pub pid: u32,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    pub name: String,
}

impl Proc {
    /// Starts `jobrelay <args>` with its stderr in `log`, waits for "listening on http://..."
    pub fn start(binary: &Path, args: &[String], log: &Path, name: &str) -> anyhow::Result<Proc> {
        let stderr =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // Nothing from the caller's environment may configure these processes.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key == "PORT"
                || key == "DATA_PATH"
                || key == "DB_PATH"
                || key == "MAX_AGE"
                || key == "JOBRELAY_CONFIG"
                || key.starts_with("JOBRELAY_TEST_")
                || key.starts_with("SERVICE_")
            {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some(at) = line.find("listening on ") {
                    let _ = tx.send(line[at + "listening on ".len()..].trim().to_owned());
                }
                line.clear();
            }
        });
        // From here on, dropping `proc` stops the process.
        let mut proc = Proc {
            child: Some(child),
            pid,
            url: String::new(),
            name: name.to_owned(),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => proc.url = url,
            Err(_) => {
                drop(proc);
                bail!(
                    "jobrelay {args:?} did not start: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
        Ok(proc)
    }

    /// A process started elsewhere (a peer's), stopped like ours when dropped.
    pub fn adopt(child: Child, url: String, name: &str) -> Proc {
        Proc {
            pid: child.id(),
            child: Some(child),
            url,
            name: name.to_owned(),
        }
    }

    /// Whether the process has exited already.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// (user + system CPU seconds, VmHWM bytes, VmRSS bytes) from /proc.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid)
    }

    pub fn hwm_bytes(&self) -> anyhow::Result<u64> {
        status_kb(self.pid, "VmHWM:").map(|kb| kb * 1024)
    }

    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        status_kb(self.pid, "VmRSS:").map(|kb| kb * 1024)
    }

    /// Stops the process: SIGTERM, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()?;
    Ok(kb)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(cpu_times(pid)?.0)
}

/// (own utime + stime, utime + stime of its reaped children), in seconds.
pub fn cpu_times(pid: u32) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')').context("bad /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 of `rest` (0-based 11, 12).
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    let cutime: u64 = fields[13].parse()?;
    let cstime: u64 = fields[14].parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((
        (utime + stime) as f64 / ticks,
        (cutime + cstime) as f64 / ticks,
    ))
}

/// CPU seconds of everything a process started: its reaped children (`cpu_times`'s second
/// part) plus its live children, each with its own reaped children. A jobrelay client's
/// payload fork server is such a live child: the supervisors and bash it forks, reaped by
/// it, count there, and it is reaped only when the client ends.
pub fn descendants_cpu(pid: u32) -> anyhow::Result<f64> {
    let mut total = cpu_times(pid)?.1;
    for child in live_children(pid) {
        if let Ok((own, reaped)) = cpu_times(child) {
            total += own + reaped;
        }
    }
    Ok(total)
}

/// Pids of the live children of `pid` (by the parent field of `/proc/*/stat`).
pub fn live_children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat")).is_ok_and(|text| {
                text.rfind(')')
                    .and_then(|i| text[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// Locates the `jobrelay` binary: `--jobrelay`, else next to this executable.
pub fn find_jobrelay(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("executable has no directory")?;
    let candidate = dir.join("jobrelay");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "no jobrelay binary next to {} (build it with `cargo build -p jobrelay`, or pass --jobrelay PATH)",
        me.display()
    )
}
