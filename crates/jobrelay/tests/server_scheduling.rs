//! Quotas, round-robin fairness and terminate, through a real server and client.

mod support;

use std::path::Path;
use std::time::Duration;

use support::db::TestDb;
use support::server::*;
use support::*;

on_both_databases!(
    #[tokio::test]
    reference_quota_example_three_plus_two_run_and_the_rest_wait,
    #[tokio::test]
    waiting_users_take_turns_and_each_users_jobs_go_in_order,
    #[tokio::test]
    terminate_queued_running_and_finished_jobs,
    #[tokio::test]
    terminate_while_the_job_is_being_sent_kills_the_payload_it_became,
    #[tokio::test]
    a_payload_that_ends_before_its_submission_is_recorded_is_still_followed,
);

const LONG: Duration = Duration::from_secs(90);

/// A job that marks its start in `marks/started-NAME`, then waits for `gates/NAME`.
fn gated_script(root: &Path, name: &str) -> String {
    format!(
        "touch {marks}/started-{name}\nwhile [ ! -e {gates}/{name} ]; do sleep 0.05; done\necho {name} > out.txt\n",
        marks = root.join("marks").display(),
        gates = root.join("gates").display(),
    )
}

fn started(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("marks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_prefix("started-").map(str::to_owned))
        .collect();
    names.sort();
    names
}

async fn statuses(http: &reqwest::Client, server: &str, ids: &[i64]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        out.push(
            job_json(http, server, *id).await["status"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    out
}

fn active(statuses: &[String]) -> usize {
    statuses
        .iter()
        .filter(|s| matches!(s.as_str(), "Processing" | "Submitted" | "Running"))
        .count()
}

async fn reference_quota_example_three_plus_two_run_and_the_rest_wait(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("marks")).unwrap();
    std::fs::create_dir_all(root.join("gates")).unwrap();
    let client = start_client(root, "client", &["--slots", "8"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 3, 5)]);
    let server = TestServer::start(root, &config, &db.args(&[]));
    let http = http();

    let mut ids = Vec::new();
    let mut names = Vec::new();
    for user in [1, 2] {
        for n in 1..=4 {
            let name = format!("u{user}-{n}");
            let script = gated_script(root, &name);
            ids.push(
                upload_job(
                    &http,
                    &server.url,
                    user,
                    "example",
                    &[("run.sh", script.as_bytes())],
                )
                .await,
            );
            names.push(name);
        }
    }
    // 3 + 2 run; 3 wait.
    eventually(LONG, "five jobs started", || async {
        (started(root).len() == 5).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let running = started(root);
    assert_eq!(running.len(), 5, "no more than max_runs: {running:?}");
    assert_eq!(running.iter().filter(|n| n.starts_with("u1-")).count(), 3);
    assert_eq!(running.iter().filter(|n| n.starts_with("u2-")).count(), 2);
    let now = statuses(&http, &server.url, &ids).await;
    assert_eq!(active(&now), 5, "{now:?}");
    assert_eq!(now.iter().filter(|s| *s == "Queued").count(), 3, "{now:?}");

    // A slot frees: exactly one waiting job starts.
    let first = running
        .iter()
        .find(|n| n.starts_with("u1-"))
        .unwrap()
        .clone();
    std::fs::write(root.join("gates").join(&first), "").unwrap();
    let first_id = ids[names.iter().position(|n| *n == first).unwrap()];
    wait_status(&http, &server.url, first_id, &["Completed"], LONG).await;
    eventually(LONG, "a sixth job started", || async {
        (started(root).len() == 6).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(started(root).len(), 6);
    let now = statuses(&http, &server.url, &ids).await;
    assert_eq!(active(&now), 5, "{now:?}");

    // Open every gate: all complete, each with its own output.
    for name in &names {
        std::fs::write(root.join("gates").join(name), "").unwrap();
    }
    for (id, name) in ids.iter().zip(&names) {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("{name}\n").as_bytes());
    }
}

async fn waiting_users_take_turns_and_each_users_jobs_go_in_order(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let order = root.join("order.log");
    let gate = root.join("gate");
    let client = start_client(root, "client", &["--slots", "4"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 1)]);
    let server = TestServer::start(root, &config, &db.args(&[]));
    let http = http();
    let script = |name: &str| {
        format!(
            "echo {name} >> {order}\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n",
            order = order.display(),
            gate = gate.display()
        )
    };
    // A's first job runs (and holds the only run) while everybody else queues.
    let a1 = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script("A1").as_bytes())],
    )
    .await;
    wait_status(&http, &server.url, a1, &["Running"], LONG).await;
    let mut ids = vec![a1];
    for (user, name) in [
        (1, "A2"),
        (1, "A3"),
        (2, "B1"),
        (2, "B2"),
        (2, "B3"),
        (3, "C1"),
        (3, "C2"),
        (3, "C3"),
    ] {
        ids.push(
            upload_job(
                &http,
                &server.url,
                user,
                "example",
                &[("run.sh", script(name).as_bytes())],
            )
            .await,
        );
    }
    std::fs::write(&gate, "").unwrap();
    for id in &ids {
        wait_status(&http, &server.url, *id, &["Completed"], LONG).await;
    }
    let log = std::fs::read_to_string(&order).unwrap();
    let got: Vec<&str> = log.lines().collect();
    // A had A2 and A3 waiting first, then B, then C: turns go A, B, C, A, B, C, ...
    assert_eq!(got, ["A1", "A2", "B1", "C1", "A3", "B2", "C2", "B3", "C3"]);
}

async fn terminate_queued_running_and_finished_jobs(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = root.join("pids");
    std::fs::create_dir_all(&out).unwrap();
    let client = start_client(root, "client", &["--slots", "2", "--kill-grace", "1"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 1)]);
    let server = TestServer::start(root, &config, &db.args(&[]));
    let http = http();

    let running_script = format!(
        "echo started > started.txt\necho $$ > {out}/shell.pid\nsleep 1000 &\necho $! > {out}/child.pid\nsleep 1000\n",
        out = out.display()
    );
    let running = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", running_script.as_bytes())],
    )
    .await;
    let queued = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo never > ran.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, running, &["Running"], LONG).await;
    let pids: Vec<i32> = eventually(LONG, "pid files", || async {
        let shell = std::fs::read_to_string(out.join("shell.pid")).ok()?;
        let child = std::fs::read_to_string(out.join("child.pid")).ok()?;
        Some(vec![shell.trim().parse().ok()?, child.trim().parse().ok()?])
    })
    .await;
    assert!(pids.iter().all(|p| pid_alive(*p)));

    // While it runs, /download_partial comes from the client.
    let partial = eventually(LONG, "started.txt in the partial ZIP", || async {
        let response = http
            .get(format!("{}/download_partial/{running}", server.url))
            .send()
            .await
            .ok()?;
        let entries = unzip(&response.bytes().await.ok()?);
        entries.contains_key("started.txt").then_some(entries)
    })
    .await;
    assert!(partial.contains_key("run.sh"));

    // Queued (max_runs 1 holds it back): Killed without reaching any client.
    assert_eq!(
        job_json(&http, &server.url, queued).await["status"],
        "Queued"
    );
    let response = http
        .post(format!("{}/terminate/{queued}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Killed");
    assert_eq!(job["attempts"], 0);
    assert!(job["client"].is_null());

    // Running: killed on its client, every process of it gone.
    let response = http
        .post(format!("{}/terminate/{running}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Killed", "{job}");
    eventually(LONG, "the job's processes gone", || async {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    })
    .await;
    // Its work directory as it was is still available.
    let partial = http
        .get(format!("{}/download_partial/{running}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), 200);
    assert_eq!(
        unzip(&partial.bytes().await.unwrap())["started.txt"],
        b"started\n"
    );
    assert_eq!(
        job_json(&http, &server.url, running).await["status"],
        "Killed"
    );

    // Finished: 409, and the job stays Completed with its results.
    let done = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo ok > ok.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, done, &["Completed"], LONG).await;
    let response = http
        .post(format!("{}/terminate/{done}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "Completed");
    assert_eq!(
        unzip(&download_zip(&http, &server.url, done).await)["ok.txt"],
        b"ok\n"
    );
    // Terminating a Killed job again is also 409; an unknown one is 404.
    let again = http
        .post(format!("{}/terminate/{running}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let unknown = http
        .post(format!("{}/terminate/424242", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // The queued job never ran anywhere.
    let ran = tree(&root.join("client"))
        .into_iter()
        .any(|p| p.ends_with("ran.txt"));
    assert!(!ran, "the queued job ran: {}", server.log());
}

async fn terminate_while_the_job_is_being_sent_kills_the_payload_it_became(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ran = root.join("ran.log");
    let client = start_client(root, "client", &["--kill-grace", "1"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start_with_env(
        root,
        &config,
        &db.args(&[]),
        // The client has the payload; the server waits 2 s before recording it.
        &[("JOBRELAY_TEST_PAUSE_AFTER_SUBMIT_MS", "2000")],
    );
    let http = http();
    let script = format!("sleep 5\necho ran >> {}\n", ran.display());
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    wait_status(&http, &server.url, id, &["Processing"], LONG).await;
    let response = http
        .post(format!("{}/terminate/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let job: serde_json::Value = response.json().await.unwrap();
    assert_eq!(job["status"], "Killed");
    // Once the pause is over, the server kills the payload on the client.
    eventually(LONG, "the payload killed on the client", || async {
        let record: serde_json::Value = http
            .get(format!("{}/retrieve/1", client.url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let status = record["status"].as_str()?;
        // Killed, then released (Cleaned) once the server has its partial results.
        (status == "Killed" || (status == "Cleaned" && record["killed"] == true)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!ran.exists(), "the job ran to its end");
    assert_eq!(job_json(&http, &server.url, id).await["status"], "Killed");
}

/// The server looks at a new payload on a client with a change feed only if the feed told of
/// it before the Submitted commit (`early_events`). Here the payload runs to its end while
/// the server waits before that commit: the feed's news of it finds no job, and only the note
/// it leaves makes the job Completed (no later event comes).
async fn a_payload_that_ends_before_its_submission_is_recorded_is_still_followed(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start_with_env(
        root,
        &config,
        &db.args(&[]),
        &[("JOBRELAY_TEST_PAUSE_AFTER_SUBMIT_MS", "1500")],
    );
    let http = http();
    let ids = [
        upload_job(
            &http,
            &server.url,
            1,
            "example",
            &[("run.sh", b"echo a > out.txt\n")],
        )
        .await,
        upload_job(
            &http,
            &server.url,
            2,
            "example",
            &[("run.sh", b"echo b > out.txt\n")],
        )
        .await,
    ];
    for (id, text) in ids.into_iter().zip(["a\n", "b\n"]) {
        wait_status(&http, &server.url, id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&http, &server.url, id).await);
        assert_eq!(entries["out.txt"], text.as_bytes(), "{}", server.log());
    }
}

/// `send_ahead = 1` on a service with one client of one slot: while a job runs, the next one
/// is on the client already (Submitted, in its queue) and a third waits on the server; the
/// one sent ahead starts only once the running one has ended, so the slot is never exceeded.
/// A service without `send_ahead` keeps its next job Queued on the server meanwhile.
#[tokio::test]
async fn a_job_sent_ahead_waits_in_the_clients_queue_and_never_exceeds_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("marks")).unwrap();
    std::fs::create_dir_all(root.join("gates")).unwrap();
    let ahead_client = start_client(root, "ahead-client", &["--slots", "1"]);
    let plain_client = start_client(root, "plain-client", &["--slots", "1"]);
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.ahead]\nclients = [{:?}]\nruns_per_user = 10\nmax_runs = 10\nsend_ahead = 1\n\n\
             [services.plain]\nclients = [{:?}]\nruns_per_user = 10\nmax_runs = 10\n",
            ahead_client.url, plain_client.url
        ),
    )
    .unwrap();
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let upload = |service: &'static str, name: &'static str| {
        let http = http.clone();
        let url = server.url.clone();
        let script = gated_script(root, name);
        async move { upload_job(&http, &url, 1, service, &[("run.sh", script.as_bytes())]).await }
    };
    let (a1, a2, a3) = (
        upload("ahead", "a1").await,
        upload("ahead", "a2").await,
        upload("ahead", "a3").await,
    );
    let (p1, p2) = (upload("plain", "p1").await, upload("plain", "p2").await);
    wait_started(root, &["a1", "p1"]).await;
    let sent = wait_status(&http, &server.url, a2, &["Submitted"], LONG).await;
    assert_eq!(sent["client"], ahead_client.url.as_str(), "{sent}");
    let ahead = statuses(&http, &server.url, &[a3, p2]).await;
    assert_eq!(
        ahead,
        ["Queued", "Queued"],
        "one ahead at most; none without send_ahead"
    );
    assert_eq!(
        started(root),
        ["a1", "p1"],
        "the job sent ahead waits for the slot"
    );

    // a1 ends: a2 takes the slot on the client and a3 goes ahead in its turn.
    std::fs::write(root.join("gates/a1"), "").unwrap();
    wait_status(&http, &server.url, a1, &["Completed"], LONG).await;
    wait_started(root, &["a1", "a2", "p1"]).await;
    wait_status(&http, &server.url, a3, &["Submitted"], LONG).await;
    assert_eq!(started(root), ["a1", "a2", "p1"], "a3 waits for a2's slot");

    for name in ["a2", "a3", "p1", "p2"] {
        std::fs::write(root.join("gates").join(name), "").unwrap();
    }
    for id in [a2, a3, p1, p2] {
        let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
        assert_eq!(job["status"], "Completed", "{job}");
    }
    assert_eq!(started(root), ["a1", "a2", "a3", "p1", "p2"]);
}

/// Waits until exactly `names` have marked their start.
async fn wait_started(root: &Path, names: &[&str]) {
    eventually(LONG, &format!("{names:?} started"), || async {
        (started(root) == names).then_some(())
    })
    .await;
}
