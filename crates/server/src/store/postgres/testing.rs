//! Test databases: each test gets a schema of its own (and a role owning it) in the database
//! `JOBRELAY_TEST_POSTGRES` names, so tests run in parallel on one server and leave nothing.

use super::{parse_url, PgDb};

/// Name of the variable holding the test server's URL.
pub const VARIABLE: &str = "JOBRELAY_TEST_POSTGRES";

/// The test server's URL, or `None` after printing why the test is skipped.
pub fn url() -> Option<String> {
    match std::env::var(VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!(
                "skipped: {VARIABLE} is not set (a postgres:// URL, e.g. the one \
                 ../shared/postgres/start-postgres.sh prints)"
            );
            None
        }
    }
}

/// A fresh schema, and a role of the same name that owns it and logs in with it as its
/// search path. Dropped at the end of the test with what it holds.
pub struct Scratch {
    url: String,
    pub name: String,
}

/// Runs `sql` as the URL's own user (the test server's superuser).
pub fn admin(url: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the test's admin connection");
    runtime.block_on(async {
        let (client, connection) = parse_url(url)
            .expect("the test server's URL")
            .connect(tokio_postgres::NoTls)
            .await?;
        let connection = tokio::spawn(connection);
        let result = client.batch_execute(sql).await;
        drop(client);
        let _ = connection.await;
        result
    })
}

impl Scratch {
    /// A new schema on the test server, `None` (skipped, with the reason printed) without one.
    pub fn new() -> Option<Scratch> {
        let url = url()?;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        admin(
            &url,
            &format!(
                "CREATE ROLE {name} LOGIN; CREATE SCHEMA {name} AUTHORIZATION {name};
                 ALTER ROLE {name} SET search_path = {name};"
            ),
        )
        .expect("a scratch schema on the test server");
        Some(Scratch { url, name })
    }

    /// The driver's configuration for this schema's role.
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = parse_url(&self.url).expect("the test server's URL");
        config.user(&self.name);
        config
    }

    /// A store on this schema (opened again: the same data).
    pub fn open(&self) -> PgDb {
        PgDb::connect(self.config(), &self.name).expect("a store on the scratch schema")
    }

    /// Runs `sql` in this schema, as its role.
    pub fn exec(&self, sql: &str) {
        admin(
            &self.url,
            &format!("SET search_path = {}; {sql}", self.name),
        )
        .expect("the test's SQL");
    }

    /// Runs `sql` as the server's superuser.
    pub fn admin(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        admin(&self.url, sql)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let name = &self.name;
        let _ = admin(
            &self.url,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
                 DROP SCHEMA IF EXISTS {name} CASCADE; DROP ROLE IF EXISTS {name};"
            ),
        );
    }
}
