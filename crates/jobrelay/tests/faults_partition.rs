//! Network faults between server and client, through a fault proxy of our own
//! (`support::proxy`): the link cut mid-upload, mid-result-download and while the job runs;
//! responses stalled past the server's request timeouts; a slow link. Every job finishes once
//! the link heals, runs once, and its stored result is whole.

mod support;

use std::time::Duration;

use support::net::addr_of;
use support::proxy::{FaultProxy, Mode};
use support::runlog::count_lines;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(180);

/// A client behind a proxy, and a server that knows the client only through the proxy.
struct Setup {
    dir: tempfile::TempDir,
    _client: Proc,
    proxy: FaultProxy,
    server: TestServer,
    http: reqwest::Client,
}

impl Setup {
    fn start(server_extra: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let client = start_client(dir.path(), "client", &["--slots", "4"]);
        let proxy = FaultProxy::start(addr_of(&client.url));
        let config = write_server_config(dir.path(), &[("example", vec![proxy.url()], 10, 10)]);
        let server = TestServer::start(dir.path(), &config, server_extra);
        Setup {
            dir,
            _client: client,
            proxy,
            server,
            http: http(),
        }
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("runs.log")
    }

    async fn upload(&self, name: &str, script: &str, extra: &[(&str, &[u8])]) -> i64 {
        let mut files: Vec<(&str, &[u8])> = vec![("run.sh", script.as_bytes())];
        files.extend_from_slice(extra);
        let _ = name;
        upload_job(&self.http, &self.server.url, 1, "example", &files).await
    }

    /// No partial or temporary file among the stored results.
    fn assert_results_whole(&self) {
        for path in tree(&self.dir.path().join("server/results")) {
            assert_eq!(
                path.extension().and_then(|e| e.to_str()),
                Some("zip"),
                "only whole results are stored: {path:?}"
            );
            let bytes = std::fs::read(&path).unwrap();
            unzip(&bytes);
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_during_the_upload_to_the_client_is_retried_and_the_job_runs_once() {
    let s = Setup::start(&[]);
    let input = pattern(3 << 20, 7);
    // Every upload connection is cut after 1 MiB, twice; the third send goes through.
    s.proxy.set(Mode::CutUp {
        after: 1 << 20,
        times: 2,
    });
    let script = format!(
        "echo up >> {}\ncksum < input.bin > out.txt\n",
        s.log().display()
    );
    let id = s.upload("up", &script, &[("input.bin", &input)]).await;
    wait_status(&s.http, &s.server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&s.http, &s.server.url, id).await);
    assert_eq!(entries["input.bin"], input, "the input arrived whole");
    assert!(s.proxy.cuts() >= 1, "the fault was injected");
    assert_eq!(count_lines(&s.log()).get("up"), Some(&1), "ran once");
    s.assert_results_whole();
    eprintln!("upload cut: {} cuts, job {id} Completed", s.proxy.cuts());
}

/// The client takes the payload and starts it, but its answer to `/submit` never arrives (the
/// client killed just after, a link that broke): sending a new attempt would run the job a
/// second time (seen in CI's client crash loop). The server sends the same key again and the
/// client hands back the payload it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_answer_is_lost_is_sent_again_with_its_key_and_runs_once() {
    let s = Setup::start(&[]);
    s.proxy.set(Mode::LoseAnswer {
        request: b"POST /submit",
        times: 2,
    });
    let script = format!("echo lost >> {}\necho done > out.txt\n", s.log().display());
    let id = s.upload("lost", &script, &[]).await;
    wait_status(&s.http, &s.server.url, id, &["Completed"], LONG).await;
    assert_eq!(s.proxy.cuts(), 2, "both answers were lost");
    assert_eq!(count_lines(&s.log()).get("lost"), Some(&1), "ran once");
    let job: serde_json::Value = s
        .http
        .get(format!("{}/jobs/{id}", s.server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["attempts"], 1, "one attempt, sent three times: {job}");
    let entries = unzip(&download_zip(&s.http, &s.server.url, id).await);
    assert_eq!(entries["out.txt"], b"done\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_cut_mid_stream_is_fetched_again_not_stored_truncated() {
    let s = Setup::start(&[]);
    let script = format!(
        "echo down >> {}\nhead -c 4000000 /dev/urandom > out.bin\ncksum < out.bin > sum.txt\n",
        s.log().display()
    );
    // Cut every response stream after 1 MiB, three times (only result ZIPs are that large).
    s.proxy.set(Mode::CutDown {
        after: 1 << 20,
        times: 3,
    });
    let id = s.upload("down", &script, &[]).await;
    wait_status(&s.http, &s.server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&s.http, &s.server.url, id).await);
    assert_eq!(entries["out.bin"].len(), 4_000_000, "the whole output");
    // The checksum the job computed matches what we downloaded.
    let sum = String::from_utf8(entries["sum.txt"].clone()).unwrap();
    let mut cksum = std::process::Command::new("cksum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        cksum
            .stdin
            .take()
            .unwrap()
            .write_all(&entries["out.bin"])
            .unwrap();
    }
    let ours = String::from_utf8(cksum.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(
        sum, ours,
        "the stored result is the job's output, byte for byte"
    );
    assert_eq!(s.proxy.cuts(), 3, "three result streams were cut");
    assert_eq!(count_lines(&s.log()).get("down"), Some(&1), "ran once");
    s.assert_results_whole();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_while_jobs_run_heals_and_they_finish_once() {
    let s = Setup::start(&["--client-timeout", "120"]);
    let mut ids = Vec::new();
    for n in 0..4 {
        let script = format!(
            "echo run{n} >> {}\nsleep 2\necho run{n} > out.txt\n",
            s.log().display()
        );
        ids.push(s.upload("run", &script, &[]).await);
    }
    for id in &ids {
        wait_status(&s.http, &s.server.url, *id, &["Running"], LONG).await;
    }
    // The link goes down while they run, and they finish on the client meanwhile.
    s.proxy.set(Mode::Drop);
    tokio::time::sleep(Duration::from_secs(5)).await;
    for id in &ids {
        let job = job_json(&s.http, &s.server.url, *id).await;
        assert_ne!(job["status"], "Completed", "cannot know while partitioned");
    }
    s.proxy.set(Mode::Pass);
    for (n, id) in ids.iter().enumerate() {
        wait_status(&s.http, &s.server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&s.http, &s.server.url, *id).await);
        assert_eq!(entries["out.txt"], format!("run{n}\n").as_bytes());
        assert_eq!(count_lines(&s.log()).get(&format!("run{n}")), Some(&1));
    }
    s.assert_results_whole();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_stalls_past_the_request_timeouts_recovers() {
    let s = Setup::start(&["--client-timeout", "120"]);
    let script = format!(
        "echo stall >> {}\nsleep 1\necho stall > out.txt\n",
        s.log().display()
    );
    let id = s.upload("stall", &script, &[]).await;
    wait_status(&s.http, &s.server.url, id, &["Running"], LONG).await;
    // A black hole longer than the server's small-request timeout (10 s): its probes, the
    // change feed and any check hang and time out.
    s.proxy.set(Mode::Stall);
    tokio::time::sleep(Duration::from_secs(14)).await;
    // The server keeps answering its own users while the link is stalled.
    let job = job_json(&s.http, &s.server.url, id).await;
    assert_ne!(job["status"], "Failed", "{job}");
    s.proxy.set(Mode::Pass);
    wait_status(&s.http, &s.server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&s.http, &s.server.url, id).await);
    assert_eq!(entries["out.txt"], b"stall\n");
    assert_eq!(count_lines(&s.log()).get("stall"), Some(&1), "ran once");

    // A job sent while the link is stalled: the send times out or waits, then goes through.
    s.proxy.set(Mode::Stall);
    let script = format!(
        "echo stall2 >> {}\necho stall2 > out.txt\n",
        s.log().display()
    );
    let id = s.upload("stall2", &script, &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.proxy.set(Mode::Pass);
    wait_status(&s.http, &s.server.url, id, &["Completed"], LONG).await;
    assert_eq!(count_lines(&s.log()).get("stall2"), Some(&1), "ran once");
    s.assert_results_whole();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_finish_over_a_slow_link() {
    let s = Setup::start(&[]);
    // 20 ms before every chunk of every connection, both ways.
    s.proxy.set(Mode::Delay(Duration::from_millis(20)));
    let input = pattern(512 << 10, 3);
    let mut ids = Vec::new();
    for n in 0..4 {
        let script = format!(
            "echo slow{n} >> {}\ncp input.bin copy.bin\n",
            s.log().display()
        );
        ids.push(s.upload("slow", &script, &[("input.bin", &input)]).await);
    }
    for (n, id) in ids.iter().enumerate() {
        wait_status(&s.http, &s.server.url, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(&s.http, &s.server.url, *id).await);
        assert_eq!(entries["copy.bin"], input);
        assert_eq!(count_lines(&s.log()).get(&format!("slow{n}")), Some(&1));
    }
    s.assert_results_whole();
}

/// Item 7 of issue 20: a client stopped (SIGSTOP: connections still open, nothing answers)
/// past `--client-timeout` loses its job within about that timeout, not several probe
/// timeouts later; and once it runs again (SIGCONT) the run the server gave away is killed
/// there, so the job's script finishes once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_loses_its_job_within_the_timeout_and_its_run_is_killed() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    const TIMEOUT_SECS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--slots", "2"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);
    let server = TestServer::start(
        root,
        &config,
        &["--client-timeout", &TIMEOUT_SECS.to_string()],
    );
    let http = http();
    let (starts, finishes) = (root.join("starts.log"), root.join("finishes.log"));
    // The first run outlasts the stop by far; a run sent again finishes at once.
    let script = format!(
        "echo start >> {starts}\nn=$(wc -l < {starts})\necho $$ > {root}/pid$n\n\
         if [ \"$n\" = 1 ]; then sleep 40; fi\necho done >> {finishes}\necho ok > out.txt\n",
        starts = starts.display(),
        finishes = finishes.display(),
        root = root.display()
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
    let first_run = read_pid(&root.join("pid1")).await;

    let client_pid = Pid::from_raw(client.pid() as i32);
    struct Continue(Pid);
    impl Drop for Continue {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    let stopped_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    kill(client_pid, Signal::SIGSTOP).unwrap();
    let resume = Continue(client_pid);
    // When the server gave the run away, by its own record of the job.
    let requeued_ms = eventually(Duration::from_secs(60), "the job queued again", || async {
        let events: serde_json::Value = http
            .get(format!("{}/jobs/{id}/events", server.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        events
            .as_array()
            .or_else(|| events["events"].as_array())
            .unwrap()
            .iter()
            .find(|e| e["message"].as_str().unwrap_or("").contains("unreachable"))
            .map(|e| e["at_ms"].as_i64().unwrap())
    })
    .await;
    let took = Duration::from_millis((requeued_ms - stopped_ms).max(0) as u64);
    eprintln!("requeued {took:?} after SIGSTOP (--client-timeout {TIMEOUT_SECS})");
    // One probe interval (half the timeout) to notice, one client timeout to give up, and
    // slack for a loaded machine.
    let bound = Duration::from_millis(TIMEOUT_SECS * 1500 + 4000);
    assert!(
        took <= bound,
        "requeued {took:?} after the stop, more than {bound:?} with --client-timeout {TIMEOUT_SECS}"
    );
    drop(resume);

    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    eventually(
        Duration::from_secs(20),
        "the run given away killed on the client",
        || async { (!pid_alive(first_run)).then_some(()) },
    )
    .await;
    let finished = std::fs::read_to_string(&finishes).unwrap_or_default();
    assert_eq!(
        finished.lines().count(),
        1,
        "the script finished once, not twice (first run killed)"
    );
    // Logged once the client answered the kill, which it does after the run is dead.
    eventually(Duration::from_secs(20), "the kill logged", || async {
        server
            .log()
            .contains("killed a run the server had given away")
            .then_some(())
    })
    .await;
}
