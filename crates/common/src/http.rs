//! What every jobrelay HTTP API shares around its handlers: the outer layers, the JSON
//! fallbacks for unknown endpoints and methods, and the extractors whose rejections must be
//! JSON too. Each API keeps its own error body (the server answers the reference's
//! `{"id", "status", "message"}`, the client `{"error"}`) by implementing [`JsonError`].

use std::marker::PhantomData;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// An API's JSON error answer, made from a status and a message.
pub trait JsonError: IntoResponse + Send + 'static {
    fn with_status(status: StatusCode, message: String) -> Self;
}

/// Wraps `router` so that a panicking handler answers the API's JSON 500 instead of dropping
/// the connection, and every request logs one line.
pub fn with_standard_layers<E: JsonError>(router: Router) -> Router {
    router
        .layer(CatchPanicLayer::custom(|_| {
            E::with_status(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
                .into_response()
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
}

/// Answers an unknown endpoint (404) and a known one asked with another method (405) in the
/// API's JSON shape rather than axum's empty bodies. Call it before the layers that must see
/// those requests too (authentication).
pub fn with_json_fallbacks<S, E>(router: Router<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    E: JsonError,
{
    // Each drains what the sender still sends (bounded), so it reads the answer.
    router
        .fallback(|request: axum::extract::Request| async move {
            crate::upload::drain_body(request.into_body()).await;
            E::with_status(StatusCode::NOT_FOUND, "no such endpoint".into())
        })
        .method_not_allowed_fallback(|request: axum::extract::Request| async move {
            crate::upload::drain_body(request.into_body()).await;
            E::with_status(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint".into(),
            )
        })
}

/// The `{id}` of a route as text; a path that does not decode (bad percent-encoding, invalid
/// UTF-8) is refused with the API's JSON error like every other bad id, not axum's plain
/// text. The id's own syntax is the handler's to check.
pub struct IdPath<E>(pub String, pub PhantomData<fn() -> E>);

impl<S: Send + Sync, E: JsonError> FromRequestParts<S> for IdPath<E> {
    type Rejection = E;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id, PhantomData))
            .map_err(|e| E::with_status(StatusCode::BAD_REQUEST, format!("bad job id: {e}")))
    }
}

/// A query string that did not parse, as a 400 `bad query: <axum's reason>`.
pub fn bad_query<E: JsonError>(rejection: QueryRejection) -> E {
    E::with_status(StatusCode::BAD_REQUEST, format!("bad query: {rejection}"))
}
