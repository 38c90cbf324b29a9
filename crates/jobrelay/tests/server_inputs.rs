//! Where a job's uploaded files are kept (issue 18): an upload whose files total at most
//! 64 KiB in the database, in the transaction that inserts the job, with no directory or
//! file of its own; a larger one as `<data>/jobs/<id>/`. The client receives the same files
//! either way (its `run.sh` checksums them), a `kill -9` right after the 201 loses none of
//! them, and they go with the job's results.

mod support;

use std::path::Path;
use std::time::Duration;

use support::db::TestDb;
use support::net::free_port;
use support::rng::noise;
use support::server::*;
use support::*;

on_both_databases!(
    #[tokio::test]
    small_inputs_are_kept_in_the_database_and_larger_ones_as_files,
    #[tokio::test]
    a_server_killed_right_after_the_upload_runs_the_job_with_its_inputs,
);

const LONG: Duration = Duration::from_secs(90);

/// The most an upload keeps in the database (`store::MAX_INPUTS_IN_DB`).
const LIMIT: usize = 64 * 1024;

/// A run.sh that checksums every input (itself too) into out.txt before anything else.
const CHECKSUMS: &[u8] = b"sha256sum run.sh empty data/a.bin data/sub/b.txt > out.txt\n";

/// A job of four files (one empty, two in sub-directories) totalling `total` bytes.
fn job(total: usize) -> Vec<(&'static str, Vec<u8>)> {
    let b = b"hello\n".to_vec();
    let a = noise(total - CHECKSUMS.len() - b.len());
    vec![
        ("run.sh", CHECKSUMS.to_vec()),
        ("data/a.bin", a),
        ("data/sub/b.txt", b),
        ("empty", Vec::new()),
    ]
}

/// What `run.sh` must write: the same `sha256sum` run here on the same files.
fn expected_checksums(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let out = std::process::Command::new("sha256sum")
        .args(["run.sh", "empty", "data/a.bin", "data/sub/b.txt"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

async fn upload(
    http: &reqwest::Client,
    server: &str,
    service: &str,
    files: &[(&'static str, Vec<u8>)],
) -> i64 {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    upload_job(http, server, 1, service, &files).await
}

fn job_dir(data: &Path, id: i64) -> std::path::PathBuf {
    data.join(format!("jobs/{id}"))
}

/// The job ran on the client with exactly `files`: its out.txt holds their checksums, and
/// its result ZIP holds them byte for byte.
async fn ran_with(http: &reqwest::Client, server: &str, id: i64, files: &[(&str, Vec<u8>)]) {
    let job = wait_status(http, server, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Completed", "job {id}: {job}");
    let entries = unzip(&download_zip(http, server, id).await);
    assert_eq!(
        String::from_utf8_lossy(&entries["out.txt"]),
        String::from_utf8_lossy(&expected_checksums(files)),
        "job {id}"
    );
    for (name, bytes) in files {
        assert!(entries[*name] == *bytes, "job {id}: {name} differs");
    }
}

async fn small_inputs_are_kept_in_the_database_and_larger_ones_as_files(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    // The client is not there yet: the jobs stay Queued, with their inputs where the
    // server put them.
    let port = free_port();
    let client_url = format!("http://127.0.0.1:{port}");
    let config = write_server_config(dir.path(), &[("example", vec![client_url], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &db.args(&[]));
    let (http, url, data) = (http(), server.url.clone(), server.data_dir());

    let (small_files, large_files) = (job(LIMIT), job(LIMIT + 1));
    let small = upload(&http, &url, "example", &small_files).await;
    let large = upload(&http, &url, "example", &large_files).await;

    // At most the limit: in the database, in the order a directory of them is sent, and
    // nothing on disk (no job directory, nothing left in staging).
    let kept = db.input_files(&data).await;
    let names: Vec<&str> = kept[&small].iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["empty", "run.sh", "data/a.bin", "data/sub/b.txt"]);
    for (name, bytes) in &small_files {
        let stored = kept[&small].iter().find(|(n, _)| n == name).unwrap();
        assert!(stored.1 == *bytes, "{name} is not kept byte for byte");
    }
    assert!(!job_dir(&data, small).exists());
    let staged: Vec<_> = tree(&data.join("staging"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("upload-")
        })
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    // One byte more: files, as before, and no row.
    assert!(!kept.contains_key(&large));
    for (name, bytes) in &large_files {
        let on_disk = std::fs::read(job_dir(&data, large).join(name)).unwrap();
        assert!(on_disk == *bytes, "{name}");
    }
    // Before it runs, /download_partial serves the uploaded files, from either place.
    for (id, files) in [(small, &small_files), (large, &large_files)] {
        let response = http
            .get(format!("{url}/download_partial/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let entries = unzip(&response.bytes().await.unwrap());
        for (name, bytes) in files.iter() {
            assert!(entries[*name] == *bytes, "job {id}: {name}");
        }
    }

    // The client comes: both run with the very files uploaded.
    let _client = start_client_at(dir.path(), "client", port, &[]);
    ran_with(&http, &url, small, &small_files).await;
    ran_with(&http, &url, large, &large_files).await;
    // Their inputs go with their results: the rows in the commit of Completed, the
    // directory after it.
    assert!(
        db.input_files(&data).await.is_empty(),
        "inputs of Completed jobs are still in the database"
    );
    eventually(LONG, "the large job's directory removed", || async {
        (!job_dir(&data, large).exists()).then_some(())
    })
    .await;
}

async fn a_server_killed_right_after_the_upload_runs_the_job_with_its_inputs(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    // Service "later": its client comes after the restart, so its job is surely Queued at
    // the kill. Service "now": its client runs, so its jobs may be anywhere (being sent,
    // on the client) when the server dies, and are sent again from the database.
    let port = free_port();
    let now = start_client(dir.path(), "now", &[]);
    let config = write_server_config(
        dir.path(),
        &[
            ("later", vec![format!("http://127.0.0.1:{port}")], 5, 10),
            ("now", vec![now.url.clone()], 5, 10),
        ],
    );
    let mut server = TestServer::start(dir.path(), &config, &db.args(&[]));
    let (http, data) = (http(), server.data_dir());

    let files: Vec<Vec<(&'static str, Vec<u8>)>> = (0..4).map(|_| job(4096)).collect();
    let queued = upload(&http, &server.url, "later", &files[0]).await;
    let mut sent = Vec::new();
    for files in &files[1..] {
        sent.push(upload(&http, &server.url, "now", files).await);
    }
    // Right after the last 201: nothing after the commit has had to happen.
    server.kill9();
    server.restart();
    assert!(!job_dir(&data, queued).exists());
    assert_eq!(db.input_files(&data).await[&queued].len(), 4);
    let _later = start_client_at(dir.path(), "later", port, &[]);
    ran_with(&http, &server.url, queued, &files[0]).await;
    for (id, files) in sent.iter().zip(&files[1..]) {
        ran_with(&http, &server.url, *id, files).await;
    }
    assert!(db.input_files(&data).await.is_empty());
    for id in [queued].iter().chain(&sent) {
        assert!(!job_dir(&data, *id).exists(), "job {id}");
    }
}
