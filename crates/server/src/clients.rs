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
use jobrelay_common::auth::Secret;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

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
    /// Set for a client that joined at run time (it dials out; see [`Joined`]).
    pub joined: Option<Joined>,
    /// Change-feed news of payloads not yet committed to their job, for the dispatcher to
    /// claim after its commit.
    pub early: crate::early_events::EarlyEvents,
    /// Releases waiting for the next `/events` call ([`crate::gateway::release`]).
    pub releases: crate::pending_releases::PendingReleases,
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
            joined: None,
            early: Default::default(),
            releases: Default::default(),
        }
    }

    /// A client that joined: reached through the tunnels it opens ([`Joined`]).
    pub fn joined(
        id: ClientId,
        endpoint: ClientEndpoint,
        http: reqwest::Client,
        joined: Joined,
    ) -> Self {
        ClientHandle {
            joined: Some(joined),
            ..ClientHandle::new(id, endpoint, http)
        }
    }

    /// True while a joined client is leaving: it gets no new job, its jobs there finish.
    pub fn is_leaving(&self) -> bool {
        self.joined
            .as_ref()
            .is_some_and(|j| j.leaving.load(std::sync::atomic::Ordering::Acquire))
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

/// Every client, configured or joined, by its scheduler id (the index) and by its base URL.
/// Configured clients are added at start; joined ones when they first join, never removed
/// while the server runs (a client that left is unhealthy, and comes back as the same one).
#[derive(Default)]
pub struct Pool {
    list: RwLock<Vec<Arc<ClientHandle>>>,
    by_base: RwLock<HashMap<String, usize>>,
    /// Held while a client joins, so ids are handed out (scheduler, then pool) in order.
    pub joining: tokio::sync::Mutex<()>,
}

impl Pool {
    pub fn new(list: Vec<Arc<ClientHandle>>) -> Self {
        let by_base = list.iter().map(|c| (c.base().to_owned(), c.id)).collect();
        Pool {
            list: RwLock::new(list),
            by_base: RwLock::new(by_base),
            joining: tokio::sync::Mutex::new(()),
        }
    }

    /// The client with scheduler id `id`.
    pub fn get(&self, id: ClientId) -> Option<Arc<ClientHandle>> {
        read(&self.list).get(id).cloned()
    }

    /// The client with this base URL.
    pub fn by_base(&self, base: &str) -> Option<Arc<ClientHandle>> {
        let id = *read(&self.by_base).get(base)?;
        self.get(id)
    }

    /// The scheduler id of the client with this base URL.
    pub fn id_of(&self, base: &str) -> Option<ClientId> {
        read(&self.by_base).get(base).copied()
    }

    /// Every client, in id order.
    pub fn all(&self) -> Vec<Arc<ClientHandle>> {
        read(&self.list).clone()
    }

    /// Adds a client; its id must be the next one (the scheduler's, taken under its lock).
    pub fn push(&self, client: Arc<ClientHandle>) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(client.id, list.len());
        self.by_base
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client.base().to_owned(), client.id);
        list.push(client);
    }

    /// The joined client holding this credential, if any (compared in constant time).
    pub fn joined_by_credential(&self, given: &str) -> Option<Arc<ClientHandle>> {
        // Every credential is compared, so the time does not say which one was close.
        let mut found = None;
        for client in read(&self.list).iter() {
            if let Some(joined) = &client.joined {
                if joined.credential_matches(given) && found.is_none() {
                    found = Some(client.clone());
                }
            }
        }
        found
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// What the server knows of a client that joined (`jobrelay client --connect`): it opens
/// every connection, so the server reaches it through tunnels the client offers
/// ([`Tunnels`]); its base URL (`http://<node>.joined`) only names it.
pub struct Joined {
    /// The client's data-directory identity (`node-id`), stable across its restarts.
    pub node: String,
    /// The services it serves.
    pub services: Mutex<Vec<String>>,
    /// Its credential, for its tunnels, its leave and its joins again: given at the first
    /// join here, replaced only when the node id is taken over after its client went quiet.
    pub credential: Mutex<Secret>,
    /// Set once a join here was answered with the credential. A seat put back from jobs
    /// after a restart or failover is not claimed: the first join of its node id takes it.
    pub claimed: AtomicBool,
    /// Tunnel requests held for it right now (a client offering tunnels is alive).
    pub offering: std::sync::atomic::AtomicUsize,
    /// When it joined first (Unix ms).
    pub since_ms: i64,
    /// Where its last request came from (peer address).
    pub from: Mutex<String>,
    /// When it last offered a tunnel (its heartbeat; Unix ms).
    pub last_heartbeat_ms: AtomicI64,
    /// Set when it said it leaves: no new job is placed there.
    pub leaving: AtomicBool,
    pub tunnels: Tunnels,
}

impl Joined {
    /// Whether `given` is its credential (constant time).
    pub fn credential_matches(&self, given: &str) -> bool {
        crate::lock(&self.credential).matches(given)
    }

    pub fn credential(&self) -> Secret {
        crate::lock(&self.credential).clone()
    }

    /// Gives the node id a new credential: the old one opens no tunnel any more.
    pub fn replace_credential(&self) -> std::io::Result<()> {
        *crate::lock(&self.credential) = Secret::generate()?;
        Ok(())
    }

    /// Alive: holding a tunnel request now, or one ended less than `timeout` ago.
    pub fn is_live(&self, timeout: std::time::Duration) -> bool {
        let quiet_ms = crate::store::now_ms() - self.last_heartbeat_ms.load(Ordering::Relaxed);
        self.offering.load(Ordering::Relaxed) > 0
            || u128::try_from(quiet_ms).unwrap_or(0) < timeout.as_millis()
    }

    pub fn heartbeat(&self, from: &str) {
        self.last_heartbeat_ms
            .store(crate::store::now_ms(), Ordering::Relaxed);
        let mut last = crate::lock(&self.from);
        if *last != from {
            *last = from.to_owned();
        }
    }
}

/// The server's side of a joined client's tunnels: connections the server's HTTP client
/// opened to the client (to a Unix socket of the server's own) wait here until the client's
/// next tunnel request takes one.
pub struct Tunnels {
    sender: tokio::sync::mpsc::Sender<tokio::net::UnixStream>,
    receiver: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<tokio::net::UnixStream>>,
    /// Where the server's HTTP client connects to reach the client.
    pub socket: std::path::PathBuf,
}

/// Connections to a joined client that may wait for a tunnel at once.
const WAITING_CONNECTIONS: usize = 64;

impl Tunnels {
    pub fn new(socket: std::path::PathBuf) -> Self {
        let (sender, receiver) = tokio::sync::mpsc::channel(WAITING_CONNECTIONS);
        Tunnels {
            sender,
            receiver: tokio::sync::Mutex::new(receiver),
            socket,
        }
    }

    /// A connection to the client waits for a tunnel; dropped (closed) when too many wait.
    pub fn offer(&self, connection: tokio::net::UnixStream) {
        if self.sender.try_send(connection).is_err() {
            tracing::debug!("too many connections wait for a joined client's tunnel");
        }
    }

    /// The next connection waiting for a tunnel, within `wait`.
    pub async fn take(&self, wait: Duration) -> Option<tokio::net::UnixStream> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut receiver = tokio::time::timeout_at(deadline, self.receiver.lock())
            .await
            .ok()?;
        tokio::time::timeout_at(deadline, receiver.recv())
            .await
            .ok()
            .flatten()
    }
}
