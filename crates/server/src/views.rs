//! The read side: what the HTTP answers show of the running system (the dashboard's
//! overview, the clients, a finished job's log), computed from the store, the scheduler and
//! the clients' last reports without changing any of them. Synchronous: the store's reads
//! block, so a handler calls these on the blocking pool.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::Ordering;

use jobrelay_common::logtail::{self, Stream};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{now_ms, rfc3339};
use crate::Shared;

#[derive(Serialize, ToSchema)]
pub struct UserUsage {
    pub user_id: i64,
    pub active: usize,
    pub queued: usize,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceUsage {
    pub name: String,
    /// Jobs waiting; for a user who is not an admin, that user's only.
    pub queued: usize,
    /// Jobs being sent or on a client; for a user who is not an admin, that user's only.
    pub active: usize,
    pub runs_per_user: usize,
    pub max_runs: usize,
    pub users: Vec<UserUsage>,
}

#[derive(Serialize, ToSchema)]
pub struct MinuteCount {
    /// Start of the minute, RFC 3339.
    pub minute: String,
    pub finished: i64,
}

/// Everything the dashboard's overview shows.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    /// Jobs per state, all services.
    pub states: HashMap<String, i64>,
    pub services: Vec<ServiceUsage>,
    /// Jobs finished per minute over the last hour (minutes without any are left out).
    pub throughput: Vec<MinuteCount>,
    pub finished_last_hour: i64,
    pub clients: Vec<ClientView>,
    /// The servers sharing the database (heard from in the last minute), the leader first;
    /// empty for a server on a database of its own, and for a user who is not an admin.
    pub servers: Vec<ServerView>,
}

/// A server of the database, from its heartbeat.
#[derive(Serialize, ToSchema)]
pub struct ServerView {
    pub name: String,
    pub url: String,
    /// `leader` or `standby`.
    pub role: String,
    /// This server (the one answering).
    pub this: bool,
    pub started_at: String,
    pub last_seen: String,
}

/// The servers of the database, leader first (none without a shared database).
pub fn server_views(shared: &Shared) -> anyhow::Result<Vec<ServerView>> {
    let Some(cluster) = shared.store.cluster() else {
        return Ok(Vec::new());
    };
    let leader = shared.role.get().leader;
    let mut servers: Vec<ServerView> = cluster
        .servers(now_ms() - 60_000)?
        .into_iter()
        .map(|s| ServerView {
            role: if leader.as_deref() == Some(s.name.as_str()) {
                "leader".into()
            } else {
                "standby".into()
            },
            this: s.name == shared.role.name,
            started_at: rfc3339(s.started_ms),
            last_seen: rfc3339(s.seen_ms),
            name: s.name,
            url: s.url,
        })
        .collect();
    servers.sort_by_key(|s| s.role != "leader");
    Ok(servers)
}

#[derive(Serialize, ToSchema)]
pub struct ClientView {
    pub url: String,
    pub services: Vec<String>,
    pub healthy: bool,
    /// CPU load in percent, as last reported.
    pub load: f64,
    /// Advertised slots (`/info`), if any.
    pub slots: Option<usize>,
    /// This server's jobs on the client now.
    pub active: usize,
    /// Last successful request, RFC 3339.
    pub last_seen: Option<String>,
    pub version: Option<String>,
    /// Where its payloads run (`local`, `slurm`), as its `/info` says, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    pub features: Vec<String>,
    /// Cores, memory (MiB) and GPUs it advertises (`/info`), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resources: Option<crate::scheduler::Capacity>,
    /// What this server's jobs there take of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub used: Option<crate::scheduler::Capacity>,
    /// How it enforces a job's `memory` (`/info`'s `memory_limits`), if it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limits: Option<String>,
    /// Set for a client that joined at run time (`jobrelay client --connect`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joined: Option<JoinedView>,
}

/// Where a joined client is, since when, and its last heartbeat.
#[derive(Serialize, ToSchema)]
pub struct JoinedView {
    pub node: String,
    /// The address its last request came from.
    pub from: String,
    /// When it first joined, RFC 3339.
    pub since: String,
    /// When it last offered a tunnel, RFC 3339.
    pub last_heartbeat: String,
    /// True once it said it leaves: it gets no new job.
    pub leaving: bool,
}

/// The clients of every service: health, load, slots, jobs, last contact.
pub fn client_views(shared: &Shared) -> Vec<ClientView> {
    let sched = shared.lifecycle.scheduler();
    shared
        .clients
        .all()
        .into_iter()
        .map(|client| {
            let info = crate::lock(&client.info).clone();
            let last_seen = client.last_seen_ms.load(Ordering::Relaxed);
            ClientView {
                url: client.base().to_owned(),
                services: match &client.joined {
                    Some(joined) => crate::lock(&joined.services).clone(),
                    None => shared
                        .config
                        .services
                        .iter()
                        .filter(|(_, s)| s.clients.iter().any(|c| c.base == client.base()))
                        .map(|(name, _)| name.clone())
                        .collect(),
                },
                healthy: sched.client_healthy(client.id),
                load: sched.client_load(client.id),
                slots: sched.client_slots(client.id),
                active: sched.active_on_client(client.id),
                last_seen: (last_seen > 0).then(|| rfc3339(last_seen)),
                version: info.as_ref().map(|i| i.version.clone()),
                executor: info.as_ref().and_then(|i| i.executor.clone()),
                memory_limits: info.as_ref().and_then(|i| i.memory_limits.clone()),
                features: info.map(|i| i.features).unwrap_or_default(),
                resources: sched.client_capacity(client.id),
                used: sched
                    .client_capacity(client.id)
                    .map(|_| sched.client_used(client.id)),
                joined: client.joined.as_ref().map(|j| JoinedView {
                    node: j.node.clone(),
                    from: crate::lock(&j.from).clone(),
                    since: rfc3339(j.since_ms),
                    last_heartbeat: rfc3339(j.last_heartbeat_ms.load(Ordering::Relaxed)),
                    leaving: j.leaving.load(Ordering::Relaxed),
                }),
            }
        })
        .collect()
}

/// Jobs per state, queues and quota use per service and user, throughput over the last hour,
/// and the clients. `only`: the one user whose jobs a caller (not an admin) sees; such a
/// caller sees neither the clients nor how busy a service is with other users' jobs.
pub fn overview(shared: &Shared, only: Option<i64>) -> anyhow::Result<Overview> {
    let hour_ago = now_ms() - 3_600_000;
    let counts = shared.store.counts(only)?;
    let per_minute = shared.store.finished_per_minute(hour_ago, only)?;
    let mut states = HashMap::new();
    for (_, status, count) in counts {
        *states.entry(status).or_insert(0) += count;
    }
    let services = {
        let sched = shared.lifecycle.scheduler();
        let mut services: Vec<ServiceUsage> = shared
            .service_ids
            .iter()
            .map(|(name, &id)| {
                let (runs_per_user, max_runs) = sched.quotas(id);
                let users: Vec<UserUsage> = sched
                    .user_usage(id)
                    .into_iter()
                    .filter(|(user, _, _)| only.is_none_or(|me| me == *user))
                    .map(|(user_id, active, queued)| UserUsage {
                        user_id,
                        active,
                        queued,
                    })
                    .collect();
                // A user (not an admin) is told their own totals, not the service's: how
                // busy it is with other users' jobs is not theirs to see.
                let (queued, active) = match only {
                    None => (sched.queued(id), sched.active(id)),
                    Some(_) => (
                        users.iter().map(|u| u.queued).sum(),
                        users.iter().map(|u| u.active).sum(),
                    ),
                };
                ServiceUsage {
                    name: name.clone(),
                    queued,
                    active,
                    runs_per_user,
                    max_runs,
                    users,
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services
    };
    Ok(Overview {
        states,
        services,
        finished_last_hour: per_minute.iter().map(|(_, n)| n).sum(),
        throughput: per_minute
            .into_iter()
            .map(|(minute, finished)| MinuteCount {
                minute: rfc3339(minute),
                finished,
            })
            .collect(),
        clients: if only.is_some() {
            Vec::new()
        } else {
            client_views(shared)
        },
        servers: if only.is_some() {
            Vec::new()
        } else {
            server_views(shared)?
        },
    })
}

/// Reads a window of the log stored in the job's result ZIP, a file or bytes kept in the
/// database (empty when it has none).
pub fn log_from_zip<R: std::io::Read + std::io::Seek>(
    zip: R,
    stream: Stream,
    offset: u64,
) -> Vec<u8> {
    let read = || -> Option<Vec<u8>> {
        let mut archive = zip::ZipArchive::new(zip).ok()?;
        let mut entry = archive.by_name(stream.file_name()).ok()?;
        std::io::copy(&mut (&mut entry).take(offset), &mut std::io::sink()).ok()?;
        let mut bytes = Vec::new();
        entry
            .take(logtail::MAX_CHUNK)
            .read_to_end(&mut bytes)
            .ok()?;
        Some(bytes)
    };
    read().unwrap_or_default()
}
