//! What changes on a client: its change feed (`GET /events`) and a payload's logs
//! (`GET /log/{id}`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use jobrelay_common::protocol::{ErrorBody, EventsPage};

use super::{exchange, url, Failure, To, SMALL_REQUEST};
use crate::clients::{self, ClientHandle};
use crate::Shared;

/// How long one `/events` call may wait on the client.
const EVENTS_WAIT_SECS: u64 = 20;

/// Beyond the wait of `/events`, how long its answer may take to arrive.
const EVENTS_MARGIN: Duration = Duration::from_secs(15);

/// `GET /events` after sequence number `after`: with `long_poll` the client holds the call
/// until something changes (or its wait is over), else it answers at once. The call carries
/// the releases queued for the client ([`super::release`]); if it fails they are queued
/// again.
pub async fn events(
    shared: &Arc<Shared>,
    client: &Arc<ClientHandle>,
    after: u64,
    long_poll: bool,
) -> Result<EventsPage, String> {
    let wait = if long_poll { EVENTS_WAIT_SECS } else { 0 };
    let releases = client.releases.take_for_call();
    let page = async {
        let response = client
            .http
            .get(url(
                &client.endpoint,
                To::Events {
                    after,
                    wait,
                    releases: &releases,
                },
            ))
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
        Err(why) => {
            // Whether the client released them is not known: again is harmless.
            if client.releases.put_back(releases) {
                super::control::flush_later(shared, client);
            }
            clients::failed(&shared.lifecycle, client, why)
        }
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
