//! The server through HTTP with real client processes: round trip, refused uploads,
//! configuration through the reference's environment variables, a seed-contract-only client.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::rng::noise;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(90);

#[tokio::test]
async fn upload_then_download_the_result_zip() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();

    let script = b"echo hello; cat input.txt > out.txt; mkdir -p sub; echo deep > sub/d.txt\n";
    let id = upload_job(
        &http,
        &server.url,
        42,
        "example",
        &[
            ("run.sh", script),
            ("input.txt", b"some input"),
            ("inputs/a.pdb", b"ATOM"),
        ],
    )
    .await;
    let job = wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    assert_eq!(job["status"], "Completed");
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"some input");
    assert_eq!(entries["sub/d.txt"], b"deep\n");
    assert_eq!(entries["inputs/a.pdb"], b"ATOM");
    assert_eq!(entries["run.sh"], script);
    assert_eq!(entries[".jobrelay.stdout"], b"hello\n");
    // Results stored once, as a whole ZIP (a small one: in the database, no file, issue 18);
    // the uploaded copy is gone (it is in the ZIP).
    let data = server.data_dir();
    let kept = support::db::TestDb::Sqlite.result_zips(&data).await;
    assert_eq!(kept.keys().collect::<Vec<_>>(), [&id]);
    assert!(kept[&id] == download_zip(&http, &server.url, id).await);
    assert!(tree(&data.join("results")).is_empty());
    // Removed just after Completed is committed (the commit comes first): wait for it.
    let inputs = data.join(format!("jobs/{id}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while inputs.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!inputs.exists());

    // The stored results also answer /download_partial.
    let partial = http
        .get(format!("{}/download_partial/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(partial.headers()["content-type"], "application/zip");
    assert!(unzip(&partial.bytes().await.unwrap()).contains_key("out.txt"));

    // A failing job answers JSON with its exit code and reason.
    let failing = upload_job(
        &http,
        &server.url,
        42,
        "example",
        &[("run.sh", b"echo partial > p.txt; exit 3\n")],
    )
    .await;
    let job = wait_status(&http, &server.url, failing, &["Failed"], LONG).await;
    assert_eq!(job["exit_code"], 3, "{job}");
    assert_eq!(job["user_id"], 42);
    assert_eq!(job["service"], "example");
    assert_eq!(job["attempts"], 1);
    let partial = http
        .get(format!("{}/download_partial/{failing}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 200);
    assert_eq!(
        unzip(&partial.bytes().await.unwrap())["p.txt"],
        b"partial\n"
    );

    // The list the CLI's `jobrelay jobs` shows: newest first, filtered, with a total.
    let list: serde_json::Value = http
        .get(format!("{}/jobs?user_id=42&limit=1", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 2, "{list}");
    assert_eq!(list["jobs"][0]["id"], failing);
    assert!(list["jobs"][0]["created_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let bad = http
        .get(format!("{}/jobs?status=Sleeping", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Unknown job; health, ping, OpenAPI and its page.
    let unknown = http
        .get(format!("{}/download/999999", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["status"], "Unknown");
    let health: serde_json::Value = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(
        http.get(format!("{}/", server.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let doc: serde_json::Value = http
        .get(format!("{}/openapi.json", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/upload",
        "/download/{id}",
        "/download_partial/{id}",
        "/terminate/{id}",
        "/jobs",
        "/jobs/{id}",
        "/health",
        "/",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} in the OpenAPI");
    }
    let page = http
        .get(format!("{}/docs", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("openapi.json"));
}

async fn refused(
    http: &reqwest::Client,
    server: &str,
    form: reqwest::multipart::Form,
    expected: u16,
    needle: &str,
) {
    let (status, body) = post_upload(http, server, form).await;
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["id"], 0, "{body}");
    assert_eq!(body["status"], "Unknown", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "message {message:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn every_refused_upload_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // No client needs to run: refused uploads never get that far.
    let config = write_server_config(
        dir.path(),
        &[("example", vec!["http://127.0.0.1:9".into()], 5, 10)],
    );
    let server = TestServer::start(dir.path(), &config, &["--max-upload", "1000"]);
    let http = http();
    let run: &[(&str, &[u8])] = &[("run.sh", b"true\n")];
    let with = |user: Option<&str>, service: Option<&str>, files: &[(&str, &[u8])]| {
        let mut form = files_form(files);
        if let Some(user) = user {
            form = form.text("user_id", user.to_owned());
        }
        if let Some(service) = service {
            form = form.text("service", service.to_owned());
        }
        form
    };
    let url = &server.url;
    refused(&http, url, with(None, Some("example"), run), 400, "user_id").await;
    refused(
        &http,
        url,
        with(Some("abc"), Some("example"), run),
        400,
        "user_id",
    )
    .await;
    refused(
        &http,
        url,
        with(Some("1.5"), Some("example"), run),
        400,
        "user_id",
    )
    .await;
    refused(&http, url, with(Some("1"), None, run), 400, "service").await;
    refused(&http, url, with(Some("1"), Some("nope"), run), 400, "nope").await;
    refused(
        &http,
        url,
        with(Some("1"), Some("example"), &[]),
        400,
        "no file",
    )
    .await;
    refused(
        &http,
        url,
        with(
            Some("1"),
            Some("example"),
            &[("run.sh", b"true"), ("../x", b"x")],
        ),
        400,
        "../x",
    )
    .await;
    refused(
        &http,
        url,
        with(
            Some("1"),
            Some("example"),
            &[("run.sh", b"a"), ("run.sh", b"b")],
        ),
        400,
        "repeated",
    )
    .await;
    let big = vec![b'x'; 3000];
    refused(
        &http,
        url,
        with(
            Some("1"),
            Some("example"),
            &[("run.sh", b"true"), ("big", &big)],
        ),
        413,
        "limit",
    )
    .await;
    let not_multipart = http
        .post(format!("{url}/upload"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(not_multipart.status(), 400);

    let data = server.data_dir();
    assert!(tree(&data.join("jobs")).is_empty(), "{:?}", tree(&data));
    assert!(tree(&data.join("staging")).is_empty(), "{:?}", tree(&data));
    assert!(tree(&data.join("results")).is_empty());
    // Nothing in the database either: ids are never reused, and the first accepted job is 1.
    let id = upload_job(&http, url, 1, "example", run).await;
    assert_eq!(id, 1);
    // A small upload: its run.sh in the database with it (issue 18), no directory.
    assert!(tree(&data.join("jobs")).is_empty(), "{:?}", tree(&data));
    let kept = support::db::TestDb::Sqlite.input_files(&data).await;
    assert_eq!(kept.keys().collect::<Vec<_>>(), [&id]);
    assert_eq!(kept[&id].len(), 1, "the job's run.sh");
}

#[tokio::test]
async fn the_reference_environment_variables_configure_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let db = dir.path().join("elsewhere/jobs.sqlite");
    let data = dir.path().join("server-data");
    let upload = format!("{}/submit", client.url);
    let download = format!("{}/retrieve", client.url);
    let terminate = format!("{}/kill", client.url);
    let server = Proc::start_with_env(
        &["server"],
        dir.path(),
        &[
            ("PORT", "0"),
            ("DB_PATH", db.to_str().unwrap()),
            ("DATA_PATH", data.to_str().unwrap()),
            ("MAX_AGE", "2"),
            ("SERVICE_DEMO_UPLOAD_URL", &upload),
            ("SERVICE_DEMO_DOWNLOAD_URL", &download),
            ("SERVICE_DEMO_TERMINATE_URL", &terminate),
            ("SERVICE_DEMO_RUNS_PER_USER", "2"),
            ("SERVICE_DEMO_MAX_RUNS", "3"),
        ],
    );
    let http = http();
    let id = upload_job(
        &http,
        &server.url,
        5,
        "demo",
        &[("run.sh", b"echo env > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed", "Cleaned"], LONG).await;
    assert!(db.is_file(), "the database is at DB_PATH");
    assert!(data.join("jobs").join(id.to_string()).exists() || data.join("results").is_dir());
    // MAX_AGE 2: the finished job's files go, and it becomes Cleaned.
    let job = wait_status(&http, &server.url, id, &["Cleaned"], LONG).await;
    assert_eq!(job["status"], "Cleaned");
    // The janitor commits Cleaned first, then removes the files.
    let result = data.join("results").join(format!("{id}.zip"));
    let inputs = data.join("jobs").join(id.to_string());
    eventually(LONG, "the cleaned job's files to be removed", || async {
        (!result.exists() && !inputs.exists()).then_some(())
    })
    .await;
}

#[test]
fn a_bad_configuration_stops_the_server_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[services.example]\nclients = [\"http://127.0.0.1:9\"]\nmax_run = 3\n",
    )
    .unwrap();
    let output = std::process::Command::new(binary())
        .args([
            "server",
            "--port",
            "0",
            "--config",
            config.to_str().unwrap(),
        ])
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .env_remove("PORT")
        .env_remove("DATA_PATH")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_run"), "{stderr}");
}

/// A client speaking only the seed contract: /submit, /retrieve, /load, /health, /.
/// It runs run.sh itself with bash, one payload after another.
struct SeedStub {
    url: String,
    submissions: Arc<AtomicU64>,
}

#[derive(Clone)]
struct StubState {
    root: std::path::PathBuf,
    next: Arc<AtomicU64>,
    status: Arc<Mutex<std::collections::HashMap<u64, &'static str>>>,
}

async fn start_seed_stub(root: &Path) -> SeedStub {
    use axum::extract::{Multipart, Path as UrlPath, State};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};

    let state = StubState {
        root: root.to_path_buf(),
        next: Arc::new(AtomicU64::new(1)),
        status: Default::default(),
    };
    async fn submit(
        State(state): State<StubState>,
        mut form: Multipart,
    ) -> axum::Json<serde_json::Value> {
        let id = state.next.fetch_add(1, Ordering::SeqCst);
        let dir = state.root.join(id.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        while let Some(field) = form.next_field().await.unwrap() {
            let Some(name) = field.file_name().map(str::to_owned) else {
                continue;
            };
            let bytes = field.bytes().await.unwrap();
            let path = dir.join(&name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        state.status.lock().unwrap().insert(id, "Running");
        let status = state.status.clone();
        let work = dir.clone();
        tokio::spawn(async move {
            let ok = tokio::process::Command::new("bash")
                .arg("run.sh")
                .current_dir(&work)
                .status()
                .await
                .map(|s| s.success())
                .unwrap_or(false);
            status
                .lock()
                .unwrap()
                .insert(id, if ok { "Completed" } else { "Failed" });
        });
        axum::Json(serde_json::json!({"id": id, "status": "Prepared", "loc": dir}))
    }
    async fn retrieve(
        State(state): State<StubState>,
        UrlPath(id): UrlPath<u64>,
    ) -> axum::response::Response {
        let status = state.status.lock().unwrap().get(&id).copied();
        let dir = state.root.join(id.to_string());
        match status {
            None => axum::http::StatusCode::NOT_FOUND.into_response(),
            Some("Completed") => {
                let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let entry = entry.unwrap();
                    if entry.file_type().unwrap().is_file() {
                        zip.start_file(
                            entry.file_name().to_string_lossy(),
                            zip::write::SimpleFileOptions::default()
                                .compression_method(zip::CompressionMethod::Stored),
                        )
                        .unwrap();
                        std::io::Write::write_all(&mut zip, &std::fs::read(entry.path()).unwrap())
                            .unwrap();
                    }
                }
                let bytes = zip.finish().unwrap().into_inner();
                ([("content-type", "application/zip")], bytes).into_response()
            }
            Some(status) => axum::Json(serde_json::json!({"id": id, "status": status, "loc": dir}))
                .into_response(),
        }
    }
    let submissions = state.next.clone();
    let app = axum::Router::new()
        .route("/submit", post(submit))
        .route("/retrieve/{id}", get(retrieve))
        .route("/load", get(|| async { axum::Json(12.5) }))
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "healthy"})) }),
        )
        .route("/", get(|| async { "pong" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    SeedStub { url, submissions }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_speaking_only_the_seed_contract_works() {
    let dir = tempfile::tempdir().unwrap();
    let stub = start_seed_stub(&dir.path().join("stub")).await;
    let config = write_server_config(dir.path(), &[("seed", vec![stub.url.clone()], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &["--poll-interval", "0.2"]);
    let http = http();
    let mut ids = Vec::new();
    for n in 0..3 {
        let script = format!("sleep 0.3; echo job{n} > out.txt\n");
        ids.push(
            upload_job(
                &http,
                &server.url,
                1,
                "seed",
                &[("run.sh", script.as_bytes())],
            )
            .await,
        );
    }
    let failing = upload_job(&http, &server.url, 1, "seed", &[("run.sh", b"exit 1\n")]).await;
    for (n, id) in ids.iter().enumerate() {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("job{n}\n").as_bytes());
    }
    wait_status(&http, &server.url, failing, &["Failed"], LONG).await;
    // Each job went to the stub exactly once.
    assert_eq!(stub.submissions.load(Ordering::SeqCst), 5);

    // Terminate towards a client without /kill: the job is Killed here, with a message.
    let long = upload_job(&http, &server.url, 1, "seed", &[("run.sh", b"sleep 3\n")]).await;
    wait_status(&http, &server.url, long, &["Submitted", "Running"], LONG).await;
    let response = http
        .post(format!("{}/terminate/{long}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Killed");
    assert!(
        job["message"].as_str().unwrap().contains("could not stop"),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_be_sent_fails_after_max_attempts_with_the_reason() {
    use axum::routing::{get, post};
    // A client that answers /health but fails every /submit. It reads the whole request
    // first: answering before the body is read makes hyper close the connection, and the
    // server's next send on it would fail to send rather than get this 500.
    let app = axum::Router::new()
        .route(
            "/submit",
            post(|_body: axum::body::Bytes| async {
                (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "disk on fire",
                )
            }),
        )
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "healthy"})) }),
        )
        .route("/load", get(|| async { axum::Json(1.0) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(dir.path(), &[("broken", vec![url], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let id = upload_job(&http, &server.url, 1, "broken", &[("run.sh", b"true\n")]).await;
    let job = wait_status(&http, &server.url, id, &["Failed"], LONG).await;
    assert_eq!(job["attempts"], 3, "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(message.contains("gave up after 3 attempts"), "{message}");
    assert!(message.contains("500"), "{message}");
}

/// `GET /jobs/{id}?wait=S` answers as soon as the job has finished, or after S seconds with
/// the job as it is; a bad wait is a 400, an unknown job a 404.
#[tokio::test]
async fn job_status_long_poll_answers_when_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let get = |url: String| {
        let http = http.clone();
        async move {
            let response = http.get(url).send().await.unwrap();
            let status = response.status();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };

    let id = upload_job(
        &http,
        &server.url,
        7,
        "example",
        &[("run.sh", b"sleep 1.5\n")],
    )
    .await;
    // The wait runs out first: the job as it is then.
    let start = std::time::Instant::now();
    let (status, job) = get(format!("{}/jobs/{id}?wait=0.3", server.url)).await;
    assert_eq!(status, 200);
    assert!(
        !["Completed", "Failed"].contains(&job["status"].as_str().unwrap()),
        "{job}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    // Then it answers once the job has finished, not at the end of the wait.
    let (status, job) = get(format!("{}/jobs/{id}?wait=50", server.url)).await;
    assert_eq!(status, 200);
    assert_eq!(job["status"], "Completed", "{job}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    // A finished job answers at once.
    let start = std::time::Instant::now();
    let (_, job) = get(format!("{}/jobs/{id}?wait=50", server.url)).await;
    assert_eq!(job["status"], "Completed");
    assert!(start.elapsed() < Duration::from_secs(5));

    let (status, body) = get(format!("{}/jobs/{id}?wait=-1", server.url)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(format!("{}/jobs/{id}?wait=soon", server.url)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(format!("{}/jobs/99999?wait=1", server.url)).await;
    assert_eq!(status, 404, "{body}");
    // `/download/{id}?wait=` answers the ZIP as soon as the job has completed.
    let id = upload_job(
        &http,
        &server.url,
        7,
        "example",
        &[("run.sh", b"sleep 1\n")],
    )
    .await;
    let start = std::time::Instant::now();
    let response = http
        .get(format!("{}/download/{id}?wait=50", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/zip");
    assert!(unzip(&response.bytes().await.unwrap()).contains_key("run.sh"));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    let (status, body) = get(format!("{}/download/{id}?wait=x", server.url)).await;
    assert_eq!(status, 400, "{body}");
    // The OpenAPI document lists the parameter.
    let (_, spec) = get(format!("{}/openapi.json", server.url)).await;
    for path in ["/jobs/{id}", "/download/{id}"] {
        let params = spec["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .clone();
        assert!(
            params.iter().any(|p| p["name"] == "wait"),
            "{path}: {params:?}"
        );
    }
}

/// Throughput and latency of trivial jobs; run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_of_trivial_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &["--slots", "4"]);
    let config = write_server_config(
        dir.path(),
        &[("example", vec![client.url.clone()], 1000, 1000)],
    );
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    // Latency of one job, polling its state every 2 ms.
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let id = upload_job(&http, &server.url, 1, "example", &[("run.sh", b"true\n")]).await;
        loop {
            let job: serde_json::Value = http
                .get(format!("{}/jobs/{id}", server.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if job["status"] == "Completed" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!("one trivial job: {:?}", start.elapsed());
    }
    let n = 300;
    let start = std::time::Instant::now();
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        let uploads = chunk.iter().map(|i| {
            let http = http.clone();
            let url = server.url.clone();
            async move { upload_job(&http, &url, i % 10, "example", &[("run.sh", b"true\n")]).await }
        });
        ids.extend(futures_join_all(uploads).await);
    }
    let uploaded = start.elapsed();
    for id in &ids {
        wait_status(
            &http,
            &server.url,
            *id,
            &["Completed"],
            Duration::from_secs(300),
        )
        .await;
    }
    let all = start.elapsed();
    eprintln!(
        "{n} trivial jobs: uploaded in {uploaded:?}, all completed in {all:?} ({:.0} jobs/s)",
        n as f64 / all.as_secs_f64()
    );
}

async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.collect();
    let mut out = Vec::new();
    // Polls every future in turn until all are done (no futures-util in the test's deps).
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = handles.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(done.into_iter().map(Option::unwrap));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_stream_through_the_server_in_small_memory() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let size = 200 * 1024 * 1024;
    // Incompressible (the client deflates what shrinks), so the ZIP carries every byte.
    let big = noise(size);
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[
            ("run.sh", b"wc -c < big.bin > size.txt\n"),
            ("big.bin", &big),
        ],
    )
    .await;
    drop(big);
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    // Download as a stream, counting bytes.
    let mut response = http
        .get(format!("{}/download/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/zip");
    let mut total = 0usize;
    while let Some(chunk) = response.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert!(total > size, "the ZIP holds the input: {total} bytes");
    let peak = server.peak_rss_kib();
    eprintln!("server peak RSS {peak} KiB for a {size}-byte job");
    assert!(
        peak < 100 * 1024,
        "server peak memory {peak} KiB for a {size}-byte job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_is_never_a_whole_zip_fails_the_job_instead_of_completing_it() {
    use axum::routing::{get, post};
    // A client whose every result is a cut ZIP (as when archiving fails midway).
    let app = axum::Router::new()
        .route(
            "/submit",
            post(|| async {
                axum::Json(serde_json::json!({"id": 1, "status": "Prepared", "loc": "/x"}))
            }),
        )
        .route(
            "/retrieve/{id}",
            get(|| async {
                (
                    [("content-type", "application/zip")],
                    b"PK\x03\x04cut".to_vec(),
                )
            }),
        )
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "healthy"})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(dir.path(), &[("cut", vec![url], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &["--client-timeout", "2"]);
    let http = http();
    let id = upload_job(&http, &server.url, 1, "cut", &[("run.sh", b"true\n")]).await;
    let job = wait_status(&http, &server.url, id, &["Failed", "Completed"], LONG).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(message.contains("not a complete archive"), "{message}");
    // Nothing half-written is left among the results.
    assert!(tree(&dir.path().join("server/results")).is_empty());
}

/// `user_id` 0 is a user like any other (a platform may send it for anonymous callers); a
/// negative id names nobody and is refused before anything is stored.
#[tokio::test]
async fn user_id_zero_is_a_user_and_negative_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(
        dir.path(),
        &[("example", vec!["http://127.0.0.1:9".into()], 5, 10)],
    );
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let upload = |user: &'static str| {
        let form = files_form(&[("run.sh", b"true\n")])
            .text("user_id", user)
            .text("service", "example");
        http.post(format!("{}/upload", server.url))
            .multipart(form)
            .send()
    };
    for user in ["-1", "-9223372036854775808"] {
        let response = upload(user).await.unwrap();
        assert_eq!(response.status(), 400, "user_id {user}");
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("non-negative"), "{message}");
    }
    let response = upload("0").await.unwrap();
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.unwrap();
    let id = body["id"].as_i64().unwrap();
    let job: serde_json::Value = http
        .get(format!("{}/jobs/{id}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["user_id"], 0);
    let list: serde_json::Value = http
        .get(format!("{}/jobs?user_id=0", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 1, "{list}");
}
