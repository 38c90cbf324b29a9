//! Submissions the client must refuse, leaving nothing on disk; size limits; disk full;
//! and the extensions that ride on /submit (idempotency key) and after it (events, release).

mod support;

use std::time::Duration;
use support::multipart::raw_multipart;
use support::*;

const BOUNDARY: &str = "jobrelay-test-boundary";

async fn post_raw(
    client: &TestClient,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let response = client
        .http
        .post(client.url("/submit"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, json)
}

fn assert_nothing_stored(client: &TestClient) {
    assert_eq!(
        client.entries_in("staging"),
        Vec::<String>::new(),
        "staging"
    );
    assert_eq!(client.entries_in("work"), Vec::<String>::new(), "work");
    assert_eq!(
        client.entries_in("payloads"),
        Vec::<String>::new(),
        "payloads"
    );
}

#[tokio::test]
async fn bad_submissions_are_refused_with_json_and_leave_nothing_behind() {
    let client = TestClient::start(&["--max-upload", "4096"]);
    let multipart = format!("multipart/form-data; boundary={BOUNDARY}");
    let run: &[u8] = b"echo hi\n";
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("not multipart", "application/json".into(), b"{}".to_vec(), 400),
        (
            "cut multipart",
            multipart.clone(),
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"run.sh\"\r\n\r\necho").into_bytes(),
            400,
        ),
        ("no file", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"user"), None, b"1")]), 400),
        ("empty body", multipart.clone(), raw_multipart(BOUNDARY, &[]), 400),
        ("empty name", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b""), run)]), 400),
        ("absolute", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"/etc/cron.d/x"), run)]), 400),
        ("dot-dot", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"../../x"), run)]), 400),
        ("inner dot-dot", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"a/../../x"), run)]), 400),
        ("backslash", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"a\\b"), run)]), 400),
        ("nul", multipart.clone(), raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"a\0b"), run)]), 400),
        (
            "repeated",
            multipart.clone(),
            raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"run.sh"), run), (Some(b"file"), Some(b"run.sh"), run)]),
            400,
        ),
        (
            "file and directory",
            multipart.clone(),
            raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"a"), run), (Some(b"file"), Some(b"a/b"), run)]),
            400,
        ),
        (
            "too large",
            multipart.clone(),
            raw_multipart(BOUNDARY, &[(Some(b"file"), Some(b"run.sh"), run), (Some(b"file"), Some(b"big"), &[b'x'; 5000])]),
            413,
        ),
    ];
    for (what, content_type, body, expected) in cases {
        let (status, json) = post_raw(&client, &content_type, body).await;
        assert_eq!(status, expected, "{what}: {json}");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {json}"
        );
        assert_nothing_stored(&client);
    }
    // A declared length far over the limit is refused before the body is read.
    let response = client
        .http
        .post(client.url("/submit"))
        .header("content-type", &multipart)
        .body(vec![b'x'; 3 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_nothing_stored(&client);

    // And the client still serves.
    let id = client.submit_script("echo fine > ok\n").await;
    assert_eq!(client.retrieve_zip(id).await["ok"], b"fine\n");
}

#[tokio::test]
async fn disk_full_while_storing_answers_507_and_leaves_nothing() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=2m",
            "tmpfs",
            data.to_str().unwrap(),
        ])
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipped: could not mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(data.clone());
    let client = Proc::start(
        &[
            "client",
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &dir.path().join("logs"),
    );
    let http = http();
    let big = vec![b'x'; 4 * 1024 * 1024];
    let response = http
        .post(format!("{}/submit", client.url))
        .multipart(files_form(&[("run.sh", b"true\n"), ("big.bin", &big)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 507);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("disk"), "{body}");
    assert_eq!(std::fs::read_dir(data.join("staging")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(data.join("work")).unwrap().count(), 0);
    // Still serving once space is there.
    let ok = http
        .post(format!("{}/submit", client.url))
        .multipart(files_form(&[("run.sh", b"true\n")]))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_resent_submission_with_a_known_key_does_not_run_twice() {
    let client = TestClient::start(&[]);
    let log = tempfile::tempdir().unwrap();
    let runs = log.path().join("runs");
    let script = format!("echo ran >> {}\n", runs.display());
    let submit =
        || files_form(&[("run.sh", script.as_bytes())]).text("key", "server-a:job-17:attempt-1");
    let (_, first) = client.submit_form(submit()).await;
    let (status, second) = client.submit_form(submit()).await;
    assert_eq!(status, 200);
    assert_eq!(first["id"], second["id"]);
    assert_eq!(second["key"], "server-a:job-17:attempt-1");
    let id = first["id"].as_u64().unwrap();
    client.wait_for(id, "Completed").await;
    let (_, third) = client.submit_form(submit()).await;
    assert_eq!(third["id"], first["id"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n");
    assert_eq!(client.entries_in("staging"), Vec::<String>::new());
}

#[tokio::test]
async fn change_feed_reports_state_changes_and_wakes_long_polls() {
    let client = TestClient::start(&[]);
    let info: serde_json::Value = client
        .http
        .get(client.url("/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(info["features"]
        .as_array()
        .unwrap()
        .contains(&"events".into()));
    let empty: serde_json::Value = client
        .http
        .get(client.url("/events?after=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(empty["events"], serde_json::json!([]));
    assert_eq!(empty["instance"], info["instance"]);

    let poll = {
        let http = client.http.clone();
        let url = client.url("/events?after=0&wait=30");
        tokio::spawn(async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        })
    };
    let id = client.submit_script("exit 4\n").await;
    let first = poll.await.unwrap();
    assert_eq!(first["events"][0]["id"], id);
    client.wait_for(id, "Failed").await;
    let all: serde_json::Value = client
        .http
        .get(client.url("/events?after=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let states: Vec<_> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(states, ["Running", "Failed"]);
    assert_eq!(all["events"][1]["exit_code"], 4);
    assert_eq!(all["next"], 2);
    let bad = client
        .http
        .get(client.url("/events?after=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn release_and_max_age_remove_work_directories() {
    // Release on a client without a short --max-age: the janitor must not race the test to
    // the Completed state it waits for (the Cleaned-first order is tested in client_files).
    let client = TestClient::start(&[]);
    let released = client.submit_script("echo a > a\n").await;
    client.wait_for(released, "Completed").await;
    let response = client
        .http
        .post(client.url(&format!("/release/{released}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let record: serde_json::Value = response.json().await.unwrap();
    assert_eq!(record["status"], "Cleaned");
    assert!(!std::path::Path::new(record["loc"].as_str().unwrap()).exists());

    let running = client.submit_script("sleep 300\n").await;
    client.wait_for(running, "Running").await;
    let early = client
        .http
        .post(client.url(&format!("/release/{running}")))
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), 409);
    let _ = client
        .http
        .post(client.url(&format!("/kill/{running}")))
        .send()
        .await;

    // Aged out: whatever moment /retrieve is asked, it answers the ZIP (Completed) or the
    // record (Cleaned), never 410 for a Completed payload (`record` asserts 200).
    let client = TestClient::start(&["--max-age", "1"]);
    let aged = client.submit_script("echo b > b\n").await;
    let record = client.wait_for(aged, "Cleaned").await;
    assert!(!std::path::Path::new(record["loc"].as_str().unwrap()).exists());
    let partial = client
        .http
        .get(client.url(&format!("/retrieve_partial/{aged}")))
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 410);
}

/// `release_in_events`: `GET /events?release=ID,…` releases finished payloads as
/// `/release/{id}` would, skips one that has not finished, refuses a malformed list with a
/// JSON 400 (releasing nothing), and the Cleaned news it makes wakes no waiting call.
#[tokio::test]
async fn the_change_feed_releases_the_payloads_it_is_given() {
    let client = TestClient::start(&[]);
    let info = client.http.get(client.url("/info")).send().await.unwrap();
    let info: serde_json::Value = info.json().await.unwrap();
    assert!(info["features"]
        .as_array()
        .unwrap()
        .contains(&"release_in_events".into()));
    let done = [
        client.submit_script("echo a > a\n").await,
        client.submit_script("echo b > b\n").await,
    ];
    let running = client.submit_script("sleep 300\n").await;
    for id in done {
        client.wait_for(id, "Completed").await;
    }
    client.wait_for(running, "Running").await;
    let feed = |query: String| {
        let http = client.http.clone();
        let url = client.url(&format!("/events?{query}"));
        async move { http.get(url).send().await.unwrap() }
    };
    let latest: serde_json::Value = feed("after=0".into()).await.json().await.unwrap();
    let after = latest["next"].as_u64().unwrap();

    for bad in ["1,x", "1,,2", "-1", "1;2"] {
        let answer = feed(format!("after={after}&release={bad}")).await;
        assert_eq!(answer.status(), 400, "release={bad}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("release"),
            "{body}"
        );
    }
    let too_many = vec!["1"; 1_001].join(",");
    assert_eq!(
        feed(format!("after={after}&release={too_many}"))
            .await
            .status(),
        400
    );
    assert_eq!(client.record(done[0]).await["status"], "Completed");

    // Released with a waiting call: their Cleaned news does not answer it, the wait does.
    let started = std::time::Instant::now();
    let release = format!("{},{},{running},99999", done[0], done[1]);
    let page: serde_json::Value = feed(format!("after={after}&wait=2&release={release}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
    let cleaned: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_u64().unwrap(), e["status"].as_str().unwrap()))
        .collect();
    assert_eq!(cleaned, [(done[0], "Cleaned"), (done[1], "Cleaned")]);
    for id in done {
        let record = client.record(id).await;
        assert_eq!(record["status"], "Cleaned");
        assert!(!std::path::Path::new(record["loc"].as_str().unwrap()).exists());
    }
    assert_eq!(client.record(running).await["status"], "Running");
    let metrics = metrics_text(&client.http, &client.proc.url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "jobrelay_client_releases_total{by=\"events\"} 2"),
        "{metrics}"
    );
    let _ = client.kill(running).await;
}
