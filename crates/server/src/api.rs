//! HTTP handlers of the server, thin: they parse, call the store, the scheduler or
//! [`crate::jobs`], and shape the answer. Every error answers the reference's shape
//! `{"id": N, "status": "Unknown", "message": "..."}` (id 0 when there is no job).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Extension, Multipart, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use jobrelay_common::archive::zip_stream;
use jobrelay_common::upload::{self, UploadError};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::auth::{self, Caller};
use crate::jobs::{self, Terminated};
use crate::store::{Job, JobStatus, Notification};
use crate::webhooks::JobWithNotifications;
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
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, 0, message.into())
    }
    pub(crate) fn for_job(status: StatusCode, id: i64, message: impl Into<String>) -> Self {
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

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The `{id}` of a route as text; a path that does not decode (bad percent-encoding, invalid
/// UTF-8) is refused with a JSON error like every other bad id, not axum's plain-text one.
pub(crate) struct IdPath(pub(crate) String);

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
    components(schemas(
        JobAnswer,
        Job,
        JobStatus,
        UploadForm,
        JobList,
        JobWithNotifications,
        Notification
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The `bearer` security scheme: a user's token from the users file, needed by every endpoint
/// but `/`, `/health`, `/ui`, `/openapi.json` and `/docs` when the server has one.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "A user's token (server started with --users-file); the user id \
                             then comes from it and only that user's jobs are visible.",
                        ))
                        .build(),
                ),
            );
    }
}

/// The multipart form of `/upload`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// One or more files; the file name is the path in the work directory (`inputs/a.pdb`).
    /// Without a `run.sh` the job ends Invalid. Any part with a filename is a file, whatever its field
    /// name: in another field it lands at the field name when that is a relative path ending
    /// in the filename (`data/a.pdb` with filename `a.pdb`), else at the filename. Other text
    /// fields are ignored.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: Vec<String>,
    /// Owner of the job, a non-negative integer (0 is a user like any other).
    user_id: i64,
    /// Name of a configured service.
    service: String,
    /// URL the job's JSON is POSTed to (signed, `X-Jobrelay-Signature`) when it reaches a
    /// final state; its host must be in the server's `[webhooks] allowed_hosts` and the
    /// service must have a `webhook_secret`. Default: the service's `webhook_url`, if any.
    callback_url: Option<String>,
    /// `final` (default) or `running` too (`running,final`): also notify when it starts.
    callback_events: Option<String>,
}

pub fn router(shared: Arc<Shared>) -> Router {
    let users = shared.config.users.clone();
    let router = Router::new()
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
        .merge(crate::observe::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(users, auth::identify));
    jobrelay_common::http::with_standard_layers(router, internal_error)
}

fn internal_error() -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
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
    // `message: pong` is what the reference answers; platforms may check it.
    Json(serde_json::json!({
        "message": "pong",
        "status": "ok",
        "service": "jobrelay-server",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Health check.
#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "`{\"status\":\"healthy\"}`"),
    (status = 503, description = "`{\"status\":\"unhealthy\",\"message\":...}`: the database is damaged or cannot be read, or a background loop (dispatcher, janitor, a client's probe or collector...) is down or restarting too often"),
))]
async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let checked = match shared.loops.health() {
        Err(why) => Err(why),
        Ok(()) => tokio::task::spawn_blocking(move || shared.store.health())
            .await
            .unwrap_or_else(|_| Err("the health check failed".into())),
    };
    match checked {
        Ok(()) => Json(serde_json::json!({ "status": "healthy" })).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unhealthy", "message": why })),
        )
            .into_response(),
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi()
            .merge_from(crate::observe::ObserveDoc::openapi())
            .to_pretty_json()
            .unwrap_or_default(),
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
    security((), ("bearer" = [])),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 403, description = "With a users file: user_id is not the token's user", body = JobAnswer),
        (status = 201, description = "Job queued", body = JobAnswer),
        (status = 400, description = "Not multipart; missing, non-integer or negative user_id; missing or unknown service; no file; bad or repeated file name; a callback_url off the allowlist, or to a service without a webhook secret", body = JobAnswer),
        (status = 413, description = "Upload larger than --max-upload, or more files than the service's max_files", body = JobAnswer),
        (status = 507, description = "No disk space left", body = JobAnswer),
    )
)]
async fn upload(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
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
    // No service takes more files than the largest max_files: refuse past it while
    // receiving; the service's own limit is checked once its name is known.
    let most_files = shared
        .config
        .services
        .values()
        .map(|s| s.max_files)
        .max()
        .unwrap_or(usize::MAX);
    let received = upload::receive_at_most(
        multipart,
        &shared.staging_dir,
        shared.config.max_upload,
        most_files,
    )
    .await?;
    let given =
        match received.fields.get("user_id").map(|v| v.trim()) {
            None | Some("") => None,
            // 0 is a user like any other (a platform may send it for anonymous callers, who then
            // share one quota); a negative id names nobody and is refused.
            Some(text) => Some(text.parse::<i64>().ok().filter(|id| *id >= 0).ok_or_else(
                || {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("user_id must be a non-negative integer, not {text:?}"),
                    )
                },
            )?),
        };
    let user_id = match (caller, given) {
        (Caller::Trusted, Some(id)) => id,
        (Caller::Trusted, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "user_id is required (a non-negative integer)",
            ))
        }
        // The token decides; an admin may upload for another user.
        (Caller::User(user), None) => user.id,
        (Caller::User(user), Some(id)) if id == user.id || user.admin => id,
        (Caller::User(user), Some(id)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "user_id {id} is not yours: your token is user {}'s",
                    user.id
                ),
            ))
        }
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
    let max_files = shared.config.services[&service].max_files;
    if received.files.len() > max_files {
        // The staging directory goes with `received`: nothing is left.
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the upload has {} files; service {service:?} takes at most {max_files} \
                 (its max_files)",
                received.files.len()
            ),
        ));
    }
    let callback =
        crate::webhooks::callback_from_fields(&received.fields, &shared.config, &service)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let staging = received.staging;
    let files = received.files.len();
    let job = shared
        .store
        .insert_job(user_id, &service, callback.as_ref(), |id| {
            staging.persist(&shared.job_dir(id))
        })
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
    crate::lock(&shared.sched).enqueue(service_id, user_id, job.id);
    shared.wake.notify_one();
    tracing::info!(
        job = job.id,
        user_id,
        service,
        files,
        bytes = received.total_bytes,
        "job uploaded"
    );
    metrics::counter!("jobrelay_server_upload_bytes_total").increment(received.total_bytes);
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

/// The job, if it exists and the caller may see it; another user's job is as unknown.
pub(crate) fn find(shared: &Shared, caller: &Caller, raw: &str) -> ApiResult<Job> {
    let id = parse_id(raw)?;
    shared
        .store
        .get(id)?
        .filter(|job| caller.may_see(job.user_id))
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
    metrics::counter!("jobrelay_server_download_bytes_total").increment(length.unwrap_or(0));
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
    security((), ("bearer" = [])),
    params(("id" = i64, Path, description = "Job id"), StatusQuery),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 200, description = "The result ZIP (application/zip) once Completed; the job as JSON before (with `wait`: once finished or when the wait is over)", body = Job),
        (status = 400, description = "A bad id or wait", body = JobAnswer),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 410, description = "Completed, but the result ZIP is not available", body = JobAnswer),
    )
)]
async fn download(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id): IdPath,
    query: Result<axum::extract::Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let job = find_waiting(&shared, &caller, &id, query).await?;
    if job.status == JobStatus::Completed {
        zip_file(&shared.result_path(job.id), job.id, "").await
    } else {
        Ok(Json(job).into_response())
    }
}

/// Longest wait of one `GET /jobs/{id}?wait=` call, in seconds.
pub const MAX_WAIT_SECS: f64 = 60.0;

/// Query of `GET /jobs/{id}` and `GET /download/{id}`.
#[derive(serde::Deserialize, utoipa::IntoParams, Debug)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// Long-poll: seconds (at most 60) to wait for the job to reach a final state
    /// (Completed, Failed, Invalid, Killed, Cleaned) before answering. The answer comes as
    /// soon as that state is committed, or after the wait with the job as it is then.
    /// Without it (or 0) the answer is immediate.
    wait: Option<f64>,
}

/// The job as JSON, whatever its state (jobrelay's addition to the reference API). With
/// `?wait=SECONDS` a long-poll that answers once the job has finished (as `/download` does).
/// A job with a callback also shows its `notifications`.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    security((), ("bearer" = [])),
    params(("id" = i64, Path, description = "Job id"), StatusQuery),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 200, description = "The job (once finished, or when the wait is over), with its notifications if it has a callback", body = JobWithNotifications),
        (status = 400, description = "A bad id or wait", body = JobAnswer),
        (status = 404, description = "Unknown job", body = JobAnswer),
    )
)]
async fn job_status(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id): IdPath,
    query: Result<axum::extract::Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<JobWithNotifications>> {
    let job = find_waiting(&shared, &caller, &id, query).await?;
    let notifications = shared.store.notifications(job.id)?;
    Ok(Json(JobWithNotifications { job, notifications }))
}

/// The job, at once without `wait`; with `wait=S`, once it has finished or after S seconds
/// (at most [`MAX_WAIT_SECS`]), whichever comes first.
async fn find_waiting(
    shared: &Shared,
    caller: &Caller,
    id: &str,
    query: Result<axum::extract::Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Job> {
    let query =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad query: {e}")))?;
    let wait = query.wait.unwrap_or(0.0);
    if !wait.is_finite() || wait < 0.0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "wait must be a number of seconds, 0 or more",
        ));
    }
    if wait == 0.0 {
        return find(shared, caller, id);
    }
    let job_id = parse_id(id)?;
    let deadline =
        tokio::time::Instant::now() + std::time::Duration::from_secs_f64(wait.min(MAX_WAIT_SECS));
    let watch = shared.store.watch(job_id);
    loop {
        // Registered before the read: a change committed after it wakes this wait.
        let notified = watch.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let job = find(shared, caller, id)?;
        if job.status.is_finished() {
            return Ok(job);
        }
        tokio::select! {
            woken = tokio::time::timeout_at(deadline, notified) => if woken.is_err() {
                return Ok(job);
            },
            // A stopping server answers long-polls at once, so they do not hold its stop.
            () = jobrelay_common::serve::stopping() => return Ok(job),
        }
    }
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
    security((), ("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A bad filter", body = JobAnswer),
    )
)]
async fn list_jobs(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
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
    // A user lists only their own jobs; asking for another's finds none.
    let user_id = match (caller.restricted_to(), query.user_id) {
        (Some(own), Some(asked)) if asked != own => {
            return Ok(Json(JobList {
                jobs: Vec::new(),
                total: 0,
                limit,
                offset,
            }))
        }
        (Some(own), _) => Some(own),
        (None, asked) => asked,
    };
    let filter = crate::store::ListFilter {
        user_id,
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
    security((), ("bearer" = [])),
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 200, description = "application/zip of the work directory now"),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 410, description = "The job's files were removed", body = JobAnswer),
        (status = 502, description = "The job's client did not answer", body = JobAnswer),
    )
)]
async fn download_partial(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id): IdPath,
) -> ApiResult<Response> {
    let job = find(&shared, &caller, &id)?;
    let stored = shared.result_path(job.id);
    if job.status.is_finished() && stored.is_file() {
        return zip_file(&stored, job.id, "-partial").await;
    }
    if JobStatus::ON_CLIENT.contains(&job.status) {
        if let (Some(client), Some(dest)) = (shared.client_of(job.client.as_deref()), job.dest_id) {
            let url = client.endpoint.path(&format!("/retrieve_partial/{dest}"));
            let response = client.http.get(&url).send().await.map_err(|e| {
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
    security((), ("bearer" = [])),
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 200, description = "The job, now Killed", body = Job),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 409, description = "The job had already finished", body = JobAnswer),
    )
)]
async fn terminate(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id): IdPath,
) -> ApiResult<Response> {
    let id = find(&shared, &caller, &id)?.id;
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
