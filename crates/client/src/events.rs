//! The change feed: an in-memory, bounded log of payload state changes that callers can
//! long-poll (`GET /events?after=SEQ&wait=SECONDS`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use jobrelay_common::protocol::{EventsPage, PayloadEvent, PayloadRecord};
use tokio::sync::watch;

/// Events kept for callers that fall behind; older ones are dropped (callers then reconcile).
const KEEP: usize = 100_000;
/// Most events returned by one call.
pub const PAGE: usize = 1_000;

pub struct EventLog {
    instance: String,
    node: String,
    events: Mutex<VecDeque<PayloadEvent>>,
    /// The sequence number of the newest event.
    latest: watch::Sender<u64>,
}

impl EventLog {
    pub fn new(node: String) -> Self {
        EventLog {
            instance: uuid::Uuid::new_v4().to_string(),
            node,
            events: Mutex::new(VecDeque::new()),
            latest: watch::channel(0).0,
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
        // Sent under the lock, so sequence numbers reach the channel in order.
        self.latest.send_replace(seq);
    }

    /// Events after `after`; waits up to `wait` for the first one when there is none yet.
    pub async fn after(&self, after: u64, wait: Duration) -> EventsPage {
        let mut rx = self.latest.subscribe();
        let latest = *rx.borrow_and_update();
        // `after` beyond the latest event comes from a previous instance: answer at once
        // (truncated), so the caller reconciles without waiting.
        if latest == after && !wait.is_zero() {
            // A stopping client answers at once, so the long-poll does not hold its stop.
            tokio::select! {
                _ = tokio::time::timeout(wait, rx.wait_for(|latest| *latest > after)) => {}
                () = jobrelay_common::serve::stopping() => {}
            }
        }
        self.page(after)
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
    use jobrelay_common::protocol::PayloadStatus;

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
}
