//! Leases on payload work directories: a reader (a ZIP being streamed, a log being read)
//! holds one for as long as it reads, and a clean-up removes the directory only once no lease
//! is left. The record is marked Cleaned *before* the removal is asked for (see
//! `PayloadStore::clean`) and a lease is only given once its record is checked under the
//! leases' lock, which a removal takes too: no lease starts once a removal is decided, and a
//! reader that got its lease first finishes whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jobrelay_common::fsutil::remove_dir_all_if_exists;

#[derive(Default)]
struct Held {
    readers: usize,
    /// Set when a clean-up asked for the removal while readers held the directory.
    remove: Option<PathBuf>,
}

type Table = Arc<Mutex<HashMap<u64, Held>>>;

/// The leases of one store.
#[derive(Default)]
pub struct Leases {
    held: Table,
}

/// A reader's hold on a work directory: while it lives, the directory is not removed.
pub struct Lease {
    held: Table,
    id: u64,
}

impl Leases {
    /// Takes a lease on payload `id`'s directory if `check` passes. `check` runs while no
    /// removal can be decided, so what it saw (the record is not Cleaned) stays true for as
    /// long as the lease lives, as far as the directory is concerned.
    pub fn take<T, E>(
        &self,
        id: u64,
        check: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Lease), E> {
        let mut held = self.held.lock().unwrap();
        let value = check()?;
        held.entry(id).or_default().readers += 1;
        Ok((
            value,
            Lease {
                held: self.held.clone(),
                id,
            },
        ))
    }

    /// Removes `dir` now if no lease holds it, else when the last lease ends. Call only once
    /// the payload is marked Cleaned, so that no new lease can start.
    pub fn remove_when_free(&self, id: u64, dir: PathBuf) {
        if let Some(held) = self.held.lock().unwrap().get_mut(&id) {
            held.remove = Some(dir);
            return;
        }
        remove(id, &dir);
    }

    /// Number of payloads whose directory a reader holds (tests).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let dir = {
            let mut held = self.held.lock().unwrap();
            let Some(entry) = held.get_mut(&self.id) else {
                return;
            };
            entry.readers -= 1;
            if entry.readers > 0 {
                return;
            }
            held.remove(&self.id).and_then(|entry| entry.remove)
        };
        if let Some(dir) = dir {
            let id = self.id;
            // Dropped where a response body ends, often on a runtime thread: the removal
            // of a large tree goes to a blocking thread.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || remove(id, &dir));
                }
                Err(_) => remove(id, &dir),
            }
        }
    }
}

fn remove(id: u64, dir: &Path) {
    if let Err(e) = remove_dir_all_if_exists(dir) {
        // Left as it is; the next start removes what Cleaned records left.
        tracing::error!(id, error = %e, "could not remove work directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_waits_for_the_last_reader() {
        let leases = Leases::default();
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("7");
        std::fs::create_dir(&work).unwrap();
        let ((), first) = leases.take(7, || Ok::<_, ()>(())).unwrap();
        let ((), second) = leases.take(7, || Ok::<_, ()>(())).unwrap();
        leases.remove_when_free(7, work.clone());
        assert!(work.exists(), "removed under a reader");
        drop(first);
        assert!(work.exists(), "removed under the second reader");
        drop(second);
        assert!(!work.exists(), "not removed after the last reader");
        assert_eq!(leases.held(), 0);

        // Without a reader the removal is immediate; a refused check takes no lease.
        std::fs::create_dir(&work).unwrap();
        assert!(leases.take(7, || Err::<(), _>("cleaned")).is_err());
        leases.remove_when_free(7, work.clone());
        assert!(!work.exists());
    }
}
