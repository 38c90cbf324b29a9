//! Shared helpers of the integration tests: start real `jobrelay` processes on ephemeral
//! loopback ports and talk HTTP to them.
#![allow(dead_code)]

pub mod server;

use std::io::{BufRead, BufReader, Read};
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
    /// Starts `jobrelay <args>` and waits for its "listening on http://..." line on stdout.
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
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An HTTP client for tests, with a generous timeout for loaded CI machines.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
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
