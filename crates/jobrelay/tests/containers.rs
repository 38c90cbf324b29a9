//! Failure tests across containers: the compose stack of deploy/docker (HAProxy, two servers
//! on one PostgreSQL, a pushed client and one that dials out, each its own container on
//! private Docker networks), built from this
//! checkout's debug binary with the project's own Dockerfile on a Debian base made by
//! deploy/docker/build-base.sh. Tests talk to the stack only through the load balancer's port,
//! published on 127.0.0.1.
//!
//! Skipped, with the reason printed, where no Docker engine answers, no compose tool is
//! installed, or the base image cannot be built (no debootstrap, no Debian mirror). Every
//! stack is removed at the end with its networks and volumes, also when a test fails (`Stack`
//! does it on drop). The tests run one at a time: two stacks at once on a 2-core machine only
//! slow each other down.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::server::{job_form, post_upload};
use support::{eventually, http_with_token, unzip};

const IMAGE: &str = "jobrelay:container-tests";
const LB_IMAGE: &str = "jobrelay-lb:container-tests";
const DB_IMAGE: &str = "jobrelay-db:container-tests";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One test at a time (see the module's comment).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn docker(args: &[&str]) -> Result<String, String> {
    run(Command::new("docker").args(args))
}

/// `docker compose` (the plugin) or `docker-compose` (Debian's package), whichever answers.
fn compose_command() -> Option<Vec<String>> {
    if docker(&["compose", "version"]).is_ok() {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    run(Command::new("docker-compose").arg("version"))
        .ok()
        .map(|_| vec!["docker-compose".into()])
}

/// Builds the base (cached in the engine), then the images from this checkout's binary, once
/// per run of this file. `Err` is the reason to skip.
fn images() -> Result<Vec<String>, String> {
    static READY: OnceLock<Result<Vec<String>, String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            docker(&["info"]).map_err(|e| format!("no Docker engine answers: {e}"))?;
            let compose =
                compose_command().ok_or("neither `docker compose` nor `docker-compose` runs")?;
            let started = Instant::now();
            run(Command::new("bash").arg(repo().join("deploy/docker/build-base.sh")))
                .map_err(|e| format!("the base image cannot be built: {e}"))?;
            eprintln!("base image ready after {:?}", started.elapsed());
            // A small build context: the Dockerfile's directory and the binary at the path
            // the `prebuilt` stage takes it from (not the whole target directory).
            let context = tempfile::tempdir().unwrap();
            let bin_dir = context.path().join("target/debug");
            std::fs::create_dir_all(&bin_dir).unwrap();
            let bin = bin_dir.join("jobrelay");
            if std::fs::hard_link(support::binary(), &bin).is_err() {
                std::fs::copy(support::binary(), &bin).unwrap();
            }
            std::fs::create_dir_all(context.path().join("deploy")).unwrap();
            run(Command::new("cp")
                .arg("-r")
                .arg(repo().join("deploy/docker"))
                .arg(context.path().join("deploy/")))
            .unwrap();
            let dockerfile = context.path().join("deploy/docker/Dockerfile");
            let dockerfile = dockerfile.to_str().unwrap();
            let ctx = context.path().to_str().unwrap();
            for (target, tag) in [("lb", LB_IMAGE), ("db", DB_IMAGE), ("prebuilt", IMAGE)] {
                docker(&[
                    "build",
                    "-q",
                    "-f",
                    dockerfile,
                    "--target",
                    target,
                    "--build-arg",
                    "PROFILE=debug",
                    "-t",
                    tag,
                    ctx,
                ])
                .unwrap_or_else(|e| panic!("the project's Dockerfile does not build: {e}"));
            }
            eprintln!("images built after {:?}", started.elapsed());
            Ok(compose)
        })
        .clone()
}

/// Skips the test (returns from it) with the reason printed.
macro_rules! require_images {
    () => {
        match images() {
            Ok(compose) => compose,
            Err(reason) => {
                eprintln!("skipped: {reason}");
                return;
            }
        }
    };
}

/// A compose project; `down -v` (containers, networks, volumes) on drop.
struct Stack {
    compose: Vec<String>,
    project: String,
    files: Vec<PathBuf>,
}

impl Stack {
    fn new(compose: Vec<String>, name: &str, extra_files: &[PathBuf]) -> Stack {
        let mut files = vec![repo().join("deploy/docker/compose.yaml")];
        files.extend_from_slice(extra_files);
        let stack = Stack {
            compose,
            project: format!("jrtest{}{name}", std::process::id()),
            files,
        };
        // Leftovers of an earlier run with the same pid.
        let _ = stack.compose(&["down", "-v", "--remove-orphans", "-t", "1"]);
        stack
    }

    fn compose(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(&self.compose[0]);
        command
            .args(&self.compose[1..])
            .arg("-p")
            .arg(&self.project);
        for file in &self.files {
            command.arg("-f").arg(file);
        }
        command
            .args(args)
            .env("JOBRELAY_IMAGE", IMAGE)
            .env("JOBRELAY_LB_IMAGE", LB_IMAGE)
            .env("JOBRELAY_DB_IMAGE", DB_IMAGE)
            // A free port on 127.0.0.1, read back with `port`.
            .env("JOBRELAY_PORT", "0");
        run(&mut command)
    }

    /// `up -d`, then the API's URL through the load balancer once /health answers there.
    async fn up(&self) -> String {
        self.compose(&["up", "-d", "--no-build"])
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        let port = self.compose(&["port", "lb", "5000"]).unwrap();
        let url = format!("http://{}", port.trim());
        let http = support::http();
        eventually(
            Duration::from_secs(60),
            "the stack's /health through the load balancer",
            || async {
                let response = http.get(format!("{url}/health")).send().await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
        url
    }

    fn container(&self, service: &str) -> String {
        self.compose(&["ps", "-q", service])
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The container's name (as `docker network inspect` shows it).
    fn container_name(&self, service: &str) -> String {
        docker(&["inspect", "-f", "{{.Name}}", &self.container(service)])
            .unwrap()
            .trim()
            .trim_start_matches('/')
            .to_owned()
    }

    fn exec(&self, service: &str, args: &[&str]) -> String {
        let container = self.container(service);
        let mut all = vec!["exec", container.as_str()];
        all.extend_from_slice(args);
        docker(&all).unwrap()
    }

    /// The user token the stack's init step wrote.
    fn user_token(&self) -> String {
        self.exec("server-1", &["cat", "/run/jobrelay/tokens/user-1.token"])
            .trim()
            .to_owned()
    }

    fn network(&self, name: &str) -> String {
        format!("{}_{name}", self.project)
    }

    fn logs(&self) -> String {
        self.compose(&["logs", "--no-color", "--tail", "60"])
            .unwrap_or_else(|e| e)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs of {}:\n{}", self.project, self.logs());
        }
        if let Err(e) = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]) {
            eprintln!("cleaning up {}: {e}", self.project);
        }
    }
}

async fn upload(http: &reqwest::Client, url: &str, files: &[(&str, &[u8])]) -> i64 {
    let (status, body) = post_upload(http, url, job_form(1, "example", files)).await;
    assert_eq!(status, 201, "upload refused: {body}");
    body["id"].as_i64().unwrap()
}

/// Waits (long-polls) until the job is finished; returns its JSON.
async fn finished(
    http: &reqwest::Client,
    url: &str,
    id: i64,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let job: serde_json::Value = http
            .get(format!("{url}/jobs/{id}?wait=5"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let status = job["status"].as_str().unwrap_or("");
        if !["Queued", "Processing", "Submitted", "Running"].contains(&status) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} not finished: {job}");
    }
}

async fn result_zip(http: &reqwest::Client, url: &str, id: i64) -> BTreeMap<String, Vec<u8>> {
    let response = http
        .get(format!("{url}/download/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    unzip(&response.bytes().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_runs_the_example_through_the_load_balancer_and_keeps_jobs_across_down_up() {
    let _serial = serial().await;
    let compose = require_images!();
    let started = Instant::now();
    let stack = Stack::new(compose, "updown", &[]);
    let url = stack.up().await;
    eprintln!("stack up from nothing in {:?}", started.elapsed());
    let http = http_with_token(&stack.user_token());

    let script = std::fs::read(repo().join("examples/residues/run.sh")).unwrap();
    let pdb = std::fs::read(repo().join("examples/residues/peptides.pdb")).unwrap();
    let files: &[(&str, &[u8])] = &[("run.sh", &script), ("peptides.pdb", &pdb)];
    let first = upload(&http, &url, files).await;
    let job = finished(&http, &url, first, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "Completed", "{job}");
    // The example on both kinds of client: the pushed client-1 and client-2, which dials out
    // through the load balancer (batches until each has completed one).
    let mut on = BTreeSet::from([job["client"].as_str().unwrap().to_owned()]);
    let both = Instant::now() + Duration::from_secs(120);
    while !(on.contains("http://client-1:9000") && on.iter().any(|c| c.ends_with(".joined"))) {
        assert!(
            Instant::now() < both,
            "not run on both kinds of client: {on:?}"
        );
        let mut batch = Vec::new();
        for _ in 0..4 {
            batch.push(upload(&http, &url, files).await);
        }
        for id in batch {
            let job = finished(&http, &url, id, Duration::from_secs(60)).await;
            assert_eq!(job["status"], "Completed", "{job}");
            let zip = result_zip(&http, &url, id).await;
            assert!(zip.contains_key("residues.tsv"), "{job}");
            on.insert(job["client"].as_str().unwrap().to_owned());
        }
    }
    eprintln!("the example ran on {on:?} after {:?}", started.elapsed());
    // client-2 is on its own network with the load balancer only: no server, no other
    // client is reachable from it, not even by name.
    let client_2 = stack.container("client-2");
    let networks = docker(&[
        "inspect",
        "-f",
        "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
        &client_2,
    ])
    .unwrap();
    assert_eq!(
        networks.trim(),
        stack.network("pull"),
        "client-2's networks"
    );
    // Its network holds the load balancer and itself, nothing else (a name lookup of the
    // others would wait for Docker's DNS to give up).
    let on_pull = docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .Containers}}{{.Name}} {{end}}",
        &stack.network("pull"),
    ])
    .unwrap();
    let mut on_pull: Vec<&str> = on_pull.split_whitespace().collect();
    on_pull.sort();
    let mut expected = vec![stack.container_name("client-2"), stack.container_name("lb")];
    expected.sort();
    assert_eq!(on_pull, expected, "the network of client-2");
    assert!(docker(&["exec", &client_2, "getent", "hosts", "lb"]).is_ok());
    // The job is in the stack's PostgreSQL, not in a SQLite file of the server's.
    let in_db = stack.exec(
        "db",
        &[
            "sh",
            "-c",
            &format!(
                "psql -h \"$PGDATA\" -U jobrelay -d jobrelay -tAc \
                 \"select status from jobs where id = {first}\""
            ),
        ],
    );
    assert_eq!(in_db.trim(), "Completed", "{in_db}");
    let before = result_zip(&http, &url, first).await;
    let table = String::from_utf8_lossy(&before["residues.tsv"]).into_owned();
    assert!(table.starts_with("file\tchain\tresidues\n"), "{table}");
    assert!(table.contains("peptides.pdb\t"), "{table}");
    // A second job queued just before the stop, finished or not: it must come back.
    let second = upload(&http, &url, files).await;
    // The server's container stopped (SIGTERM through tini) with an upload half-sent through
    // the load balancer: the upload is finished and committed before the server exits.
    let slow = upload_across_server_stop(&stack, &http, &url).await;

    stack
        .compose(&["down", "-t", "30"])
        .unwrap_or_else(|e| panic!("{e}"));
    let url = stack.up().await;
    let http = http_with_token(&stack.user_token());
    let job = finished(&http, &url, first, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "Completed", "{job}");
    assert_eq!(
        result_zip(&http, &url, first).await,
        before,
        "the result changed across down/up"
    );
    let job = finished(&http, &url, second, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "Completed", "{job}");
    let job = finished(&http, &url, slow, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "Completed", "{job}");
    let zip = result_zip(&http, &url, slow).await;
    assert_eq!(
        zip["data.bin"].len(),
        2 << 20,
        "the upload across the stop is cut"
    );
    assert_eq!(String::from_utf8_lossy(&zip["size.txt"]).trim(), "2097152");
    // Ids go on after the restart.
    let third = upload(&http, &url, files).await;
    assert!(third > second, "id {third} reused after down/up");
    let job = finished(&http, &url, third, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "Completed", "{job}");
    eprintln!("whole test in {:?}", started.elapsed());
}

/// Uploads a `run.sh` writing the size of `data.bin`, and a 2 MiB `data.bin` whose second half is sent only once the server's
/// container, stopped meanwhile with `docker stop`, has closed its listening socket; returns
/// the job id (the upload must be answered 201).
async fn upload_across_server_stop(stack: &Stack, http: &reqwest::Client, url: &str) -> i64 {
    let script = b"wc -c < data.bin > size.txt\n";
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let form = reqwest::multipart::Form::new()
        .text("user_id", "1")
        .text("service", "example")
        .part(
            "file",
            reqwest::multipart::Part::bytes(script.to_vec()).file_name("run.sh"),
        )
        .part(
            "file",
            reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(stream))
                .file_name("data.bin"),
        );
    let request = http.post(format!("{url}/upload")).multipart(form).send();
    let request = tokio::spawn(request);
    tx.send(Ok(bytes::Bytes::from(vec![b'x'; 1 << 20])))
        .await
        .unwrap();
    // The first half is on its way: stop the servers' containers, both (the load balancer
    // sent the upload to one of them), in the background: `docker stop` returns once the
    // server has exited, which needs the rest of this upload.
    let mut stoppers = Vec::new();
    for server in ["server-1", "server-2"] {
        let container = stack.container(server);
        stoppers.push(tokio::task::spawn_blocking(move || {
            docker(&["stop", "-t", "30", &container])
        }));
    }
    for server in ["server-1", "server-2"] {
        let container = stack.container(server);
        eventually(
            Duration::from_secs(30),
            "the servers to stop accepting",
            || async {
                let logs = run(Command::new("docker")
                    .args(["logs", &container])
                    .stderr(Stdio::piped()))
                .ok()?;
                let all = logs
                    + &String::from_utf8_lossy(
                        &Command::new("docker")
                            .args(["logs", &container])
                            .output()
                            .ok()?
                            .stderr,
                    );
                all.contains("stopped accepting").then_some(())
            },
        )
        .await;
    }
    tx.send(Ok(bytes::Bytes::from(vec![b'y'; 1 << 20])))
        .await
        .unwrap();
    drop(tx);
    let response = request.await.unwrap().expect("the upload across the stop");
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 201, "upload across the stop: {body}");
    for stopper in stoppers {
        stopper.await.unwrap().unwrap();
    }
    body["id"].as_i64().unwrap()
}

/// A job of the network-cut test: records each run (start and end, with the host) in the
/// client's data volume, and which host produced the result.
const RECORDING_JOB: &str = r#"#!/usr/bin/env bash
set -eu
tag=$(cat tag.txt)
echo "$tag $(hostname) start" >> /var/lib/jobrelay/runs.log
sleep 3
hostname > ran-on.txt
echo "$tag $(hostname) end" >> /var/lib/jobrelay/runs.log
"#;

/// The override of compose.yaml for the network-cut test: a second pushed client (client-3),
/// both in the service, a short --client-timeout, and the client that dials out left off.
fn two_clients_override(dir: &Path, client_timeout: u32) -> PathBuf {
    let toml = dir.join("server.toml");
    std::fs::write(
        &toml,
        "[services.example]\nclients = [\"http://client-1:9000\", \"http://client-3:9000\"]\nruns_per_user = 10\nmax_runs = 10\n",
    )
    .unwrap();
    let file = dir.join("two-clients.yaml");
    std::fs::write(
        &file,
        format!(
            r#"services:
  server-1:
    command: ["server", "--client-timeout", "{client_timeout}"]
    volumes:
      - {toml}:/etc/jobrelay/server.toml:ro
  server-2:
    command: ["server", "--client-timeout", "{client_timeout}"]
    volumes:
      - {toml}:/etc/jobrelay/server.toml:ro
  client-1:
    command: ["client", "--slots", "2"]
  client-2:
    profiles: [left-off]
  client-3:
    image: ${{JOBRELAY_IMAGE:-jobrelay:latest}}
    hostname: client-3
    command: ["client", "--slots", "2"]
    environment:
      PORT: "9000"
      JOBRELAY_CLIENT_TOKEN_FILE: /run/jobrelay/tokens/client.token
    volumes:
      - client-3-data:/var/lib/jobrelay
      - tokens:/run/jobrelay/tokens:ro
    networks: [back]
    depends_on:
      init: {{condition: service_completed_successfully}}
volumes:
  client-3-data: {{}}
"#,
            toml = toml.display()
        ),
    )
    .unwrap();
    file
}

/// Runs recorded in a client's volume: tag → (starts, ends).
fn runs_on(stack: &Stack, service: &str) -> BTreeMap<String, (u32, u32)> {
    let container = stack.container(service);
    let text =
        docker(&["exec", &container, "cat", "/var/lib/jobrelay/runs.log"]).unwrap_or_default();
    let mut runs: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [tag, _host, what] = fields[..] {
            let entry = runs.entry(tag.to_owned()).or_default();
            match what {
                "start" => entry.0 += 1,
                _ => entry.1 += 1,
            }
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cut_off_past_client_timeout_has_its_jobs_requeued_and_finished_elsewhere() {
    let _serial = serial().await;
    let compose = require_images!();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let client_timeout = 4;
    let stack = Stack::new(
        compose,
        "netcut",
        &[two_clients_override(dir.path(), client_timeout)],
    );
    let url = stack.up().await;
    let http = http_with_token(&stack.user_token());

    // A stream of jobs: 4 slots in all, 12 jobs of 3 s each.
    let jobs = 12;
    let mut ids = BTreeMap::new();
    for n in 0..jobs {
        let tag = format!("job{n}");
        let id = upload(
            &http,
            &url,
            &[
                ("run.sh", RECORDING_JOB.as_bytes()),
                ("tag.txt", tag.as_bytes()),
            ],
        )
        .await;
        ids.insert(id, tag);
    }
    // Cut client-1 off while it runs some of them.
    let on_client_1 = || async {
        let list: serde_json::Value = http
            .get(format!("{url}/jobs?status=Running&limit=1000"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let running: Vec<i64> = list["jobs"]
            .as_array()?
            .iter()
            .filter(|j| j["client"] == "http://client-1:9000")
            .filter_map(|j| j["id"].as_i64())
            .collect();
        (!running.is_empty()).then_some(running)
    };
    eventually(
        Duration::from_secs(60),
        "a job running on client-1",
        on_client_1,
    )
    .await;
    let client_1 = stack.container("client-1");
    let back = stack.network("back");
    docker(&["network", "disconnect", &back, &client_1]).unwrap();
    let cut_at = Instant::now();
    // The jobs the server has running there once the cut is in place: it can reach none of
    // them again, so each must be requeued. (Listed before the cut, a job could still end
    // and be collected while `docker network disconnect` runs, more so on a loaded machine.)
    let cut_jobs = on_client_1()
        .await
        .expect("jobs running on client-1 at the cut");
    // Longer than --client-timeout, and until the server has taken every job off client-1.
    eventually(
        Duration::from_secs(90),
        "the cut client's jobs requeued",
        || async {
            if cut_at.elapsed() < Duration::from_secs(client_timeout as u64 + 2) {
                return None;
            }
            for id in &cut_jobs {
                let job: serde_json::Value = http
                    .get(format!("{url}/jobs/{id}"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                if job["client"] == "http://client-1:9000" && job["status"] != "Completed" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    eprintln!("client-1 cut off for {:?}", cut_at.elapsed());
    docker(&[
        "network", "connect", "--alias", "client-1", &back, &client_1,
    ])
    .unwrap();

    let mut completed_on = BTreeMap::new();
    for (id, tag) in &ids {
        let job = finished(&http, &url, *id, Duration::from_secs(120)).await;
        assert_eq!(job["status"], "Completed", "{tag}: {job}");
        let zip = result_zip(&http, &url, *id).await;
        let host = String::from_utf8_lossy(&zip["ran-on.txt"])
            .trim()
            .to_owned();
        // The result is the one of the run the server placed last, not a late one.
        let client = job["client"].as_str().unwrap();
        assert_eq!(
            client,
            format!("http://{host}:9000"),
            "EXACTLY-ONCE (late result): job {id} ({tag}) is on {client} but its result comes from {host}: {job}"
        );
        completed_on.insert(*id, (host, job["attempts"].as_u64().unwrap()));
        let events: Vec<serde_json::Value> = http
            .get(format!("{url}/jobs/{id}/events"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let completions = events.iter().filter(|e| e["status"] == "Completed").count();
        assert_eq!(
            completions, 1,
            "job {id} Completed {completions} times: {events:?}"
        );
    }
    // Every job ran to its end at least once; a job never requeued ran once in all.
    let runs_1 = runs_on(&stack, "client-1");
    let runs_2 = runs_on(&stack, "client-3");
    let mut requeued = BTreeSet::new();
    for (id, tag) in &ids {
        let (starts_1, ends_1) = runs_1.get(tag).copied().unwrap_or_default();
        let (starts_2, ends_2) = runs_2.get(tag).copied().unwrap_or_default();
        let (host, attempts) = &completed_on[id];
        assert!(
            ends_1 + ends_2 >= 1,
            "job {id} ({tag}) Completed on {host} but no run ended"
        );
        assert!(
            (starts_1 + starts_2) as u64 <= *attempts,
            "job {id} ({tag}) ran {} times in {attempts} attempts",
            starts_1 + starts_2
        );
        if *attempts > 1 {
            requeued.insert(*id);
        } else {
            assert_eq!(
                starts_1 + starts_2,
                1,
                "job {id} ({tag}) ran more than once"
            );
        }
    }
    for id in &cut_jobs {
        assert!(
            requeued.contains(id),
            "job {id}, running on client-1 when it was cut off, was not requeued: {completed_on:?}"
        );
    }
    eprintln!(
        "{} jobs, {} requeued after the cut, whole test in {:?}",
        ids.len(),
        requeued.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_balancer_answers_in_the_servers_json_when_no_server_is_up() {
    let _serial = serial().await;
    let compose = require_images!();
    let stack = Stack::new(compose, "noserver", &[]);
    let url = stack.up().await;
    let http = http_with_token(&stack.user_token());
    stack
        .compose(&["stop", "-t", "10", "server-1", "server-2"])
        .unwrap_or_else(|e| panic!("{e}"));
    let response = http.get(format!("{url}/jobs/1")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{:?}",
        response.headers()
    );
    // A client backs off as it would for a server's own 503.
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"2"[..]),
        "{:?}",
        response.headers()
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no jobrelay server"),
        "{body}"
    );
    assert_eq!(body["status"], "Unknown");
    stack
        .compose(&["start", "server-1", "server-2"])
        .unwrap_or_else(|e| panic!("{e}"));
    eventually(
        Duration::from_secs(60),
        "the server back behind the load balancer",
        || async {
            let response = http.get(format!("{url}/health")).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await;
}

/// [`RECORDING_JOB`] of a fifth of a second: for streams of hundreds of jobs.
fn short_recording_job() -> String {
    RECORDING_JOB.replace("sleep 3", "sleep 0.2")
}

/// The host name (container) of the server that leads, from `/health` through the load
/// balancer (`leader` is `host:pid:random`).
async fn leader_host(http: &reqwest::Client, url: &str) -> Option<String> {
    let health: serde_json::Value = http
        .get(format!("{url}/health"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let leader = health["leader"].as_str()?;
    Some(leader.split(':').next()?.to_owned())
}

/// One upload of the recording job tagged `tag`: `Some(id)` when answered 201, `None` when the
/// answer was lost (a connection cut by a kill). Any other answer fails the test.
async fn upload_tagged(http: &reqwest::Client, url: &str, job: &str, tag: &str) -> Option<i64> {
    let form = job_form(
        1,
        "example",
        &[("run.sh", job.as_bytes()), ("tag.txt", tag.as_bytes())],
    );
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        http.post(format!("{url}/upload")).multipart(form).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("upload {tag} hung for 30 s"));
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("upload {tag}: no answer ({e})");
            return None;
        }
    };
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap_or_default();
    assert_eq!(status, 201, "upload {tag}: {text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    body["id"].as_i64()
}

/// Every accepted job Completed once (one Completed event), and run once on the clients
/// (`runs_on` both); a job whose upload got no answer ran at most once.
async fn assert_each_ran_once(
    stack: &Stack,
    http: &reqwest::Client,
    url: &str,
    accepted: &BTreeMap<i64, String>,
    unanswered: &[String],
) {
    for (id, tag) in accepted {
        let job = finished(http, url, *id, Duration::from_secs(120)).await;
        assert_eq!(job["status"], "Completed", "{tag}: {job}");
        let events: Vec<serde_json::Value> = http
            .get(format!("{url}/jobs/{id}/events"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let completions = events.iter().filter(|e| e["status"] == "Completed").count();
        assert_eq!(completions, 1, "job {id} Completed {completions} times");
    }
    let mut runs = runs_on(stack, "client-1");
    for (tag, (starts, ends)) in runs_on(stack, "client-2") {
        let entry = runs.entry(tag).or_default();
        entry.0 += starts;
        entry.1 += ends;
    }
    for (id, tag) in accepted {
        let (starts, ends) = runs.get(tag).copied().unwrap_or_default();
        assert_eq!(
            (starts, ends),
            (1, 1),
            "EXACTLY-ONCE: job {id} ({tag}) started {starts} and ended {ends} times"
        );
    }
    for tag in unanswered {
        let (starts, _) = runs.get(tag).copied().unwrap_or_default();
        assert!(starts <= 1, "unanswered upload {tag} ran {starts} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_container_killed_mid_stream_the_standby_finishes_every_job_once() {
    let _serial = serial().await;
    let compose = require_images!();
    let started = Instant::now();
    let stack = Stack::new(compose, "failover", &[]);
    let url = stack.up().await;
    eprintln!("stack up from nothing in {:?}", started.elapsed());
    let http = http_with_token(&stack.user_token());
    let job = short_recording_job();
    let first = eventually(Duration::from_secs(60), "a leader", || {
        leader_host(&http, &url)
    })
    .await;

    let jobs = 300;
    let mut accepted = BTreeMap::new();
    let mut unanswered = Vec::new();
    let mut takeover = None;
    for n in 0..jobs {
        let tag = format!("job{n}");
        match upload_tagged(&http, &url, &job, &tag).await {
            Some(id) => {
                accepted.insert(id, tag);
            }
            None => unanswered.push(tag),
        }
        if n == jobs / 3 {
            docker(&["kill", &stack.container(&first)]).unwrap();
            // The takeover, seen through the load balancer while the uploads go on.
            let (http, url, first) = (http.clone(), url.clone(), first.clone());
            takeover = Some(tokio::spawn(async move {
                let killed_at = Instant::now();
                let second = eventually(Duration::from_secs(60), "another leader", || async {
                    leader_host(&http, &url).await.filter(|h| *h != first)
                })
                .await;
                (second, killed_at.elapsed())
            }));
        }
    }
    let (second, failover) = takeover.unwrap().await.unwrap();
    eprintln!("{first} killed: {second} leads {failover:?} later");
    assert_each_ran_once(&stack, &http, &url, &accepted, &unanswered).await;
    eprintln!(
        "{} jobs accepted, {} uploads unanswered, whole test in {:?}",
        accepted.len(),
        unanswered.len(),
        started.elapsed()
    );
}

/// Waits until the server's container answers its own /health (the image's check).
async fn server_healthy(stack: &Stack, server: &str) {
    let container = stack.container(server);
    eventually(
        Duration::from_secs(60),
        &format!("{server} healthy again"),
        || async {
            let container = container.clone();
            tokio::task::spawn_blocking(move || {
                docker(&["exec", &container, "jobrelay-healthcheck"]).ok()
            })
            .await
            .ok()
            .flatten()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_both_servers_loses_no_upload_and_answers_no_5xx() {
    let _serial = serial().await;
    let compose = require_images!();
    let started = Instant::now();
    let stack = Stack::new(compose, "rolling", &[]);
    let url = stack.up().await;
    let http = http_with_token(&stack.user_token());
    let job = short_recording_job();

    // A steady stream of uploads until the restarts are over; each must be answered 201.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (http, url, done) = (http.clone(), url.clone(), done.clone());
        tokio::spawn(async move {
            let mut accepted = BTreeMap::new();
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let tag = format!("job{n}");
                let id = upload_tagged(&http, &url, &job, &tag)
                    .await
                    .unwrap_or_else(|| panic!("upload {tag} lost during the rolling restart"));
                accepted.insert(id, tag);
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            accepted
        })
    };
    for server in ["server-1", "server-2"] {
        let restart = Instant::now();
        stack
            .compose(&["stop", "-t", "30", server])
            .unwrap_or_else(|e| panic!("{e}"));
        stack
            .compose(&["start", server])
            .unwrap_or_else(|e| panic!("{e}"));
        server_healthy(&stack, server).await;
        eprintln!("{server} stopped and back in {:?}", restart.elapsed());
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let accepted = stream.await.expect("the upload stream");
    assert!(!accepted.is_empty());
    assert_each_ran_once(&stack, &http, &url, &accepted, &[]).await;
    eprintln!(
        "{} uploads across the rolling restart, all 201, whole test in {:?}",
        accepted.len(),
        started.elapsed()
    );
}

/// One upload during an outage: its status and JSON body, or why it got none. A request that
/// takes longer than 30 s has hung.
async fn upload_during_outage(
    http: &reqwest::Client,
    url: &str,
    job: &str,
    tag: &str,
) -> Result<(u16, serde_json::Value), String> {
    let form = job_form(
        1,
        "example",
        &[("run.sh", job.as_bytes()), ("tag.txt", tag.as_bytes())],
    );
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        http.post(format!("{url}/upload")).multipart(form).send(),
    )
    .await
    .map_err(|_| format!("upload {tag} hung for 30 s"))?
    .map_err(|e| format!("upload {tag}: {e}"))?;
    let status = answer.status().as_u16();
    let text = answer.text().await.map_err(|e| e.to_string())?;
    let body = serde_json::from_str(&text)
        .map_err(|_| format!("upload {tag}: {status} with a body that is not JSON: {text}"))?;
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_mid_stream_loses_and_duplicates_nothing() {
    let _serial = serial().await;
    let compose = require_images!();
    let started = Instant::now();
    let stack = Stack::new(compose, "dbrestart", &[]);
    let url = stack.up().await;
    let http = http_with_token(&stack.user_token());
    let job = short_recording_job();

    let mut tags: BTreeMap<i64, String> = BTreeMap::new();
    for n in 0..20 {
        let tag = format!("before{n}");
        let id = upload_tagged(&http, &url, &job, &tag).await.unwrap();
        tags.insert(id, tag);
    }
    // Restarted while some run and others wait; uploads go on meanwhile, answered 201 or 503
    // in JSON, never another status, never hanging.
    let db = stack.container("db");
    let outage = Instant::now();
    let restart = tokio::task::spawn_blocking(move || docker(&["restart", "-t", "10", &db]));
    let mut refused = 0;
    let mut n = 0;
    while !restart.is_finished() {
        let tag = format!("during{n}");
        n += 1;
        match upload_during_outage(&http, &url, &job, &tag).await {
            Ok((201, body)) => {
                tags.insert(body["id"].as_i64().unwrap(), tag);
            }
            Ok((503, body)) => {
                assert!(body["message"].is_string(), "503 without a message: {body}");
                refused += 1;
            }
            Ok((status, body)) => panic!("upload {tag} during the outage: {status} {body}"),
            Err(why) => panic!("{why}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    restart.await.unwrap().expect("docker restart db");
    // Back: uploads are taken again (within the pool's reconnect).
    let tried = std::sync::atomic::AtomicUsize::new(0);
    let (after, tag) = eventually(
        Duration::from_secs(60),
        "an upload taken after the restart",
        || async {
            let tag = format!(
                "after{}",
                tried.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            match upload_during_outage(&http, &url, &job, &tag).await {
                Ok((201, body)) => body["id"].as_i64().map(|id| (id, tag)),
                Ok((503, _)) => None,
                Ok((status, body)) => panic!("upload {tag} after the outage: {status} {body}"),
                Err(why) => panic!("{why}"),
            }
        },
    )
    .await;
    eprintln!(
        "database restarted: uploads taken again {:?} after the restart began; {refused} of {n} \
         uploads refused with 503 meanwhile",
        outage.elapsed()
    );
    tags.insert(after, tag);
    assert_each_ran_once(&stack, &http, &url, &tags, &[]).await;
    eprintln!("{} jobs, whole test in {:?}", tags.len(), started.elapsed());
}
