//! Removes the files of finished jobs older than the retention period (`--max-age`,
//! `MAX_AGE`) and marks them Cleaned. The job's record stays, so its id keeps answering.

use std::sync::Arc;
use std::time::Duration;

use jobrelay_common::fsutil::remove_dir_all_if_exists;

use crate::store::now_ms;
use crate::Shared;

/// Runs forever, every tenth of the retention period (between 1 s and 10 min).
pub async fn run(shared: Arc<Shared>) {
    let period =
        (shared.config.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        crate::supervise::fault_point("janitor");
        tokio::time::sleep(period).await;
        if let Err(e) = sweep(&shared).await {
            tracing::error!(error = %e, "janitor sweep failed");
        }
    }
}

/// Cleans every finished job past the retention period.
pub async fn sweep(shared: &Shared) -> anyhow::Result<usize> {
    let cutoff = now_ms() - shared.config.max_age.as_millis() as i64;
    let ids = shared.store.finished_before(cutoff)?;
    let mut cleaned = 0;
    for id in ids {
        // The state first: a download from now on answers Cleaned, never a half-removed file.
        if !shared.lifecycle.expired(id)? {
            continue;
        }
        let dir = shared.job_dir(id);
        let result = shared.result_path(id);
        tokio::task::spawn_blocking(move || {
            let _ = remove_dir_all_if_exists(&dir);
            match std::fs::remove_file(&result) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %result.display(), error = %e, "could not remove result")
                }
                _ => {}
            }
        })
        .await?;
        cleaned += 1;
    }
    Ok(cleaned)
}
