//! The store's test suite, over [`JobDb`]: every test runs on SQLite, and on PostgreSQL when
//! `JOBRELAY_TEST_POSTGRES` names a server (each test in a schema of its own; without it the
//! PostgreSQL half prints why it is skipped and passes). What only one database has (SQLite's
//! mark file and page check, PostgreSQL's migrations and connections) is tested beside it.

use super::postgres::testing::Scratch;
use super::{
    now_ms, AbandonedRun, Callback, Change, DeliveryEnd, JobDb, JobResources, JobStatus,
    ListFilter, SqliteDb, UsageRow,
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
);

fn transitions_are_guarded_and_survive_reopening(backend: &Backend) {
    let store = backend.open();
    let job = store
        .insert_job(
            7,
            "example",
            None,
            &JobResources::default(),
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
            &mut |_| Ok(()),
        )
        .unwrap();
    let silent = store
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Ok(()))
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
        .insert_job(1, "x", Some(&both), &JobResources::default(), &mut |_| {
            Ok(())
        })
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
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Ok(()))
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
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Ok(()))
        .unwrap()
        .id;
    let kept = store
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Ok(()))
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
            .insert_job(user, "x", None, &JobResources::default(), &mut |_| Ok(()))
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
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Err(
            std::io::Error::other("disk")
        ))
        .is_err());
    assert_eq!(store.count().unwrap(), 0);
}

fn a_change_about_one_run_never_moves_another(backend: &Backend) {
    let store = backend.open();
    let job = store
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Ok(()))
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
        .insert_job(1, "x", None, &asked, &mut |_| Ok(()))
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
        .insert_job(1, "x", None, &JobResources::default(), &mut |_| Ok(()))
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
