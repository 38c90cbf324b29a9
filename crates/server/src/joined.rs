//! Clients that join at run time (`jobrelay client --connect`): they open every connection,
//! so nothing here needs to reach them. A joined client is a client of the pool like a
//! configured one (same probe, collector, dispatcher, scheduler, quotas, lifecycle); only the
//! way its connections are made differs:
//!
//! - `join`: the client gives a service's join token (compared in constant time), its node id
//!   and services; it gets a credential of its own and is added to the pool under the base
//!   URL `http://<node>.joined` (joining again with the same node id is the same client).
//! - `tunnel`: the client offers a connection (an HTTP upgrade, held up to [`TUNNEL_WAIT`]);
//!   when the server's HTTP client opens a connection to the client (to a Unix socket in the
//!   server's data directory, see [`relay`]), one waiting tunnel takes it and the bytes are
//!   copied both ways. Inside, it is the client's own API, exactly as pushed to.
//! - `leave`: the client says it stops taking jobs (SIGTERM): no new job is placed there; the
//!   jobs it has finish and are collected as usual.
//!
//! A joined client that stops offering tunnels is unreachable to its probe like a push client
//! that went down: past `--client-timeout` its jobs are queued again, and when it comes back
//! the runs given away meanwhile are killed there ([`crate::stop::kill_abandoned`]).

use std::sync::Arc;
use std::time::Duration;

use jobrelay_common::auth::Secret;

use crate::clients::{ClientHandle, Joined, Tunnels};
use crate::config::ClientEndpoint;
use crate::Shared;

/// How long a tunnel request waits for a connection before it is answered 204 (the client
/// then asks again: that is its heartbeat).
pub const TUNNEL_WAIT: Duration = Duration::from_secs(20);

/// Longest node id accepted (a DNS label).
const MAX_NODE: usize = 63;
/// Most services one client may join.
const MAX_SERVICES: usize = 64;

/// What a client sends to join.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The client's data-directory identity (its `node-id`): lowercase letters, digits, `-`.
    pub node: String,
    /// The services it serves.
    pub services: Vec<String>,
    /// Its version, for the dashboard.
    #[serde(default)]
    pub version: Option<String>,
    /// The credential of its last join (kept in its data directory): joining again with it
    /// keeps the seat. Without it, a node id whose client is alive cannot be taken (409).
    #[serde(default)]
    pub credential: Option<String>,
}

/// What a client that joined is told.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JoinAnswer {
    /// The name the server gives it (its jobs' `client`).
    pub client: String,
    /// Its own credential, for its tunnels and its leave (`Authorization: Bearer`).
    pub credential: String,
    /// Seconds a tunnel request is held before it is answered 204.
    pub tunnel_wait_s: u64,
}

/// Why a join, tunnel or leave is refused (the handler picks the status).
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No service of this server can be joined (404).
    Off,
    /// A bad request body (400).
    Bad(String),
    /// A missing or wrong token or credential (401).
    Unauthorized(&'static str),
    /// That service cannot be joined (403).
    Forbidden(String),
    /// The node id is held by a client that is alive, and the join did not show its
    /// credential (409).
    InUse(String),
    /// The server could not set the client up (500).
    Failed(String),
    /// This server stands by: only the leader serves joined clients (503; ask again, the
    /// load balancer or the next try reaches the leader).
    Standby,
}

/// True if some service can be joined.
pub fn is_on(shared: &Shared) -> bool {
    shared
        .config
        .services
        .values()
        .any(|s| s.join_token.is_some())
}

fn check_node(node: &str) -> Result<(), Refused> {
    let ok = !node.is_empty()
        && node.len() <= MAX_NODE
        && !node.starts_with('-')
        && !node.ends_with('-')
        && node
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Refused::Bad(format!(
            "bad node id: 1 to {MAX_NODE} lowercase letters, digits and '-' (not at either end)"
        )))
    }
}

/// Checks the token against every service asked for, then adds the client to the pool (or
/// finds it there, joined before with the same node id) and starts following it.
pub async fn join(
    shared: &Arc<Shared>,
    token: Option<&str>,
    request: JoinRequest,
    from: &str,
) -> Result<JoinAnswer, Refused> {
    if !is_on(shared) {
        return Err(Refused::Off);
    }
    if !shared.lifecycle.leading() {
        return Err(Refused::Standby);
    }
    let Some(token) = token else {
        return Err(Refused::Unauthorized(
            "joining needs Authorization: Bearer <join token> (jobrelay client --join-token-file)",
        ));
    };
    check_node(&request.node)?;
    if request.services.is_empty() || request.services.len() > MAX_SERVICES {
        return Err(Refused::Bad(format!(
            "services: name 1 to {MAX_SERVICES} services"
        )));
    }
    let mut services = request.services.clone();
    services.sort();
    services.dedup();
    // Every service's token is compared (constant time each), so the answer's time does not
    // say which service or token was close.
    let mut wrong = false;
    let mut forbidden = None;
    for name in &services {
        match shared.config.services.get(name) {
            None => forbidden = forbidden.or(Some(format!("no service {name:?} here"))),
            Some(service) => match &service.join_token {
                None => {
                    forbidden = forbidden.or(Some(format!("service {name:?} cannot be joined")))
                }
                Some(expected) => wrong |= !expected.matches(token),
            },
        }
    }
    if wrong {
        return Err(Refused::Unauthorized("wrong join token"));
    }
    if let Some(why) = forbidden {
        return Err(Refused::Forbidden(why));
    }

    let base = crate::gateway::joined_base(&request.node);
    let _joining = shared.clients.joining.lock().await;
    if let Some(client) = shared.clients.by_base(&base) {
        let Some(joined) = &client.joined else {
            return Err(Refused::Forbidden(format!("{base} is a configured client")));
        };
        take_seat(shared, joined, request.credential.as_deref(), &base, from)?;
        shared
            .lifecycle
            .client_joined(Some(client.id), &base, &services);
        {
            let mut known = crate::lock(&joined.services);
            for name in &services {
                if !known.contains(name) {
                    known.push(name.clone());
                }
            }
        }
        joined.heartbeat(from);
        joined
            .leaving
            .store(false, std::sync::atomic::Ordering::Release);
        client.kick.notify_one();
        tracing::info!(client = %base, from, version = ?request.version, "client joined again");
        return Ok(answer(&base, &joined.credential()));
    }

    let id = shared.clients.all().len();
    let (client, listener) = new_handle(&shared.staging_dir, id, &request.node, &services, from)?;
    let added = shared.lifecycle.client_joined(None, &base, &services);
    debug_assert_eq!(added, id);
    let client = Arc::new(client);
    shared.clients.push(client.clone());
    follow(shared, &client, listener);
    tracing::info!(client = %base, from, services = ?services, version = ?request.version, "client joined");
    let joined = client.joined.as_ref().expect("a joined client");
    joined
        .claimed
        .store(true, std::sync::atomic::Ordering::Release);
    Ok(answer(&base, &joined.credential()))
}

/// A join with the node id of a seat that exists. The join token alone does not take a seat
/// from a client that is alive: that would hand its jobs' inputs and results to whoever
/// knows its node id. The seat's own credential keeps it (a restarted client reads it from
/// its data directory); a seat nobody claimed here yet (put back from jobs) goes to the first
/// join; a claimed seat whose client has been quiet past `--client-timeout` (its jobs are
/// queued again by then) is taken over with a new credential.
fn take_seat(
    shared: &Shared,
    joined: &Joined,
    credential: Option<&str>,
    base: &str,
    from: &str,
) -> Result<(), Refused> {
    use std::sync::atomic::Ordering;
    let shown = credential.is_some_and(|c| joined.credential_matches(c));
    if !shown && joined.claimed.load(Ordering::Acquire) {
        let timeout = shared.config.client_timeout;
        if joined.is_live(timeout) {
            return Err(Refused::InUse(format!(
                "node id {:?} is joined by a client that is alive; a client that restarted \
                 shows its credential (kept in its data directory), another machine needs its \
                 own data directory; the node id is free {}s after its client goes quiet",
                joined.node,
                timeout.as_secs()
            )));
        }
        joined
            .replace_credential()
            .map_err(|e| Refused::Failed(format!("no credential: {e}")))?;
        tracing::warn!(client = %base, from, "node id taken over: its client was quiet past --client-timeout");
    }
    joined.claimed.store(true, Ordering::Release);
    Ok(())
}

/// A joined client's handle, id `id`, with the socket its connections go to (listening),
/// in `<own_dir>/joined/` (the server's own staging folder: never another server's).
pub fn new_handle(
    own_dir: &std::path::Path,
    id: crate::scheduler::ClientId,
    node: &str,
    services: &[String],
    from: &str,
) -> Result<(ClientHandle, tokio::net::UnixListener), Refused> {
    let base = crate::gateway::joined_base(node);
    let dir = own_dir.join("joined");
    let socket = make_socket_dir(&dir)
        .map(|()| dir.join(id.to_string()))
        .map_err(|e| Refused::Failed(format!("cannot prepare {}: {e}", dir.display())))?;
    if socket.as_os_str().len() > 100 {
        return Err(Refused::Failed(format!(
            "the tunnel socket's path {} is too long for a Unix socket: use a shorter --data-dir",
            socket.display()
        )));
    }
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| Refused::Failed(format!("cannot listen on {}: {e}", socket.display())))?;
    let http = crate::gateway::http_for_joined(&socket)
        .map_err(|e| Refused::Failed(format!("cannot build the HTTP client: {e}")))?;
    let endpoint =
        ClientEndpoint::from_base(&base).map_err(|e| Refused::Bad(format!("bad node id: {e}")))?;
    let credential =
        Secret::generate().map_err(|e| Refused::Failed(format!("no credential: {e}")))?;
    let now = crate::store::now_ms();
    let joined = Joined {
        node: node.to_owned(),
        services: std::sync::Mutex::new(services.to_vec()),
        credential: std::sync::Mutex::new(credential),
        claimed: std::sync::atomic::AtomicBool::new(false),
        offering: std::sync::atomic::AtomicUsize::new(0),
        since_ms: now,
        from: std::sync::Mutex::new(from.to_owned()),
        last_heartbeat_ms: std::sync::atomic::AtomicI64::new(now),
        leaving: std::sync::atomic::AtomicBool::new(false),
        tunnels: Tunnels::new(socket),
    };
    Ok((ClientHandle::joined(id, endpoint, http, joined), listener))
}

/// The joined clients that active jobs were on when the server stopped, by base URL, with
/// the services of those jobs: at start they are put back in the pool (unreachable until
/// they offer tunnels again, with a new credential they get by joining again), so their
/// jobs are followed there rather than given away as if their client were gone.
pub fn known_from_jobs(
    jobs: &[crate::store::Job],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut known: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for job in jobs {
        let Some(base) = &job.client else { continue };
        if node_of(base).is_none() {
            continue;
        }
        let services = known.entry(base.clone()).or_default();
        if !services.contains(&job.service) {
            services.push(job.service.clone());
        }
    }
    known
}

/// The node id named by a joined client's base URL.
pub fn node_of(base: &str) -> Option<&str> {
    let node = base.strip_prefix("http://")?.strip_suffix(".joined")?;
    check_node(node).ok().map(|()| node)
}

fn answer(base: &str, credential: &Secret) -> JoinAnswer {
    JoinAnswer {
        client: base.to_owned(),
        credential: credential.expose().to_owned(),
        tunnel_wait_s: TUNNEL_WAIT.as_secs(),
    }
}

/// `<data>/joined/`, private to the server's user: whoever connects to a socket there
/// reaches a client's API without a token.
fn make_socket_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// As a term starts, every joined seat is unclaimed: its credential was given in an earlier
/// term, and its client may since have joined the leader of the terms between (with a new
/// credential), so its first join of this term takes the seat back (see [`take_seat`]).
pub fn unclaim_seats(shared: &Shared) {
    for client in shared.clients.all() {
        if let Some(joined) = &client.joined {
            joined
                .claimed
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

/// The joined clients that this server's active jobs are on and its pool lacks (they
/// joined another server that led before): seated in the pool and the scheduler, so a new
/// leader follows their jobs there (they join this server in turn) instead of giving the
/// runs away. Called as a term starts, before the jobs are recovered.
pub fn seat_from_jobs(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let active = shared.store.in_states(&crate::store::JobStatus::ACTIVE)?;
    for (base, names) in known_from_jobs(&active) {
        if shared.clients.by_base(&base).is_some() {
            continue;
        }
        let Some(node) = node_of(&base) else {
            continue;
        };
        // Ids are handed out in order (scheduler, then pool) under the joining lock; joins
        // wait for the term's start, so it is free but for a moment.
        let _joining = loop {
            match shared.clients.joining.try_lock() {
                Ok(held) => break held,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        let id = shared.lifecycle.client_joined(None, &base, &names);
        let (client, listener) = new_handle(&shared.staging_dir, id, node, &names, "")
            .map_err(|e| anyhow::anyhow!("cannot set up joined client {base}: {e:?}"))?;
        let client = Arc::new(client);
        shared.clients.push(client.clone());
        shared.job_tasks.spawn_for_process(relay(client, listener));
        tracing::info!(client = %base, "a joined client of the last leader has active jobs: waiting for it to join here");
    }
    Ok(())
}

/// Removes the sockets a previous server process left (at start).
pub fn remove_leftovers(data_dir: &std::path::Path) {
    let _ = jobrelay_common::fsutil::remove_dir_all_if_exists(&data_dir.join("joined"));
}

/// Starts following a client that just joined: the relay of its socket, its probe and its
/// collector, all stopped with the server.
fn follow(shared: &Arc<Shared>, client: &Arc<ClientHandle>, listener: tokio::net::UnixListener) {
    let relayed = client.clone();
    shared.job_tasks.spawn_for_process(relay(relayed, listener));
    let (s, c) = (shared.clone(), client.clone());
    let probe = shared.loops.spawn("probe", Some(client.base()), move || {
        crate::probe::run(s.clone(), c.clone())
    });
    let (s, c) = (shared.clone(), client.clone());
    let collector = shared
        .loops
        .spawn("collector", Some(client.base()), move || {
            crate::collector::watch(s.clone(), c.clone())
        });
    shared.job_tasks.spawn(async move {
        let _stop = AbortOnDrop(vec![probe, collector]);
        std::future::pending::<()>().await;
    });
}

/// Aborts the loops when dropped (the server stops its job tasks).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Every connection the server's HTTP client opens to the client waits for a tunnel.
pub async fn relay(client: Arc<ClientHandle>, listener: tokio::net::UnixListener) {
    let Some(joined) = &client.joined else {
        return;
    };
    loop {
        match listener.accept().await {
            Ok((connection, _)) => joined.tunnels.offer(connection),
            Err(e) => {
                tracing::warn!(client = client.base(), error = %e, "tunnel socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The joined client holding `credential`.
pub fn by_credential(
    shared: &Shared,
    credential: Option<&str>,
) -> Result<Arc<ClientHandle>, Refused> {
    if !is_on(shared) {
        return Err(Refused::Off);
    }
    if !shared.lifecycle.leading() {
        return Err(Refused::Standby);
    }
    let Some(credential) = credential else {
        return Err(Refused::Unauthorized(
            "needs Authorization: Bearer <the credential given at join>",
        ));
    };
    shared
        .clients
        .joined_by_credential(credential)
        .ok_or(Refused::Unauthorized("unknown credential: join again"))
}

/// A tunnel offered by `client`: the connection that waits for one, within [`TUNNEL_WAIT`]
/// (or at once when the server stops); `None`: nothing needs one now.
pub async fn next_connection(client: &ClientHandle, from: &str) -> Option<tokio::net::UnixStream> {
    let joined = client.joined.as_ref()?;
    joined.heartbeat(from);
    let _offering = Offering::count(joined);
    tokio::select! {
        connection = joined.tunnels.take(TUNNEL_WAIT) => connection,
        () = jobrelay_common::serve::stopping() => None,
    }
}

/// Counts a held tunnel request in [`Joined::offering`] while it lives; when it ends
/// (answered, or dropped with its connection) the client's quiet time starts from then.
struct Offering<'a>(&'a Joined);

impl<'a> Offering<'a> {
    fn count(joined: &'a Joined) -> Offering<'a> {
        joined
            .offering
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Offering(joined)
    }
}

impl Drop for Offering<'_> {
    fn drop(&mut self) {
        self.0
            .last_heartbeat_ms
            .store(crate::store::now_ms(), std::sync::atomic::Ordering::Relaxed);
        self.0
            .offering
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies bytes both ways between a tunnel and the connection it took, until either ends.
pub async fn splice<T>(mut tunnel: T, mut connection: tokio::net::UnixStream)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy_bidirectional(&mut tunnel, &mut connection).await {
        tracing::debug!(error = %e, "tunnel ended");
    }
}

/// The client leaves (SIGTERM): no new job is placed there; its jobs finish and are
/// collected through the tunnels it still offers.
pub fn leave(shared: &Shared, client: &ClientHandle) {
    if let Some(joined) = &client.joined {
        joined
            .leaving
            .store(true, std::sync::atomic::Ordering::Release);
        shared.lifecycle.client_out(client.id);
        tracing::info!(
            client = client.base(),
            "client leaving: no new jobs go there"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_dns_labels() {
        assert!(check_node("0f6c2a9e-4b1d-4c55-9e0a-1b2c3d4e5f60").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a/b", "a b", &"a".repeat(64)] {
            assert!(check_node(bad).is_err(), "{bad:?}");
        }
    }
}
