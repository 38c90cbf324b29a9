//! Releases of payloads waiting to ride a client's next `/events` call (extension
//! `release_in_events`) instead of a `POST /release/{id}` each: one request fewer per job
//! (issue 18). Whatever no call has taken within [`flush_after`] is sent on its own by the
//! gateway, so a client with no news still gets its releases.

use std::sync::Mutex;
use std::time::Duration;

/// How long a release may wait for an `/events` call before it is sent on its own.
pub const FLUSH_AFTER: Duration = Duration::from_millis(500);

/// Milliseconds to use instead of [`FLUSH_AFTER`] (the tests of releases in `/events`).
pub const FLUSH_AFTER_KNOB: &str = "JOBRELAY_TEST_RELEASE_FLUSH_MS";

/// [`FLUSH_AFTER`], or what [`FLUSH_AFTER_KNOB`] says.
pub fn flush_after() -> Duration {
    static CHOSEN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        std::env::var(FLUSH_AFTER_KNOB)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(FLUSH_AFTER, Duration::from_millis)
    })
}

/// Most releases one `/events` call carries (the client takes up to 1,000).
pub const MOST_PER_CALL: usize = 256;

#[derive(Default)]
pub struct PendingReleases {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    dests: Vec<i64>,
    /// True while a flush is due (at most one at a time).
    flush_due: bool,
}

impl PendingReleases {
    /// Queues `dest`; true when the caller must arrange a [`flush`](Self::flush) after
    /// [`flush_after`] (none was due).
    pub fn push(&self, dest: i64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.dests.push(dest);
        !std::mem::replace(&mut state.flush_due, true)
    }

    /// The oldest of the queued releases, at most [`MOST_PER_CALL`], for an `/events` call.
    pub fn take_for_call(&self) -> Vec<i64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = state.dests.len().min(MOST_PER_CALL);
        state.dests.drain(..n).collect()
    }

    /// Puts back releases whose `/events` call failed, oldest first; true when the caller
    /// must arrange a flush (as [`push`](Self::push)).
    pub fn put_back(&self, dests: Vec<i64>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.dests.splice(0..0, dests);
        !state.dests.is_empty() && !std::mem::replace(&mut state.flush_due, true)
    }

    /// Everything still queued, to be sent on its own; a later push arranges the next flush.
    pub fn flush(&self) -> Vec<i64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.flush_due = false;
        std::mem::take(&mut state.dests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flush_is_due_at_a_time_and_calls_take_the_oldest_first() {
        let pending = PendingReleases::default();
        assert!(pending.push(1), "the first release arranges a flush");
        assert!(!pending.push(2), "one is due already");
        assert_eq!(pending.take_for_call(), [1, 2]);
        assert!(!pending.push(3), "the flush due is still to come");
        assert_eq!(pending.flush(), [3]);
        assert_eq!(pending.flush(), Vec::<i64>::new());
        assert!(
            pending.push(4),
            "after a flush the next release arranges another"
        );
    }

    #[test]
    fn a_call_takes_at_most_its_share_and_a_failed_one_puts_its_releases_back_in_front() {
        let pending = PendingReleases::default();
        for dest in 0..(MOST_PER_CALL as i64 + 10) {
            pending.push(dest);
        }
        let first = pending.take_for_call();
        assert_eq!(first.len(), MOST_PER_CALL);
        assert_eq!(first[0], 0);
        assert!(
            !pending.put_back(first),
            "the flush arranged by the pushes is due"
        );
        let all = pending.flush();
        assert_eq!(all, (0..(MOST_PER_CALL as i64 + 10)).collect::<Vec<_>>());
        assert!(
            !pending.put_back(Vec::new()),
            "nothing put back, nothing due"
        );
        assert!(
            pending.put_back(vec![7]),
            "put back after the flush: a new one"
        );
        assert_eq!(pending.take_for_call(), [7]);
    }
}
