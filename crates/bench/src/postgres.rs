//! Trivial jobs on PostgreSQL against SQLite in the same run (issue 14): one server and one
//! client per database, both up at once and measured in turns, the same latency (one job at a
//! time: upload, then `GET /download/{id}?wait=` until the ZIP) and throughput (jobs from 16
//! users at once) on each,
//! and where PostgreSQL's extra cost per job goes: the server's CPU, the PostgreSQL backends'
//! CPU (read from `/proc` of the backends serving the server, on this machine) and the
//! transactions committed per job (`pg_stat_database`). Needs a PostgreSQL URL (`--postgres`,
//! else `JOBRELAY_BENCH_POSTGRES` or `JOBRELAY_TEST_POSTGRES`); the run makes a database of
//! its own there (so its statistics are its own) and drops it. Without one the figures are skipped, with the reason.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::procs::{cpu_seconds, Proc};
use crate::stats::{ms, Row, Summary};

const TRIVIAL: &[u8] = b"echo hello > out.txt\n";
const USERS: i64 = 16;

/// The URL to measure against, or why there is none.
pub fn url(given: Option<&str>) -> Result<String, String> {
    if let Some(url) = given {
        return Ok(url.to_owned());
    }
    for name in ["JOBRELAY_BENCH_POSTGRES", "JOBRELAY_TEST_POSTGRES"] {
        if let Ok(url) = std::env::var(name) {
            if !url.is_empty() {
                return Ok(url);
            }
        }
    }
    Err("no PostgreSQL: give --postgres URL (or JOBRELAY_BENCH_POSTGRES)".into())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// What one database gave.
struct Figures {
    latency: Summary,
    jobs_per_s: f64,
    server_cpu_per_job: f64,
    backend_cpu_per_job: Option<f64>,
    commits_per_job: Option<f64>,
    rows_per_job: Option<f64>,
}

/// [`run`] with the harness's arguments: its binary, a scratch directory of its own, its
/// counts (`--latency-jobs`, `--throughput-jobs`; small with `--quick`).
pub async fn run_for(args: &crate::Args) -> anyhow::Result<(Vec<Row>, Value)> {
    let binary = crate::procs::find_jobrelay(args.jobrelay.clone())?;
    let scratch = tempfile::Builder::new()
        .prefix("jobrelay-bench-pg-")
        .tempdir()?;
    let (latency, throughput, runs) = if args.quick {
        (20, 100, 1)
    } else {
        (200, 2_000, 3)
    };
    run(
        &binary,
        scratch.path(),
        args.postgres.as_deref(),
        args.latency_jobs.unwrap_or(latency),
        args.throughput_jobs.unwrap_or(throughput),
        args.runs.unwrap_or(runs).max(1),
    )
    .await
}

/// Measures both databases; the rows of the table and the JSON of the section.
pub async fn run(
    binary: &Path,
    root: &Path,
    given: Option<&str>,
    latency_jobs: usize,
    throughput_jobs: usize,
    runs: usize,
) -> anyhow::Result<(Vec<Row>, Value)> {
    let url = match url(given) {
        Ok(url) => url,
        Err(why) => {
            eprintln!("postgres: skipped: {why}");
            let row = Row {
                section: "PG".into(),
                what: "PostgreSQL against SQLite".into(),
                value: format!("skipped: {why}"),
                spread: String::new(),
                floor: String::new(),
                ratio: String::new(),
                target: String::new(),
                met: String::new(),
            };
            return Ok((vec![row], json!({ "skipped": why })));
        }
    };
    let admin = connect(&url).await?;
    // A database of its own: its statistics (pg_stat_database) and backends are the run's
    // alone, whatever else uses the same PostgreSQL server.
    let database = format!("jobrelay_bench_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await?;
    // The pair of servers gets a database of its own: on one database, every server is one
    // cluster's.
    let two = format!("{database}_two");
    for name in [&database, &two] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
    }
    let url_of = |name: &str| -> anyhow::Result<String> {
        let mut server_url = reqwest::Url::parse(&url).context("the PostgreSQL URL")?;
        server_url.set_path(&format!("/{name}"));
        Ok(server_url.to_string())
    };
    let server_url = url_of(&database)?;
    let two_url = url_of(&two)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()?;
    let measured = measure_both(
        binary,
        root,
        &http,
        (&server_url, &two_url, &admin, &database),
        latency_jobs,
        throughput_jobs,
        runs,
    )
    .await;
    for name in [&database, &two] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }
    let (sqlite, postgres, pair) = measured?;
    let mut rows = Vec::new();
    let row = |what: String, value: String, spread: String, base: String, ratio: String| Row {
        section: "PG".into(),
        what,
        value,
        spread,
        floor: base,
        ratio,
        target: String::new(),
        met: String::new(),
    };
    rows.push(row(
        format!("latency of one trivial job, PostgreSQL ({latency_jobs} jobs; floor: SQLite)"),
        ms(postgres.latency.p50),
        format!(
            "p90 {} / p99 {}",
            ms(postgres.latency.p90),
            ms(postgres.latency.p99)
        ),
        ms(sqlite.latency.p50),
        format!(
            "{:+.2} ms",
            (postgres.latency.p50 - sqlite.latency.p50) * 1e3
        ),
    ));
    rows.push(row(
        format!("throughput, {throughput_jobs} trivial jobs from {USERS} users, PostgreSQL (median of {runs} runs; floor: SQLite)"),
        format!("{:.0} jobs/s", postgres.jobs_per_s),
        String::new(),
        format!("{:.0} jobs/s", sqlite.jobs_per_s),
        format!("{:.2}x", postgres.jobs_per_s / sqlite.jobs_per_s),
    ));
    rows.push(row(
        "server CPU per job, PostgreSQL (floor: SQLite)".into(),
        ms(postgres.server_cpu_per_job),
        String::new(),
        ms(sqlite.server_cpu_per_job),
        format!(
            "{:+.2} ms",
            (postgres.server_cpu_per_job - sqlite.server_cpu_per_job) * 1e3
        ),
    ));
    rows.push(row(
        format!("latency of one trivial job, two servers on PostgreSQL, uploads turn by turn ({latency_jobs} jobs; floor: one server on PostgreSQL)"),
        ms(pair.latency.p50),
        format!("p90 {} / p99 {}", ms(pair.latency.p90), ms(pair.latency.p99)),
        ms(postgres.latency.p50),
        format!("{:+.2} ms", (pair.latency.p50 - postgres.latency.p50) * 1e3),
    ));
    rows.push(row(
        format!("throughput, {throughput_jobs} trivial jobs from {USERS} users over two servers on PostgreSQL (median of {runs} runs; floor: one server on PostgreSQL)"),
        format!("{:.0} jobs/s", pair.jobs_per_s),
        String::new(),
        format!("{:.0} jobs/s", postgres.jobs_per_s),
        format!("{:.2}x", pair.jobs_per_s / postgres.jobs_per_s),
    ));
    rows.push(row(
        "both servers' CPU per job, two servers on PostgreSQL (floor: one server)".into(),
        ms(pair.server_cpu_per_job),
        String::new(),
        ms(postgres.server_cpu_per_job),
        format!(
            "{:+.2} ms",
            (pair.server_cpu_per_job - postgres.server_cpu_per_job) * 1e3
        ),
    ));
    if let Some(cpu) = postgres.backend_cpu_per_job {
        rows.push(row(
            "PostgreSQL backends' CPU per job (the server's connections)".into(),
            ms(cpu),
            String::new(),
            "—".into(),
            String::new(),
        ));
    }
    if let Some(written) = postgres.rows_per_job {
        rows.push(row(
            "rows written (inserted, updated, deleted) per job on PostgreSQL".into(),
            format!("{written:.1}"),
            String::new(),
            "—".into(),
            String::new(),
        ));
    }
    if let Some(commits) = postgres.commits_per_job {
        rows.push(row(
            "transactions committed per job on PostgreSQL (throughput run)".into(),
            format!("{commits:.1}"),
            String::new(),
            "—".into(),
            String::new(),
        ));
    }
    let doc = |f: &Figures| {
        json!({
            "latency_s": f.latency.json(),
            "jobs_per_s": f.jobs_per_s,
            "server_cpu_s_per_job": f.server_cpu_per_job,
            "backend_cpu_s_per_job": f.backend_cpu_per_job,
            "commits_per_job": f.commits_per_job,
            "rows_written_per_job": f.rows_per_job,
        })
    };
    Ok((
        rows,
        json!({ "sqlite": doc(&sqlite), "postgres": doc(&postgres), "postgres_two_servers": doc(&pair) }),
    ))
}

/// A server (on SQLite, or on PostgreSQL) with its own client of 8 slots.
struct Side {
    servers: Vec<Proc>,
    _client: Proc,
    bases: Vec<String>,
}

impl Side {
    /// `servers` servers (more than one: on one PostgreSQL database and one data directory,
    /// a leader and standbys) with one client of 8 slots.
    fn start(binary: &Path, dir: &Path, db: Option<&str>, servers: usize) -> anyhow::Result<Side> {
        std::fs::create_dir_all(dir)?;
        let client_args: Vec<String> = ["client", "--port", "0", "--slots", "8", "--data-dir"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.join("client").display().to_string()])
            .collect();
        let client = Proc::start(binary, &client_args, &dir.join("client.log"), "client")?;
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[services.bench]\nclients = [{:?}]\nruns_per_user = 8\nmax_runs = 8\n",
                client.url
            ),
        )?;
        let mut started = Vec::new();
        for n in 0..servers {
            let mut server_args: Vec<String> = vec![
                "server".into(),
                "--port".into(),
                "0".into(),
                "--data-dir".into(),
                dir.join("server").display().to_string(),
                "--config".into(),
                config.display().to_string(),
            ];
            if let Some(url) = db {
                server_args.extend(["--db".into(), url.to_owned()]);
            }
            let log = dir.join(format!("server-{n}.log"));
            started.push(Proc::start(binary, &server_args, &log, "server")?);
        }
        Ok(Side {
            bases: started.iter().map(|s| s.url.clone()).collect(),
            servers: started,
            _client: client,
        })
    }

    /// The server the `n`-th request goes to: turn by turn, as a round-robin load balancer.
    fn base(&self, n: usize) -> &str {
        &self.bases[n % self.bases.len()]
    }

    fn server_cpu(&self) -> anyhow::Result<f64> {
        self.servers.iter().map(|s| cpu_seconds(s.pid)).sum()
    }

    /// `jobs` trivial jobs from 16 users at once, each user's on one server (turn by turn):
    /// (jobs per second, the servers' CPU seconds).
    async fn throughput(&self, http: &reqwest::Client, jobs: usize) -> anyhow::Result<(f64, f64)> {
        let cpu = self.server_cpu()?;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for u in 0..USERS {
            let (http, base) = (http.clone(), self.base(u as usize).to_owned());
            let share = jobs / USERS as usize + usize::from((u as usize) < jobs % USERS as usize);
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..share {
                    ids.push(upload(&http, &base, 1 + u).await?);
                }
                for id in ids {
                    follow(&http, &base, id).await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok((jobs as f64 / elapsed, self.server_cpu()? - cpu))
    }
}

/// The three set-ups at once, measured in turns so that the machine's drift falls on all
/// alike: latency samples alternate SQLite, PostgreSQL, two servers on PostgreSQL (their
/// uploads turn by turn over both), one job at a time; then throughput runs alternate the
/// same way. On PostgreSQL also the backends' CPU (by pid, from `/proc`) and
/// the transactions committed over its throughput runs.
async fn measure_both(
    binary: &Path,
    root: &Path,
    http: &reqwest::Client,
    (url, two_url, admin, database): (&str, &str, &tokio_postgres::Client, &str),
    latency_jobs: usize,
    throughput_jobs: usize,
    runs: usize,
) -> anyhow::Result<(Figures, Figures, Figures)> {
    let sqlite = Side::start(binary, &root.join("pg-sqlite"), None, 1)?;
    let postgres = Side::start(binary, &root.join("pg-postgres"), Some(url), 1)?;
    let pair = Side::start(binary, &root.join("pg-two-servers"), Some(two_url), 2)?;
    let sides = [&sqlite, &postgres, &pair];
    // Warm up: connections made, clients probed, a leader elected (requests to a standby
    // wait for it).
    for side in sides {
        for n in 0..6 {
            round_trip(http, side.base(n), 1).await?;
        }
    }
    let mut latency: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for n in 0..latency_jobs {
        for (i, side) in sides.iter().enumerate() {
            let started = Instant::now();
            round_trip(http, side.base(n), 1 + (n as i64 % USERS)).await?;
            latency[i].push(started.elapsed().as_secs_f64());
        }
    }
    let backends_before = backend_cpu(admin, database).await?;
    let commits_before = commits(admin, database).await?;
    let mut rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut cpu: [f64; 3] = [0.0, 0.0, 0.0];
    let mut pg_elapsed_jobs = 0usize;
    for _ in 0..runs {
        for (i, side) in sides.iter().enumerate() {
            let (rate, seconds) = side.throughput(http, throughput_jobs).await?;
            rates[i].push(rate);
            cpu[i] += seconds;
            if i == 1 {
                pg_elapsed_jobs += throughput_jobs;
            }
        }
    }
    let backends_after = backend_cpu(admin, database).await?;
    let commits_after = commits(admin, database).await?;
    // Every backend of the server's pool: CPU since the first look, or since it was opened.
    let backend_seconds: f64 = backends_after
        .iter()
        .map(|(pid, after)| after - backends_before.get(pid).copied().unwrap_or(0.0))
        .sum();
    let jobs = (throughput_jobs * runs).max(1) as f64;
    let median = |v: &[f64]| Summary::of(v).p50;
    let figures = |i: usize, pg: bool| Figures {
        latency: Summary::of(&latency[i]),
        jobs_per_s: median(&rates[i]),
        server_cpu_per_job: cpu[i] / jobs,
        backend_cpu_per_job: pg.then(|| backend_seconds / pg_elapsed_jobs.max(1) as f64),
        commits_per_job: pg
            .then(|| (commits_after.0 - commits_before.0) as f64 / pg_elapsed_jobs.max(1) as f64),
        rows_per_job: pg
            .then(|| (commits_after.1 - commits_before.1) as f64 / pg_elapsed_jobs.max(1) as f64),
    };
    Ok((figures(0, false), figures(1, true), figures(2, false)))
}

/// CPU seconds so far of each PostgreSQL backend serving a jobrelay server in `database`,
/// by pid.
async fn backend_cpu(
    admin: &tokio_postgres::Client,
    database: &str,
) -> anyhow::Result<std::collections::HashMap<u32, f64>> {
    let rows = admin
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE application_name = 'jobrelay' AND datname = $1",
            &[&database],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, i32>(0) as u32)
        .filter_map(|pid| cpu_seconds(pid).ok().map(|cpu| (pid, cpu)))
        .collect())
}

/// Transactions committed in `database` so far, and rows written (inserted, updated,
/// deleted): the run is alone there.
async fn commits(admin: &tokio_postgres::Client, database: &str) -> anyhow::Result<(i64, i64)> {
    // Statistics are a snapshot per transaction: a fresh one each time.
    admin
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await?;
    let row = admin
        .query_one(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted
             FROM pg_stat_database WHERE datname = $1",
            &[&database],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

async fn upload(http: &reqwest::Client, base: &str, user: i64) -> anyhow::Result<i64> {
    crate::measure::upload_files(
        http,
        base,
        user,
        "bench",
        vec![("run.sh", TRIVIAL.to_vec())],
    )
    .await
}

/// Waits for the job's ZIP (`/download/{id}?wait=`) and reads it.
async fn follow(http: &reqwest::Client, base: &str, id: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let response = http
            .get(format!("{base}/download/{id}?wait=30"))
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        let zip = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/zip"));
        let body = response.bytes().await?;
        if zip {
            return Ok(());
        }
        let job: Value = serde_json::from_slice(&body).unwrap_or_default();
        let status = job["status"].as_str().unwrap_or("");
        if ["Failed", "Invalid", "Killed", "Cleaned"].contains(&status) {
            bail!("job {id} ended {status}");
        }
        if Instant::now() > deadline {
            bail!("job {id} still {status} after 300 s");
        }
    }
}

async fn round_trip(http: &reqwest::Client, base: &str, user: i64) -> anyhow::Result<()> {
    let id = upload(http, base, user).await?;
    follow(http, base, id).await
}
