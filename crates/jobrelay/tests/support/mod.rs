//! Shared helpers of the integration tests: start real `jobrelay` processes on ephemeral
//! loopback ports and talk HTTP to them.
#![allow(dead_code)]

pub mod db;
pub mod host;
pub mod multipart;
pub mod net;
pub mod proxy;
pub mod rng;
pub mod runlog;
pub mod server;
pub mod slurm;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_jobrelay")
}

/// A `jobrelay` process started by a test; killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    stderr_log: PathBuf,
}

impl Proc {
    /// Starts `jobrelay <args>` and waits for its "listening on http://..." line on stdout
    /// (or, for a client that dials out, "pulling work from http://...").
    pub fn start(args: &[&str], log_dir: &Path) -> Proc {
        Self::start_with_env(args, log_dir, &[])
    }

    pub fn start_with_env(args: &[&str], log_dir: &Path, env: &[(&str, &str)]) -> Proc {
        std::fs::create_dir_all(log_dir).unwrap();
        let stderr_log = log_dir.join(format!(
            "{}-{}.log",
            args.first().copied().unwrap_or("proc"),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = Command::new(binary());
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .env_remove("PORT")
            .env_remove("DATA_PATH");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start jobrelay");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if let Some(at) = line.find("listening on ") {
                    let _ = tx.send(line[at + "listening on ".len()..].trim().to_owned());
                } else if let Some(at) = line.find("pulling work from ") {
                    // A client that dials out (`--connect`): its URL is its server's.
                    let _ = tx.send(line[at + "pulling work from ".len()..].trim().to_owned());
                }
                line.clear();
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "jobrelay {args:?} did not start: {}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        Proc {
            child,
            url,
            stderr_log,
        }
    }

    /// Starts `jobrelay client <extra>` on `port` (0: any free one) with its data in `data`,
    /// logging to `log_dir`.
    pub fn client(
        port: u16,
        data: &Path,
        log_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let port = port.to_string();
        let mut args = vec![
            "client",
            "--port",
            &port,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Proc::start_with_env(&args, log_dir, env)
    }

    /// Starts `jobrelay up <extra>` (server and client in one process) on port 0 with its data
    /// in `dir/data`, logging to `dir/logs`.
    pub fn up(dir: &Path, extra: &[&str]) -> Proc {
        let data = dir.join("data");
        let mut args = vec!["up", "--port", "0", "--data-dir", data.to_str().unwrap()];
        args.extend_from_slice(extra);
        Proc::start(&args, &dir.join("logs"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Proc {
    /// SIGTERM first, so that a client stops the payloads it runs (a kill -9 would leave them
    /// running as orphans after the test); SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill9();
    }
}

/// Runs `jobrelay client --port 0 --data-dir <data> <args>` with `env` until it exits: its
/// exit status and stderr. For starts that must be refused; one that is not runs until the
/// test harness gives up on it.
pub fn run_client_until_exit(
    data: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let output = Command::new(binary())
        .args(["client", "--port", "0", "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("PORT")
        .env_remove("DATA_PATH")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run jobrelay client");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An HTTP client for tests, with a generous timeout for loaded CI machines.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        // Under the servers' idle keep-alive close, as the product's own clients.
        .pool_idle_timeout(jobrelay_common::serve::pool_idle())
        .build()
        .unwrap()
}

/// [`http`] sending `Authorization: Bearer <token>` on every request: a user of a server
/// started with a users file.
pub fn http_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_idle_timeout(jobrelay_common::serve::pool_idle())
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Posts a multipart form to `url`; returns (status, JSON body), whatever they are.
pub async fn post_form(
    http: &reqwest::Client,
    url: &str,
    form: reqwest::multipart::Form,
) -> (u16, serde_json::Value) {
    let response = http.post(url).multipart(form).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A multipart form with the given (name, content) files in `file` fields.
pub fn files_form(files: &[(&str, &[u8])]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, content) in files {
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(content.to_vec()).file_name(name.to_string()),
        );
    }
    form
}

/// Polls `check` until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Entries of a ZIP archive: name to content (links: their target).
pub fn unzip(bytes: &[u8]) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a valid ZIP");
    let mut entries = std::collections::BTreeMap::new();
    for i in 0..archive.len() {
        let mut file = archive.by_index(i).unwrap();
        let mut content = Vec::new();
        file.read_to_end(&mut content).unwrap();
        entries.insert(file.name().unwrap().to_string(), content);
    }
    entries
}

/// True while a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// The record of payload `id` on the client at `base` (`/retrieve`, asserted 200); for
/// Completed, whose answer is the ZIP, a marker object `{"id", "status": "Completed", "zip"}`.
pub async fn record_at(http: &reqwest::Client, base: &str, id: u64) -> serde_json::Value {
    let response = http
        .get(format!("{base}/retrieve/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    if response.headers()["content-type"] == "application/zip" {
        serde_json::json!({"id": id, "status": "Completed", "zip": true})
    } else {
        response.json().await.unwrap()
    }
}

/// The text of `GET {base}/metrics`.
pub async fn metrics_text(http: &reqwest::Client, base: &str) -> String {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A client started for one test, with its data directory in a temporary folder.
pub struct TestClient {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl TestClient {
    pub fn start(extra: &[&str]) -> TestClient {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> TestClient {
        Self::start_in(tempfile::tempdir().unwrap(), extra, env)
    }

    /// A client whose temporary directory the payloads' user may pass through (mode 0711),
    /// for `--run-as` tests: a private temporary directory would stop that user at its door.
    pub fn start_for_other_users(extra: &[&str]) -> TestClient {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        Self::start_in(dir, extra, &[])
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> TestClient {
        let proc = Self::launch(dir.path(), extra, env);
        TestClient {
            proc,
            dir,
            http: http(),
        }
    }

    fn launch(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::client(0, &dir.join("data"), &dir.join("logs"), extra, env)
    }

    /// kill -9 the client and start it again on the same data directory.
    pub fn restart_after_kill9(&mut self, extra: &[&str]) {
        self.proc.kill9();
        self.proc = Self::launch(self.dir.path(), extra, &[]);
    }

    /// kill -9 the client and start it again on the same data directory, with `env`.
    pub fn restart_after_kill9_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        self.proc.kill9();
        self.proc = Self::launch(self.dir.path(), extra, env);
    }

    /// Stops the client with SIGTERM (as systemd or Ctrl-C would) and starts it again.
    pub fn restart_after_sigterm(&mut self, extra: &[&str]) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.proc.child.wait();
        self.proc = Self::launch(self.dir.path(), extra, &[]);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proc.url)
    }

    /// Submits files; returns (HTTP status, JSON body).
    pub async fn submit(&self, files: &[(&str, &[u8])]) -> (u16, serde_json::Value) {
        self.submit_form(files_form(files)).await
    }

    pub async fn submit_form(&self, form: reqwest::multipart::Form) -> (u16, serde_json::Value) {
        post_form(&self.http, &self.url("/submit"), form).await
    }

    /// Submits a job with this run.sh and returns its id.
    pub async fn submit_script(&self, script: &str) -> u64 {
        let (status, record) = self.submit(&[("run.sh", script.as_bytes())]).await;
        assert_eq!(status, 200, "{record}");
        record["id"].as_u64().unwrap()
    }

    pub async fn record(&self, id: u64) -> serde_json::Value {
        record_at(&self.http, &self.proc.url, id).await
    }

    /// Waits until the payload reaches `status` and returns its record (JSON; for Completed a
    /// marker object, since /retrieve answers with the ZIP then).
    pub async fn wait_for(&self, id: u64, status: &str) -> serde_json::Value {
        eventually(
            Duration::from_secs(60),
            &format!("payload {id} to be {status}"),
            || async {
                let record = self.record(id).await;
                (record["status"] == status).then_some(record)
            },
        )
        .await
    }

    /// The result ZIP of a payload, once it is Completed.
    pub async fn retrieve_zip(&self, id: u64) -> std::collections::BTreeMap<String, Vec<u8>> {
        self.wait_for(id, "Completed").await;
        self.zip_at(&format!("/retrieve/{id}")).await
    }

    /// `POST /kill/{id}`: the answer, for the test to judge (200, 404 and 409 all happen).
    pub async fn kill(&self, id: u64) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/kill/{id}")))
            .send()
            .await
            .unwrap()
    }

    /// The work directory of a payload, as `/retrieve_partial` zips it (whatever its state).
    pub async fn retrieve_partial_zip(
        &self,
        id: u64,
    ) -> std::collections::BTreeMap<String, Vec<u8>> {
        self.zip_at(&format!("/retrieve_partial/{id}")).await
    }

    /// The entries of the ZIP that `GET path` answers.
    async fn zip_at(&self, path: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let bytes = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        unzip(&bytes)
    }

    /// Files and directories left in the client's data sub-directory `sub`.
    pub fn entries_in(&self, sub: &str) -> Vec<String> {
        match std::fs::read_dir(self.data_dir().join(sub)) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Reads a pid written by a test script, once the file is complete.
pub async fn read_pid(path: &Path) -> i32 {
    eventually(Duration::from_secs(30), "a pid file", || async {
        std::fs::read_to_string(path)
            .ok()
            .filter(|t| t.ends_with('\n'))
            .and_then(|t| t.trim().parse().ok())
    })
    .await
}

/// A client's record of payload `id` as its data directory holds it (`record_pages`: its
/// slot in a page file, or a file of its own, which wins), without a request; `None` when
/// none is stored.
pub fn stored_record(data_dir: &Path, id: u64) -> Option<serde_json::Value> {
    use jobrelay_client::record_pages::{PER_PAGE, SLOT};
    let payloads = data_dir.join("payloads");
    if let Ok(bytes) = std::fs::read(payloads.join(format!("{id}.json"))) {
        return serde_json::from_slice(&bytes).ok();
    }
    let page = std::fs::read(payloads.join(format!("{}.page", id / PER_PAGE))).ok()?;
    let start = (id % PER_PAGE) as usize * SLOT;
    let slot = page.get(start..(start + SLOT).min(page.len()))?;
    serde_json::from_slice(slot.trim_ascii()).ok()
}
