//! Completion webhooks end to end: a real receiver (an HTTP server of the test on a loopback
//! port) and real `jobrelay server` and `jobrelay client` processes. Deliveries are signed,
//! retried with the same delivery id, survive a kill -9 of the server, go only to allowed
//! hosts, and each one is accepted once.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use futures_util::StreamExt;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec-test-0123456789";

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    delivery: String,
    signature: String,
    event: String,
    body: Bytes,
    answered: u16,
    /// Unix ms when it arrived.
    received_ms: i64,
}

/// A webhook receiver: answers `fail_first` requests with 503, then `status`.
struct Receiver {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start(fail_first: usize, status: u16) -> Receiver {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let fail_first = Arc::new(AtomicUsize::new(fail_first));
        let status = Arc::new(AtomicU16::new(status));
        let (h, f, s) = (hits.clone(), fail_first.clone(), status.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (hits, fail_first, status) = (h.clone(), f.clone(), s.clone());
                async move {
                    let failing = fail_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    let answered = if failing {
                        503
                    } else {
                        status.load(Ordering::SeqCst)
                    };
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    hits.lock().unwrap().push(Hit {
                        delivery: header("x-jobrelay-delivery"),
                        signature: header("x-jobrelay-signature"),
                        event: header("x-jobrelay-event"),
                        body,
                        answered,
                        received_ms: unix_ms(),
                    });
                    StatusCode::from_u16(answered).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, hits, status }
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn accepted(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| (200..300).contains(&h.answered))
            .collect()
    }
}

/// A server configuration with one service whose notifications are signed with [`SECRET`]
/// and a callback allowlist of 127.0.0.1 only.
fn webhook_config(dir: &Path, client: &str, runs: usize) -> PathBuf {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[webhooks]\nallowed_hosts = [\"127.0.0.1\"]\n\n\
             [services.example]\nclients = [{client:?}]\nruns_per_user = {runs}\n\
             max_runs = {runs}\nwebhook_secret = {SECRET:?}\n"
        ),
    )
    .unwrap();
    path
}

async fn upload_with_callback(
    http: &reqwest::Client,
    server: &str,
    callback: &str,
    script: &str,
) -> reqwest::Response {
    let form = files_form(&[("run.sh", script.as_bytes())])
        .text("user_id", "1")
        .text("service", "example")
        .text("callback_url", callback.to_owned());
    http.post(format!("{server}/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn upload_ok(http: &reqwest::Client, server: &str, callback: &str, script: &str) -> i64 {
    let response = upload_with_callback(http, server, callback, script).await;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 201, "upload refused: {body}");
    body["id"].as_i64().unwrap()
}

fn assert_signed(hit: &Hit) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jobrelay_server::webhooks::signing::verify(SECRET, &hit.signature, &hit.body, now, 300)
        .unwrap_or_else(|why| panic!("bad signature {:?}: {why}", hit.signature));
    assert!(jobrelay_server::webhooks::signing::verify(
        "another",
        &hit.signature,
        &hit.body,
        now,
        300
    )
    .is_err());
}

async fn job_record(http: &reqwest::Client, server: &str, id: i64) -> serde_json::Value {
    http.get(format!("{server}/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_signed_delivery_until_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(2, 200).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start(root, &config, &[]);
    let http = http();

    let id = upload_ok(&http, &server.url, &receiver.url, "echo done > out.txt\n").await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let job = job_record(&http, &server.url, id).await;
    eventually(LONG, "the delivery accepted", || async {
        (!receiver.accepted().is_empty()).then_some(())
    })
    .await;
    let hits = receiver.hits();
    assert_eq!(
        hits.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [503, 503, 200],
        "{hits:?}"
    );
    assert!(hits
        .iter()
        .all(|h| h.delivery == hits[0].delivery && !h.delivery.is_empty()));
    for hit in &hits {
        assert_signed(hit);
        assert_eq!(hit.event, "Completed");
        let body: serde_json::Value = serde_json::from_slice(&hit.body).unwrap();
        assert_eq!(body["id"], id);
        assert_eq!(body["status"], "Completed");
        assert_eq!(body["finished_ms"], job["finished_ms"]);
    }

    // The job shows its notification; /download's JSON and the listing stay as they were.
    let record = eventually(LONG, "the notification recorded", || async {
        let record = job_record(&http, &server.url, id).await;
        (record["notifications"][0]["outcome"] == "delivered").then_some(record)
    })
    .await;
    let notification = &record["notifications"][0];
    assert_eq!(notification["id"], hits[0].delivery.as_str());
    assert_eq!(notification["attempts"], 3);
    assert_eq!(notification["last_status"], "200");
    assert_eq!(notification["next_try_ms"], serde_json::Value::Null);
    let listed: serde_json::Value = http
        .get(format!("{}/jobs", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed["jobs"][0].get("notifications").is_none(), "{listed}");

    let metrics = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "jobrelay_server_webhook_deliveries_total{result=\"retry\"} 2",
        "jobrelay_server_webhook_deliveries_total{result=\"delivered\"} 1",
    ] {
        assert!(metrics.contains(needle), "no {needle:?} in\n{metrics}");
    }
}

#[tokio::test]
async fn deliveries_pending_when_the_server_is_killed_are_sent_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 503).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let mut server = TestServer::start(root, &config, &[]);
    let http = http();

    let ids = [
        upload_ok(&http, &server.url, &receiver.url, "true\n").await,
        upload_ok(&http, &server.url, &receiver.url, "exit 3\n").await,
    ];
    eventually(LONG, "both notifications tried", || async {
        let tried: HashSet<String> = receiver.hits().into_iter().map(|h| h.delivery).collect();
        (tried.len() == 2).then_some(())
    })
    .await;
    server.kill9();
    let refused: HashSet<String> = receiver.hits().into_iter().map(|h| h.delivery).collect();

    receiver.status.store(204, Ordering::SeqCst);
    server.restart();
    eventually(LONG, "both notifications accepted", || async {
        (receiver.accepted().len() == 2).then_some(())
    })
    .await;
    let accepted = receiver.accepted();
    let delivered: HashSet<String> = accepted.iter().map(|h| h.delivery.clone()).collect();
    assert_eq!(
        delivered, refused,
        "the same deliveries, by id, after the restart"
    );
    let mut events: Vec<(i64, String)> = accepted
        .iter()
        .map(|h| {
            assert_signed(h);
            let body: serde_json::Value = serde_json::from_slice(&h.body).unwrap();
            (body["id"].as_i64().unwrap(), h.event.clone())
        })
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            (ids[0], "Completed".to_owned()),
            (ids[1], "Failed".to_owned())
        ]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        receiver.accepted().len(),
        2,
        "nothing sent again once accepted"
    );
    let record = job_record(&http, &server.url, ids[0]).await;
    assert_eq!(record["notifications"][0]["outcome"], "delivered");
}

#[tokio::test]
async fn a_callback_off_the_allowlist_is_refused_at_upload() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start(root, &config, &[]);
    let http = http();

    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:9/hook",
        "https://127.0.0.1.evil.test/hook",
        "file:///etc/passwd",
    ] {
        let response = upload_with_callback(&http, &server.url, url, "true\n").await;
        assert_eq!(response.status(), 400, "{url}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["id"], 0, "{body}");
        assert_eq!(body["status"], "Unknown", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("callback"),
            "{body}"
        );
    }
    let listed: serde_json::Value = http
        .get(format!("{}/jobs", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["total"], 0, "no job made: {listed}");

    // A server without an allowlist takes no callback at all, not even to loopback.
    let bare = root.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let config = write_server_config(&bare, &[("example", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(&bare, &config, &[]);
    let response =
        upload_with_callback(&http, &server.url, "http://127.0.0.1:9/hook", "true\n").await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("no callbacks"),
        "{body}"
    );
}

#[tokio::test]
async fn the_delivery_loop_is_restarted_after_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 200).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start_with_env(
        root,
        &config,
        &[],
        &[("JOBRELAY_TEST_PANIC_ONCE", "webhooks")],
    );
    let http = http();
    let id = upload_ok(&http, &server.url, &receiver.url, "true\n").await;
    let hit = eventually(LONG, "the job notified", || async {
        receiver.accepted().into_iter().next()
    })
    .await;
    let body: serde_json::Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(body["id"], id);
    let metrics = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let restarts = metrics
        .lines()
        .find(|l| {
            l.starts_with("jobrelay_server_loop_restarts_total{") && l.contains("loop=\"webhooks\"")
        })
        .unwrap_or_else(|| panic!("no restart of the webhooks loop counted:\n{metrics}"));
    assert!(restarts.ends_with(" 1"), "{restarts}");
}

/// `jobrelay submit --callback URL`, run as a user would (a blocking process: on a thread, so
/// the receiver on this runtime keeps answering).
async fn cli_submit(server: &str, dir: &Path, callback: &str) -> std::process::Output {
    let (server, dir, callback) = (server.to_owned(), dir.to_owned(), callback.to_owned());
    tokio::task::spawn_blocking(move || {
        std::fs::write(dir.join("run.sh"), "true\n").unwrap();
        std::process::Command::new(binary())
            .args([
                "submit",
                "--service",
                "example",
                "--callback",
                &callback,
                "--wait",
            ])
            .arg(dir.join("run.sh"))
            .env("JOBRELAY_SERVER", server)
            .env("JOBRELAY_USER", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_cli_submits_a_callback() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 200).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start(root, &config, &[]);

    let done = cli_submit(&server.url, root, &receiver.url).await;
    assert!(done.status.success(), "{done:?}");
    let id: i64 = String::from_utf8_lossy(&done.stdout)
        .trim()
        .parse()
        .unwrap();
    let hit = eventually(LONG, "the CLI's job notified", || async {
        receiver.accepted().into_iter().next()
    })
    .await;
    assert_signed(&hit);
    let body: serde_json::Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(body["id"], id);
    // Sent as the end is committed, not on a timer (a second is the aim; 2 s on a loaded
    // machine).
    let after = hit.received_ms - body["finished_ms"].as_i64().unwrap();
    assert!(after < 2000, "notified {after} ms after the job ended");

    let refused = cli_submit(&server.url, root, "http://10.0.0.1/hook").await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("allowed_hosts"), "{stderr}");
}

#[tokio::test]
async fn a_thousand_jobs_are_each_notified_and_accepted_once() {
    const JOBS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 200).await;
    let client = start_client(root, "client", &["--slots", "16"]);
    let config = webhook_config(root, &client.url, 16);
    let server = TestServer::start(root, &config, &[]);
    let http = http();

    let ids: Vec<i64> = futures_util::stream::iter(0..JOBS)
        .map(|_| upload_ok(&http, &server.url, &receiver.url, "true\n"))
        .buffer_unordered(16)
        .collect()
        .await;
    eventually(Duration::from_secs(300), "every job notified", || async {
        (receiver.accepted().len() >= JOBS).then_some(())
    })
    .await;
    // Time for a duplicate to show up, if one were sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = receiver.accepted();
    let mut per_job: HashMap<i64, usize> = HashMap::new();
    let mut deliveries = HashSet::new();
    for hit in &accepted {
        let body: serde_json::Value = serde_json::from_slice(&hit.body).unwrap();
        *per_job.entry(body["id"].as_i64().unwrap()).or_default() += 1;
        assert!(
            deliveries.insert(hit.delivery.clone()),
            "{} twice",
            hit.delivery
        );
        assert_eq!(hit.event, "Completed");
    }
    assert_eq!(accepted.len(), JOBS);
    assert_eq!(
        per_job.keys().copied().collect::<HashSet<_>>(),
        ids.iter().copied().collect::<HashSet<_>>()
    );
    assert!(per_job.values().all(|n| *n == 1));
    assert_signed(&accepted[0]);
}
