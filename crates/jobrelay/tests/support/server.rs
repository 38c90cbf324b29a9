//! Helpers of the server tests: start clients and servers, upload, follow and download jobs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{eventually, files_form, post_form, Proc};

/// Starts `jobrelay client` with its data in `dir/<name>`, logging to `dir`.
pub fn start_client(dir: &Path, name: &str, extra: &[&str]) -> Proc {
    start_client_at(dir, name, 0, extra)
}

/// [`start_client`] on a fixed `port` (from `net::free_port`): a client that can be killed
/// and come back at the address the server knows it by.
pub fn start_client_at(dir: &Path, name: &str, port: u16, extra: &[&str]) -> Proc {
    Proc::client(port, &dir.join(name), dir, extra, &[])
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

/// A `jobrelay server` started for one test, with its data in `dir/server` and its log in
/// `dir`. It keeps what it was started with (config file, flags, environment), so that a
/// test can kill it and start it again as it was, on the same data. Dropping it stops the
/// process by its pid (SIGTERM, then SIGKILL), as [`Proc`] does.
pub struct TestServer {
    pub proc: Proc,
    /// Base URL, e.g. `http://127.0.0.1:41234`; a restart listens on a new port.
    pub url: String,
    dir: PathBuf,
    config: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts `jobrelay server --config <config> <extra>` on port 0.
    pub fn start(dir: &Path, config: &Path, extra: &[&str]) -> TestServer {
        Self::start_with_env(dir, config, extra, &[])
    }

    /// [`TestServer::start`] with extra environment variables.
    pub fn start_with_env(
        dir: &Path,
        config: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let proc = launch(dir, config, &extra, &env);
        TestServer {
            url: proc.url.clone(),
            proc,
            dir: dir.to_owned(),
            config: config.to_owned(),
            extra,
            env,
        }
    }

    /// Starts the server again with what it was first started with, on the same data: kills
    /// it first (SIGKILL) if it still runs.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.proc = launch(&self.dir, &self.config, &self.extra, &self.env);
        self.url = self.proc.url.clone();
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What the running (or last) process logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc.peak_rss_kib()
    }

    /// The server's data directory (database, staging, results).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("server")
    }

    pub fn config(&self) -> &Path {
        &self.config
    }
}

fn launch(dir: &Path, config: &Path, extra: &[String], env: &[(String, String)]) -> Proc {
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
    args.extend(extra.iter().map(String::as_str));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::start_with_env(&args, dir, &env)
}

/// Posts a form to the server's `/upload`; returns (status, JSON body), whatever they are.
pub async fn post_upload(
    http: &reqwest::Client,
    server: &str,
    form: reqwest::multipart::Form,
) -> (u16, serde_json::Value) {
    post_form(http, &format!("{server}/upload"), form).await
}

/// The form of an upload: `files` for `user` on `service`.
pub fn job_form(user: i64, service: &str, files: &[(&str, &[u8])]) -> reqwest::multipart::Form {
    files_form(files)
        .text("user_id", user.to_string())
        .text("service", service.to_owned())
}

/// Uploads a job and returns its id; panics unless the server answers 201.
pub async fn upload_job(
    http: &reqwest::Client,
    server: &str,
    user: i64,
    service: &str,
    files: &[(&str, &[u8])],
) -> i64 {
    let (status, body) = post_upload(http, server, job_form(user, service, files)).await;
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

/// The job's record from `/jobs/{id}` (JSON, whatever its status).
pub async fn job_record(http: &reqwest::Client, server: &str, id: i64) -> serde_json::Value {
    http.get(format!("{server}/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The job's history, `GET /jobs/{id}/events` (JSON).
pub async fn job_history(http: &reqwest::Client, server: &str, id: i64) -> serde_json::Value {
    http.get(format!("{server}/jobs/{id}/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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
