//! Graceful stop: a server or client that gets SIGTERM closes its listening socket at once (a
//! new connection is refused, so a load balancer tries another), finishes the requests it has,
//! an upload half-sent included, and only then exits.

mod support;

use std::time::{Duration, Instant};

use support::db::TestDb;
use support::net::addr_of;
use support::server::{start_client, write_server_config, TestServer};
use support::{eventually, http, stored_record, Proc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

on_both_databases!(
    #[tokio::test]
    server_sigterm_finishes_an_upload_in_flight_and_refuses_new_connections,
);

const BOUNDARY: &str = "jobrelay-graceful-stop";

/// A multipart body: text fields, then one `file` part of `size` bytes named `data.bin`.
fn multipart(fields: &[(&str, &str)], size: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"run.sh\"\r\n\r\necho ok\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend(std::iter::repeat_n(b'x', size));
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn sigterm(process: &Proc) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(process.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// Sends the request line, headers and the first half of `body`, SIGTERMs `process`, waits
/// until a new connection is refused, sends the rest, and returns the status and body of the
/// answer. Then checks that the process exits.
async fn upload_across_sigterm(
    process: &mut Proc,
    path: &str,
    body: &[u8],
    staging: &std::path::Path,
) -> (u16, String) {
    let addr = addr_of(&process.url);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    stream.write_all(&body[..half]).await.unwrap();
    stream.flush().await.unwrap();
    // The signal must find the request being read: until its handler has started (its staging
    // directory `upload-*` exists), the connection is an idle one that a graceful stop may
    // close, as HTTP allows (on a loaded machine the headers can still sit in the socket's
    // buffer). On a shared database the staging folder holds the server's own folder from
    // its start, and the upload's directory inside that: any entry would not do.
    eventually(
        Duration::from_secs(30),
        "the upload's handler to start receiving",
        || async { has_upload_dir(staging, 2).then_some(()) },
    )
    .await;

    sigterm(process);
    eventually(
        Duration::from_secs(15),
        "new connections to be refused after SIGTERM",
        || async {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        },
    )
    .await;
    // Still there: the upload in flight holds the stop.
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the process exited with an upload in flight: {}",
        process.log()
    );

    if let Err(e) = stream.write_all(&body[half..]).await {
        panic!("sending the rest of the upload: {e}\n{}", process.log());
    }
    stream.flush().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("answer within 30 s")
        .unwrap_or_else(|e| {
            panic!(
                "reading the answer: {e} after {:?}\n{}",
                String::from_utf8_lossy(&answer),
                process.log()
            )
        });
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}\n{}", process.log()));
    let json = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(30);
    while process.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "still running 30 s after SIGTERM with nothing open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (status, json)
}

/// Whether an upload's staging directory (`upload-*`) is in `dir` or below it, at most
/// `depth` levels down.
fn has_upload_dir(dir: &std::path::Path, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry.file_name().to_string_lossy().starts_with("upload-")
            || (depth > 1
                && entry.file_type().is_ok_and(|t| t.is_dir())
                && has_upload_dir(&entry.path(), depth - 1))
    })
}

/// Finds the JSON object in a (possibly chunked) HTTP body.
fn json_of(body: &str) -> serde_json::Value {
    let start = body.find('{').expect("a JSON body");
    let end = body.rfind('}').expect("a JSON body");
    serde_json::from_str(&body[start..=end]).unwrap()
}

async fn server_sigterm_finishes_an_upload_in_flight_and_refuses_new_connections(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), "client", &[]);
    let config = write_server_config(dir.path(), &[("svc", vec![client.url.clone()], 5, 5)]);
    let mut server = TestServer::start(dir.path(), &config, &db.args(&[]));
    let body = multipart(&[("user_id", "7"), ("service", "svc")], 4 << 20);

    let (status, answer) = upload_across_sigterm(
        &mut server.proc,
        "/upload",
        &body,
        &dir.path().join("server/staging"),
    )
    .await;
    assert_eq!(status, 201, "answer: {answer}\n{}", server.log());
    let id = json_of(&answer)["id"].as_i64().unwrap();

    // The committed job is there after a restart, with all of its file.
    server.restart();
    let job: serde_json::Value = http()
        .get(format!("{}/jobs/{id}", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["id"], id, "{job}");
    assert_eq!(job["user_id"], 7, "{job}");
    // And it runs: a send cut short by the stop is not a failure of the job.
    let job = support::server::wait_status(
        &http(),
        &server.url,
        id,
        &["Completed", "Failed", "Killed", "Invalid"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(job["status"], "Completed", "{job}");
}

#[tokio::test]
async fn client_sigterm_finishes_a_submit_in_flight_and_refuses_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut client = start_client(dir.path(), "client", &[]);
    let body = multipart(&[], 4 << 20);

    let (status, answer) = upload_across_sigterm(
        &mut client,
        "/submit",
        &body,
        &dir.path().join("client/staging"),
    )
    .await;
    assert_eq!(status, 200, "answer: {answer}\n{}", client.log());
    let id = json_of(&answer)["id"].as_u64().unwrap();
    // The payload's record was written before the answer.
    let record = stored_record(&dir.path().join("client"), id);
    assert_eq!(
        record.as_ref().map(|r| r["id"].clone()),
        Some(serde_json::json!(id)),
        "no record of payload {id}"
    );
}
