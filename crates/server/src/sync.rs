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
