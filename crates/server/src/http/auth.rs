//! Finding the caller of a request. With a users file every request but the open ones
//! (`GET /`, `/health`, `/openapi.json`, `/docs`, `/ui`) must carry
//! `Authorization: Bearer <token>` of a listed user; the rules of what a caller then sees are
//! [`crate::auth`]'s. A joined client's credential is no user's, with or without a users
//! file: it serves only the join routes, and is refused (403) everywhere else.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jobrelay_common::auth::bearer;

use crate::auth::Caller;
use crate::http::error::JobAnswer;
use crate::Shared;

/// The routes that check a join token or a joined client's credential themselves.
fn is_join_route(request: &Request) -> bool {
    matches!(
        request.uri().path(),
        "/join" | "/join/tunnel" | "/join/leave"
    )
}

/// Requests anyone may make (the join routes check their own join token or credential).
fn is_open(request: &Request) -> bool {
    if is_join_route(request) {
        return true;
    }
    request.method() == Method::GET
        && matches!(
            request.uri().path(),
            // The dashboard's page is static; the data it reads needs a token.
            "/" | "/health" | "/openapi.json" | "/docs" | "/ui"
        )
}

fn unauthorized(message: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(JobAnswer {
            id: 0,
            status: "Unknown".into(),
            message: message.into(),
        }),
    )
        .into_response()
}

/// The answer to a joined client's credential presented outside the join routes.
fn client_credential_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        Json(JobAnswer {
            id: 0,
            status: "Unknown".into(),
            message: "this is a joined client's credential: it serves only /join/tunnel and \
                      /join/leave, not the job API (use a user's token)"
                .into(),
        }),
    )
        .into_response()
}

/// True if `token` is the credential of a client that joined (every credential compared in
/// constant time, see [`crate::clients::Pool::joined_by_credential`]).
fn is_client_credential(shared: &Shared, token: &str) -> bool {
    shared.clients.joined_by_credential(token).is_some()
}

/// Middleware: finds the caller and hands it to the handlers as a request extension, or
/// answers 401 in the reference's error shape (403 for a joined client's credential off the
/// join routes).
pub async fn identify(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = bearer(request.headers());
    let caller = match &shared.config.users {
        Some(_) if is_open(&request) => Caller::Trusted,
        Some(users) => match token {
            None => {
                return unauthorized(
                    "this server needs Authorization: Bearer <your token> \
                     (jobrelay: --token or JOBRELAY_TOKEN)",
                )
            }
            Some(token) => match users.find(token) {
                Some(user) => Caller::User(user),
                None if is_client_credential(&shared, token) => return client_credential_refused(),
                None => return unauthorized("unknown token"),
            },
        },
        None => Caller::Trusted,
    };
    // Without a users file anyone is trusted, but a joined client is not anyone: its
    // credential says it is one, and a client acts on jobs only through its tunnels. The
    // same holds on the open routes of a server with a users file.
    if matches!(caller, Caller::Trusted) && !is_join_route(&request) {
        if let Some(token) = token {
            if is_client_credential(&shared, token) {
                return client_credential_refused();
            }
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}
