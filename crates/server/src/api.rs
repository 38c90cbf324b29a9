//! HTTP handlers of the server, thin: they parse, call the store, the scheduler or
//! [`crate::jobs`], and shape the answer. Every error answers the reference's shape
//! `{"id": N, "status": "Unknown", "message": "..."}` (id 0 when there is no job).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use jobrelay_common::archive::zip_stream;
use jobrelay_common::upload::{self, UploadError};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::{OpenApi, ToSchema};

use crate::jobs::{self, Terminated};
use crate::store::{Job, JobStatus};
use crate::Shared;

/// Size of the chunks files are read in when streamed over HTTP.
const STREAM_CHUNK: usize = 256 * 1024;

/// The answer of `/upload`, and of every error (the reference's shape).
#[derive(Serialize, ToSchema, Debug)]
pub struct JobAnswer {
    /// Job id; 0 when the request made no job.
    pub id: i64,
    /// Job status, or "Unknown" for an error.
    pub status: String,
    pub message: String,
}

/// A JSON error answer in the reference's shape.
pub struct ApiError(StatusCode, i64, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, 0, message.into())
    }
    fn for_job(status: StatusCode, id: i64, message: impl Into<String>) -> Self {
        ApiError(status, id, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = JobAnswer {
            id: self.1,
            status: "Unknown".into(),
            message: self.2,
        };
        (self.0, Json(body)).into_response()
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        ApiError::new(e.status(), e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = %e, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The `{id}` of a route as text; a path that does not decode (bad percent-encoding, invalid
/// UTF-8) is refused with a JSON error like every other bad id, not axum's plain-text one.
struct IdPath(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad job id: {e}")))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "jobrelay server",
        description = "Job orchestration: upload a job (run.sh and its inputs) for a service, \
                       follow it, download the ZIP of its work directory."
    ),
    paths(
        upload,
        download,
        download_partial,
        terminate,
        job_status,
        list_jobs,
        health,
        ping
    ),
    components(schemas(JobAnswer, Job, JobStatus, UploadForm, JobList))
)]
pub struct ApiDoc;

/// The multipart form of `/upload`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// One or more files; the file name is the path in the work directory (`inputs/a.pdb`).
    /// One of them must be `run.sh`.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: Vec<String>,
    /// Owner of the job, an integer.
    user_id: i64,
    /// Name of a configured service.
    service: String,
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(ping))
        .route("/health", get(health))
        .route("/upload", post(upload).layer(DefaultBodyLimit::disable()))
        .route("/download/{id}", get(download))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(job_status))
        .route("/download_partial/{id}", get(download_partial))
        .route("/terminate/{id}", post(terminate))
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Ping.
#[utoipa::path(get, path = "/", responses((status = 200, description = "The server answers")))]
async fn ping() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "service": "jobrelay-server",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Health check.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "`{\"status\":\"healthy\"}`")))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "healthy" }))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_pretty_json().unwrap_or_default(),
    )
        .into_response()
}

async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}

/// Upload a job: its files, its user and its service. The files are on disk and the job
/// committed before the answer.
#[utoipa::path(
    post,
    path = "/upload",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Job queued", body = JobAnswer),
        (status = 400, description = "Missing or bad field, unknown service, no file, bad file name", body = JobAnswer),
        (status = 413, description = "Upload larger than --max-upload", body = JobAnswer),
        (status = 507, description = "No disk space left", body = JobAnswer),
    )
)]
async fn upload(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    upload::check_content_length(&headers, shared.config.max_upload)?;
    let multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected a multipart/form-data body: {e}"),
        )
    })?;
    let received =
        upload::receive(multipart, &shared.staging_dir, shared.config.max_upload).await?;
    let user_id = match received.fields.get("user_id").map(|v| v.trim()) {
        None | Some("") => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "user_id is required (an integer)",
            ))
        }
        Some(text) => text.parse::<i64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("user_id must be an integer, not {text:?}"),
            )
        })?,
    };
    let service = match received.fields.get("service").map(|v| v.trim()) {
        None | Some("") => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "service is required",
            ))
        }
        Some(name) => name.to_owned(),
    };
    let Some(&service_id) = shared.service_ids.get(&service) else {
        let known: Vec<&str> = shared.config.services.keys().map(String::as_str).collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown service {service:?}; configured: {}",
                known.join(", ")
            ),
        ));
    };
    let staging = received.staging;
    let files = received.files.len();
    let job = shared
        .store
        .insert_job(user_id, &service, |id| staging.persist(&shared.job_dir(id)))
        .map_err(|e| {
            let disk_full = e
                .downcast_ref::<std::io::Error>()
                .is_some_and(jobrelay_common::fsutil::is_disk_full);
            if disk_full {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "not enough disk space")
            } else {
                ApiError::from(e)
            }
        })?;
    shared
        .sched
        .lock()
        .unwrap()
        .enqueue(service_id, user_id, job.id);
    shared.wake.notify_one();
    tracing::info!(
        job = job.id,
        user_id,
        service,
        files,
        bytes = received.total_bytes,
        "job uploaded"
    );
    Ok((
        StatusCode::CREATED,
        Json(JobAnswer {
            id: job.id,
            status: JobStatus::Queued.to_string(),
            message: "Job queued".into(),
        }),
    )
        .into_response())
}

fn parse_id(raw: &str) -> ApiResult<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("job id must be a positive integer, not {raw:?}"),
        )
    })
}

fn find(shared: &Shared, raw: &str) -> ApiResult<Job> {
    let id = parse_id(raw)?;
    shared
        .store
        .get(id)?
        .ok_or_else(|| ApiError::for_job(StatusCode::NOT_FOUND, id, format!("no job {id}")))
}

async fn zip_file(path: &std::path::Path, id: i64, what: &str) -> ApiResult<Response> {
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        ApiError::for_job(
            StatusCode::GONE,
            id,
            format!("the results of job {id} are not available: {e}"),
        )
    })?;
    let length = file.metadata().await.map(|m| m.len()).ok();
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/zip".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"job-{id}{what}.zip\""),
            ),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            STREAM_CHUNK,
        )),
    )
        .into_response();
    if let Some(length) = length {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, length.into());
    }
    Ok(response)
}

/// The job's state as JSON while it is not Completed (Failed, Invalid and Killed include
/// the reason); the result ZIP once it is.
#[utoipa::path(
    get,
    path = "/download/{id}",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The result ZIP (application/zip) once Completed; the job as JSON before", body = Job),
        (status = 404, description = "Unknown job", body = JobAnswer),
    )
)]
async fn download(State(shared): State<Arc<Shared>>, IdPath(id): IdPath) -> ApiResult<Response> {
    let job = find(&shared, &id)?;
    if job.status == JobStatus::Completed {
        zip_file(&shared.result_path(job.id), job.id, "").await
    } else {
        Ok(Json(job).into_response())
    }
}

/// The job as JSON, whatever its state (jobrelay's addition to the reference API).
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 404, description = "Unknown job", body = JobAnswer),
    )
)]
async fn job_status(State(shared): State<Arc<Shared>>, IdPath(id): IdPath) -> ApiResult<Json<Job>> {
    Ok(Json(find(&shared, &id)?))
}

/// Query of `GET /jobs`.
#[derive(serde::Deserialize, utoipa::IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this user's jobs.
    user_id: Option<i64>,
    /// Only this service's jobs.
    service: Option<String>,
    /// Only jobs in this state (Queued, Running, Completed, ...).
    status: Option<String>,
    /// Most jobs returned (default 50, at most 1000).
    limit: Option<i64>,
    /// Jobs to skip, newest first.
    offset: Option<i64>,
}

/// A page of jobs.
#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Jobs matching the filters, in all.
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// Jobs, newest first, filtered and paged (jobrelay's addition to the reference API).
#[utoipa::path(
    get,
    path = "/jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A bad filter", body = JobAnswer),
    )
)]
async fn list_jobs(
    State(shared): State<Arc<Shared>>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobList>> {
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let status = query
        .status
        .as_deref()
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("unknown status {s:?}"))
            })
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(50);
    let offset = query.offset.unwrap_or(0);
    if !(1..=1000).contains(&limit) || offset < 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be 1 to 1000 and offset not negative",
        ));
    }
    let filter = crate::store::ListFilter {
        user_id: query.user_id,
        service: query.service,
        status,
        limit,
        offset,
    };
    let (jobs, total) = shared.store.list(&filter)?;
    Ok(Json(JobList {
        jobs,
        total,
        limit,
        offset,
    }))
}

/// ZIP of the job's work directory as it is now: from its client while it runs, from the
/// stored results after, its uploaded files before it was sent.
#[utoipa::path(
    get,
    path = "/download_partial/{id}",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "application/zip of the work directory now"),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 410, description = "The job's files were removed", body = JobAnswer),
        (status = 502, description = "The job's client did not answer", body = JobAnswer),
    )
)]
async fn download_partial(
    State(shared): State<Arc<Shared>>,
    IdPath(id): IdPath,
) -> ApiResult<Response> {
    let job = find(&shared, &id)?;
    let stored = shared.result_path(job.id);
    if job.status.is_finished() && stored.is_file() {
        return zip_file(&stored, job.id, "-partial").await;
    }
    if JobStatus::ON_CLIENT.contains(&job.status) {
        if let (Some(client), Some(dest)) = (shared.client_of(job.client.as_deref()), job.dest_id) {
            let url = client.endpoint.path(&format!("/retrieve_partial/{dest}"));
            let response = shared.http.get(&url).send().await.map_err(|e| {
                ApiError::for_job(
                    StatusCode::BAD_GATEWAY,
                    job.id,
                    format!("the job's client did not answer: {e}"),
                )
            })?;
            if !response.status().is_success() {
                return Err(ApiError::for_job(
                    StatusCode::BAD_GATEWAY,
                    job.id,
                    format!("the job's client answered {}", response.status()),
                ));
            }
            let stream = response.bytes_stream().map_err(std::io::Error::other);
            return Ok((
                [
                    (header::CONTENT_TYPE, "application/zip".to_owned()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"job-{}-partial.zip\"", job.id),
                    ),
                ],
                Body::from_stream(stream),
            )
                .into_response());
        }
    }
    let dir = shared.job_dir(job.id);
    if job.status != JobStatus::Cleaned && dir.is_dir() {
        return Ok((
            [(header::CONTENT_TYPE, "application/zip")],
            Body::from_stream(zip_stream(dir)),
        )
            .into_response());
    }
    Err(ApiError::for_job(
        StatusCode::GONE,
        job.id,
        format!("the files of job {} are no longer available", job.id),
    ))
}

/// Cancel a job wherever it is: a Queued job never reaches a client; a job on a client is
/// killed there (every process of it). Final state Killed.
#[utoipa::path(
    post,
    path = "/terminate/{id}",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, now Killed", body = Job),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 409, description = "The job had already finished", body = JobAnswer),
    )
)]
async fn terminate(State(shared): State<Arc<Shared>>, IdPath(id): IdPath) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    match jobs::terminate(&shared, id).await? {
        Terminated::Done(job) => Ok(Json(job).into_response()),
        Terminated::AlreadyFinished(job) => Ok((
            StatusCode::CONFLICT,
            Json(JobAnswer {
                id: job.id,
                status: job.status.to_string(),
                message: format!("job {} has already finished ({})", job.id, job.status),
            }),
        )
            .into_response()),
        Terminated::NotFound => Err(ApiError::for_job(
            StatusCode::NOT_FOUND,
            id,
            format!("no job {id}"),
        )),
    }
}
