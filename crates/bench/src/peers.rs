//! Peers of the throughput scenario: other job systems run with the same trivial
//! `bash run.sh` job, in the same run as jobrelay and its floor, so that their ratios to the
//! floor can be compared.
//!
//! - `hyperqueue`: HyperQueue's PyPI package in a virtualenv of the bench's cache directory
//!   (made by the bench with `python3 -m venv` and `pip install` if it is not there), driven
//!   by `peers/hyperqueue_peer.py` (server and one worker in one process, `LocalCluster`).
//! - `reference=PATH`: a job-orchestrator binary given by path (`PATH server`, `PATH client`,
//!   configured by environment variables), driven over HTTP like jobrelay.
//!
//! A peer that cannot be run is skipped with the reason printed; it never fails the bench.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::procs::Proc;

/// The HyperQueue version the bench installs (the one issue 18 measured).
const HYPERQUEUE_VERSION: &str = "0.27.0";
const HYPERQUEUE_SCRIPT: &str = include_str!("../peers/hyperqueue_peer.py");

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    HyperQueue,
    Reference(PathBuf),
}

impl Peer {
    pub fn parse(text: &str) -> anyhow::Result<Peer> {
        if text == "hyperqueue" {
            return Ok(Peer::HyperQueue);
        }
        if let Some(path) = text.strip_prefix("reference=") {
            if path.is_empty() {
                bail!("--peer reference=PATH needs the path of a job-orchestrator binary");
            }
            return Ok(Peer::Reference(PathBuf::from(path)));
        }
        bail!("unknown peer {text:?} (known: hyperqueue, reference=PATH)")
    }

    pub fn name(&self) -> &'static str {
        match self {
            Peer::HyperQueue => "HyperQueue",
            Peer::Reference(_) => "reference",
        }
    }
}

/// A peer found ready to run.
pub enum Ready {
    /// The virtualenv's python and the driver script.
    HyperQueue {
        python: PathBuf,
        script: PathBuf,
    },
    Reference {
        binary: PathBuf,
    },
}

/// One run of a peer.
pub struct PeerRun {
    pub jobs: usize,
    pub seconds: f64,
    /// CPU milliseconds per job of the peer's own processes and of the jobs (bash), when known.
    pub cpu_ms_per_job: Option<(f64, f64)>,
}

/// The bench's cache directory: `$XDG_CACHE_HOME/jobrelay-bench`, else `~/.cache/jobrelay-bench`.
pub fn default_cache() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("jobrelay-bench"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/jobrelay-bench"))
}

/// Makes the peer ready, or says why it cannot run.
pub fn prepare(peer: &Peer, cache: Option<&Path>, root: &Path) -> Result<Ready, String> {
    match peer {
        Peer::HyperQueue => {
            let cache = cache
                .ok_or("no cache directory (set XDG_CACHE_HOME or HOME, or pass --peer-cache)")?;
            let python = hyperqueue_python(cache)?;
            let script = root.join("hyperqueue_peer.py");
            std::fs::write(&script, HYPERQUEUE_SCRIPT)
                .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
            Ok(Ready::HyperQueue { python, script })
        }
        Peer::Reference(path) => {
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("no reference binary at {}: {e}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(format!("{} is not an executable file", path.display()));
            }
            Ok(Ready::Reference {
                binary: path.clone(),
            })
        }
    }
}

/// The python of the cached virtualenv holding HyperQueue, made if missing.
fn hyperqueue_python(cache: &Path) -> Result<PathBuf, String> {
    let venv = cache.join(format!("hyperqueue-{HYPERQUEUE_VERSION}-venv"));
    let python = venv.join("bin/python");
    let importable = |python: &Path| {
        Command::new(python)
            .args(["-c", "import hyperqueue.cluster"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.is_file() && importable(&python) {
        return Ok(python);
    }
    eprintln!(
        "peer HyperQueue: installing hyperqueue=={HYPERQUEUE_VERSION} from PyPI into {}",
        venv.display()
    );
    std::fs::create_dir_all(cache)
        .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            return Err(format!(
                "`{} {}` failed ({}): {}",
                program.display(),
                args.join(" "),
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ));
        }
        Ok(())
    };
    let venv_arg = venv.display().to_string();
    run(Path::new("python3"), &["-m", "venv", &venv_arg])?;
    run(
        &venv.join("bin/pip"),
        &[
            "install",
            "--quiet",
            &format!("hyperqueue=={HYPERQUEUE_VERSION}"),
        ],
    )?;
    if !importable(&python) {
        return Err(format!(
            "hyperqueue installed into {} but `import hyperqueue.cluster` fails",
            venv.display()
        ));
    }
    Ok(python)
}

/// Runs `jobs` trivial jobs from `users` users through the peer; `dir` is fresh.
pub async fn run_once(
    ready: &Ready,
    http: &reqwest::Client,
    dir: &Path,
    jobs: usize,
    users: usize,
    script: &[u8],
) -> anyhow::Result<PeerRun> {
    match ready {
        Ready::HyperQueue {
            python,
            script: driver,
        } => {
            let (python, driver, dir) = (python.clone(), driver.clone(), dir.to_path_buf());
            let script = String::from_utf8_lossy(script).into_owned();
            tokio::task::spawn_blocking(move || {
                hyperqueue_once(&python, &driver, &dir, jobs, users, &script)
            })
            .await?
        }
        Ready::Reference { binary } => reference_once(binary, http, dir, jobs, users, script).await,
    }
}

fn hyperqueue_once(
    python: &Path,
    driver: &Path,
    dir: &Path,
    jobs: usize,
    users: usize,
    script: &str,
) -> anyhow::Result<PeerRun> {
    let log = dir.join("hyperqueue.log");
    let out = Command::new(python)
        .arg(driver)
        .args(["--dir", &dir.display().to_string()])
        .args(["--tasks", &jobs.to_string(), "--users", &users.to_string()])
        .args(["--script", script])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .output()
        .context("start the HyperQueue driver")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let Some(line) = line else {
        bail!(
            "the HyperQueue driver printed no result ({}); its log: {}",
            out.status,
            log.display()
        );
    };
    let v: Value = serde_json::from_str(line)?;
    if !out.status.success() {
        bail!("HyperQueue run failed: {v}");
    }
    let seconds = v["seconds"].as_f64().context("no seconds")?;
    let per_job = |key: &str| v[key].as_f64().map(|s| s * 1e3 / jobs as f64);
    let cpu = per_job("cpu_s_hyperqueue").zip(per_job("cpu_s_children"));
    Ok(PeerRun {
        jobs,
        seconds,
        cpu_ms_per_job: cpu,
    })
}

/// A free TCP port on 127.0.0.1 (bound, then released for the peer to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `binary role` in `dir` with `env`, waits until `GET /` answers on `port`.
async fn start_reference(
    binary: &Path,
    role: &str,
    dir: &Path,
    port: u16,
    env: &[(String, String)],
    http: &reqwest::Client,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join(format!("{role}.log")))?;
    let mut command = Command::new(binary);
    command
        .arg(role)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("SERVICE_")
            || ["PORT", "DB_PATH", "DATA_PATH", "MAX_AGE"].contains(&key.as_str())
        {
            command.env_remove(key);
        }
    }
    command.env("PORT", port.to_string());
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
        .spawn()
        .with_context(|| format!("start {} {role}", binary.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let mut proc = Proc::adopt(child, url.clone(), role);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http.get(format!("{url}/")).send().await.is_ok() {
            return Ok(proc);
        }
        if Instant::now() > deadline || proc.exited() {
            bail!(
                "the reference {role} did not answer on {url} (log: {})",
                dir.join(format!("{role}.log")).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reference_once(
    binary: &Path,
    http: &reqwest::Client,
    dir: &Path,
    jobs: usize,
    users: usize,
    script: &[u8],
) -> anyhow::Result<PeerRun> {
    let client_port = free_port()?;
    let client_dir = dir.join("client");
    let client = start_reference(
        binary,
        "client",
        &client_dir,
        client_port,
        &[
            (
                "DATA_PATH".into(),
                client_dir.join("data").display().to_string(),
            ),
            (
                "DB_PATH".into(),
                client_dir.join("db.sqlite").display().to_string(),
            ),
        ],
        http,
    )
    .await?;
    let server_port = free_port()?;
    let server_dir = dir.join("server");
    let c = &client.url;
    // The same quotas as jobrelay's bench service (runs_per_user 5, max_runs 10).
    let server = start_reference(
        binary,
        "server",
        &server_dir,
        server_port,
        &[
            (
                "DATA_PATH".into(),
                server_dir.join("data").display().to_string(),
            ),
            (
                "DB_PATH".into(),
                server_dir.join("db.sqlite").display().to_string(),
            ),
            ("SERVICE_BENCH_UPLOAD_URL".into(), format!("{c}/submit")),
            ("SERVICE_BENCH_DOWNLOAD_URL".into(), format!("{c}/retrieve")),
            ("SERVICE_BENCH_TERMINATE_URL".into(), format!("{c}/kill")),
            ("SERVICE_BENCH_RUNS_PER_USER".into(), "5".into()),
            ("SERVICE_BENCH_MAX_RUNS".into(), "10".into()),
        ],
        http,
    )
    .await?;
    // Its client learns a payload's exit code from this trap.
    let mut body = b"trap 'echo $? > .orchestrator.exit' EXIT\n".to_vec();
    body.extend_from_slice(script);
    let body: Arc<[u8]> = body.into();
    let url = server.url.clone();
    let before = (cpu_of(&server), cpu_of(&client));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for u in 0..users {
        let share = jobs / users + usize::from(u < jobs % users);
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let mut ids = Vec::with_capacity(share);
            for _ in 0..share {
                ids.push(reference_upload(&http, &url, u as i64 + 1, &body).await?);
            }
            for id in ids {
                reference_follow(&http, &url, id).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = (cpu_of(&server), cpu_of(&client));
    let per_job = |s: f64| s * 1e3 / jobs as f64;
    let cpu = match (before, after) {
        ((Some(s0), Some(c0)), (Some(s1), Some(c1))) => {
            Some((per_job(s1.0 - s0.0 + c1.0 - c0.0), per_job(c1.1 - c0.1)))
        }
        _ => None,
    };
    drop(server);
    drop(client);
    Ok(PeerRun {
        jobs,
        seconds,
        cpu_ms_per_job: cpu,
    })
}

fn cpu_of(proc: &Proc) -> Option<(f64, f64)> {
    crate::procs::cpu_times(proc.pid).ok()
}

async fn reference_upload(
    http: &reqwest::Client,
    url: &str,
    user: i64,
    body: &[u8],
) -> anyhow::Result<i64> {
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(body.to_vec()).file_name("run.sh"),
        )
        .text("user_id", user.to_string())
        .text("service", "bench");
    let response = http
        .post(format!("{url}/upload"))
        .multipart(form)
        .send()
        .await?;
    let status = response.status();
    let v: Value = response.json().await?;
    if !status.is_success() {
        bail!("reference upload refused ({status}): {v}");
    }
    v["id"]
        .as_i64()
        .context("no id in the reference's upload answer")
}

/// Polls `GET /download/{id}` (the reference has no long-poll; its own loops tick every
/// 500 ms) until it answers the ZIP.
async fn reference_follow(http: &reqwest::Client, url: &str, id: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let response = http.get(format!("{url}/download/{id}")).send().await?;
        let zip = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/zip"));
        let body = response.bytes().await?;
        if zip {
            return Ok(());
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let status = v["status"].as_str().unwrap_or("");
        if ["Failed", "Invalid", "Killed", "Cleaned"].contains(&status) {
            bail!("reference job {id} ended {status}");
        }
        if Instant::now() > deadline {
            bail!("reference job {id} still {status} after an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
