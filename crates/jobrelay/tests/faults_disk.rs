//! Disk full, on small tmpfs mounts made for the test (root only; skipped with a printed
//! reason otherwise): a client full while receiving a payload, a client full while the job
//! writes its output, the server full during an upload.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(180);

/// A tmpfs of `size` mounted on `dir` (created), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: could not mount a tmpfs here");
            return None;
        }
        Some(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_full_while_receiving_does_not_lose_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let Some(_small) = Tmpfs::mount(&root.join("full"), "2m") else {
        return;
    };
    // The full client first in the list, with more slots: placement prefers it.
    let full = start_client(root, "full", &["--slots", "8"]);
    let roomy = start_client(root, "roomy", &["--slots", "2"]);
    let config = write_server_config(
        root,
        &[("example", vec![full.url.clone(), roomy.url.clone()], 10, 10)],
    );
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let big = vec![b'z'; 4 << 20];
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
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    let record: serde_json::Value = http
        .get(format!("{}/jobs/{id}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "Completed", "{record}\n{}", server.log());
    assert_eq!(record["client"], roomy.url.as_str(), "{record}");
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["size.txt"], format!("{}\n", 4 << 20).as_bytes());
    // The full client kept nothing of the refused payload.
    assert!(tree(&root.join("full/staging")).is_empty());
    assert!(tree(&root.join("full/work")).is_empty());
    eprintln!(
        "client full on receive: placed on the other client after {} attempt(s)",
        record["attempts"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_filling_its_clients_disk_fails_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let Some(_small) = Tmpfs::mount(&root.join("client"), "3m") else {
        return;
    };
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[(
            "run.sh",
            b"set -e\nhead -c 10000000 /dev/zero > big.out\necho done > out.txt\n",
        )],
    )
    .await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let message = job["message"].as_str().unwrap_or("");
    assert!(message.contains("full"), "a clear reason: {job}");
    // What the job wrote is kept as its partial results (the script's own error message
    // may be missing: its stderr file is on the full disk too).
    let partial = http
        .get(format!("{}/download_partial/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 200);
    let entries = unzip(&partial.bytes().await.unwrap());
    assert!(entries.contains_key("run.sh"), "{:?}", entries.keys());
    // The client still serves once the job's files are gone.
    let next = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo ok > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, next, &["Completed"], LONG).await;
    eprintln!("client full on output: Failed: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_full_during_upload_answers_507_keeps_nothing_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let Some(_small) = Tmpfs::mount(&root.join("server"), "4m") else {
        return;
    };
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let big = vec![b'q'; 6 << 20];
    let mut refused = 0;
    for _ in 0..3 {
        let response = http
            .post(format!("{}/upload", server.url))
            .multipart(
                files_form(&[("run.sh", b"true\n"), ("big.bin", &big)])
                    .text("user_id", "1")
                    .text("service", "example"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 507);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains("disk"), "{body}");
        assert!(tree(&root.join("server/staging")).is_empty());
        assert!(tree(&root.join("server/jobs")).is_empty());
        refused += 1;
    }
    // Still serving: health, and a small job end to end.
    let health = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo ok > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"ok\n");
    eprintln!("server full: {refused} uploads refused with 507, then a job completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_on_a_full_server_disk_are_fetched_again_and_complete_once_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let Some(_small) = Tmpfs::mount(&root.join("server"), "8m") else {
        return;
    };
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    // The database elsewhere: only the result ZIP meets the full disk. A short client
    // timeout: a fetch that keeps failing for another reason fails the job after it.
    let db = root.join("jobrelay.sqlite");
    let server = TestServer::start(
        root,
        &config,
        &["--db", db.to_str().unwrap(), "--client-timeout", "2"],
    );
    let filler = root.join("server/filler");
    std::fs::write(&filler, vec![0u8; (8 << 20) - (512 << 10)]).unwrap();
    let http = http();
    // 2 MB that do not compress: the ZIP cannot fit in what is left.
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"head -c 2000000 /dev/urandom > noise.bin\n")],
    )
    .await;
    // Fetched and refused by the disk again and again, well past the client timeout...
    eventually(
        LONG,
        "four failed attempts to store the results",
        || async {
            (server
                .log()
                .matches("result not stored; will fetch again")
                .count()
                >= 4)
                .then_some(())
        },
    )
    .await;
    let job = job_json(&http, &server.url, id).await;
    assert!(
        job["status"] == "Running" || job["status"] == "Submitted",
        "still waiting for space, not failed: {job}"
    );
    assert!(server.log().contains("No space left"), "{}", server.log());
    // ...and stored once there is room.
    std::fs::remove_file(&filler).unwrap();
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Completed", "{job}\n{}", server.log());
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["noise.bin"].len(), 2_000_000);
    // No part file of the refused attempts is left.
    assert!(
        tree(&root.join("server/results"))
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".part")),
        "{:?}",
        tree(&root.join("server/results"))
    );
}
