//! The change feed: an in-memory, bounded log of payload state changes that callers can
//! long-poll (`GET /events?after=SEQ&wait=SECONDS`).
//!
//! News wakes a waiting call by how soon its caller acts on it ([`Urgency`]): a payload's
//! end (Completed, Failed, Invalid, Killed) at once; a payload prepared or started after
//! up to [`LINGER`] more, so an end goes in the same page; a payload cleaned (released by
//! the server or expired) not at all: it goes in the next page that other news sends. A
//! short job's start, end and release were three answers (and three requests of the
//! server) where one does (issue 18).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use jobrelay_common::protocol::{EventsPage, PayloadEvent, PayloadRecord, PayloadStatus};
use tokio::sync::watch;

/// Events kept for callers that fall behind; older ones are dropped (callers then reconcile).
const KEEP: usize = 100_000;
/// Most events returned by one call.
pub const PAGE: usize = 1_000;
/// Longest a waiting call is held after news that is no end, for an end to join it. Such
/// news reaches the server that much later at most; an end's never waits.
pub const LINGER: Duration = Duration::from_millis(25);

pub struct EventLog {
    instance: String,
    node: String,
    events: Mutex<VecDeque<PayloadEvent>>,
    /// The sequence number of the newest event.
    latest: watch::Sender<u64>,
    /// The sequence number of the newest event that wakes a waiting call (no [`Urgency::Quiet`]).
    news: watch::Sender<u64>,
    /// The sequence number of the newest end of a payload ([`Urgency::Now`]).
    urgent: watch::Sender<u64>,
}

/// How soon news of a payload's new state is sent to a caller waiting for news.
#[derive(Debug, PartialEq)]
enum Urgency {
    /// An end: the caller fetches the results.
    Now,
    /// Prepared or started: held up to [`LINGER`] for an end to join it.
    Linger,
    /// Cleaned: the caller released it (or lost it long ago); sent with the next news.
    Quiet,
}

fn urgency(status: PayloadStatus) -> Urgency {
    match status {
        PayloadStatus::Prepared | PayloadStatus::Running => Urgency::Linger,
        PayloadStatus::Cleaned => Urgency::Quiet,
        _ => Urgency::Now,
    }
}

impl EventLog {
    pub fn new(node: String) -> Self {
        EventLog {
            instance: uuid::Uuid::new_v4().to_string(),
            node,
            events: Mutex::new(VecDeque::new()),
            latest: watch::channel(0).0,
            news: watch::channel(0).0,
            urgent: watch::channel(0).0,
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Records the current state of `record` as a new event and wakes the waiters.
    pub fn publish(&self, record: &PayloadRecord) {
        let mut events = self.events.lock().unwrap();
        let seq = *self.latest.borrow() + 1;
        events.push_back(PayloadEvent {
            seq,
            id: record.id,
            status: record.status,
            exit_code: record.exit_code,
            reason: record.reason.clone(),
        });
        if events.len() > KEEP {
            events.pop_front();
        }
        // Sent under the lock, so sequence numbers reach the channels in order; the more
        // urgent first, so a caller woken by one already sees the others.
        let urgency = urgency(record.status);
        if urgency == Urgency::Now {
            self.urgent.send_replace(seq);
        }
        if urgency != Urgency::Quiet {
            self.news.send_replace(seq);
        }
        self.latest.send_replace(seq);
    }

    /// Events after `after`; waits up to `wait` for news when there is none yet (and, when
    /// that is no end, up to [`LINGER`] more for an end). Quiet events after `after` are
    /// no news: they are answered with the next, or when the wait is over.
    pub async fn after(&self, after: u64, wait: Duration) -> EventsPage {
        // `news` before `latest`: news published between the two reads is seen by the wait.
        let newest_news = *self.news.borrow();
        let latest = *self.latest.borrow();
        // `after` beyond the latest event comes from a previous instance: answer at once
        // (truncated), so the caller reconciles without waiting.
        if newest_news <= after && after <= latest && !wait.is_zero() {
            // A stopping client answers at once, so the long-poll does not hold its stop.
            tokio::select! {
                () = self.wait_for_news(after, wait) => {}
                () = jobrelay_common::serve::stopping() => {}
            }
        }
        self.page(after)
    }

    async fn wait_for_news(&self, after: u64, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut news = self.news.subscribe();
        let mut urgent = self.urgent.subscribe();
        let newer = |seq: &u64| *seq > after;
        if tokio::time::timeout_at(deadline, news.wait_for(newer))
            .await
            .is_err()
        {
            return;
        }
        let linger_until = deadline.min(tokio::time::Instant::now() + LINGER);
        let _ = tokio::time::timeout_at(linger_until, urgent.wait_for(newer)).await;
    }

    fn page(&self, after: u64) -> EventsPage {
        let events = self.events.lock().unwrap();
        let latest = *self.latest.borrow();
        let oldest = events.front().map_or(latest + 1, |e| e.seq);
        let mut page = EventsPage {
            instance: self.instance.clone(),
            node: self.node.clone(),
            next: after,
            truncated: false,
            events: Vec::new(),
        };
        if after > latest {
            // A sequence number from another instance of this client.
            page.truncated = true;
            page.next = latest;
            return page;
        }
        page.truncated = after + 1 < oldest;
        let skip = (after + 1).saturating_sub(oldest) as usize;
        page.events = events.iter().skip(skip).take(PAGE).cloned().collect();
        if let Some(last) = page.events.last() {
            page.next = last.seq;
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, status: PayloadStatus) -> PayloadRecord {
        PayloadRecord {
            id,
            status,
            loc: String::new(),
            pid: 0,
            killed: false,
            input: Default::default(),
            exit_code: None,
            signal: None,
            reason: None,
            key: None,
            node: None,
            created_ms: None,
            started_ms: None,
            finished_ms: None,
            slurm_job_id: None,
            resources: None,
            gpu_ids: Vec::new(),
        }
    }

    #[tokio::test]
    async fn pages_follow_sequence_numbers() {
        let log = EventLog::new("n".into());
        log.publish(&record(1, PayloadStatus::Running));
        log.publish(&record(1, PayloadStatus::Completed));
        let page = log.after(0, Duration::ZERO).await;
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.next, 2);
        assert!(!page.truncated);
        let page = log.after(2, Duration::ZERO).await;
        assert!(page.events.is_empty());
        assert_eq!(page.next, 2);
        let page = log.after(7, Duration::ZERO).await;
        assert!(
            page.truncated,
            "a sequence number from the future means a restart"
        );
    }

    #[tokio::test]
    async fn a_waiting_caller_wakes_on_the_next_event() {
        let log = std::sync::Arc::new(EventLog::new("n".into()));
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move { log.after(0, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.publish(&record(3, PayloadStatus::Failed));
        let page = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken before the wait ran out")
            .unwrap();
        assert_eq!(page.events[0].id, 3);
    }

    /// A call of `after(after, wait)` on its own task, already waiting.
    async fn waiting_call(
        log: &std::sync::Arc<EventLog>,
        after: u64,
        wait: Duration,
    ) -> tokio::task::JoinHandle<EventsPage> {
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move { log.after(after, wait).await })
        };
        // Let it start waiting.
        tokio::time::sleep(Duration::from_millis(1)).await;
        waiter
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_is_held_for_the_linger_and_an_end_within_it_goes_in_the_same_page() {
        let log = std::sync::Arc::new(EventLog::new("n".into()));
        let waiter = waiting_call(&log, 0, Duration::from_secs(30)).await;
        let started = tokio::time::Instant::now();
        log.publish(&record(1, PayloadStatus::Running));
        tokio::time::sleep(LINGER / 2).await;
        assert!(!waiter.is_finished(), "a start alone is held");
        log.publish(&record(1, PayloadStatus::Completed));
        let page = waiter.await.unwrap();
        let seen: Vec<_> = page.events.iter().map(|e| e.status).collect();
        assert_eq!(seen, [PayloadStatus::Running, PayloadStatus::Completed]);
        assert!(started.elapsed() < LINGER, "the end ended the linger");

        // A start that nothing follows is answered once the linger is over.
        let waiter = waiting_call(&log, 2, Duration::from_secs(30)).await;
        let started = tokio::time::Instant::now();
        log.publish(&record(2, PayloadStatus::Running));
        let page = waiter.await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(started.elapsed(), LINGER);
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_is_answered_at_once_and_the_linger_never_outlasts_the_wait() {
        let log = std::sync::Arc::new(EventLog::new("n".into()));
        let waiter = waiting_call(&log, 0, Duration::from_secs(30)).await;
        let started = tokio::time::Instant::now();
        log.publish(&record(4, PayloadStatus::Killed));
        let page = waiter.await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);

        let waiter = waiting_call(&log, 1, LINGER / 5).await;
        tokio::time::sleep(LINGER / 10 - Duration::from_millis(1)).await;
        log.publish(&record(5, PayloadStatus::Prepared));
        let page = waiter.await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(
            started.elapsed(),
            LINGER / 5,
            "held to the wait asked, not past it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cleaned_payload_wakes_no_caller_and_goes_with_the_next_news() {
        let log = std::sync::Arc::new(EventLog::new("n".into()));
        log.publish(&record(1, PayloadStatus::Completed));
        // Quiet news before the call is no reason to answer it either.
        log.publish(&record(1, PayloadStatus::Cleaned));
        let waiter = waiting_call(&log, 1, Duration::from_secs(30)).await;
        log.publish(&record(2, PayloadStatus::Cleaned));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "a cleaned payload is no news");
        log.publish(&record(3, PayloadStatus::Failed));
        let page = waiter.await.unwrap();
        let seen: Vec<_> = page.events.iter().map(|e| (e.id, e.status)).collect();
        assert_eq!(
            seen,
            [
                (1, PayloadStatus::Cleaned),
                (2, PayloadStatus::Cleaned),
                (3, PayloadStatus::Failed)
            ]
        );
        assert_eq!(page.next, 4);

        // With no other news, the quiet ones are answered when the wait is over.
        let started = tokio::time::Instant::now();
        let waiter = waiting_call(&log, 4, Duration::from_secs(5)).await;
        log.publish(&record(4, PayloadStatus::Cleaned));
        let page = waiter.await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // And a call that does not wait gets them at once.
        log.publish(&record(5, PayloadStatus::Cleaned));
        assert_eq!(log.after(5, Duration::ZERO).await.events.len(), 1);
    }
}
