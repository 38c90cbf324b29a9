//! The server against its own faults: a background loop that panics (restarted, visible on
//! `/health` and in the metrics), connections pooled no longer than clients keep them, and a
//! cleaned job's timeline removed with its files.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::server::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(90);

async fn health(http: &reqwest::Client, server: &str) -> (u16, serde_json::Value) {
    let response = http.get(format!("{server}/health")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn metrics(http: &reqwest::Client, server: &str) -> String {
    let response = http.get(format!("{server}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

#[tokio::test]
async fn every_background_loop_that_panics_once_is_restarted_and_jobs_still_complete() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 2, 4)]);
    // The dispatcher panics holding the scheduler's lock: its poisoning must not matter.
    let server = TestServer::start_with_env(
        dir.path(),
        &config,
        &[],
        &[(
            "JOBRELAY_TEST_PANIC_ONCE",
            "dispatcher,collector,probe,janitor,integrity",
        )],
    );
    let http = http();
    let mut ids = Vec::new();
    for i in 0..3 {
        let script = format!("echo job {i} > out.txt\n");
        ids.push(
            upload_job(
                &http,
                &server.url,
                1,
                "example",
                &[("run.sh", script.as_bytes())],
            )
            .await,
        );
    }
    for id in ids {
        wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    }
    eventually(LONG, "/health to answer healthy", || async {
        (health(&http, &server.url).await.0 == 200).then_some(())
    })
    .await;
    let text = metrics(&http, &server.url).await;
    for kind in ["dispatcher", "collector", "probe", "janitor", "integrity"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("jobrelay_server_loop_restarts_total{")
                    && l.contains(&format!("loop=\"{kind}\""))
            })
            .unwrap_or_else(|| panic!("no restart counted for {kind}:\n{text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
    let log = server.log();
    assert!(
        log.contains("background loop stopped (it panicked: injected panic in the dispatcher loop"),
        "{log}"
    );
}

#[tokio::test]
async fn a_loop_that_keeps_panicking_makes_health_fail_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 2, 4)]);
    let server = TestServer::start_with_env(
        dir.path(),
        &config,
        &[],
        &[("JOBRELAY_TEST_PANIC_ALWAYS", "dispatcher")],
    );
    let http = http();
    let body = eventually(LONG, "/health to answer 503", || async {
        let (status, body) = health(&http, &server.url).await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["status"], "unhealthy");
    let why = body["message"].as_str().unwrap();
    assert!(why.contains("background loop dispatcher"), "{why}");
    // Everything else still answers.
    assert!(!metrics(&http, &server.url).await.is_empty());
}

#[tokio::test]
async fn a_cleaned_job_has_no_timeline_left_and_its_events_answer_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 2, 4)]);
    let server = TestServer::start(dir.path(), &config, &["--max-age", "1"]);
    let http = http();
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo hi\n")],
    )
    .await;
    let job = wait_status(&http, &server.url, id, &["Cleaned"], LONG).await;
    assert_eq!(job["id"], id);
    let response = http
        .get(format!("{}/jobs/{id}/events", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events: serde_json::Value = response.json().await.unwrap();
    assert_eq!(events, serde_json::json!([]), "events of a cleaned job");
    // The job itself still answers, Cleaned.
    let response = http
        .get(format!("{}/jobs/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Cleaned");
}

/// A stand-in for an executor client whose idle close always crosses the server's next
/// request, the worst case of that race: a request arriving on a connection idle for
/// `close_after` or more is dropped unanswered (as a client closing it at that moment would),
/// and counted. It speaks only the seed contract's `/health` (404 for `/info` and `/load`).
struct ClosingStub {
    url: String,
    crossed: Arc<AtomicUsize>,
    health_checks: Arc<AtomicUsize>,
}

async fn start_closing_stub(close_after: Duration) -> ClosingStub {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let crossed = Arc::new(AtomicUsize::new(0));
    let health_checks = Arc::new(AtomicUsize::new(0));
    let (c, h) = (crossed.clone(), health_checks.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (crossed, health_checks) = (c.clone(), h.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut idle_since: Option<Instant> = None;
                loop {
                    let head_end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    buf.drain(..head_end);
                    if idle_since.is_some_and(|t| t.elapsed() >= close_after) {
                        crossed.fetch_add(1, Ordering::SeqCst);
                        return; // dropped unanswered
                    }
                    let path = head.split(' ').nth(1).unwrap_or("");
                    let answer: &[u8] = if path == "/health" {
                        health_checks.fetch_add(1, Ordering::SeqCst);
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                    };
                    if socket.write_all(answer).await.is_err() {
                        return;
                    }
                    idle_since = Some(Instant::now());
                }
            });
        }
    });
    ClosingStub {
        url,
        crossed,
        health_checks,
    }
}

#[tokio::test]
async fn the_server_never_reuses_a_connection_idle_as_long_as_clients_keep_them() {
    // Clients close idle connections after JOBRELAY_SLOW_REQUEST_SECS (2 s here, as for the
    // server, which then pools for 1 s: a second of margin on a loaded machine); the server's
    // probe comes every 3 s (half of --client-timeout 6).
    let close_after = Duration::from_secs(2);
    let stub = start_closing_stub(close_after).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(dir.path(), &[("example", vec![stub.url.clone()], 2, 4)]);
    let _server = TestServer::start_with_env(
        dir.path(),
        &config,
        &["--client-timeout", "6"],
        &[("JOBRELAY_SLOW_REQUEST_SECS", "2")],
    );
    // Four probes: three idle gaps of about 3 s, each longer than the clients keep a
    // connection.
    eventually(LONG, "four probes of the stub", || async {
        (stub.health_checks.load(Ordering::SeqCst) >= 4).then_some(())
    })
    .await;
    assert_eq!(
        stub.crossed.load(Ordering::SeqCst),
        0,
        "requests sent on a connection the client was closing"
    );
}
