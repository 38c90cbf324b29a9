//! The pool of executor clients: what each one advertises (`/info`), whether it answers, and
//! a probe per client that checks it periodically, or with backoff while it does not answer.
//!
//! A client without `/info` (seed contract only) is healthy when `/health` answers; it then
//! has no features (no change feed, no idempotency key, no release, kill tried and tolerated).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobrelay_common::protocol::ClientInfo;
use tokio::sync::Notify;

use crate::config::ClientEndpoint;
use crate::scheduler::ClientId;
use crate::Shared;

/// Time between two probes of a healthy client.
const PROBE_HEALTHY: Duration = Duration::from_secs(3);
/// First and longest wait between two probes of an unhealthy client.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(200);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Timeout of the small requests (`/info`, `/health`, `/load`).
pub const SMALL_REQUEST: Duration = Duration::from_secs(10);
/// Start of the probe error of a client that answers 401/403.
const REFUSES_TOKEN: &str = "the client refuses our token";
/// How long a client that answered 507 gets no new job.
pub const FULL_PAUSE: Duration = Duration::from_secs(10);

pub struct ClientHandle {
    pub id: ClientId,
    pub endpoint: ClientEndpoint,
    /// HTTP to this client: its own connection pool, with the client's token as a default
    /// header (see [`http_for`]).
    pub http: reqwest::Client,
    /// The last `/info` answer; `None` for a client without `/info` or not reached yet.
    pub info: Mutex<Option<ClientInfo>>,
    /// Whether the client was reached at all, and whether `/info` exists there.
    pub probed: Mutex<Option<bool>>,
    /// When requests to the client started failing.
    pub unreachable_since: Mutex<Option<Instant>>,
    /// Wakes the probe at once (a request just failed).
    pub kick: Notify,
    /// Wakes whoever waits for the first probe.
    pub first_probe: Notify,
    /// When a request to the client last succeeded (Unix ms).
    pub last_seen_ms: std::sync::atomic::AtomicI64,
    /// Until when the client is kept out of placement because its disk was full (507).
    pub full_until: Mutex<Option<Instant>>,
    /// True while runs given away are being killed there ([`crate::jobs::kill_abandoned`]).
    pub killing: std::sync::atomic::AtomicBool,
}

impl ClientHandle {
    pub fn new(id: ClientId, endpoint: ClientEndpoint, http: reqwest::Client) -> Self {
        ClientHandle {
            id,
            endpoint,
            http,
            info: Mutex::new(None),
            probed: Mutex::new(None),
            unreachable_since: Mutex::new(None),
            kick: Notify::new(),
            first_probe: Notify::new(),
            last_seen_ms: std::sync::atomic::AtomicI64::new(0),
            full_until: Mutex::new(None),
            killing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn base(&self) -> &str {
        &self.endpoint.base
    }

    /// True if the client advertised this extension in `/info`.
    pub fn has(&self, feature: &str) -> bool {
        crate::lock(&self.info)
            .as_ref()
            .is_some_and(|i| i.features.iter().any(|f| f == feature))
    }

    /// True while the client is kept out of placement after answering 507 (disk full).
    pub fn is_full(&self) -> bool {
        let mut full = crate::lock(&self.full_until);
        match *full {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *full = None;
                false
            }
            None => false,
        }
    }

    /// Identity of the client's data directory, as last seen.
    pub fn node(&self) -> Option<String> {
        crate::lock(&self.info).as_ref().map(|i| i.node.clone())
    }

    pub fn set_node(&self, node: &str) {
        if let Some(info) = crate::lock(&self.info).as_mut() {
            info.node = node.to_owned();
        }
    }

    /// True once the first probe got an answer.
    pub fn known(&self) -> bool {
        crate::lock(&self.probed).is_some()
    }

    /// How long the client has been failing requests, if it is.
    pub fn unreachable_for(&self) -> Option<Duration> {
        crate::lock(&self.unreachable_since).map(|t| t.elapsed())
    }
}

/// How long a connection to a client may wait idle in the pool: half the time after which a
/// client closes an idle keep-alive connection (`jobrelay_common::serve::slow_request`, 30 s
/// unless `JOBRELAY_SLOW_REQUEST_SECS` says otherwise; the server assumes its clients run
/// with the value it has itself). Pooled as long as the client keeps it, a connection could
/// be reused just as the client closes it: a send that fails and uses up an attempt.
pub fn pool_idle() -> Duration {
    jobrelay_common::serve::slow_request() / 2
}

/// The HTTP client for requests to `endpoint`: timeouts as the server's, and its token (if
/// any) in every request's `Authorization` header.
/// `ca`: the only certificates an `https://` client's certificate may be signed by.
pub fn http_for(
    endpoint: &ClientEndpoint,
    ca: Option<&[reqwest::Certificate]>,
) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(120))
        .pool_idle_timeout(pool_idle());
    if let Some(token) = &endpoint.token {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, token.header_value());
        builder = builder.default_headers(headers);
    }
    if let Some(ca) = ca {
        builder = builder.tls_certs_only(ca.iter().cloned());
    }
    builder.build()
}

/// A request to the client failed: stop placing jobs there and probe it now.
pub fn failed(shared: &Shared, client: &ClientHandle, why: &str) {
    failed_since(shared, client, why, Instant::now())
}

/// [`failed`] for a request sent at `sent`: the client has not answered since then at least,
/// so that is when it became unreachable (a request that timed out says so only after its
/// timeout, which must not lengthen `--client-timeout`).
pub fn failed_since(shared: &Shared, client: &ClientHandle, why: &str, sent: Instant) {
    let was_healthy = shared.lifecycle.client_out(client.id).was_healthy;
    {
        let mut since = crate::lock(&client.unreachable_since);
        *since = Some(since.map_or(sent, |t| t.min(sent)));
    }
    if was_healthy {
        tracing::warn!(client = client.base(), why, "client marked unhealthy");
    }
    client.kick.notify_one();
}

/// The client answered 507 (no disk space for a payload): no job is placed there for
/// [`FULL_PAUSE`]; its probe puts it back after that (and wakes the dispatcher).
pub fn full(shared: &Shared, client: &ClientHandle) {
    *crate::lock(&client.full_until) = Some(Instant::now() + FULL_PAUSE);
    shared.lifecycle.client_out(client.id);
    tracing::warn!(client = client.base(), pause = ?FULL_PAUSE, "client has no disk space; placing jobs elsewhere for a while");
}

/// A request to the client succeeded.
pub fn reached(client: &ClientHandle) {
    *crate::lock(&client.unreachable_since) = None;
    client
        .last_seen_ms
        .store(crate::store::now_ms(), std::sync::atomic::Ordering::Relaxed);
}

enum Probe {
    /// `/info` answered.
    Info(ClientInfo),
    /// No `/info`, but `/health` answered (a seed-contract client).
    Seed,
}

async fn probe_once(client: &ClientHandle, timeout: Duration) -> Result<Probe, String> {
    let response = client
        .http
        .get(client.endpoint.path("/info"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET /info: {e}"))?;
    if matches!(
        response.status(),
        reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN
    ) {
        return Err(format!(
            "{REFUSES_TOKEN} ({}): give the server the client's token \
             (--client-token-file, or token_file of the service)",
            response.status()
        ));
    }
    if response.status().is_success() {
        if let Ok(info) = response.json::<ClientInfo>().await {
            return Ok(Probe::Info(info));
        }
    }
    let health = client
        .http
        .get(client.endpoint.path("/health"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("GET /health: {e}"))?;
    if health.status().is_success() {
        Ok(Probe::Seed)
    } else {
        Err(format!("GET /health answered {}", health.status()))
    }
}

async fn load_of(client: &ClientHandle, timeout: Duration) -> f64 {
    let answer = client
        .http
        .get(client.endpoint.path("/load"))
        .timeout(timeout)
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => r.json::<f64>().await.unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Timeout of a probe: the usual one, but never longer than the client timeout, so a client
/// that stops answering (SIGSTOP, a hung host: connections open, no answer) is given up
/// within about `client_timeout` after its last answer rather than after several probe
/// timeouts.
pub fn probe_timeout(client_timeout: Duration) -> Duration {
    SMALL_REQUEST
        .min(client_timeout)
        .max(Duration::from_millis(500))
}

/// Time between two probes of a healthy client: the usual 3 s, but at most half the client
/// timeout, so a client that stops answering is noticed and given up within 1.5 times it.
pub fn probe_interval(client_timeout: Duration) -> Duration {
    PROBE_HEALTHY
        .min(client_timeout / 2)
        .max(Duration::from_millis(250))
}

/// Probes one client forever: every few seconds while it answers, with backoff while not.
pub async fn probe_loop(shared: Arc<Shared>, client: Arc<ClientHandle>) {
    let mut backoff = PROBE_BACKOFF_MIN;
    let timeout = probe_timeout(shared.config.client_timeout);
    loop {
        crate::supervise::fault_point("probe");
        let sent = Instant::now();
        let wait = match probe_once(&client, timeout).await {
            Ok(probe) => {
                backoff = PROBE_BACKOFF_MIN;
                let load = load_of(&client, timeout).await;
                let (slots, has_info) = match probe {
                    Probe::Info(info) => {
                        let slots = Some(info.slots.max(1));
                        let previous = crate::lock(&client.info).replace(info.clone());
                        if let Some(previous) = previous {
                            if previous.node != info.node {
                                tracing::warn!(client = client.base(), old = %previous.node, new = %info.node, "client lost its data directory");
                            }
                        }
                        (slots, true)
                    }
                    Probe::Seed => {
                        *crate::lock(&client.info) = None;
                        (None, false)
                    }
                };
                let first = crate::lock(&client.probed).replace(has_info).is_none();
                // Reachable, but a full disk keeps it out of placement a while longer; the
                // dispatcher is woken when it came back or its slots changed.
                let was_healthy = shared
                    .lifecycle
                    .client_probed(client.id, !client.is_full(), slots, load)
                    .was_healthy;
                reached(&client);
                if !was_healthy {
                    tracing::info!(
                        client = client.base(),
                        slots,
                        seed_only = !has_info,
                        "client healthy"
                    );
                }
                if first {
                    client.first_probe.notify_waiters();
                }
                // Runs given away while it was unreachable are killed now that it answers.
                if !client
                    .killing
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let (shared, client) = (shared.clone(), client.clone());
                    tokio::spawn(async move {
                        crate::jobs::kill_abandoned(&shared, &client).await;
                        client
                            .killing
                            .store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                probe_interval(shared.config.client_timeout)
            }
            Err(why) => {
                if backoff == PROBE_BACKOFF_MIN && why.contains(REFUSES_TOKEN) {
                    tracing::error!(client = client.base(), "{why}");
                }
                failed_since(&shared, &client, &why, sent);
                crate::collector::check_unreachable(&shared, &client);
                let wait = backoff;
                backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = client.kick.notified() => {
                // A burst of failures probes once, not once each.
                tokio::time::sleep(PROBE_BACKOFF_MIN.min(wait)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_never_waits_longer_than_the_client_timeout() {
        assert_eq!(
            probe_timeout(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        assert_eq!(probe_timeout(Duration::from_secs(60)), SMALL_REQUEST);
        assert_eq!(
            probe_timeout(Duration::from_millis(100)),
            Duration::from_millis(500)
        );
        assert_eq!(probe_interval(Duration::from_secs(30)), PROBE_HEALTHY);
        assert_eq!(
            probe_interval(Duration::from_secs(3)),
            Duration::from_millis(1500)
        );
    }
}
