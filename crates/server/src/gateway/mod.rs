//! The one way the server talks to its executor clients: a function per client endpoint
//! (`/submit`, `/retrieve`, `/retrieve_partial`, `/kill`, `/release`, `/events`, `/log`,
//! `/info` + `/health`, `/load`), each answering a type that says what happened.
//!
//! It owns what is HTTP about a client: the URLs (no other module builds one), the
//! multipart form of a submission, the timeouts, the reading of status codes and headers,
//! and the client's bookkeeping: an answer marks the client reached, a request that got none
//! (or a `/submit` or `/events` that answered an error) marks it failed, which takes it out
//! of placement and wakes its probe. What an answer means for a job is the caller's to say.
//!
//! Here: each client's HTTP client, the URLs, a streamed ZIP ([`Download`]), the failure of
//! a request ([`Failure`]). Per endpoint: `submit`, `retrieve`
//! (and `/retrieve_partial`), `control` (`/kill`, `/release`), `feeds` (`/events`, `/log`),
//! `health` (`/info`, `/health`, `/load`).

mod control;
mod feeds;
mod health;
mod retrieve;
mod submit;

use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};

use crate::clients::{self, ClientHandle};
use crate::config::ClientEndpoint;
use crate::Shared;

pub use control::{flush_releases, kill, release, Killed};
pub use feeds::{events, log, Log};
pub use health::{load, probe, Probe, REFUSES_TOKEN};
pub use retrieve::{look, retrieve, retrieve_partial, ResultZip, Retrieved};
pub use submit::{submit, FileBody, JobFile, Submitted};

/// Timeout of the small requests (`/info`, `/health`, `/load`, `/release`, `/log`, a look
/// at one payload).
pub const SMALL_REQUEST: Duration = Duration::from_secs(10);

/// The client's extension that takes releases in `/events` (`release=ID,…`).
pub const RELEASE_IN_EVENTS: &str = "release_in_events";

/// How long a connection to a client may wait idle in the pool
/// ([`jobrelay_common::serve::pool_idle`]; the server assumes its clients run with the
/// `JOBRELAY_SLOW_REQUEST_SECS` it has itself). A connection reused just as the client closes
/// it would be a send that fails and uses up an attempt.
pub fn pool_idle() -> Duration {
    jobrelay_common::serve::pool_idle()
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

/// The base URL that names a joined client (`http://<node>.joined`): a name only, every
/// connection to it goes to the Unix socket of its tunnels ([`http_for_joined`]).
pub fn joined_base(node: &str) -> String {
    format!("http://{node}.joined")
}

/// The HTTP client for requests to a joined client: as [`http_for`], but every connection
/// goes to `socket`, where the server's relay hands it to one of the client's tunnels. No
/// token: the tunnel was opened with the client's credential, and the socket's directory is
/// the server's own (0700).
pub fn http_for_joined(socket: &std::path::Path) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .unix_socket(socket.to_path_buf())
        .read_timeout(Duration::from_secs(120))
        .pool_idle_timeout(pool_idle())
        .build()
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
        /// Payloads to release (`release_in_events`).
        releases: &'a [i64],
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
        To::Events {
            after,
            wait,
            releases,
        } => {
            let mut url = format!("{base}/events?after={after}&wait={wait}");
            for (n, dest) in releases.iter().enumerate() {
                url.push_str(if n == 0 { "&release=" } else { "," });
                url.push_str(&dest.to_string());
            }
            url
        }
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
            clients::failed(&shared.lifecycle, client, &why);
            Err(Failure::Unreachable(why))
        }
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
                    wait: 20,
                    releases: &[]
                }
            ),
            "http://127.0.0.1:9000/events?after=12&wait=20"
        );
        assert_eq!(
            url(
                &endpoint,
                To::Events {
                    after: 12,
                    wait: 0,
                    releases: &[3, 40]
                }
            ),
            "http://127.0.0.1:9000/events?after=12&wait=0&release=3,40"
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
}
