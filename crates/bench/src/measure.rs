//! The measurements of issue 5, each against a floor measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use jobrelay_server::scheduler::Scheduler;
use serde_json::{json, Value};

use crate::peers;
use crate::procs::{cpu_times, descendants_cpu, find_jobrelay, Proc};
use crate::stats::{mib, ms, yes, Row, Summary};
use crate::{Args, Follow};

/// The trivial job: writes one small file.
const TRIVIAL: &[u8] = b"echo hello > out.txt\n";
const FINAL: [&str; 5] = ["Completed", "Failed", "Invalid", "Killed", "Cleaned"];

/// Counts of one mode.
struct Counts {
    floor_runs: usize,
    latency_jobs: usize,
    throughput_jobs: usize,
    users: usize,
    runs: usize,
    memory_bytes: u64,
    idle_secs: u64,
    idle_jobs: usize,
    queue_jobs: usize,
    queue_users: usize,
    sched_small: usize,
    clients: usize,
    client_jobs: usize,
}

impl Counts {
    fn of(args: &Args) -> Counts {
        let mut c = if args.quick {
            Counts {
                floor_runs: 40,
                latency_jobs: 20,
                throughput_jobs: 100,
                users: 16,
                runs: 1,
                memory_bytes: 16 << 20,
                idle_secs: 2,
                idle_jobs: 100,
                queue_jobs: 2_000,
                queue_users: 100,
                sched_small: 200,
                clients: 2,
                client_jobs: 40,
            }
        } else {
            Counts {
                floor_runs: 400,
                latency_jobs: 200,
                throughput_jobs: 5_000,
                users: 16,
                runs: 3,
                memory_bytes: 1 << 30,
                idle_secs: 30,
                idle_jobs: 1_000,
                queue_jobs: 100_000,
                queue_users: 1_000,
                sched_small: 1_000,
                clients: 8,
                client_jobs: 2_000,
            }
        };
        if let Some(n) = args.latency_jobs {
            c.latency_jobs = n;
        }
        if let Some(n) = args.throughput_jobs {
            c.throughput_jobs = n;
        }
        if let Some(n) = args.queue_jobs {
            c.queue_jobs = n;
        }
        if let Some(n) = args.runs {
            c.runs = n.max(1);
        }
        c
    }
}

/// What every measurement needs: the binary, a scratch directory, an HTTP client.
struct Env {
    binary: PathBuf,
    root: PathBuf,
    http: reqwest::Client,
    /// The server answers `GET /jobs/{id}?wait=` as a long-poll.
    long_poll: bool,
    /// The server answers `GET /download/{id}?wait=` with the ZIP once the job completed.
    download_wait: bool,
    force_poll: bool,
    /// The service's `send_ahead` (0: the key is not written).
    send_ahead: usize,
    seq: std::sync::atomic::AtomicUsize,
}

/// A server and its clients, stopped when dropped.
struct Setup {
    server: Proc,
    clients: Vec<Proc>,
}

impl Env {
    fn fresh_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.root.join(format!("{n:02}-{name}"));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn start_client(&self, dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<Proc> {
        let mut args: Vec<String> = vec![
            "client".into(),
            "--port".into(),
            "0".into(),
            "--data-dir".into(),
            dir.join(name).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::start(&self.binary, &args, &dir.join(format!("{name}.log")), name)
    }

    /// A server with one service `bench` over `client_urls`.
    fn start_server(
        &self,
        dir: &Path,
        client_urls: &[String],
        runs_per_user: usize,
        max_runs: usize,
        extra: &[&str],
    ) -> anyhow::Result<Proc> {
        let list: Vec<String> = client_urls.iter().map(|c| format!("{c:?}")).collect();
        let config = dir.join("server.toml");
        let mut text = format!(
            "[services.bench]\nclients = [{}]\nruns_per_user = {runs_per_user}\nmax_runs = {max_runs}\n",
            list.join(", ")
        );
        if self.send_ahead > 0 {
            text.push_str(&format!("send_ahead = {}\n", self.send_ahead));
        }
        std::fs::write(&config, text)?;
        let mut args: Vec<String> = vec![
            "server".into(),
            "--port".into(),
            "0".into(),
            "--data-dir".into(),
            dir.join("server").display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::start(&self.binary, &args, &dir.join("server.log"), "server")
    }

    /// One client with `client_extra`, one server; waits until the server can dispatch.
    async fn setup(
        &self,
        name: &str,
        clients: usize,
        client_extra: &[&str],
        runs_per_user: usize,
        max_runs: usize,
        server_extra: &[&str],
    ) -> anyhow::Result<Setup> {
        let dir = self.fresh_dir(name)?;
        let mut procs = Vec::new();
        for i in 0..clients {
            procs.push(self.start_client(&dir, &format!("client{i}"), client_extra)?);
        }
        let urls: Vec<String> = procs.iter().map(|p| p.url.clone()).collect();
        let server = self.start_server(&dir, &urls, runs_per_user, max_runs, server_extra)?;
        Ok(Setup {
            server,
            clients: procs,
        })
    }

    async fn upload(
        &self,
        server: &str,
        user: i64,
        files: Vec<(&str, Vec<u8>)>,
    ) -> anyhow::Result<i64> {
        upload_files(&self.http, server, user, "bench", files).await
    }

    async fn upload_trivial(&self, server: &str, user: i64) -> anyhow::Result<i64> {
        self.upload(server, user, vec![("run.sh", TRIVIAL.to_vec())])
            .await
    }

    /// Waits until the job is in a final state; returns that state.
    async fn wait_final(&self, server: &str, id: i64, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        let long = self.long_poll && !self.force_poll;
        loop {
            let url = if long {
                format!("{server}/jobs/{id}?wait=30")
            } else {
                format!("{server}/jobs/{id}")
            };
            let job: Value = self
                .http
                .get(url)
                .timeout(Duration::from_secs(60))
                .send()
                .await?
                .json()
                .await?;
            let status = job["status"].as_str().unwrap_or("").to_owned();
            if FINAL.contains(&status.as_str()) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("job {id} still {status} after {limit:?}");
            }
            if !long {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Downloads a Completed job's ZIP; returns its size.
    async fn download(&self, server: &str, id: i64) -> anyhow::Result<u64> {
        let response = self
            .http
            .get(format!("{server}/download/{id}"))
            .timeout(Duration::from_secs(3600))
            .send()
            .await?;
        if !is_zip(&response) {
            bail!("job {id}: /download answered {}", response.text().await?);
        }
        count_body(response).await
    }

    /// Upload, wait, download: one trivial job.
    async fn round_trip(&self, server: &str, user: i64) -> anyhow::Result<()> {
        let id = self.upload_trivial(server, user).await?;
        self.follow_and_download(server, id, Duration::from_secs(120))
            .await?;
        Ok(())
    }

    /// Follows the job to its end and downloads its ZIP (an error unless it Completed);
    /// returns the ZIP's size.
    async fn follow_and_download(
        &self,
        server: &str,
        id: i64,
        limit: Duration,
    ) -> anyhow::Result<u64> {
        if !self.download_wait || self.force_poll {
            let status = self.wait_final(server, id, limit).await?;
            if status != "Completed" {
                bail!("job {id} ended {status}");
            }
            return self.download(server, id).await;
        }
        let deadline = Instant::now() + limit;
        loop {
            let response = self
                .http
                .get(format!("{server}/download/{id}?wait=30"))
                .timeout(Duration::from_secs(3600))
                .send()
                .await?;
            if is_zip(&response) {
                return count_body(response).await;
            }
            let job: Value = response.json().await?;
            let status = job["status"].as_str().unwrap_or("").to_owned();
            if FINAL.contains(&status.as_str()) {
                bail!("job {id} ended {status}: {job}");
            }
            if Instant::now() > deadline {
                bail!("job {id} still {status} after {limit:?}");
            }
        }
    }
}

fn is_zip(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/zip"))
}

/// Reads a body to its end without keeping it; returns its size.
async fn count_body(response: reqwest::Response) -> anyhow::Result<u64> {
    let mut size = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        size += chunk?.len() as u64;
    }
    Ok(size)
}

/// Runs every wanted measurement; returns the table's rows and the JSON document.
pub async fn run_all(args: Args) -> anyhow::Result<(Vec<Row>, Value)> {
    let counts = Counts::of(&args);
    let binary = find_jobrelay(args.jobrelay.clone())?;
    let _temp;
    let root = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::Builder::new()
                .prefix("jobrelay-bench-")
                .tempdir_in(dir)?
        }
        None => tempfile::Builder::new()
            .prefix("jobrelay-bench-")
            .tempdir()?,
    };
    let root_path = root.path().to_path_buf();
    if args.keep {
        eprintln!("keeping data and logs in {}", root.keep().display());
        _temp = None;
    } else {
        _temp = Some(root);
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()?;
    let mut env = Env {
        binary: binary.clone(),
        root: root_path,
        http,
        long_poll: false,
        download_wait: false,
        force_poll: args.follow == Follow::Poll,
        send_ahead: args.send_ahead,
        seq: Default::default(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    let mut doc = json!({
        "mode": if args.quick { "quick" } else { "full" },
        "machine": machine(),
        "jobrelay": binary.display().to_string(),
        "cores": cores,
    });

    // 1. Floor: always measured, every figure is compared with it.
    let floor = floor(&env, counts.floor_runs, cores)?;
    let floor_s = floor.sequential.p50;
    let floor_rate = floor.parallel_rate;
    doc["floor"] = json!({
        "runs": counts.floor_runs,
        "per_run_s": floor.sequential.json(),
        "spawns_per_s_sequential": floor.sequential_rate,
        "cpu_s_per_run": floor.cpu_per_run,
        "spawns_per_s_parallel": floor.parallel_rate,
        "parallel_workers": cores,
    });
    rows.push(Row {
        section: "1".into(),
        what: format!(
            "floor: `bash run.sh` back to back, per run ({} runs)",
            counts.floor_runs
        ),
        value: ms(floor_s),
        spread: format!(
            "p90 {} / p99 {}",
            ms(floor.sequential.p90),
            ms(floor.sequential.p99)
        ),
        floor: "—".into(),
        ratio: "1x".into(),
        target: "".into(),
        met: "".into(),
    });
    rows.push(Row {
        section: "1".into(),
        what: format!("floor: spawns per second, 1 worker / {cores} workers"),
        value: format!(
            "{:.0} / {:.0} /s",
            floor.sequential_rate, floor.parallel_rate
        ),
        spread: "".into(),
        floor: "—".into(),
        ratio: "".into(),
        target: "".into(),
        met: "".into(),
    });

    // Does the server long-poll `GET /jobs/{id}?wait=`? (Older servers answer at once.)
    {
        let setup = env.setup("probe", 1, &[], 5, 10, &[]).await?;
        let spec: Value = env
            .http
            .get(format!("{}/openapi.json", setup.server.url))
            .send()
            .await?
            .json()
            .await?;
        let has_wait = |path: &str| {
            spec["paths"][path]["get"]["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "wait"))
        };
        env.long_poll = has_wait("/jobs/{id}");
        env.download_wait = has_wait("/download/{id}")
            && matches!(args.follow, Follow::Auto | Follow::DownloadWait);
        if args.follow == Follow::DownloadWait && !env.download_wait {
            bail!("the server has no GET /download/{{id}}?wait=");
        }
        if args.follow == Follow::JobsWait && !env.long_poll {
            bail!("the server has no GET /jobs/{{id}}?wait=");
        }
    }
    doc["send_ahead"] = json!(env.send_ahead);
    doc["follow"] = json!(if env.force_poll || !env.long_poll {
        "poll GET /jobs/{id} every 1 ms, then GET /download/{id}"
    } else if env.download_wait {
        "long-poll GET /download/{id}?wait=30 (answers the ZIP)"
    } else {
        "long-poll GET /jobs/{id}?wait=30, then GET /download/{id}"
    });

    if args.wants("latency") {
        latency(&env, &counts, floor_s, &mut rows, &mut doc).await?;
    }
    if args.wants("throughput") || args.wants("idle") {
        let floors = (floor_rate, floor.cpu_per_run);
        throughput_and_idle(&env, &args, &counts, floors, &mut rows, &mut doc).await?;
    }
    if args.wants("memory") {
        memory(&env, &counts, &mut rows, &mut doc).await?;
    }
    if args.wants("queue") {
        queue_scale(&env, &counts, floor_s, &mut rows, &mut doc).await?;
    }
    if args.wants("clients") {
        many_clients(&env, &counts, &mut rows, &mut doc).await?;
    }
    if args.wants("fairshare") {
        fair_share_scale(&counts, &mut rows, &mut doc);
    }
    Ok((rows, doc))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!({"cpu": cpu, "kernel": kernel, "nproc": nproc})
}

struct Floor {
    /// CPU seconds of one `bash run.sh` (user + system, from the reaped children's times).
    cpu_per_run: f64,
    sequential: Summary,
    sequential_rate: f64,
    parallel_rate: f64,
}

/// One floor run: `bash run.sh` in `work` (which holds it), stdout/stderr to files as the
/// client does. Returns its wall time in seconds.
fn floor_once(work: &Path) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = Command::new("bash")
        .arg("run.sh")
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(work.join(".stdout"))?)
        .stderr(std::fs::File::create(work.join(".stderr"))?)
        .status()?;
    if !status.success() {
        bail!("bash run.sh failed: {status}");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Runs `bash run.sh` back to back in this process: once in one thread, once in `workers`
/// threads.
fn floor(env: &Env, runs: usize, workers: usize) -> anyhow::Result<Floor> {
    let dir = env.fresh_dir("floor")?;
    let one = floor_once;
    let work0 = dir.join("w0");
    std::fs::create_dir_all(&work0)?;
    std::fs::write(work0.join("run.sh"), TRIVIAL)?;
    // Warm-up.
    for _ in 0..5 {
        one(&work0)?;
    }
    let start = Instant::now();
    let children_before = cpu_times(std::process::id())?.1;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(one(&work0)?);
    }
    let sequential_rate = runs as f64 / start.elapsed().as_secs_f64();
    let cpu_per_run = (cpu_times(std::process::id())?.1 - children_before) / runs as f64;
    let per_worker = runs.div_ceil(workers);
    let start = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for w in 0..workers {
            let work = dir.join(format!("p{w}"));
            std::fs::create_dir_all(&work)?;
            std::fs::write(work.join("run.sh"), TRIVIAL)?;
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                for _ in 0..per_worker {
                    one(&work)?;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join().expect("floor worker")?;
        }
        Ok(())
    })?;
    let parallel_rate = (per_worker * workers) as f64 / start.elapsed().as_secs_f64();
    Ok(Floor {
        cpu_per_run,
        sequential: Summary::of(&samples),
        sequential_rate,
        parallel_rate,
    })
}

/// Measurement 2: One trivial job at a time, from the start of the upload to the end of the download.
async fn latency(
    env: &Env,
    counts: &Counts,
    first_floor_s: f64,
    rows: &mut Vec<Row>,
    doc: &mut Value,
) -> anyhow::Result<()> {
    let setup = env.setup("latency", 1, &[], 5, 10, &[]).await?;
    let server = setup.server.url.clone();
    // Warm-up: connections, the client's first probe.
    for _ in 0..5 {
        env.round_trip(&server, 1).await?;
    }
    // A floor run before each job, so that both see the same load on the machine.
    let work = env.fresh_dir("latency-floor")?;
    std::fs::write(work.join("run.sh"), TRIVIAL)?;
    let mut samples = Vec::new();
    let mut floors = Vec::new();
    for _ in 0..counts.latency_jobs {
        floors.push(floor_once(&work)?);
        let start = Instant::now();
        env.round_trip(&server, 1).await?;
        samples.push(start.elapsed().as_secs_f64());
    }
    let s = Summary::of(&samples);
    let f = Summary::of(&floors);
    let floor_s = f.p50;
    let ratio = s.p50 / floor_s;
    doc["latency"] = json!({
        "jobs": counts.latency_jobs, "seconds": s.json(), "p50_over_floor": ratio,
        "interleaved_floor_seconds": f.json(), "first_floor_seconds": first_floor_s,
    });
    rows.push(Row {
        section: "2".into(),
        what: format!(
            "latency: upload → download of a trivial job, one at a time ({} jobs; floor: a bash run before each)",
            counts.latency_jobs
        ),
        value: ms(s.p50),
        spread: format!("p90 {} / p99 {}", ms(s.p90), ms(s.p99)),
        floor: ms(floor_s),
        ratio: format!("{ratio:.1}x"),
        target: "p50 < 5x floor".into(),
        met: yes(ratio < 5.0),
    });
    drop(setup);
    Ok(())
}

/// `jobs` trivial jobs from `users` concurrent users, each uploading its share then
/// following and downloading each: seconds from the first upload to the last download.
async fn many_jobs(
    env: &Arc<EnvRef>,
    server: &str,
    jobs: usize,
    users: usize,
    script: &'static [u8],
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for u in 0..users {
        let share = jobs / users + usize::from(u < jobs % users);
        let env = env.clone();
        let server = server.to_owned();
        tasks.spawn(async move {
            let env = &env.0;
            let mut ids = Vec::with_capacity(share);
            for _ in 0..share {
                ids.push(
                    env.upload(&server, u as i64 + 1, vec![("run.sh", script.to_vec())])
                        .await?,
                );
            }
            for id in ids {
                env.follow_and_download(&server, id, Duration::from_secs(600))
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// An `Env` shared by tasks (the harness's own state, never the processes).
struct EnvRef(Env);

fn share(env: &Env) -> Arc<EnvRef> {
    Arc::new(EnvRef(Env {
        binary: env.binary.clone(),
        root: env.root.clone(),
        http: env.http.clone(),
        long_poll: env.long_poll,
        download_wait: env.download_wait,
        force_poll: env.force_poll,
        send_ahead: env.send_ahead,
        seq: Default::default(),
    }))
}

/// Measurement 3: Throughput of trivial jobs from concurrent users; 5. then the idle cost of the same
/// server and client, with those finished jobs in the database.
async fn throughput_and_idle(
    env: &Env,
    args: &Args,
    counts: &Counts,
    (first_floor_rate, floor_cpu): (f64, f64),
    rows: &mut Vec<Row>,
    doc: &mut Value,
) -> anyhow::Result<()> {
    let shared = share(env);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rates = Vec::new();
    // Jobs per second over the floor's spawns per second measured just before, per run.
    let mut fractions = Vec::new();
    let mut run_floors = Vec::new();
    // CPU milliseconds per job: server, client, what the client started (supervisors and bash,
    // through its fork server or exec'd: `descendants_cpu`), this harness.
    let mut cpu: Vec<[f64; 4]> = Vec::new();
    let mut last = None;
    let runs = if args.wants("throughput") {
        counts.runs
    } else {
        1
    };
    let jobs = if args.wants("throughput") {
        counts.throughput_jobs
    } else {
        counts.idle_jobs
    };
    // Peers, run after jobrelay in each run, each with a floor measured right before it.
    let cache = args.peer_cache.clone().or_else(peers::default_cache);
    let mut ready = Vec::new();
    let mut skipped = Vec::new();
    if args.wants("throughput") {
        for peer in &args.peer {
            match peers::prepare(peer, cache.as_deref(), &env.root) {
                Ok(r) => ready.push((peer.clone(), r, Vec::<PeerSample>::new())),
                Err(reason) => {
                    eprintln!("peer {} skipped: {reason}", peer.name());
                    skipped.push((peer.clone(), reason));
                }
            }
        }
    }
    for _ in 0..runs {
        drop(last.take());
        let setup = env.setup("throughput", 1, &[], 5, 10, &[]).await?;
        let server = setup.server.url.clone();
        for _ in 0..3 {
            env.round_trip(&server, 1).await?;
        }
        // The floor's rate right before this run, under the same load.
        let here = floor(env, counts.floor_runs / 2, cores)?;
        run_floors.push(here.parallel_rate);
        let me = std::process::id();
        let before = [
            cpu_times(setup.server.pid)?.0,
            cpu_times(setup.clients[0].pid)?.0,
            descendants_cpu(setup.clients[0].pid)?,
            cpu_times(me)?.0,
        ];
        let secs = many_jobs(&shared, &server, jobs, counts.users, TRIVIAL).await?;
        rates.push(jobs as f64 / secs);
        fractions.push(jobs as f64 / secs / here.parallel_rate);
        let after = [
            cpu_times(setup.server.pid)?.0,
            cpu_times(setup.clients[0].pid)?.0,
            descendants_cpu(setup.clients[0].pid)?,
            cpu_times(me)?.0,
        ];
        cpu.push(std::array::from_fn(|i| {
            (after[i] - before[i]) * 1e3 / jobs as f64
        }));
        for (peer, r, samples) in ready.iter_mut() {
            let n = match peer {
                peers::Peer::Reference(_) => args.reference_jobs.unwrap_or(jobs.min(500)),
                peers::Peer::HyperQueue => jobs,
            };
            let here = floor(env, counts.floor_runs / 2, cores)?;
            let dir = env.fresh_dir(&format!("peer-{}", peer.name()))?;
            match peers::run_once(r, &env.http, &dir, n, counts.users, TRIVIAL).await {
                Ok(run) => samples.push(PeerSample {
                    rate: run.jobs as f64 / run.seconds,
                    floor_rate: here.parallel_rate,
                    cpu: run.cpu_ms_per_job,
                    jobs: run.jobs,
                }),
                Err(e) => eprintln!("peer {} run failed: {e:#}", peer.name()),
            }
        }
        last = Some(setup);
    }
    let setup = last.expect("one run at least");
    if args.wants("throughput") {
        let s = Summary::of(&rates);
        let fr = Summary::of(&fractions);
        let fraction = fr.p50;
        let floor_rate = Summary::of(&run_floors).p50;
        let cpu_of = |i: usize| Summary::of(&cpu.iter().map(|c| c[i]).collect::<Vec<_>>()).p50;
        let (server_ms, client_ms, bash_ms, bench_ms) =
            (cpu_of(0), cpu_of(1), cpu_of(2), cpu_of(3));
        doc["throughput"] = json!({
            "jobs": jobs, "users": counts.users, "runs": runs, "jobs_per_s": s.json(),
            "fraction_of_floor_rate": fr.json(),
            "floor_spawns_per_s_before_each_run": run_floors,
            "first_floor_spawns_per_s": first_floor_rate,
            "cpu_ms_per_job": {"server": server_ms, "client": client_ms, "client_children_bash": bash_ms, "harness": bench_ms},
        });
        rows.push(Row {
            section: "3".into(),
            what: format!(
                "throughput: {jobs} trivial jobs, {} concurrent users, median of {runs} runs{}",
                counts.users,
                if env.send_ahead > 0 {
                    format!(", send_ahead {}", env.send_ahead)
                } else {
                    String::new()
                }
            ),
            value: format!("{:.0} jobs/s", s.p50),
            spread: format!("min {:.0} / max {:.0}", s.min, s.max),
            floor: format!("{floor_rate:.0} spawns/s ({cores} workers, before each run)"),
            ratio: format!(
                "{:.0}% (runs: {:.0}–{:.0}%)",
                fraction * 100.0,
                fr.min * 100.0,
                fr.max * 100.0
            ),
            target: "≥ 50% of floor rate".into(),
            met: yes(fraction >= 0.5),
        });
        let mut peer_docs = serde_json::Map::new();
        for (peer, _, samples) in &ready {
            if samples.is_empty() {
                rows.push(peer_skipped_row(peer, "every run failed (see stderr)"));
                continue;
            }
            let rate = Summary::of(&samples.iter().map(|p| p.rate).collect::<Vec<_>>());
            let fr = Summary::of(
                &samples
                    .iter()
                    .map(|p| p.rate / p.floor_rate)
                    .collect::<Vec<_>>(),
            );
            let pfloor = Summary::of(&samples.iter().map(|p| p.floor_rate).collect::<Vec<_>>());
            let cpus: Vec<(f64, f64)> = samples.iter().filter_map(|p| p.cpu).collect();
            let cpu_text = if cpus.is_empty() {
                String::new()
            } else {
                let own = Summary::of(&cpus.iter().map(|c| c.0).collect::<Vec<_>>()).p50;
                let bash = Summary::of(&cpus.iter().map(|c| c.1).collect::<Vec<_>>()).p50;
                format!("; CPU per job {own:.2} ms own, {bash:.2} ms bash")
            };
            peer_docs.insert(
                peer.name().into(),
                json!({
                    "jobs": samples[0].jobs, "runs": samples.len(), "jobs_per_s": rate.json(),
                    "fraction_of_floor_rate": fr.json(),
                    "floor_spawns_per_s_before_each_run": samples.iter().map(|p| p.floor_rate).collect::<Vec<_>>(),
                    "cpu_ms_per_job_own_and_bash": cpus,
                }),
            );
            rows.push(Row {
                section: "3".into(),
                what: format!(
                    "throughput, peer {}: {} trivial jobs, {} users, median of {} runs{cpu_text}",
                    peer.name(),
                    samples[0].jobs,
                    counts.users,
                    samples.len()
                ),
                value: format!("{:.0} jobs/s", rate.p50),
                spread: format!("min {:.0} / max {:.0}", rate.min, rate.max),
                floor: format!(
                    "{:.0} spawns/s ({cores} workers, before each run)",
                    pfloor.p50
                ),
                ratio: format!(
                    "{:.0}% (runs: {:.0}–{:.0}%)",
                    fr.p50 * 100.0,
                    fr.min * 100.0,
                    fr.max * 100.0
                ),
                target: "below jobrelay's ratio".into(),
                met: yes(fr.p50 < fraction),
            });
        }
        for (peer, reason) in &skipped {
            peer_docs.insert(peer.name().into(), json!({"skipped": reason}));
            rows.push(peer_skipped_row(peer, reason));
        }
        if !peer_docs.is_empty() {
            doc["throughput"]["peers"] = Value::Object(peer_docs);
        }
        rows.push(Row {
            section: "3".into(),
            what: "throughput: CPU per job, server / client / supervisors + bash (what the client started) / harness"
                .into(),
            value: format!("{server_ms:.2} / {client_ms:.2} / {bash_ms:.2} / {bench_ms:.2} ms"),
            spread: format!(
                "{:.2} ms in all",
                server_ms + client_ms + bash_ms + bench_ms
            ),
            floor: format!("{:.2} ms CPU per `bash run.sh`", 1e3 * floor_cpu),
            ratio: format!(
                "{:.1}x",
                (server_ms + client_ms + bash_ms + bench_ms) / (1e3 * floor_cpu)
            ),
            target: "".into(),
            met: "".into(),
        });
    }
    if args.wants("idle") {
        // Let the last releases and probes settle, then measure.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let procs: Vec<&Proc> = std::iter::once(&setup.server)
            .chain(setup.clients.iter())
            .collect();
        let before: Vec<f64> = procs
            .iter()
            .map(|p| p.cpu_seconds())
            .collect::<anyhow::Result<_>>()?;
        tokio::time::sleep(Duration::from_secs(counts.idle_secs)).await;
        let after: Vec<f64> = procs
            .iter()
            .map(|p| p.cpu_seconds())
            .collect::<anyhow::Result<_>>()?;
        let scale = 30.0 / counts.idle_secs as f64;
        let mut out = serde_json::Map::new();
        for (i, p) in procs.iter().enumerate() {
            let used = after[i] - before[i];
            let per30 = used * scale;
            out.insert(
                p.name.clone(),
                json!({"cpu_s": used, "cpu_s_per_30s": per30}),
            );
            rows.push(Row {
                section: "5".into(),
                what: format!(
                    "idle: {} CPU over {} s, {jobs} finished jobs in the DB",
                    p.name, counts.idle_secs
                ),
                value: format!("{used:.2} s"),
                spread: format!("{per30:.2} s per 30 s"),
                floor: "0 s".into(),
                ratio: format!("{:.2}% of a core", used / counts.idle_secs as f64 * 100.0),
                target: "< 0.1 s per 30 s".into(),
                met: yes(per30 < 0.1),
            });
        }
        doc["idle"] = json!({"seconds": counts.idle_secs, "finished_jobs": jobs, "procs": out});
    }
    drop(setup);
    Ok(())
}

/// One run of a peer: its rate and the floor's rate measured right before it.
struct PeerSample {
    rate: f64,
    floor_rate: f64,
    cpu: Option<(f64, f64)>,
    jobs: usize,
}

fn peer_skipped_row(peer: &peers::Peer, reason: &str) -> Row {
    Row {
        section: "3".into(),
        what: format!("throughput, peer {}: skipped ({reason})", peer.name()),
        value: "—".into(),
        spread: "".into(),
        floor: "".into(),
        ratio: "".into(),
        target: "".into(),
        met: "".into(),
    }
}

/// Measurement 4: Peak RSS of server and client while a large input is uploaded, run (the job writes
/// an output as large) and downloaded.
async fn memory(
    env: &Env,
    counts: &Counts,
    rows: &mut Vec<Row>,
    doc: &mut Value,
) -> anyhow::Result<()> {
    let size = counts.memory_bytes;
    let limit = (size * 2 + (64 << 20)).to_string();
    let setup = env
        .setup(
            "memory",
            1,
            &["--max-upload", &limit],
            5,
            10,
            &["--max-upload", &limit],
        )
        .await?;
    let server = setup.server.url.clone();
    let base_server = setup.server.hwm_bytes()?;
    let base_client = setup.clients[0].hwm_bytes()?;
    // Incompressible input and output (the client deflates what shrinks, which would make
    // the ZIP tiny and the measurement meaningless): /dev/urandom out, a 1 MiB block of noise
    // repeated in (deflate finds no repeat farther than 32 KiB back).
    let script = format!("head -c {size} /dev/urandom > output.bin\n");
    // The input is generated as it is sent: the harness holds no copy.
    const CHUNK: usize = 1 << 20;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise = bytes::Bytes::from(
        (0..CHUNK)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect::<Vec<u8>>(),
    );
    let chunks = size.div_ceil(CHUNK as u64);
    let body = futures_util::stream::iter((0..chunks).map(move |i| {
        let len = (size - i * CHUNK as u64).min(CHUNK as u64) as usize;
        Ok::<_, std::io::Error>(noise.slice(..len))
    }));
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(script.into_bytes()).file_name("run.sh"),
        )
        .part(
            "file",
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(body), size)
                .file_name("input.bin"),
        )
        .text("user_id", "1")
        .text("service", "bench");
    let start = Instant::now();
    let response = env
        .http
        .post(format!("{server}/upload"))
        .multipart(form)
        .timeout(Duration::from_secs(3600))
        .send()
        .await?;
    if response.status() != 201 {
        bail!("large upload refused: {}", response.text().await?);
    }
    let id = response.json::<Value>().await?["id"]
        .as_i64()
        .context("no id")?;
    let zip = env
        .follow_and_download(&server, id, Duration::from_secs(3600))
        .await?;
    let secs = start.elapsed().as_secs_f64();
    if zip < 2 * size {
        bail!("the result ZIP has {zip} bytes, less than input and output");
    }
    let peak_server = setup.server.hwm_bytes()? as f64;
    let peak_client = setup.clients[0].hwm_bytes()? as f64;
    doc["memory"] = json!({
        "input_bytes": size, "output_bytes": size, "zip_bytes": zip, "seconds": secs,
        "server_vmhwm_bytes": peak_server, "client_vmhwm_bytes": peak_client,
        "server_vmhwm_before_bytes": base_server, "client_vmhwm_before_bytes": base_client,
    });
    for (name, peak, base) in [
        ("server", peak_server, base_server),
        ("client", peak_client, base_client),
    ] {
        rows.push(Row {
            section: "4".into(),
            what: format!(
                "memory: {name} peak RSS (VmHWM), {} in, {} out, {} ZIP down, {:.1} s",
                mib(size as f64),
                mib(size as f64),
                mib(zip as f64),
                secs
            ),
            value: mib(peak),
            spread: format!("{} before the job", mib(base as f64)),
            floor: mib(base as f64),
            ratio: format!("+{}", mib(peak - base as f64)),
            target: "< 64 MiB".into(),
            met: yes(peak < 64.0 * 1024.0 * 1024.0),
        });
    }
    drop(setup);
    Ok(())
}

/// Measurement 6: A backlog of queued jobs: time to enqueue it over HTTP and server RSS (real
/// processes; the service's client runs long jobs so the backlog stays), and the time of one
/// scheduling decision with that backlog, by calling the scheduler in-process.
async fn queue_scale(
    env: &Env,
    counts: &Counts,
    floor_s: f64,
    rows: &mut Vec<Row>,
    doc: &mut Value,
) -> anyhow::Result<()> {
    let n = counts.queue_jobs;
    let users = counts.queue_users;
    // Scheduling decisions in-process, with a small and the full backlog.
    let small = decision_time(counts.sched_small, users.min(counts.sched_small), 8);
    let large = decision_time(n, users, 8);
    let ratio = large.p50 / small.p50;
    doc["scheduling_decision"] = json!({
        "users": users, "clients": 8, "max_runs": 10,
        "small": {"queued": counts.sched_small, "seconds": small.json()},
        "large": {"queued": n, "seconds": large.json()},
        "large_over_small": ratio,
    });
    rows.push(Row {
        section: "6".into(),
        what: format!(
            "queue: one scheduling decision (finish one + decide), {n} queued, {users} users, 8 clients"
        ),
        value: format!("{:.2} µs", large.p50 * 1e6),
        spread: format!("p90 {:.2} / p99 {:.2} µs", large.p90 * 1e6, large.p99 * 1e6),
        floor: format!("{:.2} µs with {} queued", small.p50 * 1e6, counts.sched_small),
        ratio: format!("{ratio:.2}x"),
        target: "independent of backlog".into(),
        met: yes(ratio < 2.0),
    });

    // Enqueue over HTTP into a service with max_runs 10; the 10 jobs sent run long.
    let setup = env
        .setup("queue", 1, &["--slots", "10"], 5, 10, &[])
        .await?;
    let server = setup.server.url.clone();
    let shared = share(env);
    let uploaders = 16;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..uploaders {
        let (env, server, next) = (shared.clone(), server.clone(), next.clone());
        tasks.spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                env.0
                    .upload(
                        &server,
                        (i % users) as i64 + 1,
                        vec![("run.sh", b"sleep 300\n".to_vec())],
                    )
                    .await?;
                times.push((i, t.elapsed().as_secs_f64()));
            }
            Ok::<_, anyhow::Error>(times)
        });
    }
    let mut times = Vec::new();
    while let Some(done) = tasks.join_next().await {
        times.extend(done??);
    }
    let secs = start.elapsed().as_secs_f64();
    times.sort_by_key(|t| t.0);
    let k = (n / 10).max(1);
    let first = Summary::of(&times[..k].iter().map(|t| t.1).collect::<Vec<_>>());
    let last = Summary::of(&times[n - k..].iter().map(|t| t.1).collect::<Vec<_>>());
    let rss = setup.server.rss_bytes()? as f64;
    let hwm = setup.server.hwm_bytes()? as f64;
    // A status read with the backlog.
    let t = Instant::now();
    env.http
        .get(format!("{server}/jobs/{}", n / 2))
        .send()
        .await?
        .error_for_status()?;
    let read = t.elapsed().as_secs_f64();
    doc["queue"] = json!({
        "jobs": n, "users": users, "uploaders": uploaders, "seconds": secs,
        "uploads_per_s": n as f64 / secs,
        "upload_seconds_first_tenth": first.json(), "upload_seconds_last_tenth": last.json(),
        "server_rss_bytes": rss, "server_vmhwm_bytes": hwm, "status_read_seconds": read,
    });
    rows.push(Row {
        section: "6".into(),
        what: format!("queue: enqueue {n} jobs from {users} users over HTTP, {uploaders} uploaders (max_runs 10)"),
        value: format!("{:.1} s ({:.0} jobs/s)", secs, n as f64 / secs),
        spread: format!(
            "upload p50 {} first tenth, {} last tenth",
            ms(first.p50),
            ms(last.p50)
        ),
        floor: ms(floor_s),
        ratio: format!("{:.1}x floor per upload (p50, last tenth)", last.p50 / floor_s),
        target: "".into(),
        met: "".into(),
    });
    rows.push(Row {
        section: "6".into(),
        what: format!("queue: server RSS with {n} queued"),
        value: mib(rss),
        spread: format!("VmHWM {}", mib(hwm)),
        floor: "".into(),
        ratio: "".into(),
        target: "".into(),
        met: "".into(),
    });
    drop(setup);
    Ok(())
}

/// Median time of "one job finishes, the scheduler decides the next" with `queued` jobs of
/// `users` users queued in a service with max_runs 10 over `clients` clients of 2 slots.
fn decision_time(queued: usize, users: usize, clients: usize) -> Summary {
    let mut sched = Scheduler::new();
    let ids: Vec<usize> = (0..clients).map(|_| sched.add_client()).collect();
    for &c in &ids {
        sched.set_client(c, true, Some(2), 0.0);
    }
    let service = sched.add_service(5, 10, ids);
    for j in 0..queued {
        sched.enqueue(
            service,
            (j % users.max(1)) as i64,
            j as i64,
            jobrelay_server::scheduler::Ask::default(),
        );
    }
    let mut active: std::collections::VecDeque<i64> =
        sched.decide().into_iter().map(|d| d.job).collect();
    let rounds = (queued / 2).clamp(1, 20_000);
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let Some(done) = active.pop_front() else {
            break;
        };
        let t = Instant::now();
        sched.finish(done);
        let decisions = sched.decide();
        samples.push(t.elapsed().as_secs_f64());
        active.extend(decisions.into_iter().map(|d| d.job));
    }
    Summary::of(&samples)
}

/// Measurement 6 with issue 15's scheduler: fair share on, jobs of mixed sizes (1 to 4
/// cores, some memory) and priorities, users of different weights, clients advertising
/// their resources, the clock moving on each round. The median over `--runs` runs of the
/// median decision, with a small and the full backlog.
fn fair_share_scale(counts: &Counts, rows: &mut Vec<Row>, doc: &mut Value) {
    use jobrelay_server::scheduler::Policy;
    let (n, users) = (counts.queue_jobs, counts.queue_users);
    let fair = Policy::FairShare { half_life_s: 3600 };
    // The same users with a tenth of the backlog: the decision must not grow with the jobs
    // queued (fewer jobs than users would measure users leaving the queue instead).
    let tenth = (n / 10).max(users);
    let (mut fair_large, mut fair_tenth, mut round_robin) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..counts.runs.max(1) {
        fair_large.push(policy_decision_time(fair, n, users, run));
        fair_tenth.push(policy_decision_time(fair, tenth, users, run));
        round_robin.push(policy_decision_time(Policy::RoundRobin, n, users, run));
    }
    let median = |mut v: Vec<Summary>| {
        v.sort_by(|a, b| a.p50.total_cmp(&b.p50));
        v.swap_remove(v.len() / 2)
    };
    let (large, tenth_s, rr) = (median(fair_large), median(fair_tenth), median(round_robin));
    let backlog_ratio = large.p50 / tenth_s.p50;
    let policy_ratio = large.p50 / rr.p50;
    doc["scheduling_decision_fair_share"] = json!({
        "users": users, "clients": 8, "max_runs": 10, "runs": counts.runs.max(1),
        "tenth": {"queued": tenth, "seconds": tenth_s.json()},
        "large": {"queued": n, "seconds": large.json()},
        "round_robin_large": {"queued": n, "seconds": rr.json()},
        "large_over_tenth": backlog_ratio,
        "over_round_robin": policy_ratio,
    });
    let what = format!(
        "queue: one scheduling decision, fair share, mixed sizes and priorities, {n} queued, {users} users, 8 clients"
    );
    rows.push(Row {
        section: "6".into(),
        what: what.clone(),
        value: format!("{:.2} µs", large.p50 * 1e6),
        spread: format!("p90 {:.2} / p99 {:.2} µs", large.p90 * 1e6, large.p99 * 1e6),
        floor: format!("{:.2} µs with {tenth} queued", tenth_s.p50 * 1e6),
        ratio: format!("{backlog_ratio:.2}x"),
        target: "independent of backlog (< 2x)".into(),
        met: yes(backlog_ratio < 2.0),
    });
    rows.push(Row {
        section: "6".into(),
        what: format!("{what}, against round-robin on the same backlog"),
        value: format!("{:.2} µs", large.p50 * 1e6),
        spread: String::new(),
        floor: format!("{:.2} µs round-robin", rr.p50 * 1e6),
        ratio: format!("{policy_ratio:.2}x"),
        target: "within 2x of round-robin (issue 15)".into(),
        met: yes(policy_ratio <= 2.0),
    });
}

/// One decision (a job ends, the next are decided) under `policy`, with `queued` jobs of
/// mixed sizes and priorities from `users` users (weights 1, 2, 3) waiting.
fn policy_decision_time(
    policy: jobrelay_server::scheduler::Policy,
    queued: usize,
    users: usize,
    seed: usize,
) -> Summary {
    use jobrelay_server::scheduler::{Ask, Capacity};
    let mut sched = Scheduler::new();
    let mut now = 1.0e9;
    sched.set_time(now);
    let ids: Vec<usize> = (0..8).map(|_| sched.add_client()).collect();
    for &c in &ids {
        sched.set_client(c, true, Some(16), 0.0);
        let capacity = Capacity {
            cores: 8,
            memory_mb: 32_768,
            gpus: 0,
        };
        sched.set_client_capacity(c, Some(capacity));
    }
    let service = sched.add_service(5, 10, ids);
    sched.set_policy(service, policy);
    sched.set_reserve_after(service, Some(600.0));
    let users = users.max(1);
    for u in 0..users {
        sched.set_weight(u as i64, [1.0, 2.0, 3.0][u % 3]);
    }
    // A fixed mix from a simple generator: sizes and priorities vary, the backlog does not
    // depend on the run.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ seed as u64;
    let mut next = move |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    for j in 0..queued {
        let ask = Ask {
            cores: [1, 1, 2, 4][next(4) as usize],
            memory_mb: [0, 512, 2048][next(3) as usize],
            gpus: 0,
            priority: next(5) as i64 - 2,
        };
        sched.enqueue(service, (j % users) as i64, j as i64, ask);
    }
    let mut active: std::collections::VecDeque<i64> =
        sched.decide().into_iter().map(|d| d.job).collect();
    let rounds = (queued / 2).clamp(1, 20_000);
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let Some(done) = active.pop_front() else {
            break;
        };
        now += 1.0;
        let t = Instant::now();
        sched.set_time(now);
        sched.finish(done);
        let decisions = sched.decide();
        samples.push(t.elapsed().as_secs_f64());
        active.extend(decisions.into_iter().map(|d| d.job));
    }
    Summary::of(&samples)
}

/// Measurement 7: One server, several clients on this machine, short jobs (sleep 50 ms): makespan
/// against the ideal jobs × 50 ms / slots.
async fn many_clients(
    env: &Env,
    counts: &Counts,
    rows: &mut Vec<Row>,
    doc: &mut Value,
) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slots = cores * counts.clients;
    let jobs = counts.client_jobs;
    let shared = share(env);
    let mut fractions = Vec::new();
    let mut spans = Vec::new();
    let ideal = jobs as f64 * 0.05 / slots as f64;
    for _ in 0..counts.runs {
        let setup = env
            .setup("clients", counts.clients, &[], slots, slots, &[])
            .await?;
        let server = setup.server.url.clone();
        // Every client known to the server before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let span = many_jobs(&shared, &server, jobs, 16, b"sleep 0.05\n").await?;
        spans.push(span);
        fractions.push(ideal / span);
        drop(setup);
    }
    let f = Summary::of(&fractions);
    let s = Summary::of(&spans);
    doc["many_clients"] = json!({
        "clients": counts.clients, "slots": slots, "jobs": jobs, "runs": counts.runs,
        "ideal_s": ideal, "makespan_s": s.json(), "ideal_over_makespan": f.json(),
    });
    rows.push(Row {
        section: "7".into(),
        what: format!(
            "many clients: {} clients × {cores} slots, {jobs} jobs of `sleep 0.05`, makespan",
            counts.clients
        ),
        value: format!("{:.2} s", s.p50),
        spread: format!("min {:.2} / max {:.2} s", s.min, s.max),
        floor: format!("{ideal:.2} s ideal"),
        ratio: format!("{:.0}% of ideal", f.p50 * 100.0),
        target: "".into(),
        met: "".into(),
    });
    Ok(())
}

/// Uploads `files` as one job of `user` to `service` on `server`; its id (an answer other
/// than 201 is an error). Every scenario's uploads go through here.
pub async fn upload_files(
    http: &reqwest::Client,
    server: &str,
    user: i64,
    service: &str,
    files: Vec<(&str, Vec<u8>)>,
) -> anyhow::Result<i64> {
    let mut form = reqwest::multipart::Form::new();
    for (name, content) in files {
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(content).file_name(name.to_owned()),
        );
    }
    let form = form
        .text("user_id", user.to_string())
        .text("service", service.to_owned());
    let response = http
        .post(format!("{server}/upload"))
        .multipart(form)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if status != 201 {
        bail!("upload refused ({status}): {body}");
    }
    body["id"].as_i64().context("no id in the upload answer")
}
