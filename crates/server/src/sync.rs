//! Locking that survives a panic elsewhere: a leaf every module may use.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex` even when a thread panicked while holding it. Every mutex of the server holds
/// state that a panic cannot leave torn (maps and values changed by single calls; the
/// database's transaction rolls back as the panic unwinds), so one panicking task must not
/// make every later user of the lock panic too.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Locks `mutex` (as [`lock`]) at once when it is free; when another thread holds it (a long
/// query on the database's connection, say), waits for it off the async worker
/// ([`off_worker`]), so that waiting holds up no other task. The free case, by far the most
/// common, costs no hand-over of the worker.
pub fn lock_off_worker<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => off_worker(|| lock(mutex)),
    }
}

/// Runs `work`, which blocks (a database call), without holding up the async tasks of the
/// worker thread it is called on: on a multi-threaded runtime's worker, through
/// [`tokio::task::block_in_place`] (the worker's other tasks move to another thread while it
/// runs); elsewhere (a blocking-pool thread, a current-thread runtime, no runtime) as is.
pub fn off_worker<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::off_worker;

    #[test]
    fn blocking_work_runs_anywhere() {
        assert_eq!(off_worker(|| 1), 1);
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { off_worker(|| 2) }), 2);
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        assert_eq!(multi.block_on(async { off_worker(|| 3) }), 3);
        let from_worker = multi.block_on(async { tokio::spawn(async { off_worker(|| 4) }).await });
        assert_eq!(from_worker.unwrap(), 4);
        let from_blocking_pool =
            multi.block_on(async { tokio::task::spawn_blocking(|| off_worker(|| 5)).await });
        assert_eq!(from_blocking_pool.unwrap(), 5);
    }
}
