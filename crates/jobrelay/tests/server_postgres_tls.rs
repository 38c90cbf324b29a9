//! The server reaches PostgreSQL over TLS as the URL's `sslmode` says: on a PostgreSQL of
//! this test's own (started with ../shared/postgres/start-postgres.sh and given a certificate
//! of a CA made here), `verify-full` with that CA as `sslrootcert` connects and runs a job
//! with every connection encrypted (pg_stat_ssl), `require` connects without checking, and
//! `verify-full` against another CA is refused at start with the reason. Skips, saying why,
//! without JOBRELAY_TEST_POSTGRES (the sign that PostgreSQL can be run here) or the script.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::db::{admin, postgres_url};
use support::net::free_port;
use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(120);

/// `shared/postgres/` of the team: beside the repository (as `.ci/run` finds it), or where
/// JOBRELAY_SHARED says.
fn postgres_scripts() -> Option<PathBuf> {
    let shared = std::env::var_os("JOBRELAY_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let dir = shared.join("postgres");
    dir.join("start-postgres.sh").is_file().then_some(dir)
}

/// A PostgreSQL server of this test's own, stopped and wiped when dropped.
struct OwnPostgres {
    scripts: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn start(scripts: &Path) -> OwnPostgres {
        let port = free_port();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        // Not under a private temporary directory: the postgres user must reach it.
        let dir = PathBuf::from(format!(
            "/tmp/jobrelay-pg-tls-{}-{nanos}",
            std::process::id()
        ));
        let own = OwnPostgres {
            scripts: scripts.to_owned(),
            dir,
            port,
        };
        let output = Command::new("bash")
            .arg(scripts.join("start-postgres.sh"))
            .env("PG_PORT", port.to_string())
            .env("PG_DIR", &own.dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        own
    }

    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/jobrelay_test{query}",
            self.port
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop-postgres.sh"))
            .env("PG_DIR", &self.dir)
            .env("PG_WIPE", "1")
            .status();
    }
}

/// A CA and a certificate for 127.0.0.1 / localhost signed by it, as PEM: (ca, cert, key).
fn certificates() -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "jobrelay PostgreSQL test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Runs `jobrelay server --db <url>` to its end (it fails at start) and answers its stderr.
fn failed_start(dir: &Path, config: &Path, url: &str) -> String {
    let output = Command::new(binary())
        .args(["server", "--port", "0", "--data-dir"])
        .arg(dir.join("refused"))
        .arg("--config")
        .arg(config)
        .args(["--db", url])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_server_reaches_postgres_over_tls_as_sslmode_says() {
    if postgres_url().is_none() {
        return;
    }
    let Some(scripts) = postgres_scripts() else {
        println!("skipped: no shared/postgres/start-postgres.sh beside the repository (or JOBRELAY_SHARED)");
        return;
    };
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root_user {
        println!("skipped: start-postgres.sh needs root (it runs PostgreSQL as the postgres user)");
        return;
    }
    let pg = OwnPostgres::start(&scripts);
    let (ca, cert, key) = certificates();
    let (cert_file, key_file) = (pg.dir.join("server.crt"), pg.dir.join("server.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let chown = Command::new("chown")
        .arg("postgres:postgres")
        .args([&cert_file, &key_file])
        .status()
        .unwrap();
    assert!(chown.success());
    let plain = pg.url("");
    // One statement at a time: ALTER SYSTEM refuses to run inside a transaction block.
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert_file.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key_file.display()),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        admin(&plain, &sql).await;
    }
    // The reload is asynchronous: wait until a new connection's backend has it.
    eventually(LONG, "TLS switched on", || async {
        let (client, connection) = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
            .await
            .ok()?;
        let connection = tokio::spawn(connection);
        let on = client
            .query_one("SHOW ssl", &[])
            .await
            .ok()?
            .get::<_, String>(0)
            == "on";
        drop(client);
        let _ = connection.await;
        on.then_some(())
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca_file = root.join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let client = start_client(root, "client", &[]);
    let config = write_server_config(root, &[("example", vec![client.url.clone()], 10, 10)]);

    // verify-full against the CA that signed the server's certificate.
    let verified = pg.url(&format!(
        "?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    ));
    let server = TestServer::start(root, &config, &["--db", &verified]);
    let http = http();
    let id = upload_job(
        &http,
        &server.url,
        1,
        "example",
        &[("run.sh", b"echo tls > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"tls\n");
    let (encrypted, plain_count) = {
        let (client, connection) = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE s.ssl), COUNT(*) FILTER (WHERE NOT s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = 'jobrelay'",
                &[],
            )
            .await
            .unwrap();
        let counts = (row.get::<_, i64>(0), row.get::<_, i64>(1));
        drop(client);
        let _ = connection.await;
        counts
    };
    assert!(encrypted >= 1, "no encrypted connection of the server");
    assert_eq!(plain_count, 0, "a connection of the server in plain text");
    drop(server);

    // require: encrypted, the certificate not checked (libpq's meaning).
    let server = TestServer::start(root, &config, &["--db", &pg.url("?sslmode=require")]);
    let health = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    drop(server);

    // verify-full against a CA that did not sign it: refused at start, saying why.
    let (other_ca, _, _) = certificates();
    let other_file = root.join("other-ca.pem");
    std::fs::write(&other_file, other_ca).unwrap();
    let refused = pg.url(&format!(
        "?sslmode=verify-full&sslrootcert={}",
        other_file.display()
    ));
    let stderr = failed_start(root, &config, &refused);
    assert!(
        stderr.contains("cannot open the PostgreSQL database"),
        "{stderr}"
    );
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    drop(client);
}
