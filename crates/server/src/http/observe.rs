//! What operators and platforms look at: `GET /` (ping) and `/health`, the dashboard's page
//! (`/ui`) and the JSON it reads (`/overview`, `/clients`; a job's timeline and log are job
//! routes), and Prometheus metrics (`/metrics`). What they show is computed by
//! [`crate::views`] and the telemetry module, on the blocking pool.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::auth::Caller;
use crate::http::error::{blocking, ApiError, ApiResult, JobAnswer};
use crate::views::{
    self, ClientView, JoinedView, MinuteCount, Overview, ServerView, ServiceUsage, UserUsage,
};
use crate::Shared;

/// These routes' part of `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(health, ping, overview, clients, metrics),
    components(schemas(
        Overview,
        ServiceUsage,
        UserUsage,
        MinuteCount,
        ClientView,
        JoinedView,
        ServerView
    ))
)]
pub struct ObserveDoc;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(ping))
        .route("/health", get(health))
        .route("/ui", get(ui))
        .route("/overview", get(overview))
        .route("/clients", get(clients))
        .route("/metrics", get(metrics))
}

/// Ping.
#[utoipa::path(get, path = "/", responses((status = 200, description = "The server answers")))]
pub(super) async fn ping() -> Json<serde_json::Value> {
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
    (status = 200, description = "`{\"status\":\"healthy\", \"role\", \"server\", \"leader\", \"leader_since\", \"lease_epoch\"}`: `role` is `leader` or `standby` (several servers on one PostgreSQL database; a server on its own database always leads and has no lease epoch)"),
    (status = 503, description = "`{\"status\":\"unhealthy\",\"message\":...}` (and the role fields): the database is damaged or cannot be read, or a background loop (dispatcher, janitor, a client's probe or collector...) is down or restarting too often"),
))]
pub(super) async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let role = role_fields(&shared);
    let checked = match shared.loops.health() {
        Err(why) => Err(why),
        Ok(()) => blocking("checking the database", move || Ok(shared.store.health()))
            .await
            .unwrap_or_else(|_| Err("the health check failed".into())),
    };
    let (status, mut body) = match checked {
        Ok(()) => (StatusCode::OK, serde_json::json!({ "status": "healthy" })),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "unhealthy", "message": why }),
        ),
    };
    if let (Some(body), serde_json::Value::Object(role)) = (body.as_object_mut(), role) {
        body.extend(role);
    }
    (status, Json(body)).into_response()
}

/// Which server leads, since when, the lease's epoch, and this server's role.
fn role_fields(shared: &Shared) -> serde_json::Value {
    let role = shared.role.get();
    serde_json::json!({
        "role": if role.leading { "leader" } else { "standby" },
        "server": shared.role.name,
        "leader": if role.leading { Some(shared.role.name.clone()) } else { role.leader },
        "leader_since": role.since_ms.map(crate::store::rfc3339),
        "lease_epoch": role.epoch,
    })
}

/// The dashboard: one self-contained page (no CDN, no build step) that polls the JSON below.
async fn ui() -> Html<&'static str> {
    Html(include_str!("ui.html"))
}

/// Jobs per state, queues and quota use per service and user, throughput over the last hour,
/// and the clients.
#[utoipa::path(get, path = "/overview", responses((status = 200, body = Overview)))]
pub(super) async fn overview(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Overview>> {
    // A user (not an admin) sees only their own jobs, and not the clients.
    let only = caller.restricted_to();
    let overview = blocking("reading the overview", move || {
        Ok(views::overview(&shared, only)?)
    })
    .await?;
    Ok(Json(overview))
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
pub(super) async fn clients(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<ClientView>>> {
    admin_only(&caller)?;
    let views = blocking("reading the clients", move || {
        Ok(views::client_views(&shared))
    })
    .await?;
    Ok(Json(views))
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
pub(super) async fn metrics(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    admin_only(&caller)?;
    let text = blocking("rendering the metrics", move || {
        Ok(crate::telemetry::render(&shared)?)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            jobrelay_common::telemetry::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}
