//! Issue 15's policies through a real server and a real client: fair share by weight shows in
//! the order jobs start, a rate quota answers 429 with `Retry-After` (and still holds after
//! a restart), and a queued job says why it waits for each reason.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);

async fn upload_as(
    http: &reqwest::Client,
    server: &str,
    user: i64,
    service: &str,
    script: &str,
    fields: &[(&str, &str)],
) -> i64 {
    let mut form = job_form(user, service, &[("run.sh", script.as_bytes())]);
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    let (status, body) = post_upload(http, server, form).await;
    assert_eq!(status, 201, "upload refused: {body}");
    body["id"].as_i64().unwrap()
}

/// A script that waits (a minute at most) until `gate` exists.
fn held_until(gate: &Path) -> String {
    format!(
        "for i in $(seq 1200); do [ -e {g} ] && break; sleep 0.05; done\n",
        g = gate.display()
    )
}

async fn waiting_for(http: &reqwest::Client, server: &str, id: i64) -> serde_json::Value {
    job_record(http, server, id).await["waiting_for"].clone()
}

#[tokio::test]
async fn fair_share_with_weights_3_to_1_shows_in_the_start_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // One job at a time, so the order of starts is the scheduler's order.
    let client = start_client(root, "client", &["--cores", "1", "--slots", "1"]);
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\nclients = [{:?}]\nruns_per_user = 1\nmax_runs = 1\n\
             policy = \"fair_share\"\nfair_share_half_life = \"1h\"\n",
            client.url
        ),
    )
    .unwrap();
    let users = root.join("users.toml");
    std::fs::write(
        &users,
        "[[users]]\ntoken = \"admin-token\"\nuser_id = 100\nadmin = true\n\
         [[users]]\ntoken = \"heavy-token\"\nuser_id = 1\nweight = 3\n\
         [[users]]\ntoken = \"light-token\"\nuser_id = 2\nweight = 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = TestServer::start(root, &config, &["--users-file", users.to_str().unwrap()]);
    let http = http_with_token("admin-token");

    // A job of the admin holds the one slot while both users queue 16 jobs each, so both
    // are waiting when the turns begin.
    let gate = root.join("gate");
    let first = upload_as(&http, &server.url, 100, "example", &held_until(&gate), &[]).await;
    wait_status(&http, &server.url, first, &["Running"], LONG).await;
    let log = root.join("starts.log");
    let mut ids = Vec::new();
    for _ in 0..16 {
        for user in [1, 2] {
            let script = format!("echo {user} >> {}\nsleep 0.2\n", log.display());
            ids.push(upload_as(&http, &server.url, user, "example", &script, &[]).await);
        }
    }
    std::fs::write(&gate, "").unwrap();
    for id in ids {
        let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
        assert_eq!(job["status"], "Completed", "{job}");
    }
    let starts: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(starts.len(), 32);
    // While both had jobs waiting (the first 16 starts), user 1 (weight 3) had about three
    // of every four; round-robin would give 8.
    let heavy = starts[..16].iter().filter(|u| *u == "1").count();
    assert!(
        (11..=14).contains(&heavy),
        "user 1 started {heavy} of the first 16: {starts:?}"
    );
}

#[tokio::test]
async fn past_a_rate_quota_an_upload_gets_429_with_retry_after_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // No client needs to run: uploads only queue.
    let nowhere = format!("http://127.0.0.1:{}", net::free_port());
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\nclients = [{nowhere:?}]\n\
             max_jobs_per_user_per_hour = 2\nburst = 2\n"
        ),
    )
    .unwrap();
    let mut server = TestServer::start(root, &config, &[]);
    let http = http();
    let form = |user: i64| job_form(user, "example", &[("run.sh", b"true\n")]);
    for _ in 0..2 {
        let (status, body) = post_upload(&http, &server.url, form(1)).await;
        assert_eq!(status, 201, "{body}");
    }
    let refused = |server: String| {
        let http = http.clone();
        async move {
            let response = http
                .post(format!("{server}/upload"))
                .multipart(form(1))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let retry: u64 = response
                .headers()
                .get("retry-after")
                .expect("a Retry-After header")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, retry, body)
        }
    };
    let (status, retry, body) = refused(server.url.clone()).await;
    assert_eq!(status, 429, "{body}");
    // Two an hour: the next token comes back within 30 minutes.
    assert!((1..=1800).contains(&retry), "{retry}");
    assert_eq!(body["id"], 0);
    assert_eq!(body["status"], "Unknown");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("rate quota") && message.contains(&format!("{retry} s")),
        "{message}"
    );
    // Another user has a quota of their own.
    let (status, body) = post_upload(&http, &server.url, form(2)).await;
    assert_eq!(status, 201, "{body}");
    // Refused uploads made no job.
    let listed: serde_json::Value = http
        .get(format!("{}/jobs?user_id=1", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["total"], 2, "{listed}");

    server.restart();
    let (status, retry_after_restart, body) = refused(server.url.clone()).await;
    assert_eq!(status, 429, "a restart does not refill the quota: {body}");
    assert!(
        retry_after_restart <= retry,
        "{retry_after_restart} > {retry}"
    );
}

#[tokio::test]
async fn a_queued_job_says_why_it_waits_for_each_reason() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--cores", "2", "--slots", "8"]);
    let nowhere = format!("http://127.0.0.1:{}", net::free_port());
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\nclients = [{c:?}]\nreserve_after = 2\n\
             [services.capped]\nclients = [{c:?}]\nmax_runs = 1\n\
             [services.down]\nclients = [{nowhere:?}]\n",
            c = client.url
        ),
    )
    .unwrap();
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let url = server.url.as_str();
    let gate = root.join("gate");
    let held = held_until(&gate);

    // The client's two cores: one held in each service.
    let g1 = upload_as(&http, url, 1, "example", &held, &[]).await;
    let g2 = upload_as(&http, url, 5, "capped", &held, &[]).await;
    for id in [g1, g2] {
        wait_status(&http, url, id, &["Running"], LONG).await;
    }

    // The service is at max_runs.
    let capped = upload_as(&http, url, 6, "capped", "true\n", &[]).await;
    let w = waiting_for(&http, url, capped).await;
    assert_eq!(w["reason"], "service_quota", "{w}");
    assert_eq!(w["message"], "the service is at max_runs (1 of 1 running)");

    // No client of the service is healthy.
    let down = upload_as(&http, url, 7, "down", "true\n", &[]).await;
    let w = waiting_for(&http, url, down).await;
    assert_eq!(w["reason"], "no_healthy_client", "{w}");

    // No room for 2 cores now, and a job behind it of the same user.
    let big = upload_as(&http, url, 2, "example", "true\n", &[("cores", "2")]).await;
    let behind = upload_as(&http, url, 2, "example", "true\n", &[]).await;
    let w = waiting_for(&http, url, behind).await;
    assert_eq!(w["reason"], "behind_own_jobs", "{w}");
    assert_eq!(w["message"], "behind 1 earlier job of user 2");

    // Past reserve_after (2 s) the client is held for the big job: the dispatcher decides
    // again at that deadline by itself, nothing else happening.
    let w = eventually(LONG, "the client held for the big job", || async {
        let w = waiting_for(&http, url, big).await;
        (w["reason"] == "reserved").then_some(w)
    })
    .await;
    let message = w["message"].as_str().unwrap();
    assert!(
        message.contains(&client.url) && message.contains("2 cores"),
        "{message}"
    );

    std::fs::write(&gate, "").unwrap();
    for id in [g1, g2, big, behind, capped] {
        let job = wait_status(&http, url, id, &["Completed", "Failed"], LONG).await;
        assert_eq!(job["status"], "Completed", "{job}");
    }
    let w = waiting_for(&http, url, down).await;
    assert_eq!(w["reason"], "no_healthy_client", "still: {w}");
}
