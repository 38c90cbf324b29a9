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
