//! What operators look at: the dashboard page (`/ui`), the JSON it reads (`/overview`,
//! `/clients`, `/jobs/{id}/events`), job logs (`/jobs/{id}/log`) and Prometheus metrics
//! (`/metrics`). Handlers are thin, like those of [`crate::api`].

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use jobrelay_common::logtail::{self, Stream};

use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::api::{find, ApiError, ApiResult, IdPath, JobAnswer};
use crate::auth::Caller;
use crate::gateway::{self, Failure, Log};
use crate::store::{now_ms, rfc3339, Job, JobEvent, JobStatus};
use crate::Shared;

/// Header telling a log reader the job's state, so that a follower knows when to stop.
const JOB_STATUS_HEADER: &str = "x-job-status";

#[derive(OpenApi)]
#[openapi(
    paths(overview, clients, job_events, job_log, metrics),
    components(schemas(Overview, ServiceUsage, UserUsage, MinuteCount, ClientView, JobEvent))
)]
pub struct ObserveDoc;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/ui", get(ui))
        .route("/overview", get(overview))
        .route("/clients", get(clients))
        .route("/jobs/{id}/events", get(job_events))
        .route("/jobs/{id}/log", get(job_log))
        .route("/metrics", get(metrics))
}

/// The dashboard: one self-contained page (no CDN, no build step) that polls the JSON below.
async fn ui() -> Html<&'static str> {
    Html(include_str!("ui.html"))
}

#[derive(Serialize, ToSchema)]
pub struct UserUsage {
    pub user_id: i64,
    pub active: usize,
    pub queued: usize,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceUsage {
    pub name: String,
    /// Jobs waiting; for a user who is not an admin, that user's only.
    pub queued: usize,
    /// Jobs being sent or on a client; for a user who is not an admin, that user's only.
    pub active: usize,
    pub runs_per_user: usize,
    pub max_runs: usize,
    pub users: Vec<UserUsage>,
}

#[derive(Serialize, ToSchema)]
pub struct MinuteCount {
    /// Start of the minute, RFC 3339.
    pub minute: String,
    pub finished: i64,
}

/// Everything the dashboard's overview shows.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    /// Jobs per state, all services.
    pub states: HashMap<String, i64>,
    pub services: Vec<ServiceUsage>,
    /// Jobs finished per minute over the last hour (minutes without any are left out).
    pub throughput: Vec<MinuteCount>,
    pub finished_last_hour: i64,
    pub clients: Vec<ClientView>,
}

#[derive(Serialize, ToSchema)]
pub struct ClientView {
    pub url: String,
    pub services: Vec<String>,
    pub healthy: bool,
    /// CPU load in percent, as last reported.
    pub load: f64,
    /// Advertised slots (`/info`), if any.
    pub slots: Option<usize>,
    /// This server's jobs on the client now.
    pub active: usize,
    /// Last successful request, RFC 3339.
    pub last_seen: Option<String>,
    pub version: Option<String>,
    pub features: Vec<String>,
}

fn client_views(shared: &Shared) -> Vec<ClientView> {
    let sched = shared.lifecycle.scheduler();
    shared
        .clients
        .iter()
        .map(|client| {
            let info = crate::lock(&client.info).clone();
            let last_seen = client.last_seen_ms.load(Ordering::Relaxed);
            ClientView {
                url: client.base().to_owned(),
                services: shared
                    .config
                    .services
                    .iter()
                    .filter(|(_, s)| s.clients.iter().any(|c| c.base == client.base()))
                    .map(|(name, _)| name.clone())
                    .collect(),
                healthy: sched.client_healthy(client.id),
                load: sched.client_load(client.id),
                slots: sched.client_slots(client.id),
                active: sched.active_on_client(client.id),
                last_seen: (last_seen > 0).then(|| rfc3339(last_seen)),
                version: info.as_ref().map(|i| i.version.clone()),
                features: info.map(|i| i.features).unwrap_or_default(),
            }
        })
        .collect()
}

/// Jobs per state, queues and quota use per service and user, throughput over the last hour,
/// and the clients.
#[utoipa::path(get, path = "/overview", responses((status = 200, body = Overview)))]
async fn overview(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Overview>> {
    let hour_ago = now_ms() - 3_600_000;
    // A user (not an admin) sees only their own jobs, and not the clients.
    let only = caller.restricted_to();
    let store_shared = shared.clone();
    let (counts, per_minute) = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>((
            store_shared.store.counts(only)?,
            store_shared.store.finished_per_minute(hour_ago, only)?,
        ))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "overview task failed"))??;
    let mut states = HashMap::new();
    for (_, status, count) in counts {
        *states.entry(status).or_insert(0) += count;
    }
    let services = {
        let sched = shared.lifecycle.scheduler();
        let mut services: Vec<ServiceUsage> = shared
            .service_ids
            .iter()
            .map(|(name, &id)| {
                let (runs_per_user, max_runs) = sched.quotas(id);
                let users: Vec<UserUsage> = sched
                    .user_usage(id)
                    .into_iter()
                    .filter(|(user, _, _)| only.is_none_or(|me| me == *user))
                    .map(|(user_id, active, queued)| UserUsage {
                        user_id,
                        active,
                        queued,
                    })
                    .collect();
                // A user (not an admin) is told their own totals, not the service's: how
                // busy it is with other users' jobs is not theirs to see.
                let (queued, active) = match only {
                    None => (sched.queued(id), sched.active(id)),
                    Some(_) => (
                        users.iter().map(|u| u.queued).sum(),
                        users.iter().map(|u| u.active).sum(),
                    ),
                };
                ServiceUsage {
                    name: name.clone(),
                    queued,
                    active,
                    runs_per_user,
                    max_runs,
                    users,
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services
    };
    Ok(Json(Overview {
        states,
        services,
        finished_last_hour: per_minute.iter().map(|(_, n)| n).sum(),
        throughput: per_minute
            .into_iter()
            .map(|(minute, finished)| MinuteCount {
                minute: rfc3339(minute),
                finished,
            })
            .collect(),
        clients: if only.is_some() {
            Vec::new()
        } else {
            client_views(&shared)
        },
    }))
}

/// Clients and metrics describe the whole system: admins only, where users exist.
fn admin_only(caller: &Caller) -> ApiResult<()> {
    match caller.restricted_to() {
        None => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only an admin may see the clients and metrics",
        )),
    }
}

/// The clients of every service: health, load, slots, jobs, last contact.
#[utoipa::path(
    get,
    path = "/clients",
    responses(
        (status = 200, body = [ClientView]),
        (status = 403, description = "Not an admin (where a users file is configured)", body = JobAnswer),
    )
)]
async fn clients(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<ClientView>>> {
    admin_only(&caller)?;
    Ok(Json(client_views(&shared)))
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
async fn job_events(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id): IdPath,
) -> ApiResult<Json<Vec<JobEvent>>> {
    let job = find(&shared, &caller, &id)?;
    Ok(Json(shared.store.history(job.id)?))
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
async fn job_log(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    IdPath(id): IdPath,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let job = find(&shared, &caller, &id)?;
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
            let path = shared.result_path(job.id);
            tokio::task::spawn_blocking(move || log_from_zip(&path, stream, offset))
                .await
                .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "log task failed"))?
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

/// Reads a window of the log stored in the job's result ZIP (empty when there is none).
fn log_from_zip(path: &std::path::Path, stream: Stream, offset: u64) -> Vec<u8> {
    let read = || -> Option<Vec<u8>> {
        let mut archive = zip::ZipArchive::new(std::fs::File::open(path).ok()?).ok()?;
        let mut entry = archive.by_name(stream.file_name()).ok()?;
        std::io::copy(&mut (&mut entry).take(offset), &mut std::io::sink()).ok()?;
        let mut bytes = Vec::new();
        entry
            .take(logtail::MAX_CHUNK)
            .read_to_end(&mut bytes)
            .ok()?;
        Some(bytes)
    };
    read().unwrap_or_default()
}

/// Prometheus metrics of the server (and of the local client under `jobrelay up`).
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 403, description = "Not an admin (where a users file is configured)", body = JobAnswer),
    )
)]
async fn metrics(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    admin_only(&caller)?;
    let text = tokio::task::spawn_blocking(move || crate::telemetry::render(&shared))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics task failed"))??;
    Ok((
        [(
            header::CONTENT_TYPE,
            jobrelay_common::telemetry::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}
