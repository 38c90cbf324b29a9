//! The server's background loops (dispatcher, janitor, integrity check, webhook delivery, and
//! a probe and a collector per client), each run under a supervisor that restarts it when it panics or
//! ends, and the health of those loops for `/health`.
//!
//! A restart waits 100 ms, doubling with each restart in the last minute up to 10 s, so a
//! loop that panics at once is not spun. A loop is unhealthy while it waits to restart, and
//! while it has been restarted [`TOO_OFTEN`] times or more in the last minute: `/health` then
//! answers 503 naming it. Each restart logs an error and counts
//! `jobrelay_server_loop_restarts_total{loop, client}`.
//!
//! A restart starts the loop afresh from the shared state; it does not repair state the panic
//! left half-changed (locks are taken through poisoning, see `crate::lock`).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;

/// Restarts counted for health and backoff are those of the last `WINDOW`.
const WINDOW: Duration = Duration::from_secs(60);
/// A loop restarted this many times within [`WINDOW`] is reported unhealthy.
pub const TOO_OFTEN: usize = 5;
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Fault injection for the tests: a comma-separated list of loop kinds (`dispatcher`,
/// `collector`, `probe`, `janitor`, `integrity`, `webhooks`) that panic the first time they reach their
/// fault point ([`fault_point`]).
pub const PANIC_ONCE: &str = "JOBRELAY_TEST_PANIC_ONCE";
/// The same, panicking every time.
pub const PANIC_ALWAYS: &str = "JOBRELAY_TEST_PANIC_ALWAYS";

/// Every supervised loop of a server.
#[derive(Default)]
pub struct Loops {
    loops: Mutex<Vec<Arc<LoopState>>>,
}

struct LoopState {
    kind: &'static str,
    client: Option<String>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Why the loop stopped, while it waits to be restarted.
    down: Option<String>,
    /// Restarts within the last [`WINDOW`], oldest first.
    restarts: VecDeque<Instant>,
    /// Why it stopped last.
    last: Option<String>,
}

impl LoopState {
    fn name(&self) -> String {
        match &self.client {
            Some(client) => format!("{} of {client}", self.kind),
            None => self.kind.to_owned(),
        }
    }

    /// Records a stop; returns the delay before the restart and the restarts in the window.
    fn stopped(&self, why: &str) -> (Duration, usize) {
        let mut inner = crate::lock(&self.inner);
        let now = Instant::now();
        prune(&mut inner.restarts, now);
        inner.restarts.push_back(now);
        inner.down = Some(why.to_owned());
        inner.last = Some(why.to_owned());
        let recent = inner.restarts.len();
        let delay = FIRST_DELAY
            .saturating_mul(1 << (recent - 1).min(16))
            .min(MAX_DELAY);
        (delay, recent)
    }

    fn restarted(&self) {
        crate::lock(&self.inner).down = None;
    }

    fn problem(&self) -> Option<String> {
        let mut inner = crate::lock(&self.inner);
        prune(&mut inner.restarts, Instant::now());
        if let Some(why) = &inner.down {
            return Some(format!(
                "background loop {} is down ({why}); restarting",
                self.name()
            ));
        }
        (inner.restarts.len() >= TOO_OFTEN).then(|| {
            format!(
                "background loop {} restarted {} times in the last {} s (last: {})",
                self.name(),
                inner.restarts.len(),
                WINDOW.as_secs(),
                inner.last.as_deref().unwrap_or("")
            )
        })
    }
}

fn prune(restarts: &mut VecDeque<Instant>, now: Instant) {
    while restarts
        .front()
        .is_some_and(|t| now.duration_since(*t) > WINDOW)
    {
        restarts.pop_front();
    }
}

impl Loops {
    /// Runs `make()`'s future on a task of its own, again whenever it panics or ends.
    /// Aborting the returned handle stops the loop for good.
    pub fn spawn<F, Fut>(
        &self,
        kind: &'static str,
        client: Option<&str>,
        make: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let state = Arc::new(LoopState {
            kind,
            client: client.map(str::to_owned),
            inner: Mutex::new(Inner::default()),
        });
        crate::lock(&self.loops).push(state.clone());
        tokio::spawn(async move {
            loop {
                // Polled in this task (not spawned), so aborting this task drops the loop.
                let why = match AssertUnwindSafe(make()).catch_unwind().await {
                    Ok(()) => "it ended".to_owned(),
                    Err(panic) => format!("it panicked: {}", panic_message(panic.as_ref())),
                };
                let (delay, recent) = state.stopped(&why);
                metrics::counter!(
                    "jobrelay_server_loop_restarts_total",
                    "loop" => state.kind,
                    "client" => state.client.clone().unwrap_or_default()
                )
                .increment(1);
                tracing::error!(
                    r#loop = %state.name(),
                    restarts_last_minute = recent,
                    ?delay,
                    "background loop stopped ({why}); restarting it"
                );
                tokio::time::sleep(delay).await;
                state.restarted();
            }
        })
    }

    /// Forgets the loops of these kinds (their tasks were aborted: a leader's term ended).
    pub fn retire(&self, kinds: &[&str]) {
        crate::lock(&self.loops).retain(|l| !kinds.contains(&l.kind));
    }

    /// `Err` naming every loop that is down or restarting too often.
    pub fn health(&self) -> Result<(), String> {
        let problems: Vec<String> = crate::lock(&self.loops)
            .iter()
            .filter_map(|l| l.problem())
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Panics here when the tests asked for it ([`PANIC_ONCE`], [`PANIC_ALWAYS`]) for loop `kind`.
pub fn fault_point(kind: &'static str) {
    static ASKED: OnceLock<(Vec<String>, Vec<String>)> = OnceLock::new();
    static FIRED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let (once, always) = ASKED.get_or_init(|| {
        let list = |name: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        (list(PANIC_ONCE), list(PANIC_ALWAYS))
    });
    let asked = |list: &[String]| list.iter().any(|k| k == kind);
    let fire = asked(always)
        || (asked(once)
            && crate::lock(&FIRED)
                .get_or_insert_with(HashSet::new)
                .insert(kind));
    if fire {
        panic!("injected panic in the {kind} loop ({PANIC_ONCE}/{PANIC_ALWAYS})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_and_reported_while_it_restarts_often() {
        let loops = Loops::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let task = loops.spawn("test", None, move || {
            let runs = counted.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                if n < TOO_OFTEN {
                    panic!("run {n}");
                }
                std::future::pending::<()>().await
            }
        });
        // 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of backoff before the sixth run.
        let deadline = Instant::now() + Duration::from_secs(30);
        while runs.load(Ordering::SeqCst) <= TOO_OFTEN {
            assert!(Instant::now() < deadline, "the loop was not restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let why = loops.health().unwrap_err();
        assert!(
            why.contains("background loop test restarted 5 times"),
            "{why}"
        );
        assert!(why.contains("it panicked: run 4"), "{why}");
        task.abort();
    }

    #[test]
    fn restarts_older_than_the_window_no_longer_count() {
        let Some(old) = Instant::now().checked_sub(WINDOW + Duration::from_secs(1)) else {
            return; // the clock started less than a minute ago
        };
        let state = LoopState {
            kind: "test",
            client: Some("http://c".into()),
            inner: Mutex::new(Inner {
                down: None,
                restarts: std::iter::repeat_n(old, TOO_OFTEN).collect(),
                last: None,
            }),
        };
        assert_eq!(state.problem(), None);
        state.stopped("it ended");
        let why = state.problem().unwrap();
        assert!(why.contains("test of http://c is down (it ended)"), "{why}");
        state.restarted();
        assert_eq!(state.problem(), None);
    }
}
