//! The API's description: `/openapi.json`, derived from the handlers' `utoipa` annotations
//! so that it cannot drift from them, and `/docs`, a self-contained page (no CDN) that
//! renders it.

use std::sync::Arc;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::OpenApi;

use crate::http::{jobs, join, observe};
use crate::Shared;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
}

/// The whole document: the server's description and the bearer scheme here, the routes'
/// paths and schemas from each group's own document (so that their tags stay as they were).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "jobrelay server",
        description = "Job orchestration: upload a job (run.sh and its inputs) for a service, \
                       follow it, download the ZIP of its work directory."
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The document `/openapi.json` serves.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
        .merge_from(jobs::JobsDoc::openapi())
        .merge_from(observe::ObserveDoc::openapi())
        .merge_from(join::JoinDoc::openapi())
}

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

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document().to_pretty_json().unwrap_or_default(),
    )
        .into_response()
}

async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
