//! HTTP handlers of the client. Thin: they parse, call the store or the runner, and shape the
//! answer. Every error is a JSON body `{"error": "..."}` with a fitting status code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jobrelay_common::archive::zip_stream;
use jobrelay_common::http::{
    bad_query, with_json_fallbacks, with_standard_layers, IdPath, JsonError,
};
use jobrelay_common::protocol::{
    ClientInfo, ErrorBody, PayloadRecord, PayloadStatus, RESULT_KEY_HEADER, RESULT_NODE_HEADER,
};
use jobrelay_common::upload::{self, UploadError};

use crate::blocking;
use crate::load::LoadGauge;
use crate::runner::{KillOutcome, Runner};
use crate::store::{Created, PayloadStore, Refused};
use crate::workdir::Lease;
use futures_util::StreamExt;

/// Longest a caller may ask `/events` to wait.
const MAX_EVENTS_WAIT: Duration = Duration::from_secs(60);
/// Longest a submission's storing (a rename and a record write) may take before the sender
/// is answered 503 (a resend with its key finds the payload if it was made meanwhile).
const SUBMIT_LIMIT: Duration = Duration::from_secs(60);
/// Longest a release (record, then the removal of the work directory) may take.
const RELEASE_LIMIT: Duration = Duration::from_secs(60);
/// Longest reading a window of a log may take.
const LOG_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<PayloadStore>,
    pub runner: Arc<Runner>,
    pub load: LoadGauge,
    pub max_upload: u64,
    /// The token the server must send; `None`: no check (see `auth`).
    pub token: Option<Arc<jobrelay_common::auth::Secret>>,
}

/// A JSON error answer.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

impl JsonError for ApiError {
    fn with_status(status: StatusCode, message: String) -> Self {
        ApiError(status, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<blocking::Failed> for ApiError {
    fn from(e: blocking::Failed) -> Self {
        let status = match e {
            blocking::Failed::TimedOut(..) => StatusCode::SERVICE_UNAVAILABLE,
            blocking::Failed::Panicked(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        ApiError::new(e.status(), e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: AppState) -> Router {
    let token = state.token.clone();
    let router = Router::new()
        .route("/", get(ping))
        .route("/health", get(health))
        .route("/load", get(load))
        .route("/info", get(info))
        .route("/submit", post(submit).layer(DefaultBodyLimit::disable()))
        .route("/retrieve/{id}", get(retrieve))
        .route("/retrieve_partial/{id}", get(retrieve_partial))
        .route("/kill/{id}", post(kill))
        .route("/release/{id}", post(release))
        .route("/events", get(events))
        .route("/log/{id}", get(log))
        .route("/metrics", get(metrics))
        .with_state(state);
    let router = with_json_fallbacks::<_, ApiError>(router);
    let router = match token {
        Some(token) => router.layer(axum::middleware::from_fn_with_state(
            token,
            crate::auth::require_token,
        )),
        None => router,
    };
    with_standard_layers::<ApiError>(router)
}

async fn ping() -> Json<serde_json::Value> {
    // `message: pong` is what the reference answers; platforms may check it.
    Json(serde_json::json!({
        "message": "pong",
        "status": "ok",
        "service": "jobrelay-client",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /health`: healthy only while the blocking pool still starts work (submissions, ZIPs
/// and logs need it); else 503.
async fn health() -> Response {
    if blocking::pool_responsive(blocking::POOL_PROBE).await {
        Json(serde_json::json!({ "status": "healthy" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unhealthy", "error": POOL_EXHAUSTED })),
        )
            .into_response()
    }
}

const POOL_EXHAUSTED: &str = "the client's blocking pool starts no work (every thread is busy)";

async fn load(State(state): State<AppState>) -> Json<f64> {
    Json(state.load.percent())
}

async fn info(State(state): State<AppState>) -> ApiResult<Json<ClientInfo>> {
    if !blocking::pool_responsive(blocking::POOL_PROBE).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            POOL_EXHAUSTED,
        ));
    }
    Ok(Json(ClientInfo {
        name: "jobrelay-client".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        node: state.store.node().to_owned(),
        instance: state.store.events.instance().to_owned(),
        slots: state.runner.slots(),
        resources: Some(state.runner.capacity()),
        executor: Some(state.runner.executor().name().into()),
        memory_limits: Some(state.runner.executor().memory_limits()),
        running: state.runner.running_count(),
        prepared: state.store.count(PayloadStatus::Prepared),
        features: [
            "events",
            "key",
            "release",
            "release_in_events",
            "kill",
            "retrieve_partial",
            "log",
            "result_key",
        ]
        .map(String::from)
        .to_vec(),
    }))
}

fn parse_id(raw: &str) -> ApiResult<u64> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("payload id must be a non-negative integer, not {raw:?}"),
        )
    })
}

fn find(state: &AppState, raw_id: &str) -> ApiResult<PayloadRecord> {
    let id = parse_id(raw_id)?;
    state
        .store
        .get(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no payload {id}")))
}

async fn submit(State(state): State<AppState>, request: Request) -> ApiResult<Json<PayloadRecord>> {
    let received =
        upload::receive_request(request, state.store.staging_dir(), state.max_upload).await?;
    let key = received
        .fields
        .get("key")
        .cloned()
        .filter(|k| !k.is_empty());
    let resources = crate::allot::request_from_fields(&received.fields)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let store = state.store.clone();
    let runner = state.runner.clone();
    // Created and queued in one task that runs to its end: if the sender goes away (a server
    // killed mid-request) this handler is dropped at its next await, and a payload created but
    // never queued would stay Prepared for ever (a resent submission with its key only finds it).
    let created = blocking::run("storing the submission", SUBMIT_LIMIT, move || {
        let created = store.create(received, key, resources)?;
        if let Created::New(record) = &created {
            runner.enqueue(record.id);
            metrics::counter!("jobrelay_client_submissions_total").increment(1);
        }
        Ok::<_, std::io::Error>(created)
    })
    .await?
    .map_err(|e| {
        let status = if jobrelay_common::fsutil::is_disk_full(&e) {
            StatusCode::INSUFFICIENT_STORAGE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, format!("could not store the payload: {e}"))
    })?;
    match created {
        Created::New(record) | Created::Existing(record) => Ok(Json(record)),
    }
}

/// The ZIP of payload `record`'s work directory, streamed while `lease` keeps the directory.
fn zip_response(state: &AppState, record: &PayloadRecord, lease: Lease) -> ApiResult<Response> {
    let id = record.id;
    let dir = state.store.work_dir_of(id);
    if !dir.is_dir() {
        return Err(gone(id));
    }
    // The lease lives as long as the body: a clean-up meanwhile waits for the stream's end.
    let stream = zip_stream(dir).map(move |chunk| {
        let _held = &lease;
        chunk
    });
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/zip".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"payload-{id}.zip\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    // Whose run this is, as the JSON record would say (feature `result_key`): a server can
    // tell a payload id that a restored or wiped data directory handed out again.
    let headers = response.headers_mut();
    for (name, value) in [
        (RESULT_KEY_HEADER, record.key.as_deref()),
        (RESULT_NODE_HEADER, record.node.as_deref()),
    ] {
        if let Some(value) = value.and_then(|v| header::HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

fn gone(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        format!("the work directory of payload {id} has been removed"),
    )
}

/// A lease on the work directory of the payload `raw_id` if its record passes `accept`.
fn lease(
    state: &AppState,
    raw_id: &str,
    accept: impl FnOnce(&PayloadRecord) -> bool,
) -> ApiResult<Result<(PayloadRecord, Lease), PayloadRecord>> {
    let id = parse_id(raw_id)?;
    match state.store.lease(id, accept) {
        Ok(leased) => Ok(Ok(leased)),
        Err(Refused::InState(record)) => Ok(Err(*record)),
        Err(Refused::NotFound) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no payload {id}"),
        )),
    }
}

async fn retrieve(
    State(state): State<AppState>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Response> {
    match lease(&state, &id, |r| r.status == PayloadStatus::Completed)? {
        Ok((record, lease)) => zip_response(&state, &record, lease),
        Err(record) => Ok(Json(record).into_response()),
    }
}

async fn retrieve_partial(
    State(state): State<AppState>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Response> {
    match lease(&state, &id, |r| r.status != PayloadStatus::Cleaned)? {
        Ok((record, lease)) => zip_response(&state, &record, lease),
        Err(record) => Err(gone(record.id)),
    }
}

async fn kill(
    State(state): State<AppState>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    match state.runner.kill(id).await {
        KillOutcome::Killed(record) => Ok(Json(record).into_response()),
        KillOutcome::AlreadyFinished(record) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("payload {id} has already finished ({})", record.status),
        )),
        KillOutcome::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no payload {id}"),
        )),
    }
}

async fn release(
    State(state): State<AppState>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Json<PayloadRecord>> {
    let id = parse_id(&id)?;
    let store = state.store.clone();
    let outcome = blocking::run("releasing the payload", RELEASE_LIMIT, move || {
        store.clean(id, "released by the server")
    })
    .await?;
    match outcome {
        Ok(record) => {
            counted_release("request");
            Ok(Json(record))
        }
        Err(Refused::InState(record)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("payload {id} has not finished ({})", record.status),
        )),
        Err(Refused::NotFound) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no payload {id}"),
        )),
    }
}

async fn events(
    State(state): State<AppState>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(bad_query::<ApiError>)?;
    let number = |name: &str| -> ApiResult<Option<f64>> {
        query
            .get(name)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!("{name} must be a non-negative number, not {v:?}"),
                        )
                    })
            })
            .transpose()
    };
    let releases = release_list(query.get("release"))?;
    let after = number("after")?.unwrap_or(0.0) as u64;
    // Clamped before the conversion: `from_secs_f64` panics past u64::MAX seconds (wait=1e99).
    let wait = Duration::from_secs_f64(
        number("wait")?
            .unwrap_or(0.0)
            .min(MAX_EVENTS_WAIT.as_secs_f64()),
    );
    if !releases.is_empty() {
        let store = state.store.clone();
        blocking::run("releasing payloads", RELEASE_LIMIT, move || {
            release_all(&store, &releases)
        })
        .await?;
    }
    Ok(Json(state.store.events.after(after, wait).await).into_response())
}

/// Counts a payload released by `/release` (`by="request"`) or `/events` (`by="events"`).
fn counted_release(by: &'static str) {
    metrics::counter!("jobrelay_client_releases_total", "by" => by).increment(1);
}

/// Most payloads one `/events` call may release.
const MOST_RELEASES_PER_CALL: usize = 1_000;

/// `release=ID,ID,…` of `/events` (extension `release_in_events`): payloads whose results the
/// server has stored, released as `POST /release/{id}` would before the feed is read.
fn release_list(raw: Option<&String>) -> ApiResult<Vec<u64>> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(Vec::new());
    };
    let ids: Vec<u64> = raw
        .split(',')
        .map(|id| id.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("release must be payload ids separated by commas, not {raw:?}"),
            )
        })?;
    if ids.len() > MOST_RELEASES_PER_CALL {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "release names {} payloads; at most {MOST_RELEASES_PER_CALL} per call",
                ids.len()
            ),
        ));
    }
    Ok(ids)
}

/// Releases what it can of `ids`: one unknown or not finished is skipped (and logged), as
/// `/release` would refuse it; the others are released all the same.
fn release_all(store: &PayloadStore, ids: &[u64]) {
    for &id in ids {
        match store.clean(id, "released by the server") {
            Ok(_) => counted_release("events"),
            Err(Refused::InState(record)) => {
                tracing::warn!(id, status = %record.status, "not releasing a payload that has not finished")
            }
            Err(Refused::NotFound) => tracing::info!(id, "no payload to release"),
        }
    }
}

/// `GET /log/{id}?stream=stdout|stderr&offset=N`: up to 1 MiB of the payload's output from
/// `offset`; the `X-Log-Next-Offset` header says where to continue.
async fn log(
    State(state): State<AppState>,
    IdPath(id, _): IdPath<ApiError>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    use jobrelay_common::logtail::{self, Stream};
    use jobrelay_common::workfile::WorkFileError;
    let record = find(&state, &id)?;
    let stream = Stream::parse(query.get("stream").map(String::as_str))
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let offset = match query.get("offset") {
        None => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("offset must be a non-negative integer, not {raw:?}"),
            )
        })?,
    };
    let (record, lease) = match lease(&state, &id, |r| r.status != PayloadStatus::Cleaned)? {
        Ok(leased) => leased,
        Err(_) => return Err(gone(record.id)),
    };
    let dir = state.store.work_dir_of(record.id);
    let bytes = blocking::run("reading the log", LOG_LIMIT, move || {
        let _held = lease;
        logtail::read_from(&dir, stream, offset)
    })
    .await?
    .map_err(|e| match e {
        // The job put a link, a FIFO or another user's file in the log's place.
        WorkFileError::NotRegular { .. } | WorkFileError::ForeignOwner { .. } => {
            ApiError::new(StatusCode::CONFLICT, format!("cannot read the log: {e}"))
        }
        WorkFileError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => gone(record.id),
        WorkFileError::Io(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the log: {e}"),
        ),
    })?;
    let next = offset + bytes.len() as u64;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::HeaderName::from_static(logtail::NEXT_OFFSET_HEADER),
                next.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    use metrics::gauge;
    gauge!("jobrelay_client_slots").set(state.runner.slots() as f64);
    gauge!("jobrelay_client_slots_in_use").set(state.runner.running_count() as f64);
    for status in [
        PayloadStatus::Prepared,
        PayloadStatus::Running,
        PayloadStatus::Completed,
        PayloadStatus::Failed,
        PayloadStatus::Invalid,
        PayloadStatus::Killed,
        PayloadStatus::Cleaned,
    ] {
        gauge!("jobrelay_client_payloads", "status" => status.as_str())
            .set(state.store.count(status) as f64);
    }
    gauge!("jobrelay_client_load_percent").set(state.load.percent());
    (
        [(
            header::CONTENT_TYPE,
            jobrelay_common::telemetry::CONTENT_TYPE,
        )],
        jobrelay_common::telemetry::render(),
    )
        .into_response()
}
