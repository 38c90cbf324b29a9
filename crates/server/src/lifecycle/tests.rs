//! In-process tests of the lifecycle's events and their races (the defects issue 13's review
//! found), as `tako` tests its reactor: a temporary database, the real scheduler, the
//! lifecycle's events and, for terminate, [`crate::stop`] against a fake client; each race
//! made deterministic (waits on the backoff tasks' end; a fake client that lets the other side
//! win inside the window). No dispatcher, collector or probe runs: a test plays their part
//! step by step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Effect, JobTable, Lifecycle};
use crate::clients::ClientHandle;
use crate::config::{ClientEndpoint, ServerConfig, ServiceConfig};
use crate::scheduler::{Scheduler, ServiceId};
use crate::stop::{self, Terminated};
use crate::store::{Change, Job, JobStatus, SqliteDb};
use crate::Shared;

const SERVICE: &str = "example";
const USER: i64 = 7;

struct Fixture {
    shared: Arc<Shared>,
    service: ServiceId,
    _dir: tempfile::TempDir,
}

/// A server of one service on one healthy client at `client_base` (8 slots), nothing running.
fn fixture(client_base: &str, runs_per_user: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = ClientEndpoint::from_base(client_base).unwrap();
    let mut service = ServiceConfig::new(vec![endpoint.clone()]);
    service.runs_per_user = runs_per_user;
    let config = ServerConfig::new(
        dir.path().to_path_buf(),
        [(SERVICE.to_owned(), service.clone())].into(),
    );
    let store = Arc::new(JobTable::new(Box::new(
        SqliteDb::open(&config.data_dir.join("jobrelay.sqlite")).unwrap(),
    )));
    let mut sched = Scheduler::new();
    let client = sched.add_client();
    sched.set_client(client, true, Some(8), 0.0);
    let sid = sched.add_service(service.runs_per_user, service.max_runs, vec![client]);
    let http = crate::gateway::http_for(&endpoint, None).unwrap();
    let handle = Arc::new(ClientHandle::new(client, endpoint.clone(), http));
    let (jobs_dir, results_dir, staging_dir) = (
        dir.path().join("jobs"),
        dir.path().join("results"),
        dir.path().join("staging"),
    );
    for d in [&jobs_dir, &results_dir, &staging_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let service_ids: HashMap<String, _> = [(SERVICE.to_owned(), sid)].into();
    let lifecycle = Lifecycle::new(
        store.clone(),
        sched,
        service_ids.clone(),
        config.max_attempts,
    );
    let shared = Arc::new(Shared {
        config,
        store,
        lifecycle,
        clients: crate::clients::Pool::new(vec![handle]),
        service_ids,
        loops: crate::supervise::Loops::default(),
        check_requests: crate::shared::CheckRequests::default(),
        job_tasks: crate::shared::JobTasks::default(),
        in_flight: Mutex::new(HashMap::new()),
        checks: tokio::sync::Semaphore::new(4),
        jobs_dir,
        results_dir,
        staging_dir,
        role: crate::shared::Role::alone(),
    });
    Fixture {
        shared,
        service: sid,
        _dir: dir,
    }
}

impl Fixture {
    fn lifecycle(&self) -> &Lifecycle {
        &self.shared.lifecycle
    }

    /// What `/upload` does: a Queued job in the database and in its user's queue.
    fn upload(&self) -> Job {
        self.lifecycle()
            .uploaded(USER, SERVICE, None, &Default::default(), &[], |_| Ok(()))
            .unwrap()
    }

    /// What the dispatcher does up to its send: the scheduler's decisions, each committed
    /// Processing with one more attempt. Returns the jobs it sends.
    fn dispatch(&self) -> Vec<Job> {
        let base = self.shared.clients.get(0).unwrap().base().to_owned();
        self.lifecycle()
            .decide()
            .into_iter()
            .map(|d| {
                let job = self
                    .lifecycle()
                    .sending(&d, &base)
                    .expect("a decided job is Queued");
                assert_eq!(job.status, JobStatus::Processing);
                job
            })
            .collect()
    }

    /// The client accepted the job as payload `dest`: Submitted, and one check asked for.
    fn submitted(&self, job: &Job, dest: i64) -> Job {
        let effects = self
            .lifecycle()
            .submitted(job, dest, None)
            .expect("recorded");
        let now = self.get(job.id);
        assert_eq!(now.status, JobStatus::Submitted);
        assert_eq!(effects, [Effect::Check(Box::new(now.clone()))]);
        now
    }

    fn get(&self, id: i64) -> Job {
        self.shared.store.get(id).unwrap().unwrap()
    }

    fn is_active(&self, id: i64) -> bool {
        self.lifecycle().scheduler().is_active(id)
    }

    fn queued(&self) -> usize {
        self.lifecycle().scheduler().queued(self.service)
    }

    /// A check of `id`'s run failed (the collector's record).
    fn failing_checks(&self, id: i64) {
        self.lifecycle().check_failed(id, false);
    }

    fn checks_failing(&self, id: i64) -> bool {
        crate::lock(&self.lifecycle().failing_checks).contains_key(&id)
    }
}

/// Defect 1: a check of the job's first run kept failing and gives up (`Lifecycle::failed` from
/// Submitted/Running) after the run was lost and the job sent again. The failure finds the
/// job Processing and changes nothing; it must not free the new run's quota either, or the
/// user runs two jobs under `runs_per_user = 1`.
#[test]
fn a_late_failure_of_an_old_run_keeps_the_new_runs_quota() {
    let f = fixture("http://127.0.0.1:9", 1);
    let a = f.upload();
    let b = f.upload();
    let sent = f.dispatch();
    assert_eq!(sent.iter().map(|j| j.id).collect::<Vec<_>>(), [a.id]);
    let first_run = f.submitted(&sent[0], 1);
    assert_eq!(
        f.lifecycle()
            .run_lost(&first_run, "the client restarted while the job ran"),
        []
    );
    let again = f.dispatch();
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), [a.id]);

    assert!(!f.lifecycle().failed(
        &first_run,
        &JobStatus::ON_CLIENT,
        "its results could not be fetched".into(),
    ));
    assert_eq!(f.get(a.id).status, JobStatus::Processing);
    assert!(f.is_active(a.id), "the new run lost its quota slot");
    assert!(
        f.dispatch().is_empty(),
        "job {} of the same user went while job {} runs, past runs_per_user = 1",
        b.id,
        a.id
    );
    assert_eq!(f.get(b.id).status, JobStatus::Queued);
}

/// Defect 1, in `requeue`'s give-up branch: a lost run noticed late by a reader that saw the
/// job at its last attempt fails nothing (the job is in a new run) and frees nothing.
#[test]
fn a_late_give_up_of_an_old_run_keeps_the_new_runs_quota() {
    let f = fixture("http://127.0.0.1:9", 1);
    let a = f.upload();
    f.upload();
    let sent = f.dispatch();
    let mut stale = f.submitted(&sent[0], 1);
    f.lifecycle().run_lost(&stale, "lost");
    assert_eq!(f.dispatch().len(), 1);
    // As if read when every attempt was used up: requeue gives up, from Submitted/Running.
    stale.attempts = f.shared.config.max_attempts;
    f.lifecycle().run_lost(&stale, "lost again");
    assert_eq!(f.get(a.id).status, JobStatus::Processing);
    assert!(f.is_active(a.id), "the new run lost its quota slot");
    assert!(f.dispatch().is_empty(), "the user ran past runs_per_user");
}

/// Defect 2: a job whose send failed is queued again after a backoff; terminated inside that
/// window it is Killed, and must not come back into the scheduler when the backoff ends. A
/// job requeued beside it, not terminated, does come back.
#[tokio::test]
async fn a_job_terminated_during_its_requeue_backoff_stays_out_of_the_queue() {
    let f = fixture("http://127.0.0.1:9", 2);
    let a = f.upload();
    let b = f.upload();
    let sent = f.dispatch();
    assert_eq!(sent.len(), 2);
    // Each backoff task holds the server's state until it is done.
    let idle = Arc::strong_count(&f.shared);
    for job in &sent {
        let effects = f
            .lifecycle()
            .send_failed(job, "could not send", Duration::from_millis(200));
        assert_eq!(
            effects,
            [Effect::OfferAgain {
                id: job.id,
                after: Duration::from_millis(200)
            }]
        );
        crate::effects::perform(&f.shared, effects).await;
    }
    assert_eq!(f.get(a.id).status, JobStatus::Queued);
    assert_eq!(f.queued(), 0, "offered again before its backoff");
    assert!(!f.is_active(a.id));

    match stop::terminate(&f.shared, a.id).await.unwrap() {
        Terminated::Done(job) => assert_eq!(job.status, JobStatus::Killed),
        _ => panic!("a Queued job is terminated"),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Arc::strong_count(&f.shared) > idle {
        assert!(Instant::now() < deadline, "the backoff tasks never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    assert_eq!(f.get(a.id).status, JobStatus::Killed);
    assert_eq!(f.queued(), 1, "only the job not terminated is queued again");
    let again = f.dispatch();
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), [b.id]);
    assert!(!f.is_active(a.id), "the Killed job took a dispatch turn");
}

/// Defect 3: the collector's record of a run's failing checks ("failing since") goes with
/// the run: when the job is queued again (at once or after a backoff), terminated on its
/// client, or failed. Kept, it would fail the next run at its first hiccup, and the map would
/// grow with every job requeued or terminated.
#[tokio::test]
async fn failing_checks_are_forgotten_when_the_run_ends() {
    let f = fixture("http://127.0.0.1:9", 8);
    let uploaded: Vec<Job> = (0..4).map(|_| f.upload()).collect();
    let mut sent = f.dispatch();
    assert_eq!(sent.len(), uploaded.len());
    // One stays Processing (a send that fails), the others are on the client.
    let sending = sent.remove(1);
    let runs: Vec<Job> = sent
        .iter()
        .enumerate()
        .map(|(i, job)| f.submitted(job, i as i64 + 1))
        .collect();
    for job in runs.iter().chain([&sending]) {
        f.failing_checks(job.id);
    }

    f.lifecycle().run_lost(&runs[0], "lost");
    assert!(!f.checks_failing(runs[0].id), "requeued at once");

    f.lifecycle()
        .send_failed(&sending, "could not send", Duration::from_secs(1));
    assert!(!f.checks_failing(sending.id), "requeued after a backoff");
    let runs = [runs[0].clone(), sending, runs[1].clone(), runs[2].clone()];

    // Its client is no longer configured: terminated without a request.
    f.shared
        .store
        .transition(
            runs[2].id,
            &JobStatus::ON_CLIENT,
            JobStatus::Running,
            Change {
                client: Some(Some("http://127.0.0.1:1".into())),
                ..Default::default()
            },
        )
        .unwrap()
        .unwrap();
    assert!(matches!(
        stop::terminate(&f.shared, runs[2].id).await.unwrap(),
        Terminated::Done(_)
    ));
    assert!(!f.checks_failing(runs[2].id), "terminated");

    f.lifecycle()
        .failed(&runs[3], &JobStatus::ON_CLIENT, "failed".into());
    assert!(!f.checks_failing(runs[3].id), "failed");
    assert!(crate::lock(&f.lifecycle().failing_checks).is_empty());
}

/// A whole archive holding one file.
fn zip_of(name: &str, content: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file(name, zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(content).unwrap();
    zip.finish().unwrap().into_inner()
}

/// Serves, on `listener`, a client on which payload 1 is Running, `/kill` succeeds, and
/// `/retrieve_partial` answers `partial` after calling `meanwhile` (what happens on the
/// server while the partial ZIP is fetched).
fn fake_client(
    listener: tokio::net::TcpListener,
    partial: Vec<u8>,
    meanwhile: impl Fn() + Clone + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    use axum::routing::{get, post};
    let router = axum::Router::new()
        .route(
            "/retrieve/{dest}",
            get(|| async {
                axum::Json(serde_json::json!({"id": 1, "status": "Running", "loc": "/w/1"}))
            }),
        )
        .route("/kill/{dest}", post(|| async { "{}" }))
        .route(
            "/retrieve_partial/{dest}",
            get(move || async move {
                meanwhile();
                ([("content-type", "application/zip")], partial)
            }),
        );
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    })
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Defect 5: `/terminate` of a Running job while its completion lands. The client kills the
/// payload, and while the server fetches the partial ZIP the collector stores the whole
/// result and commits Completed (played here by the fake client's `/retrieve_partial`, at
/// that exact moment). Terminate's Killed then fails to commit: the Completed job keeps its
/// whole ZIP, not the partial one, and nothing staged is left behind.
#[tokio::test]
async fn a_completion_racing_terminate_keeps_its_whole_zip() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let f = fixture(&format!("http://{}", listener.local_addr().unwrap()), 1);
    let job = f.upload();
    let sent = f.dispatch();
    let run = f.submitted(&sent[0], 1);
    let whole = zip_of("out.txt", b"the whole result");
    let partial = zip_of("out.txt", b"half");

    let (shared, id, whole_zip) = (f.shared.clone(), job.id, whole.clone());
    let server = fake_client(listener, partial, move || {
        // The collector's `results::complete`, in its order: results, then Completed.
        std::fs::write(shared.result_path(id), &whole_zip).unwrap();
        shared
            .store
            .transition(
                id,
                &JobStatus::ON_CLIENT,
                JobStatus::Completed,
                Change::message("Job completed"),
            )
            .unwrap()
            .expect("the job is on its client");
    });

    let outcome = stop::terminate(&f.shared, run.id).await.unwrap();
    server.abort();
    match outcome {
        Terminated::AlreadyFinished(job) => assert_eq!(job.status, JobStatus::Completed),
        Terminated::Done(job) => panic!("terminate won against a committed completion: {job:?}"),
        Terminated::NotFound => panic!("the job vanished"),
        Terminated::Requested(_) => panic!("the leader passed the request on"),
    }
    assert_eq!(f.get(job.id).status, JobStatus::Completed);
    assert!(
        std::fs::read(f.shared.result_path(job.id)).unwrap() == whole,
        "the Completed job holds the partial ZIP"
    );
    assert_eq!(
        files_in(&f.shared.results_dir),
        [format!("{}.zip", job.id)],
        "staged files left behind"
    );
}

/// The same race with a small result, kept in the database by the commit of Completed: the
/// terminate's partial ZIP neither replaces it nor stays behind as a file.
#[tokio::test]
async fn a_completion_kept_in_the_database_racing_terminate_keeps_its_whole_zip() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let f = fixture(&format!("http://{}", listener.local_addr().unwrap()), 1);
    let job = f.upload();
    let run = f.submitted(&f.dispatch()[0], 1);
    let whole = zip_of("out.txt", b"the whole result");
    let (shared, id, whole_zip) = (f.shared.clone(), job.id, whole.clone());
    let server = fake_client(listener, zip_of("out.txt", b"half"), move || {
        shared
            .store
            .transition(
                id,
                &JobStatus::ON_CLIENT,
                JobStatus::Completed,
                Change {
                    result_zip: Some(crate::store::ResultZip(whole_zip.clone().into())),
                    ..Change::message("Job completed")
                },
            )
            .unwrap()
            .expect("the job is on its client");
    });
    let outcome = stop::terminate(&f.shared, run.id).await.unwrap();
    server.abort();
    assert!(
        matches!(outcome, Terminated::AlreadyFinished(ref job) if job.status == JobStatus::Completed),
        "terminate won against a committed completion"
    );
    assert_eq!(
        f.shared.store.result_zip(job.id).unwrap().as_deref(),
        Some(&whole[..])
    );
    assert!(
        files_in(&f.shared.results_dir).is_empty(),
        "the partial ZIP was left as a file"
    );
}

/// The other side of defect 5's fix: a terminate that wins holds its partial ZIP, stored
/// before Killed is committed when no result is there, and put over a result found there
/// (one a lost run left) once Killed is committed.
#[tokio::test]
async fn a_terminated_job_holds_its_partial_zip() {
    for stale in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = fixture(&format!("http://{}", listener.local_addr().unwrap()), 1);
        let job = f.upload();
        let run = f.submitted(&f.dispatch()[0], 1);
        let partial = zip_of("out.txt", b"half");
        let result = f.shared.result_path(job.id);
        if stale {
            std::fs::write(&result, zip_of("out.txt", b"an old run's")).unwrap();
        }
        let (shared, id) = (f.shared.clone(), job.id);
        let server = fake_client(listener, partial.clone(), move || {
            let now = shared.store.get(id).unwrap().unwrap().status;
            assert!(JobStatus::ON_CLIENT.contains(&now), "{now}");
        });
        let outcome = stop::terminate(&f.shared, run.id).await.unwrap();
        server.abort();
        match outcome {
            Terminated::Done(job) => assert_eq!(job.status, JobStatus::Killed),
            _ => panic!("terminate lost without a race"),
        }
        assert!(
            std::fs::read(&result).unwrap() == partial,
            "stale {stale}: the Killed job does not hold its partial ZIP"
        );
        assert_eq!(files_in(&f.shared.results_dir), [format!("{}.zip", job.id)]);
    }
}

/// A word about a run reaches the lifecycle after the job moved into its next run, on the
/// same client states: the collector's give-up on the old run's failing checks (it holds the
/// job as it was), a late end or loss of the old payload. Guarded by status alone, each would
/// move the new run (Submitted, like the old one); guarded by the run's key, none does.
#[test]
fn a_late_word_about_an_old_run_never_moves_the_next_run() {
    let f = fixture("http://127.0.0.1:9", 1);
    let a = f.upload();
    let old_run = f.submitted(&f.dispatch()[0], 1);
    f.lifecycle().run_lost(&old_run, "the client restarted");
    let new_run = f.submitted(&f.dispatch()[0], 2);
    assert_eq!(new_run.status, old_run.status, "both runs on the client");
    assert_ne!(new_run.dispatch_key, old_run.dispatch_key);

    assert!(!f.lifecycle().failed(
        &old_run,
        &JobStatus::ON_CLIENT,
        "its results could not be fetched for 60s".into(),
    ));
    assert_eq!(
        f.lifecycle()
            .ended_on_client(&old_run, JobStatus::Failed, Some(3), None, None),
        []
    );
    assert_eq!(f.lifecycle().completed(&old_run, None), []);
    assert_eq!(f.lifecycle().run_lost(&old_run, "lost again"), []);
    f.lifecycle().running(&old_run);
    // A terminate carried to the old run's client commits nothing on the new run: the caller
    // reads the job again and stops the run it is in now.
    assert!(f
        .lifecycle()
        .terminated(&old_run, &JobStatus::ON_CLIENT, "terminated".into(), false)
        .unwrap()
        .is_none());

    let now = f.get(a.id);
    assert_eq!(now.status, JobStatus::Submitted, "{now:?}");
    assert_eq!(now.dest_id, Some(2));
    assert_eq!(now.attempts, 2);
    assert!(f.is_active(a.id));
    // The new run's own words still count.
    f.lifecycle().running(&new_run);
    assert_eq!(f.get(a.id).status, JobStatus::Running);
}

/// Fair share: the end of a run keeps its user's usage in the database, and a lifecycle
/// started on that database (a restarted server) counts it again.
#[test]
fn a_users_fair_share_usage_is_kept_when_a_run_ends_and_read_at_start() {
    use crate::scheduler::Policy;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobrelay.sqlite");
    let start = |db: &std::path::Path| {
        let store = Arc::new(JobTable::new(Box::new(SqliteDb::open(db).unwrap())));
        let mut sched = Scheduler::new();
        let client = sched.add_client();
        sched.set_client(client, true, Some(8), 0.0);
        let sid = sched.add_service(5, 10, vec![client]);
        sched.set_policy(sid, Policy::FairShare { half_life_s: 3600 });
        let services: HashMap<String, _> = [(SERVICE.to_owned(), sid)].into();
        (
            Lifecycle::new(store.clone(), sched, services, 3),
            store,
            sid,
        )
    };
    let (lifecycle, store, sid) = start(&path);
    let job = lifecycle
        .uploaded(USER, SERVICE, None, &Default::default(), &[], |_| Ok(()))
        .unwrap();
    let decision = lifecycle.decide().pop().expect("one decision");
    let sent = lifecycle.sending(&decision, "http://c").unwrap();
    assert_eq!(sent.id, job.id);
    assert!(
        store.usage().unwrap().is_empty(),
        "nothing kept while it runs"
    );
    assert!(lifecycle.failed(&sent, &JobStatus::ACTIVE, "ended".into()));
    let kept = store.usage().unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!((kept[0].service.as_str(), kept[0].user_id), (SERVICE, USER));
    assert!(kept[0].at_ms > 0 && kept[0].core_seconds >= 0.0);
    drop(lifecycle);
    drop(store);

    // Make the kept usage large, as hours of work would, and start again.
    let db = SqliteDb::open(&path).unwrap();
    use crate::store::JobDb;
    db.save_usage(&crate::store::UsageRow {
        core_seconds: 7200.0,
        ..kept[0].clone()
    })
    .unwrap();
    drop(db);
    let (lifecycle, _store, _) = start(&path);
    lifecycle.load_usage().unwrap();
    let usage = lifecycle.scheduler().usage(sid, USER).unwrap();
    assert!(
        (7000.0..=7200.0).contains(&usage.value),
        "read back (decayed a little): {usage:?}"
    );
}

/// The database refuses every move of a job to `status` while this lives: a real SQLite
/// error from a trigger made on a second connection, as a full disk or a lost database would
/// fail the commit, not a mock of the store.
struct RefusedMoves(rusqlite::Connection);

fn refuse_moves_to(f: &Fixture, status: JobStatus) -> RefusedMoves {
    let db = rusqlite::Connection::open(f._dir.path().join("jobrelay.sqlite")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch(&format!(
        "CREATE TRIGGER refuse_moves BEFORE UPDATE OF status ON jobs
         WHEN NEW.status = '{}'
         BEGIN SELECT RAISE(ABORT, 'the test refuses this move'); END;",
        status.as_str()
    ))
    .unwrap();
    RefusedMoves(db)
}

impl Drop for RefusedMoves {
    fn drop(&mut self) {
        self.0.execute_batch("DROP TRIGGER refuse_moves").unwrap();
    }
}

/// A run's end that could not be committed is not lost: the client is asked again later
/// (`Effect::CheckLater`), the job keeps its run and its slot meanwhile, and the next word of
/// the end is committed as usual.
#[test]
fn a_run_end_the_database_refuses_is_asked_of_the_client_again() {
    let f = fixture("http://127.0.0.1:9", 8);
    f.upload();
    let sent = f.dispatch();
    let run = f.submitted(&sent[0], 1);

    let refused = refuse_moves_to(&f, JobStatus::Completed);
    assert_eq!(
        f.lifecycle().completed(&run, None),
        [Effect::CheckLater {
            job: Box::new(run.clone()),
            after: super::CHECK_AGAIN_AFTER_A_FAILED_COMMIT,
        }]
    );
    assert_eq!(f.get(run.id).status, JobStatus::Submitted);
    assert!(
        f.is_active(run.id),
        "its slot is held while its end is unrecorded"
    );
    drop(refused);

    let effects = f.lifecycle().completed(&run, None);
    assert!(
        effects.contains(&Effect::DropInputs {
            id: run.id,
            with_commit: true
        }),
        "{effects:?}"
    );
    assert_eq!(f.get(run.id).status, JobStatus::Completed);
    assert!(!f.is_active(run.id));
}

/// A submission the database refused gives no effects (the dispatcher tries the commit
/// again): the job stays Processing, nothing is checked or killed, and the commit tried again
/// records it.
#[test]
fn a_submission_the_database_refuses_is_recorded_when_tried_again() {
    let f = fixture("http://127.0.0.1:9", 8);
    f.upload();
    let sent = f.dispatch();
    let refused = refuse_moves_to(&f, JobStatus::Submitted);
    assert_eq!(f.lifecycle().submitted(&sent[0], 1, None), None);
    assert_eq!(f.get(sent[0].id).status, JobStatus::Processing);
    assert!(f.is_active(sent[0].id));
    drop(refused);
    f.submitted(&sent[0], 1);
}
