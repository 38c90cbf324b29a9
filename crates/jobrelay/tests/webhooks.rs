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
use support::db::TestDb;
use support::server::*;
use support::*;

on_both_databases!(
    #[tokio::test]
    a_failing_receiver_gets_the_same_signed_delivery_until_it_accepts,
    #[tokio::test]
    deliveries_pending_when_the_server_is_killed_are_sent_after_its_restart,
);

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
    webhook_config_with(dir, client, runs, "allowed_hosts = [\"127.0.0.1\"]")
}

/// [`webhook_config`] with `webhooks` as the `[webhooks]` table's lines.
fn webhook_config_with(dir: &Path, client: &str, runs: usize, webhooks: &str) -> PathBuf {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[webhooks]\n{webhooks}\n\n\
             [services.example]\nclients = [{client:?}]\nruns_per_user = {runs}\n\
             max_runs = {runs}\nwebhook_secret = {SECRET:?}\n"
        ),
    )
    .unwrap();
    path
}

/// The job's first notification once it has ended (its `outcome` set).
async fn ended_notification(http: &reqwest::Client, server: &str, id: i64) -> serde_json::Value {
    eventually(LONG, "the notification ended", || async {
        let record = job_record(http, server, id).await;
        let first = record["notifications"][0].clone();
        first["outcome"].is_string().then_some(first)
    })
    .await
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

async fn a_failing_receiver_gets_the_same_signed_delivery_until_it_accepts(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(2, 200).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start(root, &config, &db.args(&[]));
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

async fn deliveries_pending_when_the_server_is_killed_are_sent_after_its_restart(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 503).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let mut server = TestServer::start(root, &config, &db.args(&[]));
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

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_unless_private_addresses_are_allowed() {
    // `localhost` is on the allowlist as a name: it resolves to loopback, which a delivery
    // may not reach (a name's DNS may be a user's to choose), until the operator says so.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 200).await;
    let named = receiver.url.replace("127.0.0.1", "localhost");
    let client = start_client(root, "client", &[]);
    let http = http();
    let config = webhook_config_with(root, &client.url, 5, "allowed_hosts = [\"localhost\"]");
    let server = TestServer::start(root, &config, &[]);
    let id = upload_ok(&http, &server.url, &named, "true\n").await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let refused = ended_notification(&http, &server.url, id).await;
    assert_eq!(refused["outcome"], "refused", "{refused}");
    let why = refused["last_status"].as_str().unwrap_or_default();
    assert!(
        why.contains("non-public") && why.contains("allow_private_addresses"),
        "{why}"
    );
    assert!(receiver.hits().is_empty(), "{:?}", receiver.hits());
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &[]);
    let config = webhook_config_with(
        root,
        &client.url,
        5,
        "allowed_hosts = [\"localhost\"]\nallow_private_addresses = true",
    );
    let server = TestServer::start(root, &config, &[]);
    let id = upload_ok(&http, &server.url, &named, "true\n").await;
    let delivered = ended_notification(&http, &server.url, id).await;
    assert_eq!(delivered["outcome"], "delivered", "{delivered}");
    assert_eq!(receiver.accepted().len(), 1);
}

#[tokio::test]
async fn a_receiver_answering_410_is_never_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 410).await;
    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let id = upload_ok(&http, &server.url, &receiver.url, "true\n").await;
    let gone = ended_notification(&http, &server.url, id).await;
    assert_eq!(gone["outcome"], "gone", "{gone}");
    assert_eq!(gone["attempts"], 1);
    assert_eq!(gone["next_try_ms"], serde_json::Value::Null);
    // A retry would come a second after the first try: give it three.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.hits().len(), 1, "{:?}", receiver.hits());
}

#[tokio::test]
async fn a_notification_failing_past_the_retry_period_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let receiver = Receiver::start(0, 503).await;
    let client = start_client(root, "client", &[]);
    // Tries at 0 s and 1 s; the next would come at 3 s, past the 2 s period.
    let config = webhook_config_with(
        root,
        &client.url,
        5,
        "allowed_hosts = [\"127.0.0.1\"]\nretry_period = 2",
    );
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let id = upload_ok(&http, &server.url, &receiver.url, "true\n").await;
    let expired = ended_notification(&http, &server.url, id).await;
    assert_eq!(expired["outcome"], "expired", "{expired}");
    assert_eq!(expired["last_status"], "503");
    // Normally two tries; a loaded machine may make the first late enough for one only.
    let hits = receiver.hits();
    assert!(!hits.is_empty() && hits.len() <= 2, "{hits:?}");
    assert_eq!(expired["attempts"], hits.len());
    assert_eq!(expired["next_try_ms"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    // An allowed host answering 307 towards another address must not lead the server there:
    // the answer counts as a failed try.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let target = Receiver::start(0, 200).await;
    let redirects = Arc::new(AtomicUsize::new(0));
    let (count, location) = (redirects.clone(), target.url.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let (count, location) = (count.clone(), location.clone());
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, location)],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirecting = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = start_client(root, "client", &[]);
    let config = webhook_config(root, &client.url, 5);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let id = upload_ok(&http, &server.url, &redirecting, "true\n").await;
    let retried = eventually(LONG, "a second try", || async {
        let record = job_record(&http, &server.url, id).await;
        let first = record["notifications"][0].clone();
        (first["attempts"].as_u64() >= Some(2)).then_some(first)
    })
    .await;
    assert_eq!(retried["last_status"], "307", "{retried}");
    assert!(retried["outcome"].is_null(), "{retried}");
    assert!(redirects.load(Ordering::SeqCst) >= 2);
    assert!(target.hits().is_empty(), "{:?}", target.hits());
}
