//! Issue 16's figure: trivial jobs through a joined client (`jobrelay client --connect`,
//! served through its tunnels) against a pushed one, in the same run and on the same server:
//! one service per kind, one client each with the same slots.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use crate::procs::{find_jobrelay, Proc};
use crate::stats::{ms, Row, Summary};
use crate::Args;

const TRIVIAL: &[u8] = b"echo hello > out.txt\n";
const JOIN_TOKEN: &str = "bench-join-token-0123456789abcdef";
const SLOTS: &str = "4";

struct Counts {
    latency_jobs: usize,
    throughput_jobs: usize,
    in_flight: usize,
}

/// Latency (upload → ZIP, one job at a time, the two kinds alternating) and throughput (a
/// batch uploaded at once, then followed) of both kinds.
pub async fn run(args: &Args) -> anyhow::Result<(Vec<Row>, Value)> {
    let counts = if args.quick {
        Counts {
            latency_jobs: 20,
            throughput_jobs: 100,
            in_flight: 16,
        }
    } else {
        Counts {
            latency_jobs: args.latency_jobs.unwrap_or(200),
            throughput_jobs: args.throughput_jobs.unwrap_or(2_000),
            in_flight: 32,
        }
    };
    let binary = find_jobrelay(args.jobrelay.clone())?;
    let dir = tempfile::Builder::new()
        .prefix("jobrelay-bench-pull-")
        .tempdir()?;
    let root = dir.path();
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()?;

    let start = |name: &str, args: Vec<String>| -> anyhow::Result<Proc> {
        Proc::start(&binary, &args, &root.join(format!("{name}.log")), name)
    };
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let pushed = start(
        "pushed",
        vec![
            "client".into(),
            "--port".into(),
            "0".into(),
            "--slots".into(),
            SLOTS.into(),
            "--data-dir".into(),
            path(&root.join("pushed")),
        ],
    )?;
    let token = root.join("join.token");
    std::fs::write(&token, JOIN_TOKEN)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    }
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.pushed]\nclients = [{:?}]\nruns_per_user = 1000\nmax_runs = 1000\n\n\
             [services.pulled]\njoin_token_file = {:?}\nruns_per_user = 1000\nmax_runs = 1000\n",
            pushed.url,
            path(&token)
        ),
    )?;
    let server = start(
        "server",
        vec![
            "server".into(),
            "--port".into(),
            "0".into(),
            "--data-dir".into(),
            path(&root.join("server")),
            "--config".into(),
            path(&config),
        ],
    )?;
    // `--port 0` only so the harness reads its "listening on" line; the server reaches it
    // through its tunnels.
    let _pulled = start(
        "pulled",
        vec![
            "client".into(),
            "--port".into(),
            "0".into(),
            "--slots".into(),
            SLOTS.into(),
            "--data-dir".into(),
            path(&root.join("pulled")),
            "--connect".into(),
            server.url.clone(),
            "--service".into(),
            "pulled".into(),
            "--join-token-file".into(),
            path(&token),
        ],
    )?;
    wait_healthy(&http, &server.url, 2).await?;

    // Warm up both paths (connections, tunnels).
    for _ in 0..5 {
        for service in ["pushed", "pulled"] {
            one_job(&http, &server.url, service).await?;
        }
    }
    let mut latency = [Vec::new(), Vec::new()];
    for _ in 0..counts.latency_jobs {
        for (i, service) in ["pushed", "pulled"].iter().enumerate() {
            let begin = Instant::now();
            one_job(&http, &server.url, service).await?;
            latency[i].push(begin.elapsed().as_secs_f64());
        }
    }
    let [push_latency, pull_latency] = latency.map(|s| Summary::of(&s));
    let mut rates = Vec::new();
    for service in ["pushed", "pulled"] {
        rates.push(throughput(&http, &server.url, service, &counts).await?);
    }
    let server_cpu = server.cpu_seconds()?;

    let rows = vec![
        Row {
            section: "16".into(),
            what: format!(
                "pull: latency upload → ZIP, pushed client ({} jobs, one at a time)",
                counts.latency_jobs
            ),
            value: ms(push_latency.p50),
            spread: format!(
                "p90 {} / p99 {}",
                ms(push_latency.p90),
                ms(push_latency.p99)
            ),
            floor: "—".into(),
            ratio: "".into(),
            target: "".into(),
            met: "".into(),
        },
        Row {
            section: "16".into(),
            what: "pull: latency upload → ZIP, joined client (tunnels)".into(),
            value: ms(pull_latency.p50),
            spread: format!(
                "p90 {} / p99 {}",
                ms(pull_latency.p90),
                ms(pull_latency.p99)
            ),
            floor: ms(push_latency.p50),
            ratio: format!("+{}", ms(pull_latency.p50 - push_latency.p50)),
            target: "a few ms more than pushed".into(),
            met: crate::stats::yes(pull_latency.p50 - push_latency.p50 < 0.005),
        },
        Row {
            section: "16".into(),
            what: format!(
                "pull: throughput, pushed / joined ({} jobs, {} in flight, {SLOTS} slots)",
                counts.throughput_jobs, counts.in_flight
            ),
            value: format!("{:.0} / {:.0} jobs/s", rates[0], rates[1]),
            spread: "".into(),
            floor: "".into(),
            ratio: format!("{:.2}x", rates[1] / rates[0]),
            target: "".into(),
            met: "".into(),
        },
    ];
    let doc = json!({
        "latency_pushed_s": push_latency.json(),
        "latency_joined_s": pull_latency.json(),
        "throughput_pushed_per_s": rates[0],
        "throughput_joined_per_s": rates[1],
        "server_cpu_s": server_cpu,
    });
    Ok((rows, doc))
}

async fn wait_healthy(http: &reqwest::Client, server: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clients: Vec<Value> = http
            .get(format!("{server}/clients"))
            .send()
            .await?
            .json()
            .await?;
        if clients.iter().filter(|c| c["healthy"] == true).count() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the clients never became healthy: {clients:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn upload(http: &reqwest::Client, server: &str, service: &str) -> anyhow::Result<i64> {
    crate::measure::upload_files(http, server, 1, service, vec![("run.sh", TRIVIAL.to_vec())]).await
}

/// Follows a job to its ZIP (`/download/{id}?wait=`).
async fn zip_of(http: &reqwest::Client, server: &str, id: i64) -> anyhow::Result<()> {
    loop {
        let response = http
            .get(format!("{server}/download/{id}?wait=30"))
            .send()
            .await?;
        let is_zip = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/zip");
        let body = response.bytes().await?;
        if is_zip {
            return Ok(());
        }
        let answer: Value = serde_json::from_slice(&body)?;
        if ["Failed", "Killed", "Invalid", "Cleaned"]
            .contains(&answer["status"].as_str().unwrap_or(""))
        {
            bail!("job {id} ended: {answer}");
        }
    }
}

async fn one_job(http: &reqwest::Client, server: &str, service: &str) -> anyhow::Result<()> {
    let id = upload(http, server, service).await?;
    zip_of(http, server, id).await
}

/// Jobs per second: `throughput_jobs` kept `in_flight` at a time, each uploaded and followed
/// to its ZIP.
async fn throughput(
    http: &reqwest::Client,
    server: &str,
    service: &str,
    counts: &Counts,
) -> anyhow::Result<f64> {
    use futures_util::StreamExt;
    let begin = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(0..counts.throughput_jobs)
        .map(|_| one_job(http, server, service))
        .buffer_unordered(counts.in_flight)
        .collect()
        .await;
    for result in results {
        result?;
    }
    Ok(counts.throughput_jobs as f64 / begin.elapsed().as_secs_f64())
}
