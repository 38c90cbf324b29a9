//! Sizes and counts through the server with real client processes: a service's `max_result`
//! cuts off a result while it streams, sparse results arrive deflated, a job of more files
//! than the open-file limit is sent, and `max_files` refuses an upload leaving nothing.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);

/// A TOML service file of one service `example` on `client` with extra keys.
fn config_with(dir: &Path, client: &str, extra: &str) -> PathBuf {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!("[services.example]\nclients = [{client:?}]\n{extra}\n"),
    )
    .unwrap();
    path
}

/// The largest file below `dir`, in bytes actually written (`st_blocks`), with its path.
fn largest_file(dir: &Path) -> (u64, PathBuf) {
    use std::os::unix::fs::MetadataExt;
    tree(dir)
        .into_iter()
        .filter_map(|p| {
            let meta = std::fs::symlink_metadata(&p).ok()?;
            meta.is_file().then(|| (meta.blocks() * 512, p))
        })
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_max_result_fails_the_job_with_a_clear_reason_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = config_with(dir.path(), &client.url, "max_result = 1048576");
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    // 5 GiB that cost the job nothing: a sparse file. Deflated, still well over 1 MiB.
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[(
            "run.sh",
            b"truncate -s 5G sparse.bin\nhead -c 100000 /dev/urandom > noise.bin\n",
        )],
    )
    .await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Failed", "{job}\n{}", server.log());
    let message = job["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("max_result") && message.contains("1048576"),
        "a clear reason: {job}"
    );
    let (size, path) = largest_file(&dir.path().join("server"));
    assert!(size < 4 << 20, "{} holds {size} bytes", path.display());
    // Nothing half-stored is offered as the job's results.
    let partial = http
        .get(format!("{}/download/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_ne!(
        partial.headers().get("content-type").unwrap(),
        "application/zip"
    );
    // The client's copy was released: the next job runs as usual.
    let next = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo ok > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, next, &["Completed"], LONG).await;
    eprintln!("over max_result: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparse_gigabyte_result_becomes_a_small_zip() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = config_with(dir.path(), &client.url, "");
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[(
            "run.sh",
            b"truncate -s 1G sparse.bin\nseq 1 100000 | tee numbers.txt\n",
        )],
    )
    .await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Completed", "{job}\n{}", server.log());
    let zip = download_zip(&http, &server.url, id).await;
    assert!(zip.len() < 16 << 20, "a ZIP of {} bytes", zip.len());
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&zip)).unwrap();
    let sparse = archive.by_name("sparse.bin").unwrap();
    assert_eq!(sparse.size(), 1 << 30);
    assert_eq!(sparse.compression(), zip::CompressionMethod::Deflated);
    drop(sparse);
    let mut numbers = String::new();
    std::io::Read::read_to_string(&mut archive.by_name("numbers.txt").unwrap(), &mut numbers)
        .unwrap();
    assert_eq!(numbers.lines().count(), 100_000);
    assert_eq!(numbers.lines().last(), Some("100000"));
    // The log shown from the stored (deflated) ZIP.
    let log = http
        .get(format!("{}/jobs/{id}/log?stream=stdout", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), 200);
    let text = log.text().await.unwrap();
    assert!(
        text.starts_with("1\n2\n3\n"),
        "{:?}",
        &text[..text.len().min(100)]
    );
    eprintln!("1 GiB sparse result: a ZIP of {} bytes", zip.len());
}

/// Lowers the open-file limit (soft and hard) of a running process; false without `prlimit`.
fn limit_open_files(pid: u32, limit: u32) -> bool {
    std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_more_files_than_the_open_file_limit_is_sent_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = config_with(dir.path(), &client.url, "");
    let server = TestServer::start(dir.path(), &config, &[]);
    if !limit_open_files(server.pid(), 1024) {
        eprintln!("skipped: prlimit could not lower the server's open-file limit");
        return;
    }
    let http = http();
    let names: Vec<String> = (0..1500).map(|i| format!("in/f{i:04}.txt")).collect();
    let mut files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    files.push(("run.sh", b"ls in | wc -l > count.txt\n"));
    let id = upload_job(&http, &server.url, 1, "example", &files).await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Completed", "{job}\n{}", server.log());
    let zip = download_zip(&http, &server.url, id).await;
    let entries = unzip(&zip);
    assert_eq!(entries["count.txt"], b"1500\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_files_than_max_files_are_refused_with_413_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[services.example]\nclients = [{0:?}]\nmax_files = 10\n\
             [services.wide]\nclients = [{0:?}]\nmax_files = 20\n",
            client.url
        ),
    )
    .unwrap();
    let server = TestServer::start(dir.path(), &path, &[]);
    let http = http();
    let names: Vec<String> = (0..25).map(|i| format!("f{i}.txt")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    // Over the service's limit (known once the form is read), and over every service's
    // (refused while the files arrive).
    for (service, count) in [("example", 11), ("example", 25), ("wide", 21)] {
        let response = http
            .post(format!("{}/upload", server.url))
            .multipart(
                files_form(&files[..count])
                    .text("user_id", "1")
                    .text("service", service),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "{service} with {count} files");
        let body: serde_json::Value = response.json().await.unwrap();
        let text = body.to_string();
        assert!(text.contains("files"), "a clear reason: {body}");
        assert!(tree(&dir.path().join("server/staging")).is_empty());
        assert!(tree(&dir.path().join("server/jobs")).is_empty());
    }
    // At the limit: accepted.
    let mut files = files[..9].to_vec();
    files.push(("run.sh", b"ls | wc -l > count.txt\n"));
    let id = upload_job(&http, &server.url, 1, "example", &files).await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
}
