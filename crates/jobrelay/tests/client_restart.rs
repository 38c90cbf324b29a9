//! The client survives kill -9: finished payloads stay retrievable, prepared ones run,
//! running ones are followed, ones that ended meanwhile are settled from their recorded
//! exit, ones gone without a trace are failed "client restarted" with their processes
//! killed, and ids keep growing.

mod support;

use support::*;

#[tokio::test]
async fn state_survives_kill_9_and_restart() {
    let mut client = TestClient::start(&["--slots", "1"]);
    let scratch = tempfile::tempdir().unwrap();
    let done = client.submit_script("echo kept > kept.txt\n").await;
    client.wait_for(done, "Completed").await;

    let shell_pid = scratch.path().join("shell");
    let child_pid = scratch.path().join("child");
    let interrupted = client
        .submit_script(&format!(
            "sleep 300 &\necho $! > {}\necho $$ > {}\nwait\n",
            child_pid.display(),
            shell_pid.display()
        ))
        .await;
    let shell = read_pid(&shell_pid).await;
    let child = read_pid(&child_pid).await;
    let waiting = client.submit_script("echo later > later.txt\n").await;
    assert_eq!(client.record(waiting).await["status"], "Prepared");

    assert!(pid_alive(shell) && pid_alive(child));

    client.restart_after_kill9(&["--slots", "1"]);

    // Still running: followed, not failed (it keeps its slot), and stopped by a kill.
    assert_eq!(client.record(interrupted).await["status"], "Running");
    assert!(
        pid_alive(shell) && pid_alive(child),
        "a followed payload runs on"
    );
    let killed = kill(&client, interrupted).await;
    assert_eq!(killed["status"], "Killed", "{killed}");
    assert!(
        !pid_alive(shell) && !pid_alive(child),
        "the kill reached both"
    );
    assert_eq!(client.retrieve_zip(done).await["kept.txt"], b"kept\n");
    assert_eq!(client.retrieve_zip(waiting).await["later.txt"], b"later\n");
    let next = client.submit_script("true\n").await;
    assert!(next > waiting, "new id {next} must be above {waiting}");
}

async fn kill(client: &TestClient, id: u64) -> serde_json::Value {
    let response = client.kill(id).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// A run.sh that logs each run to `runs`, writes its shell's pid to `pid`, leaves a process
/// in a new session (its pid in `leftover`), waits for the file `go`, then exits with `code`.
fn gated_script(scratch: &std::path::Path, name: &str, code: i32) -> String {
    let p = |f: &str| scratch.join(format!("{name}-{f}")).display().to_string();
    format!(
        "echo run >> {runs}\n\
         setsid bash -c 'echo $$ > {leftover}; exec sleep 300' </dev/null >/dev/null 2>&1 &\n\
         while [ ! -s {leftover} ]; do sleep 0.02; done\n\
         echo $$ > {pid}\n\
         while [ ! -e {go} ]; do sleep 0.02; done\n\
         echo {name} > out.txt\n\
         exit {code}\n",
        runs = p("runs"),
        leftover = p("leftover"),
        pid = p("pid"),
        go = p("go"),
    )
}

/// kill -9 of the client while its payloads run; they finish while no client runs; the
/// restarted client settles each from its recorded exit status (Completed with its results,
/// Failed with its code), not "client restarted", and kills what they left behind. Each ran
/// once.
#[tokio::test]
async fn payloads_that_finished_while_the_client_was_dead_are_settled_from_their_exit() {
    settled_from_their_exit(&[]).await;
}

#[tokio::test]
async fn without_cgroups_payloads_that_finished_meanwhile_are_settled_from_their_exit() {
    settled_from_their_exit(&[("JOBRELAY_NO_CGROUP", "1")]).await;
}

async fn settled_from_their_exit(env: &[(&str, &str)]) {
    let mut client = TestClient::start_with_env(&["--slots", "2"], env);
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let good = client.submit_script(&gated_script(s, "good", 0)).await;
    let bad = client.submit_script(&gated_script(s, "bad", 3)).await;
    let mut pids = Vec::new();
    for name in ["good", "bad"] {
        pids.push(read_pid(&s.join(format!("{name}-pid"))).await);
        pids.push(read_pid(&s.join(format!("{name}-leftover"))).await);
    }
    client.proc.kill9();
    for name in ["good", "bad"] {
        std::fs::write(s.join(format!("{name}-go")), "").unwrap();
    }
    eventually(
        std::time::Duration::from_secs(30),
        "the scripts to finish without a client",
        || async { (!pid_alive(pids[0]) && !pid_alive(pids[2])).then_some(()) },
    )
    .await;
    assert!(
        pid_alive(pids[1]) && pid_alive(pids[3]),
        "leftovers outlived run.sh"
    );

    client.restart_after_kill9_with_env(&["--slots", "2"], env);
    assert_eq!(client.retrieve_zip(good).await["out.txt"], b"good\n");
    let failed = client.wait_for(bad, "Failed").await;
    assert_eq!(failed["exit_code"], 3, "{failed}");
    assert_eq!(failed["reason"], "run.sh exited with code 3", "{failed}");
    assert!(
        !pid_alive(pids[1]) && !pid_alive(pids[3]),
        "leftovers killed at settling"
    );
    assert_eq!(lines(&s.join("good-runs")), 1);
    assert_eq!(lines(&s.join("bad-runs")), 1);
}

/// kill -9 of the client while a payload runs, restart while it still runs: it is followed
/// to its end (Completed, once), and its leftover outside the group is killed then.
#[tokio::test]
async fn a_payload_still_running_after_a_client_crash_is_followed_to_its_end() {
    let mut client = TestClient::start(&[]);
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let id = client.submit_script(&gated_script(s, "job", 0)).await;
    let shell = read_pid(&s.join("job-pid")).await;
    let leftover = read_pid(&s.join("job-leftover")).await;
    client.restart_after_kill9(&[]);
    assert_eq!(client.record(id).await["status"], "Running");
    assert!(pid_alive(shell), "run.sh runs on");
    std::fs::write(s.join("job-go"), "").unwrap();
    assert_eq!(client.retrieve_zip(id).await["out.txt"], b"job\n");
    assert!(!pid_alive(leftover), "its leftover died with its end");
    assert_eq!(lines(&s.join("job-runs")), 1, "it ran once");
}

/// A payload killed while the client was dead (its supervisor too, so no exit status was
/// recorded) is reported Failed "client restarted", which makes the server run it again;
/// nothing of it runs any more by then.
#[tokio::test]
async fn a_payload_gone_without_a_recorded_exit_is_reported_interrupted() {
    let mut client = TestClient::start(&[]);
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let id = client.submit_script(&gated_script(s, "job", 0)).await;
    let shell = read_pid(&s.join("job-pid")).await;
    let leftover = read_pid(&s.join("job-leftover")).await;
    client.proc.kill9();
    // Everything of the payload, its supervisor included, dies with no status recorded.
    let group = std::fs::read_to_string(format!("/proc/{shell}/stat"))
        .unwrap()
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse::<i32>()
        .unwrap();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(group),
        nix::sys::signal::Signal::SIGKILL,
    );
    eventually(
        std::time::Duration::from_secs(10),
        "run.sh to die",
        || async { (!pid_alive(shell)).then_some(()) },
    )
    .await;
    client.restart_after_kill9(&[]);
    let record = client.wait_for(id, "Failed").await;
    assert_eq!(record["reason"], "client restarted", "{record}");
    assert!(!pid_alive(leftover), "its leftover was killed");
}

#[tokio::test]
async fn a_clean_stop_kills_running_payloads_and_reports_them_interrupted() {
    let mut client = TestClient::start(&[]);
    let scratch = tempfile::tempdir().unwrap();
    let shell_pid = scratch.path().join("shell");
    let id = client
        .submit_script(&format!("echo $$ > {}\nsleep 300\n", shell_pid.display()))
        .await;
    let shell = read_pid(&shell_pid).await;
    client.restart_after_sigterm(&[]);
    assert!(!pid_alive(shell), "the payload died with the client");
    let record = client.wait_for(id, "Failed").await;
    assert_eq!(
        record["reason"], "client restarted",
        "an interruption, not the payload's own failure: {record}"
    );
}

/// Runs `jobrelay client` on `data` and expects it to refuse to start: returns its exit status
/// and stderr. Kills it (and fails) if it is still running after 30 s.
fn start_expecting_refusal(data: &std::path::Path) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(binary())
        .args([
            "client",
            "--port",
            "0",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env_remove("PORT")
        .env_remove("DATA_PATH")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the client started on a rolled-back data directory");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// A data directory whose id counter is behind its records or work directories (restored
/// from an older copy, or `next-id` lost) would hand out ids earlier payloads had: the client
/// refuses to start, with a message and a non-zero exit, instead of healing it silently.
#[tokio::test]
async fn a_client_whose_id_counter_is_behind_its_payloads_refuses_to_start() {
    let mut client = TestClient::start(&[]);
    let first = client.submit_script("echo one > one.txt\n").await;
    client.wait_for(first, "Completed").await;
    let data = client.data_dir();
    let next_id = data.join("next-id");
    let saved = std::fs::read_to_string(&next_id).unwrap();
    client.proc.kill9();

    // next-id from before the first payload (an older copy), records and work kept.
    std::fs::write(&next_id, first.to_string()).unwrap();
    let (status, stderr) = start_expecting_refusal(&data);
    assert!(!status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("next-id") && stderr.contains(&format!("payload record {first}")),
        "{stderr}"
    );

    // next-id and the records lost, a work directory left.
    std::fs::remove_file(&next_id).unwrap();
    std::fs::remove_dir_all(data.join("payloads")).unwrap();
    let (status, stderr) = start_expecting_refusal(&data);
    assert!(!status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains(&format!("work directory {first}")),
        "{stderr}"
    );

    // Repaired as the message says: it starts, and new ids are above the old ones.
    std::fs::write(&next_id, saved).unwrap();
    client.restart_after_kill9(&[]);
    let next = client.submit_script("true\n").await;
    assert!(next > first, "new id {next} must be above {first}");
}

/// Exit records take no new file per payload: each payload records its end in the slot file
/// of its id modulo 64 in `runs/`, reused by later payloads, not in a file of its own. An exit
/// file left by a client killed between a payload's final record and the file's removal is
/// removed at the next start, and neither it nor a slot's record changes a settled payload.
/// Records too share files, 64 to a page (`record_pages`).
#[tokio::test]
async fn exit_files_of_settled_payloads_are_removed_at_start() {
    let mut client = TestClient::start(&[]);
    let mut id = 0;
    for _ in 0..3 {
        id = client.submit_script("echo ok > out.txt\n").await;
        client.wait_for(id, "Completed").await;
    }
    let runs = client.data_dir().join("runs");
    let slot = runs.join(format!("s{}", id % 64));
    // The record names the payload and its run (the record's created_ms): an orphan of an
    // earlier run under the same id, on a client whose records were wiped, does not count.
    let record = std::fs::read_to_string(&slot).unwrap();
    let run: u64 = record
        .trim()
        .strip_prefix(&format!("payload {id} run "))
        .and_then(|rest| rest.strip_suffix(" code 0"))
        .and_then(|run| run.parse().ok())
        .unwrap_or_else(|| panic!("{record:?}"));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        run <= now_ms && run + 600_000 > now_ms,
        "the run is the record's created_ms: {run}"
    );
    assert!(!runs.join(id.to_string()).exists(), "no file of its own");
    assert_eq!(
        client.entries_in("runs").len(),
        3,
        "one slot file per payload id modulo 64, none per payload"
    );
    assert_eq!(
        client.entries_in("payloads"),
        ["0.page"],
        "the records of payloads 0 to 63 share one page file"
    );
    client.proc.kill9();
    std::fs::write(runs.join(id.to_string()), "code 3\n").unwrap();
    std::fs::write(runs.join("999"), "code 0\n").unwrap();
    std::fs::write(&slot, format!("payload {id} code 3\n")).unwrap();
    client.restart_after_kill9(&[]);
    assert!(!runs.join(id.to_string()).exists());
    assert!(!runs.join("999").exists());
    // Still Completed (retrieve_zip waits for it), with its results.
    assert_eq!(client.retrieve_zip(id).await["out.txt"], b"ok\n");
}

/// A payload with a memory cgroup passes its limit while no client runs (kill -9): the
/// restarted client settles it from its recorded exit and its cgroup's counters, the reason
/// saying the limit killed it, and removes the cgroup. Skipped where payloads get no memory
/// cgroup (the client's `/info` says why).
#[tokio::test]
async fn a_payload_killed_by_its_memory_limit_while_the_client_was_dead_says_so() {
    let mut client = TestClient::start(&[]);
    let info: serde_json::Value = client
        .http
        .get(client.url("/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let how = info["memory_limits"].as_str().unwrap().to_owned();
    if !how.starts_with("cgroup") {
        eprintln!("skipped: the client has no memory cgroup here ({how})");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let p = |f: &str| scratch.path().join(f).display().to_string();
    let script = format!(
        "cat /proc/self/cgroup > {cgroup}\necho $$ > {pid}\n\
         while [ ! -e {go} ]; do sleep 0.02; done\n\
         x=$(head -c 300000000 /dev/zero | tr '\\0' a)\necho ${{#x}}\n",
        cgroup = p("cgroup"),
        pid = p("pid"),
        go = p("go"),
    );
    let form = files_form(&[("run.sh", script.as_bytes())]).text("memory", "64M");
    let (status, record) = client.submit_form(form).await;
    assert_eq!(status, 200, "{record}");
    let id = record["id"].as_u64().unwrap();
    let shell = read_pid(&scratch.path().join("pid")).await;
    client.proc.kill9();
    std::fs::write(scratch.path().join("go"), "").unwrap();
    eventually(
        std::time::Duration::from_secs(30),
        "the hog to end without a client",
        || async { (!pid_alive(shell)).then_some(()) },
    )
    .await;

    client.restart_after_kill9(&[]);
    let failed = client.wait_for(id, "Failed").await;
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("killed: memory limit of 64 MiB reached ({how}")),
        "{failed}"
    );
    // Its v1 memory cgroup (a v2 one is its leaf, whose removal client_api tests) is gone.
    let cgroups = std::fs::read_to_string(scratch.path().join("cgroup")).unwrap();
    if how.contains("v1") {
        let path = host::memory_cgroup_line(&cgroups, true).expect("its v1 memory cgroup");
        assert!(path.contains("/payload-"), "{path}");
        let mount = host::v1_memory_mount().expect("a v1 memory mount");
        let on_disk = mount.join(path.trim_start_matches('/'));
        assert!(!on_disk.exists(), "{} left behind", on_disk.display());
    }
}
