//! The server against its own faults: a background loop that panics (restarted, visible on
//! `/health` and in the metrics), connections pooled no longer than clients keep them, and a
//! cleaned job's timeline removed with its files.

mod support;

use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(90);

#[tokio::test]
async fn a_cleaned_job_has_no_timeline_left_and_its_events_answer_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 2, 4)]);
    let server = start_server(dir.path(), &config, &["--max-age", "1"]);
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
