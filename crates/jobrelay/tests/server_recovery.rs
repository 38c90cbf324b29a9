//! No job lost: the server killed with SIGKILL and restarted, a client killed mid-run.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use support::db::TestDb;
use support::net::{addr_of, free_port};
use support::runlog::count_lines;
use support::server::*;
use support::*;

on_both_databases!(
    #[tokio::test]
    server_killed_mid_run_and_restarted_completes_every_job_exactly_once,
    #[tokio::test]
    a_client_killed_mid_run_loses_no_job,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_server_dying_between_submit_and_commit_does_not_run_the_job_twice,
    #[tokio::test]
    a_client_restarted_or_wiped_mid_run_gets_its_jobs_again,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_wiped_client_giving_a_payload_id_again_does_not_cross_results,
    #[tokio::test]
    a_job_terminated_while_its_client_is_down_is_killed_there_once_it_is_back,
);

const LONG: Duration = Duration::from_secs(120);

/// A job that appends its name to `log` (outside its work directory), works a while, and
/// writes its name to out.txt.
fn logging_script(log: &Path, name: &str, seconds: f64) -> String {
    format!(
        "echo {name} >> {log}\nsleep {seconds}\necho {name} > out.txt\n",
        log = log.display()
    )
}

async fn server_killed_mid_run_and_restarted_completes_every_job_exactly_once(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log = root.join("runs.log");
    let client = start_client(root, "client", &["--slots", "2"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let mut server = TestServer::start(root, &config, &db.args(&[]));
    let http = http();

    let names: Vec<String> = (1..=8).map(|n| format!("job{n}")).collect();
    let mut ids = Vec::new();
    for (n, name) in names.iter().enumerate() {
        let script = logging_script(&log, name, 0.7);
        ids.push(
            upload_job(
                &http,
                &server.url,
                1 + (n as i64 % 2),
                "example",
                &[("run.sh", script.as_bytes())],
            )
            .await,
        );
    }
    // Kill the server while jobs run on the client and others wait.
    eventually(LONG, "a job running", || async {
        (count_lines(&log).len() >= 2).then_some(())
    })
    .await;
    server.kill9();

    // Jobs finish on the client while the server is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart();
    for (id, name) in ids.iter().zip(&names) {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("{name}\n").as_bytes());
    }
    let counts = count_lines(&log);
    for name in &names {
        assert_eq!(counts.get(name), Some(&1), "{name} ran once: {counts:?}");
    }
    // Each job's results stored once (small: in the database, no file), and nothing
    // half-written left.
    let kept = db.result_zips(&root.join("server")).await;
    assert_eq!(
        kept.keys().copied().collect::<Vec<_>>(),
        ids,
        "each job's ZIP in the database"
    );
    let results = tree(&root.join("server/results"));
    assert!(results.is_empty(), "{results:?}");
}

async fn a_client_killed_mid_run_loses_no_job(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log = root.join("runs.log");
    let mut first = start_client(root, "first", &["--slots", "2"]);
    let second = start_client(root, "second", &["--slots", "2"]);
    let config = write_server_config(
        root,
        &[(
            "example",
            vec![first.url.clone(), second.url.clone()],
            10,
            10,
        )],
    );
    let server = TestServer::start(root, &config, &db.args(&["--client-timeout", "3"]));
    let http = http();

    let names: Vec<String> = (1..=6).map(|n| format!("job{n}")).collect();
    let mut ids = Vec::new();
    for name in &names {
        let script = logging_script(&log, name, 2.0);
        ids.push(
            upload_job(
                &http,
                &server.url,
                1,
                "example",
                &[("run.sh", script.as_bytes())],
            )
            .await,
        );
    }
    // Wait until both clients run jobs, then kill the first one.
    let on_first: Vec<i64> = eventually(LONG, "jobs running on both clients", || async {
        let mut on = BTreeMap::<String, Vec<i64>>::new();
        for id in &ids {
            let job = job_json(&http, &server.url, *id).await;
            if job["status"] == "Running" {
                on.entry(job["client"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(*id);
            }
        }
        (on.len() == 2).then(|| on.remove(&first.url).unwrap())
    })
    .await;
    first.kill9();

    for (id, name) in ids.iter().zip(&names) {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("{name}\n").as_bytes());
    }
    // The jobs that were on the dead client ran again on the other: attempt 2, visible.
    for id in &on_first {
        let job: serde_json::Value = http
            .get(format!("{}/jobs/{id}", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(job["status"], "Completed");
        assert_eq!(job["attempts"], 2, "{job}");
        assert_eq!(job["client"], second.url.as_str(), "{job}");
    }
    let log_text = server.log();
    assert!(
        log_text.contains("unreachable"),
        "the server said why the jobs were queued again"
    );
}

async fn a_server_dying_between_submit_and_commit_does_not_run_the_job_twice(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log = root.join("runs.log");
    let client = start_client(root, "client", &["--slots", "2"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let mut server = TestServer::start_with_env(
        root,
        &config,
        &db.args(&[]),
        &[("JOBRELAY_TEST_CRASH_AFTER_SUBMIT", "1")],
    );
    let http = http();
    let script = logging_script(&log, "once", 0.2);
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    // The server exits once the client has the payload, before recording it.
    let status = tokio::task::block_in_place(|| server.proc.child.wait().unwrap());
    assert_eq!(status.code(), Some(86), "{}", server.log());

    // Started again without the crash.
    let server = TestServer::start(root, &config, &db.args(&[]));
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"once\n");
    // Sent twice with the same key, run once.
    assert_eq!(count_lines(&log).get("once"), Some(&1));
    let job: serde_json::Value = http
        .get(format!("{}/jobs/{id}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["attempts"], 1, "{job}");
}

async fn a_client_restarted_or_wiped_mid_run_gets_its_jobs_again(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log = root.join("runs.log");
    let port = free_port();
    let start = |name: &str| start_client_at(root, name, port, &["--slots", "4"]);
    let mut client = start("client");
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let server = TestServer::start(root, &config, &db.args(&[]));
    let http = http();

    // Phase 1: the client is killed and restarted with its data: it follows the payloads
    // that still run (their supervisors outlived it), so each completes in its first
    // attempt and runs once.
    let mut ids = Vec::new();
    for n in 1..=2 {
        let script = logging_script(&log, &format!("a{n}"), 1.5);
        ids.push(
            upload_job(
                &http,
                &server.url,
                1,
                "example",
                &[("run.sh", script.as_bytes())],
            )
            .await,
        );
    }
    for id in &ids {
        wait_status(&http, &server.url, *id, &["Running"], LONG).await;
    }
    client.kill9();
    let mut client = start("client");
    for id in &ids {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
        let job: serde_json::Value = http
            .get(format!("{}/jobs/{id}", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(job["attempts"], 1, "{job}");
    }
    let runs = count_lines(&log);
    assert_eq!(
        (runs.get("a1"), runs.get("a2")),
        (Some(&1), Some(&1)),
        "{runs:?}"
    );

    // Phase 2: the client comes back with an empty data directory (a new node, ids from 1
    // again): the server must not take another payload's results for its jobs.
    let mut ids = Vec::new();
    for n in 1..=2 {
        let script = logging_script(&log, &format!("b{n}"), 1.5);
        ids.push(
            upload_job(
                &http,
                &server.url,
                1,
                "example",
                &[("run.sh", script.as_bytes())],
            )
            .await,
        );
    }
    for id in &ids {
        wait_status(&http, &server.url, *id, &["Running"], LONG).await;
    }
    client.kill9();
    let _client = start("client-wiped");
    for (n, id) in ids.iter().enumerate() {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("b{}\n", n + 1).as_bytes());
    }
    let log_text = server.log();
    assert!(log_text.contains("node changed"), "phase 2 reason logged");
}

/// A script that logs its start, waits (at most 60 s) for `flag` to exist, and writes `name`
/// to out.txt.
fn gated_script(log: &Path, flag: &Path, name: &str) -> String {
    format!(
        "echo {name} >> {log}\nfor i in $(seq 600); do [ -e {flag} ] && break; sleep 0.1; done\n\
         echo {name} > out.txt\n",
        log = log.display(),
        flag = flag.display()
    )
}

/// Item 3 of issue 20: a client whose data directory went back (here wiped, `node-id` kept)
/// hands out a payload id an earlier job of another user still holds. The server must see
/// from the payload's key that it is not that job's run, queue the job again, and give each
/// job its own results.
///
/// To make the order certain, the server knows the one client under two addresses: service
/// `a` through a proxy (user 1's job), service `b` directly (user 2's). The proxy is cut while
/// the client is wiped and user 2's job takes the freed payload id; then it heals and the
/// server looks at user 1's job again.
async fn a_wiped_client_giving_a_payload_id_again_does_not_cross_results(db: TestDb) {
    use support::proxy::{FaultProxy, Mode};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log = root.join("runs.log");
    let (flag1, flag2) = (root.join("go1"), root.join("go2"));
    let port = free_port();
    let data = root.join("client");
    let start = || start_client_at(root, "client", port, &["--slots", "4"]);
    let mut client = start();
    let proxy = FaultProxy::start(addr_of(&client.url));
    let config = write_server_config(
        root,
        &[
            ("a", vec![proxy.url()], 10, 10),
            ("b", vec![client.url.clone()], 10, 10),
        ],
    );
    let server = TestServer::start(root, &config, &db.args(&["--client-timeout", "120"]));
    let http = http();
    let script1 = gated_script(&log, &flag1, "job1");
    let job1 = upload_job(
        &http,
        &server.url,
        1,
        "a",
        &[("run.sh", script1.as_bytes())],
    )
    .await;
    let running = wait_status(&http, &server.url, job1, &["Running"], LONG).await;
    let dest1 = running["dest_id"].as_i64().unwrap();

    // The server loses sight of the client through `a`; the client dies and comes back with
    // its records gone but its node kept.
    proxy.set(Mode::Drop);
    client.kill9();
    for gone in ["payloads", "next-id", "work"] {
        let path = data.join(gone);
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    assert!(data.join("node-id").is_file());
    let _client = start();
    let script2 = gated_script(&log, &flag2, "job2");
    let job2 = upload_job(
        &http,
        &server.url,
        2,
        "b",
        &[("run.sh", script2.as_bytes())],
    )
    .await;
    let running = wait_status(&http, &server.url, job2, &["Running"], LONG).await;
    assert_eq!(
        running["dest_id"].as_i64(),
        Some(dest1),
        "precondition: user 2's job got the payload id user 1's job had"
    );

    // The link heals: the server sees payload `dest1` running under another key.
    proxy.set(Mode::Pass);
    let requeued = eventually(
        Duration::from_secs(60),
        "user 1's job sent again",
        || async {
            let job = job_record(&http, &server.url, job1).await;
            (job["attempts"].as_u64() >= Some(2) && job["dest_id"].as_i64() != Some(dest1))
                .then_some(job)
        },
    )
    .await;
    let history = job_history(&http, &server.url, job1).await;
    assert!(
        history.to_string().contains("not this job's run"),
        "the reason is recorded: {history}"
    );
    assert_ne!(requeued["status"], "Completed");

    std::fs::write(&flag1, "").unwrap();
    std::fs::write(&flag2, "").unwrap();
    for (id, name) in [(job1, "job1"), (job2, "job2")] {
        // Any final state ends the wait: a job that failed says why at once.
        let job = wait_status(
            &http,
            &server.url,
            id,
            &["Completed", "Failed", "Killed", "Invalid"],
            LONG,
        )
        .await;
        assert_eq!(
            job["status"],
            "Completed",
            "job {id}: {job}\n{}\n{}",
            job_history(&http, &server.url, id).await,
            server.log()
        );
        let entries = unzip(&download_zip(&http, &server.url, id).await);
        assert_eq!(
            entries["out.txt"],
            format!("{name}\n").as_bytes(),
            "job {id} got its own results"
        );
    }
}

/// Item 9 of issue 20: a database emptied under a data directory that holds jobs' files
/// (`truncate -s 0`) is refused at start, saying how to proceed; once the operator moves the
/// old files away, the server starts, and job ids continue after the ones handed out before.
#[tokio::test]
async fn an_emptied_database_is_refused_and_job_ids_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 10)]);
    let http = http();
    let server = TestServer::start(root, &config, &[]);
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(
            upload_job(
                &http,
                &server.url,
                1,
                "example",
                // Results over 256 KiB (noise does not deflate): files on disk. A small
                // result is kept in the database (issue 18) and goes with it: no file for
                // the check to find, and none a start could delete.
                &[("run.sh", b"head -c 300000 /dev/urandom > out.bin\n")],
            )
            .await,
        );
    }
    for id in &ids {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
    }
    let data = server.data_dir();
    drop(server);
    let db = data.join("jobrelay.sqlite");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(0)
        .unwrap();
    for side in ["jobrelay.sqlite-wal", "jobrelay.sqlite-shm"] {
        let _ = std::fs::remove_file(data.join(side));
    }

    let log = root.join("refused.log");
    let mut refused = std::process::Command::new(binary())
        .args(["server", "--port", "0", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .env_remove("PORT")
        .env_remove("DATA_PATH")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = refused.kill();
            let _ = refused.wait();
            panic!("the server started on an emptied database and kept running");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "refused to start: {stderr}");
    assert!(
        stderr.contains("does not know 2 stored result(s)")
            && stderr.contains("Restore the database from a backup"),
        "says why and how to proceed: {stderr}"
    );
    assert_eq!(
        std::fs::read_dir(data.join("results")).unwrap().count(),
        2,
        "the results are still there"
    );

    // The operator starts afresh: the old files moved away, the ids go on.
    for sub in ["jobs", "results"] {
        std::fs::rename(data.join(sub), root.join(format!("{sub}.old"))).unwrap();
    }
    let server = TestServer::start(root, &config, &[]);
    let id = upload_job(
        &http,
        &server.url,
        2,
        "example",
        &[("run.sh", b"echo b > out.txt\n")],
    )
    .await;
    assert!(
        id > ids[1],
        "job id {id} reuses one handed out before ({ids:?})"
    );
    let health = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

/// A job terminated while its client cannot be reached is Killed at once, and its run there
/// (followed by the restarted client, its supervisor having outlived the crash) is killed as
/// soon as the client answers again: a terminate never leaves a run going.
async fn a_job_terminated_while_its_client_is_down_is_killed_there_once_it_is_back(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let port = free_port();
    let start = || start_client_at(root, "client", port, &[]);
    let mut client = start();
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(root, &config, &db.args(&[]));
    let http = http();
    let pid_file = root.join("child.pid");
    let script = format!("sleep 300 &\necho $! > {}\nwait\n", pid_file.display());
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    wait_status(&http, &server.url, id, &["Running"], LONG).await;
    let child = read_pid(&pid_file).await;

    client.kill9();
    let response = http
        .post(format!("{}/terminate/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Killed", "{job}");
    assert!(
        pid_alive(child),
        "the run should outlive its client's crash"
    );

    let _client = start();
    eventually(
        LONG,
        "the terminated run to be killed on the client",
        || async { (!pid_alive(child)).then_some(()) },
    )
    .await;
}
