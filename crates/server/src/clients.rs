//! The pool of executor clients: what each one advertises (`/info`), whether it answers,
//! and the bookkeeping of that (a failed request, a reached client, a full disk). Talking to
//! a client is [`crate::gateway`]'s; probing it periodically is [`crate::probe`]'s.
//!
//! A client without `/info` (seed contract only) is healthy when `/health` answers; it then
//! has no features (no change feed, no idempotency key, no release, kill tried and tolerated).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jobrelay_common::protocol::ClientInfo;
use tokio::sync::Notify;

use crate::config::ClientEndpoint;
use crate::lifecycle::Lifecycle;
use crate::scheduler::ClientId;

/// How long a client that answered 507 gets no new job.
pub const FULL_PAUSE: Duration = Duration::from_secs(10);

pub struct ClientHandle {
    pub id: ClientId,
    pub endpoint: ClientEndpoint,
    /// HTTP to this client: its own connection pool, with the client's token as a default
    /// header (see [`crate::gateway::http_for`]). Used by the gateway only.
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
    /// True while runs given away are being killed there ([`crate::stop::kill_abandoned`]).
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

/// A request to the client failed: stop placing jobs there and probe it now.
pub fn failed(lifecycle: &Lifecycle, client: &ClientHandle, why: &str) {
    failed_since(lifecycle, client, why, Instant::now())
}

/// [`failed`] for a request sent at `sent`: the client has not answered since then at least,
/// so that is when it became unreachable (a request that timed out says so only after its
/// timeout, which must not lengthen `--client-timeout`).
pub fn failed_since(lifecycle: &Lifecycle, client: &ClientHandle, why: &str, sent: Instant) {
    let was_healthy = lifecycle.client_out(client.id).was_healthy;
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
pub fn full(lifecycle: &Lifecycle, client: &ClientHandle) {
    *crate::lock(&client.full_until) = Some(Instant::now() + FULL_PAUSE);
    lifecycle.client_out(client.id);
    tracing::warn!(client = client.base(), pause = ?FULL_PAUSE, "client has no disk space; placing jobs elsewhere for a while");
}

/// A request to the client succeeded.
pub fn reached(client: &ClientHandle) {
    *crate::lock(&client.unreachable_since) = None;
    client
        .last_seen_ms
        .store(crate::store::now_ms(), std::sync::atomic::Ordering::Relaxed);
}
