//! The client as a gateway to Slurm (`--executor slurm`), against a real cluster.
//!
//! Every test skips (prints "skipped: ..." and passes) when Slurm's commands are missing or
//! the controller does not answer (`support::slurm`), so `cargo test --workspace` passes on a
//! plain machine. The Slurm executor in a client that dials out is tested in pull_clients.rs.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

macro_rules! require_slurm {
    () => {
        if let Some(why) = slurm::unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

const SLURM: [&str; 3] = slurm::EXECUTOR;

fn slurm_client(extra: &[&str]) -> TestClient {
    TestClient::start(&[&SLURM[..], extra].concat())
}

/// The record as stored on disk (also for Completed payloads, whose /retrieve is the ZIP).
fn stored_record(client: &TestClient, id: u64) -> serde_json::Value {
    support::stored_record(&client.data_dir(), id).expect("a stored record")
}

/// Ids of the Slurm jobs (any state) with this name.
fn jobs_named(name: &str) -> Vec<u64> {
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "--name", name, "-o", "%i"])
        .output()
        .unwrap();
    let mut ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

async fn wait_long(
    client: &TestClient,
    id: u64,
    status: &str,
    limit: Duration,
) -> serde_json::Value {
    eventually(limit, &format!("payload {id} to be {status}"), || async {
        let record = client.record(id).await;
        (record["status"] == status).then_some(record)
    })
    .await
}

async fn kill(client: &TestClient, id: u64) -> (u16, serde_json::Value) {
    let response = client.kill(id).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn slurm_job_completes_and_its_zip_is_right() {
    require_slurm!();
    let client = slurm_client(&[]);
    let script = "echo hello\necho oops >&2\necho \"$SLURM_JOB_ID\" > slurm_job_id.txt\n\
                  echo result > out.txt\nmkdir -p sub\necho deep > sub/d.txt\n";
    let (status, record) = client
        .submit(&[("run.sh", script.as_bytes()), ("inputs/a.pdb", b"ATOM")])
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "Prepared");
    let id = record["id"].as_u64().unwrap();

    let entries = client.retrieve_zip(id).await;
    assert_eq!(entries["out.txt"], b"result\n");
    assert_eq!(entries["sub/d.txt"], b"deep\n");
    assert_eq!(entries["inputs/a.pdb"], b"ATOM");
    assert_eq!(entries["run.sh"], script.as_bytes());
    assert_eq!(entries[".jobrelay.stdout"], b"hello\n");
    assert_eq!(entries[".jobrelay.stderr"], b"oops\n");
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
        ],
        "no file of Slurm's own in the work directory"
    );

    let stored = stored_record(&client, id);
    let job_id = stored["slurm_job_id"]
        .as_u64()
        .expect("the record has the Slurm job id");
    assert_eq!(
        String::from_utf8_lossy(&entries["slurm_job_id.txt"]).trim(),
        job_id.to_string(),
        "run.sh ran inside that Slurm job"
    );
    assert_eq!(stored["exit_code"], 0);
    assert_eq!(slurm::state(job_id), "COMPLETED");

    // The change feed saw it run, then complete.
    let page: serde_json::Value = client
        .http
        .get(client.url("/events?after=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let states: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["id"] == id)
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Running", "Completed"]);
}

#[tokio::test]
async fn failing_slurm_job_reports_its_exit_code() {
    require_slurm!();
    let client = slurm_client(&[]);
    let id = client.submit_script("echo before\nexit 7\n").await;
    let record = client.wait_for(id, "Failed").await;
    assert_eq!(record["exit_code"], 7);
    let reason = record["reason"].as_str().unwrap();
    assert!(
        reason.contains("FAILED") && reason.contains("exit code 7"),
        "{reason}"
    );
    assert_eq!(record["killed"], false);
}

#[tokio::test]
async fn slurm_job_over_its_time_limit_fails_with_timeout() {
    require_slurm!();
    // Slurm's time limits are whole minutes ("0:05" is rounded up to 1 minute) and the
    // controller checks them every 30 s or so: this test takes 1 to 2 minutes.
    let client = slurm_client(&["--slurm-arg=--time=0:05"]);
    let id = client.submit_script("echo started\nsleep 600\n").await;
    let record = wait_long(&client, id, "Failed", Duration::from_secs(240)).await;
    let reason = record["reason"].as_str().unwrap();
    assert!(reason.contains("TIMEOUT"), "{reason}");
    assert_eq!(record["killed"], false);
}

#[tokio::test]
async fn kill_cancels_a_running_slurm_job_and_its_background_children() {
    require_slurm!();
    let client = slurm_client(&["--kill-grace", "3"]);
    let scratch = tempfile::tempdir().unwrap();
    let shell_pid = scratch.path().join("shell");
    let child_pid = scratch.path().join("child");
    // The child ignores SIGTERM: only the forced cancel after the grace reaches it.
    let id = client
        .submit_script(&format!(
            "bash -c 'trap \"\" TERM; sleep 300' &\necho $! > {}\necho $$ > {}\nwait\n",
            child_pid.display(),
            shell_pid.display()
        ))
        .await;
    client.wait_for(id, "Running").await;
    let shell = read_pid(&shell_pid).await;
    let child = read_pid(&child_pid).await;
    assert!(pid_alive(shell) && pid_alive(child));
    let job_id = stored_record(&client, id)["slurm_job_id"].as_u64().unwrap();

    let (status, record) = kill(&client, id).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "Killed");
    assert_eq!(record["killed"], true);
    eventually(
        Duration::from_secs(30),
        "the job's processes to die",
        || async { (!pid_alive(shell) && !pid_alive(child)).then_some(()) },
    )
    .await;
    let state = slurm::state(job_id);
    assert!(
        ["CANCELLED", "FAILED"].contains(&state.as_str()),
        "Slurm says {state}"
    );
    let (again, _) = kill(&client, id).await;
    assert_eq!(again, 409, "a killed payload has finished");
}

#[tokio::test]
async fn kill_cancels_a_slurm_job_that_is_still_pending() {
    require_slurm!();
    // --begin keeps the job PENDING in Slurm: the payload stays Prepared.
    let client = slurm_client(&["--slurm-arg=--begin=now+1hour"]);
    let id = client.submit_script("echo never > ran.txt\n").await;
    let job_id = eventually(Duration::from_secs(30), "the Slurm job id", || async {
        stored_record(&client, id)["slurm_job_id"].as_u64()
    })
    .await;
    eventually(Duration::from_secs(30), "the job to be pending", || async {
        (slurm::state(job_id) == "PENDING").then_some(())
    })
    .await;
    assert_eq!(client.record(id).await["status"], "Prepared");

    let (status, record) = kill(&client, id).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "Killed");
    assert_eq!(slurm::state(job_id), "CANCELLED");
    assert!(!client
        .data_dir()
        .join(format!("work/{id}/ran.txt"))
        .exists());
}

#[tokio::test]
async fn restarted_client_follows_its_running_slurm_job_to_the_end() {
    require_slurm!();
    let mut client = slurm_client(&[]);
    let scratch = tempfile::tempdir().unwrap();
    let go = scratch.path().join("go");
    let script = format!(
        "echo $$ > started\nwhile [ ! -e {} ]; do sleep 0.1; done\necho finished > done.txt\n",
        go.display()
    );
    let id = client.submit_script(&script).await;
    client.wait_for(id, "Running").await;
    let job_id = stored_record(&client, id)["slurm_job_id"].as_u64().unwrap();

    client.restart_after_kill9(&SLURM);
    // Still running in Slurm, and the new client process knows it.
    assert_eq!(client.record(id).await["status"], "Running");
    assert_eq!(slurm::state(job_id), "RUNNING");
    std::fs::write(&go, b"").unwrap();

    let entries = client.retrieve_zip(id).await;
    assert_eq!(entries["done.txt"], b"finished\n");
    let stored = stored_record(&client, id);
    assert_eq!(stored["slurm_job_id"], job_id);
    assert_eq!(stored["exit_code"], 0);
    // Ids keep growing and new payloads still run.
    let next = client.submit_script("true\n").await;
    assert!(next > id);
    client.wait_for(next, "Completed").await;
}

#[tokio::test]
async fn fifty_jobs_through_one_client() {
    require_slurm!();
    let client = slurm_client(&[]);
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(client.submit_script(&format!("echo {i} > n.txt\n")).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let entries = client.retrieve_zip(*id).await;
        assert_eq!(
            entries["n.txt"],
            format!("{i}\n").as_bytes(),
            "payload {id}"
        );
    }
    let mut job_ids: Vec<u64> = ids
        .iter()
        .map(|id| {
            stored_record(&client, *id)["slurm_job_id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    job_ids.sort_unstable();
    job_ids.dedup();
    assert_eq!(job_ids.len(), 50, "one Slurm job per payload");
}

#[tokio::test]
async fn load_is_the_share_of_allocated_cpus() {
    require_slurm!();
    let client = slurm_client(&[]);
    let load = || async {
        client
            .http
            .get(client.url("/load"))
            .send()
            .await
            .unwrap()
            .json::<f64>()
            .await
            .unwrap()
    };
    let id = client.submit_script("sleep 300\n").await;
    client.wait_for(id, "Running").await;
    let busy = eventually(Duration::from_secs(30), "/load to see the job", || async {
        let percent = load().await;
        (percent > 0.0).then_some(percent)
    })
    .await;
    assert!(busy <= 100.0);
    let (status, _) = kill(&client, id).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn restart_finds_a_job_whose_id_never_reached_the_record() {
    require_slurm!();
    // --begin keeps the job pending, so the test controls when it could run.
    let flags = [&SLURM[..], &["--slurm-arg=--begin=now+1hour"]].concat();
    let mut client = TestClient::start(&flags);
    let id = client.submit_script("echo once >> runs.txt\n").await;
    let job_id = eventually(Duration::from_secs(30), "the Slurm job id", || async {
        stored_record(&client, id)["slurm_job_id"].as_u64()
    })
    .await;
    client.proc.kill9();
    // As if the client had died between sbatch's answer and writing the record (a record
    // in a file of its own wins over its slot in the page file).
    let path = client.data_dir().join(format!("payloads/{id}.json"));
    let mut record = stored_record(&client, id);
    record.as_object_mut().unwrap().remove("slurm_job_id");
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();

    client.restart_after_kill9(&flags);
    let found = eventually(
        Duration::from_secs(30),
        "the job id found again",
        || async { stored_record(&client, id)["slurm_job_id"].as_u64() },
    )
    .await;
    assert_eq!(found, job_id, "the same job, not a second submission");
    assert_eq!(client.record(id).await["status"], "Prepared");
    let name = format!(
        "jobrelay-{}-{id}",
        &std::fs::read_to_string(client.data_dir().join("node-id")).unwrap()[..8]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(jobs_named(&name), [job_id], "one Slurm job for the payload");
    // Let it run now: it runs once and completes.
    let released = Command::new("scontrol")
        .args(["update", &format!("JobId={job_id}"), "StartTime=now"])
        .status()
        .unwrap();
    assert!(released.success());
    let entries = client.retrieve_zip(id).await;
    assert_eq!(entries["runs.txt"], b"once\n");
}

#[tokio::test]
async fn unreachable_controller_is_waited_out_not_failed() {
    require_slurm!();
    // An sbatch in front of the real one that fails the first submission as if the
    // controller were down.
    let real = String::from_utf8(
        Command::new("bash")
            .args(["-c", "command -v sbatch"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let flag = dir.path().join("failed-once");
    let fake = bin.join("sbatch");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/bash\n\
             if [ \"$1\" = --parsable ] && [ ! -e {flag} ]; then\n\
               touch {flag}\n\
               echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)' >&2\n\
               exit 1\n\
             fi\n\
             exec {real} \"$@\"\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let data = dir.path().join("data");
    let args = [
        &[
            "client",
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &SLURM[..],
    ]
    .concat();
    let proc = Proc::start_with_env(&args, &dir.path().join("logs"), &[("PATH", &path)]);
    let client = TestClient {
        proc,
        dir,
        http: http(),
    };

    let id = client.submit_script("echo ok > ok.txt\n").await;
    eventually(
        Duration::from_secs(10),
        "the failed first attempt",
        || async { flag.exists().then_some(()) },
    )
    .await;
    assert_eq!(client.record(id).await["status"], "Prepared");
    let entries = client.retrieve_zip(id).await;
    assert_eq!(entries["ok.txt"], b"ok\n");
    assert!(client.proc.log().contains("trying again"));
}

#[tokio::test]
async fn max_runtime_cancels_a_slurm_job_that_runs_too_long() {
    require_slurm!();
    let client = slurm_client(&["--max-runtime", "1", "--kill-grace", "1"]);
    let id = client.submit_script("sleep 300\n").await;
    let record = client.wait_for(id, "Failed").await;
    let reason = record["reason"].as_str().unwrap();
    assert!(reason.contains("walltime"), "{reason}");
    let job_id = stored_record(&client, id)["slurm_job_id"].as_u64().unwrap();
    let state = slurm::state(job_id);
    assert!(
        ["CANCELLED", "FAILED"].contains(&state.as_str()),
        "Slurm says {state}"
    );
}

/// Runs `jobrelay client <args>` expecting it to refuse to start; returns its stderr.
fn refused_start(args: &[&str], path: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = path.map(|path| ("PATH", path)).into_iter().collect();
    let (status, stderr) = run_client_until_exit(&dir.path().join("data"), args, &env);
    assert!(!status.success(), "it started: {args:?}");
    stderr
}

#[test]
fn slurm_options_need_the_slurm_executor_and_its_commands() {
    // No Slurm needed: these are refusals at start.
    let stderr = refused_start(&["--slurm-partition", "batch"], None);
    assert!(stderr.contains("--executor slurm"), "{stderr}");
    let stderr = refused_start(&["--executor", "slurm"], Some("/nonexistent"));
    assert!(stderr.contains("needs sbatch on PATH"), "{stderr}");
    let stderr = refused_start(&["--executor", "cluster"], None);
    assert!(
        stderr.contains("local") && stderr.contains("slurm"),
        "{stderr}"
    );
}
