//! The user CLI against a real `jobrelay up` process: results unpacked, an exit code for each
//! final state, `--json` output, clear errors; and `up` continuing after a stop.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

/// Starts `jobrelay up` on free ports with its data in `dir`, two jobs at a time.
fn up(dir: &Path) -> Proc {
    Proc::up(dir, &["--slots", "2"])
}

/// Runs `jobrelay <args>` against `server` as user 1.
fn cli(server: &str, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("JOBRELAY_SERVER", server)
        .env("JOBRELAY_USER", "1")
        .output()
        .expect("run jobrelay")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A job directory with this run.sh.
fn job_dir(root: &Path, name: &str, script: &str) -> String {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("run.sh"), script).unwrap();
    dir.to_str().unwrap().to_owned()
}

fn submit_json(server: &str, dir: &str) -> u64 {
    let out = cli(server, &["submit", "--service", "example", "--json", dir]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    answer["id"].as_u64().unwrap()
}

#[test]
fn submit_wait_output_unpacks_the_example_results() {
    let tmp = tempfile::tempdir().unwrap();
    let system = up(tmp.path());
    let example = tmp.path().join("data/example-job");
    let results = tmp.path().join("results");
    let out = cli(
        &system.url,
        &[
            "submit",
            "--service",
            "example",
            "--wait",
            "--output",
            results.to_str().unwrap(),
            example.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "1");
    assert_eq!(
        std::fs::read_to_string(results.join("residues.tsv")).unwrap(),
        "file\tchain\tresidues\npeptides.pdb\tA\t5\npeptides.pdb\tB\t3\n"
    );
    assert!(results.join("peptides.pdb").exists());
    assert!(
        std::fs::read_dir(&results).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".zip")),
        "the downloaded ZIP is removed after unpacking"
    );

    // status, jobs and download, human and --json.
    let status = cli(&system.url, &["status", "1"]);
    assert!(stdout(&status).contains("Completed"), "{}", stdout(&status));
    let listed = cli(&system.url, &["jobs", "--json", "--status", "Completed"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["jobs"][0]["id"], 1);
    let table = cli(&system.url, &["jobs"]);
    let table = stdout(&table);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().contains("Completed"),
        "{table}"
    );

    let zip_path = tmp.path().join("one.zip");
    let download = cli(
        &system.url,
        &["download", "1", "-o", zip_path.to_str().unwrap(), "--json"],
    );
    assert!(download.status.success(), "{}", stderr(&download));
    let answer: serde_json::Value = serde_json::from_slice(&download.stdout).unwrap();
    assert!(answer["bytes"].as_u64().unwrap() > 0);
    let entries = unzip(&std::fs::read(&zip_path).unwrap());
    assert!(entries.contains_key("residues.tsv"));
}

#[test]
fn exit_codes_tell_how_each_job_ended() {
    let tmp = tempfile::tempdir().unwrap();
    let system = up(tmp.path());
    let jobs = tmp.path().join("jobs");

    let failing = job_dir(&jobs, "failing", "echo broken >&2; exit 9\n");
    let out = cli(
        &system.url,
        &["submit", "--service", "example", "--wait", &failing],
    );
    assert_eq!(out.status.code(), Some(3), "Failed: {}", stderr(&out));

    let invalid = jobs.join("invalid");
    std::fs::create_dir_all(&invalid).unwrap();
    std::fs::write(invalid.join("notes.txt"), "no script").unwrap();
    let out = cli(
        &system.url,
        &[
            "submit",
            "--service",
            "example",
            "--wait",
            invalid.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(5), "Invalid: {}", stderr(&out));
    assert!(
        stderr(&out).contains("no run.sh"),
        "warned before uploading"
    );

    let sleeper = job_dir(&jobs, "sleeper", "sleep 300\n");
    let id = submit_json(&system.url, &sleeper).to_string();
    let out = cli(&system.url, &["wait", &id, "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(6), "timeout: {}", stderr(&out));
    assert!(stderr(&out).contains("timed out"));

    let waiter = {
        let url = system.url.clone();
        let id = id.clone();
        std::thread::spawn(move || cli(&url, &["wait", &id, "--json"]))
    };
    let cancel = cli(&system.url, &["cancel", &id]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let waited = waiter.join().unwrap();
    assert_eq!(waited.status.code(), Some(4), "Killed: {}", stderr(&waited));
    let record: serde_json::Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(record["status"], "Killed");

    // The work directory of a job that did not complete is still there with --partial.
    let partial = tmp.path().join("partial");
    let out = cli(
        &system.url,
        &[
            "download",
            "1",
            "--partial",
            "--output",
            partial.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(partial.join(".jobrelay.stderr")).unwrap(),
        "broken\n"
    );
    // Without --partial, a failed job has no results, and the error says why.
    let out = cli(&system.url, &["download", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Failed"), "{}", stderr(&out));
}

#[test]
fn errors_are_one_clear_line_and_a_non_zero_exit() {
    let unreachable = cli("http://127.0.0.1:1", &["status", "1"]);
    assert_eq!(unreachable.status.code(), Some(1));
    let message = stderr(&unreachable);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("cannot reach the server"), "{message}");

    let tmp = tempfile::tempdir().unwrap();
    let system = up(tmp.path());
    let missing = cli(&system.url, &["status", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(stderr(&missing).lines().count(), 1);
    assert!(stderr(&missing).contains("999"), "{}", stderr(&missing));

    let job = job_dir(tmp.path(), "job", "true\n");
    let refused = cli(&system.url, &["submit", "--service", "nope", &job]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("nope"), "{}", stderr(&refused));
    assert!(!stderr(&refused).contains("panicked"));
}

#[test]
fn a_later_up_continues_where_the_last_one_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    let first = up(tmp.path());
    let done = submit_json(
        &first.url,
        &job_dir(&jobs, "done", "echo kept > kept.txt\n"),
    );
    let out = cli(&first.url, &["wait", &done.to_string()]);
    assert_eq!(out.status.code(), Some(0));
    // The first run is interrupted; the run after the restart completes.
    let marker = tmp.path().join("first-run-started");
    let script = format!(
        "if [ -e {m} ]; then echo ok > ok.txt; else touch {m}; sleep 300; fi\n",
        m = marker.display()
    );
    let interrupted = submit_json(&first.url, &job_dir(&jobs, "slow", &script));
    let running = eventually_status(&first.url, interrupted, "Running");
    assert_eq!(running, "Running");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(first); // SIGTERM: running jobs are killed, state stays on disk

    let second = up(tmp.path());
    let out = cli(&second.url, &["status", &done.to_string(), "--json"]);
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["status"], "Completed");
    let out = cli(
        &second.url,
        &[
            "wait",
            &interrupted.to_string(),
            "--timeout",
            "120",
            "--json",
        ],
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the interrupted job ran again and completed: {record}\n{}",
        second.log()
    );
    assert!(record["attempts"].as_u64().unwrap() >= 2, "{record}");
    let again = tmp.path().join("again");
    let out = cli(
        &second.url,
        &[
            "download",
            &done.to_string(),
            "--output",
            again.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(again.join("kept.txt")).unwrap(),
        "kept\n"
    );
}

fn eventually_status(server: &str, id: u64, wanted: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = cli(server, &["status", &id.to_string(), "--json"]);
        if let Ok(record) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if record["status"] == wanted {
                return wanted.to_owned();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never {wanted}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_directory_of_more_files_than_the_open_file_limit_is_submitted_and_unpacked() {
    let tmp = tempfile::tempdir().unwrap();
    let system = up(tmp.path());
    // Server and CLI both under the common limit of 1,024 open files.
    let limited = Command::new("prlimit")
        .arg(format!("--pid={}", system.pid()))
        .arg("--nofile=1024:1024")
        .status()
        .is_ok_and(|s| s.success());
    if !limited {
        eprintln!("skipped: prlimit could not lower the open-file limit");
        return;
    }
    let job = job_dir(tmp.path(), "many", "ls in | wc -l > count.txt\n");
    std::fs::create_dir(Path::new(&job).join("in")).unwrap();
    for i in 0..1500 {
        std::fs::write(Path::new(&job).join(format!("in/f{i:04}.txt")), "x").unwrap();
    }
    let results = tmp.path().join("results");
    let out = Command::new("prlimit")
        .args(["--nofile=1024:1024", binary()])
        .args(["submit", "--service", "example", "--wait", "--output"])
        .arg(&results)
        .arg(&job)
        .env("JOBRELAY_SERVER", &system.url)
        .env("JOBRELAY_USER", "1")
        .output()
        .expect("run jobrelay under prlimit");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(results.join("count.txt")).unwrap(),
        "1500\n"
    );
    assert!(results.join("in/f1499.txt").is_file());
}
