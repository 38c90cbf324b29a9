//! Blocking work an HTTP handler starts, bounded: the one way the server's and the client's
//! handlers reach a database, a file system or anything a job made. Work runs on tokio's
//! blocking pool, never on an async worker thread (a handful of those serve every
//! connection: one stuck in a lock or a slow disk would stall requests that need neither).
//! Each task has a time limit: past it the request is answered while the thread finishes on
//! its own, so no request waits without bound.

use std::time::Duration;

/// How long a health check waits for the blocking pool to start a trivial task.
pub const POOL_PROBE: Duration = Duration::from_secs(2);

/// Why a blocking task gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    #[error("{0} took longer than {1:?}")]
    TimedOut(&'static str, Duration),
    #[error("{0} failed")]
    Panicked(&'static str),
}

/// Runs `work` on the blocking pool and waits at most `limit` for its result.
pub async fn run<T: Send + 'static>(
    what: &'static str,
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Failed> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(Failed::Panicked(what)),
        Err(_) => {
            tracing::warn!(what, ?limit, "blocking task timed out");
            Err(Failed::TimedOut(what, limit))
        }
    }
}

/// Whether the blocking pool starts a trivial task within `limit`.
pub async fn pool_responsive(limit: Duration) -> bool {
    run("pool probe", limit, || ()).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_pool_is_seen_and_a_slow_task_times_out() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert!(pool_responsive(Duration::from_secs(30)).await);
            let (release, parked) = std::sync::mpsc::channel::<()>();
            let slow = run("parked task", Duration::from_millis(100), move || {
                let _ = parked.recv();
            });
            assert!(matches!(slow.await, Err(Failed::TimedOut(..))));
            // The one blocking thread is still parked: the pool starts nothing.
            assert!(!pool_responsive(Duration::from_millis(200)).await);
            release.send(()).unwrap();
            assert!(pool_responsive(Duration::from_secs(30)).await);
        });
    }

    #[test]
    fn a_panicking_task_is_an_answer_not_a_panic() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let failed = runtime.block_on(run("panicking task", Duration::from_secs(30), || {
            panic!("on purpose")
        }));
        assert!(matches!(failed, Err(Failed::Panicked("panicking task"))));
    }
}
