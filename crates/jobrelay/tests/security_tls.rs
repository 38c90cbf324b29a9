//! HTTPS: server and client serve TLS from certificate and key files, the server verifies its
//! clients' certificates against a CA file, and a job runs end to end over TLS. The tests make
//! their own CA and certificates with rcgen.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::server::*;
use support::*;

const LONG: Duration = Duration::from_secs(90);

/// A CA, and a certificate for 127.0.0.1 / localhost signed by it, written as PEM files:
/// (ca.pem, cert.pem, key.pem).
fn make_certificates(dir: &Path, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{prefix} test CA"));
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{prefix}-ca.pem")),
        dir.join(format!("{prefix}-cert.pem")),
        dir.join(format!("{prefix}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&paths.2, std::fs::Permissions::from_mode(0o600)).unwrap();
    paths
}

/// An HTTP client trusting only this CA.
fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_job_runs_end_to_end_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certificates(dir.path(), "site");
    let token = dir.path().join("token");
    std::fs::write(&token, "tls-shared-secret").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let mut client_args = tls.to_vec();
    client_args.extend(["--token-file", token.to_str().unwrap()]);
    let client = start_client(dir.path(), "client", &client_args);
    assert!(client.url.starts_with("https://"), "{}", client.url);
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let mut server_args = tls.to_vec();
    server_args.extend([
        "--client-ca",
        ca.to_str().unwrap(),
        "--client-token-file",
        token.to_str().unwrap(),
    ]);
    let server = TestServer::start(dir.path(), &config, &server_args);
    assert!(server.url.starts_with("https://"), "{}", server.url);

    let http = https_client(&ca);
    let id = upload_job(
        &http,
        &server.url,
        5,
        "example",
        &[("run.sh", b"echo secure > out.txt\n")],
    )
    .await;
    wait_status(&http, &server.url, id, &["Completed"], LONG).await;
    let entries = unzip(&download_zip(&http, &server.url, id).await);
    assert_eq!(entries["out.txt"], b"secure\n");

    // Plain HTTP to a TLS port gets nowhere; a client that does not trust the CA neither.
    let plain_url = server.url.replace("https://", "http://");
    let plain = support::http()
        .get(format!("{plain_url}/health"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let (other_ca, _, _) = make_certificates(dir.path(), "other");
    assert!(https_client(&other_ca)
        .get(format!("{}/health", server.url))
        .send()
        .await
        .is_err());

    // The CLI talks to an https server with --ca-cert.
    let output = std::process::Command::new(binary())
        .args(["status", &id.to_string(), "--server", &server.url, "--json"])
        .arg("--ca-cert")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("Completed"));
}

#[tokio::test]
async fn the_server_refuses_a_client_whose_certificate_its_ca_did_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = make_certificates(dir.path(), "site");
    let (_, rogue_cert, rogue_key) = make_certificates(dir.path(), "rogue");
    let client = start_client(
        dir.path(),
        "client",
        &[
            "--tls-cert",
            rogue_cert.to_str().unwrap(),
            "--tls-key",
            rogue_key.to_str().unwrap(),
        ],
    );
    let config = write_server_config(dir.path(), &[("example", vec![client.url.clone()], 5, 10)]);
    let server = TestServer::start(dir.path(), &config, &["--client-ca", ca.to_str().unwrap()]);
    let http = http();
    let id = upload_job(&http, &server.url, 5, "example", &[("run.sh", b"true\n")]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = job_json(&http, &server.url, id).await;
    assert_eq!(job["status"], "Queued", "{job}");
    assert!(
        std::fs::read_dir(dir.path().join("client/payloads"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(true),
        "the job reached the rogue client"
    );
}

#[tokio::test]
async fn tls_flags_go_together_and_bad_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = make_certificates(dir.path(), "site");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    for (args, expected) in [
        (vec!["--tls-cert", cert.to_str().unwrap()], "--tls-key"),
        (
            vec![
                "--tls-cert",
                garbage.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
            "certificate",
        ),
    ] {
        let (status, stderr) = run_client_until_exit(&dir.path().join("data"), &args, &[]);
        assert!(!status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
