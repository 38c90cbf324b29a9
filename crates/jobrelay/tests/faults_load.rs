//! Load: many concurrent uploaders against one server with two clients, and thousands of
//! idle connections held open. Both `--ignored` (slow); .ci/run runs them.
//! `JOBRELAY_LOAD_UPLOADERS` (200), `JOBRELAY_LOAD_SECS` (60) and `JOBRELAY_LOAD_PAUSE_MS`
//! (2,000, between two uploads of one uploader) scale the first,
//! `JOBRELAY_IDLE_CONNECTIONS` (10,000) the second.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::net::addr_of;
use support::server::*;
use support::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 60 s of load; .ci/run runs it"]
async fn concurrent_uploaders_for_a_minute_lose_nothing_in_bounded_memory() {
    let uploaders = env_or("JOBRELAY_LOAD_UPLOADERS", 200);
    let secs = env_or("JOBRELAY_LOAD_SECS", 60);
    let pause = Duration::from_millis(env_or("JOBRELAY_LOAD_PAUSE_MS", 2000));
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = start_client(root, "a", &["--slots", "4"]);
    let b = start_client(root, "b", &["--slots", "4"]);
    let config = write_server_config(
        root,
        &[("example", vec![a.url.clone(), b.url.clone()], 5, 8)],
    );
    let server = TestServer::start(root, &config, &[]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(uploaders as usize)
        .build()
        .unwrap();

    let errors = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(secs);
    let sampler = {
        let peak = peak_rss.clone();
        let pid = server.pid();
        tokio::spawn(async move {
            while Instant::now() < stop_at {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for u in 0..uploaders {
        let (http, url, errors) = (http.clone(), server.url.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 0u64;
            while Instant::now() < stop_at {
                let script = format!("echo u{u}n{n} > out.txt\n");
                let form = files_form(&[("run.sh", script.as_bytes())])
                    .text("user_id", (1 + u % 50).to_string())
                    .text("service", "example");
                match http
                    .post(format!("{url}/upload"))
                    .multipart(form)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 201 => {
                        let body: serde_json::Value = r.json().await.unwrap();
                        ids.push((body["id"].as_i64().unwrap(), format!("u{u}n{n}")));
                    }
                    Ok(r) => {
                        eprintln!("upload answered {}", r.status());
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("upload failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
                // Each uploader is a user's web platform, not a tight loop: one job every
                // `JOBRELAY_LOAD_PAUSE_MS` (2 s), so 200 of them send 100 jobs a second,
                // more than two clients run on two cores; the queue grows all minute.
                tokio::time::sleep(pause).await;
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    sampler.await.unwrap();
    let uploaded = all.len();
    let load_peak = peak_rss.load(Ordering::Relaxed);

    // Every job accounted for: all Completed in the end, each with its own output.
    let drain = Instant::now();
    let deadline = Duration::from_secs(900);
    let total = |status: &'static str| {
        let http = http.clone();
        let url = server.url.clone();
        async move {
            let filter = if status.is_empty() {
                String::new()
            } else {
                format!("&status={status}")
            };
            let list: serde_json::Value = http
                .get(format!("{url}/jobs?limit=1{filter}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list["total"].as_i64().unwrap() as usize
        }
    };
    assert_eq!(
        total("").await,
        uploaded,
        "the server has exactly the jobs it accepted"
    );
    loop {
        let completed = total("Completed").await;
        if completed == uploaded {
            break;
        }
        assert!(
            drain.elapsed() < deadline,
            "{} of {uploaded} jobs not Completed after {deadline:?}",
            uploaded - completed
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let drained_in = drain.elapsed();
    // Spot-check results: every 50th job's ZIP holds its own output.
    for (id, name) in all.iter().step_by(50) {
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("{name}\n").as_bytes());
    }
    let errors = errors.load(Ordering::Relaxed);
    eprintln!(
        "load: {uploaders} uploaders x {secs}s: {uploaded} jobs uploaded, {errors} errors, \
         all Completed {:.1}s after the load ended, server peak RSS during load {} MiB (VmHWM {} MiB)",
        drained_in.as_secs_f64(),
        load_peak / 1024,
        server.peak_rss_kib() / 1024
    );
    assert_eq!(errors, 0, "no error other than waiting in the queue");
    assert!(
        server.peak_rss_kib() < 512 * 1024,
        "server memory bounded: {} KiB",
        server.peak_rss_kib()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: thousands of connections; .ci/run runs it"]
async fn ten_thousand_idle_connections_do_not_stop_new_ones() {
    let wanted = env_or("JOBRELAY_IDLE_CONNECTIONS", 10_000) as usize;
    let limit = raise_fd_limit();
    if (limit as usize) < wanted + 500 {
        eprintln!("skipped: open-file limit {limit} is below {wanted} connections");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(root, &config, &[]);
    let addr = addr_of(&server.url);
    let http = http();

    let begin = Instant::now();
    let mut idle = Vec::with_capacity(wanted);
    for _ in 0..wanted {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let opened_in = begin.elapsed();
    // With all of them open (and not one byte sent), the server still answers new requests.
    let health = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo ok > out.txt\n")],
    )
    .await;
    wait_status(
        &http,
        &server.url,
        id,
        &["Completed"],
        Duration::from_secs(120),
    )
    .await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"ok\n");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!(
        "idle: {wanted} connections opened in {:.1}s; server holds {fds} descriptors and still serves; RSS {} MiB",
        opened_in.as_secs_f64(),
        rss_kib(server.pid()) / 1024
    );
    assert!(fds >= wanted, "the server holds them all: {fds}");
    drop(idle);
}
