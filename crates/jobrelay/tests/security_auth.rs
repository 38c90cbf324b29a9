//! Authentication: the shared token between server and client, and per-user tokens with
//! access rules on the server (through HTTP and through the CLI).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(90);

/// Writes a secret file readable by its owner only (world-readable ones are refused).
fn write_secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

async fn status_and_json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn client_with_a_token_refuses_requests_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_secret(dir.path(), "token", "client-secret-1\n");
    let client = start_client(
        dir.path(),
        "client",
        &["--token-file", token.to_str().unwrap()],
    );
    let anonymous = http();
    // Ping and health stay open.
    for path in ["/", "/health"] {
        let r = anonymous
            .get(format!("{}{path}", client.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // Everything else needs the token: no header, a wrong one, another scheme.
    let wrong = http_with_token("client-secret-2");
    for (http, what) in [(&anonymous, "no token"), (&wrong, "wrong token")] {
        for path in ["/load", "/info", "/retrieve/1", "/events", "/nowhere"] {
            let (status, body) = status_and_json(
                http.get(format!("{}{path}", client.url))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(status, 401, "{what} {path}: {body}");
            assert!(body["error"].is_string(), "{body}");
        }
        let (status, body) = status_and_json(
            http.post(format!("{}/submit", client.url))
                .multipart(files_form(&[("run.sh", b"touch ran\n")]))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401, "{what} /submit: {body}");
        let (status, _) = status_and_json(
            http.post(format!("{}/kill/1", client.url))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401);
    }
    let basic = reqwest::Client::new()
        .get(format!("{}/info", client.url))
        .header("Authorization", "Basic client-secret-1")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    // Nothing was submitted by the refused requests.
    assert!(!client_has_payloads(&dir.path().join("client")));

    // With the token, the client works as usual.
    let authed = http_with_token("client-secret-1");
    let (status, info) = status_and_json(
        authed
            .get(format!("{}/info", client.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    let (status, record) = status_and_json(
        authed
            .post(format!("{}/submit", client.url))
            .multipart(files_form(&[("run.sh", b"echo ok > out.txt\n")]))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{record}");
}

fn client_has_payloads(data: &Path) -> bool {
    std::fs::read_dir(data.join("payloads"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

#[tokio::test]
async fn a_world_readable_token_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "abc").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = std::process::Command::new(binary())
        .args(["client", "--port", "0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("readable by every user"), "{stderr}");
}

#[tokio::test]
async fn server_sends_the_client_token_and_jobs_run() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_secret(dir.path(), "token", "shared-secret");
    let client = start_client(
        dir.path(),
        "client",
        &["--token-file", token.to_str().unwrap()],
    );
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(
        dir.path(),
        &config,
        &["--client-token-file", token.to_str().unwrap()],
    );
    let http = http();
    let id = upload_job(
        &http,
        &server.url,
        3,
        "example",
        &[("run.sh", b"echo over the token > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"over the token\n");
}

#[tokio::test]
async fn a_service_token_file_in_the_toml_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_secret(dir.path(), "token", "service-secret");
    let client = start_client(
        dir.path(),
        "client",
        &["--token-file", token.to_str().unwrap()],
    );
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\nclients = [{:?}]\ntoken_file = {:?}\n",
            client.url,
            token.to_str().unwrap()
        ),
    )
    .unwrap();
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let id = upload_job(&http, &server.url, 3, "example", &[("run.sh", b"true\n")]).await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
}

#[tokio::test]
async fn a_server_without_the_token_dispatches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_secret(dir.path(), "token", "shared-secret");
    let client = start_client(
        dir.path(),
        "client",
        &["--token-file", token.to_str().unwrap()],
    );
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &[]);
    let http = http();
    let id = upload_job(&http, &server.url, 3, "example", &[("run.sh", b"true\n")]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = job_json(&http, &server.url, id).await;
    assert_eq!(job["status"], "Queued", "{job}");
    assert!(!client_has_payloads(&dir.path().join("client")));
    assert!(
        server.log().contains("refuses our token"),
        "{}",
        server.log()
    );
}

const USERS: &str = r#"
[[users]]
token = "alice-token"
user_id = 7

[[users]]
token = "bob-token"
user_id = 8
admin = false

[[users]]
token = "admin-token"
user_id = 1
admin = true
"#;

async fn upload_as(
    http: &reqwest::Client,
    server: &str,
    user_id: Option<i64>,
    script: &[u8],
) -> (u16, serde_json::Value) {
    let mut form = files_form(&[("run.sh", script)]).text("service", "example");
    if let Some(id) = user_id {
        form = form.text("user_id", id.to_string());
    }
    status_and_json(
        http.post(format!("{server}/upload"))
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn users_see_and_act_on_their_own_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let users = write_secret(dir.path(), "users.toml", USERS);
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(
        dir.path(),
        &config,
        &["--users-file", users.to_str().unwrap()],
    );
    let url = server.url.clone();
    let (alice, bob, admin, anonymous) = (
        http_with_token("alice-token"),
        http_with_token("bob-token"),
        http_with_token("admin-token"),
        http(),
    );

    // No token, or an unknown one: 401 in the reference's error shape. Open endpoints stay open.
    let (status, body) = upload_as(&anonymous, &url, Some(7), b"true\n").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["status"], "Unknown");
    assert_eq!(body["id"], 0);
    assert!(body["message"].is_string());
    let (status, _) = upload_as(&http_with_token("mallory"), &url, None, b"true\n").await;
    assert_eq!(status, 401);
    for path in ["/jobs", "/jobs/1", "/download/1", "/download_partial/1"] {
        let r = anonymous.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    for path in ["/", "/health", "/openapi.json", "/docs"] {
        let r = anonymous.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let doc: serde_json::Value = anonymous
        .get(format!("{url}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["paths"]["/jobs"]["get"]["responses"]
        .get("401")
        .is_some());

    // The user id comes from the token; a user_id that disagrees is refused.
    let (status, body) = upload_as(&alice, &url, None, b"echo alice > out.txt\n").await;
    assert_eq!(status, 201, "{body}");
    let alice_job = body["id"].as_i64().unwrap();
    let (status, body) = upload_as(&alice, &url, Some(8), b"true\n").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["status"], "Unknown");
    let (status, body) = upload_as(&bob, &url, Some(8), b"sleep 300\n").await;
    assert_eq!(status, 201, "{body}");
    let bob_job = body["id"].as_i64().unwrap();

    let job = wait_status(&alice, &url, alice_job, &["Completed"], LONG).await;
    assert_eq!(job["status"], "Completed");
    let (status, job) = status_and_json(
        alice
            .get(format!("{url}/jobs/{alice_job}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(job["user_id"], 7);

    // Bob's job is unknown to Alice, whatever she tries; the answer is the one for a job
    // that does not exist.
    for path in [
        format!("/jobs/{bob_job}"),
        format!("/download/{bob_job}"),
        format!("/download_partial/{bob_job}"),
    ] {
        let (status, body) =
            status_and_json(alice.get(format!("{url}{path}")).send().await.unwrap()).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["message"], format!("no job {bob_job}"));
    }
    let (status, _) = status_and_json(
        alice
            .post(format!("{url}/terminate/{bob_job}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    let job = job_json(&bob, &url, bob_job).await;
    assert_ne!(job["status"], "Killed", "{job}");

    // Lists: each user their own; asking for another's finds nothing; the admin sees all.
    let list = |http: reqwest::Client, query: &'static str| {
        let url = url.clone();
        async move {
            let (status, body) =
                status_and_json(http.get(format!("{url}/jobs{query}")).send().await.unwrap()).await;
            assert_eq!(status, 200, "{body}");
            let mut ids: Vec<i64> = body["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["id"].as_i64().unwrap())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(list(alice.clone(), "").await, [alice_job]);
    assert_eq!(list(alice.clone(), "?user_id=8").await, Vec::<i64>::new());
    assert_eq!(list(bob.clone(), "").await, [bob_job]);
    assert_eq!(list(admin.clone(), "").await, [alice_job, bob_job]);
    assert_eq!(list(admin.clone(), "?user_id=8").await, [bob_job]);

    // The admin may act on any job; Bob may terminate his own.
    let r = admin
        .get(format!("{url}/download/{alice_job}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/zip");
    let (status, body) = status_and_json(
        bob.post(format!("{url}/terminate/{bob_job}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Killed");

    // What operators look at follows the same rules: another user's job is unknown, the
    // overview shows a user only their own jobs, clients and metrics are for admins.
    for path in [
        format!("/jobs/{alice_job}/events"),
        format!("/jobs/{alice_job}/log"),
    ] {
        let r = bob.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let r = alice.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let r = anonymous.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let (_, overview) =
        status_and_json(alice.get(format!("{url}/overview")).send().await.unwrap()).await;
    assert_eq!(overview["states"]["Completed"], 1, "{overview}");
    assert!(
        overview["states"]["Killed"].is_null(),
        "Bob's job is not Alice's business"
    );
    assert_eq!(overview["clients"], serde_json::json!([]));
    let (_, overview) =
        status_and_json(admin.get(format!("{url}/overview")).send().await.unwrap()).await;
    assert_eq!(overview["states"]["Killed"], 1, "{overview}");
    for path in ["/clients", "/metrics"] {
        let r = alice.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let r = admin.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let page = anonymous.get(format!("{url}/ui")).send().await.unwrap();
    assert_eq!(
        page.status(),
        200,
        "the dashboard page itself is static and open"
    );
}

#[tokio::test]
async fn the_cli_sends_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let users = write_secret(dir.path(), "users.toml", USERS);
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(
        dir.path(),
        &config,
        &["--users-file", users.to_str().unwrap()],
    );
    let job_dir = dir.path().join("job");
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::write(job_dir.join("run.sh"), "echo from the cli > out.txt\n").unwrap();
    let cli = |args: &[&str], token: Option<&str>| {
        let mut command = std::process::Command::new(binary());
        command
            .args(args)
            .args(["--server", &server.url, "--json"])
            .env_remove("JOBRELAY_USER")
            .env_remove("JOBRELAY_TOKEN");
        if let Some(token) = token {
            command.env("JOBRELAY_TOKEN", token);
        }
        command.output().unwrap()
    };
    // Without a token the server refuses, and the CLI says why.
    let refused = cli(&["jobs"], None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // With JOBRELAY_TOKEN no --user is needed: the server takes it from the token.
    let submitted = cli(
        &[
            "submit",
            "--service",
            "example",
            "--wait",
            job_dir.join("run.sh").to_str().unwrap(),
        ],
        Some("alice-token"),
    );
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let listed = cli(&["jobs"], Some("alice-token"));
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let jobs = listed["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{listed}");
    assert_eq!(jobs[0]["user_id"], 7);
    // Bob sees none of Alice's jobs; --token works as the variable does.
    let listed = std::process::Command::new(binary())
        .args([
            "jobs",
            "--server",
            &server.url,
            "--json",
            "--token",
            "bob-token",
        ])
        .env_remove("JOBRELAY_TOKEN")
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 0, "{listed}");
}

/// The overview's per-service counts of a user who is not an admin are that user's own: how
/// many jobs other users run there is not theirs to see. The admin sees the service's.
#[tokio::test]
async fn the_overview_counts_only_the_callers_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let users = write_secret(dir.path(), "users.toml", USERS);
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(
        dir.path(),
        &config,
        &["--users-file", users.to_str().unwrap()],
    );
    let url = server.url.clone();
    let (alice, bob, admin) = (
        http_with_token("alice-token"),
        http_with_token("bob-token"),
        http_with_token("admin-token"),
    );
    let (status, body) = upload_as(&alice, &url, None, b"sleep 300\n").await;
    assert_eq!(status, 201, "{body}");
    let job = body["id"].as_i64().unwrap();
    wait_status(&alice, &url, job, &["Running"], LONG).await;
    let active_for = |http: reqwest::Client| {
        let url = url.clone();
        async move {
            let (status, overview) =
                status_and_json(http.get(format!("{url}/overview")).send().await.unwrap()).await;
            assert_eq!(status, 200, "{overview}");
            let service = &overview["services"][0];
            (service["active"].as_u64(), service["queued"].as_u64())
        }
    };
    assert_eq!(active_for(admin.clone()).await, (Some(1), Some(0)));
    assert_eq!(active_for(alice.clone()).await, (Some(1), Some(0)));
    assert_eq!(
        active_for(bob.clone()).await,
        (Some(0), Some(0)),
        "Alice's running job is not Bob's business"
    );
    let (status, _) = status_and_json(
        admin
            .post(format!("{url}/terminate/{job}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
}
