//! Helpers of the server tests: start clients and servers, upload, follow and download jobs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{eventually, files_form, Proc};

/// Starts `jobrelay client` with its data in `dir/<name>`.
pub fn start_client(dir: &Path, name: &str, extra: &[&str]) -> Proc {
    let data = dir.join(name);
    let mut args = vec![
        "client",
        "--port",
        "0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, dir)
}

/// Writes a TOML service file: (service, client URLs, runs_per_user, max_runs).
pub fn write_server_config(dir: &Path, services: &[(&str, Vec<String>, usize, usize)]) -> PathBuf {
    let mut text = String::new();
    for (name, clients, runs_per_user, max_runs) in services {
        let list: Vec<String> = clients.iter().map(|c| format!("{c:?}")).collect();
        text.push_str(&format!(
            "[services.{name}]\nclients = [{}]\nruns_per_user = {runs_per_user}\nmax_runs = {max_runs}\n\n",
            list.join(", ")
        ));
    }
    let path = dir.join("server.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `jobrelay server` with its data in `dir/server` and the given config file.
pub fn start_server(dir: &Path, config: &Path, extra: &[&str]) -> Proc {
    start_server_with_env(dir, config, extra, &[])
}

/// [`start_server`] with extra environment variables.
pub fn start_server_with_env(
    dir: &Path,
    config: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let data = dir.join("server");
    let mut args = vec![
        "server",
        "--port",
        "0",
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::start_with_env(&args, dir, env)
}

/// Uploads a job and returns its id; panics unless the server answers 201.
pub async fn upload_job(
    http: &reqwest::Client,
    server: &str,
    user: i64,
    service: &str,
    files: &[(&str, &[u8])],
) -> i64 {
    let form = files_form(files)
        .text("user_id", user.to_string())
        .text("service", service.to_owned());
    let response = http
        .post(format!("{server}/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 201, "upload refused: {body}");
    assert_eq!(body["status"], "Queued");
    body["id"].as_i64().unwrap()
}

/// The job's JSON from `/download/{id}` (panics if it is already a ZIP).
pub async fn job_json(http: &reqwest::Client, server: &str, id: i64) -> serde_json::Value {
    let response = http
        .get(format!("{server}/download/{id}"))
        .send()
        .await
        .unwrap();
    let is_zip = response.headers()["content-type"] == "application/zip";
    if is_zip {
        return serde_json::json!({"id": id, "status": "Completed"});
    }
    response.json().await.unwrap()
}

/// Waits until the job is in one of `statuses`; returns its JSON.
pub async fn wait_status(
    http: &reqwest::Client,
    server: &str,
    id: i64,
    statuses: &[&str],
    timeout: Duration,
) -> serde_json::Value {
    eventually(timeout, &format!("job {id} in {statuses:?}"), || async {
        let job = job_json(http, server, id).await;
        statuses
            .contains(&job["status"].as_str().unwrap_or(""))
            .then_some(job)
    })
    .await
}

/// The result ZIP of a Completed job.
pub async fn download_zip(http: &reqwest::Client, server: &str, id: i64) -> Vec<u8> {
    let response = http
        .get(format!("{server}/download/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/zip");
    response.bytes().await.unwrap().to_vec()
}

/// Files and directories below `dir`, recursively (empty if it does not exist).
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            out.push(entry.path());
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(tree(&entry.path()));
            }
        }
    }
    out
}
