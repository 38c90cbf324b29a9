//! Drop-in both ways (issue 12): the deployed reference's wire forms against our binaries.
//!
//! `ReferenceServer` below speaks to a `jobrelay client` exactly as the reference server does:
//! `/submit` with one streamed part per file, named by its path relative to the job directory
//! and carrying its base name as filename; the answers read with the reference's own strict
//! types (every field of its payload record required, its twelve states and no others). Then
//! our server's `/upload` is fed the forms that platforms integrated with the reference send.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde::Deserialize;
use support::server::{
    post_upload, start_client, tree, wait_status, write_server_config, TestServer,
};
use support::{eventually, http, pid_alive, read_pid, unzip, TestClient};

/// The reference's payload record, as its server deserialises it: all fields required.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct RefPayload {
    id: u32,
    input: HashMap<String, Vec<u8>>,
    status: RefStatus,
    loc: PathBuf,
    pid: u32,
    killed: bool,
}

/// The reference's states; an answer with any other fails to deserialise, as it would there.
#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
enum RefStatus {
    Queued,
    Processing,
    Submitted,
    Prepared,
    Running,
    Cleaned,
    Completed,
    Failed,
    Invalid,
    Unknown,
    Locked,
    Killed,
}

/// What the reference server's getter learns from `/retrieve/{id}`.
enum Retrieved {
    Zip(Vec<u8>),
    State(RefStatus),
}

/// The reference server's side of the client protocol, call for call.
struct ReferenceServer {
    http: reqwest::Client,
    base: String,
}

impl ReferenceServer {
    fn new(client: &TestClient) -> Self {
        ReferenceServer {
            // The reference builds a default client per request: no timeout, no keep-alive
            // settings of ours.
            http: reqwest::Client::new(),
            base: client.url(""),
        }
    }

    /// `upload`: every regular file below `dir`, streamed with its length, field = relative
    /// path, filename = base name, no other field.
    async fn submit(&self, dir: &Path) -> u32 {
        let mut form = Form::new();
        for path in files_below(dir) {
            let size = std::fs::metadata(&path).unwrap().len();
            let file = tokio::fs::File::open(&path).await.unwrap();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let relative = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let base = path.file_name().unwrap().to_str().unwrap().to_string();
            form = form.part(
                relative,
                Part::stream_with_length(body, size).file_name(base),
            );
        }
        let response = self
            .http
            .post(format!("{}/submit", self.base))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let text = response.text().await.unwrap();
        let payload: RefPayload = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the reference could not read {text}: {e}"));
        assert_eq!(payload.status, RefStatus::Prepared, "{text}");
        payload.id
    }

    /// `download`: a ZIP when the content type says so, else the payload's state.
    async fn retrieve(&self, id: u32) -> Retrieved {
        let response = self
            .http
            .get(format!("{}/retrieve/{id}", self.base))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let is_zip = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .contains("application/zip");
        if is_zip {
            Retrieved::Zip(response.bytes().await.unwrap().to_vec())
        } else {
            let text = response.text().await.unwrap();
            let payload: RefPayload = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the reference could not read {text}: {e}"));
            Retrieved::State(payload.status)
        }
    }

    /// Polls as the reference's getter does until the state is final; returns the state and,
    /// for Completed, the ZIP.
    async fn follow(&self, id: u32) -> (RefStatus, Option<Vec<u8>>) {
        eventually(
            Duration::from_secs(90),
            &format!("payload {id} final"),
            || async {
                match self.retrieve(id).await {
                    Retrieved::Zip(zip) => Some((RefStatus::Completed, Some(zip))),
                    Retrieved::State(
                        s @ (RefStatus::Failed | RefStatus::Killed | RefStatus::Invalid),
                    ) => Some((s, None)),
                    Retrieved::State(_) => None,
                }
            },
        )
        .await
    }

    /// `download_partial`: 200 with an `application/zip` content type.
    async fn retrieve_partial(&self, id: u32) -> Vec<u8> {
        let response = self
            .http
            .get(format!("{}/retrieve_partial/{id}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.contains("application/zip"), "{content_type}");
        response.bytes().await.unwrap().to_vec()
    }

    /// `terminate`: any 2xx is success.
    async fn kill(&self, id: u32) -> u16 {
        self.http
            .post(format!("{}/kill/{id}", self.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

/// The regular files below `dir`, in a stable order (as the reference walks a job directory).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = tree(dir).into_iter().filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// A job directory as the reference server keeps one: files at their relative paths.
fn job_dir(root: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = root.join(name);
    for (relative, content) in files {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

#[tokio::test]
async fn a_reference_server_runs_trivial_failing_big_and_concurrent_jobs_on_our_client() {
    let client = TestClient::start(&["--slots", "4"]);
    let reference = ReferenceServer::new(&client);
    let jobs = tempfile::tempdir().unwrap();

    // Trivial, with a file in a sub-directory that run.sh reads at its relative path.
    let trivial = job_dir(
        jobs.path(),
        "trivial",
        &[
            (
                "run.sh",
                b"cat input.pdb data/a.pdb > joined.txt\necho done > result.txt\n",
            ),
            ("input.pdb", b"ATOM 1\n"),
            ("data/a.pdb", b"ATOM 2\n"),
        ],
    );
    let id = reference.submit(&trivial).await;
    let (status, zip) = reference.follow(id).await;
    assert_eq!(status, RefStatus::Completed);
    let entries = unzip(&zip.unwrap());
    assert_eq!(entries["joined.txt"], b"ATOM 1\nATOM 2\n");
    assert_eq!(entries["result.txt"], b"done\n");
    assert_eq!(entries["data/a.pdb"], b"ATOM 2\n");
    assert_eq!(entries["input.pdb"], b"ATOM 1\n");
    assert!(entries.contains_key("run.sh"), "{:?}", entries.keys());

    // Failing.
    let failing = job_dir(
        jobs.path(),
        "failing",
        &[("run.sh", b"echo no >&2\nexit 3\n")],
    );
    let id = reference.submit(&failing).await;
    assert_eq!(reference.follow(id).await.0, RefStatus::Failed);

    // 20 MiB of input, streamed with its length.
    let big = vec![b'x'; 20 << 20];
    let big_job = job_dir(
        jobs.path(),
        "big",
        &[
            ("run.sh", b"wc -c < big.bin > size.txt\n"),
            ("big.bin", &big),
        ],
    );
    let id = reference.submit(&big_job).await;
    let (status, zip) = reference.follow(id).await;
    assert_eq!(status, RefStatus::Completed);
    let entries = unzip(&zip.unwrap());
    assert_eq!(
        String::from_utf8_lossy(&entries["size.txt"]).trim(),
        "20971520"
    );

    // Concurrent: eight at once, each sees its own input.
    let dirs: Vec<PathBuf> = (0..8)
        .map(|n| {
            job_dir(
                jobs.path(),
                &format!("c{n}"),
                &[
                    ("run.sh", b"sleep 0.2\ncp in/n.txt out.txt\n" as &[u8]),
                    ("in/n.txt", format!("{n}").as_bytes()),
                ],
            )
        })
        .collect();
    let ids = futures_util::future::join_all(dirs.iter().map(|d| reference.submit(d))).await;
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 8, "{ids:?}");
    let results = futures_util::future::join_all(ids.iter().map(|&id| reference.follow(id))).await;
    for (n, (status, zip)) in results.into_iter().enumerate() {
        assert_eq!(status, RefStatus::Completed);
        assert_eq!(unzip(&zip.unwrap())["out.txt"], format!("{n}").as_bytes());
    }
}

#[tokio::test]
async fn a_reference_server_downloads_partial_results_and_terminates_a_running_job() {
    let client = TestClient::start(&[]);
    let reference = ReferenceServer::new(&client);
    let jobs = tempfile::tempdir().unwrap();
    let pid_file = jobs.path().join("child.pid");
    let script = format!(
        "echo step1 > progress.txt\nsleep 300 &\necho $! > {}\nwait\n",
        pid_file.display()
    );
    let dir = job_dir(jobs.path(), "long", &[("run.sh", script.as_bytes())]);
    let id = reference.submit(&dir).await;
    let child = read_pid(&pid_file).await;

    let partial = unzip(&reference.retrieve_partial(id).await);
    assert_eq!(partial["progress.txt"], b"step1\n");
    match reference.retrieve(id).await {
        Retrieved::State(RefStatus::Running) => {}
        Retrieved::State(other) => panic!("expected Running, got {other:?}"),
        Retrieved::Zip(_) => panic!("a running payload answered a ZIP"),
    }

    let status = reference.kill(id).await;
    assert!((200..300).contains(&status), "terminate answered {status}");
    eventually(
        Duration::from_secs(30),
        "the killed job's child gone",
        || async { (!pid_alive(child)).then_some(()) },
    )
    .await;
    assert_eq!(reference.follow(id).await.0, RefStatus::Killed);
}

fn part(content: &[u8], file_name: &str) -> Part {
    Part::bytes(content.to_vec()).file_name(file_name.to_owned())
}

#[tokio::test]
async fn our_server_takes_files_under_any_field_name_as_platforms_send_them() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    assert_pong(&http, &server.url).await;
    let listing = b"find . -type f ! -name '.jobrelay*' ! -name listing.txt | sort > listing.txt\n";

    // What web platforms post: their own field names, repeated fields, fields the server does
    // not know, an HTML form's unfilled file input (empty filename, no content).
    let form = Form::new()
        .text("user_id", "7")
        .text("service", "example")
        .text("callback", "https://portal.example/done")
        .part("script", part(listing, "run.sh"))
        .part("pdb", part(b"ATOM\n", "x.pdb"))
        .part("files", part(b"a", "a.txt"))
        .part("files", part(b"b", "b.txt"))
        .part("optional", Part::bytes(Vec::new()).file_name(""))
        .text("notes", "ignored");
    let (status, body) = post_upload(&http, &server.url, form).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_i64().unwrap();
    wait_status(
        &http,
        &server.url,
        id,
        &["Completed"],
        Duration::from_secs(60),
    )
    .await;
    let zip = support::server::download_zip(&http, &server.url, id).await;
    let entries = unzip(&zip);
    assert_eq!(
        String::from_utf8_lossy(&entries["listing.txt"]),
        "./a.txt\n./b.txt\n./run.sh\n./x.pdb\n"
    );

    // The reference server's own form (field = relative path, filename = base name), as a
    // server relaying to us would send it.
    let form = Form::new()
        .text("user_id", "7")
        .text("service", "example")
        .part("run.sh", part(listing, "run.sh"))
        .part("data/a.pdb", part(b"A", "a.pdb"))
        .part("data/deeper/b.pdb", part(b"B", "b.pdb"));
    let (status, body) = post_upload(&http, &server.url, form).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_i64().unwrap();
    wait_status(
        &http,
        &server.url,
        id,
        &["Completed"],
        Duration::from_secs(60),
    )
    .await;
    let entries = unzip(&support::server::download_zip(&http, &server.url, id).await);
    assert_eq!(
        String::from_utf8_lossy(&entries["listing.txt"]),
        "./data/a.pdb\n./data/deeper/b.pdb\n./run.sh\n"
    );
    assert_eq!(entries["data/deeper/b.pdb"], b"B");

    // Refusals, whichever way the name came, leave nothing behind. Both jobs are Completed,
    // so their inputs go (just after the commit): wait for that before counting.
    let data = server.data_dir();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !tree(&data.join("jobs")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the inputs of completed jobs stay: {:?}",
            tree(&data.join("jobs"))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let jobs_before = 0;
    for (form, expected) in [
        (
            Form::new()
                .part("files", part(b"a", "a.txt"))
                .part("files", part(b"again", "a.txt")),
            "repeated",
        ),
        (
            Form::new()
                .part("run.sh", part(b"true", "run.sh"))
                .part("data", part(b"x", "data"))
                .part("data/a.pdb", part(b"y", "a.pdb")),
            "directory",
        ),
        (Form::new().part("input", part(b"x", "../escape.pdb")), ".."),
        (
            Form::new().part("input", Part::bytes(b"content".to_vec()).file_name("")),
            "empty filename",
        ),
        (
            Form::new().part("optional", Part::bytes(Vec::new()).file_name("")),
            "no file",
        ),
    ] {
        let form = form.text("user_id", "7").text("service", "example");
        let (status, body) = post_upload(&http, &server.url, form).await;
        assert_eq!(status, 400, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{expected:?} not in {body}");
    }
    assert_eq!(
        tree(&data.join("jobs")).len(),
        jobs_before,
        "{:?}",
        tree(&data)
    );
    assert!(tree(&data.join("staging")).is_empty(), "{:?}", tree(&data));
}

/// `GET /` as the reference answers it: `{"message":"pong"}` (we add fields, never drop it).
async fn assert_pong(http: &reqwest::Client, base: &str) {
    let ping: serde_json::Value = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ping["message"], "pong", "{ping}");
}

#[tokio::test]
async fn our_client_takes_files_under_any_field_name() {
    let client = TestClient::start(&[]);
    assert_pong(&client.http, &client.url("")).await;
    let form = Form::new()
        .text("key", "")
        .text("unknown", "ignored")
        .part("script", part(b"cat x.pdb sub/y.pdb > out.txt\n", "run.sh"))
        .part("pdb", part(b"X", "x.pdb"))
        .part("sub/y.pdb", part(b"Y", "y.pdb"));
    let (status, record) = client.submit_form(form).await;
    assert_eq!(status, 200, "{record}");
    let entries = client.retrieve_zip(record["id"].as_u64().unwrap()).await;
    assert_eq!(entries["out.txt"], b"XY");

    let (status, body) = client
        .submit_form(
            Form::new()
                .part("a", part(b"1", "same.txt"))
                .part("b", part(b"2", "same.txt")),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("repeated"),
        "{body}"
    );
    assert!(client.entries_in("staging").is_empty());
}

#[tokio::test]
async fn our_server_serves_partial_results_and_terminate_before_dispatch() {
    // Where the reference answers 404 (partial) and 500 (terminate) for a job not yet sent.
    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(
        dir.path(),
        &[("parked", vec!["http://127.0.0.1:9".into()], 5, 5)],
    );
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let form = Form::new()
        .text("user_id", "3")
        .text("service", "parked")
        .part("input", part(b"true\n", "run.sh"));
    let (status, body) = post_upload(&http, &server.url, form).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_i64().unwrap();
    let response = http
        .get(format!("{}/download_partial/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/zip");
    let entries = unzip(&response.bytes().await.unwrap());
    assert_eq!(entries["run.sh"], b"true\n");

    let response = http
        .post(format!("{}/terminate/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Killed", "{job}");
    let response = http
        .post(format!("{}/terminate/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
}
