//! The server's HTTP API, thin: handlers parse, call the lifecycle, [`crate::stop`] or the read side (the
//! store's reads, [`crate::views`]) and shape the answer; every store or file-system call of
//! theirs goes through [`error::blocking`] onto the blocking pool. This file only assembles
//! the router.
//!
//! - [`error`]: the leaf: the reference's JSON error shape, the extractors, `blocking`;
//! - [`auth`]: finds each request's caller (the users file's token; a joined client's
//!   credential is refused off the join routes);
//! - [`jobs`]: the job routes (upload, list, status, events, log, downloads, terminate);
//! - [`join`]: the routes of clients that join at run time (join, tunnel, leave);
//! - [`observe`]: ping, health, the dashboard and its JSON, metrics;
//! - [`docs`]: `/openapi.json` and `/docs`.

pub mod auth;
pub mod docs;
pub mod error;
pub mod jobs;
pub mod join;
pub mod observe;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::Router;
use jobrelay_common::http::{with_json_fallbacks, with_standard_layers};

use crate::Shared;
use error::ApiError;

pub fn router(shared: Arc<Shared>) -> Router {
    let router = Router::new()
        .merge(observe::routes())
        .merge(jobs::routes())
        .merge(join::routes())
        .merge(docs::routes());
    // The fallbacks come before the authentication layer, so that an unknown endpoint asked
    // without a token answers 401 like every other closed one.
    let router = with_json_fallbacks::<_, ApiError>(router)
        .with_state(shared.clone())
        .layer(axum::middleware::from_fn_with_state(shared, auth::identify));
    with_standard_layers::<ApiError>(router)
}
