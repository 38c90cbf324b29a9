//! Retention: removes the work directories of payloads that finished more than `max_age` ago
//! and marks them Cleaned (first marked, then removed: see `PayloadStore::clean`).

use std::sync::Arc;
use std::time::Duration;

use crate::store::{now_ms, PayloadStore};

/// Starts the periodic clean-up. It checks every `max_age / 4`, between 1 s and 60 s.
pub fn start(store: Arc<PayloadStore>, max_age: Duration) {
    let every = (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    tokio::spawn(async move {
        let leftovers = store.clone();
        let _ = tokio::task::spawn_blocking(move || leftovers.remove_leftover_work_dirs()).await;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let cutoff = now_ms().saturating_sub(max_age.as_millis() as u64);
            let expired = store.finished_before(cutoff);
            if expired.is_empty() {
                continue;
            }
            let store = store.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for id in expired {
                    let _ = store.clean(id, "work directory removed after max age");
                }
            })
            .await;
        }
    });
}
