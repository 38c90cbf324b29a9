//! The client survives kill -9: finished payloads stay retrievable, prepared ones run,
//! interrupted ones are failed with their processes killed, and ids keep growing.

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

    let failed = client.wait_for(interrupted, "Failed").await;
    assert_eq!(failed["reason"], "client restarted");
    eventually(
        std::time::Duration::from_secs(10),
        "leftover processes to die",
        || async { (!pid_alive(shell) && !pid_alive(child)).then_some(()) },
    )
    .await;
    assert_eq!(client.retrieve_zip(done).await["kept.txt"], b"kept\n");
    assert_eq!(client.retrieve_zip(waiting).await["later.txt"], b"later\n");
    let next = client.submit_script("true\n").await;
    assert!(next > waiting, "new id {next} must be above {waiting}");
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
