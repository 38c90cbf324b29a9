//! The executor client through HTTP only: the seed contract, payload outcomes and kill.

mod support;

use std::time::Duration;
use support::*;

#[tokio::test]
async fn seed_round_trip_submit_retrieve_zip() {
    let client = TestClient::start(&[]);
    let script = b"echo hello; echo result > out.txt; mkdir -p sub; echo deep > sub/d.txt\n";
    let (status, record) = client
        .submit(&[("run.sh", script), ("inputs/input.pdb", b"ATOM")])
        .await;
    assert_eq!(status, 200);
    assert_eq!(record["status"], "Prepared");
    assert_eq!(record["pid"], 0);
    assert_eq!(record["killed"], false);
    assert_eq!(record["input"], serde_json::json!({}));
    let id = record["id"].as_u64().unwrap();
    assert!(std::path::Path::new(record["loc"].as_str().unwrap()).is_absolute());

    let entries = client.retrieve_zip(id).await;
    assert_eq!(entries["out.txt"], b"result\n");
    assert_eq!(entries["sub/d.txt"], b"deep\n");
    assert_eq!(entries["inputs/input.pdb"], b"ATOM");
    assert_eq!(entries["run.sh"], script);
    assert_eq!(entries[".jobrelay.stdout"], b"hello\n");
    assert_eq!(entries[".jobrelay.stderr"], b"");
}

#[tokio::test]
async fn ping_health_load_and_unknown_ids() {
    let client = TestClient::start(&[]);
    let health: serde_json::Value = client
        .http
        .get(client.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, serde_json::json!({"status": "healthy"}));
    let ping = client.http.get(client.url("/")).send().await.unwrap();
    assert_eq!(ping.status(), 200);
    let load: f64 = client
        .http
        .get(client.url("/load"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!((0.0..=100.0).contains(&load));

    for (path, code) in [
        ("/retrieve/77", 404),
        ("/retrieve/abc", 400),
        ("/retrieve_partial/77", 404),
        ("/nope", 404),
    ] {
        let response = client.http.get(client.url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), code, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let kill = client
        .http
        .post(client.url("/kill/77"))
        .send()
        .await
        .unwrap();
    assert_eq!(kill.status(), 404);
}

#[tokio::test]
async fn failing_script_is_failed_with_its_exit_code() {
    let client = TestClient::start(&[]);
    let id = client.submit_script("echo oops >&2; exit 3\n").await;
    let record = client.wait_for(id, "Failed").await;
    assert_eq!(record["exit_code"], 3);
    assert!(record["reason"].as_str().unwrap().contains('3'));
    // The work directory, stderr included, is still available.
    let partial = client.retrieve_partial_zip(id).await;
    assert_eq!(partial[".jobrelay.stderr"], b"oops\n");
}

#[tokio::test]
async fn script_killed_by_a_signal_is_failed_with_the_signal() {
    let client = TestClient::start(&[]);
    let id = client.submit_script("kill -9 $$\n").await;
    let record = client.wait_for(id, "Failed").await;
    assert_eq!(record["signal"], 9);
}

#[tokio::test]
async fn payload_without_run_sh_is_invalid_and_never_runs() {
    let client = TestClient::start(&[]);
    let (status, record) = client.submit(&[("other.sh", b"touch ran\n")]).await;
    assert_eq!(status, 200);
    assert_eq!(record["status"], "Prepared");
    let id = record["id"].as_u64().unwrap();
    let record = client.wait_for(id, "Invalid").await;
    assert!(record["reason"].as_str().unwrap().contains("run.sh"));
    assert_eq!(record["pid"], 0);
}

#[tokio::test]
async fn script_writing_its_own_exit_code_with_a_trap_runs_correctly() {
    let client = TestClient::start(&[]);
    let ok = client
        .submit_script("trap 'echo $? > .orchestrator.exit' EXIT\necho fine > out.txt\n")
        .await;
    let entries = client.retrieve_zip(ok).await;
    assert_eq!(entries[".orchestrator.exit"], b"0\n");
    let failing = client
        .submit_script("trap 'echo $? > .orchestrator.exit' EXIT\nfalse\n")
        .await;
    let record = client.wait_for(failing, "Failed").await;
    assert_eq!(record["exit_code"], 1);
}

#[tokio::test]
async fn kill_stops_the_whole_process_group_including_background_children() {
    let client = TestClient::start(&["--kill-grace", "5"]);
    let pids = tempfile::tempdir().unwrap();
    let shell_pid = pids.path().join("shell");
    let child_pid = pids.path().join("child");
    let script = format!(
        "sleep 300 &\necho $! > {child}\necho $$ > {shell}\nsleep 300\n",
        child = child_pid.display(),
        shell = shell_pid.display()
    );
    let id = client.submit_script(&script).await;
    let shell = read_pid(&shell_pid).await;
    let child = read_pid(&child_pid).await;
    assert!(pid_alive(shell) && pid_alive(child));

    let response = client.kill(id).await;
    assert_eq!(response.status(), 200);
    let record: serde_json::Value = response.json().await.unwrap();
    assert_eq!(record["status"], "Killed");
    assert_eq!(record["killed"], true);
    // /kill answers once the group is dead.
    assert!(!pid_alive(shell), "run.sh survived the kill");
    assert!(!pid_alive(child), "the background child survived the kill");

    let again = client.kill(id).await;
    assert_eq!(again.status(), 409);
    let body: serde_json::Value = again.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("Killed"));
}

#[tokio::test]
async fn kill_reaches_children_that_ignore_sigterm_after_the_grace_period() {
    let client = TestClient::start(&["--kill-grace", "1"]);
    let pids = tempfile::tempdir().unwrap();
    let child_pid = pids.path().join("child");
    let script = format!(
        "bash -c 'trap \"\" TERM; echo $$ > {child}; while true; do sleep 1; done' &\nwait\n",
        child = child_pid.display()
    );
    let id = client.submit_script(&script).await;
    let child = read_pid(&child_pid).await;
    let response = client.kill(id).await;
    assert_eq!(response.status(), 200);
    eventually(
        Duration::from_secs(10),
        "the stubborn child to die",
        || async { (!pid_alive(child)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn killed_prepared_payload_never_starts_and_finished_one_answers_409() {
    let client = TestClient::start(&["--slots", "1"]);
    let marker = tempfile::tempdir().unwrap();
    let blocker = client.submit_script("sleep 300\n").await;
    client.wait_for(blocker, "Running").await;
    let waiting = client
        .submit_script(&format!("touch {}/started\n", marker.path().display()))
        .await;
    let response = client.kill(waiting).await;
    assert_eq!(response.status(), 200);
    let killed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(killed["status"], "Killed");
    let kill_blocker = client.kill(blocker).await;
    assert_eq!(kill_blocker.status(), 200);

    let done = client.submit_script("true\n").await;
    client.wait_for(done, "Completed").await;
    assert!(!marker.path().join("started").exists());
    assert_eq!(client.record(waiting).await["status"], "Killed");
    let late = client.kill(done).await;
    assert_eq!(late.status(), 409);
    // Killing a finished payload leaves it Completed and retrievable.
    assert_eq!(client.retrieve_zip(done).await.len(), 3);
}

#[tokio::test]
async fn walltime_limit_kills_and_fails_the_payload() {
    let client = TestClient::start(&["--max-runtime", "1", "--kill-grace", "1"]);
    let id = client.submit_script("sleep 300\n").await;
    let record = client.wait_for(id, "Failed").await;
    assert!(
        record["reason"].as_str().unwrap().contains("walltime"),
        "{record}"
    );
}

#[tokio::test]
async fn symlink_to_a_file_outside_never_leaks_its_content() {
    let client = TestClient::start(&[]);
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "TOP-SECRET-CONTENT").unwrap();
    let script = format!(
        "ln -s {secret} leak.txt\nln -s {dir} leakdir\necho ok > out.txt\n",
        secret = secret.display(),
        dir = outside.path().display()
    );
    let id = client.submit_script(&script).await;
    let entries = client.retrieve_zip(id).await;
    assert_eq!(entries["out.txt"], b"ok\n");
    for (name, content) in &entries {
        assert!(
            !String::from_utf8_lossy(content).contains("TOP-SECRET-CONTENT"),
            "{name} leaked the file outside the work directory"
        );
    }
    assert!(!entries.contains_key("leakdir/secret.txt"));
}

#[tokio::test]
async fn waiting_payloads_start_in_arrival_order() {
    let client = TestClient::start(&["--slots", "1"]);
    let log = tempfile::tempdir().unwrap();
    let order = log.path().join("order");
    let mut ids = Vec::new();
    for n in 0..6 {
        let script = format!("echo {n} >> {}\n", order.display());
        ids.push(client.submit_script(&script).await);
    }
    for id in &ids {
        client.wait_for(*id, "Completed").await;
    }
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "0\n1\n2\n3\n4\n5\n"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
}

#[tokio::test]
async fn hundred_concurrent_submissions_all_complete() {
    let client = TestClient::start(&["--slots", "4"]);
    let submissions = (0..100).map(|n| {
        let client = &client;
        async move {
            let script = format!("echo {n} > n.txt\n");
            client.submit_script(&script).await
        }
    });
    let ids = futures_util::future::join_all(submissions).await;
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 100, "every submission got its own id");
    for id in ids {
        let entries = client.retrieve_zip(id).await;
        assert!(entries.contains_key("n.txt"));
    }
    assert_eq!(
        zombie_children(client.proc.pid()),
        0,
        "every run.sh is reaped"
    );
}

/// Children of `parent` that have exited but were never waited for.
fn zombie_children(parent: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            fields.first() == Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str())
        })
        .count()
}

#[tokio::test]
async fn port_and_data_path_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-env");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let client = Proc::start_with_env(
        &["client"],
        &dir.path().join("logs"),
        &[
            ("PORT", &port.to_string()),
            ("DATA_PATH", data.to_str().unwrap()),
        ],
    );
    assert_eq!(client.url, format!("http://127.0.0.1:{port}"));
    let record: serde_json::Value = http()
        .post(format!("{}/submit", client.url))
        .multipart(files_form(&[("run.sh", b"true\n")]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(record["loc"]
        .as_str()
        .unwrap()
        .starts_with(data.to_str().unwrap()));
}

/// A run.sh fragment that leaves two processes outside its process group, each writing its
/// pid to a file: one in a new session (`setsid`), one double-forked from a new session.
fn detached_leftovers(dir: &std::path::Path) -> (String, [std::path::PathBuf; 2]) {
    let a = dir.join("setsid");
    let b = dir.join("double-fork");
    let script = format!(
        "setsid bash -c 'echo $$ > {a}; exec sleep 300' </dev/null >/dev/null 2>&1 &\n\
         (setsid bash -c '(sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {b})' &)\n",
        a = a.display(),
        b = b.display()
    );
    (script, [a, b])
}

/// Processes that left the payload's process group (setsid, double fork) are gone once
/// run.sh has ended on its own, and before the payload is reported finished.
async fn leftovers_die_when_the_payload_ends(env: &[(&str, &str)]) {
    let client = TestClient::start_with_env(&[], env);
    let scratch = tempfile::tempdir().unwrap();
    let (leave, files) = detached_leftovers(scratch.path());
    let script = format!(
        "{leave}while [ ! -s {b} ]; do sleep 0.02; done\necho ok > out.txt\n",
        b = files[1].display()
    );
    let id = client.submit_script(&script).await;
    let a = read_pid(&files[0]).await;
    let b = read_pid(&files[1]).await;
    assert_eq!(client.retrieve_zip(id).await["out.txt"], b"ok\n");
    // The record is final only once the leftovers were killed.
    assert!(
        !pid_alive(a),
        "the setsid leftover survived the payload's end"
    );
    assert!(
        !pid_alive(b),
        "the double-forked leftover survived the payload's end"
    );
}

#[tokio::test]
async fn leftovers_outside_the_process_group_die_when_the_payload_ends() {
    leftovers_die_when_the_payload_ends(&[]).await;
}

#[tokio::test]
async fn without_cgroups_leftovers_outside_the_group_die_when_the_payload_ends() {
    leftovers_die_when_the_payload_ends(&[("JOBRELAY_NO_CGROUP", "1")]).await;
}

/// A `--run-as` payload's leftover (in a new session, as the unprivileged user) is gone once
/// the payload ended, so it cannot change a later payload of the same user.
#[tokio::test]
async fn run_as_leftovers_outside_the_process_group_die_when_the_payload_ends() {
    use std::os::unix::fs::PermissionsExt;
    if !can_run_as_nobody() {
        eprintln!("skipped: needs root and the user nobody");
        return;
    }
    let client = TestClient::start(&["--run-as", "nobody"]);
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (leave, files) = detached_leftovers(scratch.path());
    let script = format!(
        "{leave}while [ ! -s {b} ]; do sleep 0.02; done\necho ok > out.txt\n",
        b = files[1].display()
    );
    let id = client.submit_script(&script).await;
    let a = read_pid(&files[0]).await;
    let b = read_pid(&files[1]).await;
    assert_eq!(client.retrieve_zip(id).await["out.txt"], b"ok\n");
    assert!(
        !pid_alive(a) && !pid_alive(b),
        "a --run-as leftover survived"
    );
}

/// The attack: a `--run-as` payload leaves a process in a new session that keeps
/// rewriting the next payload's run.sh and result; that payload, submitted once the first is
/// Completed, still runs its own script and keeps its own result.
#[tokio::test]
async fn a_run_as_leftover_cannot_rewrite_a_later_payload() {
    if !can_run_as_nobody() {
        eprintln!("skipped: needs root and the user nobody");
        return;
    }
    let client = TestClient::start(&["--run-as", "nobody"]);
    let first = client.submit_script("true\n").await;
    client.wait_for(first, "Completed").await;
    let attacker = first + 1;
    let victim = first + 2;
    let script = format!(
        "setsid bash -c 'while true; do echo \"echo pwned > result.txt\" > ../{victim}/run.sh; \
         echo pwned > ../{victim}/result.txt; sleep 0.01; done' </dev/null >/dev/null 2>&1 &\n\
         sleep 0.2\n"
    );
    assert_eq!(client.submit_script(&script).await, attacker);
    client.wait_for(attacker, "Completed").await;
    let id = client
        .submit_script("sleep 0.3\necho good > result.txt\n")
        .await;
    assert_eq!(id, victim);
    let entries = client.retrieve_zip(victim).await;
    assert_eq!(entries["result.txt"], b"good\n");
    assert_eq!(entries["run.sh"], b"sleep 0.3\necho good > result.txt\n");
}

/// Without `--sandbox` the client says at start that its payloads can touch each other.
#[tokio::test]
async fn a_client_without_sandbox_warns_that_payloads_can_touch_each_other() {
    let client = TestClient::start(&[]);
    eventually(Duration::from_secs(10), "the warning", || async {
        client
            .proc
            .log()
            .contains("one payload can read and change another's")
            .then_some(())
    })
    .await;
}

/// `/kill` reaches processes that left the payload's process group.
async fn kill_reaches_leftovers(env: &[(&str, &str)]) {
    let client = TestClient::start_with_env(&["--kill-grace", "1"], env);
    let scratch = tempfile::tempdir().unwrap();
    let (leave, files) = detached_leftovers(scratch.path());
    let id = client.submit_script(&format!("{leave}sleep 300\n")).await;
    let a = read_pid(&files[0]).await;
    let b = read_pid(&files[1]).await;
    let response = client.kill(id).await;
    assert_eq!(response.status(), 200);
    let record: serde_json::Value = response.json().await.unwrap();
    assert_eq!(record["status"], "Killed", "{record}");
    assert!(!pid_alive(a), "the setsid leftover survived the kill");
    assert!(
        !pid_alive(b),
        "the double-forked leftover survived the kill"
    );
}

#[tokio::test]
async fn kill_reaches_leftovers_outside_the_process_group() {
    kill_reaches_leftovers(&[]).await;
}

#[tokio::test]
async fn without_cgroups_kill_reaches_leftovers_outside_the_process_group() {
    kill_reaches_leftovers(&[("JOBRELAY_NO_CGROUP", "1")]).await;
}

/// Where the client has cgroup v2, even a leftover that drops the environment marker
/// (`env -i`) and leaves the session is killed at the payload's end.
#[tokio::test]
async fn with_cgroups_a_leftover_that_clears_its_environment_dies_too() {
    let client = TestClient::start(&[]);
    if !client
        .proc
        .log()
        .contains("payloads run in cgroups of their own")
    {
        eprintln!("skipped: no writable cgroup v2 with cgroup.kill here (marker fallback)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("clean");
    let script = format!(
        "setsid env -i /bin/bash -c 'echo $$ > {p}; exec sleep 300' </dev/null >/dev/null 2>&1 &\n\
         while [ ! -s {p} ]; do sleep 0.02; done\n",
        p = pid_file.display()
    );
    let id = client.submit_script(&script).await;
    let pid = read_pid(&pid_file).await;
    client.wait_for(id, "Completed").await;
    assert!(!pid_alive(pid), "the leftover without a marker survived");
}

/// A payload running as the client's own user can move a process out of its cgroup leaf
/// (the delegated tree is that user's); the marker is swept too, so that process dies at the
/// payload's end all the same.
#[tokio::test]
async fn with_cgroups_a_leftover_that_leaves_its_cgroup_dies_too() {
    let client = TestClient::start(&[]);
    if !client
        .proc
        .log()
        .contains("payloads run in cgroups of their own")
    {
        eprintln!("skipped: no writable cgroup v2 with cgroup.kill here (marker fallback)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let pid_file = scratch.path().join("escaped");
    // Into the cgroup two levels up (the client's own), out of the payload's leaf.
    let script = format!(
        "setsid sleep 300 </dev/null >/dev/null 2>&1 &\n\
         child=$!\n\
         mnt=$(awk '$3==\"cgroup2\" {{print $2; exit}}' /proc/mounts)\n\
         cg=$(sed -n 's/^0:://p' /proc/$child/cgroup)\n\
         echo $child > \"$mnt$cg/../../cgroup.procs\"\n\
         grep -q \"^0::$cg$\" /proc/$child/cgroup && echo still-inside > moved.txt\n\
         echo $child > {p}\n",
        p = pid_file.display()
    );
    let id = client.submit_script(&script).await;
    let pid = read_pid(&pid_file).await;
    let entries = client.retrieve_zip(id).await;
    assert!(
        !entries.contains_key("moved.txt"),
        "the test could not move its process out of the leaf"
    );
    assert!(
        !pid_alive(pid),
        "the leftover that left its cgroup survived"
    );
    // Swept among the processes started since the payload's supervisor, which found it.
    assert!(
        marker_sweeps(&client, "window").await >= 1,
        "the marker was swept among the pids handed out since the payload started"
    );
    assert_eq!(marker_sweeps(&client, "all").await, 0, "no full sweep");
}

/// How many times the client has read the environment of processes for a payload's marker:
/// `scope` "all" (every process) or "window" (those started since the payload's supervisor).
async fn marker_sweeps(client: &TestClient, scope: &str) -> u64 {
    let metrics = client
        .http
        .get(client.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "jobrelay_client_marker_sweeps_total{{scope=\"{scope}\"}} "
            ))
        })
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A `--run-as` payload cannot move a process out of its cgroup leaf (the tree is the
/// client's user's), so its leaf alone holds all of it: the leftover dies at the payload's end
/// and no sweep reads every process's environment for its marker (that scan was a tenth of the
/// client's CPU per trivial payload, issue 18).
#[tokio::test]
async fn with_cgroups_a_run_as_payload_cannot_leave_its_leaf_and_needs_no_marker_sweep() {
    use std::os::unix::fs::PermissionsExt;
    if !can_run_as_nobody() {
        eprintln!("skipped: needs root and the user nobody");
        return;
    }
    let client = TestClient::start(&["--run-as", "nobody"]);
    if !client
        .proc
        .log()
        .contains("payloads run in cgroups of their own")
    {
        eprintln!("skipped: no writable cgroup v2 with cgroup.kill here (marker fallback)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pid_file = scratch.path().join("tried");
    let script = format!(
        "setsid sleep 300 </dev/null >/dev/null 2>&1 &\n\
         child=$!\n\
         mnt=$(awk '$3==\"cgroup2\" {{print $2; exit}}' /proc/mounts)\n\
         cg=$(sed -n 's/^0:://p' /proc/$child/cgroup)\n\
         echo $child > \"$mnt$cg/../../cgroup.procs\" 2>/dev/null\n\
         grep -q \"^0::$cg$\" /proc/$child/cgroup && echo still-inside > inside.txt\n\
         echo $child > {p}\n",
        p = pid_file.display()
    );
    let id = client.submit_script(&script).await;
    let pid = read_pid(&pid_file).await;
    let entries = client.retrieve_zip(id).await;
    assert_eq!(
        entries.get("inside.txt").map(Vec::as_slice),
        Some(&b"still-inside\n"[..])
    );
    assert!(!pid_alive(pid), "the run-as leftover survived");
    let second = client.submit_script("echo ok > out.txt\n").await;
    client.wait_for(second, "Completed").await;
    assert_eq!(marker_sweeps(&client, "all").await, 0);
    assert_eq!(marker_sweeps(&client, "window").await, 0);
}

/// A payload with a memory cgroup that is killed on request leaves no cgroup behind, and its
/// reason is the kill's, not the memory limit's. Skipped where payloads get no memory cgroup.
#[tokio::test]
async fn a_killed_payload_leaves_no_memory_cgroup() {
    let client = TestClient::start(&[]);
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
    let v1 = how.contains("v1");
    let scratch = tempfile::tempdir().unwrap();
    let cgroup_file = scratch.path().join("cgroup");
    let script = format!(
        "cat /proc/self/cgroup > {0}.tmp\nmv {0}.tmp {0}\nexec sleep 300\n",
        cgroup_file.display()
    );
    let form = files_form(&[("run.sh", script.as_bytes())]).text("memory", "64M");
    let (status, record) = client.submit_form(form).await;
    assert_eq!(status, 200, "{record}");
    let id = record["id"].as_u64().unwrap();
    let cgroups = eventually(Duration::from_secs(30), "the payload to start", || {
        let file = cgroup_file.clone();
        async move { std::fs::read_to_string(file).ok() }
    })
    .await;
    let path = host::memory_cgroup_line(&cgroups, v1).expect("the payload's memory cgroup");
    let on_disk = match v1 {
        true => host::v1_memory_mount().expect("a v1 memory mount"),
        // The leaf of cgroup v2, on the cgroup2 mount.
        false => std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                right
                    .starts_with("cgroup2 ")
                    .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))
                    .flatten()
            })
            .expect("a cgroup2 mount"),
    }
    .join(path.trim_start_matches('/'));
    assert!(on_disk.is_dir(), "{} while it runs", on_disk.display());
    let limit = if v1 {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    assert_eq!(
        std::fs::read_to_string(on_disk.join(limit)).unwrap().trim(),
        (64u64 << 20).to_string()
    );

    let response = client.kill(id).await;
    assert_eq!(response.status(), 200);
    let killed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(killed["status"], "Killed", "{killed}");
    assert_eq!(killed["reason"], "killed on request", "{killed}");
    assert!(!on_disk.exists(), "{} left behind", on_disk.display());
}

/// Whether payloads can be run as `nobody` here (`--run-as` needs root and that user).
fn can_run_as_nobody() -> bool {
    nix::unistd::Uid::effective().is_root()
        && nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .is_some()
}
