//! The job routes: `/upload`, `/download/{id}`, `/download_partial/{id}`,
//! `/terminate/{id}` (the reference's), `/jobs`, `/jobs/{id}` (a long-poll with `?wait=S`),
//! `/jobs/{id}/events` and `/jobs/{id}/log`. Each parses, calls the lifecycle, [`crate::stop`] or the store's
//! reads (on the blocking pool, through [`blocking`]) and shapes the answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Extension, Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jobrelay_common::archive::zip_stream;
use jobrelay_common::http::bad_query;
use jobrelay_common::logtail::{self, Stream};
use jobrelay_common::upload;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::auth::{Caller, OwnerRefused};
use crate::gateway::{self, Failure, Log};
use crate::http::error::{blocking, ApiError, ApiResult, IdPath, JobAnswer};
use crate::stop::{self, Terminated};
use crate::store::{InputFile, Job, JobEvent, JobStatus, ListFilter, Notification};
use crate::webhooks::JobWithNotifications;
use crate::{views, Shared};

/// Size of the chunks files are read in when streamed over HTTP.
const STREAM_CHUNK: usize = 256 * 1024;

/// Header telling a log reader the job's state, so that a follower knows when to stop.
const JOB_STATUS_HEADER: &str = "x-job-status";

/// The job routes' part of `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(
        upload,
        download,
        download_partial,
        terminate,
        job_status,
        list_jobs,
        job_events,
        job_log
    ),
    components(schemas(
        JobAnswer,
        Job,
        JobStatus,
        UploadForm,
        JobList,
        JobEvent,
        JobWithNotifications,
        Notification
    ))
)]
pub struct JobsDoc;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/upload", post(upload).layer(DefaultBodyLimit::disable()))
        .route("/download/{id}", get(download))
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(job_status))
        .route("/download_partial/{id}", get(download_partial))
        .route("/terminate/{id}", post(terminate))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/log", get(job_log))
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
    /// Cores the job needs (default: the service's `default_cores`, 1).
    cores: Option<u32>,
    /// Memory the job needs: MiB, or with a unit (`4G`, `512M`).
    memory: Option<String>,
    /// GPUs the job needs (default 0).
    gpus: Option<u32>,
    /// Longest run: seconds, or with a unit (`90m`, `2h`); the client kills it past that.
    walltime: Option<String>,
    /// Order within the user's queue: higher first, then first in first out (default 0).
    priority: Option<i64>,
}

/// Upload a job: its files, its user and its service. The files are stored (on disk, or in
/// the database when they total at most 64 KiB) and the job committed before the answer.
#[utoipa::path(
    post,
    path = "/upload",
    security((), ("bearer" = [])),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 401, description = "With a users file: no token, or an unknown one", body = JobAnswer),
        (status = 403, description = "With a users file: user_id is not the token's user", body = JobAnswer),
        (status = 201, description = "Job queued", body = JobAnswer),
        (status = 400, description = "Not multipart; missing, non-integer or negative user_id; missing or unknown service; no file; bad or repeated file name; a callback_url off the allowlist, or to a service without a webhook secret; cores, memory, gpus, walltime or priority unreadable or over the service's maximum; a request no client of the service could ever hold (the message names the largest client)", body = JobAnswer),
        (status = 413, description = "Upload larger than --max-upload, or more files than the service's max_files", body = JobAnswer),
        (status = 429, description = "The job's user is past the service's max_jobs_per_user_per_hour (and burst); Retry-After says in how many seconds an upload would pass", body = JobAnswer),
        (status = 507, description = "No disk space left", body = JobAnswer),
    )
)]
pub(super) async fn upload(
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
    // Files totalling at most MAX_INPUTS_IN_DB stay in memory and go into the database with
    // the job's row; past that they are staged on disk, as always.
    let received = upload::receive_keeping_small(
        multipart,
        &shared.staging_dir,
        shared.config.max_upload,
        most_files,
        crate::store::MAX_INPUTS_IN_DB as u64,
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
    let user_id = caller
        .owner_of_upload(given)
        .map_err(|refused| match refused {
            OwnerRefused::Missing => ApiError::new(
                StatusCode::BAD_REQUEST,
                "user_id is required (a non-negative integer)",
            ),
            OwnerRefused::NotYours { asked, own } => ApiError::new(
                StatusCode::FORBIDDEN,
                format!("user_id {asked} is not yours: your token is user {own}'s"),
            ),
        })?;
    let service = match received.fields.get("service").map(|v| v.trim()) {
        None | Some("") => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "service is required",
            ))
        }
        Some(name) => name.to_owned(),
    };
    let Some(_) = shared.service_ids.get(&service) else {
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
    let resources = crate::requests::from_fields(
        &received.fields,
        &shared.config.services[&service].resources,
        &service,
    )
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    if let Some(why) = shared.lifecycle.never_fits(&service, &resources) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, why));
    }
    let (files, bytes) = (received.files.len(), received.total_bytes);
    // Kept in the database: in the order the dispatcher sends a job directory's files, so
    // a client receives the same `/submit` either way.
    let (inputs, staging) = match received.contents {
        upload::Contents::InMemory(contents) => {
            let mut inputs: Vec<InputFile> = received
                .files
                .into_iter()
                .zip(contents)
                .map(|(name, bytes)| InputFile { name, bytes })
                .collect();
            crate::dispatcher::in_listing_order(&mut inputs);
            (inputs, None)
        }
        upload::Contents::Staged(staging) => (Vec::new(), Some(staging)),
    };
    let job = blocking("committing the upload", {
        let (shared, service) = (shared.clone(), service.clone());
        move || {
            // Counted last, so a refused upload takes nothing from the user's quota.
            if let Some(quota) = shared.config.services[&service].rate {
                let now = crate::store::now_ms();
                if let Err(wait_ms) = shared
                    .store
                    .take_upload_slot(&service, user_id, quota, now)?
                {
                    let secs = crate::ratelimit::retry_after_secs(wait_ms);
                    return Err(ApiError::too_many(
                        format!(
                            "user {user_id} is past service {service:?}'s rate quota \
                             ({} jobs an hour, {} at once): try again in {secs} s",
                            quota.per_hour, quota.burst
                        ),
                        secs,
                    ));
                }
            }
            shared
                .lifecycle
                .uploaded(
                    user_id,
                    &service,
                    callback.as_ref(),
                    &resources,
                    &inputs,
                    |id| match staging {
                        Some(staging) => staging.persist(&shared.job_dir(id)),
                        None => Ok(()),
                    },
                )
                .map_err(|e| {
                    let disk_full = e
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(jobrelay_common::fsutil::is_disk_full);
                    if disk_full {
                        ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "not enough disk space")
                    } else {
                        ApiError::from(e)
                    }
                })
        }
    })
    .await?;
    tracing::info!(job = job.id, user_id, service, files, bytes, "job uploaded");
    metrics::counter!("jobrelay_server_upload_bytes_total").increment(bytes);
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
async fn find(shared: &Arc<Shared>, caller: &Caller, raw: &str) -> ApiResult<Job> {
    let id = parse_id(raw)?;
    let (shared, caller) = (shared.clone(), *caller);
    blocking("reading the job", move || {
        shared
            .store
            .get(id)?
            .filter(|job| caller.may_see(job.user_id))
            .ok_or_else(|| ApiError::for_job(StatusCode::NOT_FOUND, id, format!("no job {id}")))
    })
    .await
}

/// Opens a result ZIP file (410 when it is not there).
fn open_zip_file(path: &std::path::Path, id: i64) -> ApiResult<(std::fs::File, Option<u64>)> {
    let file = std::fs::File::open(path).map_err(|e| {
        ApiError::for_job(
            StatusCode::GONE,
            id,
            format!("the results of job {id} are not available: {e}"),
        )
    })?;
    let length = file.metadata().map(|m| m.len()).ok();
    Ok((file, length))
}

/// A stored result ZIP on its way out: kept in the database, or a file.
enum StoredZip {
    Db(bytes::Bytes),
    File(std::fs::File, Option<u64>),
}

impl StoredZip {
    /// The same answer from either place: type, name, length, bytes.
    fn answer(self, id: i64, what: &str) -> Response {
        let (body, length) = match self {
            StoredZip::Db(zip) => {
                let length = zip.len() as u64;
                (Body::from(zip), Some(length))
            }
            StoredZip::File(file, length) => (
                Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(file),
                    STREAM_CHUNK,
                )),
                length,
            ),
        };
        metrics::counter!("jobrelay_server_download_bytes_total").increment(length.unwrap_or(0));
        let mut response = (
            [
                (header::CONTENT_TYPE, "application/zip".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"job-{id}{what}.zip\""),
                ),
            ],
            body,
        )
            .into_response();
        if let Some(length) = length {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, length.into());
        }
        response
    }
}

/// The job's stored result ZIP, from the database (a small one, kept with its final state)
/// or else its file, found and opened in one blocking call.
async fn stored_zip(shared: &Arc<Shared>, id: i64, what: &str) -> ApiResult<Response> {
    let shared = shared.clone();
    let stored = blocking("opening the result ZIP", move || {
        if let Some(zip) = shared.store.result_zip(id)? {
            return Ok(StoredZip::Db(zip));
        }
        let (file, length) = open_zip_file(&shared.result_path(id), id)?;
        Ok(StoredZip::File(file, length))
    })
    .await?;
    Ok(stored.answer(id, what))
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
pub(super) async fn download(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id, _): IdPath<ApiError>,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let job = find_waiting(&shared, &caller, &id, query).await?;
    if job.status == JobStatus::Completed {
        stored_zip(&shared, job.id, "").await
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
pub(super) async fn job_status(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id, _): IdPath<ApiError>,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> ApiResult<Json<JobWithNotifications>> {
    let job = find_waiting(&shared, &caller, &id, query).await?;
    let notifications = blocking("reading the job's notifications", {
        let (shared, id) = (shared.clone(), job.id);
        move || shared.store.notifications(id).map_err(ApiError::from)
    })
    .await?;
    let waiting_for = if job.status == JobStatus::Queued {
        shared.lifecycle.waiting_for(job.id)
    } else {
        None
    };
    Ok(Json(JobWithNotifications {
        job,
        notifications,
        waiting_for,
    }))
}

/// The job, at once without `wait`; with `wait=S`, once it has finished or after S seconds
/// (at most [`MAX_WAIT_SECS`]), whichever comes first.
async fn find_waiting(
    shared: &Arc<Shared>,
    caller: &Caller,
    id: &str,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> ApiResult<Job> {
    let query = query.map_err(bad_query::<ApiError>)?;
    let wait = query.wait.unwrap_or(0.0);
    if !wait.is_finite() || wait < 0.0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "wait must be a number of seconds, 0 or more",
        ));
    }
    if wait == 0.0 {
        return find(shared, caller, id).await;
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
        let job = find(shared, caller, id).await?;
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
pub(super) async fn list_jobs(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<JobList>> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
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
    let Some(user_id) = caller.list_filter(query.user_id) else {
        return Ok(Json(JobList {
            jobs: Vec::new(),
            total: 0,
            limit,
            offset,
        }));
    };
    let filter = ListFilter {
        user_id,
        service: query.service,
        status,
        limit,
        offset,
    };
    let (jobs, total) = blocking("listing jobs", move || Ok(shared.store.list(&filter)?)).await?;
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
pub(super) async fn download_partial(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Response> {
    let job = find(&shared, &caller, &id).await?;
    let dir = shared.job_dir(job.id);
    let (stored, dir_exists, kept) = {
        let (shared, dir, id) = (shared.clone(), dir.clone(), job.id);
        let finished = job.status.is_finished();
        blocking("looking for the job's files", move || {
            // A finished job's stored results: in the database, else as a file.
            let stored = match finished {
                false => None,
                true => match shared.store.result_zip(id)? {
                    Some(zip) => Some(StoredZip::Db(zip)),
                    None => open_zip_file(&shared.result_path(id), id)
                        .ok()
                        .map(|(file, length)| StoredZip::File(file, length)),
                },
            };
            // Its uploaded files: a directory, or kept in the database.
            let dir_exists = dir.is_dir();
            let kept = match (&stored, dir_exists) {
                (None, false) => shared.store.input_files(id)?,
                _ => Vec::new(),
            };
            Ok((stored, dir_exists, kept))
        })
        .await?
    };
    if let Some(stored) = stored {
        return Ok(stored.answer(job.id, "-partial"));
    }
    if JobStatus::ON_CLIENT.contains(&job.status) {
        if let (Some(client), Some(dest)) = (shared.client_of(job.client.as_deref()), job.dest_id) {
            let zip = match gateway::retrieve_partial(&shared, &client, dest).await {
                Ok(zip) => zip,
                Err(Failure::Unreachable(e)) => {
                    return Err(ApiError::for_job(
                        StatusCode::BAD_GATEWAY,
                        job.id,
                        format!("the job's client did not answer: {e}"),
                    ))
                }
                Err(Failure::Answered(status)) => {
                    return Err(ApiError::for_job(
                        StatusCode::BAD_GATEWAY,
                        job.id,
                        format!("the job's client answered {status}"),
                    ))
                }
            };
            let stream = zip.into_stream();
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
    if job.status != JobStatus::Cleaned && !kept.is_empty() {
        let zip = blocking("archiving the job's files", move || {
            jobrelay_common::archive::zip_of_files(
                kept.iter()
                    .map(|file| (file.name.as_str(), &file.bytes[..])),
            )
            .map_err(|e| ApiError::from(anyhow::Error::from(e)))
        })
        .await?;
        return Ok(([(header::CONTENT_TYPE, "application/zip")], zip).into_response());
    }
    if job.status != JobStatus::Cleaned && dir_exists {
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
        (status = 202, description = "Asked of a standby server: the request is committed and the leading server carries it out, but had not yet after 30 s (e.g. while a standby takes over)", body = JobAnswer),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 409, description = "The job had already finished", body = JobAnswer),
    )
)]
pub(super) async fn terminate(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Response> {
    let id = find(&shared, &caller, &id).await?.id;
    match stop::terminate_from_any_server(&shared, id).await? {
        Terminated::Done(job) => Ok(Json(job).into_response()),
        Terminated::Requested(job) => Ok((
            StatusCode::ACCEPTED,
            Json(JobAnswer {
                id: job.id,
                status: job.status.to_string(),
                message: format!(
                    "terminate of job {} requested: the leading server carries it out",
                    job.id
                ),
            }),
        )
            .into_response()),
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

/// Every state the job went through, with times, attempts and clients. Empty once the job is
/// Cleaned: its timeline is removed with its files (the job itself still answers).
#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "Oldest first; `[]` for a Cleaned job", body = [JobEvent]),
        (status = 404, description = "Unknown job", body = JobAnswer),
    )
)]
pub(super) async fn job_events(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id, _): IdPath<ApiError>,
) -> ApiResult<Json<Vec<JobEvent>>> {
    let job = find(&shared, &caller, &id).await?;
    let events = blocking("reading the job's events", move || {
        Ok(shared.store.history(job.id)?)
    })
    .await?;
    Ok(Json(events))
}

/// Query of `GET /jobs/{id}/log`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// `stdout` (default) or `stderr`.
    stream: Option<String>,
    /// Byte offset to read from (default 0).
    offset: Option<u64>,
}

/// Up to 1 MiB of the job's stdout or stderr from `offset`: from its client while it runs,
/// from the stored results after. `X-Log-Next-Offset` says where to continue, `X-Job-Status`
/// the job's state (a follower stops once it is final and nothing more comes).
#[utoipa::path(
    get,
    path = "/jobs/{id}/log",
    params(("id" = i64, Path, description = "Job id"), LogQuery),
    responses(
        (status = 200, description = "text/plain bytes of the log", content_type = "text/plain"),
        (status = 400, description = "Bad stream or offset", body = JobAnswer),
        (status = 404, description = "Unknown job", body = JobAnswer),
        (status = 410, description = "The job's files were removed (Cleaned)", body = JobAnswer),
        (status = 409, description = "The client refused to read the log (a link, FIFO or another owner's file in its place)", body = JobAnswer),
        (status = 502, description = "The job's client could not be reached or answered an error", body = JobAnswer),
    )
)]
pub(super) async fn job_log(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id, _): IdPath<ApiError>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let job = find(&shared, &caller, &id).await?;
    let stream = Stream::parse(query.stream.as_deref())
        .map_err(|e| ApiError::for_job(StatusCode::BAD_REQUEST, job.id, e))?;
    let offset = query.offset.unwrap_or(0);
    let bytes = match job.status {
        JobStatus::Cleaned => {
            return Err(ApiError::for_job(
                StatusCode::GONE,
                job.id,
                format!("the files of job {} were removed", job.id),
            ))
        }
        JobStatus::Submitted | JobStatus::Running => {
            log_from_client(&shared, &job, stream, offset).await?
        }
        status if status.is_finished() => {
            let (shared, id) = (shared.clone(), job.id);
            blocking("reading the stored log", move || {
                Ok(match shared.store.result_zip(id)? {
                    Some(zip) => views::log_from_zip(std::io::Cursor::new(zip), stream, offset),
                    None => std::fs::File::open(shared.result_path(id))
                        .map(|file| views::log_from_zip(file, stream, offset))
                        .unwrap_or_default(),
                })
            })
            .await?
        }
        _ => Vec::new(),
    };
    let next = offset + bytes.len() as u64;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                HeaderName::from_static(logtail::NEXT_OFFSET_HEADER),
                next.to_string(),
            ),
            (
                HeaderName::from_static(JOB_STATUS_HEADER),
                job.status.as_str().to_owned(),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn log_from_client(
    shared: &Shared,
    job: &Job,
    stream: Stream,
    offset: u64,
) -> ApiResult<Vec<u8>> {
    let (Some(client), Some(dest)) = (shared.client_of(job.client.as_deref()), job.dest_id) else {
        return Ok(Vec::new());
    };
    if !client.has("log") {
        // A client without the log extension (seed contract): nothing to show until the end.
        return Ok(Vec::new());
    }
    let unreachable = |e: String| {
        ApiError::for_job(
            StatusCode::BAD_GATEWAY,
            job.id,
            format!("cannot read the log from {}: {e}", client.base()),
        )
    };
    match gateway::log(shared, &client, dest, stream.as_str(), offset).await {
        Log::Bytes(bytes) => Ok(bytes.to_vec()),
        // The client refused the file (a link, a FIFO, another owner's file in place of the
        // log): the job's doing, not the client's failure; say so as the client did.
        Log::Refused(why) => Err(ApiError::for_job(
            StatusCode::CONFLICT,
            job.id,
            format!("the client refused to read this log: {why}"),
        )),
        Log::Failed(Failure::Answered(status)) => Err(unreachable(format!("it answered {status}"))),
        Log::Failed(Failure::Unreachable(why)) => Err(unreachable(why)),
    }
}
