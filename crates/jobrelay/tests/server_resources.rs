//! Per-job resources through a real server and real clients: jobs land only where their
//! cores fit, concurrent GPU jobs get different GPUs, an impossible job is refused, a waiting
//! job says why, the walltime kills, and the memory request is a limit (a memory cgroup where
//! the machine has one, else RLIMIT_AS) that says so when it ended a job.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);

/// An upload of `script` for `user` on `example` with extra text fields.
fn form_with(user: i64, script: &str, fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = job_form(user, "example", &[("run.sh", script.as_bytes())]);
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    form
}

async fn upload_with(
    http: &reqwest::Client,
    server: &str,
    user: i64,
    script: &str,
    fields: &[(&str, &str)],
) -> i64 {
    let (status, body) = post_upload(http, server, form_with(user, script, fields)).await;
    assert_eq!(status, 201, "upload refused: {body}");
    body["id"].as_i64().unwrap()
}

/// Waits until the server has every client's advertised resources.
async fn wait_for_resources(http: &reqwest::Client, server: &str, clients: usize) {
    eventually(LONG, "every client's resources known", || async {
        let views: serde_json::Value = http
            .get(format!("{server}/clients"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let known = views
            .as_array()?
            .iter()
            .filter(|c| c["healthy"] == true && c["resources"].is_object())
            .count();
        (known == clients).then_some(())
    })
    .await
}

/// One job's run as it logged it: its client, cores, start and end (ns).
struct Run {
    client: String,
    cores: u32,
    start: u128,
    end: u128,
}

fn runs(log: &Path) -> Vec<Run> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Run {
                client: f[0].to_owned(),
                cores: f[1].parse().unwrap(),
                start: f[2].parse().unwrap(),
                end: f[3].parse().unwrap(),
            }
        })
        .collect()
}

/// The most cores in use at once on each client, from the runs' start and end times.
fn peak_cores(runs: &[Run]) -> BTreeMap<String, u32> {
    let mut peaks = BTreeMap::new();
    for run in runs {
        let at_start: u32 = runs
            .iter()
            .filter(|r| r.client == run.client && r.start <= run.start && run.start < r.end)
            .map(|r| r.cores)
            .sum();
        let peak = peaks.entry(run.client.clone()).or_insert(0);
        *peak = (*peak).max(at_start);
    }
    peaks
}

#[tokio::test]
async fn mixed_jobs_all_complete_and_no_client_runs_more_cores_than_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let big = start_client(
        root,
        "big",
        &["--cores", "8", "--memory", "16G", "--slots", "16"],
    );
    let small = start_client(
        root,
        "small",
        &["--cores", "2", "--memory", "4G", "--slots", "16"],
    );
    let config = write_server_config(
        root,
        &[(
            "example",
            vec![big.url.clone(), small.url.clone()],
            100,
            100,
        )],
    );
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    wait_for_resources(&http, &server.url, 2).await;

    let log = root.join("runs.log");
    // Outside its work directory: which client (from the work directory's path), the cores
    // it was given, and when it ran.
    let script = format!(
        "start=$(date +%s%N)\nsleep 0.4\ncase \"$PWD\" in */big/*) c=big ;; *) c=small ;; esac\n\
         echo \"$c $JOBRELAY_CORES $start $(date +%s%N)\" >> {log}\n",
        log = log.display()
    );
    let mut ids = Vec::new();
    for n in 0..14 {
        let cores = if n % 3 == 0 { "4" } else { "1" };
        ids.push(upload_with(&http, &server.url, n % 3, &script, &[("cores", cores)]).await);
    }
    for id in &ids {
        let job = wait_status(&http, &server.url, *id, &["Completed", "Failed"], LONG).await;
        assert_eq!(job["status"], "Completed", "{job}");
    }
    let runs = runs(&log);
    assert_eq!(runs.len(), ids.len());
    let fours: Vec<&Run> = runs.iter().filter(|r| r.cores == 4).collect();
    assert_eq!(fours.len(), 5, "each job was given the cores it asked for");
    assert!(
        fours.iter().all(|r| r.client == "big"),
        "a 4-core job cannot go to the 2-core client"
    );
    let peaks = peak_cores(&runs);
    assert!(peaks["big"] <= 8, "big ran {} cores at once", peaks["big"]);
    assert!(
        peaks.get("small").copied().unwrap_or(0) <= 2,
        "small ran {:?} cores at once",
        peaks.get("small")
    );
    let record = job_record(&http, &server.url, ids[0]).await;
    assert_eq!(record["cores"], 4);
    assert!(record.get("waiting_for").is_none(), "not queued: {record}");
}

#[tokio::test]
async fn concurrent_gpu_jobs_see_different_devices() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--cores", "4", "--gpu-ids", "0,1"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    wait_for_resources(&http, &server.url, 1).await;

    let marks = root.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Each job says which GPUs it has, then waits (20 s at most) until both have started, so
    // the two run at the same time.
    let script = |name: &str| {
        format!(
            "echo \"$CUDA_VISIBLE_DEVICES $JOBRELAY_GPUS\" > {m}/{name}\n\
             for i in $(seq 400); do [ -e {m}/a ] && [ -e {m}/b ] && break; sleep 0.05; done\n",
            m = marks.display()
        )
    };
    let a = upload_with(&http, &server.url, 1, &script("a"), &[("gpus", "1")]).await;
    let b = upload_with(&http, &server.url, 2, &script("b"), &[("gpus", "1")]).await;
    for id in [a, b] {
        let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
        assert_eq!(job["status"], "Completed", "{job}");
    }
    let seen = |name: &str| std::fs::read_to_string(marks.join(name)).unwrap();
    let (seen_a, seen_b) = (seen("a"), seen("b"));
    assert!(
        seen_a.ends_with(" 1\n") && seen_b.ends_with(" 1\n"),
        "{seen_a} {seen_b}"
    );
    assert_ne!(seen_a, seen_b, "two running jobs got the same GPU");
    let mut devices = [
        seen_a.split(' ').next().unwrap(),
        seen_b.split(' ').next().unwrap(),
    ];
    devices.sort();
    assert_eq!(devices, ["0", "1"]);
}

#[tokio::test]
async fn an_impossible_job_is_refused_and_a_waiting_job_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--cores", "2", "--memory", "2G"]);
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\nclients = [{:?}]\nruns_per_user = 1\nmax_runs = 10\n\
             max_cores = 8\nmax_walltime = \"1h\"\n",
            client.url
        ),
    )
    .unwrap();
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    wait_for_resources(&http, &server.url, 1).await;

    // More than any client has: 400 naming the largest client.
    let (status, body) = post_upload(
        &http,
        &server.url,
        form_with(1, "true\n", &[("cores", "4")]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("needs 4 cores")
            && message.contains(&client.url)
            && message.contains("has 2"),
        "{message}"
    );
    // Over the service's maxima: 400 saying which.
    let (status, body) = post_upload(
        &http,
        &server.url,
        form_with(1, "true\n", &[("cores", "9")]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("max_cores"),
        "{body}"
    );
    let (status, body) = post_upload(
        &http,
        &server.url,
        form_with(1, "true\n", &[("walltime", "2h")]),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A 2-core job holds the client; user 1's next job waits for its quota, user 2's for
    // cores.
    let gate = root.join("gate");
    let held = format!(
        "for i in $(seq 1200); do [ -e {g} ] && break; sleep 0.05; done\n",
        g = gate.display()
    );
    let first = upload_with(&http, &server.url, 1, &held, &[("cores", "2")]).await;
    wait_status(&http, &server.url, first, &["Running"], LONG).await;
    let same_user = upload_with(&http, &server.url, 1, "true\n", &[]).await;
    let other_user = upload_with(&http, &server.url, 2, "true\n", &[("memory", "1G")]).await;
    let waiting = |record: serde_json::Value| record["waiting_for"].clone();
    let quota = waiting(job_record(&http, &server.url, same_user).await);
    assert_eq!(quota["reason"], "user_quota", "{quota}");
    assert_eq!(
        quota["message"],
        "user 1 is at runs_per_user (1 of 1 running)"
    );
    let room = waiting(job_record(&http, &server.url, other_user).await);
    assert_eq!(room["reason"], "no_free_resources", "{room}");
    assert!(
        room["message"]
            .as_str()
            .unwrap()
            .contains("no client has 1 core and 1024 MiB free now"),
        "{room}"
    );
    // `jobrelay status` says it too.
    let output = std::process::Command::new(binary())
        .args(["status", "--server", &server.url, &other_user.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("waiting: no client has 1 core"), "{text}");
    assert!(text.contains("(no_free_resources)"), "{text}");

    std::fs::write(&gate, "").unwrap();
    for id in [first, same_user, other_user] {
        let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
        assert_eq!(job["status"], "Completed", "{job}");
    }
}

#[tokio::test]
async fn a_job_past_its_walltime_is_killed_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--kill-grace", "1"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(root, &config, &[]);
    let http = http();
    let started = std::time::Instant::now();
    let id = upload_with(&http, &server.url, 1, "sleep 60\n", &[("walltime", "1")]).await;
    let job = wait_status(
        &http,
        &server.url,
        id,
        &["Completed", "Failed", "Killed"],
        LONG,
    )
    .await;
    assert_eq!(job["status"], "Failed", "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains("walltime of 1 s exceeded (the job's walltime)"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(job_record(&http, &server.url, id).await["walltime_s"], 1);
}

/// The client's `/info`.
async fn client_info(http: &reqwest::Client, client: &str) -> serde_json::Value {
    http.get(format!("{client}/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// 300 MB in one bash variable: every byte touched, so it is resident.
const MEMORY_HOG: &str = "x=$(head -c 300000000 /dev/zero | tr '\\0' a)\necho ${#x}\n";

#[tokio::test]
async fn a_job_past_its_memory_is_stopped_and_the_reason_says_so() {
    // RLIMIT_AS, as on a machine without a memory cgroup (cgroups off).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = Proc::client(
        0,
        &root.join("client"),
        root,
        &["--memory", "4G"],
        &[("JOBRELAY_NO_CGROUP", "1")],
    );
    let http = http();
    assert_eq!(
        client_info(&http, &client.url).await["memory_limits"],
        "RLIMIT_AS only: cgroups disabled by JOBRELAY_NO_CGROUP"
    );
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(root, &config, &[]);
    // 300 MB under a limit of 200 MiB.
    let id = upload_with(&http, &server.url, 1, MEMORY_HOG, &[("memory", "200M")]).await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains("memory limit of 200 MiB (RLIMIT_AS) ended it"),
        "{message}"
    );
    // The same job under its limit completes.
    let small = "x=$(head -c 1000000 /dev/zero | tr '\\0' a)\necho $JOBRELAY_MEMORY_MB\n";
    let id = upload_with(&http, &server.url, 1, small, &[("memory", "200M")]).await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Completed", "{job}");
    let files = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(files[".jobrelay.stdout"], b"200\n");
}

#[tokio::test]
async fn a_job_past_its_memory_cgroup_limit_is_killed_and_the_reason_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--memory", "4G"]);
    let http = http();
    let info = client_info(&http, &client.url).await;
    let how = info["memory_limits"].as_str().unwrap().to_owned();
    let v1 = match how.as_str() {
        "cgroup v1 memory controller" => true,
        "cgroup v2 memory.max" => false,
        _ => {
            eprintln!("skipped: the client has no memory cgroup here ({how})");
            return;
        }
    };
    let node = info["node"].as_str().unwrap().to_owned();
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 5, 5)]);
    let server = TestServer::start(root, &config, &[]);
    wait_for_resources(&http, &server.url, 1).await;
    let clients: serde_json::Value = http
        .get(format!("{}/clients", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(clients[0]["memory_limits"], how, "{clients}");

    // 300 MB of resident memory under a limit of 64 MiB: the limit's OOM kill ends it.
    let id = upload_with(&http, &server.url, 1, MEMORY_HOG, &[("memory", "64M")]).await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Failed", "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("killed: memory limit of 64 MiB reached ({how}")),
        "{message}"
    );
    eprintln!("memory limits: {how}; the hog's reason: {message}");
    assert!(!message.contains("RLIMIT_AS"), "{message}");

    // Under its limit the same kind of job completes, in the payload's own memory cgroup
    // (below the client's: the client runs in this test's), with no address-space limit.
    let small = "x=$(head -c 1000000 /dev/zero | tr '\\0' a)\n\
                 cat /proc/self/cgroup > cgroup.txt\nulimit -v > ulimit.txt\n";
    let id = upload_with(&http, &server.url, 1, small, &[("memory", "64M")]).await;
    let job = wait_status(&http, &server.url, id, &["Completed", "Failed"], LONG).await;
    assert_eq!(job["status"], "Completed", "{job}");
    let files = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(files["ulimit.txt"], b"unlimited\n");
    let theirs = String::from_utf8_lossy(&files["cgroup.txt"]).into_owned();
    let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let (theirs, ours) = (
        host::memory_cgroup_line(&theirs, v1).expect("the payload's memory cgroup"),
        host::memory_cgroup_line(&ours, v1).expect("our memory cgroup"),
    );
    let tree = format!("{}/jobrelay-{node}/", ours.trim_end_matches('/'));
    let leaf = theirs
        .strip_prefix(&tree)
        .unwrap_or_else(|| panic!("payload in {theirs}, not below {tree}"));
    assert!(
        leaf.starts_with("payload-") && leaf[8..].parse::<u64>().is_ok(),
        "{theirs}"
    );
    if v1 {
        // Removed once the payload ended; the client's sub-tree stays while it runs.
        let mount = host::v1_memory_mount().expect("a v1 memory mount");
        let on_disk = mount.join(theirs.trim_start_matches('/'));
        assert!(on_disk.parent().unwrap().is_dir(), "{}", on_disk.display());
        assert!(!on_disk.exists(), "{} left behind", on_disk.display());
    }
}
