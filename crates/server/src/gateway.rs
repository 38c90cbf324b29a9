//! The one way the server talks to its executor clients: a function per client endpoint
//! (`/submit`, `/retrieve`, `/retrieve_partial`, `/kill`, `/release`, `/events`, `/log`,
//! `/info` + `/health`, `/load`), each answering a type that says what happened.
//!
//! It owns what is HTTP about a client: the URLs (no other module builds one), the
//! multipart form of a submission, the timeouts, the reading of status codes and headers,
//! and the client's bookkeeping: an answer marks the client reached, a request that got none
//! (or a `/submit` or `/events` that answered an error) marks it failed, which takes it out
//! of placement and wakes its probe. What an answer means for a job is the caller's to say.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use jobrelay_common::protocol::{
    ClientInfo, ErrorBody, EventsPage, PayloadRecord, RESULT_KEY_HEADER, RESULT_NODE_HEADER,
};
use reqwest::multipart::{Form, Part};

use crate::clients::{self, ClientHandle};
use crate::config::ClientEndpoint;
use crate::Shared;

/// Timeout of the small requests (`/info`, `/health`, `/load`, `/release`, `/log`, a look
/// at one payload).
pub const SMALL_REQUEST: Duration = Duration::from_secs(10);
/// Timeout of `/kill`: the client answers once the process group is gone, which takes up
/// to its kill grace.
const KILL_WAIT: Duration = Duration::from_secs(120);
/// How long one `/events` call may wait on the client.
const EVENTS_WAIT_SECS: u64 = 20;
/// Beyond the wait of `/events`, how long its answer may take to arrive.
const EVENTS_MARGIN: Duration = Duration::from_secs(15);
/// Size of the chunks files are read in when streamed to a client.
const STREAM_CHUNK: usize = 256 * 1024;
/// Start of the probe error of a client that answers 401/403.
pub const REFUSES_TOKEN: &str = "the client refuses our token";

/// How long a connection to a client may wait idle in the pool: half the time after which a
/// client closes an idle keep-alive connection (`jobrelay_common::serve::slow_request`, 30 s
/// unless `JOBRELAY_SLOW_REQUEST_SECS` says otherwise; the server assumes its clients run
/// with the value it has itself). Pooled as long as the client keeps it, a connection could
/// be reused just as the client closes it: a send that fails and uses up an attempt.
pub fn pool_idle() -> Duration {
    jobrelay_common::serve::slow_request() / 2
}

/// The certificates of a PEM bundle (`--client-ca`).
pub fn certificates(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())
}

/// The HTTP client for requests to `endpoint`: timeouts as the server's, and its token (if
/// any) in every request's `Authorization` header.
/// `ca`: the only certificates an `https://` client's certificate may be signed by.
pub fn http_for(
    endpoint: &ClientEndpoint,
    ca: Option<&[reqwest::Certificate]>,
) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(120))
        .pool_idle_timeout(pool_idle());
    if let Some(token) = &endpoint.token {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, token.header_value());
        builder = builder.default_headers(headers);
    }
    if let Some(ca) = ca {
        builder = builder.tls_certs_only(ca.iter().cloned());
    }
    builder.build()
}

/// A client endpoint, with what its URL needs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum To<'a> {
    Submit,
    Retrieve(i64),
    RetrievePartial(i64),
    Kill(i64),
    Release(i64),
    Events {
        after: u64,
        wait: u64,
    },
    Log {
        dest: i64,
        stream: &'a str,
        offset: u64,
    },
    Info,
    Health,
    Load,
}

/// The URL of `to` on the client: the configured ones for submit, retrieve and kill (a
/// reference-style configuration may name them), the protocol's paths below the base for
/// the others.
fn url(endpoint: &ClientEndpoint, to: To) -> String {
    let base = &endpoint.base;
    match to {
        To::Submit => endpoint.submit.clone(),
        To::Retrieve(dest) => format!("{}/{dest}", endpoint.retrieve),
        To::Kill(dest) => format!("{}/{dest}", endpoint.kill),
        To::RetrievePartial(dest) => format!("{base}/retrieve_partial/{dest}"),
        To::Release(dest) => format!("{base}/release/{dest}"),
        To::Events { after, wait } => format!("{base}/events?after={after}&wait={wait}"),
        To::Log {
            dest,
            stream,
            offset,
        } => format!("{base}/log/{dest}?stream={stream}&offset={offset}"),
        To::Info => format!("{base}/info"),
        To::Health => format!("{base}/health"),
        To::Load => format!("{base}/load"),
    }
}

/// A ZIP the client is sending (results, or a work directory as it is now).
pub struct Download(reqwest::Response);

impl Download {
    /// The length the client announced, if it did.
    pub fn announced_len(&self) -> Option<u64> {
        self.0.content_length()
    }

    /// The body, chunk by chunk as it arrives.
    pub fn into_stream(self) -> BoxStream<'static, std::io::Result<Bytes>> {
        self.0.bytes_stream().map_err(std::io::Error::other).boxed()
    }
}

/// The answer to a submission.
pub enum Submitted {
    /// The client took the payload.
    Accepted(PayloadRecord),
    /// The client refused the job itself (a 4xx other than 401, 403, 408 and 429): sending
    /// it again cannot help.
    Refused { status: StatusCode, body: String },
    /// The client has no disk space for the payload (507); it is kept out of placement for
    /// a while ([`clients::full`]).
    NoRoom,
    /// No answer. `maybe_received`: the connection was made, so the client may have the
    /// request (reset, cut body, timeout after connecting) and a payload may exist there;
    /// false only when no connection was ever made.
    Unreachable { maybe_received: bool, why: String },
    /// The client answered, but with no payload record (a 5xx, 401/403, 408/429, or a
    /// success whose record could not be read). `maybe_received`: the answer does not rule
    /// out a payload made under the request's key ([`answer_maybe_received`]).
    Failed {
        status: StatusCode,
        maybe_received: bool,
        why: String,
    },
}

/// A file of a job, as sent in the form: its name relative to the job's directory (with
/// '/'), where it is, and its size.
pub struct JobFile {
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
}

/// The multipart form of a submission: field `key` first when given, then a field `file`
/// per file with its relative name as the filename.
fn form_for(files: Vec<JobFile>, key: Option<&str>) -> Form {
    let mut form = Form::new();
    if let Some(key) = key {
        form = form.text("key", key.to_owned());
    }
    for file in files {
        form = form.part(
            "file",
            Part::stream_with_length(lazy_file_body(file.path), file.len).file_name(file.name),
        );
    }
    form
}

/// A body that opens its file only when the multipart body reaches it, so one descriptor is
/// open at a time however many files a job has (1,500 files under a limit of 1,024 open
/// files were accepted, then failed to send). The inputs do not change once uploaded, so
/// the size listed beforehand holds.
fn lazy_file_body(path: PathBuf) -> reqwest::Body {
    let stream = futures_util::stream::once(async move {
        let file = tokio::fs::File::open(&path).await?;
        Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(
            file,
            STREAM_CHUNK,
        ))
    })
    .try_flatten()
    .boxed();
    reqwest::Body::wrap_stream(stream)
}

/// Whether a failed request may have reached the client: only one that never connected
/// (or was never built) cannot have.
fn may_have_reached(e: &reqwest::Error) -> bool {
    !(e.is_connect() || e.is_builder())
}

/// The kind of a `/submit` answer, from its status alone.
#[derive(Debug, PartialEq)]
enum SubmitStatus {
    Success,
    /// The job's fault.
    Refused,
    NoRoom,
    /// The client's or the operator's to fix (a 5xx, a refused token, too many requests).
    Failed,
}

/// Whether a `/submit` that answered `status` without a readable record may have left a
/// payload on the client: a success whose body broke off was received; a 503 may have been
/// (the client's store answered late, and makes the payload after all).
fn answer_maybe_received(status: StatusCode) -> bool {
    status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE
}

fn submit_status(status: StatusCode) -> SubmitStatus {
    // 401/403: the client refuses our token, not the job; it is the operator's to fix, and
    // the job waits for a client that takes it.
    if status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
        && status != StatusCode::UNAUTHORIZED
        && status != StatusCode::FORBIDDEN
    {
        SubmitStatus::Refused
    } else if status == StatusCode::INSUFFICIENT_STORAGE {
        SubmitStatus::NoRoom
    } else if status.is_success() {
        SubmitStatus::Success
    } else {
        SubmitStatus::Failed
    }
}

/// Streams `files` to the client's `/submit`, with the idempotency `key` if given (only to
/// a client with the `key` extension).
pub async fn submit(
    shared: &Shared,
    client: &ClientHandle,
    files: Vec<JobFile>,
    key: Option<&str>,
) -> Submitted {
    let answer = client
        .http
        .post(url(&client.endpoint, To::Submit))
        .multipart(form_for(files, key))
        .send()
        .await;
    let response = match answer {
        Ok(r) => r,
        Err(e) => {
            let why = format!("could not send to {}: {e}", client.base());
            clients::failed(shared, client, &why);
            return Submitted::Unreachable {
                maybe_received: may_have_reached(&e),
                why,
            };
        }
    };
    let status = response.status();
    let failed = |e: String| {
        let why = format!("{} /submit failed: {e}", client.base());
        clients::failed(shared, client, &why);
        Submitted::Failed {
            status,
            maybe_received: answer_maybe_received(status),
            why,
        }
    };
    match submit_status(status) {
        SubmitStatus::Refused => Submitted::Refused {
            status,
            body: response.text().await.unwrap_or_default(),
        },
        SubmitStatus::NoRoom => {
            clients::full(shared, client);
            Submitted::NoRoom
        }
        SubmitStatus::Failed => failed(format!("answered {status}")),
        SubmitStatus::Success => match response.json::<PayloadRecord>().await {
            Ok(record) => {
                clients::reached(client);
                Submitted::Accepted(record)
            }
            Err(e) => failed(format!("unreadable answer: {e}")),
        },
    }
}

/// What the client says of one payload.
pub enum Retrieved {
    /// It is Completed: its result ZIP.
    Zip(ResultZip),
    /// It is not Completed: its record.
    Record(PayloadRecord),
    /// 404: the client does not know the payload. Each failure says what was asked and
    /// what came back.
    NotFound(String),
    /// 410: the client removed the payload's files.
    Gone(String),
    /// Another answer, or a record that could not be read.
    Failed(String),
    /// No answer.
    Unreachable(String),
}

/// A result ZIP with whose run it is, as its headers say.
pub struct ResultZip {
    /// The dispatch key of the run: `None` when the client does not say (no `result_key`
    /// extension), `Some(None)` when it says the payload has none.
    pub key: Option<Option<String>>,
    /// The client's node, if the answer says.
    pub node: Option<String>,
    pub body: Download,
}

/// The kind of a `/retrieve` answer, from its status and content type.
#[derive(Debug, PartialEq)]
enum RetrieveAnswer {
    Zip,
    Record,
    NotFound,
    Gone,
    Failed,
}

fn retrieve_answer(status: StatusCode, content_type: Option<&str>) -> RetrieveAnswer {
    match status {
        StatusCode::NOT_FOUND => RetrieveAnswer::NotFound,
        StatusCode::GONE => RetrieveAnswer::Gone,
        s if !s.is_success() => RetrieveAnswer::Failed,
        _ if content_type.is_some_and(|v| v.starts_with("application/zip")) => RetrieveAnswer::Zip,
        _ => RetrieveAnswer::Record,
    }
}

/// `GET /retrieve/{dest}`: where the payload is, its ZIP once Completed.
pub async fn retrieve(shared: &Shared, client: &ClientHandle, dest: i64) -> Retrieved {
    retrieve_within(shared, client, dest, None).await
}

/// [`retrieve`] that gives up after [`SMALL_REQUEST`] for the whole answer: a look at a
/// payload that someone waits for (before a kill), whose ZIP, if any, is not read.
pub async fn look(shared: &Shared, client: &ClientHandle, dest: i64) -> Retrieved {
    retrieve_within(shared, client, dest, Some(SMALL_REQUEST)).await
}

async fn retrieve_within(
    shared: &Shared,
    client: &ClientHandle,
    dest: i64,
    timeout: Option<Duration>,
) -> Retrieved {
    let url = url(&client.endpoint, To::Retrieve(dest));
    let mut request = client.http.get(&url);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            let why = e.to_string();
            clients::failed(shared, client, &why);
            return Retrieved::Unreachable(why);
        }
    };
    clients::reached(client);
    let status = response.status();
    let answered = || format!("GET {url} answered {status}");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match retrieve_answer(
        status,
        header(reqwest::header::CONTENT_TYPE.as_str()).as_deref(),
    ) {
        RetrieveAnswer::NotFound => Retrieved::NotFound(answered()),
        RetrieveAnswer::Gone => Retrieved::Gone(answered()),
        RetrieveAnswer::Failed => Retrieved::Failed(answered()),
        RetrieveAnswer::Zip => Retrieved::Zip(ResultZip {
            key: client.has("result_key").then(|| header(RESULT_KEY_HEADER)),
            node: header(RESULT_NODE_HEADER),
            body: Download(response),
        }),
        RetrieveAnswer::Record => match response.json::<PayloadRecord>().await {
            Ok(record) => Retrieved::Record(record),
            Err(e) => Retrieved::Failed(format!("unreadable payload record: {e}")),
        },
    }
}

/// Why a request got no usable answer.
pub enum Failure {
    /// The client answered this status.
    Answered(StatusCode),
    /// No answer, or one cut short.
    Unreachable(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Answered(status) => write!(f, "answered {status}"),
            Failure::Unreachable(why) => f.write_str(why),
        }
    }
}

/// Sends a request, recording on the client whether it was answered.
async fn exchange(
    shared: &Shared,
    client: &ClientHandle,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, Failure> {
    match request.send().await {
        Ok(response) => {
            clients::reached(client);
            Ok(response)
        }
        Err(e) => {
            let why = e.to_string();
            clients::failed(shared, client, &why);
            Err(Failure::Unreachable(why))
        }
    }
}

/// `GET /retrieve_partial/{dest}`: a ZIP of the payload's work directory as it is now.
pub async fn retrieve_partial(
    shared: &Shared,
    client: &ClientHandle,
    dest: i64,
) -> Result<Download, Failure> {
    let request = client
        .http
        .get(url(&client.endpoint, To::RetrievePartial(dest)));
    let response = exchange(shared, client, request).await?;
    if response.status().is_success() {
        Ok(Download(response))
    } else {
        Err(Failure::Answered(response.status()))
    }
}

/// The answer to a kill.
pub enum Killed {
    /// The payload's processes are gone.
    Done,
    /// 409: the payload had finished already.
    Finished,
    /// 404/405: the client cannot kill (seed contract); says what was asked and answered.
    Unsupported(String),
    /// Another answer, or none; `why` names the request.
    Failed { failure: Failure, why: String },
}

/// The kind of a `/kill` answer, from its status alone.
#[derive(Debug, PartialEq)]
enum KillAnswer {
    Done,
    Finished,
    Unsupported,
    Failed,
}

fn kill_answer(status: StatusCode) -> KillAnswer {
    match status {
        s if s.is_success() => KillAnswer::Done,
        StatusCode::CONFLICT => KillAnswer::Finished,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => KillAnswer::Unsupported,
        _ => KillAnswer::Failed,
    }
}

/// `POST /kill/{dest}`, waiting for the client to say the processes are gone.
pub async fn kill(shared: &Shared, client: &ClientHandle, dest: i64) -> Killed {
    let url = url(&client.endpoint, To::Kill(dest));
    let request = client.http.post(&url).timeout(KILL_WAIT);
    match exchange(shared, client, request).await {
        Ok(response) => {
            let status = response.status();
            let why = format!("POST {url} answered {status}");
            match kill_answer(status) {
                KillAnswer::Done => Killed::Done,
                KillAnswer::Finished => Killed::Finished,
                KillAnswer::Unsupported => Killed::Unsupported(why),
                KillAnswer::Failed => Killed::Failed {
                    failure: Failure::Answered(status),
                    why,
                },
            }
        }
        Err(failure) => Killed::Failed {
            why: failure.to_string(),
            failure,
        },
    }
}

/// `POST /release/{dest}`: the client may remove its copy of the payload (the results are
/// stored). Best effort, and only towards a client with the `release` extension.
pub async fn release(shared: &Shared, client: &ClientHandle, dest: i64) {
    if !client.has("release") {
        return;
    }
    let request = client
        .http
        .post(url(&client.endpoint, To::Release(dest)))
        .timeout(SMALL_REQUEST);
    match exchange(shared, client, request).await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::info!(dest, status = %r.status(), "client did not release payload"),
        Err(e) => tracing::info!(dest, error = %e, "could not release payload"),
    }
}

/// `GET /events` after sequence number `after`: with `long_poll` the client holds the call
/// until something changes (or its wait is over), else it answers at once.
pub async fn events(
    shared: &Shared,
    client: &ClientHandle,
    after: u64,
    long_poll: bool,
) -> Result<EventsPage, String> {
    let wait = if long_poll { EVENTS_WAIT_SECS } else { 0 };
    let page = async {
        let response = client
            .http
            .get(url(&client.endpoint, To::Events { after, wait }))
            .timeout(Duration::from_secs(EVENTS_WAIT_SECS) + EVENTS_MARGIN)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("GET /events answered {}", response.status()));
        }
        response
            .json::<EventsPage>()
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match &page {
        Ok(_) => clients::reached(client),
        Err(why) => clients::failed(shared, client, why),
    }
    page
}

/// The answer to a read of a payload's log.
pub enum Log {
    Bytes(Bytes),
    /// 409: the client refused to read the file (not a regular file of the job), saying why.
    Refused(String),
    Failed(Failure),
}

/// `GET /log/{dest}`: a window of the payload's `stream` (stdout or stderr file name as the
/// protocol names it) from `offset`.
pub async fn log(
    shared: &Shared,
    client: &ClientHandle,
    dest: i64,
    stream: &str,
    offset: u64,
) -> Log {
    let to = To::Log {
        dest,
        stream,
        offset,
    };
    let request = client
        .http
        .get(url(&client.endpoint, to))
        .timeout(SMALL_REQUEST);
    let response = match exchange(shared, client, request).await {
        Ok(r) => r,
        Err(failure) => return Log::Failed(failure),
    };
    if response.status() == StatusCode::CONFLICT {
        let why = response
            .json::<ErrorBody>()
            .await
            .map(|body| body.error)
            .unwrap_or_else(|_| "the log is not a regular file of the job".into());
        return Log::Refused(why);
    }
    if !response.status().is_success() {
        return Log::Failed(Failure::Answered(response.status()));
    }
    match response.bytes().await {
        Ok(bytes) => Log::Bytes(bytes),
        Err(e) => Log::Failed(Failure::Unreachable(e.to_string())),
    }
}

/// What a probe found.
pub enum Probe {
    /// `/info` answered.
    Info(ClientInfo),
    /// No `/info`, but `/health` answered (a seed-contract client).
    Seed,
}

/// Asks `/info`, else `/health`, each within `timeout`. The client is marked reached when
/// it answers, failed (since the probe was sent) when not or when it refuses our token.
pub async fn probe(
    shared: &Shared,
    client: &ClientHandle,
    timeout: Duration,
) -> Result<Probe, String> {
    let sent = Instant::now();
    let probe = probe_once(client, timeout).await;
    match &probe {
        Ok(_) => clients::reached(client),
        Err(why) => clients::failed_since(shared, client, why, sent),
    }
    probe
}

async fn probe_once(client: &ClientHandle, timeout: Duration) -> Result<Probe, String> {
    let response = client
        .http
        .get(url(&client.endpoint, To::Info))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET /info: {e}"))?;
    if matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) {
        return Err(format!(
            "{REFUSES_TOKEN} ({}): give the server the client's token \
             (--client-token-file, or token_file of the service)",
            response.status()
        ));
    }
    if response.status().is_success() {
        if let Ok(info) = response.json::<ClientInfo>().await {
            return Ok(Probe::Info(info));
        }
    }
    let health = client
        .http
        .get(url(&client.endpoint, To::Health))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET /health: {e}"))?;
    if health.status().is_success() {
        Ok(Probe::Seed)
    } else {
        Err(format!("GET /health answered {}", health.status()))
    }
}

/// `GET /load`: the client's load, 0 when it does not say.
pub async fn load(client: &ClientHandle, timeout: Duration) -> f64 {
    let answer = client
        .http
        .get(url(&client.endpoint, To::Load))
        .timeout(timeout)
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => r.json::<f64>().await.unwrap_or(0.0),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_configuration_and_the_protocol() {
        let mut endpoint = ClientEndpoint::from_base("http://127.0.0.1:9000/").unwrap();
        assert_eq!(url(&endpoint, To::Submit), "http://127.0.0.1:9000/submit");
        assert_eq!(
            url(&endpoint, To::Retrieve(7)),
            "http://127.0.0.1:9000/retrieve/7"
        );
        assert_eq!(url(&endpoint, To::Kill(7)), "http://127.0.0.1:9000/kill/7");
        assert_eq!(
            url(&endpoint, To::RetrievePartial(7)),
            "http://127.0.0.1:9000/retrieve_partial/7"
        );
        assert_eq!(
            url(&endpoint, To::Release(7)),
            "http://127.0.0.1:9000/release/7"
        );
        assert_eq!(
            url(
                &endpoint,
                To::Events {
                    after: 12,
                    wait: 20
                }
            ),
            "http://127.0.0.1:9000/events?after=12&wait=20"
        );
        let log = To::Log {
            dest: 3,
            stream: "stderr",
            offset: 99,
        };
        assert_eq!(
            url(&endpoint, log),
            "http://127.0.0.1:9000/log/3?stream=stderr&offset=99"
        );
        assert_eq!(url(&endpoint, To::Info), "http://127.0.0.1:9000/info");
        assert_eq!(url(&endpoint, To::Health), "http://127.0.0.1:9000/health");
        assert_eq!(url(&endpoint, To::Load), "http://127.0.0.1:9000/load");
        // A reference-style configuration names its own download and terminate URLs.
        endpoint = ClientEndpoint::from_reference(
            "http://h:1/api/submit",
            Some("http://h:1/get/"),
            Some("http://h:1/stop"),
        )
        .unwrap();
        assert_eq!(url(&endpoint, To::Submit), "http://h:1/api/submit");
        assert_eq!(url(&endpoint, To::Retrieve(5)), "http://h:1/get/5");
        assert_eq!(url(&endpoint, To::Kill(5)), "http://h:1/stop/5");
        assert_eq!(url(&endpoint, To::Info), "http://h:1/api/info");
    }

    #[test]
    fn a_submission_is_refused_only_for_the_jobs_own_fault() {
        assert_eq!(submit_status(StatusCode::OK), SubmitStatus::Success);
        assert_eq!(submit_status(StatusCode::CREATED), SubmitStatus::Success);
        for refused in [400, 404, 413, 422] {
            let status = StatusCode::from_u16(refused).unwrap();
            assert_eq!(submit_status(status), SubmitStatus::Refused, "{status}");
        }
        // The token, the client's load or its speed: not the job's doing.
        for failed in [401, 403, 408, 429, 500, 502, 503] {
            let status = StatusCode::from_u16(failed).unwrap();
            assert_eq!(submit_status(status), SubmitStatus::Failed, "{status}");
        }
        assert_eq!(
            submit_status(StatusCode::INSUFFICIENT_STORAGE),
            SubmitStatus::NoRoom
        );
    }

    #[test]
    fn only_a_success_or_a_503_may_have_left_a_payload_behind_a_failed_submit() {
        assert!(answer_maybe_received(StatusCode::OK));
        assert!(answer_maybe_received(StatusCode::CREATED));
        assert!(answer_maybe_received(StatusCode::SERVICE_UNAVAILABLE));
        for status in [401, 403, 408, 429, 500, 502, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(!answer_maybe_received(status), "{status}");
        }
    }

    #[test]
    fn a_retrieve_answer_is_a_zip_only_by_its_content_type() {
        let ok = StatusCode::OK;
        assert_eq!(
            retrieve_answer(ok, Some("application/zip")),
            RetrieveAnswer::Zip
        );
        assert_eq!(
            retrieve_answer(ok, Some("application/json")),
            RetrieveAnswer::Record
        );
        assert_eq!(retrieve_answer(ok, None), RetrieveAnswer::Record);
        assert_eq!(
            retrieve_answer(StatusCode::NOT_FOUND, Some("application/json")),
            RetrieveAnswer::NotFound
        );
        assert_eq!(
            retrieve_answer(StatusCode::GONE, None),
            RetrieveAnswer::Gone
        );
        // An error answer is never taken for results, whatever it says it carries.
        assert_eq!(
            retrieve_answer(StatusCode::INTERNAL_SERVER_ERROR, Some("application/zip")),
            RetrieveAnswer::Failed
        );
    }

    #[test]
    fn a_kill_answer_says_whether_the_run_is_stopped() {
        assert_eq!(kill_answer(StatusCode::OK), KillAnswer::Done);
        assert_eq!(kill_answer(StatusCode::ACCEPTED), KillAnswer::Done);
        assert_eq!(kill_answer(StatusCode::CONFLICT), KillAnswer::Finished);
        assert_eq!(kill_answer(StatusCode::NOT_FOUND), KillAnswer::Unsupported);
        assert_eq!(
            kill_answer(StatusCode::METHOD_NOT_ALLOWED),
            KillAnswer::Unsupported
        );
        assert_eq!(
            kill_answer(StatusCode::INTERNAL_SERVER_ERROR),
            KillAnswer::Failed
        );
        assert_eq!(kill_answer(StatusCode::UNAUTHORIZED), KillAnswer::Failed);
    }

    /// A port nothing listens on (bound, then closed).
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_request_that_never_connected_cannot_have_reached_the_client() {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let e = http
            .get(format!("http://127.0.0.1:{}/submit", closed_port()))
            .send()
            .await
            .unwrap_err();
        assert!(!may_have_reached(&e), "{e}");
    }

    #[tokio::test]
    async fn a_connection_cut_after_the_request_may_have_reached_the_client() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Reads the request, then closes without an answer: a client that died on it.
        let peer = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
        });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let e = http
            .post(format!("http://127.0.0.1:{port}/submit"))
            .body("payload")
            .send()
            .await
            .unwrap_err();
        peer.await.unwrap();
        assert!(may_have_reached(&e), "{e}");
    }
}
