//! The client's payload fork server (issue 18): with cgroups, every supervisor is forked by
//! one long-lived `jobrelay __jobrelay-payload-supervisor --spawner` child of the client (no
//! exec of the binary with a JSON spec per payload); a payload outlives a `kill -9` of that
//! fork server and of the client, and ends with its real status; without cgroups the exec
//! path stays.

mod support;

use support::*;

const SUPERVISOR_ARG: &str = "__jobrelay-payload-supervisor";

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn ppid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Every live process below `root` (by parent pids).
fn descendants(root: i32) -> Vec<i32> {
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| pid_alive(*pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let parent = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, parent))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// The supervisors exec'd with a JSON spec (the exec path) among the client's descendants.
fn exec_supervisors(client: i32) -> Vec<Vec<String>> {
    descendants(client)
        .into_iter()
        .map(cmdline)
        .filter(|argv| argv.get(1).map(String::as_str) == Some(SUPERVISOR_ARG))
        .filter(|argv| argv.get(2).is_some_and(|a| a.starts_with('{')))
        .collect()
}

/// A run.sh that writes its shell's pid to `<name>-pid`, waits for `<name>-go`, writes
/// `out.txt` and exits with `code`; each run is logged to `<name>-runs`.
fn gated_script(scratch: &std::path::Path, name: &str, code: i32) -> String {
    let p = |f: &str| scratch.join(format!("{name}-{f}")).display().to_string();
    format!(
        "echo run >> {runs}\n\
         echo $$ > {pid}\n\
         while [ ! -e {go} ]; do sleep 0.02; done\n\
         echo {name} > out.txt\n\
         exit {code}\n",
        runs = p("runs"),
        pid = p("pid"),
        go = p("go"),
    )
}

fn runs_of(scratch: &std::path::Path, name: &str) -> usize {
    std::fs::read_to_string(scratch.join(format!("{name}-runs")))
        .unwrap_or_default()
        .lines()
        .count()
}

/// Whether this machine gives payloads cgroups (the fork server is used only then).
fn has_cgroups(client: &TestClient) -> bool {
    let log = client.proc.log();
    if log.contains("payloads run in cgroups of their own") {
        return true;
    }
    assert!(log.contains("no cgroup v2 for payloads"), "{log}");
    eprintln!("skipped: no cgroup v2 for payloads here, so no fork server");
    false
}

/// (supervisor, fork server) of the payload whose shell is `shell`, checked to be the
/// fork server's shape: a child of the client, with the supervisor's argument and
/// `--spawner`, the supervisor forked from it (same argv, no JSON spec).
fn forked_from_spawner(client: i32, shell: i32) -> (i32, i32) {
    let supervisor = ppid(shell);
    let spawner = ppid(supervisor);
    assert_ne!(
        supervisor, client,
        "the supervisor is not the client's child"
    );
    assert_eq!(
        ppid(spawner),
        client,
        "the fork server is the client's child"
    );
    let argv = cmdline(spawner);
    assert_eq!(&argv[1..], [SUPERVISOR_ARG, "--spawner"], "{argv:?}");
    let argv = cmdline(supervisor);
    assert_eq!(&argv[1..], [SUPERVISOR_ARG, "--spawner"], "{argv:?}");
    (supervisor, spawner)
}

/// Every supervisor of several payloads is a child of one fork server, itself the client's
/// child, and no process with a JSON spec in its argv is among the client's descendants.
#[tokio::test]
async fn supervisors_are_forked_by_one_fork_server_not_exec_d_per_payload() {
    let client = TestClient::start(&["--slots", "3"]);
    if !has_cgroups(&client) {
        return;
    }
    let client_pid = client.proc.pid() as i32;
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        ids.push(client.submit_script(&gated_script(s, name, 0)).await);
    }
    let mut spawners = Vec::new();
    let mut supervisors = Vec::new();
    for name in ["a", "b", "c"] {
        let shell = read_pid(&s.join(format!("{name}-pid"))).await;
        let (supervisor, spawner) = forked_from_spawner(client_pid, shell);
        supervisors.push(supervisor);
        spawners.push(spawner);
    }
    assert!(
        spawners.iter().all(|p| *p == spawners[0]),
        "one fork server for all: {spawners:?}"
    );
    supervisors.sort();
    supervisors.dedup();
    assert_eq!(supervisors.len(), 3, "a supervisor per payload");
    assert_eq!(exec_supervisors(client_pid), Vec::<Vec<String>>::new());
    for name in ["a", "b", "c"] {
        std::fs::write(s.join(format!("{name}-go")), "").unwrap();
    }
    for (id, name) in ids.iter().zip(["a", "b", "c"]) {
        assert_eq!(
            client.retrieve_zip(*id).await["out.txt"],
            format!("{name}\n").as_bytes()
        );
    }
    // Shown once a fork server runs; the kernel forks all three into their leaves or none.
    let metrics = client
        .http
        .get(client.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let moves: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("jobrelay_client_cgroup_moves_total "))
        .expect("the cgroup moves counter is shown")
        .trim()
        .parse()
        .unwrap();
    assert!(moves == 0 || moves == 3, "{moves} of 3 starts moved in");
}

/// `kill -9` of the fork server while a payload runs: the payload runs on and ends with its
/// real status, which the client reports; the next payload starts through a new fork server.
#[tokio::test]
async fn a_payload_outlives_its_killed_fork_server_and_the_next_one_starts_a_new_one() {
    let client = TestClient::start(&[]);
    if !has_cgroups(&client) {
        return;
    }
    let client_pid = client.proc.pid() as i32;
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let id = client.submit_script(&gated_script(s, "first", 3)).await;
    let shell = read_pid(&s.join("first-pid")).await;
    let (supervisor, spawner) = forked_from_spawner(client_pid, shell);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spawner),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the fork server to die",
        || async { (!pid_alive(spawner)).then_some(()) },
    )
    .await;
    assert!(
        pid_alive(shell) && pid_alive(supervisor),
        "the payload and its supervisor outlive the fork server"
    );
    assert_eq!(client.record(id).await["status"], "Running");
    std::fs::write(s.join("first-go"), "").unwrap();
    let failed = client.wait_for(id, "Failed").await;
    assert_eq!(failed["exit_code"], 3, "{failed}");
    assert_eq!(failed["reason"], "run.sh exited with code 3", "{failed}");
    assert_eq!(runs_of(s, "first"), 1);

    let next = client.submit_script(&gated_script(s, "next", 0)).await;
    let shell = read_pid(&s.join("next-pid")).await;
    let (_, again) = forked_from_spawner(client_pid, shell);
    assert_ne!(again, spawner, "a new fork server");
    std::fs::write(s.join("next-go"), "").unwrap();
    assert_eq!(client.retrieve_zip(next).await["out.txt"], b"next\n");
}

/// `kill -9` of the client while a payload forked by its fork server runs: the fork server
/// goes with it (EOF), the supervisor does not; the restarted client follows the payload to
/// its real end, which is not "client restarted", and it ran once.
#[tokio::test]
async fn a_forked_payload_is_followed_to_its_real_end_after_a_client_kill_9() {
    let mut client = TestClient::start(&[]);
    if !has_cgroups(&client) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let id = client.submit_script(&gated_script(s, "job", 4)).await;
    let shell = read_pid(&s.join("job-pid")).await;
    let (supervisor, spawner) = forked_from_spawner(client.proc.pid() as i32, shell);
    client.proc.kill9();
    eventually(
        std::time::Duration::from_secs(10),
        "the fork server to leave with its client",
        || async { (!pid_alive(spawner)).then_some(()) },
    )
    .await;
    assert!(pid_alive(supervisor), "the supervisor outlives both");
    client.restart_after_kill9(&[]);
    assert_eq!(client.record(id).await["status"], "Running");
    std::fs::write(s.join("job-go"), "").unwrap();
    let failed = client.wait_for(id, "Failed").await;
    assert_eq!(failed["exit_code"], 4, "{failed}");
    assert_eq!(failed["reason"], "run.sh exited with code 4", "{failed}");
    assert_eq!(runs_of(s, "job"), 1, "it ran once");
}

/// Without cgroups (`JOBRELAY_NO_CGROUP`), a forked supervisor could not be found by its
/// environment marker after a restart: each supervisor is exec'd with its JSON spec as the
/// client's child, and no fork server runs.
#[tokio::test]
async fn without_cgroups_supervisors_are_exec_d_by_the_client() {
    let client = TestClient::start_with_env(&[], &[("JOBRELAY_NO_CGROUP", "1")]);
    let client_pid = client.proc.pid() as i32;
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let id = client.submit_script(&gated_script(s, "job", 0)).await;
    let shell = read_pid(&s.join("job-pid")).await;
    let supervisor = ppid(shell);
    assert_eq!(ppid(supervisor), client_pid, "exec'd by the client");
    let argv = cmdline(supervisor);
    assert_eq!(argv[1], SUPERVISOR_ARG, "{argv:?}");
    assert!(argv[2].starts_with('{'), "a JSON spec: {argv:?}");
    assert!(
        descendants(client_pid)
            .into_iter()
            .all(|p| !cmdline(p).iter().any(|a| a == "--spawner")),
        "no fork server"
    );
    std::fs::write(s.join("job-go"), "").unwrap();
    assert_eq!(client.retrieve_zip(id).await["out.txt"], b"job\n");
}

/// A forked supervisor stuck on its way into place (here its cgroup's `cgroup.procs` is a FIFO
/// nobody reads, so opening it to join blocks, as a hung file system would) does not stop the
/// fork server: past its place timeout it kills that child and answers "failed", and the next
/// start is served and runs.
/// A fork server started by the test itself, spoken to over its socket as the client does.
struct DirectSpawner {
    child: std::process::Child,
    writer: std::os::unix::net::UnixStream,
    replies: std::io::BufReader<std::os::unix::net::UnixStream>,
    root: std::path::PathBuf,
    work: std::path::PathBuf,
}

impl DirectSpawner {
    /// A fork server, and a work directory with empty logs under `root`.
    fn start(root: &std::path::Path, place_timeout_ms: u32) -> Self {
        use std::os::fd::OwnedFd;
        let work = root.join("work");
        std::fs::create_dir(&work).unwrap();
        for log in ["out", "err"] {
            std::fs::write(work.join(log), "").unwrap();
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let child = std::process::Command::new(binary())
            .args([SUPERVISOR_ARG, "--spawner"])
            .env(
                "JOBRELAY_SPAWNER_PLACE_TIMEOUT_MS",
                place_timeout_ms.to_string(),
            )
            .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ours.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        DirectSpawner {
            child,
            writer: ours.try_clone().unwrap(),
            replies: std::io::BufReader::new(ours),
            root: root.to_owned(),
            work,
        }
    }

    /// Asks for `script` to run in the work directory, in `cgroup`, its end recorded in
    /// `<root>/<exit>`.
    fn request(&mut self, req: u64, cgroup: Option<&std::path::Path>, exit: &str, script: &str) {
        use std::io::Write;
        let line = serde_json::json!({
            "req": req,
            "dir": self.work,
            "stdout": self.work.join("out"),
            "stderr": self.work.join("err"),
            "spec": {
                "exit_file": self.root.join(exit),
                "payload": req,
                "cgroup": cgroup,
                "run_as": null,
                "limits": {},
                "argv": ["/bin/sh", "-c", script],
            },
        })
        .to_string()
            + "\n";
        self.writer.write_all(line.as_bytes()).unwrap();
    }

    fn next(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.replies
            .read_line(&mut line)
            .expect("a reply within 20 s");
        serde_json::from_str(&line).unwrap()
    }

    /// The "started" of the last request and the "ended" of `ends` children, in any order.
    fn started_and_ended(&mut self, ends: usize) -> serde_json::Value {
        let mut started = None;
        let mut ended = 0;
        while started.is_none() || ended < ends {
            let reply = self.next();
            match reply["reply"].as_str().unwrap() {
                "started" => started = Some(reply),
                "ended" => ended += 1,
                other => panic!("unexpected {other}: {reply}"),
            }
        }
        started.unwrap()
    }
}

impl Drop for DirectSpawner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_supervisor_stuck_getting_in_place_is_killed_and_the_next_start_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let stuck = root.join("stuck-cgroup");
    std::fs::create_dir(&stuck).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(stuck.join("cgroup.procs"))
        .status()
        .unwrap();
    assert!(made.success());
    /// Whatever the test's outcome: a child still stuck on the FIFO let go (opening its other
    /// end lets its open return). Declared before the fork server, so it runs after its kill.
    struct LetGo(std::path::PathBuf);
    impl Drop for LetGo {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&self.0);
        }
    }
    let _let_go = LetGo(stuck.join("cgroup.procs"));
    let mut spawner = DirectSpawner::start(root, 500);
    spawner.request(1, Some(&stuck), "exit1", "echo ran > ran.txt");
    let failed = spawner.next();
    assert_eq!(failed["reply"], "failed", "{failed}");
    assert_eq!(failed["req"], 1);
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("not in place within 500 ms"),
        "{failed}"
    );
    spawner.request(2, None, "exit2", "echo ran > ran.txt");
    // The killed child's "ended" may come before or after the second start's replies.
    spawner.started_and_ended(2);
    assert_eq!(
        std::fs::read_to_string(spawner.work.join("ran.txt")).unwrap(),
        "ran\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("exit2")).unwrap().trim(),
        "payload 2 code 0"
    );
}

/// This process's cgroup v2 directory, if the machine has a cgroup2 mount and we may make
/// directories in it.
fn own_cgroup_v2_dir() -> Option<std::path::PathBuf> {
    let mount = std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))?
        .split_whitespace()
        .nth(1)?
        .to_owned();
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))?;
    Some(std::path::Path::new(&mount).join(own.trim_start_matches('/')))
}

/// A supervisor with a real cgroup v2 leaf is forked straight into it (clone3 with
/// CLONE_INTO_CGROUP: no write to cgroup.procs, whose lock waits for an RCU grace period):
/// "started" says it was not moved in, and the payload's /proc/self/cgroup names the leaf.
/// A directory that is no cgroup takes the fork-then-move path, and "started" says so.
#[test]
fn a_supervisor_is_forked_straight_into_its_cgroup_leaf_and_moved_in_only_where_it_cannot_be() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut spawner = DirectSpawner::start(root, 20_000);
    // Not a cgroup: a directory with a plain file as cgroup.procs takes the write of "0".
    let plain = root.join("plain-cgroup");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("cgroup.procs"), "").unwrap();
    spawner.request(1, Some(&plain), "exit1", "true");
    let started = spawner.started_and_ended(1);
    assert_eq!(started["moved_in"], true, "{started}");
    assert_eq!(
        std::fs::read_to_string(plain.join("cgroup.procs")).unwrap(),
        "0"
    );
    // A FIFO where the leaf should be: neither the fork server's open of the leaf nor the
    // child's move waits on it; the start fails at once (within the 20 s read timeout, far
    // below this fork server's place timeout).
    let fifo = root.join("fifo-cgroup");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    spawner.request(3, Some(&fifo), "exit3", "true");
    let failed = spawner.next();
    assert_eq!(failed["reply"], "failed", "{failed}");
    assert_eq!(failed["req"], 3);
    let Some(own) = own_cgroup_v2_dir() else {
        eprintln!("skipped the real leaf: no cgroup v2 mount here");
        return;
    };
    let leaf = own.join(format!("jobrelay-test-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&leaf) {
        eprintln!("skipped the real leaf: cannot make {}: {e}", leaf.display());
        return;
    }
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(leaf.clone());
    spawner.request(
        2,
        Some(&leaf),
        "exit2",
        "cat /proc/self/cgroup > cgroup.txt",
    );
    let started = spawner.started_and_ended(1);
    assert_eq!(started["moved_in"], false, "{started}");
    let cgroup = std::fs::read_to_string(spawner.work.join("cgroup.txt")).unwrap();
    let name = leaf.file_name().unwrap().to_str().unwrap();
    assert!(
        cgroup
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&format!("/{name}"))),
        "{cgroup}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("exit2")).unwrap().trim(),
        "payload 2 code 0"
    );
}

/// The supervisor defers SIGTERM, SIGINT and SIGHUP for itself (it blocks them) and the
/// payload gets none of that: bash starts with them neither blocked nor ignored, whether the
/// payload is started with nothing between fork and exec (`posix_spawn`) or has limits set
/// there, and through the fork server or an exec'd supervisor alike.
#[tokio::test]
async fn a_payload_starts_with_the_supervisors_deferred_signals_neither_blocked_nor_ignored() {
    // Bits of SIGHUP (1), SIGINT (2) and SIGTERM (15) in /proc's signal masks.
    const DEFERRED_BITS: u64 = 1 | 1 << 1 | 1 << 14;
    // ignored.txt: bash's own ignored set, read by its child grep. Bash's blocked set cannot
    // be read that way: bash 5 blocks SIGCHLD, SIGINT and SIGTERM in itself around each
    // fork and a child may read its status before bash unblocks them. blocked.txt is grep's
    // own blocked set instead: bash gives each child the mask bash was started with.
    let script = "grep -E '^SigIgn' /proc/$$/status > ignored.txt\nulimit -n > nofile.txt\n\
                  grep -E '^SigBlk' /proc/self/status > blocked.txt\n";
    for (extra, env, nofile) in [
        (&[][..], &[][..], None),
        (&["--limit-open-files", "512"][..], &[][..], Some("512")),
        (&[][..], &[("JOBRELAY_NO_CGROUP", "1")][..], None),
    ] {
        let client = TestClient::start_with_env(extra, env);
        let id = client.submit_script(script).await;
        let files = client.retrieve_zip(id).await;
        let ignored = String::from_utf8_lossy(&files["ignored.txt"]).into_owned();
        let (_, hex) = ignored.trim().split_once(':').unwrap();
        assert_eq!(
            u64::from_str_radix(hex.trim(), 16).unwrap() & DEFERRED_BITS,
            0,
            "the payload ignores a deferred signal ({extra:?} {env:?}): {ignored}"
        );
        let blocked = String::from_utf8_lossy(&files["blocked.txt"]).into_owned();
        let (_, hex) = blocked.trim().split_once(':').unwrap();
        assert_eq!(
            u64::from_str_radix(hex.trim(), 16).unwrap(),
            0,
            "the payload started with signals blocked ({extra:?} {env:?}): {blocked}"
        );
        if let Some(nofile) = nofile {
            assert_eq!(String::from_utf8_lossy(&files["nofile.txt"]).trim(), nofile);
        }
    }
}
