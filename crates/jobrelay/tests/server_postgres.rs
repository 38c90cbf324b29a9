//! The server on PostgreSQL, end to end: a real server (`--db postgres://...`) and a real
//! client. Jobs complete, a `kill -9` and restart of the server mid-run loses nothing and runs
//! nothing twice, terminate works, the timeline is served. Needs `JOBRELAY_TEST_POSTGRES` (a
//! URL, see ../shared/postgres/start-postgres.sh); without it the test says so and passes.

mod support;

use std::path::Path;
use std::time::Duration;

use support::db::Schema;
use support::runlog::count_lines;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);

fn logging_script(log: &Path, name: &str, seconds: f64) -> String {
    format!(
        "echo {name} >> {log}\nsleep {seconds}\necho {name} > out.txt\n",
        log = log.display()
    )
}

#[tokio::test]
async fn a_server_on_postgres_runs_jobs_once_across_a_kill_and_terminates_them() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log = root.join("runs.log");
    let client = start_client(root, "client", &["--slots", "2"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let mut server = TestServer::start(root, &config, &["--db", &schema.url]);
    assert!(
        server.log().contains("database schema migrated"),
        "{}",
        server.log()
    );
    let http = http();

    let names: Vec<String> = (1..=6).map(|n| format!("job{n}")).collect();
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
    assert_eq!(ids, (1..=6).collect::<Vec<i64>>());
    // kill -9 while jobs run on the client and others wait; they finish meanwhile.
    eventually(LONG, "a job running", || async {
        (count_lines(&log).len() >= 2).then_some(())
    })
    .await;
    server.kill9();
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

    // The timeline of a job, from the database.
    let events: serde_json::Value = http
        .get(format!("{}/jobs/{}/events", server.url, ids[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let states: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"Queued"), "{events}");
    assert_eq!(states.last(), Some(&"Completed"), "{events}");
    assert!(states.contains(&"Submitted"), "{events}");

    // Terminate a running job; a new id continues after the others.
    let long = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", logging_script(&log, "long", 300.0).as_bytes())],
    )
    .await;
    assert_eq!(long, 7);
    wait_status(&http, &server.url, long, &["Running"], LONG).await;
    let answer = http
        .post(format!("{}/terminate/{long}", server.url))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    wait_status(&http, &server.url, long, &["Killed"], LONG).await;
    let health = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "{:?}", health.text().await);

    drop(server);
    drop(client);
    drop(schema);
}

#[test]
fn an_unreachable_database_stops_the_server_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_server_config(
        dir.path(),
        &[("example", vec!["http://127.0.0.1:9".to_owned()], 1, 1)],
    );
    // Nothing listens on port 1; given by --db, then by DATABASE_URL alone.
    let url = "postgres://jr:s3cret@127.0.0.1:1/jobs";
    for by_flag in [true, false] {
        let mut command = std::process::Command::new(binary());
        command
            .args(["server", "--port", "0", "--data-dir"])
            .arg(dir.path().join("server"))
            .arg("--config")
            .arg(&config)
            .env_remove("DB_PATH");
        if by_flag {
            command.args(["--db", url]).env_remove("DATABASE_URL");
        } else {
            command.env("DATABASE_URL", url);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr
                .contains("cannot open the PostgreSQL database postgres://jr:***@127.0.0.1:1/jobs"),
            "{stderr}"
        );
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
    assert!(
        !dir.path().join("server/jobrelay.sqlite").exists(),
        "no SQLite database made beside a PostgreSQL one"
    );
}
