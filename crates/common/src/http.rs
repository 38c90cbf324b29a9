//! The outer layers every jobrelay HTTP API shares.

use axum::response::Response;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// Wraps `router` so that a panicking handler answers `internal_error()` (each API has its own
/// JSON error shape) instead of dropping the connection, and every request logs one line.
pub fn with_standard_layers(router: Router, internal_error: fn() -> Response) -> Router {
    router
        .layer(CatchPanicLayer::custom(move |_| internal_error()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
}
