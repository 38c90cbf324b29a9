//! The database a server test runs on: SQLite (the default) or, when `JOBRELAY_TEST_POSTGRES`
//! names a PostgreSQL server, a schema of its own there, dropped at the end of the test.
//! `on_both_databases!` turns one test function into a `sqlite::NAME` and a `postgres::NAME`
//! test, so the recovery and scheduling tests run on both without being copied.

/// Runs SQL on the PostgreSQL server at `url`.
pub async fn admin(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test server {url}: {e}"));
    let connection = tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = connection.await;
}

/// The test server's URL, or `None` after printing why the test is skipped.
pub fn postgres_url() -> Option<String> {
    match std::env::var("JOBRELAY_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!(
                "skipped: JOBRELAY_TEST_POSTGRES is not set (a postgres:// URL, e.g. the one \
                 ../shared/postgres/start-postgres.sh prints)"
            );
            None
        }
    }
}

/// A schema of its own on the test server, dropped (with what it holds) when this is.
pub struct Schema {
    admin: String,
    pub name: String,
    /// A URL whose connections use only this schema.
    pub url: String,
}

impl Schema {
    /// A fresh schema, `None` (skipped, with the reason printed) without a test server.
    pub async fn new() -> Option<Schema> {
        let admin_url = postgres_url()?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("e2e_{}_{nanos}", std::process::id());
        admin(&admin_url, &format!("CREATE SCHEMA {name}")).await;
        let glue = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{glue}options=-c%20search_path%3D{name}");
        Some(Schema {
            admin: admin_url,
            name,
            url,
        })
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // On a thread of its own: the test's runtime may be the one dropping this.
        let (url, sql) = (
            self.admin.clone(),
            format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(admin(&url, &sql))
        })
        .join();
    }
}

/// Where a parameterised test's servers keep their jobs.
pub enum TestDb {
    /// The SQLite file in the server's data directory.
    Sqlite,
    Postgres(Schema),
}

impl TestDb {
    /// The server's flags for this database followed by `extra`.
    pub fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = match self {
            TestDb::Sqlite => vec![],
            TestDb::Postgres(schema) => vec!["--db", schema.url.as_str()],
        };
        args.extend_from_slice(extra);
        args
    }

    /// Whether the server's database is SQLite (what only it has: the file, the id mark).
    pub fn is_sqlite(&self) -> bool {
        matches!(self, TestDb::Sqlite)
    }

    /// The result ZIPs the server's database keeps (`result_zips`, issue 18), by job id,
    /// read behind the server's back; `data_dir` is the server's (its SQLite file is there).
    pub async fn result_zips(
        &self,
        data_dir: &std::path::Path,
    ) -> std::collections::BTreeMap<i64, Vec<u8>> {
        match self {
            TestDb::Sqlite => {
                let conn = rusqlite::Connection::open(data_dir.join("jobrelay.sqlite")).unwrap();
                let mut stmt = conn.prepare("SELECT job_id, zip FROM result_zips").unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            TestDb::Postgres(schema) => {
                let (client, connection) =
                    tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                let connection = tokio::spawn(connection);
                let rows = client
                    .query("SELECT job_id, zip FROM result_zips", &[])
                    .await
                    .unwrap();
                drop(client);
                let _ = connection.await;
                rows.iter().map(|r| (r.get(0), r.get(1))).collect()
            }
        }
    }
}

impl TestDb {
    /// The input files the server's database keeps (`input_files`, issue 18): by job id,
    /// (name, bytes) in their stored order; read behind the server's back.
    pub async fn input_files(
        &self,
        data_dir: &std::path::Path,
    ) -> std::collections::BTreeMap<i64, Vec<(String, Vec<u8>)>> {
        let rows: Vec<(i64, String, Vec<u8>)> = match self {
            TestDb::Sqlite => {
                let conn = rusqlite::Connection::open(data_dir.join("jobrelay.sqlite")).unwrap();
                let mut stmt = conn
                    .prepare("SELECT job_id, name, bytes FROM input_files ORDER BY job_id, pos")
                    .unwrap();
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            TestDb::Postgres(schema) => {
                let (client, connection) =
                    tokio_postgres::connect(&schema.url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                let connection = tokio::spawn(connection);
                let rows = client
                    .query(
                        "SELECT job_id, name, bytes FROM input_files ORDER BY job_id, pos",
                        &[],
                    )
                    .await
                    .unwrap();
                drop(client);
                let _ = connection.await;
                rows.iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect()
            }
        };
        let mut out = std::collections::BTreeMap::<i64, Vec<(String, Vec<u8>)>>::new();
        for (id, name, bytes) in rows {
            out.entry(id).or_default().push((name, bytes));
        }
        out
    }
}

/// `on_both_databases!(#[tokio::test] async_fn_name, ...)`: for each `async fn NAME(db:
/// TestDb)`, a test `sqlite::NAME` and a test `postgres::NAME` (skipped with the reason
/// printed without `JOBRELAY_TEST_POSTGRES`), each with the attributes given (`#[tokio::test]`
/// and, say, `#[ignore = "slow"]`).
#[macro_export]
macro_rules! on_both_databases {
    ($($(#[$attr:meta])+ $name:ident),* $(,)?) => {
        mod sqlite {
            $($(#[$attr])+ async fn $name() {
                super::$name($crate::support::db::TestDb::Sqlite).await
            })*
        }
        mod postgres {
            $($(#[$attr])+ async fn $name() {
                let Some(schema) = $crate::support::db::Schema::new().await else {
                    return;
                };
                super::$name($crate::support::db::TestDb::Postgres(schema)).await
            })*
        }
    };
}
