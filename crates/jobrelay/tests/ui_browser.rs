//! The dashboard in a real headless Chromium, driven through chromedriver (WebDriver over
//! HTTP on 127.0.0.1): jobs appear with their states, the job page tails the log, and
//! Terminate on the page kills a running job. Skips (with a printed reason) where Chromium
//! or chromedriver is not installed; `.ci/run` installs both.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::server::{job_form, post_upload};
use support::*;

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        path.split(':')
            .chain(["/usr/bin", "/usr/lib/chromium"])
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| candidate.is_file())
    })
}

struct Driver {
    process: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    /// chromedriver runs in a process group of its own, and Chromium in it: kill them all, also
    /// when the test panics (killing chromedriver alone would leave Chromium running).
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.process.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.process.wait();
    }
}

impl Driver {
    async fn start(chromium: &Path, chromedriver: &Path, profile: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = http();
        let mut driver = Driver {
            process,
            base,
            session: String::new(),
            http,
        };
        eventually(
            Duration::from_secs(30),
            "chromedriver to answer",
            || async {
                let status = driver
                    .http
                    .get(format!("{}/status", driver.base))
                    .send()
                    .await
                    .ok()?;
                status.status().is_success().then_some(())
            },
        )
        .await;
        let session = driver
            .post(
                "/session",
                json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                    "binary": chromium,
                    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--window-size=1280,900",
                             format!("--user-data-dir={}", profile.display())]
                }}}}),
            )
            .await;
        driver.session = session["sessionId"].as_str().expect("a session").to_owned();
        driver
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let answer: Value = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"].clone()
    }

    async fn get(&self, path: &str) -> Value {
        let answer: Value = self
            .http
            .get(format!("{}/session/{}{path}", self.base, self.session))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// Text of the first element matching `css`, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        let element = found[ELEMENT_KEY].as_str()?;
        self.get(&format!("/element/{element}/text"))
            .await
            .as_str()
            .map(str::to_owned)
    }

    async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        eventually(Duration::from_secs(60), what, || async {
            self.text(css).await.filter(|t| check(t))
        })
        .await
    }

    async fn click(&self, css: &str) {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        let element = found[ELEMENT_KEY]
            .as_str()
            .expect("element to click")
            .to_owned();
        self.post(&format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn screenshot(&self, path: &Path) {
        use std::io::Write;
        let data = self.get("/screenshot").await;
        let png = decode_base64(data.as_str().unwrap());
        std::fs::File::create(path)
            .unwrap()
            .write_all(&png)
            .unwrap();
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            _ => 63,
        }
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[tokio::test]
async fn dashboard_shows_jobs_tails_logs_and_terminates() {
    let (Some(chromium), Some(chromedriver)) = (
        find_program(&["chromium", "chromium-browser"]),
        find_program(&["chromedriver"]),
    ) else {
        eprintln!("skipped: chromium and chromedriver are not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let system = Proc::up(tmp.path(), &[]);
    let http = http();
    let pid_file = tmp.path().join("pid");
    let upload = |script: String| {
        let http = http.clone();
        let url = system.url.clone();
        async move {
            let form = job_form(3, "example", &[("run.sh", script.as_bytes())]);
            let (_, answer) = post_upload(&http, &url, form).await;
            answer["id"].as_u64().unwrap()
        }
    };
    let quick = upload("echo quick\n".into()).await;
    let long = upload(format!(
        "echo $$ > {}\necho started-long-job\nsleep 300\n",
        pid_file.display()
    ))
    .await;
    let shell_pid = read_pid(&pid_file).await;

    let driver = Driver::start(&chromium, &chromedriver, &tmp.path().join("profile")).await;

    driver.open(&format!("{}/ui#/", system.url)).await;
    driver
        .wait_text(
            "#states [data-state=Running] b",
            "one Running job on the overview",
            |t| t == "1",
        )
        .await;
    driver
        .wait_text(
            "#states [data-state=Completed] b",
            "one Completed job",
            |t| t == "1",
        )
        .await;
    driver
        .wait_text("#clients-table", "the local client, healthy", |t| {
            t.contains("healthy")
        })
        .await;
    driver.screenshot(&tmp.path().join("overview.png")).await;
    if let Ok(dest) = std::env::var("JOBRELAY_SCREENSHOT") {
        std::fs::copy(tmp.path().join("overview.png"), dest).unwrap();
    }

    driver.open(&format!("{}/ui#/jobs", system.url)).await;
    driver
        .wait_text(
            &format!("tr[data-job-id=\"{quick}\"] .status"),
            "the quick job's row",
            |t| t == "Completed",
        )
        .await;
    driver
        .wait_text(
            &format!("tr[data-job-id=\"{long}\"] .status"),
            "the long job's row",
            |t| t == "Running",
        )
        .await;

    driver.open(&format!("{}/ui#/job/{long}", system.url)).await;
    driver
        .wait_text("#log-stdout", "the log tail", |t| {
            t.contains("started-long-job")
        })
        .await;
    driver
        .wait_text("#timeline", "the timeline", |t| {
            t.contains("Running") && t.contains("Queued")
        })
        .await;
    driver.click("#terminate").await;
    driver
        .wait_text("#job-status", "the job page to show Killed", |t| {
            t == "Killed"
        })
        .await;
    let record: Value = http
        .get(format!("{}/jobs/{long}", system.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["status"], "Killed");
    eventually(
        Duration::from_secs(30),
        "the job's process to be gone",
        || async { (!pid_alive(shell_pid)).then_some(()) },
    )
    .await;
}
