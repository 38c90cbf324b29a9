//! Clients that dial out (`jobrelay client --connect`, issue 16): they join the server with a
//! join token, need no listening port, and are served through the tunnels they offer. Real
//! processes: a server whose service lists no client, and clients that join it.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::proxy::{FaultProxy, Mode};
use support::runlog::count_lines;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);
const JOIN_TOKEN: &str = "join-token-of-the-tests-0123456789";

/// Writes the join token (mode 600) and a service file whose `example` service has no
/// configured client but this join token.
fn joinable_config(root: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let token = root.join("join.token");
    std::fs::write(&token, JOIN_TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\njoin_token_file = {:?}\nruns_per_user = 100\nmax_runs = 100\n",
            token.display().to_string()
        ),
    )
    .unwrap();
    (config, token)
}

/// `jobrelay client --connect <server> --service example` with its data in `root/<name>`
/// and no `--port`.
fn pull_client(root: &Path, name: &str, server: &str, token: &Path, extra: &[&str]) -> Proc {
    let data = root.join(name);
    let mut args = vec![
        "client",
        "--connect",
        server,
        "--service",
        "example",
        "--join-token-file",
        token.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--leave-grace",
        "30",
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, root)
}

/// The server's `/clients` entries of joined clients.
async fn joined_clients(http: &reqwest::Client, server: &str) -> Vec<serde_json::Value> {
    let clients: Vec<serde_json::Value> = http
        .get(format!("{server}/clients"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    clients
        .into_iter()
        .filter(|c| c.get("joined").is_some())
        .collect()
}

/// Waits until `n` joined clients are healthy.
async fn wait_joined(http: &reqwest::Client, server: &str, n: usize) -> Vec<serde_json::Value> {
    eventually(LONG, &format!("{n} joined clients healthy"), || async {
        let clients = joined_clients(http, server).await;
        (clients.iter().filter(|c| c["healthy"] == true).count() == n).then_some(clients)
    })
    .await
}

/// Inodes of the TCP sockets listening on this host.
fn listening_inodes() -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // st 0A is LISTEN; the inode is the tenth field.
            if fields.get(3) == Some(&"0A") {
                inodes.push(fields[9].to_owned());
            }
        }
    }
    inodes
}

/// Inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect()
}

/// The ZIP of a job's work directory as it ended (`/download_partial`: Failed or Killed).
async fn partial_zip(http: &reqwest::Client, server: &str, id: i64) -> Vec<u8> {
    let response = http
        .get(format!("{server}/download_partial/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "job {id}");
    response.bytes().await.unwrap().to_vec()
}

/// The client holds connections (to the server) and not one listening socket.
fn assert_dials_out_only(client: &Proc) {
    let listening = listening_inodes();
    let held = socket_inodes(client.pid());
    assert!(!held.is_empty(), "it holds its connections to the server");
    assert!(
        held.iter().all(|inode| !listening.contains(inode)),
        "the pulling client listens on a port"
    );
}

/// A job that appends `start <name>` to `log`, works `seconds`, appends `end <name>` and
/// writes its name to out.txt.
fn logged_script(log: &Path, name: &str, seconds: f64) -> String {
    format!(
        "echo start {name} >> {log}\nsleep {seconds}\necho {name} > out.txt\necho end {name} >> {log}\n",
        log = log.display()
    )
}

#[tokio::test]
async fn a_client_with_no_listening_port_runs_jobs_to_every_end() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &[]);
    let client = pull_client(root, "client", &server.url, &token, &["--slots", "4"]);
    let http = http();
    let joined = wait_joined(&http, &server.url, 1).await;
    assert_eq!(joined[0]["services"], serde_json::json!(["example"]));
    assert_eq!(joined[0]["executor"], "local");
    assert!(joined[0]["joined"]["from"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    // `jobrelay clients` lists it.
    let listed = std::process::Command::new(binary())
        .args(["clients", "--server", &server.url, "--joined"])
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout);
    let node = std::fs::read_to_string(root.join("client/node-id")).unwrap();
    assert!(listed.contains(node.trim()), "{listed}");
    assert!(
        listed.contains("joined") && listed.contains("healthy") && listed.contains("local"),
        "{listed}"
    );
    assert_dials_out_only(&client);

    // Completed, with its files and logs.
    let done = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[
            (
                "run.sh",
                b"echo to-stdout; echo to-stderr >&2; cp data/in.txt out.txt\n",
            ),
            ("data/in.txt", b"input\n"),
        ],
    )
    .await;
    // Failed, with its exit code.
    let failing = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo failing; exit 3\n")],
    )
    .await;
    // Killed while running: its log read from the client, a partial download, then terminate.
    let pid_file = root.join("long.pid");
    let long_script = format!(
        "echo $$ > {}\necho started\necho partial > part.txt\nexec sleep 300\n",
        pid_file.display()
    );
    let long = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", long_script.as_bytes())],
    )
    .await;

    let job = wait_status(&http, &server.url, done, &["Completed"], LONG).await;
    assert_eq!(job["status"], "Completed");
    let entries = unzip(&download_zip(&http, &server.url, done).await);
    assert_eq!(entries["out.txt"], b"input\n");
    assert_eq!(entries[".jobrelay.stdout"], b"to-stdout\n");
    let log = http
        .get(format!("{}/jobs/{done}/log?stream=stderr", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), 200);
    assert_eq!(log.text().await.unwrap(), "to-stderr\n");

    let job = wait_status(&http, &server.url, failing, &["Failed"], LONG).await;
    let record = job_record(&http, &server.url, failing).await;
    assert_eq!(record["exit_code"], 3, "{job} {record}");

    wait_status(&http, &server.url, long, &["Running"], LONG).await;
    let pid = read_pid(&pid_file).await;
    let live_log = eventually(LONG, "the running job's log", || async {
        let text = http
            .get(format!("{}/jobs/{long}/log", server.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (text == "started\n").then_some(text)
    })
    .await;
    assert_eq!(live_log, "started\n");
    let partial = eventually(LONG, "a partial download", || async {
        let response = http
            .get(format!("{}/download_partial/{long}", server.url))
            .send()
            .await
            .unwrap();
        if response.status() != 200 {
            return None;
        }
        let entries = unzip(&response.bytes().await.unwrap());
        entries.contains_key("part.txt").then_some(entries)
    })
    .await;
    assert_eq!(partial["part.txt"], b"partial\n");
    let terminated = http
        .post(format!("{}/terminate/{long}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(terminated.status(), 200);
    let job = wait_status(&http, &server.url, long, &["Killed"], LONG).await;
    assert_eq!(job["status"], "Killed");
    assert!(!pid_alive(pid), "the killed job's process is gone");
    let entries = unzip(
        &http
            .get(format!("{}/download_partial/{long}", server.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    );
    assert_eq!(entries["part.txt"], b"partial\n");

    // Metrics count it.
    let metrics = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("jobrelay_server_joined_clients 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_with_no_listening_port_runs_slurm_jobs_to_every_end() {
    if let Some(why) = slurm::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &[]);
    let extra = [&slurm::EXECUTOR[..], &["--slots", "3", "--kill-grace", "3"]].concat();
    let client = pull_client(root, "client", &server.url, &token, &extra);
    let http = http();
    let joined = wait_joined(&http, &server.url, 1).await;
    assert_eq!(
        joined[0]["executor"], "slurm",
        "/clients says where its jobs run"
    );
    assert_dials_out_only(&client);

    // Completed: every file of the work directory in the ZIP, none of Slurm's own.
    let script = "echo hello\necho oops >&2\necho \"$SLURM_JOB_ID\" > slurm_job_id.txt\n\
                  cp inputs/a.pdb out.txt\nmkdir -p sub\necho deep > sub/d.txt\n";
    let done = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes()), ("inputs/a.pdb", b"ATOM\n")],
    )
    .await;
    // Failed, with its exit code.
    let failing = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo failing\nexit 7\n")],
    )
    .await;
    // Killed: a terminate through the server cancels its Slurm job.
    let (job_file, pid_file) = (root.join("long.slurm-job"), root.join("long.pid"));
    let long_script = format!(
        "echo \"$SLURM_JOB_ID\" > {}\necho $$ > {}\necho partial > part.txt\nsleep 300\n",
        job_file.display(),
        pid_file.display()
    );
    let long = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", long_script.as_bytes())],
    )
    .await;

    wait_status(&http, &server.url, done, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, done).await);
    let names: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            ".jobrelay.stderr",
            ".jobrelay.stdout",
            "inputs/",
            "inputs/a.pdb",
            "out.txt",
            "run.sh",
            "slurm_job_id.txt",
            "sub/",
            "sub/d.txt"
        ]
    );
    assert_eq!(entries["out.txt"], b"ATOM\n");
    assert_eq!(entries["sub/d.txt"], b"deep\n");
    assert_eq!(entries["run.sh"], script.as_bytes());
    assert_eq!(entries[".jobrelay.stdout"], b"hello\n");
    assert_eq!(entries[".jobrelay.stderr"], b"oops\n");
    let done_job: u64 = String::from_utf8_lossy(&entries["slurm_job_id.txt"])
        .trim()
        .parse()
        .expect("run.sh ran inside a Slurm job");
    assert_eq!(slurm::state(done_job), "COMPLETED");

    let job = wait_status(&http, &server.url, failing, &["Failed"], LONG).await;
    let record = job_record(&http, &server.url, failing).await;
    assert_eq!(record["exit_code"], 7, "{job} {record}");
    let entries = unzip(&partial_zip(&http, &server.url, failing).await);
    assert_eq!(entries[".jobrelay.stdout"], b"failing\n");

    wait_status(&http, &server.url, long, &["Running"], LONG).await;
    let pid = read_pid(&pid_file).await;
    let long_job: u64 = eventually(LONG, "the Slurm job id of the long job", || async {
        std::fs::read_to_string(&job_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    })
    .await;
    assert!(slurm::listed(long_job), "squeue lists the running job");
    let asked = std::time::Instant::now();
    let terminated = http
        .post(format!("{}/terminate/{long}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(terminated.status(), 200);
    let answer: serde_json::Value = terminated.json().await.unwrap();
    assert_eq!(answer["status"], "Killed", "{answer}");
    let job = job_record(&http, &server.url, long).await;
    assert_eq!(job["status"], "Killed", "{job}");
    eventually(LONG, "squeue no longer listing the killed job", || async {
        (!slurm::listed(long_job)).then_some(())
    })
    .await;
    println!(
        "terminate to squeue without the job: {:.2} s",
        asked.elapsed().as_secs_f64()
    );
    let state = slurm::state(long_job);
    assert!(
        ["CANCELLED", "FAILED"].contains(&state.as_str()),
        "Slurm says {state}"
    );
    assert!(!pid_alive(pid), "the killed job's process is gone");
    let entries = unzip(&partial_zip(&http, &server.url, long).await);
    assert_eq!(entries["part.txt"], b"partial\n");
}

#[tokio::test]
async fn a_slurm_job_outlives_its_pulling_client_killed_and_restarted() {
    if let Some(why) = slurm::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &[]);
    let mut client = pull_client(root, "client", &server.url, &token, &slurm::EXECUTOR);
    let http = http();
    wait_joined(&http, &server.url, 1).await;
    let (log, job_file, go) = (
        root.join("runs.log"),
        root.join("slurm-job"),
        root.join("go"),
    );
    let script = format!(
        "echo start >> {log}\necho \"$SLURM_JOB_ID\" > {job}\n\
         while [ ! -e {go} ]; do sleep 0.1; done\necho finished > done.txt\n",
        log = log.display(),
        job = job_file.display(),
        go = go.display()
    );
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    wait_status(&http, &server.url, id, &["Running"], LONG).await;
    let slurm_job: u64 = eventually(LONG, "the Slurm job id", || async {
        std::fs::read_to_string(&job_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    })
    .await;

    client.kill9();
    assert_eq!(slurm::state(slurm_job), "RUNNING", "the Slurm job runs on");
    let _client = pull_client(root, "client", &server.url, &token, &slurm::EXECUTOR);
    wait_joined(&http, &server.url, 1).await;
    std::fs::write(&go, b"").unwrap();

    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["done.txt"], b"finished\n");
    let record = job_record(&http, &server.url, id).await;
    assert_eq!(record["attempts"], 1, "followed, not sent again: {record}");
    assert_eq!(count_lines(&log).get("start"), Some(&1), "it ran once");
    assert_eq!(slurm::state(slurm_job), "COMPLETED");
}

#[tokio::test]
async fn joining_needs_the_join_token_and_tunnels_need_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, _token) = joinable_config(root);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let join = |token: Option<&str>, body: serde_json::Value| {
        let mut request = http.post(format!("{}/join", server.url)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let body = serde_json::json!({"node": "node-1", "services": ["example"]});
    let missing = join(None, body.clone()).await.unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = join(Some("not-the-token"), body.clone()).await.unwrap();
    assert_eq!(wrong.status(), 401);
    let answer: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(answer["message"], "wrong join token");
    let unknown = join(
        Some(JOIN_TOKEN),
        serde_json::json!({"node": "node-1", "services": ["nope"]}),
    )
    .await
    .unwrap();
    assert_eq!(unknown.status(), 403);
    assert!(joined_clients(&http, &server.url).await.is_empty());

    let joined = join(Some(JOIN_TOKEN), body.clone()).await.unwrap();
    assert_eq!(joined.status(), 200);
    let joined: serde_json::Value = joined.json().await.unwrap();
    assert_eq!(joined["client"], "http://node-1.joined");
    let credential = joined["credential"].as_str().unwrap().to_owned();
    // Joining again with the same node id and its credential is the same client, with the
    // same credential; without the credential the node id is in use (409).
    let mut shown = body.clone();
    shown["credential"] = credential.as_str().into();
    let again: serde_json::Value = join(Some(JOIN_TOKEN), shown)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["credential"], credential.as_str());
    assert_eq!(
        join(Some(JOIN_TOKEN), body.clone()).await.unwrap().status(),
        409
    );
    assert_eq!(joined_clients(&http, &server.url).await.len(), 1);

    let tunnel = |credential: Option<&str>| {
        let mut request = http
            .get(format!("{}/join/tunnel", server.url))
            .header("connection", "upgrade")
            .header("upgrade", "jobrelay-tunnel");
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        request.send()
    };
    assert_eq!(tunnel(None).await.unwrap().status(), 401);
    assert_eq!(tunnel(Some(JOIN_TOKEN)).await.unwrap().status(), 401);
    assert_eq!(tunnel(Some("guess")).await.unwrap().status(), 401);
    let leave = http
        .post(format!("{}/join/leave", server.url))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(leave.status(), 401);
    // The right credential, but not an upgrade: 400.
    let plain = http
        .get(format!("{}/join/tunnel", server.url))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    // The credential lets the client leave (no new job goes there).
    let leave = http
        .post(format!("{}/join/leave", server.url))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap();
    assert_eq!(leave.status(), 200);
    assert_eq!(
        joined_clients(&http, &server.url).await[0]["joined"]["leaving"],
        true
    );
}

/// Joins a client by hand (`POST /join` with the join token); returns its credential.
async fn credential_of_a_joined_client(http: &reqwest::Client, server: &str, node: &str) -> String {
    let answer: serde_json::Value = http
        .post(format!("{server}/join"))
        .bearer_auth(JOIN_TOKEN)
        .json(&serde_json::json!({"node": node, "services": ["example"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["credential"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_joined_clients_credential_is_no_user_on_the_job_api() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, _token) = joinable_config(root);
    let users = root.join("users.toml");
    std::fs::write(
        &users,
        "[[users]]\ntoken = \"user-1-token\"\nuser_id = 1\nadmin = true\n",
    )
    .unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Without a users file every caller is trusted, with one a user's token is needed: in
    // neither may a joined client's credential act as a user.
    for (name, extra, user) in [
        ("open", vec![], http()),
        (
            "users",
            vec!["--users-file", users.to_str().unwrap()],
            http_with_token("user-1-token"),
        ),
    ] {
        let server = TestServer::start(&root.join(name), &config, &extra);
        let id = upload_job(
            &user,
            &server.url,
            1,
            "example",
            &[("run.sh", b"sleep 300\n")],
        )
        .await;
        let credential = credential_of_a_joined_client(&http(), &server.url, "node-1").await;
        let client = http_with_token(&credential);
        let routes = [
            (reqwest::Method::POST, "/upload".to_owned()),
            (reqwest::Method::GET, "/jobs".to_owned()),
            (reqwest::Method::GET, format!("/jobs/{id}")),
            (reqwest::Method::GET, format!("/jobs/{id}/events")),
            (reqwest::Method::GET, format!("/jobs/{id}/log")),
            (reqwest::Method::GET, format!("/download/{id}")),
            (reqwest::Method::GET, format!("/download_partial/{id}")),
            (reqwest::Method::POST, format!("/terminate/{id}")),
            (reqwest::Method::GET, "/clients".to_owned()),
            (reqwest::Method::GET, "/overview".to_owned()),
            (reqwest::Method::GET, "/metrics".to_owned()),
            (reqwest::Method::GET, "/health".to_owned()),
            (reqwest::Method::GET, "/no-such-route".to_owned()),
        ];
        for (method, path) in &routes {
            let mut request = client.request(method.clone(), format!("{}{path}", server.url));
            if path == "/upload" {
                request = request.multipart(job_form(1, "example", &[("run.sh", b"true\n")]));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let answer: serde_json::Value = response
                .json()
                .await
                .unwrap_or_else(|e| panic!("{name} {method} {path}: not JSON: {e}"));
            assert_eq!(status, 403, "{name} {method} {path}: {answer}");
            let message = answer["message"].as_str().unwrap();
            assert!(
                message.contains("joined client's credential") && message.contains("/join/tunnel"),
                "{name} {method} {path}: {message}"
            );
        }
        // Nothing it asked was done: no second job, the first not terminated.
        let jobs: serde_json::Value = user
            .get(format!("{}/jobs", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            jobs["jobs"].as_array().map(Vec::len),
            Some(1),
            "{name}: {jobs}"
        );
        let job = job_record(&user, &server.url, id).await;
        assert_ne!(job["status"], "Killed", "{name}: {job}");
        // The credential still serves its own routes.
        let leave = client
            .post(format!("{}/join/leave", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(leave.status(), 200, "{name}");
    }
}

#[tokio::test]
async fn joining_is_off_without_a_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A service of one (absent) configured client and no join token.
    let config = write_server_config(
        root,
        &[("example", vec!["http://127.0.0.1:9".into()], 1, 1)],
    );
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    for (method, path) in [
        (reqwest::Method::POST, "/join"),
        (reqwest::Method::GET, "/join/tunnel"),
        (reqwest::Method::POST, "/join/leave"),
    ] {
        let response = http
            .request(method, format!("{}{path}", server.url))
            .bearer_auth(JOIN_TOKEN)
            .body(r#"{"node":"n","services":["example"]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains("joining is off"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn hostile_bodies_on_the_join_routes_answer_json_4xx_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, _token) = joinable_config(root);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let huge = format!(
        r#"{{"node":"n","services":["example"],"version":"{}"}}"#,
        "x".repeat(100_000)
    );
    let long_node = format!(r#"{{"node":"{}","services":["example"]}}"#, "a".repeat(64));
    let many = format!(
        r#"{{"node":"n","services":[{}]}}"#,
        vec!["\"example\""; 65].join(",")
    );
    let bodies: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("not json", "node=1".into()),
        ("truncated", r#"{"node":"n","serv"#.into()),
        ("array", "[1,2]".into()),
        ("no services", r#"{"node":"n"}"#.into()),
        ("empty services", r#"{"node":"n","services":[]}"#.into()),
        ("too many services", many),
        (
            "unknown field",
            r#"{"node":"n","services":["example"],"x":1}"#.into(),
        ),
        (
            "node with a dot",
            r#"{"node":"a.b","services":["example"]}"#.into(),
        ),
        (
            "node with a slash",
            r#"{"node":"../x","services":["example"]}"#.into(),
        ),
        (
            "upper-case node",
            r#"{"node":"ABC","services":["example"]}"#.into(),
        ),
        ("empty node", r#"{"node":"","services":["example"]}"#.into()),
        ("long node", long_node),
        (
            "node a number",
            r#"{"node":7,"services":["example"]}"#.into(),
        ),
        (
            "NUL in node",
            "{\"node\":\"a\\u0000b\",\"services\":[\"example\"]}".into(),
        ),
        ("huge", huge),
    ];
    for (what, body) in &bodies {
        let response = http
            .post(format!("{}/join", server.url))
            .bearer_auth(JOIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{what}: {status}");
        // Refused before its body was read: the answer says the connection goes, so the
        // next request does not race the close on a pooled connection.
        let closes = response
            .headers()
            .get("connection")
            .is_some_and(|v| v == "close");
        assert_eq!(closes, *what == "huge", "{what}: {:?}", response.headers());
        let answer: serde_json::Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert!(answer["message"].is_string(), "{what}: {answer}");
    }
    // Bodies on the tunnel and leave routes (no credential): 401 JSON whatever they carry.
    for path in ["/join/tunnel", "/join/leave"] {
        let response = http
            .post(format!("{}{path}", server.url))
            .body(vec![0u8; 10_000])
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{path}: {status}");
        let _: serde_json::Value = response.json().await.unwrap();
    }
    // Nothing joined, no socket made.
    assert!(joined_clients(&http, &server.url).await.is_empty());
    assert!(tree(&server.data_dir().join("joined")).is_empty());
}

/// Three clients join while jobs stream in; one is killed with SIGKILL mid-run and one leaves
/// with SIGTERM. Every job completes once with its own results; only the jobs that were
/// running on the killed client run again (their run there never ended).
async fn clients_come_and_go_under_a_stream_of_jobs(jobs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &["--client-timeout", "3"]);
    let http = http();
    let log = root.join("runs.log");
    let first = pull_client(root, "first", &server.url, &token, &["--slots", "3"]);
    wait_joined(&http, &server.url, 1).await;

    let mut ids = Vec::new();
    let mut killed = None;
    let mut leaving = None;
    let mut second = None;
    let mut third = None;
    for n in 0..jobs {
        let name = format!("job{n}");
        let script = logged_script(&log, &name, 0.3 + (n % 5) as f64 * 0.1);
        ids.push((
            upload_job(
                &http,
                &server.url,
                1 + (n as i64 % 3),
                "example",
                &[("run.sh", script.as_bytes())],
            )
            .await,
            name,
        ));
        if n == jobs / 5 {
            second = Some(pull_client(
                root,
                "second",
                &server.url,
                &token,
                &["--slots", "3"],
            ));
            third = Some(pull_client(
                root,
                "third",
                &server.url,
                &token,
                &["--slots", "3"],
            ));
        }
        if n == jobs / 2 {
            // The second is killed while it runs jobs.
            let mut proc = second.take().unwrap();
            let node = std::fs::read_to_string(root.join("second/node-id")).unwrap();
            let base = format!("http://{}.joined", node.trim());
            eventually(LONG, "a job running on the second client", || async {
                for (id, _) in &ids {
                    let job = job_json(&http, &server.url, *id).await;
                    if job["status"] == "Running" && job["client"] == base.as_str() {
                        return Some(());
                    }
                }
                None
            })
            .await;
            proc.kill9();
            killed = Some(base);
        }
        if n == jobs * 3 / 4 {
            // The third leaves: it finishes what it has.
            let proc = third.take().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(proc.pid() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            leaving = Some(proc);
        }
    }
    let killed = killed.unwrap();
    let mut attempts = std::collections::HashMap::new();
    for (id, name) in &ids {
        let begin = std::time::Instant::now();
        let job = loop {
            let job = job_json(&http, &server.url, *id).await;
            if ["Completed", "Failed"].contains(&job["status"].as_str().unwrap_or("")) {
                break job;
            }
            if begin.elapsed() > LONG {
                let record = job_record(&http, &server.url, *id).await;
                let events: serde_json::Value = http
                    .get(format!("{}/jobs/{id}/events", server.url))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                panic!(
                    "{name} never ended: {record}\nevents: {events}\nclients: {:#?}\nserver log:\n{}",
                    joined_clients(&http, &server.url).await,
                    server.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(job["status"], "Completed", "{name}: {job}");
        let entries = unzip(&download_zip(&http, &server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("{name}\n").as_bytes(), "{name}");
        let record = job_record(&http, &server.url, *id).await;
        attempts.insert(*id, record["attempts"].as_i64().unwrap());
    }
    // The leaving client stopped on its own once its jobs were collected.
    let mut leaving = leaving.unwrap();
    let begin = std::time::Instant::now();
    let status = loop {
        if let Some(status) = leaving.child.try_wait().unwrap() {
            break status;
        }
        assert!(begin.elapsed() < LONG, "the leaving client never exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}: {}", leaving.log());
    assert!(leaving.log().contains("every payload here was collected"));

    let runs = count_lines(&log);
    let mut twice = Vec::new();
    for (id, name) in &ids {
        // Each start is a dispatch the server recorded: a job runs again only after it was
        // given away (from the killed client, or from one quiet past --client-timeout under
        // load), never twice on one dispatch.
        let starts = runs.get(&format!("start {name}")).copied().unwrap_or(0) as i64;
        if starts < 1 || starts > attempts[id] {
            panic!(
                "{name} started {starts} times in {} attempts: {}\nhistory: {}\nserver log:\n{}",
                attempts[id],
                job_record(&http, &server.url, *id).await,
                job_history(&http, &server.url, *id).await,
                server.log()
            );
        }
        if starts > 1 {
            twice.push(name.clone());
        }
    }
    // Only jobs given away ran more than once, and no job was lost.
    let requeued = attempts.values().filter(|&&sent| sent > 1).count();
    assert!(
        twice.len() <= requeued,
        "ran twice: {twice:?}, requeued: {requeued}"
    );
    println!(
        "{jobs} jobs: {requeued} given away (the killed client was {killed}), {} ran twice",
        twice.len()
    );
    drop(first);
}

#[tokio::test]
async fn clients_joining_leaving_and_killed_lose_and_duplicate_no_job() {
    clients_come_and_go_under_a_stream_of_jobs(60).await;
}

#[tokio::test]
#[ignore = "slow: 500 jobs"]
async fn five_hundred_jobs_while_clients_join_leave_and_die() {
    clients_come_and_go_under_a_stream_of_jobs(500).await;
}

/// A job that appends `start <name>` to `log`, records its pid and where it ran
/// (`pids/<client>.pid`, its work directory in out.txt), works `seconds`, and ends.
fn traced_script(root: &Path, log: &Path, name: &str, seconds: u32) -> String {
    format!(
        "echo start {name} >> {log}\nclient=$(basename $(dirname $(dirname $PWD)))\n\
         echo $$ > {pids}/$client.pid\npwd > out.txt\nfor i in $(seq {tenths}); do sleep 0.1; done\n\
         echo end {name} >> {log}\n",
        log = log.display(),
        pids = root.join("pids").display(),
        tenths = seconds * 10,
    )
}

#[tokio::test]
async fn a_link_cut_under_the_timeout_resumes_and_past_it_moves_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pids")).unwrap();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &["--client-timeout", "4"]);
    let proxy = FaultProxy::start(support::net::addr_of(&server.url));
    let http = http();
    let log = root.join("runs.log");
    let _cut_off = pull_client(root, "behind", &proxy.url(), &token, &["--slots", "1"]);
    wait_joined(&http, &server.url, 1).await;

    // Under the timeout: cut for 2 s while the job runs; it carries on, once.
    let script = traced_script(root, &log, "short-cut", 5);
    let first = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    wait_status(&http, &server.url, first, &["Running"], LONG).await;
    proxy.set(Mode::Drop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Mode::Pass);
    wait_status(&http, &server.url, first, &["Completed"], LONG).await;
    let record = job_record(&http, &server.url, first).await;
    assert_eq!(record["attempts"], 1, "{record}");
    assert_eq!(count_lines(&log).get("start short-cut"), Some(&1));
    let entries = unzip(&download_zip(&http, &server.url, first).await);
    assert!(String::from_utf8_lossy(&entries["out.txt"]).contains("/behind/"));

    // Past the timeout: the job moves to another client; the old run is killed once its
    // client is back, and the job's results are the new run's.
    let script = traced_script(root, &log, "long-cut", 15);
    let second = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", script.as_bytes())],
    )
    .await;
    wait_status(&http, &server.url, second, &["Running"], LONG).await;
    let old_pid = read_pid(&root.join("pids/behind.pid")).await;
    proxy.set(Mode::Drop);
    let other = pull_client(root, "other", &server.url, &token, &["--slots", "1"]);
    let job = eventually(LONG, "the job queued again and run elsewhere", || async {
        let record = job_record(&http, &server.url, second).await;
        (record["attempts"] == 2 && record["status"] == "Running").then_some(record)
    })
    .await;
    assert!(job["client"] != serde_json::Value::Null, "{job}");
    proxy.set(Mode::Pass);
    // Back: the run given away is killed there.
    eventually(LONG, "the old run killed", || async {
        (!pid_alive(old_pid)).then_some(())
    })
    .await;
    wait_status(&http, &server.url, second, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, second).await);
    let out = String::from_utf8_lossy(&entries["out.txt"]).into_owned();
    assert!(
        out.contains("/other/"),
        "the results are the new run's: {out}"
    );
    let runs = count_lines(&log);
    assert_eq!(runs.get("start long-cut"), Some(&2), "{runs:?}");
    assert_eq!(
        runs.get("end long-cut"),
        Some(&1),
        "the old run never ended: {runs:?}"
    );
    drop(other);
}

#[tokio::test]
async fn a_server_killed_and_restarted_mid_run_finds_its_joined_clients_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pids")).unwrap();
    let (config, token) = joinable_config(root);
    let port = support::net::free_port().to_string();
    let data = root.join("server");
    let args = [
        "server",
        "--port",
        &port,
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let mut server = Proc::start(&args, root);
    let url = server.url.clone();
    let http = http();
    let log = root.join("runs.log");
    let _client = pull_client(root, "client", &url, &token, &["--slots", "2"]);
    wait_joined(&http, &url, 1).await;
    let script = traced_script(root, &log, "across", 4);
    let id = upload_job(&http, &url, 1, "example", &[("run.sh", script.as_bytes())]).await;
    wait_status(&http, &url, id, &["Running"], LONG).await;
    server.kill9();
    let server = Proc::start(&args, root);
    // A new HTTP client: the old one's pooled connections went with the killed server.
    let http = support::http();
    // The client joins again, its job is followed there and completes once.
    let job = wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    assert_eq!(job["status"], "Completed");
    let record = job_record(&http, &server.url, id).await;
    assert_eq!(record["attempts"], 1, "{record}");
    let runs = count_lines(&log);
    assert_eq!(runs.get("start across"), Some(&1), "{runs:?}");
    assert!(server.log().contains("waiting for it to join again"));
    assert_eq!(wait_joined(&http, &server.url, 1).await.len(), 1);
}

/// CPU seconds (user + system) process `pid` used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name's closing parenthesis; utime and stime are 14th, 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / CLOCK_TICKS
}

/// sysconf(_SC_CLK_TCK): 100 on every Linux we run on.
const CLOCK_TICKS: f64 = 100.0;

/// Resident memory (VmRSS) of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
#[ignore = "slow: 100 client processes, 30 s of measurement"]
async fn a_hundred_idle_joined_clients_cost_the_server_little() {
    const CLIENTS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        clients.push(pull_client(
            root,
            &format!("c{n}"),
            &server.url,
            &token,
            &["--slots", "1"],
        ));
    }
    wait_joined(&http, &server.url, CLIENTS).await;
    let rss_before = rss_kib(server.pid());
    let cpu_before = cpu_seconds(server.pid());
    let begin = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    let elapsed = begin.elapsed().as_secs_f64();
    let rss = rss_kib(server.pid());
    println!(
        "{CLIENTS} idle joined clients: server CPU {cpu:.2} s over {elapsed:.1} s ({:.1} %), \
         RSS {} MiB (at join {} MiB, peak {} MiB)",
        100.0 * cpu / elapsed,
        rss / 1024,
        rss_before / 1024,
        server.peak_rss_kib() / 1024
    );
    // Still all there, and a job still runs.
    assert_eq!(
        wait_joined(&http, &server.url, CLIENTS).await.len(),
        CLIENTS
    );
    let id = upload_job(&http, &server.url, 1, "example", &[("run.sh", b"true\n")]).await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
}

#[tokio::test]
async fn a_client_joins_a_server_over_tls_with_its_ca() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A CA and the server's certificate for 127.0.0.1, signed by it.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (ca_path, cert_path, key_path) = (
        root.join("ca.pem"),
        root.join("cert.pem"),
        root.join("key.pem"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    let (config, token) = joinable_config(root);
    let server = TestServer::start(
        root,
        &config,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let _client = pull_client(
        root,
        "client",
        &server.url,
        &token,
        &["--ca", ca_path.to_str().unwrap()],
    );
    let http = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    wait_joined(&http, &server.url, 1).await;
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo over-tls > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"over-tls\n");
}

/// POSTs a join with the test token for `node`, showing `credential` if given.
async fn raw_join(
    http: &reqwest::Client,
    server: &str,
    node: &str,
    credential: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut body = serde_json::json!({"node": node, "services": ["example"]});
    if let Some(credential) = credential {
        body["credential"] = credential.into();
    }
    let response = http
        .post(format!("{server}/join"))
        .bearer_auth(JOIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The join token alone does not take a live client's seat (its jobs' inputs and results
/// would go to whoever knows its node id): a restarted client shows the credential it kept
/// in its data directory and keeps its seat at once; only once a client has been quiet past
/// `--client-timeout` is its node id given to another join, with a new credential.
#[tokio::test]
async fn a_live_clients_node_id_is_not_taken_with_the_join_token_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (config, token) = joinable_config(root);
    let server = TestServer::start(root, &config, &["--client-timeout", "3"]);
    let http = http();
    let mut client = pull_client(root, "client", &server.url, &token, &[]);
    wait_joined(&http, &server.url, 1).await;
    let node = std::fs::read_to_string(root.join("client/node-id")).unwrap();
    let node = node.trim();
    let kept = root.join("client/join-credential");
    let credential = std::fs::read_to_string(&kept).unwrap();
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );

    for shown in [None, Some("not-the-credential-0123456789abcdef")] {
        let (status, answer) = raw_join(&http, &server.url, node, shown).await;
        assert_eq!(status, 409, "{shown:?}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("alive"),
            "{answer}"
        );
    }
    let (status, answer) = raw_join(&http, &server.url, node, Some(&credential)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["credential"], credential.as_str());

    // Killed and started again at once, while its seat still looks alive: it keeps it.
    client.kill9();
    let client = pull_client(root, "client", &server.url, &token, &[]);
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo after-restart > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), credential);
    // The status as the client logs a refused join ("409 Conflict: ..."), not the bare
    // number: node ids and cgroup names in the log are random hex and may hold "409".
    assert!(
        !client.log().contains("409 Conflict"),
        "the restarted client was refused: {}",
        client.log()
    );

    // Gone for good: past the timeout another join takes the node id, with a new credential,
    // and the old one opens no tunnel.
    let mut client = client;
    client.kill9();
    let taken = eventually(LONG, "the quiet node id taken", || async {
        let (status, answer) = raw_join(&http, &server.url, node, None).await;
        assert!(status == 200 || status == 409, "{status}: {answer}");
        (status == 200).then_some(answer)
    })
    .await;
    assert_ne!(taken["credential"], credential.as_str());
    let response = http
        .get(format!("{}/join/tunnel", server.url))
        .bearer_auth(&credential)
        .header("connection", "upgrade")
        .header("upgrade", "jobrelay-tunnel")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}
