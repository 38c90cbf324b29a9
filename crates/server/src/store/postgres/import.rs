//! A whole database written into an empty PostgreSQL one, in one transaction: the bulk
//! insert of `jobrelay server migrate`. Each table is one `INSERT … SELECT FROM UNNEST` of
//! column arrays per chunk of rows (a round trip per chunk, not per row).

use deadpool_postgres::Object;

use super::stored;
use crate::store::snapshot::{Moved, Snapshot};

/// Rows per `INSERT`: bounds the size of one statement's parameters.
const CHUNK: usize = 5_000;

/// Writes `snapshot` into the database of `client`, which must hold no job yet (else nothing
/// is written and the error says how many it holds). Keeps every id and the database's
/// identity; the id sequence continues after the highest id the source ever handed out.
pub async fn import(client: &mut Object, snapshot: &Snapshot) -> anyhow::Result<Moved> {
    let tx = client.transaction().await?;
    // No upload of a server started meanwhile on this database can slip in before the check
    // or between the check and the commit.
    tx.batch_execute("LOCK TABLE jobs IN EXCLUSIVE MODE")
        .await?;
    let held: i64 = tx
        .query_one("SELECT COUNT(*) FROM jobs", &[])
        .await?
        .try_get(0)?;
    if held > 0 {
        anyhow::bail!(
            "the target database already holds {held} job(s): a move goes into a database \
             that holds none (nothing was written)"
        );
    }
    // A server that started on this database before the move left its own events, outbox
    // or runs of jobs it no longer has; the source's replace them.
    tx.batch_execute(
        "DELETE FROM job_events; DELETE FROM webhook_outbox; DELETE FROM abandoned_runs;
         DELETE FROM user_usage; DELETE FROM upload_rate; DELETE FROM result_zips;
         DELETE FROM input_files;",
    )
    .await?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('server_id', $1)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&snapshot.server_id],
    )
    .await?;
    for rows in snapshot.jobs.chunks(CHUNK) {
        let mut c = JobColumns::default();
        for row in rows {
            let job = &row.job;
            c.id.push(job.id);
            c.status.push(job.status.as_str().to_owned());
            c.message.push(job.message.clone());
            c.user_id.push(job.user_id);
            c.service.push(job.service.clone());
            c.attempts.push(i64::from(job.attempts));
            c.client.push(job.client.clone());
            c.dest_id.push(job.dest_id);
            c.node.push(job.node.clone());
            c.dispatch_key.push(job.dispatch_key.clone());
            c.exit_code.push(job.exit_code);
            c.created_ms.push(job.created_ms);
            c.updated_ms.push(job.updated_ms);
            c.finished_ms.push(job.finished_ms);
            c.callback_url.push(row.callback_url.clone());
            c.callback_events.push(row.callback_events.clone());
            c.cores.push(i64::from(job.resources.cores));
            c.memory_mb.push(stored(job.resources.memory_mb)?);
            c.gpus.push(i64::from(job.resources.gpus));
            c.walltime_s.push(stored(job.resources.walltime_s)?);
            c.priority.push(job.resources.priority);
        }
        tx.execute(
            "INSERT INTO jobs (id, status, message, user_id, service, attempts, client, dest_id,
                               node, dispatch_key, exit_code, created_ms, updated_ms,
                               finished_ms, callback_url, callback_events, cores, memory_mb,
                               gpus, walltime_s, priority)
             SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[],
                                  $5::TEXT[], $6::BIGINT[], $7::TEXT[], $8::BIGINT[],
                                  $9::TEXT[], $10::TEXT[], $11::INTEGER[], $12::BIGINT[],
                                  $13::BIGINT[], $14::BIGINT[], $15::TEXT[], $16::TEXT[],
                                  $17::BIGINT[], $18::BIGINT[], $19::BIGINT[], $20::BIGINT[],
                                  $21::BIGINT[])",
            &[
                &c.id,
                &c.status,
                &c.message,
                &c.user_id,
                &c.service,
                &c.attempts,
                &c.client,
                &c.dest_id,
                &c.node,
                &c.dispatch_key,
                &c.exit_code,
                &c.created_ms,
                &c.updated_ms,
                &c.finished_ms,
                &c.callback_url,
                &c.callback_events,
                &c.cores,
                &c.memory_mb,
                &c.gpus,
                &c.walltime_s,
                &c.priority,
            ],
        )
        .await?;
    }
    for rows in snapshot.events.chunks(CHUNK) {
        let job_id: Vec<i64> = rows.iter().map(|r| r.job_id).collect();
        let at_ms: Vec<i64> = rows.iter().map(|r| r.at_ms).collect();
        let status: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
        let message: Vec<&str> = rows.iter().map(|r| r.message.as_str()).collect();
        let attempts: Vec<i64> = rows.iter().map(|r| r.attempts).collect();
        let client: Vec<Option<&str>> = rows.iter().map(|r| r.client.as_deref()).collect();
        // In the source's order, so `seq` orders each timeline as the source's rowid did.
        tx.execute(
            "INSERT INTO job_events (job_id, at_ms, status, message, attempts, client)
             SELECT job_id, at_ms, status, message, attempts, client
             FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[],
                         $6::TEXT[]) WITH ORDINALITY
                  AS u(job_id, at_ms, status, message, attempts, client, n)
             ORDER BY n",
            &[&job_id, &at_ms, &status, &message, &attempts, &client],
        )
        .await?;
    }
    for rows in snapshot.outbox.chunks(CHUNK) {
        let id: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let job_id: Vec<i64> = rows.iter().map(|r| r.job_id).collect();
        let event: Vec<&str> = rows.iter().map(|r| r.event.as_str()).collect();
        let url: Vec<&str> = rows.iter().map(|r| r.url.as_str()).collect();
        let body: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
        let created_ms: Vec<i64> = rows.iter().map(|r| r.created_ms).collect();
        let attempts: Vec<i64> = rows.iter().map(|r| r.attempts).collect();
        let last_status: Vec<Option<&str>> =
            rows.iter().map(|r| r.last_status.as_deref()).collect();
        let next_ms: Vec<Option<i64>> = rows.iter().map(|r| r.next_ms).collect();
        let outcome: Vec<Option<&str>> = rows.iter().map(|r| r.outcome.as_deref()).collect();
        tx.execute(
            "INSERT INTO webhook_outbox (id, job_id, event, url, body, created_ms, attempts,
                                         last_status, next_ms, outcome)
             SELECT id, job_id, event, url, body, created_ms, attempts, last_status, next_ms,
                    outcome
             FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                         $6::BIGINT[], $7::BIGINT[], $8::TEXT[], $9::BIGINT[], $10::TEXT[])
                  WITH ORDINALITY
                  AS u(id, job_id, event, url, body, created_ms, attempts, last_status,
                       next_ms, outcome, n)
             ORDER BY n",
            &[
                &id,
                &job_id,
                &event,
                &url,
                &body,
                &created_ms,
                &attempts,
                &last_status,
                &next_ms,
                &outcome,
            ],
        )
        .await?;
    }
    for run in &snapshot.abandoned {
        tx.execute(
            "INSERT INTO abandoned_runs (client, dest_id, dispatch_key, job_id)
             VALUES ($1, $2, $3, $4)",
            &[&run.client, &run.dest_id, &run.key, &run.job_id],
        )
        .await?;
    }
    // Few rows (one per user and service): one statement each.
    for row in &snapshot.usage {
        tx.execute(
            "INSERT INTO user_usage (service, user_id, core_seconds, at_ms)
             VALUES ($1, $2, $3, $4)",
            &[&row.service, &row.user_id, &row.core_seconds, &row.at_ms],
        )
        .await?;
    }
    for (service, user_id, tat_ms) in &snapshot.rates {
        tx.execute(
            "INSERT INTO upload_rate (service, user_id, tat_ms) VALUES ($1, $2, $3)",
            &[service, user_id, tat_ms],
        )
        .await?;
    }
    // One statement per ZIP: each is at most MAX_RESULT_IN_DB, so no array of them grows
    // with the database.
    let statement = tx
        .prepare("INSERT INTO result_zips (job_id, zip) VALUES ($1, $2)")
        .await?;
    for (job_id, zip) in &snapshot.result_zips {
        tx.execute(&statement, &[job_id, zip]).await?;
    }
    // Likewise one statement per input file (each job's at most MAX_INPUTS_IN_DB).
    let statement = tx
        .prepare("INSERT INTO input_files (job_id, pos, name, bytes) VALUES ($1, $2, $3, $4)")
        .await?;
    for (job_id, pos, name, bytes) in &snapshot.input_files {
        let pos = i32::try_from(*pos)?;
        tx.execute(&statement, &[job_id, &pos, name, bytes]).await?;
    }
    // New uploads continue after the highest id the source handed out (a job row or an
    // upload that never committed), never on an id a platform may still hold.
    let highest = snapshot
        .jobs
        .iter()
        .map(|r| r.job.id)
        .max()
        .unwrap_or(0)
        .max(snapshot.highest_id);
    let next_id: i64 = tx
        .query_one(
            "SELECT setval(pg_get_serial_sequence('jobs', 'id'), GREATEST($1::BIGINT, 1),
                           $1::BIGINT > 0)
                    + CASE WHEN $1::BIGINT > 0 THEN 1 ELSE 0 END",
            &[&highest],
        )
        .await?
        .try_get(0)?;
    tx.commit().await?;
    Ok(Moved {
        jobs: snapshot.jobs.len(),
        events: snapshot.events.len(),
        notifications: snapshot.outbox.len(),
        abandoned_runs: snapshot.abandoned.len(),
        result_zips: snapshot.result_zips.len(),
        input_files: snapshot.input_files.len(),
        next_id,
    })
}

/// The `jobs` columns of one chunk, as arrays.
#[derive(Default)]
struct JobColumns {
    id: Vec<i64>,
    status: Vec<String>,
    message: Vec<String>,
    user_id: Vec<i64>,
    service: Vec<String>,
    attempts: Vec<i64>,
    client: Vec<Option<String>>,
    dest_id: Vec<Option<i64>>,
    node: Vec<Option<String>>,
    dispatch_key: Vec<Option<String>>,
    exit_code: Vec<Option<i32>>,
    created_ms: Vec<i64>,
    updated_ms: Vec<i64>,
    finished_ms: Vec<Option<i64>>,
    callback_url: Vec<Option<String>>,
    callback_events: Vec<Option<String>>,
    cores: Vec<i64>,
    memory_mb: Vec<Option<i64>>,
    gpus: Vec<i64>,
    walltime_s: Vec<Option<i64>>,
    priority: Vec<i64>,
}
