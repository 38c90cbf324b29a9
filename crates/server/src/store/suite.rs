//! The store's test suite, over [`JobDb`]: every test runs on SQLite, and on PostgreSQL when
//! `JOBRELAY_TEST_POSTGRES` names a server (each test in a schema of its own; without it the
//! PostgreSQL half prints why it is skipped and passes). What only one database has (SQLite's
//! mark file and page check, PostgreSQL's migrations and connections) is tested beside it.

use super::postgres::testing::Scratch;
use super::{
    now_ms, AbandonedRun, Callback, Change, DeliveryEnd, InputFile, JobDb, JobResources, JobStatus,
    ListFilter, ResultZip, SqliteDb, UsageRow,
};

/// A database the suite runs on: `open` gives a store on it (the same data each time, as a
/// restarted server finds it), `exec` runs SQL on it behind the store's back.
pub struct Backend {
    open: Box<dyn Fn() -> Box<dyn JobDb>>,
    exec: Box<dyn Fn(&str)>,
}

impl Backend {
    fn open(&self) -> Box<dyn JobDb> {
        (self.open)()
    }
    fn exec(&self, sql: &str) {
        (self.exec)(sql)
    }
}

fn on_sqlite(test: fn(&Backend)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let opened = path.clone();
    test(&Backend {
        open: Box::new(move || Box::new(SqliteDb::open(&opened).unwrap())),
        exec: Box::new(move |sql| {
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute_batch(sql)
                .unwrap()
        }),
    });
}

fn on_postgres(test: fn(&Backend)) {
    let Some(scratch) = Scratch::new() else {
        return;
    };
    let scratch = std::rc::Rc::new(scratch);
    let opened = scratch.clone();
    test(&Backend {
        open: Box::new(move || Box::new(opened.open())),
        exec: Box::new(move |sql| scratch.exec(sql)),
    });
}

/// A `#[test]` per database for each test of the suite: `sqlite::NAME` and `postgres::NAME`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::on_sqlite(super::$name) })*
        }
        mod postgres {
            $(#[test] fn $name() { super::on_postgres(super::$name) })*
        }
    };
}

suite!(
    transitions_are_guarded_and_survive_reopening,
    a_run_given_away_is_remembered_in_the_same_commit,
    a_notification_is_written_with_the_state_change_it_announces,
    an_unknown_status_in_the_database_is_an_error_naming_it,
    a_cleaned_job_keeps_no_timeline,
    listing_filters_and_pages_newest_first,
    a_failed_file_placement_leaves_no_job,
    a_change_about_one_run_never_moves_another,
    a_job_keeps_what_it_asked_for_across_a_reopening,
    fair_share_usage_is_kept_across_a_reopening,
    a_rate_quota_counts_across_a_reopening,
    a_deposed_leader_changes_no_job,
    a_result_zip_is_kept_with_its_final_state_and_removed_with_cleaned,
    a_change_that_does_not_commit_keeps_no_result_zip,
    inputs_are_kept_with_the_job_and_dropped_with_its_results,
    a_job_insert_that_fails_leaves_no_input_rows,
);

/// Input files as an upload keeps them: given names and bytes.
fn inputs(files: &[(&str, &[u8])]) -> Vec<InputFile> {
    files
        .iter()
        .map(|(name, bytes)| InputFile {
            name: (*name).to_owned(),
            bytes: bytes::Bytes::copy_from_slice(bytes),
        })
        .collect()
}

/// A small upload's files go into the database with the job's row: read back whole and in
/// the order given (after a reopening, as a restarted server finds them), kept by a final
/// state that does not say to drop them, gone with one that does, with `drop_inputs` and
/// with Cleaned; each job's own rows only.
fn inputs_are_kept_with_the_job_and_dropped_with_its_results(backend: &Backend) {
    let store = backend.open();
    // Every byte value, and the largest total kept (with the other two files).
    let script = b"#!/bin/bash\nsha256sum data/* > out.txt\n";
    let big: Vec<u8> = (0..super::MAX_INPUTS_IN_DB - script.len())
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let given = inputs(&[
        ("run.sh", script),
        ("data/b.bin", &big),
        ("data/empty", b""),
    ]);
    let insert = |files: &[InputFile]| {
        store
            .insert_job(1, "x", None, &JobResources::default(), files, &mut |_| {
                Ok(())
            })
            .unwrap()
            .id
    };
    let kept = insert(&given);
    let on_disk = insert(&[]);
    let completed = insert(&inputs(&[("run.sh", b"true\n")]));
    let dropped_later = insert(&inputs(&[("run.sh", b"exit 3\n")]));
    let cleaned = insert(&inputs(&[("run.sh", b"sleep 1\n")]));
    drop(store);
    let store = backend.open();
    assert_eq!(store.input_files(kept).unwrap(), given);
    assert_eq!(store.input_files(on_disk).unwrap(), []);
    assert_eq!(
        store.input_files(completed).unwrap()[0].bytes,
        &b"true\n"[..]
    );
    let moved = |id, from: JobStatus, to, change| {
        store
            .transition(id, &[from], to, change)
            .unwrap()
            .expect("moved");
    };
    // Running, then Failed without its results stored: the inputs stay (for
    // /download_partial, until the janitor).
    moved(
        kept,
        JobStatus::Queued,
        JobStatus::Running,
        Change::default(),
    );
    moved(
        kept,
        JobStatus::Running,
        JobStatus::Failed,
        Change::message("exit 1"),
    );
    assert_eq!(store.input_files(kept).unwrap(), given);
    // Completed with its results: the inputs go in that commit, the others' stay.
    moved(
        completed,
        JobStatus::Queued,
        JobStatus::Running,
        Change::default(),
    );
    moved(
        completed,
        JobStatus::Running,
        JobStatus::Completed,
        Change {
            result_zip: Some(ResultZip(bytes::Bytes::from_static(b"PK"))),
            drop_inputs: true,
            ..Change::message("Job completed")
        },
    );
    assert_eq!(store.input_files(completed).unwrap(), []);
    assert_eq!(store.input_files(kept).unwrap(), given);
    // Killed, its partial ZIP stored after the commit: dropped by the call.
    moved(
        dropped_later,
        JobStatus::Queued,
        JobStatus::Killed,
        Change::message("terminated"),
    );
    assert_eq!(store.input_files(dropped_later).unwrap().len(), 1);
    store.drop_inputs(dropped_later).unwrap();
    assert_eq!(store.input_files(dropped_later).unwrap(), []);
    // Cleaned: gone whatever the change says.
    moved(
        cleaned,
        JobStatus::Queued,
        JobStatus::Killed,
        Change::message("terminated"),
    );
    moved(
        cleaned,
        JobStatus::Killed,
        JobStatus::Cleaned,
        Change::message("files removed"),
    );
    assert_eq!(store.input_files(cleaned).unwrap(), []);
    moved(
        kept,
        JobStatus::Failed,
        JobStatus::Cleaned,
        Change::message("files removed"),
    );
    assert_eq!(store.input_files(kept).unwrap(), []);
    drop(store);
    let store = backend.open();
    for id in [kept, completed, dropped_later, cleaned] {
        assert_eq!(store.input_files(id).unwrap(), [], "job {id}");
    }
}

/// An upload that does not commit leaves no input rows: not when placing its files fails
/// after they were written, not when the database refuses one of them (a trigger, standing
/// for a failing disk or a lost connection); and a job inserted after it, which may get the
/// same id, has none of them.
fn a_job_insert_that_fails_leaves_no_input_rows(backend: &Backend) {
    let store = backend.open();
    let files = inputs(&[("run.sh", b"true\n"), ("refused", b"x")]);
    let placing_fails = store.insert_job(
        1,
        "x",
        None,
        &JobResources::default(),
        &files[..1],
        &mut |_| Err(std::io::Error::other("disk")),
    );
    assert!(placing_fails.is_err());
    let postgres = store.cluster().is_some();
    backend.exec(if postgres {
        "CREATE FUNCTION refuse_input() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
         CREATE TRIGGER refuse_input BEFORE INSERT ON input_files FOR EACH ROW
             WHEN (NEW.name = 'refused') EXECUTE FUNCTION refuse_input();"
    } else {
        "CREATE TRIGGER refuse_input BEFORE INSERT ON input_files
             WHEN NEW.name = 'refused' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
    });
    let store = backend.open();
    let refused = store.insert_job(1, "x", None, &JobResources::default(), &files, &mut |_| {
        Ok(())
    });
    assert!(refused.is_err(), "{refused:?}");
    backend.exec(if postgres {
        "DROP TRIGGER refuse_input ON input_files; DROP FUNCTION refuse_input();"
    } else {
        "DROP TRIGGER refuse_input;"
    });
    let store = backend.open();
    assert_eq!(store.count().unwrap(), 0);
    let next = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap();
    for id in 1..=next.id {
        assert_eq!(store.input_files(id).unwrap(), [], "job {id}");
    }
    // And one that commits keeps them.
    let whole = store
        .insert_job(1, "x", None, &JobResources::default(), &files, &mut |_| {
            Ok(())
        })
        .unwrap();
    assert_eq!(store.input_files(whole.id).unwrap(), files);
}

/// A small result ZIP goes into the database in the commit of the job's final state: read
/// back whole (after a reopening, as a restarted server finds it), replaced by a later
/// commit that carries another, and gone with the commit that marks the job Cleaned.
fn a_result_zip_is_kept_with_its_final_state_and_removed_with_cleaned(backend: &Backend) {
    let store = backend.open();
    let insert = || {
        store
            .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
            .unwrap()
            .id
    };
    let (done, other) = (insert(), insert());
    // Every byte value, and the largest size kept.
    let zip: Vec<u8> = (0..super::MAX_RESULT_IN_DB)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let with_zip = |bytes: &[u8]| Change {
        result_zip: Some(ResultZip(bytes::Bytes::copy_from_slice(bytes))),
        ..Change::message("Job completed")
    };
    assert_eq!(store.result_zip(done).unwrap(), None);
    store
        .transition(
            done,
            &[JobStatus::Queued],
            JobStatus::Running,
            Change::default(),
        )
        .unwrap()
        .unwrap();
    store
        .transition(
            done,
            &[JobStatus::Running],
            JobStatus::Completed,
            with_zip(&zip),
        )
        .unwrap()
        .expect("the job was Running");
    store
        .transition(
            other,
            &[JobStatus::Queued],
            JobStatus::Failed,
            with_zip(b"partial"),
        )
        .unwrap()
        .unwrap();
    drop(store);
    let store = backend.open();
    assert_eq!(store.result_zip(done).unwrap().as_deref(), Some(&zip[..]));
    assert_eq!(
        store.result_zip(other).unwrap().as_deref(),
        Some(&b"partial"[..])
    );
    // A later commit with a ZIP replaces the one kept.
    store
        .transition(
            other,
            &[JobStatus::Failed],
            JobStatus::Killed,
            with_zip(b"again"),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        store.result_zip(other).unwrap().as_deref(),
        Some(&b"again"[..])
    );
    // Cleaned: gone, the other job's kept.
    store
        .transition(
            done,
            &JobStatus::FINISHED,
            JobStatus::Cleaned,
            Change::message("files removed"),
        )
        .unwrap()
        .unwrap();
    assert_eq!(store.result_zip(done).unwrap(), None);
    assert_eq!(
        store.result_zip(other).unwrap().as_deref(),
        Some(&b"again"[..])
    );
    drop(store);
    assert_eq!(backend.open().result_zip(done).unwrap(), None);
}

/// A final state that does not commit keeps no ZIP: not when the job is in none of the
/// states it comes from, not when it is in another run, not when the database refuses the
/// transaction (here a trigger, standing for a failing disk or a lost connection).
fn a_change_that_does_not_commit_keeps_no_result_zip(backend: &Backend) {
    let store = backend.open();
    let id = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap()
        .id;
    let completed = |only_run: Option<Option<String>>| Change {
        result_zip: Some(ResultZip(bytes::Bytes::from_static(b"a whole zip"))),
        only_run,
        ..Change::message("Job completed")
    };
    // Still Queued: a completion from the client states does not move it.
    assert!(store
        .transition(
            id,
            &JobStatus::ON_CLIENT,
            JobStatus::Completed,
            completed(None)
        )
        .unwrap()
        .is_none());
    assert_eq!(store.result_zip(id).unwrap(), None);
    store
        .transition(
            id,
            &[JobStatus::Queued],
            JobStatus::Running,
            Change {
                dispatch_key: Some(Some("k:1:2".into())),
                ..Default::default()
            },
        )
        .unwrap()
        .unwrap();
    // A word about an earlier run.
    assert!(store
        .transition(
            id,
            &JobStatus::ON_CLIENT,
            JobStatus::Completed,
            completed(Some(Some("k:1:1".into())))
        )
        .unwrap()
        .is_none());
    assert_eq!(store.result_zip(id).unwrap(), None);
    // The database refuses the transaction after the update and the ZIP's insert went
    // through: at the timeline's row, which is written after them.
    let postgres = store.cluster().is_some();
    backend.exec(if postgres {
        "CREATE FUNCTION refuse_completed() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
         CREATE TRIGGER refuse_completed BEFORE INSERT ON job_events FOR EACH ROW
             WHEN (NEW.status = 'Completed') EXECUTE FUNCTION refuse_completed();"
    } else {
        "CREATE TRIGGER refuse_completed BEFORE INSERT ON job_events
             WHEN NEW.status = 'Completed' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
    });
    let refused = store.transition(
        id,
        &JobStatus::ON_CLIENT,
        JobStatus::Completed,
        completed(None),
    );
    assert!(refused.is_err(), "{refused:?}");
    backend.exec(if postgres {
        "DROP TRIGGER refuse_completed ON job_events; DROP FUNCTION refuse_completed();"
    } else {
        "DROP TRIGGER refuse_completed;"
    });
    let store = backend.open();
    assert_eq!(store.get(id).unwrap().unwrap().status, JobStatus::Running);
    assert_eq!(store.result_zip(id).unwrap(), None);
    // And once it commits, the ZIP is there with Completed.
    store
        .transition(
            id,
            &JobStatus::ON_CLIENT,
            JobStatus::Completed,
            completed(None),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        store.result_zip(id).unwrap().as_deref(),
        Some(&b"a whole zip"[..])
    );
}

/// Fencing: two servers on one database; the one whose lease epoch is no longer current
/// has every job-state write refused (nothing changes, and it is told), a standby's too; the
/// leader's writes are announced to the other servers. SQLite has one server: no lease.
fn a_deposed_leader_changes_no_job(backend: &Backend) {
    use std::time::{Duration, Instant};

    use super::{Fenced, Notice};
    let (first, second) = (backend.open(), backend.open());
    let Some(a) = first.cluster() else {
        assert!(
            second.cluster().is_none(),
            "one server on its database leads alone"
        );
        return;
    };
    let b = second.cluster().expect("both stores share the database");
    let timeout = Duration::from_millis(400);
    let job = first
        .insert_job(
            7,
            "example",
            None,
            &JobResources::default(),
            &[],
            &mut |_| Ok(()),
        )
        .unwrap();
    let (notices, mut heard) = tokio::sync::mpsc::unbounded_channel();
    b.listen(notices);
    let lease = a
        .try_lead("a", timeout)
        .unwrap()
        .expect("a free lease is taken");
    a.fence(lease.epoch);
    // Taken and in force: nobody else gets it.
    assert_eq!(b.try_lead("b", timeout).unwrap(), None);
    assert_eq!(b.lease().unwrap().holder.as_deref(), Some("a"));
    // A standby (fenced at 0) changes no job.
    b.fence(0);
    let refused = second.transition(
        job.id,
        &[JobStatus::Queued],
        JobStatus::Processing,
        Change::default(),
    );
    assert!(refused.unwrap_err().is::<Fenced>());
    // The leader does.
    let deadline = Instant::now() + Duration::from_secs(20);
    while heard.try_recv() != Ok(Notice::Listening) {
        assert!(Instant::now() < deadline, "the listener never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = first
        .transition(
            job.id,
            &[JobStatus::Queued],
            JobStatus::Processing,
            Change::default(),
        )
        .unwrap()
        .expect("the leader's write commits");
    assert_eq!(moved.status, JobStatus::Processing);
    loop {
        match heard.try_recv() {
            Ok(Notice::Changed(id)) => {
                assert_eq!(id, job.id);
                break;
            }
            _ => {
                assert!(Instant::now() < deadline, "the change was not announced");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // `a` stops renewing; once the lease expires `b` takes it with a higher epoch.
    let taken = loop {
        if let Some(lease) = b.try_lead("b", timeout).unwrap() {
            break lease;
        }
        assert!(
            Instant::now() < deadline,
            "the expired lease was never taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(taken.epoch > lease.epoch);
    b.fence(taken.epoch);
    // The deposed leader wakes late: its writes are refused, it is told, nothing changed.
    let refusals = a.refusals();
    let told = refusals.notified();
    tokio::pin!(told);
    told.as_mut().enable();
    let late = first.transition(
        job.id,
        &[JobStatus::Processing],
        JobStatus::Completed,
        Change::default(),
    );
    assert!(late.unwrap_err().is::<Fenced>());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), told).await })
        .expect("the refusal was announced");
    assert!(!a.renew("a", lease.epoch, timeout).unwrap());
    assert_eq!(
        first.get(job.id).unwrap().unwrap().status,
        JobStatus::Processing
    );
    // The new leader's writes go through; a given-back lease is free at once.
    let done = second
        .transition(
            job.id,
            &[JobStatus::Processing],
            JobStatus::Completed,
            Change::default(),
        )
        .unwrap();
    assert_eq!(done.unwrap().status, JobStatus::Completed);
    b.resign("b", taken.epoch).unwrap();
    let again = a
        .try_lead("a", timeout)
        .unwrap()
        .expect("a lease given back is free");
    assert_eq!(again.epoch, taken.epoch + 1);
    // Terminate requests wait for the leader, committed.
    b.request_terminate(job.id).unwrap();
    assert_eq!(a.terminate_requests().unwrap(), [job.id]);
    a.forget_terminate(job.id).unwrap();
    assert!(a.terminate_requests().unwrap().is_empty());
}

fn transitions_are_guarded_and_survive_reopening(backend: &Backend) {
    let store = backend.open();
    let job = store
        .insert_job(
            7,
            "example",
            None,
            &JobResources::default(),
            &[],
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    let moved = store
        .transition(
            job.id,
            &[JobStatus::Queued],
            JobStatus::Processing,
            Change {
                attempts: Some(1),
                client: Some(Some("http://c".into())),
                ..Default::default()
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(moved.attempts, 1);
    assert!(store
        .transition(
            job.id,
            &[JobStatus::Queued],
            JobStatus::Killed,
            Change::default()
        )
        .unwrap()
        .is_none());
    let server_id = store.server_id().to_owned();
    drop(store);
    let store = backend.open();
    assert_eq!(store.server_id(), server_id);
    let again = store.get(job.id).unwrap().unwrap();
    assert_eq!(again.status, JobStatus::Processing);
    assert_eq!(again.client.as_deref(), Some("http://c"));
}

fn a_run_given_away_is_remembered_in_the_same_commit(backend: &Backend) {
    let store = backend.open();
    let job = store
        .insert_job(
            7,
            "example",
            None,
            &JobResources::default(),
            &[],
            &mut |_| Ok(()),
        )
        .unwrap();
    let sent = Change {
        client: Some(Some("http://c".into())),
        dest_id: Some(Some(5)),
        dispatch_key: Some(Some("k:1:1".into())),
        ..Default::default()
    };
    store
        .transition(job.id, &[JobStatus::Queued], JobStatus::Submitted, sent)
        .unwrap()
        .unwrap();
    // A guarded change that does not apply records nothing.
    let abandon = Change {
        client: Some(None),
        dest_id: Some(None),
        abandon_run: true,
        ..Default::default()
    };
    assert!(store
        .transition(
            job.id,
            &[JobStatus::Running],
            JobStatus::Queued,
            abandon.clone()
        )
        .unwrap()
        .is_none());
    assert!(store.abandoned_on("http://c").unwrap().is_empty());
    store
        .transition(job.id, &JobStatus::ON_CLIENT, JobStatus::Queued, abandon)
        .unwrap()
        .unwrap();
    assert_eq!(
        store.abandoned_on("http://c").unwrap(),
        [AbandonedRun {
            client: "http://c".into(),
            dest_id: 5,
            key: Some("k:1:1".into()),
            job_id: job.id,
        }]
    );
    assert!(store.abandoned_on("http://other").unwrap().is_empty());
    store.forget_abandoned("http://c", 5).unwrap();
    assert!(store.abandoned_on("http://c").unwrap().is_empty());
}

fn a_notification_is_written_with_the_state_change_it_announces(backend: &Backend) {
    let store = backend.open();
    let final_only = Callback {
        url: "http://hooks/a".into(),
        on_running: false,
    };
    let job = store
        .insert_job(
            1,
            "x",
            Some(&final_only),
            &JobResources::default(),
            &[],
            &mut |_| Ok(()),
        )
        .unwrap();
    let silent = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap();
    for id in [job.id, silent.id] {
        store
            .transition(
                id,
                &[JobStatus::Queued],
                JobStatus::Running,
                Change::default(),
            )
            .unwrap()
            .unwrap();
    }
    assert_eq!(store.due_deliveries(i64::MAX, 10).unwrap(), vec![]);
    // A guarded change that does not apply announces nothing.
    assert!(store
        .transition(
            job.id,
            &[JobStatus::Queued],
            JobStatus::Killed,
            Change::default()
        )
        .unwrap()
        .is_none());
    for id in [job.id, silent.id] {
        store
            .transition(
                id,
                &[JobStatus::Running],
                JobStatus::Completed,
                Change::default(),
            )
            .unwrap()
            .unwrap();
    }
    let due = store.due_deliveries(now_ms(), 10).unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    let delivery = &due[0];
    assert_eq!(
        (delivery.job_id, delivery.event),
        (job.id, JobStatus::Completed)
    );
    assert_eq!(delivery.url, "http://hooks/a");
    let body: serde_json::Value = serde_json::from_str(&delivery.body).unwrap();
    assert_eq!(body["status"], "Completed");

    store
        .retry_delivery(&delivery.id, "503", now_ms() + 60_000)
        .unwrap();
    assert_eq!(store.due_deliveries(now_ms(), 10).unwrap(), vec![]);
    assert!(store.next_delivery_ms().unwrap().unwrap() > now_ms());
    store
        .finish_delivery(&delivery.id, "200", true, DeliveryEnd::Delivered)
        .unwrap();
    assert_eq!(store.next_delivery_ms().unwrap(), None);
    let shown = store.notifications(job.id).unwrap();
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].attempts, 2);
    assert_eq!(shown[0].last_status.as_deref(), Some("200"));
    assert_eq!(shown[0].outcome.as_deref(), Some("delivered"));
    assert_eq!(shown[0].next_try_ms, None);

    // Running too when asked.
    let both = Callback {
        url: "http://hooks/b".into(),
        on_running: true,
    };
    let job = store
        .insert_job(
            1,
            "x",
            Some(&both),
            &JobResources::default(),
            &[],
            &mut |_| Ok(()),
        )
        .unwrap();
    store
        .transition(
            job.id,
            &[JobStatus::Queued],
            JobStatus::Running,
            Change::default(),
        )
        .unwrap()
        .unwrap();
    let due = store.due_deliveries(now_ms(), 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].event, JobStatus::Running);
}

fn an_unknown_status_in_the_database_is_an_error_naming_it(backend: &Backend) {
    let store = backend.open();
    let job = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap();
    backend.exec(&format!(
        "UPDATE jobs SET status = 'Paused' WHERE id = {}",
        job.id
    ));
    let why = store.get(job.id).unwrap_err().to_string();
    assert!(
        why.contains("unknown job status \"Paused\""),
        "read back as {:?}, error {why}",
        store.get(job.id).ok()
    );
    assert!(store
        .list(&ListFilter {
            limit: 10,
            ..Default::default()
        })
        .is_err());
}

fn a_cleaned_job_keeps_no_timeline(backend: &Backend) {
    let store = backend.open();
    let cleaned = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap()
        .id;
    let kept = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap()
        .id;
    for id in [cleaned, kept] {
        store
            .transition(
                id,
                &[JobStatus::Queued],
                JobStatus::Killed,
                Change::message("k"),
            )
            .unwrap()
            .unwrap();
    }
    assert_eq!(store.history(cleaned).unwrap().len(), 2);
    store
        .transition(
            cleaned,
            &JobStatus::FINISHED,
            JobStatus::Cleaned,
            Change::message("files removed"),
        )
        .unwrap()
        .unwrap();
    assert_eq!(store.history(cleaned).unwrap(), vec![]);
    assert_eq!(store.history(kept).unwrap().len(), 2);
    assert_eq!(
        store.get(cleaned).unwrap().unwrap().status,
        JobStatus::Cleaned
    );
}

fn listing_filters_and_pages_newest_first(backend: &Backend) {
    let store = backend.open();
    for user in [1, 2, 1, 1] {
        store
            .insert_job(user, "x", None, &JobResources::default(), &[], &mut |_| {
                Ok(())
            })
            .unwrap();
    }
    let filter = ListFilter {
        user_id: Some(1),
        limit: 2,
        ..Default::default()
    };
    let (jobs, total) = store.list(&filter).unwrap();
    assert_eq!(total, 3);
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [4, 3]);
    let filter = ListFilter {
        status: Some(JobStatus::Running),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(store.list(&filter).unwrap().1, 0);
}

fn a_failed_file_placement_leaves_no_job(backend: &Backend) {
    let store = backend.open();
    assert!(store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Err(
            std::io::Error::other("disk")
        ))
        .is_err());
    assert_eq!(store.count().unwrap(), 0);
}

fn a_change_about_one_run_never_moves_another(backend: &Backend) {
    let store = backend.open();
    let job = store
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap();
    let run = |key: Option<&str>| Change {
        only_run: Some(key.map(str::to_owned)),
        ..Default::default()
    };
    // No run yet: a change about "no run" applies, one about a run does not.
    assert!(store
        .transition(
            job.id,
            &[JobStatus::Queued],
            JobStatus::Queued,
            run(Some("k:1"))
        )
        .unwrap()
        .is_none());
    assert!(store
        .transition(job.id, &[JobStatus::Queued], JobStatus::Queued, run(None))
        .unwrap()
        .is_some());
    let sent = Change {
        dispatch_key: Some(Some("k:2".into())),
        ..Default::default()
    };
    store
        .transition(job.id, &[JobStatus::Queued], JobStatus::Running, sent)
        .unwrap()
        .unwrap();
    for stale in [None, Some("k:1")] {
        assert!(store
            .transition(job.id, &[JobStatus::Running], JobStatus::Failed, run(stale))
            .unwrap()
            .is_none());
    }
    let ended = store
        .transition(
            job.id,
            &[JobStatus::Running],
            JobStatus::Completed,
            run(Some("k:2")),
        )
        .unwrap()
        .unwrap();
    assert_eq!(ended.status, JobStatus::Completed);
}

fn a_job_keeps_what_it_asked_for_across_a_reopening(backend: &Backend) {
    let asked = JobResources {
        cores: 4,
        memory_mb: Some(4096),
        gpus: 1,
        walltime_s: Some(7200),
        priority: -2,
    };
    let id = backend
        .open()
        .insert_job(1, "x", None, &asked, &[], &mut |_| Ok(()))
        .unwrap()
        .id;
    let job = backend.open().get(id).unwrap().unwrap();
    assert_eq!(job.resources, asked);
    // New fields after the reference's, which keep their order.
    let json = serde_json::to_string(&job).unwrap();
    assert!(
        json.contains(r#""finished_at":null,"cores":4,"memory_mb":4096,"gpus":1,"walltime_s":7200,"priority":-2}"#),
        "{json}"
    );
    // A job that asked for nothing.
    let plain = backend
        .open()
        .insert_job(1, "x", None, &JobResources::default(), &[], &mut |_| Ok(()))
        .unwrap();
    assert_eq!(
        backend.open().get(plain.id).unwrap().unwrap().resources,
        JobResources::default()
    );
}

fn fair_share_usage_is_kept_across_a_reopening(backend: &Backend) {
    let db = backend.open();
    assert!(db.usage().unwrap().is_empty());
    let row = |service: &str, user_id, core_seconds, at_ms| UsageRow {
        service: service.into(),
        user_id,
        core_seconds,
        at_ms,
    };
    db.save_usage(&row("docking", 7, 120.5, 1_000)).unwrap();
    db.save_usage(&row("docking", 8, 3.0, 1_000)).unwrap();
    db.save_usage(&row("nmr", 7, 1.0, 2_000)).unwrap();
    // A later save replaces the row of that service and user.
    db.save_usage(&row("docking", 7, 99.25, 5_000)).unwrap();
    drop(db);
    let db = backend.open();
    assert_eq!(
        db.usage().unwrap(),
        [
            row("docking", 7, 99.25, 5_000),
            row("docking", 8, 3.0, 1_000),
            row("nmr", 7, 1.0, 2_000),
        ]
    );
}

fn a_rate_quota_counts_across_a_reopening(backend: &Backend) {
    use crate::ratelimit::RateQuota;
    let quota = RateQuota {
        per_hour: 60,
        burst: 2,
    };
    let t0 = 10_000_000;
    let db = backend.open();
    assert_eq!(
        db.take_upload_slot("docking", 7, quota, t0).unwrap(),
        Ok(())
    );
    assert_eq!(
        db.take_upload_slot("docking", 7, quota, t0).unwrap(),
        Ok(())
    );
    assert_eq!(
        db.take_upload_slot("docking", 7, quota, t0).unwrap(),
        Err(60_000)
    );
    // Another user, another service: buckets of their own.
    assert_eq!(
        db.take_upload_slot("docking", 8, quota, t0).unwrap(),
        Ok(())
    );
    assert_eq!(db.take_upload_slot("nmr", 7, quota, t0).unwrap(), Ok(()));
    drop(db);
    // A restart does not refill the bucket.
    let db = backend.open();
    assert_eq!(
        db.take_upload_slot("docking", 7, quota, t0 + 30_000)
            .unwrap(),
        Err(30_000)
    );
    assert_eq!(
        db.take_upload_slot("docking", 7, quota, t0 + 60_000)
            .unwrap(),
        Ok(())
    );
}

/// `jobrelay server migrate`'s two halves: a SQLite database read whole and written into an
/// empty PostgreSQL one reads back the same through every method of the seam (jobs with
/// every column, timelines, notifications pending and ended, runs given away, identity), new
/// ids continue past the highest id ever handed out, and a database holding jobs is refused
/// with nothing written.
#[test]
fn a_sqlite_database_moves_to_postgres_whole() {
    let Some(scratch) = Scratch::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    let hook = |on_running| Callback {
        url: "http://hooks/x".into(),
        on_running,
    };
    let asked = JobResources {
        cores: 4,
        memory_mb: Some(2048),
        gpus: 1,
        walltime_s: Some(3600),
        priority: -3,
    };
    let insert = |user, callback: Option<&Callback>, resources: &JobResources| {
        sqlite
            .insert_job(user, "example", callback, resources, &[], &mut |_| Ok(()))
            .unwrap()
    };
    let sent = |client: &str, dest: i64, key: &str| Change {
        attempts: Some(1),
        client: Some(Some(client.into())),
        dest_id: Some(Some(dest)),
        node: Some(Some("node-a".into())),
        dispatch_key: Some(Some(key.into())),
        ..Default::default()
    };
    // Completed, announced and delivered.
    let completed = insert(1, Some(&hook(true)), &JobResources::default());
    sqlite
        .transition(
            completed.id,
            &[JobStatus::Queued],
            JobStatus::Running,
            sent("http://c", 1, "k:1:1"),
        )
        .unwrap()
        .unwrap();
    sqlite
        .transition(
            completed.id,
            &[JobStatus::Running],
            JobStatus::Completed,
            Change {
                exit_code: Some(Some(0)),
                result_zip: Some(ResultZip(bytes::Bytes::from_static(b"PK a small result"))),
                ..Change::message("done")
            },
        )
        .unwrap()
        .unwrap();
    let delivered = sqlite.due_deliveries(now_ms() + 1, 10).unwrap();
    sqlite
        .finish_delivery(&delivered[0].id, "200", true, DeliveryEnd::Delivered)
        .unwrap();
    // Failed, its notification still pending after a failed try.
    let failed = insert(2, Some(&hook(false)), &JobResources::default());
    sqlite
        .transition(
            failed.id,
            &[JobStatus::Queued],
            JobStatus::Failed,
            Change {
                exit_code: Some(Some(3)),
                ..Change::message("exit 3")
            },
        )
        .unwrap()
        .unwrap();
    let pending = sqlite
        .due_deliveries(now_ms() + 1, 10)
        .unwrap()
        .into_iter()
        .find(|d| d.job_id == failed.id)
        .unwrap();
    sqlite
        .retry_delivery(&pending.id, "503", now_ms() + 1)
        .unwrap();
    // Killed after its run was given away.
    let killed = insert(1, None, &JobResources::default());
    sqlite
        .transition(
            killed.id,
            &[JobStatus::Queued],
            JobStatus::Submitted,
            sent("http://c", 7, "k:3:1"),
        )
        .unwrap()
        .unwrap();
    sqlite
        .transition(
            killed.id,
            &JobStatus::ON_CLIENT,
            JobStatus::Killed,
            Change {
                abandon_run: true,
                ..Change::message("killed")
            },
        )
        .unwrap()
        .unwrap();
    // Cleaned (no timeline), and Queued with a request and a callback that wants Running.
    let cleaned = insert(3, None, &JobResources::default());
    sqlite
        .transition(
            cleaned.id,
            &[JobStatus::Queued],
            JobStatus::Cleaned,
            Change::default(),
        )
        .unwrap()
        .unwrap();
    let queued = sqlite
        .insert_job(
            3,
            "example",
            Some(&hook(true)),
            &asked,
            &inputs(&[("run.sh", b"true\n"), ("in/a.txt", b"a")]),
            &mut |_| Ok(()),
        )
        .unwrap();

    // Fair-share usage and a rate quota's bucket move too.
    let usage = UsageRow {
        service: "example".into(),
        user_id: 3,
        core_seconds: 42.5,
        at_ms: 1_000,
    };
    sqlite.save_usage(&usage).unwrap();
    let quota = crate::ratelimit::RateQuota {
        per_hour: 1,
        burst: 1,
    };
    let t0 = now_ms();
    assert_eq!(
        sqlite.take_upload_slot("example", 3, quota, t0).unwrap(),
        Ok(())
    );

    // The job-id mark says ids up to 9 were handed out (uploads that never committed).
    let snapshot = sqlite.snapshot(9).unwrap();
    assert_eq!(snapshot.jobs.len(), 5);
    assert_eq!(snapshot.highest_id, 9);
    let mut pg = scratch.open();
    assert_ne!(pg.server_id(), sqlite.server_id());
    let moved = pg.import(snapshot.clone()).unwrap();
    assert_eq!(moved.jobs, 5);
    assert_eq!(moved.events, snapshot.events.len());
    // Completed's Running (delivered) and Completed (pending), Failed's (tried once).
    assert_eq!(snapshot.outbox.len(), 3);
    assert_eq!(moved.notifications, 3);
    assert_eq!(moved.abandoned_runs, 1);
    assert_eq!(moved.result_zips, 1);
    assert_eq!(moved.input_files, 2);
    assert_eq!(moved.next_id, 10);
    assert_eq!(pg.server_id(), sqlite.server_id());
    drop(pg);

    // Opened again, as a server on PostgreSQL finds it.
    let pg = scratch.open();
    assert_eq!(pg.server_id(), sqlite.server_id());
    let ids = [completed.id, failed.id, killed.id, cleaned.id, queued.id];
    for id in ids {
        assert_eq!(pg.get(id).unwrap(), sqlite.get(id).unwrap(), "job {id}");
        assert_eq!(
            pg.history(id).unwrap(),
            sqlite.history(id).unwrap(),
            "job {id}"
        );
        assert_eq!(
            pg.notifications(id).unwrap(),
            sqlite.notifications(id).unwrap(),
            "job {id}"
        );
    }
    assert_eq!(pg.get(queued.id).unwrap().unwrap().resources, asked);
    for id in ids {
        assert_eq!(
            pg.result_zip(id).unwrap(),
            sqlite.result_zip(id).unwrap(),
            "job {id}"
        );
    }
    assert_eq!(
        pg.result_zip(completed.id).unwrap().as_deref(),
        Some(&b"PK a small result"[..])
    );
    for id in ids {
        assert_eq!(
            pg.input_files(id).unwrap(),
            sqlite.input_files(id).unwrap(),
            "job {id}"
        );
    }
    assert_eq!(
        pg.input_files(queued.id).unwrap(),
        inputs(&[("run.sh", b"true\n"), ("in/a.txt", b"a")])
    );
    assert_eq!(pg.usage().unwrap(), [usage]);
    assert!(
        pg.take_upload_slot("example", 3, quota, t0)
            .unwrap()
            .is_err(),
        "the bucket emptied on SQLite is still empty"
    );
    assert!(pg.history(completed.id).unwrap().len() >= 3);
    assert_eq!(
        pg.abandoned_on("http://c").unwrap(),
        sqlite.abandoned_on("http://c").unwrap()
    );
    assert_eq!(pg.abandoned_on("http://c").unwrap().len(), 1);
    let all = ListFilter {
        limit: 100,
        ..Default::default()
    };
    assert_eq!(pg.list(&all).unwrap(), sqlite.list(&all).unwrap());
    assert_eq!(
        pg.counts(None).unwrap().len(),
        sqlite.counts(None).unwrap().len()
    );
    let due = |db: &dyn JobDb| db.due_deliveries(now_ms() + 10, 10).unwrap();
    assert_eq!(due(&pg), due(&sqlite));
    assert_eq!(due(&pg).len(), 2);
    assert_eq!(
        pg.by_dest("http://c", 1).unwrap().map(|j| j.id),
        Some(completed.id)
    );
    // The callback moved with its job: Running is announced on PostgreSQL.
    pg.transition(
        queued.id,
        &[JobStatus::Queued],
        JobStatus::Running,
        Change::default(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(pg.notifications(queued.id).unwrap().len(), 1);
    // New ids continue past the mark.
    let next = pg
        .insert_job(
            1,
            "example",
            None,
            &JobResources::default(),
            &[],
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_eq!(next.id, 10);

    // A database that holds jobs is refused, and keeps what it had.
    let mut pg = scratch.open();
    let why = pg.import(snapshot).unwrap_err().to_string();
    assert!(why.contains("already holds 6 job(s)"), "{why}");
    assert_eq!(pg.count().unwrap(), 6);
}
