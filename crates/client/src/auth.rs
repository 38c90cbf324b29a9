//! The shared secret between the server and this client. With a token configured every
//! request but `GET /` and `GET /health` must carry `Authorization: Bearer <token>`; anything
//! else is answered 401 `{"error": ...}` before a handler runs.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jobrelay_common::auth::{bearer, Secret};
use jobrelay_common::protocol::ErrorBody;

/// Requests anyone may make: a ping and the health check (load balancers, monitors).
fn is_open(request: &Request) -> bool {
    request.method() == Method::GET && matches!(request.uri().path(), "/" | "/health")
}

/// Middleware: lets a request through if it is open or carries the token.
pub async fn require_token(
    State(token): State<Arc<Secret>>,
    request: Request,
    next: Next,
) -> Response {
    if is_open(&request) {
        return next.run(request).await;
    }
    match bearer(request.headers()) {
        Some(given) if token.matches(given) => next.run(request).await,
        given => {
            let error = if given.is_some() {
                "wrong token"
            } else {
                "this client needs Authorization: Bearer <token> (the server's client token)"
            };
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(ErrorBody {
                    error: error.into(),
                }),
            )
                .into_response()
        }
    }
}
