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
            Effect::DropInputs { id, results_in_db } => {
                drop_inputs(shared, id, results_in_db).await
            }
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

/// Removes a finished job's uploaded files once its results (whole or partial) are stored,
/// in the database (`results_in_db`: the commit said so) or as a file: they are in the result
/// ZIP too, and may be large. Without stored results they stay, for `/download_partial`,
/// until the janitor.
async fn drop_inputs(shared: &Shared, id: i64, results_in_db: bool) {
    if !results_in_db && !shared.result_path(id).is_file() {
        return;
    }
    let dir = shared.job_dir(id);
    let _ = tokio::task::spawn_blocking(move || {
        jobrelay_common::fsutil::remove_dir_all_if_exists(&dir)
    })
    .await;
}
