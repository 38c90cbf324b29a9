//! The leaf of [`crate::http`]: the JSON error answer in the reference's shape
//! `{"id": N, "status": "Unknown", "message": "..."}` (id 0 when there is no job), the
//! extractors whose rejections take that shape, and [`blocking`], the one way a handler
//! reaches the store or the file system. It imports nothing of the server.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jobrelay_common::blocking::Failed;
use jobrelay_common::http::JsonError;
use jobrelay_common::upload::UploadError;
use serde::Serialize;
use utoipa::ToSchema;

/// The `{id}` of a route, refused in the reference's JSON shape when it does not decode.
pub use jobrelay_common::http::IdPath;

/// Longest a handler's store or file-system work may take before the request is answered
/// 503 (the work finishes on its own; a commit it makes stays).
const BLOCKING_LIMIT: Duration = Duration::from_secs(60);

/// The answer of `/upload`, and of every error (the reference's shape).
#[derive(Serialize, ToSchema, Debug)]
pub struct JobAnswer {
    /// Job id; 0 when the request made no job.
    pub id: i64,
    /// Job status, or "Unknown" for an error.
    pub status: String,
    pub message: String,
}

/// A JSON error answer in the reference's shape; with a `Retry-After` (seconds) when set.
pub struct ApiError(StatusCode, i64, String, Option<u64>);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, 0, message.into(), None)
    }
    pub fn for_job(status: StatusCode, id: i64, message: impl Into<String>) -> Self {
        ApiError(status, id, message.into(), None)
    }
    /// 429 Too Many Requests, to be tried again after `secs` seconds.
    pub fn too_many(message: impl Into<String>, secs: u64) -> Self {
        ApiError(StatusCode::TOO_MANY_REQUESTS, 0, message.into(), Some(secs))
    }
}

impl JsonError for ApiError {
    fn with_status(status: StatusCode, message: String) -> Self {
        ApiError::new(status, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = JobAnswer {
            id: self.1,
            status: "Unknown".into(),
            message: self.2,
        };
        let mut response = (self.0, Json(body)).into_response();
        if let Some(secs) = self.3 {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        ApiError::new(e.status(), e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // The database out of reach, or this server deposed mid-request: try again (another
        // server, or this one in a moment).
        if e.is::<crate::store::Unavailable>() || e.is::<crate::store::Fenced>() {
            tracing::warn!(error = %e, "request refused for now");
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"));
        }
        tracing::error!(error = %e, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl From<Failed> for ApiError {
    fn from(e: Failed) -> Self {
        let status = match e {
            Failed::TimedOut(..) => StatusCode::SERVICE_UNAVAILABLE,
            Failed::Panicked(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Runs a handler's store or file-system `work` on the blocking pool (the rule "sync core,
/// async edges" of ARCHITECTURE.md): SQLite waits on the store's lock and on the disk, a
/// rename or a ZIP read waits on the disk, and neither may hold one of the few async worker
/// threads that answer every other request meanwhile.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    jobrelay_common::blocking::run(what, BLOCKING_LIMIT, work)
        .await
        .inspect_err(|e| {
            if matches!(e, Failed::TimedOut(..)) {
                metrics::counter!("jobrelay_server_blocking_timeouts_total").increment(1);
            }
        })?
}
