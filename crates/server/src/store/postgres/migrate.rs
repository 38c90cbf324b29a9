//! The PostgreSQL schema, brought up to date at start by numbered migrations.
//!
//! Each migration is an SQL file embedded in the binary, applied once, in order, and recorded
//! in `schema_migrations`. All of it runs in one transaction that first takes an advisory
//! lock: two servers starting at once on one database wait for each other, and the second
//! finds the work done; a migration that fails leaves the schema as it was.

use tokio_postgres::Client;

/// The migrations, oldest first: (version, name, SQL). A version is never reused or changed
/// once released; a change of schema is a new file.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (
        2,
        "job_resources",
        include_str!("migrations/0002_job_resources.sql"),
    ),
    (3, "cluster", include_str!("migrations/0003_cluster.sql")),
    (
        4,
        "usage_and_rates",
        include_str!("migrations/0004_usage_and_rates.sql"),
    ),
    (
        5,
        "result_zips",
        include_str!("migrations/0005_result_zips.sql"),
    ),
    (
        6,
        "input_files",
        include_str!("migrations/0006_input_files.sql"),
    ),
];

/// Key of the advisory lock held while migrating ("jobrelay" in ASCII): every jobrelay
/// server of a database takes the same one.
const MIGRATION_LOCK: i64 = 0x6a6f_6272_656c_6179;

/// Applies the migrations `client`'s database lacks. Refuses a database migrated by a newer
/// version of jobrelay: this one would not know what its columns mean.
pub async fn migrate(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_ms BIGINT NOT NULL
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = applied.iter().find(|v| **v > known) {
        anyhow::bail!(
            "the database was migrated by a newer jobrelay (schema version {newer}; this one \
             knows up to {known}): run that version, or restore a backup"
        );
    }
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| anyhow::anyhow!("migration {version} ({name}): {e}"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
            &[version, name, &crate::store::now_ms()],
        )
        .await?;
        done.push(*version);
    }
    tx.commit().await?;
    Ok(done)
}
