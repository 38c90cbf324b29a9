//! The executor client through HTTP only: the seed contract round trip.

mod support;

use std::time::Duration;
use support::*;

#[tokio::test]
async fn seed_round_trip_submit_retrieve_zip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = Proc::start(
        &[
            "client",
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        dir.path(),
    );
    let http = http();
    let script = b"echo hello; echo result > out.txt; mkdir -p sub; echo deep > sub/d.txt\n";
    let record: serde_json::Value = http
        .post(format!("{}/submit", client.url))
        .multipart(files_form(&[("run.sh", script), ("input.pdb", b"ATOM")]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "Prepared");
    assert_eq!(record["pid"], 0);
    assert_eq!(record["killed"], false);
    assert_eq!(record["input"], serde_json::json!({}));
    let id = record["id"].as_u64().unwrap();
    let loc = record["loc"].as_str().unwrap();
    assert!(std::path::Path::new(loc).is_absolute());

    let zip = eventually(Duration::from_secs(30), "a ZIP", || {
        let http = http.clone();
        let url = format!("{}/retrieve/{id}", client.url);
        async move {
            let response = http.get(url).send().await.ok()?;
            assert_eq!(response.status(), 200);
            let is_zip = response.headers()["content-type"] == "application/zip";
            let body = response.bytes().await.ok()?;
            is_zip.then_some(body)
        }
    })
    .await;
    let entries = unzip(&zip);
    assert_eq!(entries["out.txt"], b"result\n");
    assert_eq!(entries["sub/d.txt"], b"deep\n");
    assert_eq!(entries["input.pdb"], b"ATOM");
    assert_eq!(entries["run.sh"], script);
    assert_eq!(entries[".jobrelay.stdout"], b"hello\n");
}
