//! Finding the caller of a request. With a users file every request but the open ones
//! (`GET /`, `/health`, `/openapi.json`, `/docs`, `/ui`) must carry
//! `Authorization: Bearer <token>` of a listed user; the rules of what a caller then sees are
//! [`crate::auth`]'s.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jobrelay_common::auth::bearer;

use crate::auth::{Caller, Users};
use crate::http::error::JobAnswer;

/// Requests anyone may make (the join routes check their own join token or credential).
fn is_open(request: &Request) -> bool {
    if matches!(
        request.uri().path(),
        "/join" | "/join/tunnel" | "/join/leave"
    ) {
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

/// Middleware: finds the caller and hands it to the handlers as a request extension, or
/// answers 401 in the reference's error shape.
pub async fn identify(
    State(users): State<Option<Arc<Users>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match &users {
        None => Caller::Trusted,
        Some(_) if is_open(&request) => Caller::Trusted,
        Some(users) => match bearer(request.headers()) {
            None => {
                return unauthorized(
                    "this server needs Authorization: Bearer <your token> \
                     (jobrelay: --token or JOBRELAY_TOKEN)",
                )
            }
            Some(token) => match users.find(token) {
                Some(user) => Caller::User(user),
                None => return unauthorized("unknown token"),
            },
        },
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}
