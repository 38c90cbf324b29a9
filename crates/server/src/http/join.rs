//! The routes of clients that join at run time ([`crate::joined`]): `POST /join` (a join
//! token → a credential), `GET /join/tunnel` (an HTTP upgrade that becomes a connection from
//! the server to the client, or 204 after a wait), `POST /join/leave`. They check their own
//! tokens (not the users file's): a joining client is no user.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jobrelay_common::auth::bearer;
use jobrelay_common::http::FALLBACK_DRAIN_LIMIT;
use utoipa::OpenApi;

use crate::http::error::{ApiError, JobAnswer};
use crate::joined::{self, JoinAnswer, JoinRequest, Refused};
use crate::Shared;

/// Largest `/join` body.
const MAX_JOIN_BODY: usize = 16 * 1024;
/// The `Upgrade` protocol of a tunnel.
pub const TUNNEL_PROTOCOL: &str = "jobrelay-tunnel";

/// These routes' part of `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(join, tunnel, leave),
    components(schemas(JoinRequest, JoinAnswer))
)]
pub struct JoinDoc;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/join", post(join))
        .route("/join/tunnel", get(tunnel))
        .route("/join/leave", post(leave))
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Off => ApiError::new(
                StatusCode::NOT_FOUND,
                "joining is off on this server (no join token configured)",
            ),
            Refused::Bad(why) => ApiError::new(StatusCode::BAD_REQUEST, why),
            Refused::Unauthorized(why) => ApiError::new(StatusCode::UNAUTHORIZED, why),
            Refused::Forbidden(why) => ApiError::new(StatusCode::FORBIDDEN, why),
            Refused::InUse(why) => ApiError::new(StatusCode::CONFLICT, why),
            Refused::Standby => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this server stands by: joined clients are served by the leader; ask again",
            ),
            Refused::Failed(why) => {
                tracing::error!(why, "a client could not join");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, why)
            }
        }
    }
}

fn peer(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_default()
}

fn token(headers: &HeaderMap) -> Option<String> {
    bearer(headers).map(str::to_owned)
}

/// Join a service.
#[utoipa::path(post, path = "/join", request_body = JoinRequest, responses(
    (status = 200, description = "Joined (or joined again with the same node id)", body = JoinAnswer),
    (status = 400, description = "A bad body", body = JobAnswer),
    (status = 401, description = "A missing or wrong join token", body = JobAnswer),
    (status = 403, description = "A service that cannot be joined", body = JobAnswer),
    (status = 404, description = "Joining is off", body = JobAnswer),
    (status = 409, description = "The node id is held by a live client and the join did not show its credential", body = JobAnswer),
    (status = 503, description = "This server stands by: ask again (the leader serves joined clients)", body = JobAnswer),
))]
async fn join(State(shared): State<Arc<Shared>>, request: Request) -> Result<Response, ApiError> {
    let from = peer(&request);
    let token = token(request.headers());
    let body = axum::body::to_bytes(request.into_body(), MAX_JOIN_BODY)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a join body is at most {MAX_JOIN_BODY} bytes: {e}"),
            )
        })?;
    let wanted: JoinRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad join body: {e}")))?;
    let answer = joined::join(&shared, token.as_deref(), wanted, &from).await?;
    Ok(Json(answer).into_response())
}

/// Offer a tunnel.
#[utoipa::path(get, path = "/join/tunnel", responses(
    (status = 101, description = "The connection is now the server's connection to the client"),
    (status = 204, description = "Nothing needed one within the wait: ask again"),
    (status = 400, description = "Not an upgrade to jobrelay-tunnel", body = JobAnswer),
    (status = 401, description = "A missing or unknown credential", body = JobAnswer),
    (status = 503, description = "This server stands by: ask again", body = JobAnswer),
))]
async fn tunnel(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let client = match joined::by_credential(&shared, token(request.headers()).as_deref()) {
        Ok(client) => client,
        Err(refused) => {
            jobrelay_common::upload::drain_body(request.into_body(), FALLBACK_DRAIN_LIMIT).await;
            return Err(refused.into());
        }
    };
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !upgrade.is_some_and(|v| v.eq_ignore_ascii_case(TUNNEL_PROTOCOL)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("a tunnel is an HTTP/1.1 upgrade to {TUNNEL_PROTOCOL}"),
        ));
    }
    let from = peer(&request);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let Some(connection) = joined::next_connection(&client, &from).await else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    shared.job_tasks.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                joined::splice(hyper_util::rt::TokioIo::new(upgraded), connection).await
            }
            Err(e) => tracing::debug!(error = %e, "a tunnel's upgrade failed"),
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, TUNNEL_PROTOCOL),
        ],
    )
        .into_response())
}

/// Leave: no new job is placed on the client.
#[utoipa::path(post, path = "/join/leave", responses(
    (status = 200, description = "No new job goes there; its jobs finish", body = JobAnswer),
    (status = 401, description = "A missing or unknown credential", body = JobAnswer),
))]
async fn leave(State(shared): State<Arc<Shared>>, request: Request) -> Result<Response, ApiError> {
    let credential = token(request.headers());
    // A leave carries no body: what a sender sent anyway is read, so it reads the answer.
    jobrelay_common::upload::drain_body(request.into_body(), FALLBACK_DRAIN_LIMIT).await;
    let client = joined::by_credential(&shared, credential.as_deref())?;
    joined::leave(&shared, &client);
    Ok(Json(JobAnswer {
        id: 0,
        status: "Leaving".into(),
        message: format!("{} gets no new jobs", client.base()),
    })
    .into_response())
}
