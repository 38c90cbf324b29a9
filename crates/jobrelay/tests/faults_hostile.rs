//! Hostile input against every endpoint of server and client: malformed and truncated
//! multipart, huge headers, nameless parts, thousands of tiny files, every kind of bad file
//! name, bad ids, and slow-loris connections. Each case gets a 4xx JSON error, nothing is left
//! on disk, and the process keeps serving.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::multipart::{raw_multipart, RawPart};
use support::net::addr_of;
use support::server::*;
use support::*;

const BOUNDARY: &str = "hostile-boundary";

/// Headers must arrive, and a body average 1 KiB/s, within 3 s (30 s by default).
const SLOW: &[(&str, &str)] = &[("JOBRELAY_SLOW_REQUEST_SECS", "3")];

/// A raw HTTP/1.1 exchange (Connection: close): the status and the body. Every byte of the
/// request line and headers is ours, so paths and headers can be anything.
fn raw(addr: SocketAddr, head: &[u8], body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(head).unwrap();
    // The server may answer and close before reading everything we send (e.g. 413, 431).
    let _ = stream.write_all(body);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(answer.len());
    let headers = text[..split.min(text.len())].to_ascii_lowercase();
    let mut body = answer[split..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
    out
}

fn post(addr: SocketAddr, path: &[u8], content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut head = b"POST ".to_vec();
    head.extend_from_slice(path);
    head.extend_from_slice(
        format!(
            " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    raw(addr, &head, body)
}

fn request(addr: SocketAddr, method: &str, path: &[u8]) -> (u16, Vec<u8>) {
    let mut head = format!("{method} ").into_bytes();
    head.extend_from_slice(path);
    head.extend_from_slice(
        b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    raw(addr, &head, b"")
}

/// Asserts a 4xx answer whose body is a JSON object naming the error.
fn assert_json_4xx(what: &str, (status, body): (u16, Vec<u8>)) {
    assert!(
        (400..500).contains(&status),
        "{what}: status {status}, {:?}",
        String::from_utf8_lossy(&body)
    );
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        panic!(
            "{what}: {status} without a JSON body: {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    let message = json["error"]
        .as_str()
        .or(json["message"].as_str())
        .unwrap_or("");
    assert!(!message.is_empty(), "{what}: no error message in {json}");
}

/// The bad bodies every upload endpoint must refuse. `fields` are the extra text parts the
/// endpoint needs (user_id, service on the server).
fn hostile_bodies(fields: &[RawPart]) -> Vec<(String, Vec<u8>)> {
    let run: &[u8] = b"echo hi > out\n";
    let with = |files: &[RawPart]| {
        let mut parts = fields.to_vec();
        parts.extend_from_slice(files);
        raw_multipart(BOUNDARY, &parts)
    };
    let file = |name: &'static [u8]| -> RawPart<'static> { (Some(b"file"), Some(name), b"x") };
    let long = vec![b'a'; 4096];
    let long: &'static [u8] = Box::leak(long.into_boxed_slice());
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty body".into(), Vec::new()),
        ("garbage".into(), b"\x00\x01\x02 not multipart at all".to_vec()),
        ("no closing boundary".into(), {
            let mut b = with(&[(Some(b"file"), Some(b"run.sh"), run)]);
            b.truncate(b.len() - 30);
            b
        }),
        (
            "part headers never end".into(),
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"run.sh\"\r\n").into_bytes(),
        ),
        (
            "no content-disposition".into(),
            format!("--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n").into_bytes(),
        ),
        // A part without a name but with a filename is a file, as in the reference (dropin.rs).
        ("file part without a file name".into(), with(&[(Some(b"file"), None, run)])),
        ("no file at all".into(), with(&[])),
        ("dot-dot".into(), with(&[file(b"../escape")])),
        ("inner dot-dot".into(), with(&[file(b"a/../../escape")])),
        ("absolute path".into(), with(&[file(b"/tmp/escape")])),
        ("NUL".into(), with(&[file(b"a\x00b")])),
        ("newline".into(), with(&[file(b"a\nb")])),
        ("escape char".into(), with(&[file(b"a\x1b[31mb")])),
        ("DEL".into(), with(&[file(b"a\x7fb")])),
        ("invalid UTF-8".into(), with(&[file(b"a\xff\xfeb")])),
        ("4 KiB name".into(), with(&[file(long)])),
        ("only dots".into(), with(&[file(b"..")])),
        ("dot".into(), with(&[file(b".")])),
        ("trailing slash".into(), with(&[file(b"dir/")])),
        ("backslash".into(), with(&[file(b"..\\escape")])),
        (
            "a name repeated".into(),
            with(&[(Some(b"file"), Some(b"run.sh"), run), (Some(b"file"), Some(b"run.sh"), run)]),
        ),
        (
            "file and directory of one name".into(),
            with(&[file(b"a"), file(b"a/b")]),
        ),
    ];
    // Each bad name alongside a good run.sh, too: the good file must not be left behind.
    let mut alongside = Vec::new();
    for bad in [&b"../x"[..], b"/abs", b"a\x00", b"\xff"] {
        let bad: &'static [u8] = Box::leak(bad.to_vec().into_boxed_slice());
        alongside.push((
            format!("run.sh then {:?}", String::from_utf8_lossy(bad)),
            with(&[(Some(b"file"), Some(b"run.sh"), run), file(bad)]),
        ));
    }
    cases.extend(alongside);
    cases
}

/// Ids and path tricks for every `{id}` route.
const BAD_IDS: &[&[u8]] = &[
    b"-1",
    b"0",
    b"99999999999999999999999999",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"abc",
    b"1.5",
    b"1e3",
    b"%20",
    b"%FF",
    b"%00",
    b"..%2F..%2Fetc%2Fpasswd",
    b"1%2F..%2F2",
    b"%2e%2e",
    b"+1",
    b"0x1",
];

/// Opens `n` connections that trickle a request one byte at a time, and checks the server
/// closes them within `limit` while still answering others.
/// `preamble` goes at once, then one byte a second: in a header, or in the body when the
/// preamble holds whole headers.
fn slow_loris(target: SocketAddr, preamble: &[u8], n: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut streams: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(target).unwrap();
            s.write_all(preamble).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let head = b"";
    let mut open = n;
    let mut i = 0usize;
    let mut closed_at = start;
    while open > 0 {
        assert!(
            start.elapsed() < limit,
            "{open} of {n} trickling connections still open after {limit:?}"
        );
        let byte = head.get(i).copied().unwrap_or(b'a');
        let _: &[u8] = head;
        open = 0;
        for s in &mut streams {
            // A write to a connection the server closed fails (at once or one write later).
            let mut probe = [0u8; 512];
            let closed = match s.read(&mut probe) {
                Ok(0) => true,
                Ok(_) => true, // an answer (408) then close
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    s.write_all(&[byte]).is_err()
                }
                Err(_) => true,
            };
            if !closed {
                open += 1;
            }
        }
        if open > 0 {
            closed_at = Instant::now();
        }
        i += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    closed_at - start
}

fn if_server_path(server: bool) -> &'static str {
    if server {
        "/upload"
    } else {
        "/submit"
    }
}

/// 20 connections trickling a header, then 20 trickling a body; both cut off in time.
fn trickle_both(target: SocketAddr, path: &str) -> (Duration, Duration) {
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    let took_head = slow_loris(target, head.as_bytes(), 20, Duration::from_secs(30));
    let body = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"run.sh\"\r\n\r\n"
    );
    let took_body = slow_loris(target, body.as_bytes(), 20, Duration::from_secs(30));
    (took_head, took_body)
}

fn staging_and_jobs_empty(root: &Path) -> Result<(), String> {
    for sub in ["server/jobs", "server/staging", "server/results"] {
        let left = tree(&root.join(sub));
        if !left.is_empty() {
            return Err(format!("{sub}: {left:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_every_hostile_input_with_json_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = write_server_config(
        root,
        &[("example", vec!["http://127.0.0.1:9".into()], 5, 10)],
    );
    let server = TestServer::start_with_env(root, &config, &["--max-upload", "1000000"], SLOW);
    let a = addr_of(&server.url);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let fields: Vec<RawPart> = vec![
        (Some(b"user_id"), None, b"1"),
        (Some(b"service"), None, b"example"),
    ];
    let mut tried = 0;
    let cases = hostile_bodies(&fields);
    tokio::task::block_in_place(|| {
        for (what, body) in &cases {
            assert_json_4xx(what, post(a, b"/upload", &content_type, body));
            staging_and_jobs_empty(root).unwrap_or_else(|e| panic!("{what}: {e}"));
            tried += 1;
        }
        // Bad text fields.
        for (what, user, service) in [
            (
                "huge user",
                &b"99999999999999999999999"[..],
                &b"example"[..],
            ),
            ("user not UTF-8", b"\xff", b"example"),
            ("service not UTF-8", b"1", b"\xff"),
            ("service path trick", b"1", b"../example"),
        ] {
            let body = raw_multipart(
                BOUNDARY,
                &[
                    (Some(b"user_id"), None, user),
                    (Some(b"service"), None, service),
                    (Some(b"file"), Some(b"run.sh"), b"true"),
                ],
            );
            assert_json_4xx(what, post(a, b"/upload", &content_type, &body));
            staging_and_jobs_empty(root).unwrap_or_else(|e| panic!("{what}: {e}"));
            tried += 1;
        }
        // Not multipart, or a multipart without its boundary.
        for ct in [
            "application/json",
            "multipart/form-data",
            "text/plain; boundary=x",
        ] {
            assert_json_4xx(ct, post(a, b"/upload", ct, b"{}"));
            tried += 1;
        }
        // Huge headers: one 1 MiB header, and 2,000 small ones.
        let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        head.extend_from_slice(b"\r\n\r\n");
        let (status, _) = raw(a, &head, b"");
        assert!(
            status == 431 || status == 400 || status == 0,
            "huge header: {status}"
        );
        let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
        for n in 0..2000 {
            head.extend_from_slice(format!("X-H{n}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let (status, _) = raw(a, &head, b"");
        assert!(
            status == 431 || status == 400 || status == 0,
            "many headers: {status}"
        );
        tried += 2;
        // Bad ids on every {id} route.
        for id in BAD_IDS {
            for (method, route) in [
                ("GET", &b"/download/"[..]),
                ("GET", b"/download_partial/"),
                ("GET", b"/jobs/"),
                ("POST", b"/terminate/"),
            ] {
                let mut path = route.to_vec();
                path.extend_from_slice(id);
                let what = format!("{method} {}", String::from_utf8_lossy(&path));
                assert_json_4xx(&what, request(a, method, &path));
                tried += 1;
            }
        }
        // Bad list queries.
        for q in [
            &b"/jobs?user_id=abc"[..],
            b"/jobs?limit=-1",
            b"/jobs?status=Nope",
            b"/jobs?user_id=%FF",
        ] {
            assert_json_4xx(&String::from_utf8_lossy(q), request(a, "GET", q));
            tried += 1;
        }
        staging_and_jobs_empty(root).unwrap();
    });

    // Thousands of tiny files: accepted whole, or refused whole.
    let mut parts: Vec<RawPart> = fields.clone();
    let names: Vec<Vec<u8>> = (0..3000)
        .map(|n| format!("d{}/f{n}", n % 30).into_bytes())
        .collect();
    parts.push((Some(b"file"), Some(b"run.sh"), b"true"));
    for name in &names {
        parts.push((Some(b"file"), Some(name), b"x"));
    }
    let body = raw_multipart(BOUNDARY, &parts);
    let (status, answer) =
        tokio::task::block_in_place(|| post(a, b"/upload", &content_type, &body));
    // On disk, or in the database: an upload of at most 64 KiB is kept there (issue 18).
    let on_disk = tree(&root.join("server/jobs"))
        .iter()
        .filter(|p| p.is_file())
        .count();
    let in_database: usize = support::db::TestDb::Sqlite
        .input_files(&root.join("server"))
        .await
        .values()
        .map(Vec::len)
        .sum();
    let stored = on_disk + in_database;
    if status == 201 {
        assert_eq!(stored, 3001, "all of them");
    } else {
        assert_json_4xx("3000 files", (status, answer));
        assert_eq!(stored, 0);
    }
    tried += 1;

    // The slow loris: 20 connections trickling headers, cut off by the header timeout.
    let (took_head, took_body) =
        tokio::task::block_in_place(|| trickle_both(a, if_server_path(true)));
    tried += 2;
    eventually(
        Duration::from_secs(30),
        "cut uploads cleaned up",
        || async { tree(&root.join("server/staging")).is_empty().then_some(()) },
    )
    .await;
    // Still serving.
    let http = http();
    let ok = http
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let id = upload_job(&http, &server.url, 1, "example", &[("run.sh", b"true")]).await;
    assert!(id >= 1);
    eprintln!("server: {tried} hostile inputs refused; slow loris cut after {took_head:?} (headers), {took_body:?} (body)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_every_hostile_input_with_json_and_keeps_nothing() {
    let client = TestClient::start_with_env(&["--max-upload", "1000000"], SLOW);
    let a = addr_of(&client.proc.url);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let nothing = |what: &str| {
        for sub in ["staging", "work", "payloads"] {
            assert_eq!(
                client.entries_in(sub),
                Vec::<String>::new(),
                "{what}: {sub}"
            );
        }
    };
    let mut tried = 0;
    tokio::task::block_in_place(|| {
        for (what, body) in hostile_bodies(&[]) {
            assert_json_4xx(&what, post(a, b"/submit", &content_type, &body));
            nothing(&what);
            tried += 1;
        }
        for id in BAD_IDS {
            for (method, route) in [
                ("GET", &b"/retrieve/"[..]),
                ("GET", b"/retrieve_partial/"),
                ("POST", b"/kill/"),
                ("POST", b"/release/"),
            ] {
                let mut path = route.to_vec();
                path.extend_from_slice(id);
                let what = format!("{method} {}", String::from_utf8_lossy(&path));
                assert_json_4xx(&what, request(a, method, &path));
                tried += 1;
            }
        }
        for q in [
            &b"/events?after=abc"[..],
            b"/events?after=-1",
            b"/events?wait=%FF",
        ] {
            let (status, body) = request(a, "GET", q);
            if status != 200 {
                assert_json_4xx(&String::from_utf8_lossy(q), (status, body));
            }
            tried += 1;
        }
        nothing("after all");
    });
    let (took_head, took_body) =
        tokio::task::block_in_place(|| trickle_both(a, if_server_path(false)));
    tried += 2;
    let id = client.submit_script("echo fine > ok\n").await;
    assert_eq!(client.retrieve_zip(id).await["ok"], b"fine\n");
    // A wait past every limit is clamped, not a panic (answers at once: there are events).
    let (status, _) =
        tokio::task::block_in_place(|| request(a, "GET", b"/events?after=0&wait=1e99"));
    assert_eq!(status, 200);
    tried += 1;
    eprintln!("client: {tried} hostile inputs refused; slow loris cut after {took_head:?} (headers), {took_body:?} (body)");
}
