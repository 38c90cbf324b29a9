//! What operators look at, through HTTP: job logs (live from the client, stored after), the
//! timeline of a job, the overview and clients JSON, Prometheus metrics, the dashboard page,
//! and `jobrelay logs --follow`.

mod support;

use std::process::Command;
use std::time::Duration;

use support::server::{job_form, post_upload};
use support::*;

async fn upload(http: &reqwest::Client, url: &str, script: &str) -> u64 {
    let form = job_form(7, "example", &[("run.sh", script.as_bytes())]);
    let (_, answer) = post_upload(http, url, form).await;
    answer["id"].as_u64().unwrap()
}

async fn get_json(http: &reqwest::Client, url: String) -> serde_json::Value {
    let response = http.get(&url).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

async fn job_status(http: &reqwest::Client, url: &str, id: u64) -> String {
    get_json(http, format!("{url}/jobs/{id}")).await["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn logs_follow_a_running_job_then_come_from_the_stored_results() {
    let tmp = tempfile::tempdir().unwrap();
    let system = Proc::up(tmp.path(), &[]);
    let http = http();
    let gate = tmp.path().join("gate");
    let script = format!(
        "echo first\necho oops >&2\nwhile [ ! -e {} ]; do sleep 0.05; done\necho second\n",
        gate.display()
    );
    let id = upload(&http, &system.url, &script).await;

    // While it runs, the log comes from the client.
    let first = eventually(Duration::from_secs(60), "the first line", || async {
        let response = http
            .get(format!("{}/jobs/{id}/log", system.url))
            .send()
            .await
            .ok()?;
        let status = response.headers()["x-job-status"]
            .to_str()
            .unwrap()
            .to_owned();
        let next = response.headers()["x-log-next-offset"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.text().await.ok()?;
        (body == "first\n").then_some((status, next))
    })
    .await;
    // The server may not have taken the client's word that it runs yet (the log flows from
    // the client as soon as the payload started there): not final, either way.
    assert!(
        first.0 == "Running" || first.0 == "Submitted",
        "while it runs: {}",
        first.0
    );
    assert_eq!(first.1, "6");
    // The script writes stderr just after stdout's first line: wait for it, not only for that.
    eventually(Duration::from_secs(60), "stderr's line", || async {
        let stderr = http
            .get(format!("{}/jobs/{id}/log?stream=stderr", system.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        assert!("oops\n".starts_with(&stderr), "{stderr:?}");
        (stderr == "oops\n").then_some(())
    })
    .await;

    // `jobrelay logs --follow` prints everything and returns once the job has ended.
    let follower = {
        let url = system.url.clone();
        std::thread::spawn(move || {
            Command::new(binary())
                .args(["logs", &id.to_string(), "--follow", "--server", &url])
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&gate, "").unwrap();
    let followed = tokio::task::spawn_blocking(move || follower.join().unwrap())
        .await
        .unwrap();
    assert!(followed.status.success());
    assert_eq!(String::from_utf8_lossy(&followed.stdout), "first\nsecond\n");

    // Finished: from the stored results, with offsets.
    eventually(Duration::from_secs(60), "Completed", || async {
        (job_status(&http, &system.url, id).await == "Completed").then_some(())
    })
    .await;
    let rest = http
        .get(format!("{}/jobs/{id}/log?offset=6", system.url))
        .send()
        .await
        .unwrap();
    assert_eq!(rest.headers()["x-job-status"], "Completed");
    assert_eq!(rest.text().await.unwrap(), "second\n");
    let bad = http
        .get(format!("{}/jobs/{id}/log?stream=both", system.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // The timeline holds every state, in order.
    let events = get_json(&http, format!("{}/jobs/{id}/events", system.url)).await;
    let states: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["Queued", "Processing", "Submitted", "Running", "Completed"]
    );
    assert_eq!(events[3]["attempts"], 1);
    assert!(events[3]["client"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn overview_clients_metrics_and_dashboard_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let system = Proc::up(tmp.path(), &[]);
    let http = http();
    let done = upload(&http, &system.url, "echo done\n").await;
    let failed = upload(&http, &system.url, "exit 2\n").await;
    let running = upload(&http, &system.url, "sleep 300\n").await;
    eventually(Duration::from_secs(60), "jobs to settle", || async {
        let a = job_status(&http, &system.url, done).await;
        let b = job_status(&http, &system.url, failed).await;
        let c = job_status(&http, &system.url, running).await;
        (a == "Completed" && b == "Failed" && c == "Running").then_some(())
    })
    .await;

    let overview = get_json(&http, format!("{}/overview", system.url)).await;
    assert_eq!(overview["states"]["Completed"], 1);
    assert_eq!(overview["states"]["Failed"], 1);
    assert_eq!(overview["states"]["Running"], 1);
    assert_eq!(overview["finished_last_hour"], 2);
    let service = &overview["services"][0];
    assert_eq!(service["name"], "example");
    assert_eq!(service["active"], 1);
    assert_eq!(service["users"][0]["user_id"], 7);
    assert_eq!(service["users"][0]["active"], 1);
    let clients = get_json(&http, format!("{}/clients", system.url)).await;
    assert_eq!(clients[0]["healthy"], true);
    assert_eq!(clients[0]["services"][0], "example");
    assert_eq!(clients[0]["active"], 1);
    assert!(clients[0]["last_seen"].is_string());

    let metrics = http
        .get(format!("{}/metrics", system.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "jobrelay_server_jobs{service=\"example\",status=\"Completed\"} 1",
        "jobrelay_server_queue_depth{service=\"example\"} 0",
        "jobrelay_server_active_jobs{service=\"example\"} 1",
        "jobrelay_server_client_healthy{",
        "jobrelay_server_end_to_end_latency_seconds_bucket",
        "jobrelay_server_dispatch_latency_seconds_count{service=\"example\"} 3",
        "jobrelay_server_jobs_finished_total{service=\"example\",status=\"Failed\"} 1",
        "jobrelay_server_upload_bytes_total",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }

    let page = http.get(format!("{}/ui", system.url)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>jobrelay</title>"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN: everything is embedded"
    );

    let spec = get_json(&http, format!("{}/openapi.json", system.url)).await;
    for path in [
        "/jobs/{id}/log",
        "/jobs/{id}/events",
        "/overview",
        "/clients",
        "/metrics",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} is documented");
    }
}

#[tokio::test]
async fn the_client_serves_its_own_log_window_and_metrics() {
    let client = TestClient::start(&[]);
    let id = client.submit_script("printf 'abcdef'\n").await;
    client.wait_for(id, "Completed").await;
    let response = client
        .http
        .get(client.url(&format!("/log/{id}?offset=2")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-log-next-offset"], "6");
    assert_eq!(response.text().await.unwrap(), "cdef");
    let metrics = client
        .http
        .get(client.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("jobrelay_client_payloads{status=\"Completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobrelay_client_slots_in_use 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobrelay_client_submissions_total 1"),
        "{metrics}"
    );
}
