//! The loop that sends the outbox's notifications: each due one is POSTed, signed, with its
//! delivery id; a 2xx answer ends it, 410 Gone ends it for good, anything else (another
//! status, no connection, a timeout) is tried again with exponential backoff until the retry
//! period after the state change is over. At most [`MAX_IN_FLIGHT`] are sent at once, and
//! one notification is never sent twice at the same time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use tokio::task::JoinSet;

use super::{resolver, signing, Allowlist};
use crate::store::{now_ms, Delivery, DeliveryEnd};
use crate::Shared;

/// Header carrying the delivery id, the same on every try of one notification.
pub const DELIVERY_HEADER: &str = "X-Jobrelay-Delivery";
/// Header naming the state announced (`Completed`, `Running`, ...).
pub const EVENT_HEADER: &str = "X-Jobrelay-Event";
/// Most notifications being sent at once.
pub const MAX_IN_FLIGHT: usize = 32;
/// A receiver must accept the connection within this...
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and answer within this: a slow receiver cannot hold a sending slot for long.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry comes this long after a failed try, then twice as long each time...
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// ...up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest sleep between two looks at the outbox (a change also wakes the loop at once).
const IDLE: Duration = Duration::from_secs(2);

/// The HTTP client of the deliveries: its own (not the executor clients' pools), short
/// timeouts, redirects not followed, so an allowed host cannot send the server on to one that
/// is not, and names resolved to public addresses only ([`resolver`]) unless allowed.
fn http_client(allow_private: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .dns_resolver(resolver::PublicOnly { allow_private })
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RESPONSE_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("jobrelay-server/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the webhook HTTP client builds")
}

/// Time to wait after the `attempts`-th failed try.
pub fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(20))
        .min(MAX_BACKOFF)
}

/// Runs forever (under `supervise`): sends what is due, sleeps until the next try is due or
/// a state change may have written a notification.
pub async fn run(shared: Arc<Shared>) {
    let http = http_client(shared.config.webhooks.allow_private_addresses);
    let mut sending: JoinSet<()> = JoinSet::new();
    let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        crate::supervise::fault_point("webhooks");
        while let Some(done) = sending.try_join_next_with_id() {
            forget(&mut in_flight, done);
        }
        let now = now_ms();
        let room = MAX_IN_FLIGHT - sending.len();
        if room > 0 {
            let due = shared
                .store
                .due_deliveries(now, room + in_flight.len())
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "cannot read the webhook outbox");
                    Vec::new()
                });
            let sent: std::collections::HashSet<String> = in_flight.values().cloned().collect();
            for delivery in due.into_iter().filter(|d| !sent.contains(&d.id)).take(room) {
                let id = delivery.id.clone();
                let task = sending.spawn(deliver(shared.clone(), http.clone(), delivery));
                in_flight.insert(task.id(), id);
            }
        }
        // Sleep until the earliest try still to come; one that is due already is being sent
        // (or waits for room): a finished send wakes the loop.
        let next = shared.store.next_delivery_ms().ok().flatten();
        let sleep = match next {
            Some(at) if at > now => Duration::from_millis((at - now) as u64).min(IDLE),
            _ => IDLE,
        };
        tokio::select! {
            () = shared.store.deliveries.notified() => {}
            () = tokio::time::sleep(sleep) => {}
            Some(done) = sending.join_next_with_id(), if !sending.is_empty() => {
                forget(&mut in_flight, done);
            }
        }
    }
}

fn forget(
    in_flight: &mut HashMap<tokio::task::Id, String>,
    done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => {
            // The notification stays due: it is tried again on the next round.
            tracing::error!(error = %e, "a webhook delivery panicked");
            e.id()
        }
    };
    in_flight.remove(&id);
}

/// What one try came to.
enum Tried {
    Answered(reqwest::StatusCode),
    Failed(String),
}

/// One try of `delivery`, and its outcome recorded.
async fn deliver(shared: Arc<Shared>, http: reqwest::Client, delivery: Delivery) {
    let secret = shared
        .config
        .services
        .get(&delivery.service)
        .and_then(|s| s.webhook_secret.clone());
    // The configuration may have changed since the upload: it is checked again at each try.
    let allowed = Allowlist::parse(&shared.config.webhooks.allowed_hosts)
        .and_then(|list| list.check(&delivery.url));
    let refused = match (&secret, &allowed) {
        (None, _) => Some(format!(
            "service {:?} has no webhook_secret any more",
            delivery.service
        )),
        (_, Err(why)) => Some(why.clone()),
        _ => None,
    };
    if let Some(why) = refused {
        record(
            &shared,
            &delivery,
            &why,
            false,
            Outcome::End(DeliveryEnd::Refused),
        );
        return;
    }
    let secret = secret.expect("checked above");
    let t = now_ms() / 1000;
    let tried = http
        .post(&delivery.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            signing::SIGNATURE_HEADER,
            signing::signature(secret.expose(), t, delivery.body.as_bytes()),
        )
        .header(DELIVERY_HEADER, &delivery.id)
        .header(EVENT_HEADER, delivery.event.as_str())
        .body(delivery.body.clone())
        .send()
        .await;
    let tried = match tried {
        Ok(answer) => Tried::Answered(answer.status()),
        Err(e) if resolver::refusal(&e).is_some() => {
            let why = resolver::refusal(&e).expect("checked").to_string();
            record(
                &shared,
                &delivery,
                &why,
                false,
                Outcome::End(DeliveryEnd::Refused),
            );
            return;
        }
        Err(e) if e.is_timeout() => Tried::Failed(format!("timeout: {e}")),
        Err(e) if e.is_connect() => Tried::Failed(format!("connect: {e}")),
        Err(e) => Tried::Failed(format!("request: {e}")),
    };
    let (status, outcome) = match tried {
        Tried::Answered(code) if code.is_success() => (
            code.as_u16().to_string(),
            Outcome::End(DeliveryEnd::Delivered),
        ),
        Tried::Answered(reqwest::StatusCode::GONE) => {
            ("410".to_owned(), Outcome::End(DeliveryEnd::Gone))
        }
        Tried::Answered(code) => (
            code.as_u16().to_string(),
            retry_or_expire(&shared, &delivery),
        ),
        Tried::Failed(why) => (why, retry_or_expire(&shared, &delivery)),
    };
    record(&shared, &delivery, &status, true, outcome);
}

enum Outcome {
    RetryAt(i64),
    End(DeliveryEnd),
}

/// After a failed try: the next one, unless it would come after the retry period.
fn retry_or_expire(shared: &Shared, delivery: &Delivery) -> Outcome {
    let next = now_ms() + backoff(delivery.attempts + 1).as_millis() as i64;
    let give_up = delivery.created_ms + shared.config.webhooks.retry_period.as_millis() as i64;
    if next > give_up {
        Outcome::End(DeliveryEnd::Expired)
    } else {
        Outcome::RetryAt(next)
    }
}

fn record(shared: &Shared, delivery: &Delivery, status: &str, tried: bool, outcome: Outcome) {
    let result = match outcome {
        Outcome::RetryAt(next) => {
            tracing::warn!(
                job = delivery.job_id,
                delivery = %delivery.id,
                url = %delivery.url,
                status,
                retry_in_ms = next - now_ms(),
                "webhook delivery failed; will retry"
            );
            counter!("jobrelay_server_webhook_deliveries_total", "result" => "retry").increment(1);
            shared.store.retry_delivery(&delivery.id, status, next)
        }
        Outcome::End(end) => {
            if end == DeliveryEnd::Delivered {
                tracing::info!(job = delivery.job_id, delivery = %delivery.id, status, "webhook delivered");
            } else {
                tracing::warn!(
                    job = delivery.job_id,
                    delivery = %delivery.id,
                    url = %delivery.url,
                    status,
                    outcome = end.as_str(),
                    "webhook delivery given up"
                );
            }
            counter!("jobrelay_server_webhook_deliveries_total", "result" => end.as_str())
                .increment(1);
            shared
                .store
                .finish_delivery(&delivery.id, status, tried, end)
        }
    };
    if let Err(e) = result {
        // It stays due as it was: tried again (at least once, never lost).
        tracing::error!(error = %e, delivery = %delivery.id, "cannot record a webhook delivery");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_up_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(13), Duration::from_secs(3600));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(3600));
    }
}
