//! Performs what the lifecycle's events ask for once their change is committed: the I/O edge
//! of a state change. Checks and delayed offers run on tasks of their own; kills, releases
//! and the removal of inputs are done before this returns, in order.

use std::sync::Arc;

use crate::lifecycle::{Effect, Effects};
use crate::Shared;

/// Boxed: a check may end in effects of its own (results stored, a release), so this future
/// and the collector's contain each other.
pub fn perform(
    shared: &Arc<Shared>,
    effects: Effects,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    Box::pin(perform_all(shared, effects))
}

async fn perform_all(shared: &Arc<Shared>, effects: Effects) {
    for effect in effects {
        match effect {
            Effect::Check(job) => shared.check_requests.ask(*job),
            Effect::Kill { client, dest } => {
                if let Some(client) = shared.client_of(Some(&client)) {
                    if let crate::gateway::Killed::Failed { why, .. } =
                        crate::gateway::kill(shared, &client, dest).await
                    {
                        tracing::info!(dest, error = why, "could not kill payload");
                    }
                }
            }
            Effect::Release { client, dest } => {
                if let Some(client) = shared.client_of(Some(&client)) {
                    crate::gateway::release(shared, &client, dest).await;
                }
            }
            Effect::DropInputs { id, with_commit } => drop_inputs(shared, id, with_commit).await,
            Effect::CheckLater { job, after } => {
                let checking = shared.clone();
                shared.job_tasks.spawn(async move {
                    tokio::time::sleep(after).await;
                    checking.check_requests.ask(*job);
                });
            }
            Effect::OfferAgain { id, after } => {
                let offering = shared.clone();
                shared.job_tasks.spawn(async move {
                    tokio::time::sleep(after).await;
                    offering.lifecycle.offer_again(id);
                });
            }
        }
    }
}

/// Removes a finished job's uploaded files once its results (whole or partial) are stored:
/// they are in the result ZIP too, and may be large. `with_commit`: the commit of its final
/// state stored them and deleted the input files kept in the database; else they are stored
/// only if the result file is there (a terminate's partial ZIP), and the rows go now. Without
/// stored results they stay, for `/download_partial`, until the janitor.
async fn drop_inputs(shared: &Arc<Shared>, id: i64, with_commit: bool) {
    let dir = shared.job_dir(id);
    let shared = shared.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if !with_commit {
            if !shared.result_path(id).is_file() {
                return;
            }
            if let Err(e) = shared.store.drop_inputs(id) {
                tracing::warn!(job = id, error = %e, "could not delete the job's kept inputs");
            }
        }
        let _ = jobrelay_common::fsutil::remove_dir_all_if_exists(&dir);
    })
    .await;
}
