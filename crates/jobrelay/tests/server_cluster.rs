//! Several servers on one PostgreSQL database and one data directory (issue 14), as real
//! processes: uploads spread over all of them, the leader `kill -9`ed (and a standby) during
//! a run, a leader stopped past its lease and woken (its late writes refused), PostgreSQL
//! itself stopped and started again. Every job finishes exactly once (each run appends its
//! name to a run log), no result is lost, `runs_per_user` is never exceeded (each run holds a
//! marker file while it runs, sampled). Needs `JOBRELAY_TEST_POSTGRES`; without it every test
//! says so and passes. Failover times are printed (`--nocapture`), never asserted.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::runlog::count_lines;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(240);
/// `--leader-timeout` of the tests' servers, in seconds: 1.5, or `JOBRELAY_TEST_LEADER_TIMEOUT`
/// (to see the failover times of another timeout, the default 5 say).
fn leader_timeout() -> String {
    std::env::var("JOBRELAY_TEST_LEADER_TIMEOUT").unwrap_or_else(|_| "1.5".into())
}

use support::db::{postgres_url as test_server_url, Schema};

/// The job of the tests: logs its run, holds a marker of its user's active runs while it
/// sleeps, then writes its name as its result.
fn script(root: &Path, name: &str, user: i64, seconds: f64) -> String {
    let (log, active) = (root.join("runs.log"), root.join("active"));
    format!(
        "echo {name} >> {log}\nmkdir -p {active}/u{user}\ntouch {active}/u{user}/{name}.$$\n\
         sleep {seconds}\nrm -f {active}/u{user}/{name}.$$\necho {name} > out.txt\n",
        log = log.display(),
        active = active.display()
    )
}

/// Samples the runs each user has going (their marker files) until stopped; the highest.
struct QuotaSampler {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    task: std::thread::JoinHandle<()>,
}

impl QuotaSampler {
    fn start(active: PathBuf) -> QuotaSampler {
        let (stop, most) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, m) = (stop.clone(), most.clone());
        let task = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for user in std::fs::read_dir(&active).into_iter().flatten().flatten() {
                    let running = std::fs::read_dir(user.path()).map_or(0, |d| d.count());
                    m.fetch_max(running, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        QuotaSampler { stop, most, task }
    }

    fn most(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.join();
        self.most.load(Ordering::SeqCst)
    }
}

/// Servers on one database and one data directory (`root/server`).
struct Servers {
    root: PathBuf,
    servers: Vec<TestServer>,
}

impl Servers {
    fn start(root: &Path, config: &Path, db: &str, n: usize) -> Servers {
        let servers = (0..n)
            .map(|_| {
                TestServer::start(
                    root,
                    config,
                    &["--db", db, "--leader-timeout", &leader_timeout()],
                )
            })
            .collect();
        Servers {
            root: root.to_owned(),
            servers,
        }
    }

    /// The role fields of server `i`'s `/health`, `None` when it does not answer.
    async fn health(&self, http: &reqwest::Client, i: usize) -> Option<serde_json::Value> {
        let response = http
            .get(format!("{}/health", self.servers[i].url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// Waits until one of the servers in `among` leads with an epoch above `after`: its
    /// index and epoch.
    async fn leader(&self, http: &reqwest::Client, among: &[usize], after: i64) -> (usize, i64) {
        eventually(LONG, "a leader", || async {
            // The highest epoch wins: a deposed leader may not have noticed yet.
            let mut best = None;
            for &i in among {
                if let Some(h) = self.health(http, i).await {
                    let epoch = h["lease_epoch"].as_i64().unwrap_or(0);
                    if h["role"] == "leader" && epoch > after && best.is_none_or(|(_, e)| epoch > e)
                    {
                        best = Some((i, epoch));
                    }
                }
            }
            best
        })
        .await
    }

    fn all(&self) -> Vec<usize> {
        (0..self.servers.len()).collect()
    }
}

/// Uploads `n` jobs of `users` users, spread over the servers in `to`, named `prefix<k>`.
async fn upload_spread(
    http: &reqwest::Client,
    servers: &Servers,
    to: &[usize],
    prefix: &str,
    n: usize,
    users: i64,
    seconds: f64,
) -> Vec<(i64, String)> {
    let mut jobs = Vec::new();
    for k in 0..n {
        let name = format!("{prefix}{k}");
        let user = 1 + (k as i64 % users);
        let server = &servers.servers[to[k % to.len()]].url;
        let text = script(&servers.root, &name, user, seconds);
        let id = upload_job(
            http,
            server,
            user,
            "example",
            &[("run.sh", text.as_bytes())],
        )
        .await;
        jobs.push((id, name));
    }
    jobs
}

/// Every job Completed with its own result, read through `server`; each ran exactly once.
async fn all_done_once(http: &reqwest::Client, server: &str, root: &Path, jobs: &[(i64, String)]) {
    for (id, name) in jobs {
        wait_status(http, server, *id, &["Completed"], LONG).await;
        let entries = unzip(&download_zip(http, server, *id).await);
        assert_eq!(
            entries["out.txt"],
            format!("{name}\n").as_bytes(),
            "job {id}"
        );
    }
    let counts: BTreeMap<String, usize> = count_lines(&root.join("runs.log"));
    for (id, name) in jobs {
        assert_eq!(
            counts.get(name),
            Some(&1),
            "job {id} ({name}) ran once: {counts:?}"
        );
    }
}

/// The run: `servers` servers, `n` jobs of `users` users uploaded over all of them, the
/// leader killed `leader_kills` times (a standby once) while they run, more uploaded to the
/// survivors during each failover. Prints the failover time of each kill.
async fn kill_leaders_during_a_run(
    servers: usize,
    n: usize,
    users: i64,
    leader_kills: usize,
    seconds: f64,
) {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--slots", "8"]);
    let runs_per_user = 2;
    let config = write_server_config(
        root,
        &[("example", vec![client.url.clone()], runs_per_user, 8)],
    );
    let mut cluster = Servers::start(root, &config, &schema.url, servers);
    let http = http();
    let sampler = QuotaSampler::start(root.join("active"));
    let (mut leader, mut epoch) = cluster.leader(&http, &cluster.all(), 0).await;
    let batch = n / (leader_kills + 2);
    let mut jobs = upload_spread(&http, &cluster, &cluster.all(), "a", batch, users, seconds).await;
    let mut failovers = Vec::new();
    let runs = || count_lines(&root.join("runs.log")).len();
    for kill in 0..=leader_kills {
        // Once more jobs got going, kill the leader (or, the last time, a standby).
        let before = runs();
        eventually(LONG, "jobs running", || async {
            (runs() >= before + 2).then_some(())
        })
        .await;
        let now = cluster.leader(&http, &cluster.all(), 0).await;
        if now != (leader, epoch) {
            println!(
                "the lease changed hands without a kill: {:?} -> {now:?}",
                (leader, epoch)
            );
            (leader, epoch) = now;
        }
        let victim = if kill == leader_kills {
            (leader + 1) % servers
        } else {
            leader
        };
        let killed_at = Instant::now();
        cluster.servers[victim].kill9();
        let survivors: Vec<usize> = cluster.all().into_iter().filter(|i| *i != victim).collect();
        // Uploads go on to the others meanwhile, leader or not.
        let prefix = format!("k{kill}-");
        let uploading = upload_spread(&http, &cluster, &survivors, &prefix, batch, users, seconds);
        // The failover is timed while the uploads go on.
        let failing_over = async {
            if victim != leader {
                return None;
            }
            let found = cluster.leader(&http, &survivors, epoch).await;
            Some((found, killed_at.elapsed()))
        };
        let (more, failed_over) = tokio::join!(uploading, failing_over);
        jobs.extend(more);
        match failed_over {
            Some((found, took)) => {
                (leader, epoch) = found;
                println!(
                    "failover after kill -9 of the leader #{}: {:.2} s",
                    kill + 1,
                    took.as_secs_f64()
                );
                failovers.push(took);
            }
            None => println!("killed a standby (server {victim}); leader unchanged"),
        }
        cluster.servers[victim].restart();
    }
    // A long-poll on a standby wakes when the job finishes there (LISTEN/NOTIFY).
    let standby = (leader + 1) % servers;
    let (last, _) = jobs.last().unwrap().clone();
    let waited: serde_json::Value = eventually(
        LONG,
        "the last job through a standby's long-poll",
        || async {
            let job: serde_json::Value = http
                .get(format!(
                    "{}/jobs/{last}?wait=30",
                    cluster.servers[standby].url
                ))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (job["status"] == "Completed").then_some(job)
        },
    )
    .await;
    assert_eq!(waited["id"], last);
    all_done_once(&http, &cluster.servers[standby].url, root, &jobs).await;
    let most = sampler.most();
    assert!(
        most <= runs_per_user,
        "a user had {most} runs at once (quota {runs_per_user})"
    );
    println!(
        "{} jobs, {users} users, {servers} servers: failovers {:?}",
        jobs.len(),
        failovers
            .iter()
            .map(|d| format!("{:.2}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    drop(cluster);
    drop(client);
    drop(schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_lose_no_job_when_the_leader_is_killed() {
    kill_leaders_during_a_run(2, 24, 3, 1, 0.3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_lose_no_job_when_leaders_and_a_standby_are_killed() {
    kill_leaders_during_a_run(3, 40, 4, 2, 0.3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 500 jobs of 10 users, three leaders killed; .ci/run runs it"]
async fn five_hundred_jobs_of_ten_users_survive_three_leader_kills() {
    kill_leaders_during_a_run(3, 500, 10, 3, 0.2).await;
}

/// A leader stopped (SIGSTOP) past its lease: a standby takes over and finishes the jobs;
/// woken (SIGCONT), the old leader's late writes are refused, it stands by, no job ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_past_its_lease_changes_nothing_when_it_wakes() {
    let Some(schema) = Schema::new().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--slots", "4"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 4, 4)]);
    let cluster = Servers::start(root, &config, &schema.url, 2);
    let http = http();
    let (leader, epoch) = cluster.leader(&http, &cluster.all(), 0).await;
    let other = 1 - leader;
    let jobs = upload_spread(&http, &cluster, &cluster.all(), "s", 12, 3, 1.0).await;
    eventually(LONG, "jobs running", || async {
        (!count_lines(&root.join("runs.log")).is_empty()).then_some(())
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(cluster.servers[leader].pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped_at = Instant::now();
    let (new_leader, new_epoch) = cluster.leader(&http, &[other], epoch).await;
    assert_eq!(new_leader, other);
    println!(
        "failover after SIGSTOP of the leader: {:.2} s",
        stopped_at.elapsed().as_secs_f64()
    );
    // Jobs finish under the new leader while the old one sleeps.
    wait_status(
        &http,
        &cluster.servers[other].url,
        jobs[0].0,
        &["Completed"],
        LONG,
    )
    .await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    eventually(LONG, "the woken leader standing by", || async {
        let h = cluster.health(&http, leader).await?;
        (h["role"] == "standby" && h["leader"] == cluster.health(&http, other).await?["server"])
            .then_some(())
    })
    .await;
    assert!(
        cluster.servers[leader].log().contains("lost the lease"),
        "{}",
        cluster.servers[leader].log()
    );
    all_done_once(&http, &cluster.servers[leader].url, root, &jobs).await;
    // The new leader kept the lease throughout.
    let h = cluster.health(&http, other).await.unwrap();
    assert_eq!(h["role"], "leader");
    assert_eq!(h["lease_epoch"], new_epoch);
    // A terminate asked of the standby reaches the leader: the running job is Killed.
    let long = upload_spread(&http, &cluster, &[leader], "long", 1, 1, 300.0).await[0].0;
    wait_status(&http, &cluster.servers[other].url, long, &["Running"], LONG).await;
    let answer = http
        .post(format!("{}/terminate/{long}", cluster.servers[leader].url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let killed: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(killed["status"], "Killed", "{killed}");
    // The dashboard's overview lists both servers, the leader first; /metrics says who leads.
    let overview: serde_json::Value = http
        .get(format!("{}/overview", cluster.servers[leader].url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let servers = overview["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{overview}");
    assert_eq!(servers[0]["role"], "leader", "{overview}");
    assert_eq!(servers[0]["name"], h["server"], "{overview}");
    assert_eq!(servers[1]["this"], true, "{overview}");
    let metrics = http
        .get(format!("{}/metrics", cluster.servers[other].url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let leading = format!("jobrelay_server_leader{{server={}}} 1", h["server"]);
    assert!(metrics.contains(&leading), "{metrics}");
    assert!(
        metrics.contains(&format!("jobrelay_server_lease_epoch {new_epoch}")),
        "{metrics}"
    );
    drop(cluster);
    drop(client);
    drop(schema);
}

/// A PostgreSQL server of this test's own (`../shared/postgres`), stopped and started.
struct OwnPostgres {
    dir: PathBuf,
    scripts: PathBuf,
    url: String,
}

impl OwnPostgres {
    fn start() -> Option<OwnPostgres> {
        // The team's shared/ beside the repository (as .ci/run has it), or where
        // JOBRELAY_SHARED says (a worktree elsewhere).
        let shared = std::env::var_os("JOBRELAY_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
        let scripts = shared.join("postgres");
        if !scripts.join("start-postgres.sh").is_file() || !support::host::is_root() {
            println!("skipped: no ../shared/postgres/start-postgres.sh, or not root");
            return None;
        }
        let port = support::net::free_port();
        let dir = std::env::temp_dir().join(format!("jobrelay-pg-{port}"));
        let out = std::process::Command::new("bash")
            .arg(scripts.join("start-postgres.sh"))
            .env("PG_PORT", port.to_string())
            .env("PG_DIR", &dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Some(OwnPostgres { dir, scripts, url })
    }

    fn pg_ctl(&self, action: &str) {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .flatten()
            .map(|e| e.path().join("bin"))
            .max()
            .unwrap();
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "-l"])
            .arg(self.dir.join("server.log"))
            .arg(action)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {action}");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(self.scripts.join("stop-postgres.sh"))
            .env("PG_DIR", &self.dir)
            .env("PG_WIPE", "1")
            .status();
    }
}

/// PostgreSQL stopped mid-run and started again: uploads meanwhile answer 503 with a JSON
/// error (never hang), the servers reconnect, a leader leads again, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_ride_out_a_restart_of_postgres() {
    if test_server_url().is_none() {
        return;
    }
    let Some(pg) = OwnPostgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let client = start_client(root, "client", &["--slots", "4"]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 4, 4)]);
    let cluster = Servers::start(root, &config, &pg.url, 2);
    let http = http();
    let (_, epoch) = cluster.leader(&http, &cluster.all(), 0).await;
    let mut jobs = upload_spread(&http, &cluster, &cluster.all(), "p", 8, 2, 1.0).await;
    eventually(LONG, "jobs running", || async {
        (!count_lines(&root.join("runs.log")).is_empty()).then_some(())
    })
    .await;
    pg.pg_ctl("stop");
    // Past the lease without the database: nobody leads (the leader could not renew).
    eventually(LONG, "the leader standing down", || async {
        for i in cluster.all() {
            if cluster.health(&http, i).await?["role"] != "standby" {
                return None;
            }
        }
        Some(())
    })
    .await;
    for i in cluster.all() {
        let asked = Instant::now();
        let text = script(root, "refused", 1, 0.1);
        let (status, body) = post_upload(
            &http,
            &cluster.servers[i].url,
            job_form(1, "example", &[("run.sh", text.as_bytes())]),
        )
        .await;
        assert_eq!(status, 503, "upload while PostgreSQL is down: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("unavailable"),
            "{body}"
        );
        println!(
            "upload while PostgreSQL is down: 503 after {:.2} s",
            asked.elapsed().as_secs_f64()
        );
    }
    pg.pg_ctl("start");
    let (_, after) = cluster.leader(&http, &cluster.all(), epoch).await;
    println!("PostgreSQL restarted: epoch {epoch} before, {after} after");
    jobs.extend(upload_spread(&http, &cluster, &cluster.all(), "q", 6, 2, 0.2).await);
    all_done_once(&http, &cluster.servers[1].url, root, &jobs).await;
    let counts = count_lines(&root.join("runs.log"));
    assert_eq!(counts.get("refused"), None, "{counts:?}");
    drop(cluster);
    drop(client);
}

/// A TCP forwarder to the first of `upstreams` that accepts the connection, as a load
/// balancer retrying connection failures does; its address.
async fn first_that_answers(upstreams: Vec<std::net::SocketAddr>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let upstreams = upstreams.clone();
            tokio::spawn(async move {
                for upstream in upstreams {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_client_serves_the_next_leader_after_a_failover() {
    // A client that dials out joins the leader (a standby refuses it with 503, so it asks
    // again until it reaches the leader); the leader is killed while the client runs jobs:
    // the next leader waits for the client to join it, and every job finishes once there.
    let Some(schema) = Schema::new().await else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let token = root.join("join.token");
    std::fs::write(&token, "join-token-for-the-cluster-test").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[services.example]\njoin_token_file = {:?}\nruns_per_user = 4\nmax_runs = 4\n",
            token.display().to_string()
        ),
    )
    .unwrap();
    let mut cluster = Servers::start(root, &config, &schema.url, 2);
    let http = http();
    let (leader, epoch) = cluster.leader(&http, &cluster.all(), 0).await;
    let standby = 1 - leader;

    let refused = http
        .post(format!("{}/join", cluster.servers[standby].url))
        .bearer_auth("join-token-for-the-cluster-test")
        .header("content-type", "application/json")
        .body(r#"{"node":"probe-node","services":["example"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stands by"),
        "{body}"
    );

    let addr = |i: usize| -> std::net::SocketAddr {
        cluster.servers[i]
            .url
            .trim_start_matches("http://")
            .parse()
            .unwrap()
    };
    let front = first_that_answers(vec![addr(leader), addr(standby)]).await;
    let data = root.join("joined-client");
    let _client = Proc::start(
        &[
            "client",
            "--connect",
            &format!("http://{front}"),
            "--service",
            "example",
            "--join-token-file",
            token.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--slots",
            "4",
        ],
        root,
    );
    let jobs = upload_spread(&http, &cluster, &[leader], "j", 6, 2, 2.0).await;
    eventually(LONG, "jobs running on the joined client", || async {
        (count_lines(&root.join("runs.log")).len() >= 2).then_some(())
    })
    .await;
    cluster.servers[leader].kill9();
    let killed_at = Instant::now();
    let (found, _) = cluster.leader(&http, &[standby], epoch).await;
    assert_eq!(found, standby);
    println!("failover with a joined client: {:?}", killed_at.elapsed());
    all_done_once(&http, &cluster.servers[standby].url, root, &jobs).await;
}
