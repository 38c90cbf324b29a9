//! What every jobrelay HTTP API shares around its handlers: the outer layers, the JSON
//! fallbacks for unknown endpoints and methods, and the extractors whose rejections must be
//! JSON too. Each API keeps its own error body (the server answers the reference's
//! `{"id", "status", "message"}`, the client `{"error"}`) by implementing [`JsonError`].

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// An API's JSON error answer, made from a status and a message.
pub trait JsonError: IntoResponse + Send + 'static {
    fn with_status(status: StatusCode, message: String) -> Self;
}

/// Wraps `router` so that a panicking handler answers the API's JSON 500 instead of dropping
/// the connection, every request logs one line, and an answer given before the request's body
/// was read to its end says `Connection: close` (see [`close_if_body_unread`]).
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
        .layer(axum::middleware::from_fn(close_if_body_unread))
}

/// An HTTP/1 server that answers before reading the whole request body cannot reuse the
/// connection: hyper closes it once the answer is written. Without saying so in the answer,
/// the sender puts the connection back in its pool and its next request races the close
/// (seen as `IncompleteMessage` from reqwest after a refused oversized body). RFC 9112 §9.6:
/// say `Connection: close`. A tunnel's 101 is left alone: its connection is handed over.
async fn close_if_body_unread(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read_to_end = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = Body::new(ReadToEnd {
        inner: body,
        read_to_end: read_to_end.clone(),
    });
    let http1 = parts.version < Version::HTTP_2;
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if http1
        && !read_to_end.load(Ordering::Acquire)
        && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that records when it has been read to its end.
struct ReadToEnd {
    inner: Body,
    read_to_end: Arc<AtomicBool>,
}

impl http_body::Body for ReadToEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read_to_end.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a fallback reads of a body nobody wanted before answering; past it the connection is
/// closed (no endpoint takes a body larger than a megabyte unless it is an upload).
pub const FALLBACK_DRAIN_LIMIT: u64 = 1024 * 1024;

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
        .fallback(|request: Request| async move {
            crate::upload::drain_body(request.into_body(), FALLBACK_DRAIN_LIMIT).await;
            E::with_status(StatusCode::NOT_FOUND, "no such endpoint".into())
        })
        .method_not_allowed_fallback(|request: Request| async move {
            crate::upload::drain_body(request.into_body(), FALLBACK_DRAIN_LIMIT).await;
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
