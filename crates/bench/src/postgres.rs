//! Trivial jobs on PostgreSQL against SQLite in the same run (issue 14): one server and one
//! client per database, the same latency (one job at a time: upload, then `GET
//! /download/{id}?wait=` until the ZIP) and throughput (jobs from 16 users at once) on each,
//! and where PostgreSQL's extra cost per job goes: the server's CPU, the PostgreSQL backends'
//! CPU (read from `/proc` of the backends serving the server, on this machine) and the
//! transactions committed per job (`pg_stat_database`). Needs a PostgreSQL URL (`--postgres`,
//! else `JOBRELAY_BENCH_POSTGRES` or `JOBRELAY_TEST_POSTGRES`); the run makes a schema of
//! its own there and drops it. Without one the figures are skipped, with the reason.

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
}

/// [`run`] with the harness's arguments: its binary, a scratch directory of its own, its
/// counts (`--latency-jobs`, `--throughput-jobs`; small with `--quick`).
pub async fn run_for(args: &crate::Args) -> anyhow::Result<(Vec<Row>, Value)> {
    let binary = crate::procs::find_jobrelay(args.jobrelay.clone())?;
    let scratch = tempfile::Builder::new()
        .prefix("jobrelay-bench-pg-")
        .tempdir()?;
    let (latency, throughput) = if args.quick { (20, 100) } else { (200, 2_000) };
    run(
        &binary,
        scratch.path(),
        args.postgres.as_deref(),
        args.latency_jobs.unwrap_or(latency),
        args.throughput_jobs.unwrap_or(throughput),
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
    let schema = format!("bench_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await?;
    let glue = if url.contains('?') { '&' } else { '?' };
    let server_url = format!("{url}{glue}options=-c%20search_path%3D{schema}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()?;
    let sqlite = measure(
        binary,
        &root.join("pg-sqlite"),
        &http,
        None,
        latency_jobs,
        throughput_jobs,
    )
    .await;
    let postgres = measure(
        binary,
        &root.join("pg-postgres"),
        &http,
        Some((&server_url, &admin)),
        latency_jobs,
        throughput_jobs,
    )
    .await;
    admin
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await?;
    let (sqlite, postgres) = (sqlite?, postgres?);
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
        format!("throughput, {throughput_jobs} trivial jobs from {USERS} users, PostgreSQL (floor: SQLite)"),
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
    if let Some(cpu) = postgres.backend_cpu_per_job {
        rows.push(row(
            "PostgreSQL backends' CPU per job (the server's connections)".into(),
            ms(cpu),
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
        })
    };
    Ok((
        rows,
        json!({ "sqlite": doc(&sqlite), "postgres": doc(&postgres) }),
    ))
}

/// One server (on SQLite, or on `postgres` = (server URL, admin connection)) and one client
/// with 8 slots: the latency of `latency_jobs` jobs one at a time, then the throughput of
/// `throughput_jobs` jobs.
async fn measure(
    binary: &Path,
    dir: &Path,
    http: &reqwest::Client,
    postgres: Option<(&str, &tokio_postgres::Client)>,
    latency_jobs: usize,
    throughput_jobs: usize,
) -> anyhow::Result<Figures> {
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
    let mut server_args: Vec<String> = vec![
        "server".into(),
        "--port".into(),
        "0".into(),
        "--data-dir".into(),
        dir.join("server").display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    if let Some((url, _)) = postgres {
        server_args.extend(["--db".into(), url.to_owned()]);
    }
    let server = Proc::start(binary, &server_args, &dir.join("server.log"), "server")?;
    let base = server.url.clone();
    // Warm up: connections made, the client probed.
    for _ in 0..5 {
        round_trip(http, &base, 1).await?;
    }
    let mut samples = Vec::with_capacity(latency_jobs);
    for n in 0..latency_jobs {
        let started = Instant::now();
        round_trip(http, &base, 1 + (n as i64 % USERS)).await?;
        samples.push(started.elapsed().as_secs_f64());
    }
    let latency = Summary::of(&samples);

    let backends = match postgres {
        Some((_, admin)) => Some(backend_pids(admin).await?),
        None => None,
    };
    let backend_cpu = |pids: &[u32]| {
        pids.iter()
            .filter_map(|p| cpu_seconds(*p).ok())
            .sum::<f64>()
    };
    let backend_before = backends.as_deref().map(backend_cpu);
    let commits_before = match postgres {
        Some((_, admin)) => Some(commits(admin).await?),
        None => None,
    };
    let server_cpu = cpu_seconds(server.pid)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let (http, base) = (http.clone(), base.clone());
        let share = throughput_jobs / USERS as usize
            + usize::from((u as usize) < throughput_jobs % USERS as usize);
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
    let server_cpu_after = cpu_seconds(server.pid)?;
    let jobs = throughput_jobs.max(1) as f64;
    let backend_cpu_per_job = match (&backends, backend_before) {
        (Some(pids), Some(before)) => Some((backend_cpu(pids) - before) / jobs),
        _ => None,
    };
    let commits_per_job = match (postgres, commits_before) {
        (Some((_, admin)), Some(before)) => Some((commits(admin).await? - before) as f64 / jobs),
        _ => None,
    };
    drop(server);
    drop(client);
    Ok(Figures {
        latency,
        jobs_per_s: throughput_jobs as f64 / elapsed,
        server_cpu_per_job: (server_cpu_after - server_cpu) / jobs,
        backend_cpu_per_job,
        commits_per_job,
    })
}

/// The pids of the PostgreSQL backends serving a jobrelay server (its pool's connections).
async fn backend_pids(admin: &tokio_postgres::Client) -> anyhow::Result<Vec<u32>> {
    let rows = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'jobrelay'",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
}

/// Transactions committed in the database so far (all its sessions; the run is alone there
/// but for this admin connection's own few).
async fn commits(admin: &tokio_postgres::Client) -> anyhow::Result<i64> {
    // Statistics are a snapshot per transaction: a fresh one each time.
    admin
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await?;
    let row = admin
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

async fn upload(http: &reqwest::Client, base: &str, user: i64) -> anyhow::Result<i64> {
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(TRIVIAL.to_vec()).file_name("run.sh"),
        )
        .text("user_id", user.to_string())
        .text("service", "bench");
    let response = http
        .post(format!("{base}/upload"))
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
