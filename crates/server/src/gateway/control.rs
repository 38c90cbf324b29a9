//! Orders about one payload: `POST /kill/{id}` and `POST /release/{id}`.

use std::time::Duration;

use axum::http::StatusCode;

use std::sync::Arc;

use super::{exchange, url, Failure, To, RELEASE_IN_EVENTS, SMALL_REQUEST};
use crate::clients::ClientHandle;
use crate::pending_releases::flush_after;
use crate::Shared;

/// Timeout of `/kill`: the client answers once the process group is gone, which takes up
/// to its kill grace.
const KILL_WAIT: Duration = Duration::from_secs(120);

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

/// The client may remove its copy of the payload (the results are stored). Best effort, and
/// only towards a client with the `release` extension. Towards one that takes releases in
/// `/events` (`release_in_events`) it is queued for the next call of its collector, and sent
/// on its own if none takes it within [`flush_after`]; else `POST /release/{dest}` now.
pub async fn release(shared: &Arc<Shared>, client: &Arc<ClientHandle>, dest: i64) {
    if !client.has("release") {
        return;
    }
    if client.has("events") && client.has(RELEASE_IN_EVENTS) {
        if client.releases.push(dest) {
            flush_later(shared, client);
        }
        return;
    }
    release_now(shared, client, dest).await;
}

/// Sends what is still queued once [`flush_after`] is over.
pub(super) fn flush_later(shared: &Arc<Shared>, client: &Arc<ClientHandle>) {
    let (shared, client) = (shared.clone(), client.clone());
    // Not a term's task: a release is no leader's business, and a flush due that a new term
    // dropped would leave the queue without one.
    shared.clone().job_tasks.spawn_for_process(async move {
        tokio::time::sleep(flush_after()).await;
        for dest in client.releases.flush() {
            release_now(&shared, &client, dest).await;
        }
    });
}

/// Sends every release still queued, for every client (a server stopping).
pub async fn flush_releases(shared: &Shared) {
    for client in shared.clients.all() {
        for dest in client.releases.flush() {
            release_now(shared, &client, dest).await;
        }
    }
}

/// `POST /release/{dest}`.
async fn release_now(shared: &Shared, client: &ClientHandle, dest: i64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
