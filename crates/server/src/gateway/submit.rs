//! `POST /submit`: the job's files as a multipart form, and what the answer says.

use std::path::PathBuf;

use axum::http::StatusCode;
use futures_util::{StreamExt, TryStreamExt};
use jobrelay_common::protocol::PayloadRecord;
use reqwest::multipart::{Form, Part};

use super::{url, To};
use crate::clients::{self, ClientHandle};
use crate::store::JobResources;
use crate::Shared;

/// Size of the chunks files are read in when streamed to a client.
const STREAM_CHUNK: usize = 256 * 1024;

/// The answer to a submission.
pub enum Submitted {
    /// The client took the payload.
    Accepted(Box<PayloadRecord>),
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
    /// out a payload made under the request's key (`answer_maybe_received`).
    Failed {
        status: StatusCode,
        maybe_received: bool,
        why: String,
    },
}

/// A file of a job, as sent in the form: its name relative to the job's directory (with
/// '/'), and its bytes.
pub struct JobFile {
    pub name: String,
    pub body: FileBody,
}

/// Where a job file's bytes are.
pub enum FileBody {
    /// In the job's directory, `len` bytes.
    Disk { path: PathBuf, len: u64 },
    /// Kept in the database with the job, read into memory.
    Kept(bytes::Bytes),
}

/// The multipart form of a submission: field `key` first when given, then the job's request
/// (`cores`, `memory` in MiB, `gpus`, `walltime` in seconds) when it asked for more than one
/// core and nothing else, then a field `file` per file with its relative name as the
/// filename. A client that does not read the request ignores those text fields.
fn form_for(files: Vec<JobFile>, key: Option<&str>, resources: &JobResources) -> Form {
    use jobrelay_common::resources::{CORES_FIELD, GPUS_FIELD, MEMORY_FIELD, WALLTIME_FIELD};
    let mut form = Form::new();
    if let Some(key) = key {
        form = form.text("key", key.to_owned());
    }
    let nothing_asked = JobResources {
        priority: resources.priority,
        ..JobResources::default()
    };
    if *resources != nothing_asked {
        form = form
            .text(CORES_FIELD, resources.cores.to_string())
            .text(GPUS_FIELD, resources.gpus.to_string());
        if let Some(mb) = resources.memory_mb {
            form = form.text(MEMORY_FIELD, mb.to_string());
        }
        if let Some(secs) = resources.walltime_s {
            form = form.text(WALLTIME_FIELD, secs.to_string());
        }
    }
    for file in files {
        // The same part either way: a known length, no content type, the name as filename.
        let part = match file.body {
            FileBody::Disk { path, len } => Part::stream_with_length(lazy_file_body(path), len),
            FileBody::Kept(bytes) => {
                let len = bytes.len() as u64;
                Part::stream_with_length(reqwest::Body::from(bytes), len)
            }
        };
        form = form.part("file", part.file_name(file.name));
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
    resources: &JobResources,
) -> Submitted {
    let answer = client
        .http
        .post(url(&client.endpoint, To::Submit))
        .multipart(form_for(files, key, resources))
        .send()
        .await;
    let response = match answer {
        Ok(r) => r,
        Err(e) => {
            let why = format!("could not send to {}: {e}", client.base());
            clients::failed(&shared.lifecycle, client, &why);
            return Submitted::Unreachable {
                maybe_received: may_have_reached(&e),
                why,
            };
        }
    };
    let status = response.status();
    let failed = |e: String| {
        let why = format!("{} /submit failed: {e}", client.base());
        clients::failed(&shared.lifecycle, client, &why);
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
            clients::full(&shared.lifecycle, client);
            Submitted::NoRoom
        }
        SubmitStatus::Failed => failed(format!("answered {status}")),
        SubmitStatus::Success => match response.json::<PayloadRecord>().await {
            Ok(record) => {
                clients::reached(client);
                Submitted::Accepted(Box::new(record))
            }
            Err(e) => failed(format!("unreadable answer: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
