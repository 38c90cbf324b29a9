//! What the client opens inside a work directory on a job's behalf, and when it removes one:
//! a job that puts a link or a FIFO where its log belongs gets an error back (never the
//! link's target, never a hung thread, also with `--run-as` and `--sandbox`), a flood of
//! such reads leaves the client serving, and a clean-up never cuts a ZIP being streamed.
//!
//! Tests that change user need root, sandbox tests also `bwrap`; they skip (saying why)
//! without them.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use support::host::{have_bwrap, is_root};
use support::*;

const SECRET: &str = "TOP-SECRET-SHADOW-CONTENT";

/// An HTTP client whose requests give up soon: a request the client parks fails the test
/// instead of hanging it.
fn impatient() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `GET /log/{id}?stream=...`: (status, body), or a panic if the client does not answer.
async fn log(http: &reqwest::Client, client: &TestClient, id: u64, stream: &str) -> (u16, Vec<u8>) {
    let response = http
        .get(client.url(&format!("/log/{id}?stream={stream}")))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /log/{id}?stream={stream} got no answer: {e}"));
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

async fn kill(client: &TestClient, id: u64) {
    let response = client.kill(id).await;
    assert!(response.status().is_success(), "{}", response.status());
}

#[tokio::test]
async fn a_log_swapped_for_a_link_or_a_fifo_answers_an_error_never_the_target() {
    // A file only root can read, as /etc/shadow or the server's users file.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("shadow");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut setups: Vec<Vec<&str>> = vec![vec![]];
    if is_root() {
        setups.push(vec!["--run-as", "nobody"]);
    } else {
        eprintln!("skipped with --run-as: needs root");
    }
    if is_root() && have_bwrap() {
        setups.push(vec!["--sandbox"]);
        setups.push(vec!["--sandbox", "--run-as", "nobody"]);
    } else {
        eprintln!("skipped with --sandbox: needs root and bubblewrap");
    }
    let http = impatient();
    for setup in setups {
        let client = TestClient::start_for_other_users(&setup);
        let script = format!(
            "rm -f .jobrelay.stderr .jobrelay.stdout\nmkfifo .jobrelay.stderr\n\
             ln -s {} .jobrelay.stdout\nsleep 300\n",
            secret.display()
        );
        let id = client.submit_script(&script).await;
        // Empty until the link is there; then an error, never the secret.
        let (status, body) = eventually(Duration::from_secs(60), "the log link", || async {
            let (status, body) = log(&http, &client, id, "stdout").await;
            (status != 200 || !body.is_empty()).then_some((status, body))
        })
        .await;
        let text = String::from_utf8_lossy(&body).into_owned();
        assert!(
            !text.contains(SECRET),
            "{setup:?}: the log gave the link's target"
        );
        assert_eq!(status, 409, "{setup:?}: {text}");
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains("symbolic link"),
            "{error}"
        );

        // The FIFO answers at once, with an error.
        let (status, body) = log(&http, &client, id, "stderr").await;
        assert_eq!(status, 409, "{setup:?}: {}", String::from_utf8_lossy(&body));
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(error["error"].as_str().unwrap().contains("FIFO"), "{error}");

        // The partial ZIP holds the link as a link, not what it points at.
        let bytes = http
            .get(client.url(&format!("/retrieve_partial/{id}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        for (name, content) in unzip(&bytes) {
            assert!(
                !String::from_utf8_lossy(&content).contains(SECRET),
                "{setup:?}: {name} leaked the secret"
            );
        }
        kill(&client, id).await;
    }
}

#[tokio::test]
async fn hundreds_of_log_reads_on_a_fifo_leave_the_client_serving() {
    let client = TestClient::start(&[]);
    let id = client
        .submit_script("rm -f .jobrelay.stdout\nmkfifo .jobrelay.stdout\nsleep 300\n")
        .await;
    let record = client.wait_for(id, "Running").await;
    let fifo = PathBuf::from(record["loc"].as_str().unwrap()).join(".jobrelay.stdout");
    eventually(Duration::from_secs(60), "the FIFO", || async {
        std::fs::symlink_metadata(&fifo)
            .ok()
            .filter(|m| m.file_type().is_fifo())
    })
    .await;

    // Before: each of these parked a blocking thread on the FIFO's open for ever, until the
    // pool ran out and no submission was stored any more.
    let http = impatient();
    let url = client.url(&format!("/log/{id}"));
    let answers = futures_util::future::join_all((0..600).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    }))
    .await;
    let unanswered = answers.iter().filter(|a| a.is_err()).count();
    assert_eq!(unanswered, 0, "{unanswered} of 600 log reads got no answer");
    assert!(answers.iter().all(|a| matches!(a, Ok(409))), "{answers:?}");

    // Others' work goes on: a new payload is stored, run and its results fetched, and the
    // client says it is healthy.
    let other = client.submit_script("echo fine > ok.txt\n").await;
    let entries = client.retrieve_zip(other).await;
    assert_eq!(entries["ok.txt"], b"fine\n");
    for path in ["/health", "/info"] {
        let response = http.get(client.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    kill(&client, id).await;
}

#[tokio::test]
async fn a_release_during_a_zip_stream_lets_the_stream_finish_whole() {
    let client = TestClient::start(&[]);
    // Far more than the socket buffers hold, so the stream is still running below.
    let size: usize = 48 * 1024 * 1024;
    let id = client
        .submit_script(&format!(
            "head -c {size} /dev/zero > a-big.bin\necho b > b.txt\necho c > c.txt\n"
        ))
        .await;
    let record = client.wait_for(id, "Completed").await;
    assert_eq!(record["zip"], true);
    let mut stream = client
        .http
        .get(client.url(&format!("/retrieve/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut bytes = stream.chunk().await.unwrap().unwrap().to_vec();

    // The server releases the payload (or the janitor ages it out) while the ZIP streams.
    let released = client
        .http
        .post(client.url(&format!("/release/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    let released: serde_json::Value = released.json().await.unwrap();
    assert_eq!(released["status"], "Cleaned");
    // From now on the payload is Cleaned, not a Completed one whose files are gone.
    assert_eq!(client.record(id).await["status"], "Cleaned");
    let partial = client
        .http
        .get(client.url(&format!("/retrieve_partial/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 410);

    while let Some(chunk) = stream.chunk().await.unwrap() {
        bytes.extend_from_slice(&chunk);
    }
    let entries = unzip(&bytes);
    assert_eq!(entries["a-big.bin"].len(), size);
    assert_eq!(
        entries["b.txt"], b"b\n",
        "the stream was cut by the release"
    );
    assert_eq!(entries["c.txt"], b"c\n");
    // Once the stream is done, the directory goes.
    let loc = PathBuf::from(released["loc"].as_str().unwrap());
    eventually(
        Duration::from_secs(60),
        "the work directory removed",
        || async { (!loc.exists()).then_some(()) },
    )
    .await;
}

/// Issue 20's reproduction, through the server: a job linking its stderr to the server's own
/// mode-600 users file (every token) gets an error from `/jobs/{id}/log`, not the file.
#[tokio::test]
async fn the_servers_log_endpoint_never_serves_what_a_jobs_log_link_points_at() {
    use support::server::*;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let run_as: &[&str] = if is_root() {
        &["--run-as", "nobody"]
    } else {
        eprintln!("without --run-as: needs root");
        &[]
    };
    let client = start_client(dir.path(), "client", run_as);
    let users = dir.path().join("users.toml");
    std::fs::write(
        &users,
        format!("[[users]]\ntoken = \"{SECRET}\"\nuser_id = 1\nadmin = true\n"),
    )
    .unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write_server_config(dir.path(), &[("demo", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(
        dir.path(),
        &config,
        &["--users-file", users.to_str().unwrap()],
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {SECRET}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let script = format!(
        "rm -f .jobrelay.stderr\nln -s {} .jobrelay.stderr\necho linked\nsleep 300\n",
        users.display()
    );
    let id = upload_job(
        &http,
        &server.url,
        1,
        "demo",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    let log_url = format!("{}/jobs/{id}/log", server.url);
    // stdout says "linked" once the link is in place.
    eventually(
        Duration::from_secs(60),
        "the job to link its log",
        || async {
            let response = http.get(&log_url).send().await.ok()?;
            let body = response.bytes().await.ok()?;
            body.starts_with(b"linked").then_some(())
        },
    )
    .await;
    let response = http
        .get(format!("{log_url}?stream=stderr"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(
        !body.contains(SECRET),
        "the server served the users file: {body}"
    );
    // The job's doing, passed on as the client said it: 409, in the reference's error shape.
    assert_eq!(status, 409, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("the client refused to read this log"),
        "{error}"
    );
    let _ = http
        .post(format!("{}/terminate/{id}", server.url))
        .send()
        .await;
}
