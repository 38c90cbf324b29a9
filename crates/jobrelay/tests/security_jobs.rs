//! Jobs that cannot escape: `--run-as`, resource limits, the bubblewrap sandbox, and result
//! ZIPs that a job cannot lead outside its work directory.
//!
//! Tests that change user need root and skip (printing why) without it; sandbox tests also
//! skip when `bwrap` is missing (CI installs it).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::host::{have_bwrap, is_root};
use support::*;

fn skip_unless_root(what: &str) -> bool {
    if !is_root() {
        eprintln!("skipped: {what} needs root");
        return true;
    }
    false
}

fn skip_unless_sandbox(what: &str) -> bool {
    if skip_unless_root(what) {
        return true;
    }
    if !have_bwrap() {
        eprintln!("skipped: {what} needs bubblewrap (apt-get install bubblewrap)");
        return true;
    }
    false
}

fn text(entries: &std::collections::BTreeMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(entries.get(name).map(Vec::as_slice).unwrap_or(b"")).into_owned()
}

/// Runs `script` to its end and returns its final record (Completed: the ZIP's entries in
/// "zip").
async fn run_to_end(client: &TestClient, script: &str) -> serde_json::Value {
    let id = client.submit_script(script).await;
    eventually(Duration::from_secs(90), "the payload to end", || async {
        let record = client.record(id).await;
        let status = record["status"].as_str().unwrap_or("").to_owned();
        ["Completed", "Failed", "Killed", "Invalid"]
            .contains(&status.as_str())
            .then_some(record)
    })
    .await
}

/// The client still takes and runs a payload.
async fn still_serving(client: &TestClient) {
    let id = client.submit_script("echo fine > ok.txt\n").await;
    let entries = client.retrieve_zip(id).await;
    assert_eq!(text(&entries, "ok.txt"), "fine\n");
}

#[tokio::test]
async fn run_as_runs_payloads_as_that_user_in_a_private_work_directory() {
    if skip_unless_root("--run-as") {
        return;
    }
    let client = TestClient::start_for_other_users(&["--run-as", "nobody"]);
    let data = client.data_dir();
    let script = format!(
        "id -u > uid.txt; id -G > groups.txt; echo $HOME > home.txt\n\
         touch /root/escape-$$ 2>/dev/null && echo escaped >> escaped.txt\n\
         ls {data}/payloads > records.txt 2>/dev/null && echo listed >> escaped.txt\n\
         ls {data}/work > others.txt 2>/dev/null && echo listed-work >> escaped.txt\n\
         echo made > out.txt\n",
        data = data.display()
    );
    let id = client
        .submit(&[("run.sh", script.as_bytes()), ("in/put.txt", b"input")])
        .await
        .1["id"]
        .as_u64()
        .unwrap();
    let entries = client.retrieve_zip(id).await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert_eq!(text(&entries, "uid.txt").trim(), nobody.uid.to_string());
    assert_eq!(text(&entries, "groups.txt").trim(), nobody.gid.to_string());
    assert_eq!(text(&entries, "out.txt"), "made\n");
    assert_eq!(text(&entries, "in/put.txt"), "input");
    assert!(
        !entries.contains_key("escaped.txt"),
        "{}",
        text(&entries, "escaped.txt")
    );
    let work = data.join(format!("work/{id}"));
    assert_eq!(text(&entries, "home.txt").trim(), work.to_str().unwrap());
    // The work directory belongs to the user and is private to it.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&work).unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    assert_eq!(meta.mode() & 0o777, 0o700);
}

#[tokio::test]
async fn run_as_is_refused_with_the_slurm_executor_and_for_root() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (
            vec!["--executor", "slurm", "--run-as", "nobody"],
            "local executor",
        ),
        (vec!["--executor", "slurm", "--sandbox"], "local executor"),
        (vec!["--run-as", "root"], "is root"),
        (vec!["--run-as", "no-such-user-here"], "no user"),
    ] {
        let (status, stderr) = run_client_until_exit(&dir.path().join("data"), &args, &[]);
        assert!(!status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn sandbox_is_refused_clearly_without_bwrap() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_client_until_exit(
        &dir.path().join("data"),
        &["--sandbox"],
        &[("PATH", dir.path().to_str().unwrap())],
    );
    assert!(!status.success());
    assert!(stderr.contains("needs bubblewrap"), "{stderr}");
}

#[tokio::test]
async fn limits_stop_fork_bombs_memory_hogs_huge_files_and_cpu_hogs() {
    if skip_unless_root("--run-as with limits") {
        return;
    }
    let client = TestClient::start_for_other_users(&[
        "--run-as",
        "nobody",
        "--limit-processes",
        "32",
        "--limit-memory",
        "268435456",
        "--limit-file-size",
        "1048576",
        "--limit-open-files",
        "64",
        "--limit-cpu",
        "2",
    ]);

    // A fork bomb: forks fail once the user has 32 processes.
    let bomb = "perl -e 'for (1..500) { my $p = fork; \
                if (!defined $p) { print \"fork failed: $!\\n\"; exit 3 } \
                if ($p == 0) { sleep 60; exit 0 } }'\n";
    let record = run_to_end(&client, bomb).await;
    assert_eq!(record["status"], "Failed", "{record}");
    assert_eq!(record["exit_code"], 3, "{record}");
    let id = record["id"].as_u64().unwrap();
    let out = text(&client.retrieve_partial_zip(id).await, ".jobrelay.stdout");
    assert!(out.starts_with("fork failed"), "{out}");

    // Memory: an allocation past the address-space limit fails.
    let record = run_to_end(
        &client,
        "perl -e '$x = \"a\" x (512 * 1024 * 1024); print \"allocated\\n\"'\n",
    )
    .await;
    assert_eq!(record["status"], "Failed", "{record}");
    let id = record["id"].as_u64().unwrap();
    let files = client.retrieve_partial_zip(id).await;
    assert!(!text(&files, ".jobrelay.stdout").contains("allocated"));
    assert!(
        text(&files, ".jobrelay.stderr").contains("Out of memory"),
        "{}",
        text(&files, ".jobrelay.stderr")
    );

    // File size: the writer gets SIGXFSZ (25) at the limit.
    let record = run_to_end(
        &client,
        "head -c 3000000 /dev/zero > big; echo \"status $?\" > st.txt; exit 1\n",
    )
    .await;
    let id = record["id"].as_u64().unwrap();
    let files = client.retrieve_partial_zip(id).await;
    assert_eq!(text(&files, "st.txt"), "status 153\n");
    assert_eq!(files["big"].len(), 1048576);

    // Open files: descriptors past the limit are refused.
    let record = run_to_end(
        &client,
        "for i in $(seq 10 200); do eval \"exec $i</dev/null\" 2>/dev/null || \
         { echo \"refused $i\" > fd.txt; break; }; done\n",
    )
    .await;
    let id = record["id"].as_u64().unwrap();
    assert_eq!(
        text(&client.retrieve_partial_zip(id).await, "fd.txt"),
        "refused 64\n"
    );

    // CPU time: a busy loop is killed by SIGXCPU (24).
    let record = run_to_end(&client, "while :; do :; done\n").await;
    assert_eq!(record["status"], "Failed", "{record}");
    assert_eq!(record["signal"], 24, "{record}");

    still_serving(&client).await;
}

#[tokio::test]
async fn sandbox_gives_no_network_no_writes_outside_and_a_private_tmp() {
    if skip_unless_sandbox("--sandbox") {
        return;
    }
    let client = TestClient::start_for_other_users(&["--sandbox", "--run-as", "nobody"]);
    let port = client.proc.url.rsplit(':').next().unwrap().to_owned();
    let data = client.data_dir();
    let marker = format!("jobrelay-sandbox-{}", std::process::id());
    let script = format!(
        "(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>net.err && echo connected > net.txt\n\
         touch /etc/{marker} 2>etc.err || echo refused > etc.txt\n\
         touch {data}/{marker} 2>data.err || echo refused > data.txt\n\
         ls -A {data} > data-listing.txt\n\
         echo private > /tmp/{marker}; cat /tmp/{marker} > tmp.txt\n\
         grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status | cut -f2 | sort -u > caps.txt\n\
         echo written > out.txt\n",
        data = data.display()
    );
    let record = run_to_end(&client, &script).await;
    assert_eq!(record["status"], "Completed", "{record}");
    let entries = client.retrieve_zip(record["id"].as_u64().unwrap()).await;
    assert!(
        !entries.contains_key("net.txt"),
        "the job reached the network"
    );
    assert_eq!(text(&entries, "etc.txt"), "refused\n");
    assert_eq!(text(&entries, "data.txt"), "refused\n");
    // The client's records and other payloads are hidden: only the way to its own directory.
    assert_eq!(text(&entries, "data-listing.txt"), "work\n");
    assert_eq!(text(&entries, "tmp.txt"), "private\n");
    assert_eq!(
        text(&entries, "caps.txt"),
        "0000000000000000\n",
        "capabilities left"
    );
    assert_eq!(text(&entries, "out.txt"), "written\n");
    assert!(!Path::new(&format!("/etc/{marker}")).exists());
    assert!(!data.join(&marker).exists());
    assert!(!Path::new(&format!("/tmp/{marker}")).exists());

    // Without the sandbox, the same connection works (the test is not vacuous).
    let plain = TestClient::start_for_other_users(&[]);
    let record = run_to_end(
        &plain,
        &format!("(exec 3<>/dev/tcp/127.0.0.1/{port}) && echo connected > net.txt\n"),
    )
    .await;
    let entries = plain.retrieve_zip(record["id"].as_u64().unwrap()).await;
    assert_eq!(text(&entries, "net.txt"), "connected\n");
}

#[tokio::test]
async fn kill_reaches_every_process_in_the_sandbox() {
    if skip_unless_sandbox("--sandbox") {
        return;
    }
    let client = TestClient::start_for_other_users(&[
        "--sandbox",
        "--run-as",
        "nobody",
        "--kill-grace",
        "2",
    ]);
    let id = client
        .submit_script("sleep 300 & echo $! > bg.pid\nsleep 300\n")
        .await;
    client.wait_for(id, "Running").await;
    let pid_file = client.data_dir().join(format!("work/{id}/bg.pid"));
    let background = read_pid(&pid_file).await;
    assert!(pid_alive(background));
    let killed = client.kill(id).await;
    assert_eq!(killed.status(), 200);
    eventually(
        Duration::from_secs(30),
        "the background sleep to die",
        || async { (!pid_alive(background)).then_some(()) },
    )
    .await;
    still_serving(&client).await;
}

/// A stress test through the real client: the race it aims at is narrow, so it may pass by
/// luck against a weak archive; `archive::tests::entries_swapped_for_links_after_listing_stay_out`
/// swaps between listing and writing deterministically.
#[tokio::test]
async fn a_job_swapping_a_directory_for_a_link_cannot_lead_the_zip_out() {
    let client = TestClient::start_for_other_users(&[]);
    let outside = tempfile::tempdir().unwrap();
    let secret = "TOP-SECRET-CONTENT";
    std::fs::create_dir(outside.path().join("sub")).unwrap();
    std::fs::write(outside.path().join("sub/file"), secret).unwrap();
    std::fs::write(outside.path().join("file"), secret).unwrap();
    std::fs::write(outside.path().join("sub/outside-only-name"), secret).unwrap();
    // The job keeps swapping its own `sub/file` (and `sub`) for links to the secret.
    let script = format!(
        "mkdir -p real; echo harmless > real/file; echo harmless > file0\n\
         end=$((SECONDS + 20))\n\
         while [ $SECONDS -lt $end ]; do\n\
           rm -rf sub; cp -r real sub; rm -rf sub; ln -s {out}/sub sub\n\
           rm -f file; echo harmless > file; rm -f file; ln -s {out}/file file\n\
         done\n",
        out = outside.path().display()
    );
    let id = client.submit_script(&script).await;
    client.wait_for(id, "Running").await;
    let mut archives = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        // An archive cut by an error mid-way (an entry vanished) is not a leak.
        let Ok(response) = client
            .http
            .get(client.url(&format!("/retrieve_partial/{id}")))
            .send()
            .await
        else {
            continue;
        };
        let Ok(bytes) = response.bytes().await else {
            continue;
        };
        // An archive cut by an error mid-way is not a leak; a whole one must hold no secret.
        if let Ok(mut zip) = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())) {
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).unwrap();
                let name = entry.name().unwrap().to_string();
                assert!(
                    !name.contains("outside-only-name"),
                    "listed outside: {name}"
                );
                let mut content = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
                assert!(
                    !String::from_utf8_lossy(&content).contains(secret),
                    "{:?} leaked the secret",
                    entry.name()
                );
            }
            archives += 1;
        }
    }
    assert!(archives > 0);
    let _ = client
        .http
        .post(client.url(&format!("/kill/{id}")))
        .send()
        .await;
}

#[tokio::test]
async fn a_hard_link_to_a_file_the_job_cannot_read_stays_out_of_the_zip() {
    if skip_unless_root("--run-as") {
        return;
    }
    let client = TestClient::start_for_other_users(&["--run-as", "nobody"]);
    // A root-only secret on the same file system as the work directory.
    let secret = client.dir.path().join("secret");
    std::fs::write(&secret, "ROOT-ONLY").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The job itself cannot link it (protected_hardlinks) ...
    let script = format!(
        "ln {} leak 2>ln.err || echo refused > ln.txt\n\
         while [ ! -e go ]; do sleep 0.05; done\n",
        secret.display()
    );
    let id = client.submit_script(&script).await;
    client.wait_for(id, "Running").await;
    // ... and a link that gets there anyway (protected_hardlinks off, say) is left out.
    let work = client.data_dir().join(format!("work/{id}"));
    eventually(Duration::from_secs(30), "the job to try ln", || async {
        work.join("ln.txt")
            .exists()
            .then_some(())
            .or_else(|| work.join("leak").exists().then_some(()))
    })
    .await;
    std::fs::hard_link(&secret, work.join("planted")).unwrap();
    std::fs::write(work.join("go"), "").unwrap();
    let entries = client.retrieve_zip(id).await;
    let protected =
        std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|v| v.trim() == "1");
    if protected {
        assert_eq!(text(&entries, "ln.txt"), "refused\n");
    }
    assert!(!entries.contains_key("leak"));
    assert!(!entries.contains_key("planted"));
    assert!(entries.values().all(|c| c != b"ROOT-ONLY"));
}

#[tokio::test]
async fn sandbox_without_run_as_still_confines_a_root_job() {
    if skip_unless_sandbox("--sandbox") {
        return;
    }
    let client = TestClient::start_for_other_users(&["--sandbox"]);
    let port = client.proc.url.rsplit(':').next().unwrap().to_owned();
    let marker = format!("jobrelay-sandbox-root-{}", std::process::id());
    let script = format!(
        "id -u > uid.txt\n\
         (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo connected > net.txt\n\
         touch /etc/{marker} 2>/dev/null || echo refused > etc.txt\n\
         mount -t tmpfs none /etc 2>/dev/null && echo mounted > mount.txt\n\
         grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status | cut -f2 | sort -u > caps.txt\n\
         echo done > out.txt\n"
    );
    let record = run_to_end(&client, &script).await;
    assert_eq!(record["status"], "Completed", "{record}");
    let entries = client.retrieve_zip(record["id"].as_u64().unwrap()).await;
    assert_eq!(text(&entries, "uid.txt"), "0\n");
    assert!(!entries.contains_key("net.txt"));
    assert!(
        !entries.contains_key("mount.txt"),
        "root kept its capabilities"
    );
    assert_eq!(text(&entries, "caps.txt"), "0000000000000000\n");
    assert_eq!(text(&entries, "etc.txt"), "refused\n");
    assert!(!Path::new(&format!("/etc/{marker}")).exists());
}
