//! `jobrelay server migrate`, end to end: a server on SQLite runs jobs (Completed, Failed,
//! Killed, one left Queued, one Running on its client) and is killed; the move is refused
//! while a server holds the source, then done; a server on PostgreSQL on the same data
//! directory serves the old results, timelines and lists, follows the Running job to its end
//! without running it again, runs the Queued job, and gives new ids after the old ones; a
//! second move into the now full database is refused. Needs `JOBRELAY_TEST_POSTGRES`.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::db::Schema;
use support::net::free_port;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);

fn migrate(from: &Path, to: &str) -> Output {
    Command::new(binary())
        .args(["server", "migrate", "--from"])
        .arg(from)
        .args(["--to", to])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

async fn get_json(http: &reqwest::Client, url: String) -> serde_json::Value {
    let answer = http.get(&url).send().await.unwrap();
    assert_eq!(answer.status(), 200, "{url}");
    answer.json().await.unwrap()
}

#[tokio::test]
async fn a_sqlite_server_moves_to_postgres_with_its_jobs_results_and_ids() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--slots", "2"]);
    // Service `later` points at a client that is not there: its job stays Queued.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let config = write_server_config(
        root,
        &[
            ("example", vec![client.url.clone()], 10, 10),
            ("later", vec![nowhere], 10, 10),
        ],
    );
    let mut server = TestServer::start(root, &config, &[]);
    let http = http();
    let url = server.url.clone();
    let completed = upload_job(
        &http,
        &url,
        1,
        "example",
        &[("run.sh", b"echo done > out.txt\n")],
    )
    .await;
    let failed = upload_job(&http, &url, 2, "example", &[("run.sh", b"exit 3\n")]).await;
    let killed = upload_job(&http, &url, 1, "example", &[("run.sh", b"sleep 300\n")]).await;
    let queued = upload_job(
        &http,
        &url,
        2,
        "later",
        &[("run.sh", b"echo later > out.txt\n")],
    )
    .await;
    wait_status(&http, &url, completed, &["Completed"], LONG).await;
    wait_status(&http, &url, failed, &["Failed"], LONG).await;
    wait_status(&http, &url, killed, &["Running"], LONG).await;
    let answer = http
        .post(format!("{url}/terminate/{killed}"))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    wait_status(&http, &url, killed, &["Killed"], LONG).await;
    // Running on the client when the server stops: followed there after the move, not run
    // again (the database's identity, part of its dispatch key, moved with it).
    let runs = root.join("runs.log");
    let script = format!(
        "echo run >> {}\nsleep 3\necho once > out.txt\n",
        runs.display()
    );
    let running = upload_job(&http, &url, 3, "example", &[("run.sh", script.as_bytes())]).await;
    wait_status(&http, &url, running, &["Running"], LONG).await;
    let ids = [completed, failed, killed, queued];
    let mut before = Vec::new();
    for id in ids {
        before.push((
            get_json(&http, format!("{url}/jobs/{id}")).await,
            get_json(&http, format!("{url}/jobs/{id}/events")).await,
        ));
    }
    let list_before = get_json(&http, format!("{url}/jobs")).await;
    let zip_before = download_zip(&http, &url, completed).await;

    // Refused while the server runs on it.
    let db_file = server.data_dir().join("jobrelay.sqlite");
    let output = migrate(&db_file, &schema.url);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("a running server holds this database"),
        "{stderr}"
    );

    // Stopped: moved, with a report of what was moved.
    server.kill9();
    let output = migrate(&db_file, &schema.url);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("jobs: 5 (Completed 1, Failed 1, Killed 1, Queued 1, Running 1)"),
        "{stdout}"
    );
    assert!(stdout.contains("next job id: 6"), "{stdout}");

    // The same data directory, now on PostgreSQL; service `later` has a client now.
    write_server_config(
        root,
        &[
            ("example", vec![client.url.clone()], 10, 10),
            ("later", vec![client.url.clone()], 10, 10),
        ],
    );
    let server = TestServer::start(root, &config, &["--db", &schema.url]);
    let url = server.url.clone();
    for (id, (job, events)) in ids.iter().zip(&before).take(3) {
        assert_eq!(&get_json(&http, format!("{url}/jobs/{id}")).await, job);
        assert_eq!(
            &get_json(&http, format!("{url}/jobs/{id}/events")).await,
            events
        );
    }
    assert_eq!(
        get_json(&http, format!("{url}/jobs")).await["total"],
        list_before["total"]
    );
    assert_eq!(download_zip(&http, &url, completed).await, zip_before);
    wait_status(&http, &url, queued, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &url, queued).await);
    assert_eq!(entries["out.txt"], b"later\n");
    let events = get_json(&http, format!("{url}/jobs/{queued}/events")).await;
    let first = &events.as_array().unwrap()[0];
    assert_eq!(first, &before[3].1.as_array().unwrap()[0], "{events}");
    wait_status(&http, &url, running, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &url, running).await);
    assert_eq!(entries["out.txt"], b"once\n");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "ran once");
    // New ids continue after the old ones.
    let new = upload_job(
        &http,
        &url,
        1,
        "example",
        &[("run.sh", b"echo new > out.txt\n")],
    )
    .await;
    assert_eq!(new, 6);
    wait_status(&http, &url, new, &["Completed"], LONG).await;

    // A second move into the database that now holds jobs is refused.
    drop(server);
    let output = migrate(&db_file, &schema.url);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("already holds 6 job(s)"), "{stderr}");
    drop(client);
    drop(schema);
}
