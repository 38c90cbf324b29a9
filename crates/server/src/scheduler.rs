//! The scheduling core: quotas, fair share, priorities, resources and placement. Pure: no
//! I/O, no clock, no locks.
//!
//! State per service: one queue of job ids per user (higher `priority` first, then first in
//! first out), a ring of users that have queued jobs and may run one more (round-robin), a
//! set of users that have queued jobs but are at their `runs_per_user` quota ("blocked"), a
//! set of users whose next job fits on no client right now ("no room"), and counts of active
//! jobs. A user moves from blocked back to the ring when one of their jobs stops being
//! active, and from no room back to the ring when cores, memory or GPUs come free on a
//! client of the service (or the client set changes). A decision therefore costs O(log n)
//! in the user's queue plus a scan of the service's clients, whatever the number of queued
//! jobs; a user whose next job does not fit is parked, so they cost nothing until room
//! frees, and they never stop other users' jobs that do fit (no head-of-line blocking
//! across users).
//!
//! Placement: among the healthy clients of the service with a free slot and, when the
//! client advertises its resources, enough free cores, memory and GPUs for the job, the one
//! with the most room (free cores, or free slots for a client that does not advertise
//! resources), then the lowest reported load, then the lowest index. A client's slots are
//! its advertised `/info` slots; a client without `/info` (seed-contract only) is given the
//! service's `max_runs`, so there the service quota is the only limit, and a job's resources
//! are not counted on it (one job per slot, as before). Capacity is shared by every service
//! a client serves.
//!
//! Sent ahead: a service may let its only healthy client hold a few jobs beyond its slots
//! ([`Scheduler::set_send_ahead`], the service's `send_ahead`), which wait in the client's
//! own queue and start there the moment a slot frees, without a round trip through the
//! server.
//!
//! Whose turn: round-robin by default. Under [`Policy::FairShare`] the users with a turn are
//! kept in order of their recent usage divided by their weight ([`crate::usage`]: decayed
//! core-seconds of finished and running jobs), the least first, ties to whoever was served
//! longest ago; a decision takes the first (O(log users)). Usage only grows while jobs run,
//! so a key computed before a user's cores ran is a lower bound: a user whose cores start
//! or stop while they have a turn keeps their place, marked, and when such a user comes
//! first their key is computed again and sifted to its place before one is taken (exact,
//! and it costs the marked users that come first, not the queue). The order is a binary
//! heap with lazy invalidation: an entry counts while it matches its user's turn, others are
//! dropped when they come first, and the entry of the user just served is overwritten when
//! they get a turn again (one sift, not a removal and an insertion). Time is passed in
//! ([`Scheduler::set_time`]).
//!
//! No starvation: a job whose turn came and that fitted nowhere is parked; once it has been
//! parked longer than the service's `reserve_after`, one client that could hold it when idle
//! (the one with the most free cores) is held for it: no other job is placed there, the jobs
//! running there drain, and it goes as soon as it fits. Every other client keeps taking the
//! other jobs, so a big job holds one client, never the queue.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

pub use jobrelay_common::resources::Capacity;

use crate::usage::Decayed;

/// The scheduler's maps and sets hash with foldhash, seeded at random per map: a decision
/// looks up a few dozen job and user ids, and SipHash (the standard one) was a fifth of its
/// time (ARCHITECTURE.md, "Server dependencies").
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// How a service chooses whose job goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Users take turns.
    RoundRobin,
    /// The waiting user with the least recent usage (core-seconds decayed with this half-life,
    /// in seconds) divided by their weight goes first.
    FairShare { half_life_s: u64 },
}

/// A non-negative `f64` as an ordered key (for such numbers the bits order as the values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key(u64);

impl Key {
    fn of(x: f64) -> Key {
        let x = if x.is_finite() && x > 0.0 { x } else { 0.0 };
        Key(x.to_bits())
    }
}

/// A user's place in the fair-share order: the key, when it was computed, and whether it may
/// be below the user's usage now (cores ran since it was computed: usage only grows).
#[derive(Debug, Clone, Copy)]
struct Turn {
    key: Key,
    served: u64,
    computed: f64,
    may_grow: bool,
}

/// What fair share keeps of one user of a service (a part of their `UserState`).
#[derive(Debug, Clone, Copy)]
struct FairUser {
    /// `None` until the user's first run or kept usage.
    usage: Option<Decayed>,
    weight: f64,
    /// While the user has a turn: their place in `order`.
    turn: Option<Turn>,
    /// When the user was last served (a counter): ties go to the one served longest ago.
    served: u64,
}

impl Default for FairUser {
    /// A user given no weight weighs 1.
    fn default() -> Self {
        FairUser {
            usage: None,
            weight: 1.0,
            turn: None,
            served: 0,
        }
    }
}

impl FairUser {
    /// Whether the user has cores running now (their key grows with time).
    fn running(&self) -> bool {
        self.usage.is_some_and(|u| u.running_cores > 0)
    }
}

/// An entry of the fair-share order: (key, when last served, user), the least first.
type Entry = Reverse<(Key, u64, UserId)>;

/// The fair-share state of a service: the users with a turn in order (what it keeps of each
/// user is in their `UserState`).
#[derive(Debug)]
struct Fair {
    half_life: f64,
    /// Instant the keys are scaled to (moved forward now and then, see `refresh`).
    base: f64,
    /// `2^((at - base) / half_life)` for `at` the first of `scale`: the factor every key
    /// computed at that instant is scaled by, computed once per instant.
    scale: (f64, f64),
    /// Users with a turn: (usage / weight scaled to `base`, when last served, user), a binary
    /// heap with lazy invalidation. An entry counts while it matches its user's `turn` (key
    /// and `served`); others are stale (the user's key went down, or their turn ended) and
    /// are dropped when they come first (or all at once, see `compact`). A user's entries
    /// within one turn have distinct keys, so at most one matches.
    order: BinaryHeap<Entry>,
    /// Users with a turn: the entries of `order` that match.
    turns: usize,
    serves: u64,
}

impl Fair {
    fn new(half_life: f64, now: f64) -> Fair {
        Fair {
            half_life,
            base: now,
            scale: (now, 1.0),
            order: BinaryHeap::new(),
            turns: 0,
            serves: 0,
        }
    }

    /// `2^((now - base) / half_life)`, computed again only when `now` or `base` moved.
    fn scale_at(&mut self, now: f64) -> f64 {
        if self.scale.0 != now {
            self.scale = (now, ((now - self.base) / self.half_life).exp2());
        }
        self.scale.1
    }

    /// The user's key at `now`: usage at `now` scaled to `base`, divided by the weight.
    fn key(u: &FairUser, now: f64, half_life: f64, scale: f64) -> Key {
        let scaled = u.usage.map_or(0.0, |d| d.value_at(now, half_life) * scale);
        Key::of(scaled / u.weight)
    }

    /// Whether `entry` is the user's place in the order now (`u`: the user's state).
    fn matches(u: &FairUser, entry: &Entry) -> bool {
        let Reverse((key, served, _)) = *entry;
        u.turn.is_some_and(|t| t.key == key && t.served == served)
    }

    /// Gives `user` (whose fair-share state is `u`) a turn: a place in the order.
    fn push(&mut self, u: &mut FairUser, user: UserId, now: f64) {
        let (scale, half_life) = (self.scale_at(now), self.half_life);
        let key = Fair::key(u, now, half_life, scale);
        let served = u.served;
        u.turn = Some(Turn {
            key,
            served,
            computed: now,
            may_grow: u.running(),
        });
        self.turns += 1;
        let entry = Reverse((key, served, user));
        // The user has no turn, so an entry of theirs is stale: one left first by `pop` (the
        // user just served, given a turn again) is overwritten and sifted to its place, one
        // sift instead of a removal and an insertion that climbs to the top.
        if self.order.peek().is_some_and(|first| first.0 .2 == user) {
            *self.order.peek_mut().expect("a first entry") = entry;
        } else {
            self.order.push(entry);
        }
    }

    /// Moves a user with a turn (`u`) to the place their usage at `now` gives them: a key
    /// that went down gets a new entry (the old one is stale), one that went up keeps its
    /// entry, marked to be computed again when it comes first (a lower bound, as in `pop`).
    fn place_again(
        order: &mut BinaryHeap<Entry>,
        u: &mut FairUser,
        user: UserId,
        now: f64,
        half_life: f64,
        scale: f64,
    ) {
        let Some(turn) = u.turn else {
            return;
        };
        let key = Fair::key(u, now, half_life, scale);
        if key < turn.key {
            u.turn = Some(Turn {
                key,
                computed: now,
                may_grow: u.running(),
                ..turn
            });
            order.push(Reverse((key, turn.served, user)));
        } else if key > turn.key {
            u.turn = Some(Turn {
                computed: f64::NEG_INFINITY,
                may_grow: true,
                ..turn
            });
        }
    }

    /// The user with the least usage now. A key only grows while its user has cores running,
    /// so a key computed earlier is a lower bound: the first user is taken when their key is
    /// exact (nothing running, or computed now); a stale one is computed again and sifted to
    /// its place first (when it is still the least, it is taken next). Costs the running
    /// users that come first, not every running user; stale entries are dropped on the way.
    fn pop(&mut self, users: &mut HashMap<UserId, UserState>, now: f64) -> Option<UserId> {
        let (scale, half_life) = (self.scale_at(now), self.half_life);
        if self.order.len() > 2 * self.turns + 64 {
            self.compact(users);
        }
        loop {
            let mut first = self.order.peek_mut()?;
            let Reverse((key, served, user)) = *first;
            let Some(u) = users
                .get_mut(&user)
                .map(|u| &mut u.fair)
                .filter(|u| Fair::matches(u, &first))
            else {
                PeekMut::pop(first);
                continue;
            };
            let turn = u.turn.expect("a matching entry has a turn");
            if turn.may_grow && turn.computed < now {
                // Stale: its key now is sifted to its place (then it is exact: taken next
                // if it is still the least).
                let new = Fair::key(u, now, half_life, scale);
                u.turn = Some(Turn {
                    key: new,
                    computed: now,
                    may_grow: u.running(),
                    ..turn
                });
                if new != key {
                    *first = Reverse((new, served, user));
                }
                continue;
            }
            // Its entry stays first, stale from now on (the user has no turn): `push` reuses
            // it if the user gets a turn again before the order changes, else it goes
            // like any stale entry.
            drop(first);
            self.turns -= 1;
            self.serves += 1;
            u.turn = None;
            u.served = self.serves;
            return Some(user);
        }
    }

    /// Drops the stale entries of the order (when they outnumber the users with a turn).
    fn compact(&mut self, users: &HashMap<UserId, UserState>) {
        self.order.retain(|entry| {
            let Reverse((_, _, user)) = *entry;
            users
                .get(&user)
                .is_some_and(|u| Fair::matches(&u.fair, entry))
        });
    }

    /// Puts a user with a turn back at the place their usage gives them now.
    fn rekey(&mut self, u: &mut FairUser, user: UserId, now: f64) {
        let (scale, half_life) = (self.scale_at(now), self.half_life);
        Fair::place_again(&mut self.order, u, user, now, half_life, scale);
    }

    /// Every few dozen half-lives the keys are scaled to a later base so they stay finite:
    /// every key is computed again at `now` and the order built anew (stale entries go).
    fn refresh(&mut self, users: &mut HashMap<UserId, UserState>, now: f64) {
        if (now - self.base) / self.half_life > 64.0 {
            self.base = now;
            self.scale = (now, 1.0);
            let half_life = self.half_life;
            let mut entries = Vec::with_capacity(self.turns);
            for (&user, u) in users.iter_mut() {
                let u = &mut u.fair;
                let Some(turn) = u.turn else {
                    continue;
                };
                let key = Fair::key(u, now, half_life, 1.0);
                u.turn = Some(Turn {
                    key,
                    computed: now,
                    may_grow: u.running(),
                    ..turn
                });
                entries.push(Reverse((key, turn.served, user)));
            }
            self.order = BinaryHeap::from(entries);
        }
    }

    /// Usage kept for `user` (`value` as of `at`), their running cores unchanged.
    fn load(&mut self, u: &mut FairUser, user: UserId, value: f64, at: f64, now: f64) {
        let half_life = self.half_life;
        let running = u.usage.map_or(0, |d| d.running_cores);
        let mut usage = Decayed::at(value, at);
        usage.advance(now, half_life);
        usage.running_cores = running;
        u.usage = Some(usage);
        self.rekey(u, user, now);
    }

    /// Cores start (`starts`) or stop running for `user` at `now`. A user with a turn keeps
    /// their place: their key, computed before, is below their usage from now on (cores that
    /// start) or already was (cores that stop ran since), so it is marked as one that may
    /// have grown and `pop` computes it again if it comes first.
    fn run(&self, u: &mut FairUser, cores: u32, starts: bool, now: f64) {
        let half_life = self.half_life;
        let d = u.usage.get_or_insert(Decayed::at(0.0, now));
        d.advance(now, half_life);
        if starts {
            d.running_cores += u64::from(cores);
        } else {
            d.running_cores = d.running_cores.saturating_sub(u64::from(cores));
        }
        if let Some(turn) = &mut u.turn {
            turn.may_grow = true;
        }
    }
}

pub type JobId = i64;
pub type UserId = i64;
pub type ClientId = usize;
pub type ServiceId = usize;

/// One job to send: which job, to which client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub job: JobId,
    pub service: ServiceId,
    pub user: UserId,
    pub client: ClientId,
}

/// What a job needs from its client, and its priority within its user's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub cores: u32,
    /// MiB; 0 when the job asked for no memory.
    pub memory_mb: u64,
    pub gpus: u32,
    /// Higher first within the user's queue.
    pub priority: i64,
}

impl Default for Ask {
    /// One core, nothing else, priority 0: a job that asked for nothing.
    fn default() -> Self {
        Ask {
            cores: 1,
            memory_mb: 0,
            gpus: 0,
            priority: 0,
        }
    }
}

impl Ask {
    fn fits_in(&self, free: &Capacity) -> bool {
        self.cores <= free.cores && self.memory_mb <= free.memory_mb && self.gpus <= free.gpus
    }

    /// "4 cores, 2048 MiB and 1 GPU" (memory and GPUs only when asked for).
    pub fn describe(&self) -> String {
        let mut parts = vec![plural(u64::from(self.cores), "core")];
        if self.memory_mb > 0 {
            parts.push(format!("{} MiB", self.memory_mb));
        }
        if self.gpus > 0 {
            parts.push(plural(u64::from(self.gpus), "GPU"));
        }
        join_and(parts)
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn join_and(mut parts: Vec<String>) -> String {
    match parts.len() {
        0 => String::new(),
        1 => parts.remove(0),
        _ => {
            let last = parts.pop().expect("two or more");
            format!("{} and {last}", parts.join(", "))
        }
    }
}

fn describe_capacity(c: &Capacity) -> String {
    format!(
        "{}, {} MiB and {}",
        plural(u64::from(c.cores), "core"),
        c.memory_mb,
        plural(u64::from(c.gpus), "GPU")
    )
}

/// Why a queued job is not running yet: a machine-readable `reason` and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Waiting {
    /// `no_healthy_client`, `user_quota`, `service_quota`, `behind_own_jobs`,
    /// `no_free_resources`, `reserved` (a client is held for it until it fits) or
    /// `next_turn`.
    pub reason: &'static str,
    pub message: String,
}

#[derive(Debug, Clone)]
struct ClientState {
    healthy: bool,
    slots: Option<usize>,
    /// Advertised resources; `None`: the client does not say (one job per slot).
    capacity: Option<Capacity>,
    load: f64,
    active: usize,
    /// Resources taken by the jobs placed on it (counted only when `capacity` is known at
    /// placement; released with the same amounts).
    used: Capacity,
    /// How messages name the client (its base URL).
    label: String,
    /// A job that waited too long and for which the client is held: no other job is placed
    /// on it until that one fits and goes.
    reserved_for: Option<JobId>,
}

impl ClientState {
    fn free(&self) -> Option<Capacity> {
        self.capacity.map(|c| Capacity {
            cores: c.cores.saturating_sub(self.used.cores),
            memory_mb: c.memory_mb.saturating_sub(self.used.memory_mb),
            gpus: c.gpus.saturating_sub(self.used.gpus),
        })
    }

    fn free_slots(&self, max_runs: usize) -> usize {
        self.slots.unwrap_or(max_runs).saturating_sub(self.active)
    }
}

/// Position in a user's queue: higher priority first, then the order of arrival (a job
/// put back at the front gets a sequence number below every other).
type QueueKey = (Reverse<i64>, i64);

/// What a service keeps of one user, in one map so a decision looks the user up once. An
/// entry holding nothing (no queued or active job, no turn, not blocked, no usage or weight
/// to keep) is removed.
#[derive(Debug, Default)]
struct UserState {
    /// Queued jobs, the next first.
    queue: BTreeMap<QueueKey, JobId>,
    /// Active jobs.
    active: usize,
    /// Has a turn: in the ring (round-robin) or the fair-share order. A user whose queue
    /// emptied meanwhile (cancellations) keeps it until their turn comes.
    in_ring: bool,
    /// Has queued jobs but is at `runs_per_user`.
    blocked: bool,
    /// Fair share's part (default under round-robin).
    fair: FairUser,
}

impl UserState {
    fn holds_nothing(&self) -> bool {
        self.queue.is_empty()
            && self.active == 0
            && !self.in_ring
            && !self.blocked
            && self.fair.usage.is_none()
            && self.fair.weight == 1.0
    }
}

#[derive(Debug, Default)]
struct ServiceState {
    runs_per_user: usize,
    max_runs: usize,
    clients: Vec<ClientId>,
    users: HashMap<UserId, UserState>,
    /// Users with queued jobs that may run one more, in turn order.
    ring: VecDeque<UserId>,
    /// Users whose next job fits on no client of the service right now.
    no_room: HashSet<UserId>,
    active: usize,
    queued: usize,
    /// Next sequence number at the back of a queue (counts up) and at the front (down).
    back_seq: i64,
    front_seq: i64,
    /// `Some` under the fair-share policy (then `ring` is unused).
    fair: Option<Fair>,
    /// Seconds a job may wait for room before a client is held for it; `None`: never.
    reserve_after: Option<f64>,
    /// Jobs parked for lack of room, by when they have waited too long.
    deadlines: BTreeSet<(Key, JobId)>,
    /// Jobs its only healthy client may hold beyond its slots ([`Scheduler::set_send_ahead`]).
    send_ahead: usize,
    /// The scheduler's time, copied here for the turn order.
    now: f64,
}

#[derive(Debug, Clone, Copy)]
struct ActiveJob {
    service: ServiceId,
    user: UserId,
    client: Option<ClientId>,
    ask: Ask,
    /// What it takes on its client (zero on a client that does not advertise resources).
    taken: Capacity,
    /// Its cores count as its user's usage (fair share) until its payload ends.
    accruing: bool,
}

#[derive(Debug, Clone, Copy)]
struct QueuedJob {
    service: ServiceId,
    user: UserId,
    key: QueueKey,
    ask: Ask,
    /// When its turn first came and it fitted nowhere (seconds, the scheduler's clock): the
    /// wait a client is held after is counted from there.
    parked_since: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    services: Vec<ServiceState>,
    clients: Vec<ClientState>,
    active: HashMap<JobId, ActiveJob>,
    queued_jobs: HashMap<JobId, QueuedJob>,
    /// Clients held for jobs that waited too long.
    reservations: HashMap<JobId, ClientId>,
    weights: HashMap<UserId, f64>,
    /// Seconds since the Unix epoch, as last told ([`Scheduler::set_time`]).
    now: f64,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a client, unhealthy until told otherwise.
    pub fn add_client(&mut self) -> ClientId {
        self.clients.push(ClientState {
            healthy: false,
            slots: None,
            capacity: None,
            load: 0.0,
            active: 0,
            used: Capacity::default(),
            label: format!("client {}", self.clients.len()),
            reserved_for: None,
        });
        self.clients.len() - 1
    }

    /// How messages (waiting reasons, refusals) name the client.
    pub fn set_client_label(&mut self, client: ClientId, label: impl Into<String>) {
        self.clients[client].label = label.into();
    }

    pub fn add_service(
        &mut self,
        runs_per_user: usize,
        max_runs: usize,
        clients: Vec<ClientId>,
    ) -> ServiceId {
        self.services.push(ServiceState {
            runs_per_user,
            max_runs,
            clients,
            back_seq: 1,
            now: self.now,
            ..Default::default()
        });
        self.services.len() - 1
    }

    /// The time (seconds since the Unix epoch): usage accrues and decays with it, and waits
    /// are measured by it. It never goes back.
    pub fn set_time(&mut self, now: f64) {
        if now > self.now {
            self.now = now;
            for s in &mut self.services {
                s.now = now;
            }
        }
    }

    pub fn now(&self) -> f64 {
        self.now
    }

    /// How `service` chooses whose turn it is (round-robin unless told). Set before jobs are
    /// queued.
    pub fn set_policy(&mut self, service: ServiceId, policy: Policy) {
        let now = self.now;
        let s = &mut self.services[service];
        s.fair = match policy {
            Policy::RoundRobin => None,
            Policy::FairShare { half_life_s } => {
                for (&user, &weight) in &self.weights {
                    s.users.entry(user).or_default().fair.weight = weight;
                }
                Some(Fair::new(half_life_s.max(1) as f64, now))
            }
        };
    }

    /// After how many seconds of waiting for room a job gets a client held for it (`None`:
    /// never).
    pub fn set_reserve_after(&mut self, service: ServiceId, secs: Option<f64>) {
        self.services[service].reserve_after = secs;
    }

    /// Up to `jobs` jobs of `service` sent ahead to its client when every slot there is
    /// taken: they wait in the client's own queue (first in, first out) and start the moment
    /// a slot frees there, without a round trip through the server (issue 18). Only while
    /// the service has one healthy client (with two, a job queued behind a long run on one
    /// would wait while the other idles), only to a client that says how many slots it has
    /// (its queue is then its own), and only a job that asks one core and no memory or GPU:
    /// whichever job ends to free the slot asked at least that much, so starting it there
    /// never takes more than the client has. 0 (the default): never.
    pub fn set_send_ahead(&mut self, service: ServiceId, jobs: usize) {
        self.services[service].send_ahead = jobs;
    }

    /// A user's fair-share weight (default 1): their usage counts divided by it.
    pub fn set_weight(&mut self, user: UserId, weight: f64) {
        let weight = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            1.0
        };
        self.weights.insert(user, weight);
        for s in &mut self.services {
            if s.fair.is_some() {
                // It counts from the user's next key.
                s.users.entry(user).or_default().fair.weight = weight;
            }
        }
    }

    /// Usage of `user` in a fair-share `service` as kept (core-seconds as of `at`), e.g. read
    /// back at start. Ignored for a round-robin service.
    pub fn load_usage(&mut self, service: ServiceId, user: UserId, value: f64, at: f64) {
        let now = self.now;
        let s = &mut self.services[service];
        if let Some(fair) = &mut s.fair {
            let u = s.users.entry(user).or_default();
            fair.load(&mut u.fair, user, value, at, now);
        }
    }

    /// The usage of `user` in a fair-share `service` now (`None` for round-robin).
    pub fn usage(&self, service: ServiceId, user: UserId) -> Option<Decayed> {
        let s = &self.services[service];
        let fair = s.fair.as_ref()?;
        let mut usage = s
            .users
            .get(&user)
            .and_then(|u| u.fair.usage)
            .unwrap_or(Decayed::at(0.0, self.now));
        usage.advance(self.now, fair.half_life);
        Some(usage)
    }

    /// The policy of a service.
    pub fn policy(&self, service: ServiceId) -> Policy {
        match &self.services[service].fair {
            None => Policy::RoundRobin,
            Some(fair) => Policy::FairShare {
                half_life_s: fair.half_life as u64,
            },
        }
    }

    /// The next instant a queued job will have waited long enough to get a client held for
    /// it, if any is coming (for the dispatcher's timer).
    pub fn next_deadline(&self) -> Option<f64> {
        self.services
            .iter()
            .flat_map(|s| s.deadlines.iter())
            .map(|(key, _)| f64::from_bits(key.0))
            .filter(|t| *t > self.now)
            .min_by(f64::total_cmp)
    }

    /// The client held for `job`, if any.
    pub fn reserved_client(&self, job: JobId) -> Option<ClientId> {
        self.reservations.get(&job).copied()
    }

    /// A client that joined at run time serves `service` too (a client that joins again
    /// changes nothing). It is unhealthy until told otherwise.
    pub fn add_client_to_service(&mut self, service: ServiceId, client: ClientId) {
        let s = &mut self.services[service];
        if !s.clients.contains(&client) {
            s.clients.push(client);
            self.room_changed(client);
        }
    }

    /// Updates what is known of a client: reachable or not, advertised slots, load (0-100).
    pub fn set_client(&mut self, client: ClientId, healthy: bool, slots: Option<usize>, load: f64) {
        let c = &mut self.clients[client];
        c.healthy = healthy;
        c.slots = slots;
        c.load = load;
        self.room_changed(client);
    }

    /// The cores, memory and GPUs a client advertises (`None`: it does not say). The jobs
    /// already there are counted again against it: jobs found active at start-up are placed
    /// before the client's first probe says what it has.
    pub fn set_client_capacity(&mut self, client: ClientId, capacity: Option<Capacity>) {
        if self.clients[client].capacity == capacity {
            return;
        }
        self.clients[client].capacity = capacity;
        let mut used = Capacity::default();
        for job in self.active.values_mut() {
            if job.client != Some(client) {
                continue;
            }
            job.taken = match capacity {
                Some(_) => Capacity {
                    cores: job.ask.cores,
                    memory_mb: job.ask.memory_mb,
                    gpus: job.ask.gpus,
                },
                None => Capacity::default(),
            };
            used.cores += job.taken.cores;
            used.memory_mb += job.taken.memory_mb;
            used.gpus += job.taken.gpus;
        }
        self.clients[client].used = used;
        self.room_changed(client);
    }

    pub fn set_client_health(&mut self, client: ClientId, healthy: bool) {
        self.clients[client].healthy = healthy;
        if healthy {
            self.room_changed(client);
        }
    }

    pub fn client_slots(&self, client: ClientId) -> Option<usize> {
        self.clients[client].slots
    }

    pub fn client_capacity(&self, client: ClientId) -> Option<Capacity> {
        self.clients[client].capacity
    }

    /// Resources taken on a client by the jobs placed there.
    pub fn client_used(&self, client: ClientId) -> Capacity {
        self.clients[client].used
    }

    /// Last reported CPU load of a client, 0 to 100.
    pub fn client_load(&self, client: ClientId) -> f64 {
        self.clients[client].load
    }

    /// (user, active, queued) for every user with jobs active or queued in a service.
    pub fn user_usage(&self, service: ServiceId) -> Vec<(UserId, usize, usize)> {
        let state = &self.services[service];
        let mut users: Vec<(UserId, usize, usize)> = state
            .users
            .iter()
            .map(|(&user, u)| (user, u.active, u.queue.len()))
            .filter(|(_, active, queued)| active + queued > 0)
            .collect();
        users.sort_unstable_by_key(|&(user, _, _)| user);
        users
    }

    /// Quotas of a service: (runs_per_user, max_runs).
    pub fn quotas(&self, service: ServiceId) -> (usize, usize) {
        let state = &self.services[service];
        (state.runs_per_user, state.max_runs)
    }

    pub fn client_healthy(&self, client: ClientId) -> bool {
        self.clients[client].healthy
    }

    /// Adds a job at the back of its user's queue (among the jobs of its priority).
    pub fn enqueue(&mut self, service: ServiceId, user: UserId, job: JobId, ask: Ask) {
        let s = &mut self.services[service];
        let seq = s.back_seq;
        s.back_seq += 1;
        self.insert_queued(service, user, job, ask, seq);
    }

    /// Puts a job that was active back at the front of its user's queue (it keeps its place).
    pub fn requeue(&mut self, job: JobId) -> bool {
        let Some(entry) = self.release(job) else {
            return false;
        };
        self.push_front(entry.service, entry.user, job, entry.ask);
        true
    }

    /// Puts a job at the front of its user's queue, ahead of the jobs of its priority (a job
    /// queued again keeps its place).
    pub fn push_front(&mut self, service: ServiceId, user: UserId, job: JobId, ask: Ask) {
        let s = &mut self.services[service];
        let seq = s.front_seq;
        s.front_seq -= 1;
        self.insert_queued(service, user, job, ask, seq);
    }

    fn insert_queued(&mut self, service: ServiceId, user: UserId, job: JobId, ask: Ask, seq: i64) {
        let key = (Reverse(ask.priority), seq);
        let s = &mut self.services[service];
        s.users.entry(user).or_default().queue.insert(key, job);
        s.queued += 1;
        // Its next job may have changed: one that fits may now be first.
        s.no_room.remove(&user);
        s.offer_turn(user);
        self.queued_jobs.insert(
            job,
            QueuedJob {
                service,
                user,
                key,
                ask,
                parked_since: None,
            },
        );
    }

    /// Removes a queued job (cancelled). Cost: O(log n) in that user's queue.
    pub fn remove_queued(&mut self, service: ServiceId, user: UserId, job: JobId) -> bool {
        let Some(entry) = self.queued_jobs.get(&job).copied() else {
            return false;
        };
        if entry.service != service || entry.user != user {
            return false;
        }
        self.queued_jobs.remove(&job);
        self.unreserve(job);
        let s = &mut self.services[service];
        let u = s.users.get_mut(&user).expect("a queued job has a queue");
        u.queue.remove(&entry.key);
        if u.queue.is_empty() {
            if u.holds_nothing() {
                s.users.remove(&user);
            }
        } else if s.no_room.remove(&user) {
            // The first job may be another now.
            s.offer_turn(user);
        }
        s.queued -= 1;
        true
    }

    /// Records a job that is already active (found so at start-up), on `client` if known.
    pub fn activate(
        &mut self,
        service: ServiceId,
        user: UserId,
        job: JobId,
        client: Option<ClientId>,
        ask: Ask,
    ) {
        if self.active.contains_key(&job) {
            return;
        }
        let now = self.now;
        let s = &mut self.services[service];
        s.active += 1;
        let u = s.users.entry(user).or_default();
        u.active += 1;
        if let Some(fair) = &s.fair {
            fair.run(&mut u.fair, ask.cores, true, now);
        }
        let mut taken = Capacity::default();
        if let Some(c) = client {
            let c = &mut self.clients[c];
            c.active += 1;
            if c.capacity.is_some() {
                taken = Capacity {
                    cores: ask.cores,
                    memory_mb: ask.memory_mb,
                    gpus: ask.gpus,
                };
                c.used.cores += taken.cores;
                c.used.memory_mb += taken.memory_mb;
                c.used.gpus += taken.gpus;
            }
        }
        self.active.insert(
            job,
            ActiveJob {
                service,
                user,
                client,
                ask,
                taken,
                accruing: true,
            },
        );
    }

    /// The job's payload has ended on its client (the client said so) while the job is still
    /// active here, its results being fetched: the client's slot and resources are free for
    /// the next job now, while the job counts against its user's and service's quotas until
    /// [`finish`]. Returns whether a slot was freed.
    ///
    /// [`finish`]: Scheduler::finish
    pub fn leave_client(&mut self, job: JobId) -> bool {
        let Some(entry) = self.active.get_mut(&job) else {
            return false;
        };
        let Some(c) = entry.client.take() else {
            return false;
        };
        let taken = std::mem::take(&mut entry.taken);
        let entry = *entry;
        self.stop_accruing(job, &entry);
        self.free_on_client(c, taken);
        true
    }

    /// The job's cores no longer add to its user's usage (its payload ended).
    fn stop_accruing(&mut self, job: JobId, entry: &ActiveJob) {
        if !entry.accruing {
            return;
        }
        if let Some(active) = self.active.get_mut(&job) {
            active.accruing = false;
        }
        let now = self.now;
        let s = &mut self.services[entry.service];
        if let (Some(fair), Some(u)) = (&s.fair, s.users.get_mut(&entry.user)) {
            fair.run(&mut u.fair, entry.ask.cores, false, now);
        }
    }

    fn free_on_client(&mut self, client: ClientId, taken: Capacity) {
        let c = &mut self.clients[client];
        c.active -= 1;
        c.used.cores -= taken.cores;
        c.used.memory_mb -= taken.memory_mb;
        c.used.gpus -= taken.gpus;
        self.room_changed(client);
    }

    /// Room may have come free on `client`: the users of its services parked for lack of
    /// room get a turn again. Costs the number of parked users, not the queued jobs.
    fn room_changed(&mut self, client: ClientId) {
        // A client held for a job takes no other: only that job's user may use the room.
        if let Some(job) = self.clients[client].reserved_for {
            if let Some(q) = self.queued_jobs.get(&job) {
                let s = &mut self.services[q.service];
                if s.no_room.remove(&q.user) {
                    s.offer_turn(q.user);
                }
            }
            return;
        }
        for s in &mut self.services {
            if s.no_room.is_empty() || !s.clients.contains(&client) {
                continue;
            }
            let parked: Vec<UserId> = s.no_room.drain().collect();
            for user in parked {
                s.offer_turn(user);
            }
        }
    }

    /// A job stopped being active (finished, killed, failed): frees its quota and its slot.
    pub fn finish(&mut self, job: JobId) -> bool {
        self.release(job).is_some()
    }

    /// [`Scheduler::finish`], returning the job's user's usage afterwards when its service
    /// shares by usage (to be kept, so it survives a restart).
    pub fn finish_with_usage(
        &mut self,
        job: JobId,
    ) -> Option<(ServiceId, UserId, Option<Decayed>)> {
        let entry = self.release(job)?;
        Some((
            entry.service,
            entry.user,
            self.usage(entry.service, entry.user),
        ))
    }

    fn release(&mut self, job: JobId) -> Option<ActiveJob> {
        let entry = *self.active.get(&job)?;
        self.stop_accruing(job, &entry);
        let entry = self.active.remove(&job)?;
        if let Some(c) = entry.client {
            self.free_on_client(c, entry.taken);
        }
        let s = &mut self.services[entry.service];
        s.active -= 1;
        let u = s.users.get_mut(&entry.user).expect("counted user");
        u.active -= 1;
        let was_blocked = std::mem::take(&mut u.blocked);
        if was_blocked {
            s.offer_turn(entry.user);
        } else if u.holds_nothing() {
            s.users.remove(&entry.user);
        }
        Some(entry)
    }

    /// Chooses every job that may be dispatched now, and counts them as active.
    pub fn decide(&mut self) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for service in 0..self.services.len() {
            let now = self.now;
            let s = &mut self.services[service];
            if let Some(fair) = &mut s.fair {
                fair.refresh(&mut s.users, now);
            }
            self.reserve_for_the_starving(service);
            loop {
                let s = &self.services[service];
                if s.active >= s.max_runs || s.queued == 0 || !self.any_free_slot(service) {
                    break;
                }
                let Some(user) = self.services[service].next_user() else {
                    break;
                };
                let s = &self.services[service];
                let (&key, &job) = s.users[&user]
                    .queue
                    .first_key_value()
                    .expect("a user given a turn has a queued job");
                let ask = self.queued_jobs[&job].ask;
                let Some(client) = self.place(service, job, &ask) else {
                    // Fits nowhere now: parked until room frees, other users go on. Past
                    // `reserve_after` a client is held for it (`reserve_for_the_starving`).
                    let now = self.now;
                    let queued = self.queued_jobs.get_mut(&job).expect("queued");
                    let since = *queued.parked_since.get_or_insert(now);
                    let s = &mut self.services[service];
                    s.no_room.insert(user);
                    if let Some(after) = s.reserve_after {
                        if !self.reservations.contains_key(&job) {
                            s.deadlines.insert((Key::of(since + after), job));
                        }
                    }
                    continue;
                };
                self.queued_jobs.remove(&job);
                self.unreserve(job);
                let s = &mut self.services[service];
                let u = s.users.get_mut(&user).expect("the user's queue");
                u.queue.remove(&key);
                let more = !u.queue.is_empty();
                s.queued -= 1;
                // The user now has an active job: their entry stays.
                self.activate(service, user, job, Some(client), ask);
                if more {
                    self.services[service].offer_turn(user);
                }
                decisions.push(Decision {
                    job,
                    service,
                    user,
                    client,
                });
            }
        }
        decisions
    }

    fn any_free_slot(&self, service: ServiceId) -> bool {
        let s = &self.services[service];
        s.clients.iter().any(|&id| {
            let c = &self.clients[id];
            c.healthy && c.free_slots(s.max_runs) > 0
        }) || self.ahead_client(service).is_some()
    }

    /// The client that may take a job of `service` sent ahead now (see
    /// [`Scheduler::set_send_ahead`]): the service's only healthy client, when it advertises
    /// its slots, every one of them is taken and it holds fewer than `send_ahead` jobs beyond
    /// them.
    fn ahead_client(&self, service: ServiceId) -> Option<ClientId> {
        let s = &self.services[service];
        if s.send_ahead == 0 {
            return None;
        }
        let mut healthy = s
            .clients
            .iter()
            .copied()
            .filter(|&id| self.clients[id].healthy);
        let (Some(id), None) = (healthy.next(), healthy.next()) else {
            return None;
        };
        let c = &self.clients[id];
        let slots = c.slots?;
        (c.active >= slots && c.active < slots + s.send_ahead).then_some(id)
    }

    /// Holds a client for each job of `service` that has waited for room longer than
    /// `reserve_after` (oldest first): the client of the service that could hold it when idle
    /// and has the most free cores now, among those not held for another job. From then on
    /// no other job is placed there, so the running jobs drain until it fits. Costs the jobs
    /// past their deadline, not the queue.
    fn reserve_for_the_starving(&mut self, service: ServiceId) {
        let now = self.now;
        let s = &self.services[service];
        let holdable =
            |c: &ClientState| c.healthy && c.capacity.is_some() && c.reserved_for.is_none();
        if s.deadlines
            .first()
            .is_none_or(|(at, _)| f64::from_bits(at.0) > now)
            || !s.clients.iter().any(|&id| holdable(&self.clients[id]))
        {
            // Nothing due, or every client is held already: the due jobs wait their turn
            // for a hold (costs nothing per decision).
            return;
        }
        let due: Vec<(Key, JobId)> = self.services[service]
            .deadlines
            .iter()
            .take_while(|(at, _)| f64::from_bits(at.0) <= now)
            .copied()
            .collect();
        for entry in due {
            let (_, job) = entry;
            // Still the next job of its user, who may run one more (a user at their quota
            // would hold a client for nothing). Room may have come free meanwhile: then it
            // is placed in this very round and the hold ends with it.
            let still_next = self.queued_jobs.get(&job).is_some_and(|q| {
                let s = &self.services[service];
                let u = &s.users[&q.user];
                u.queue.keys().next() == Some(&q.key) && u.active < s.runs_per_user
            });
            if !still_next || self.reservations.contains_key(&job) {
                self.services[service].deadlines.remove(&entry);
                continue;
            }
            let ask = self.queued_jobs[&job].ask;
            let s = &self.services[service];
            let chosen = s
                .clients
                .iter()
                .filter_map(|&id| {
                    let c = &self.clients[id];
                    let capacity = c.capacity?;
                    (c.healthy && c.reserved_for.is_none() && ask.fits_in(&capacity))
                        .then(|| (id, c.free().map_or(0, |f| f.cores)))
                })
                .min_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)))
                .map(|(id, _)| id);
            // None free to hold now: it stays due and is tried at the next decision.
            if let Some(client) = chosen {
                self.clients[client].reserved_for = Some(job);
                self.reservations.insert(job, client);
                self.services[service].deadlines.remove(&entry);
            }
        }
    }

    fn unreserve(&mut self, job: JobId) {
        if let Some(client) = self.reservations.remove(&job) {
            self.clients[client].reserved_for = None;
            self.room_changed(client);
        }
    }

    /// The healthy client of `service` with a free slot and room for `ask` that has the most
    /// room, if any; a client held for another job is left out.
    fn place(&self, service: ServiceId, job: JobId, ask: &Ask) -> Option<ClientId> {
        let s = &self.services[service];
        s.clients
            .iter()
            .filter_map(|&id| {
                let c = &self.clients[id];
                let slots = c.free_slots(s.max_runs);
                if !c.healthy || slots == 0 || c.reserved_for.is_some_and(|j| j != job) {
                    return None;
                }
                let room = match c.free() {
                    Some(free) if !ask.fits_in(&free) => return None,
                    Some(free) => free.cores as usize,
                    None => slots,
                };
                Some((id, room, c.load))
            })
            .min_by(|a, b| b.1.cmp(&a.1).then(a.2.total_cmp(&b.2)).then(a.0.cmp(&b.0)))
            .map(|(id, _, _)| id)
            .or_else(|| self.place_ahead(service, job, ask))
    }

    /// Where a job that fits nowhere now may be sent ahead ([`Scheduler::set_send_ahead`]):
    /// the service's ahead client, unless it is held for another job, and only a job of one
    /// core that asks no memory and no GPU.
    fn place_ahead(&self, service: ServiceId, job: JobId, ask: &Ask) -> Option<ClientId> {
        if ask.cores != 1 || ask.memory_mb != 0 || ask.gpus != 0 {
            return None;
        }
        let id = self.ahead_client(service)?;
        let c = &self.clients[id];
        if c.reserved_for.is_some_and(|j| j != job) {
            return None;
        }
        Some(id)
    }

    /// Why a job asking `ask` could never run in `service` (named `name`): every client of
    /// the service advertises its resources and none has that much, even idle. `None` when
    /// some client could hold it, or when some client does not say what it has (or has not
    /// said yet): then only running it tells.
    pub fn never_fits(&self, service: ServiceId, name: &str, ask: &Ask) -> Option<String> {
        let s = &self.services[service];
        let mut largest: Option<(&ClientState, Capacity)> = None;
        for &id in &s.clients {
            let c = &self.clients[id];
            let capacity = c.capacity?;
            if ask.fits_in(&capacity) {
                return None;
            }
            let bigger = largest.is_none_or(|(_, l)| {
                (capacity.cores, capacity.memory_mb, capacity.gpus) > (l.cores, l.memory_mb, l.gpus)
            });
            if bigger {
                largest = Some((c, capacity));
            }
        }
        let (client, has) = largest?;
        let mut needs = Vec::new();
        let mut offers = Vec::new();
        if ask.cores > has.cores {
            needs.push(plural(u64::from(ask.cores), "core"));
            offers.push(u64::from(has.cores).to_string());
        }
        if ask.memory_mb > has.memory_mb {
            needs.push(format!("{} MiB", ask.memory_mb));
            offers.push(format!("{} MiB", has.memory_mb));
        }
        if ask.gpus > has.gpus {
            needs.push(plural(u64::from(ask.gpus), "GPU"));
            offers.push(plural(u64::from(has.gpus), "GPU"));
        }
        Some(format!(
            "needs {}; the largest client of service {name} ({}) has {}",
            join_and(needs),
            client.label,
            join_and(offers)
        ))
    }

    /// Why a queued job waits, or `None` when it is not queued here. A query: changes
    /// nothing. Costs the jobs ahead of it in its user's queue plus a scan of the service's
    /// clients.
    pub fn waiting_for(&self, job: JobId) -> Option<Waiting> {
        let entry = self.queued_jobs.get(&job)?;
        let s = &self.services[entry.service];
        let wait = |reason, message: String| Some(Waiting { reason, message });
        let healthy: Vec<&ClientState> = s
            .clients
            .iter()
            .map(|&id| &self.clients[id])
            .filter(|c| c.healthy)
            .collect();
        if healthy.is_empty() {
            return wait(
                "no_healthy_client",
                "no client of its service is healthy (reachable and not full)".into(),
            );
        }
        let user = &s.users[&entry.user];
        let running = user.active;
        if running >= s.runs_per_user {
            return wait(
                "user_quota",
                format!(
                    "user {} is at runs_per_user ({running} of {} running)",
                    entry.user, s.runs_per_user
                ),
            );
        }
        if s.active >= s.max_runs {
            return wait(
                "service_quota",
                format!(
                    "the service is at max_runs ({} of {} running)",
                    s.active, s.max_runs
                ),
            );
        }
        let ahead = user.queue.range(..entry.key).count();
        if ahead > 0 {
            return wait(
                "behind_own_jobs",
                format!(
                    "behind {} of user {}",
                    plural(ahead as u64, "earlier job"),
                    entry.user
                ),
            );
        }
        if let Some(&client) = self.reservations.get(&job) {
            let c = &self.clients[client];
            return wait(
                "reserved",
                format!(
                    "waited over {} s for room: {} is held for it (no other job starts there) until it has {} free",
                    s.reserve_after.unwrap_or(0.0).round(),
                    c.label,
                    entry.ask.describe()
                ),
            );
        }
        if self.place(entry.service, job, &entry.ask).is_none() {
            let with_slot: Vec<&&ClientState> = healthy
                .iter()
                .filter(|c| c.free_slots(s.max_runs) > 0)
                .collect();
            let message = if with_slot.is_empty() {
                "every slot of every healthy client of its service is taken".to_owned()
            } else {
                let most = with_slot
                    .iter()
                    .filter_map(|c| c.free().map(|f| (c, f)))
                    .max_by_key(|(_, f)| (f.cores, f.memory_mb, f.gpus));
                match most {
                    Some((c, free)) => format!(
                        "no client has {} free now; the most free on any is {} on {}",
                        entry.ask.describe(),
                        describe_capacity(&free),
                        c.label
                    ),
                    None => format!("no client has {} free now", entry.ask.describe()),
                }
            };
            return wait("no_free_resources", message);
        }
        match &s.fair {
            None => wait(
                "next_turn",
                "it goes at the next dispatch (other users' turns first)".into(),
            ),
            Some(fair) => {
                let usage = user
                    .fair
                    .usage
                    .map_or(0.0, |u| u.value_at(self.now, fair.half_life));
                wait(
                    "next_turn",
                    format!(
                        "it goes at the next dispatch (fair share: users with less recent usage first; user {} has used {:.0} core-seconds, decayed)",
                        entry.user, usage
                    ),
                )
            }
        }
    }

    pub fn queued(&self, service: ServiceId) -> usize {
        self.services[service].queued
    }

    pub fn active(&self, service: ServiceId) -> usize {
        self.services[service].active
    }

    pub fn active_of_user(&self, service: ServiceId, user: UserId) -> usize {
        self.services[service]
            .users
            .get(&user)
            .map_or(0, |u| u.active)
    }

    pub fn active_on_client(&self, client: ClientId) -> usize {
        self.clients[client].active
    }

    pub fn is_active(&self, job: JobId) -> bool {
        self.active.contains_key(&job)
    }

    /// Whether `job` is queued or active here (known to this scheduler).
    pub fn knows(&self, job: JobId) -> bool {
        self.active.contains_key(&job) || self.queued_jobs.contains_key(&job)
    }
}

impl ServiceState {
    /// Gives `user` a turn (back of the ring) if they have queued jobs and are under quota;
    /// otherwise parks them as blocked. Never adds a user twice.
    fn offer_turn(&mut self, user: UserId) {
        if self.no_room.contains(&user) {
            return;
        }
        let Some(u) = self.users.get_mut(&user) else {
            return;
        };
        if u.in_ring || u.blocked {
            return;
        }
        if u.queue.is_empty() {
            if u.holds_nothing() {
                self.users.remove(&user);
            }
            return;
        }
        if u.active >= self.runs_per_user {
            u.blocked = true;
        } else {
            u.in_ring = true;
            match &mut self.fair {
                None => self.ring.push_back(user),
                Some(fair) => fair.push(&mut u.fair, user, self.now),
            }
        }
    }

    /// Takes the next user whose turn it is (out of the ring). Users whose queue emptied
    /// (cancellations) or who reached their quota leave the ring on the way.
    fn next_user(&mut self) -> Option<UserId> {
        loop {
            let next = match &mut self.fair {
                None => self.ring.pop_front(),
                Some(fair) => fair.pop(&mut self.users, self.now),
            };
            let user = next?;
            let Some(u) = self.users.get_mut(&user) else {
                continue;
            };
            u.in_ring = false;
            if u.queue.is_empty() {
                if u.holds_nothing() {
                    self.users.remove(&user);
                }
                continue;
            }
            if u.active >= self.runs_per_user {
                u.blocked = true;
                continue;
            }
            return Some(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn a_payload_that_ended_frees_its_client_slot_but_not_the_quotas() {
        let mut s = single(2, 10, Some(1));
        for j in 1..=3 {
            s.enqueue(0, 7, j, Ask::default());
        }
        assert_eq!(jobs(&s.decide()), vec![1]);
        assert!(s.decide().is_empty(), "the client's one slot is taken");
        // Job 1 ended on the client; its results are still being fetched.
        assert!(s.leave_client(1));
        assert!(!s.leave_client(1), "only once");
        assert_eq!(s.active_on_client(0), 0);
        assert_eq!(jobs(&s.decide()), vec![2]);
        // The user's quota (2) still counts job 1: job 3 waits although the slot frees.
        assert!(s.leave_client(2));
        assert!(s.decide().is_empty());
        assert_eq!(s.active_of_user(0, 7), 2);
        assert!(s.finish(1));
        assert_eq!(jobs(&s.decide()), vec![3]);
        assert_eq!(s.active_on_client(0), 1);
        assert!(s.finish(2) && s.finish(3));
        assert_eq!(s.active(0), 0);
        assert_eq!(s.active_on_client(0), 0);
    }

    #[test]
    fn a_single_client_takes_jobs_ahead_of_its_slots_and_no_more() {
        let mut s = single(10, 10, Some(2));
        s.set_client_capacity(
            0,
            Some(Capacity {
                cores: 2,
                memory_mb: 4096,
                gpus: 1,
            }),
        );
        s.set_send_ahead(0, 1);
        for j in 1..=5 {
            s.enqueue(0, 7, j, Ask::default());
        }
        // Two fill the slots, one more waits in the client's own queue.
        assert_eq!(jobs(&s.decide()), vec![1, 2, 3]);
        assert!(s.decide().is_empty(), "one ahead at most");
        assert_eq!(s.active_on_client(0), 3);
        // Job 1 ended there: job 3 takes its slot on the client, job 4 goes ahead.
        assert!(s.leave_client(1));
        assert_eq!(jobs(&s.decide()), vec![4]);
        assert!(s.decide().is_empty());
        assert!(s.leave_client(2) && s.leave_client(3) && s.leave_client(4));
        assert_eq!(jobs(&s.decide()), vec![5]);
        assert_eq!(s.active_on_client(0), 1);
    }

    #[test]
    fn no_job_goes_ahead_that_could_take_more_than_a_freed_slot_gives() {
        let capacity = Capacity {
            cores: 4,
            memory_mb: 4096,
            gpus: 1,
        };
        let asks = [
            cores(2),
            Ask {
                memory_mb: 100,
                ..Ask::default()
            },
            Ask {
                gpus: 1,
                ..Ask::default()
            },
        ];
        for ask in asks {
            let mut s = single(10, 10, Some(1));
            s.set_client_capacity(0, Some(capacity));
            s.set_send_ahead(0, 2);
            s.enqueue(0, 7, 1, Ask::default());
            s.enqueue(0, 7, 2, ask);
            assert_eq!(jobs(&s.decide()), vec![1], "{ask:?}");
            assert!(s.decide().is_empty(), "{ask:?} waits on the server");
            assert!(s.leave_client(1));
            assert_eq!(jobs(&s.decide()), vec![2], "{ask:?}");
        }
    }

    #[test]
    fn no_job_goes_ahead_to_a_client_held_for_a_starving_one() {
        let mut s = single(10, 10, Some(1));
        s.set_client_capacity(
            0,
            Some(Capacity {
                cores: 2,
                memory_mb: 0,
                gpus: 0,
            }),
        );
        s.set_send_ahead(0, 1);
        s.set_reserve_after(0, Some(60.0));
        s.set_time(0.0);
        s.enqueue(0, 1, 1, Ask::default());
        s.enqueue(0, 2, 2, cores(2));
        assert_eq!(jobs(&s.decide()), vec![1], "two cores never go ahead");
        // Past the bound the client is held for job 2: job 3 would go ahead but for that.
        s.set_time(61.0);
        s.enqueue(0, 3, 3, Ask::default());
        assert!(s.decide().is_empty());
        assert_eq!(s.reserved_client(2), Some(0));
        assert!(s.leave_client(1) && s.finish(1));
        // The held job goes once the client is empty, and job 3 goes ahead behind it.
        assert_eq!(jobs(&s.decide()), vec![2, 3]);
    }

    #[test]
    fn jobs_go_ahead_only_to_a_lone_healthy_client() {
        // Two healthy clients: a job queued behind a long run on one would wait while the
        // other idles, so none goes ahead.
        let mut s = Scheduler::new();
        let (a, b) = (s.add_client(), s.add_client());
        s.set_client(a, true, Some(1), 0.0);
        s.set_client(b, true, Some(1), 0.0);
        let service = s.add_service(10, 10, vec![a, b]);
        s.set_send_ahead(service, 1);
        for j in 1..=4 {
            s.enqueue(service, 7, j, Ask::default());
        }
        assert_eq!(jobs(&s.decide()).len(), 2);
        assert!(s.decide().is_empty());
        // One of them goes away: the other is now alone and takes one ahead.
        s.set_client(b, false, Some(1), 0.0);
        assert_eq!(jobs(&s.decide()), vec![3]);
        assert_eq!(s.active_on_client(a), 2);
        // Not set: nothing goes ahead.
        let mut s = single(10, 10, Some(1));
        s.enqueue(0, 7, 1, Ask::default());
        s.enqueue(0, 7, 2, Ask::default());
        assert_eq!(jobs(&s.decide()), vec![1]);
        assert!(s.decide().is_empty());
    }

    /// One service with one healthy client of `slots` slots.
    fn single(runs_per_user: usize, max_runs: usize, slots: Option<usize>) -> Scheduler {
        let mut s = Scheduler::new();
        let c = s.add_client();
        s.set_client(c, true, slots, 0.0);
        s.add_service(runs_per_user, max_runs, vec![c]);
        s
    }

    fn jobs(decisions: &[Decision]) -> Vec<JobId> {
        decisions.iter().map(|d| d.job).collect()
    }

    #[test]
    fn reference_quota_example() {
        // runs_per_user 3, max_runs 5, two users with four jobs each: 3 + 2 run, 3 wait.
        let mut s = single(3, 5, Some(100));
        for job in 1..=4 {
            s.enqueue(0, 1, job, Ask::default());
        }
        for job in 11..=14 {
            s.enqueue(0, 2, job, Ask::default());
        }
        let first = s.decide();
        assert_eq!(jobs(&first), [1, 11, 2, 12, 3]);
        assert_eq!(s.active_of_user(0, 1), 3);
        assert_eq!(s.active_of_user(0, 2), 2);
        assert_eq!(s.queued(0), 3);
        assert!(
            s.decide().is_empty(),
            "nothing more while the quotas are full"
        );

        // User 2 finishes one: the service has a free run; user 1 is at quota, so user 2 goes.
        s.finish(11);
        assert_eq!(jobs(&s.decide()), [13]);
        // User 1 finishes one: user 2 was waiting in the ring first, so its turn comes first.
        s.finish(1);
        assert_eq!(jobs(&s.decide()), [14]);
        s.finish(2);
        assert_eq!(jobs(&s.decide()), [4]);
        assert_eq!(s.queued(0), 0);
        for job in [3, 4, 12, 13, 14] {
            assert!(s.finish(job));
        }
        assert_eq!(s.active(0), 0);
        assert!(!s.finish(3), "finishing twice is harmless");
    }

    #[test]
    fn prepared_on_the_client_still_counts() {
        // Dispatched jobs count until finish() whatever the client says (Prepared included):
        // a user with a limit of 5 never has more than 5 dispatched.
        let mut s = single(5, 100, None);
        for job in 1..=8 {
            s.enqueue(0, 7, job, Ask::default());
        }
        assert_eq!(s.decide().len(), 5);
        assert!(s.decide().is_empty());
    }

    #[test]
    fn round_robin_across_users_fifo_within() {
        let mut s = single(10, 1, Some(10));
        for job in 1..=3 {
            s.enqueue(0, 100, job, Ask::default());
        }
        for job in 11..=13 {
            s.enqueue(0, 200, job, Ask::default());
        }
        for job in 21..=23 {
            s.enqueue(0, 300, job, Ask::default());
        }
        let mut order = Vec::new();
        loop {
            let d = s.decide();
            if d.is_empty() {
                break;
            }
            assert_eq!(d.len(), 1, "max_runs 1");
            order.push(d[0].job);
            s.finish(d[0].job);
        }
        assert_eq!(order, [1, 11, 21, 2, 12, 22, 3, 13, 23]);
    }

    #[test]
    fn a_user_arriving_late_gets_the_next_turn() {
        let mut s = single(10, 1, Some(10));
        for job in 1..=5 {
            s.enqueue(0, 1, job, Ask::default());
        }
        assert_eq!(jobs(&s.decide()), [1]);
        s.enqueue(0, 2, 50, Ask::default());
        s.finish(1);
        assert_eq!(jobs(&s.decide()), [2]);
        s.finish(2);
        assert_eq!(jobs(&s.decide()), [50]);
    }

    #[test]
    fn blocked_user_returns_when_a_job_finishes() {
        let mut s = single(1, 10, Some(10));
        for job in 1..=3 {
            s.enqueue(0, 1, job, Ask::default());
        }
        assert_eq!(jobs(&s.decide()), [1]);
        assert!(s.decide().is_empty());
        s.finish(1);
        assert_eq!(jobs(&s.decide()), [2]);
    }

    #[test]
    fn requeued_job_keeps_its_place_and_frees_its_slot() {
        let mut s = single(10, 10, Some(1));
        for job in 1..=3 {
            s.enqueue(0, 1, job, Ask::default());
        }
        assert_eq!(jobs(&s.decide()), [1]);
        assert!(s.requeue(1));
        assert_eq!(s.active_on_client(0), 0);
        assert_eq!(jobs(&s.decide()), [1]);
    }

    #[test]
    fn cancelled_queued_jobs_are_skipped() {
        let mut s = single(10, 10, Some(10));
        s.enqueue(0, 1, 1, Ask::default());
        s.enqueue(0, 2, 2, Ask::default());
        s.enqueue(0, 2, 3, Ask::default());
        assert!(s.remove_queued(0, 1, 1));
        assert!(!s.remove_queued(0, 1, 1));
        assert!(s.remove_queued(0, 2, 2));
        assert_eq!(jobs(&s.decide()), [3]);
        // The emptied user can queue again and is not counted twice in the ring.
        s.enqueue(0, 1, 4, Ask::default());
        s.enqueue(0, 1, 5, Ask::default());
        assert_eq!(jobs(&s.decide()), [4, 5]);
    }

    #[test]
    fn placement_prefers_most_free_slots_then_lowest_load_and_skips_unhealthy() {
        let mut s = Scheduler::new();
        let a = s.add_client();
        let b = s.add_client();
        let c = s.add_client();
        s.set_client(a, true, Some(2), 10.0);
        s.set_client(b, true, Some(2), 5.0);
        s.set_client(c, false, Some(8), 0.0);
        s.add_service(100, 100, vec![a, b, c]);
        for job in 1..=6 {
            s.enqueue(0, 1, job, Ask::default());
        }
        let d = s.decide();
        let clients: Vec<_> = d.iter().map(|d| d.client).collect();
        // b first (same free slots, lower load), then alternate; c is unhealthy; 4 slots in all.
        assert_eq!(clients, [b, a, b, a]);
        assert_eq!(s.queued(0), 2);
        s.set_client_health(c, true);
        assert_eq!(s.decide().iter().filter(|d| d.client == c).count(), 2);
    }

    #[test]
    fn no_healthy_client_means_no_decision() {
        let mut s = single(5, 5, None);
        s.set_client_health(0, false);
        s.enqueue(0, 1, 1, Ask::default());
        assert!(s.decide().is_empty());
        s.set_client_health(0, true);
        assert_eq!(jobs(&s.decide()), [1]);
    }

    #[test]
    fn a_client_without_slots_is_limited_by_the_service_quota() {
        let mut s = single(100, 4, None);
        for job in 1..=10 {
            s.enqueue(0, 1, job, Ask::default());
        }
        assert_eq!(s.decide().len(), 4);
    }

    #[test]
    fn activated_jobs_count_against_quotas() {
        let mut s = single(2, 10, Some(10));
        s.activate(0, 1, 100, Some(0), Ask::default());
        s.activate(0, 1, 101, None, Ask::default());
        s.enqueue(0, 1, 1, Ask::default());
        assert!(s.decide().is_empty());
        s.finish(101);
        assert_eq!(jobs(&s.decide()), [1]);
    }

    #[test]
    fn shared_client_capacity_across_services() {
        let mut s = Scheduler::new();
        let c = s.add_client();
        s.set_client(c, true, Some(3), 0.0);
        s.add_service(10, 10, vec![c]);
        s.add_service(10, 10, vec![c]);
        s.enqueue(0, 1, 1, Ask::default());
        s.enqueue(0, 1, 2, Ask::default());
        s.enqueue(1, 1, 3, Ask::default());
        s.enqueue(1, 1, 4, Ask::default());
        assert_eq!(s.decide().len(), 3);
    }

    #[test]
    fn many_queued_jobs_all_go_through_in_order() {
        // 100,000 queued jobs from 1,000 users: all dispatched, each user's in FIFO order.
        // (How long a decision takes is the benchmark's, BENCHMARKS.md row 6: a timed
        // assertion here failed on a loaded machine.)
        let mut s = single(2, 50, Some(50));
        for i in 0..100_000 {
            s.enqueue(0, i % 1000, i, Ask::default());
        }
        let mut dispatched = 0;
        let mut last_of_user: HashMap<UserId, JobId> = HashMap::new();
        for _ in 0..2_000 {
            let d = s.decide();
            dispatched += d.len();
            for decision in d {
                if let Some(before) = last_of_user.insert(decision.user, decision.job) {
                    assert!(before < decision.job, "user {} out of order", decision.user);
                }
                s.finish(decision.job);
            }
        }
        assert_eq!(dispatched, 100_000);
        assert_eq!(s.queued(0), 0);
    }

    #[test]
    fn fairness_holds_with_many_users() {
        let mut s = single(1, 10, Some(10));
        for i in 0..1000 {
            s.enqueue(0, i % 100, i, Ask::default());
        }
        let mut seen_by_user: HashMap<UserId, Vec<JobId>> = HashMap::new();
        let mut rounds = 0;
        while s.queued(0) > 0 {
            let d = s.decide();
            // Ten running at most, one per user.
            let users: HashSet<_> = d.iter().map(|d| d.user).collect();
            assert_eq!(users.len(), d.len());
            for decision in &d {
                seen_by_user
                    .entry(decision.user)
                    .or_default()
                    .push(decision.job);
            }
            for decision in d {
                s.finish(decision.job);
            }
            rounds += 1;
        }
        assert_eq!(rounds, 100);
        for (user, jobs) in seen_by_user {
            let expected: Vec<_> = (0..10).map(|k| user + 100 * k).collect();
            assert_eq!(jobs, expected, "FIFO for user {user}");
        }
    }

    /// A small deterministic pseudo-random generator (no dependency needed).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn random_operations_keep_every_invariant() {
        for seed in 0..40 {
            let mut rng = Lcg(seed);
            let mut s = Scheduler::new();
            let clients: Vec<_> = (0..3).map(|_| s.add_client()).collect();
            let slots = [Some(2), Some(3), None];
            for (c, n) in clients.iter().zip(slots) {
                s.set_client(*c, true, n, 0.0);
            }
            let rpu = 1 + rng.below(3) as usize;
            let max = 1 + rng.below(6) as usize;
            s.add_service(rpu, max, clients.clone());
            // The model: queued jobs per user in order, and active jobs with their client.
            let mut queued: HashMap<UserId, VecDeque<JobId>> = HashMap::new();
            let mut active: HashMap<JobId, (UserId, ClientId)> = HashMap::new();
            let mut next = 1;
            for _ in 0..3000 {
                match rng.below(10) {
                    0..=3 => {
                        let user = rng.below(5) as i64;
                        s.enqueue(0, user, next, Ask::default());
                        queued.entry(user).or_default().push_back(next);
                        next += 1;
                    }
                    4..=5 if !active.is_empty() => {
                        let job = *active
                            .keys()
                            .nth(rng.below(active.len() as u64) as usize)
                            .unwrap();
                        let (user, _) = active.remove(&job).unwrap();
                        if rng.below(4) == 0 {
                            assert!(s.requeue(job));
                            queued.entry(user).or_default().push_front(job);
                        } else {
                            assert!(s.finish(job));
                        }
                    }
                    6 => {
                        let user = rng.below(5) as i64;
                        if let Some(job) = queued.get(&user).and_then(|q| q.back().copied()) {
                            assert!(s.remove_queued(0, user, job));
                            queued.get_mut(&user).unwrap().pop_back();
                        }
                    }
                    7 => {
                        let c = clients[rng.below(3) as usize];
                        let healthy = rng.below(3) != 0;
                        s.set_client_health(c, healthy);
                    }
                    _ => {}
                }
                for d in s.decide() {
                    // FIFO: the job is the first of its user's queue.
                    let q = queued.get_mut(&d.user).expect("user had queued jobs");
                    assert_eq!(q.pop_front(), Some(d.job), "FIFO within a user");
                    assert!(s.client_healthy(d.client));
                    assert!(active.insert(d.job, (d.user, d.client)).is_none());
                }
                queued.retain(|_, q| !q.is_empty());
                // Quotas and capacities hold.
                assert!(active.len() <= max);
                let mut per_user: HashMap<UserId, usize> = HashMap::new();
                let mut per_client: HashMap<ClientId, usize> = HashMap::new();
                for (user, client) in active.values() {
                    *per_user.entry(*user).or_default() += 1;
                    *per_client.entry(*client).or_default() += 1;
                }
                assert!(per_user.values().all(|n| *n <= rpu));
                for (c, n) in clients.iter().zip(slots) {
                    let used = per_client.get(c).copied().unwrap_or(0);
                    assert!(used <= n.unwrap_or(max));
                    assert_eq!(s.active_on_client(*c), used);
                }
                // Work-conserving: nothing waits that could run.
                let free_client = clients.iter().zip(slots).any(|(c, n)| {
                    s.client_healthy(*c)
                        && per_client.get(c).copied().unwrap_or(0) < n.unwrap_or(max)
                });
                let runnable_user = queued
                    .keys()
                    .any(|u| per_user.get(u).copied().unwrap_or(0) < rpu);
                assert!(
                    !(active.len() < max && free_client && runnable_user),
                    "a job could run but waits (seed {seed})"
                );
                assert_eq!(
                    s.queued(0),
                    queued.values().map(VecDeque::len).sum::<usize>()
                );
            }
        }
    }

    fn cores(n: u32) -> Ask {
        Ask {
            cores: n,
            ..Ask::default()
        }
    }

    fn with_capacity(s: &mut Scheduler, cores: u32, memory_mb: u64, gpus: u32) -> ClientId {
        let c = s.add_client();
        s.set_client(c, true, Some(100), 0.0);
        s.set_client_capacity(
            c,
            Some(Capacity {
                cores,
                memory_mb,
                gpus,
            }),
        );
        c
    }

    #[test]
    fn mixed_sizes_pack_without_ever_exceeding_a_client() {
        let mut s = Scheduler::new();
        let big = with_capacity(&mut s, 8, 16_384, 0);
        let small = with_capacity(&mut s, 2, 4_096, 0);
        s.add_service(100, 100, vec![big, small]);
        let mut rng = Lcg(7);
        let mut asks = HashMap::new();
        for job in 0..200 {
            let ask = Ask {
                cores: if rng.below(3) == 0 { 4 } else { 1 },
                memory_mb: 512 * rng.below(4),
                ..Ask::default()
            };
            asks.insert(job, ask);
            s.enqueue(0, rng.below(4) as i64, job, ask);
        }
        let mut running: Vec<Decision> = Vec::new();
        let mut done = 0;
        while done < 200 {
            running.extend(s.decide());
            for c in [big, small] {
                let (cores, memory) = running
                    .iter()
                    .filter(|d| d.client == c)
                    .fold((0, 0), |(n, m), d| {
                        (n + asks[&d.job].cores, m + asks[&d.job].memory_mb)
                    });
                let cap = s.client_capacity(c).unwrap();
                assert!(cores <= cap.cores && memory <= cap.memory_mb);
                assert_eq!(s.client_used(c).cores, cores);
            }
            assert!(!running.is_empty(), "something always runs");
            let d = running.remove(rng.below(running.len() as u64) as usize);
            assert!(s.finish(d.job));
            done += 1;
        }
        assert_eq!(s.client_used(big), Capacity::default());
        assert_eq!(s.client_used(small), Capacity::default());
        assert_eq!(s.queued(0), 0);
    }

    #[test]
    fn gpus_and_memory_count_like_cores() {
        let mut s = Scheduler::new();
        let c = with_capacity(&mut s, 16, 8_192, 2);
        s.add_service(100, 100, vec![c]);
        let gpu = Ask {
            gpus: 1,
            ..Ask::default()
        };
        for job in 1..=3 {
            s.enqueue(0, job, job, gpu);
        }
        assert_eq!(jobs(&s.decide()), [1, 2], "two GPUs, two jobs");
        let fat = Ask {
            memory_mb: 6_000,
            ..Ask::default()
        };
        s.enqueue(0, 10, 10, fat);
        s.enqueue(0, 11, 11, fat);
        assert_eq!(jobs(&s.decide()), [10], "8 GiB hold one 6,000 MiB job");
        s.finish(1);
        assert_eq!(jobs(&s.decide()), [3]);
    }

    #[test]
    fn jobs_found_running_at_start_count_once_their_client_says_what_it_has() {
        let mut s = Scheduler::new();
        let c = s.add_client();
        s.set_client(c, true, Some(100), 0.0);
        s.add_service(100, 100, vec![c]);
        // Recovered before the first probe: the client's resources are not known yet.
        s.activate(0, 1, 1, Some(c), cores(6));
        s.set_client_capacity(
            c,
            Some(Capacity {
                cores: 8,
                memory_mb: 0,
                gpus: 0,
            }),
        );
        assert_eq!(s.client_used(c).cores, 6);
        s.enqueue(0, 2, 2, cores(4));
        s.enqueue(0, 3, 3, cores(2));
        assert_eq!(
            jobs(&s.decide()),
            [3],
            "6 of 8 cores taken: the 4-core job waits"
        );
        assert!(s.finish(1));
        assert_eq!(jobs(&s.decide()), [2]);
        assert!(s.finish(2) && s.finish(3));
        assert_eq!(s.client_used(c), Capacity::default());
    }

    #[test]
    fn higher_priority_first_then_first_in_first_out() {
        let mut s = single(1, 1, Some(1));
        let at = |priority| Ask {
            priority,
            ..Ask::default()
        };
        s.enqueue(0, 1, 1, at(0));
        s.enqueue(0, 1, 2, at(5));
        s.enqueue(0, 1, 3, at(0));
        s.enqueue(0, 1, 4, at(5));
        s.enqueue(0, 1, 5, at(-1));
        let mut order = Vec::new();
        while s.queued(0) > 0 {
            let d = s.decide();
            assert_eq!(d.len(), 1);
            order.push(d[0].job);
            s.finish(d[0].job);
        }
        assert_eq!(order, [2, 4, 1, 3, 5]);
        // A job queued again goes first among its priority, not above a higher one.
        s.enqueue(0, 1, 6, at(1));
        s.enqueue(0, 1, 7, at(0));
        s.enqueue(0, 1, 8, at(0));
        assert_eq!(jobs(&s.decide()), [6]);
        s.finish(6);
        assert_eq!(jobs(&s.decide()), [7]);
        assert!(s.requeue(7));
        assert_eq!(jobs(&s.decide()), [7]);
    }

    #[test]
    fn a_user_whose_job_fits_nowhere_now_does_not_block_other_users() {
        let mut s = Scheduler::new();
        let c = with_capacity(&mut s, 4, 0, 0);
        s.add_service(100, 100, vec![c]);
        s.enqueue(0, 1, 1, cores(3));
        assert_eq!(jobs(&s.decide()), [1]);
        // User 2's next job needs 4 cores, only 1 is free: users 3 and 4 go past it.
        s.enqueue(0, 2, 20, cores(4));
        s.enqueue(0, 3, 30, cores(1));
        assert_eq!(jobs(&s.decide()), [30]);
        s.finish(30);
        s.enqueue(0, 4, 40, cores(1));
        assert_eq!(jobs(&s.decide()), [40]);
        assert_eq!(
            s.waiting_for(20).map(|w| w.reason),
            Some("no_free_resources")
        );
        s.finish(40);
        s.finish(1);
        assert_eq!(jobs(&s.decide()), [20], "room freed: the big job runs");
    }

    #[test]
    fn a_job_no_client_could_ever_hold_is_named_with_the_largest_client() {
        let mut s = Scheduler::new();
        let a = with_capacity(&mut s, 16, 65_536, 0);
        let b = with_capacity(&mut s, 4, 8_192, 2);
        s.set_client_label(a, "http://big:9000");
        s.add_service(10, 10, vec![a, b]);
        assert_eq!(s.never_fits(0, "docking", &cores(16)), None);
        assert_eq!(
            s.never_fits(0, "docking", &cores(64)).as_deref(),
            Some("needs 64 cores; the largest client of service docking (http://big:9000) has 16")
        );
        let gpu = Ask {
            cores: 8,
            gpus: 1,
            ..Ask::default()
        };
        let why = s
            .never_fits(0, "docking", &gpu)
            .expect("8 cores and a GPU: none has both");
        assert!(
            why.contains("needs 1 GPU") && why.contains("has 0 GPUs"),
            "{why}"
        );
        // A client that does not advertise its resources might hold anything.
        let unknown = s.add_client();
        s.add_service(10, 10, vec![a, unknown]);
        assert_eq!(s.never_fits(1, "x", &cores(64)), None);
    }

    #[test]
    fn every_waiting_reason_is_explained() {
        let mut s = Scheduler::new();
        let c = with_capacity(&mut s, 4, 4_096, 0);
        s.set_client_label(c, "http://c:9000");
        s.add_service(2, 3, vec![c]);
        // No healthy client.
        s.set_client_health(c, false);
        s.enqueue(0, 1, 1, cores(1));
        let w = s.waiting_for(1).unwrap();
        assert_eq!(w.reason, "no_healthy_client", "{}", w.message);
        s.set_client_health(c, true);
        // Its turn comes next: nothing decided yet.
        assert_eq!(s.waiting_for(1).unwrap().reason, "next_turn");
        s.enqueue(0, 1, 2, cores(1));
        s.enqueue(0, 1, 3, cores(1));
        // Behind its own user's jobs.
        let w = s.waiting_for(3).unwrap();
        assert_eq!(w.reason, "behind_own_jobs");
        assert_eq!(w.message, "behind 2 earlier jobs of user 1");
        assert_eq!(jobs(&s.decide()), [1, 2]);
        // The user is at runs_per_user.
        let w = s.waiting_for(3).unwrap();
        assert_eq!(w.reason, "user_quota");
        assert_eq!(w.message, "user 1 is at runs_per_user (2 of 2 running)");
        // The service at max_runs.
        s.enqueue(0, 2, 20, cores(1));
        s.enqueue(0, 3, 30, cores(1));
        assert_eq!(jobs(&s.decide()), [20]);
        let w = s.waiting_for(30).unwrap();
        assert_eq!(w.reason, "service_quota");
        assert_eq!(w.message, "the service is at max_runs (3 of 3 running)");
        // No client with the free resources: 2 cores free, 4 asked.
        s.finish(20);
        s.finish(2);
        assert!(s.remove_queued(0, 3, 30) && s.remove_queued(0, 1, 3));
        s.enqueue(0, 3, 31, cores(4));
        s.enqueue(0, 4, 40, cores(1));
        assert_eq!(jobs(&s.decide()), [40]);
        let w = s.waiting_for(31).unwrap();
        assert_eq!(w.reason, "no_free_resources");
        assert_eq!(
            w.message,
            "no client has 4 cores free now; the most free on any is 2 cores, 4096 MiB and 0 GPUs on http://c:9000"
        );
        assert_eq!(s.waiting_for(40), None, "not queued: running");
    }

    #[test]
    fn random_operations_with_resources_keep_every_invariant() {
        for seed in 0..30 {
            let mut rng = Lcg(seed + 1000);
            let mut s = Scheduler::new();
            let caps = [(8, 8_192, 2), (2, 2_048, 0), (4, 4_096, 1)];
            let clients: Vec<_> = caps
                .iter()
                .map(|&(c, m, g)| with_capacity(&mut s, c, m, g))
                .collect();
            let rpu = 1 + rng.below(4) as usize;
            let max = 2 + rng.below(10) as usize;
            s.add_service(rpu, max, clients.clone());
            let mut queued: HashMap<UserId, Vec<(JobId, Ask, i64)>> = HashMap::new();
            let mut active: HashMap<JobId, (UserId, ClientId, Ask)> = HashMap::new();
            let mut seq = 0;
            for step in 0..2000 {
                match rng.below(10) {
                    0..=3 => {
                        let user = rng.below(4) as i64;
                        let ask = Ask {
                            cores: [1, 1, 2, 4][rng.below(4) as usize],
                            memory_mb: 1024 * rng.below(3),
                            gpus: u32::from(rng.below(5) == 0),
                            priority: rng.below(3) as i64,
                        };
                        seq += 1;
                        s.enqueue(0, user, step, ask);
                        queued.entry(user).or_default().push((step, ask, seq));
                    }
                    4..=6 if !active.is_empty() => {
                        let job = *active
                            .keys()
                            .nth(rng.below(active.len() as u64) as usize)
                            .unwrap();
                        active.remove(&job);
                        assert!(s.finish(job));
                    }
                    7 => {
                        let c = clients[rng.below(3) as usize];
                        s.set_client_health(c, rng.below(3) != 0);
                    }
                    _ => {}
                }
                for d in s.decide() {
                    let q = queued.get_mut(&d.user).expect("user had queued jobs");
                    // The user's first job: highest priority, then earliest.
                    let first = q
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, ask, seq))| (Reverse(ask.priority), *seq))
                        .map(|(i, _)| i)
                        .unwrap();
                    let (job, ask, _) = q.remove(first);
                    assert_eq!(job, d.job, "priority, then FIFO (seed {seed})");
                    assert!(s.client_healthy(d.client));
                    active.insert(job, (d.user, d.client, ask));
                }
                queued.retain(|_, q| !q.is_empty());
                assert!(active.len() <= max);
                let mut per_user: HashMap<UserId, usize> = HashMap::new();
                let mut used: HashMap<ClientId, (u32, u64, u32)> = HashMap::new();
                for (user, client, ask) in active.values() {
                    *per_user.entry(*user).or_default() += 1;
                    let u = used.entry(*client).or_default();
                    u.0 += ask.cores;
                    u.1 += ask.memory_mb;
                    u.2 += ask.gpus;
                }
                assert!(per_user.values().all(|n| *n <= rpu));
                for (c, &(cores, memory, gpus)) in clients.iter().zip(&caps) {
                    let u = used.get(c).copied().unwrap_or_default();
                    assert!(
                        u.0 <= cores && u.1 <= memory && u.2 <= gpus,
                        "over client {c}"
                    );
                }
                // Work-conserving: no user under quota has a first job that fits somewhere.
                if active.len() < max {
                    for (user, q) in &queued {
                        if per_user.get(user).copied().unwrap_or(0) >= rpu {
                            continue;
                        }
                        let (_, ask, _) = q
                            .iter()
                            .min_by_key(|(_, ask, seq)| (Reverse(ask.priority), *seq))
                            .unwrap();
                        for (c, &(cores, memory, gpus)) in clients.iter().zip(&caps) {
                            let u = used.get(c).copied().unwrap_or_default();
                            let fits = u.0 + ask.cores <= cores
                                && u.1 + ask.memory_mb <= memory
                                && u.2 + ask.gpus <= gpus;
                            assert!(
                                !(s.client_healthy(*c) && fits),
                                "user {user}'s job could run on {c} but waits (seed {seed})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One service with a fair-share policy (half-life 1 h) on one client of `cores` cores.
    fn fair_single(cores: u32, runs_per_user: usize, max_runs: usize) -> Scheduler {
        let mut s = Scheduler::new();
        s.set_time(1_000_000.0);
        let c = with_capacity(&mut s, cores, 0, 0);
        s.add_service(runs_per_user, max_runs, vec![c]);
        s.set_policy(0, Policy::FairShare { half_life_s: 3600 });
        s
    }

    /// Runs `decisions` decisions: every started job runs `duration(job)` seconds, time jumps
    /// to the next end. Returns the decisions in order and when each was made.
    fn simulate(
        s: &mut Scheduler,
        decisions: usize,
        mut duration: impl FnMut(&Decision) -> f64,
        mut refill: impl FnMut(&mut Scheduler, &Decision),
    ) -> Vec<(f64, Decision)> {
        let mut made = Vec::new();
        let mut ends: Vec<(f64, JobId)> = Vec::new();
        while made.len() < decisions {
            for d in s.decide() {
                ends.push((s.now() + duration(&d), d.job));
                refill(s, &d);
                made.push((s.now(), d));
            }
            ends.sort_by(|a, b| b.0.total_cmp(&a.0));
            let (at, job) = ends.pop().expect("something runs");
            s.set_time(at);
            assert!(s.finish(job));
        }
        made.truncate(decisions);
        made
    }

    #[test]
    fn fair_share_divides_the_slots_by_the_weights() {
        for (weights, durations) in [((3.0, 1.0), (10.0, 10.0)), ((1.0, 1.0), (5.0, 15.0))] {
            let mut s = fair_single(4, 100, 100);
            s.set_weight(1, weights.0);
            s.set_weight(2, weights.1);
            let mut next = 0;
            for _ in 0..50 {
                for user in [1, 2] {
                    next += 1;
                    s.enqueue(0, user, next, Ask::default());
                }
            }
            let mut rng = Lcg(3);
            let made = simulate(
                &mut s,
                2_000,
                |d| {
                    // Durations vary by a fifth around each user's mean.
                    let mean = if d.user == 1 {
                        durations.0
                    } else {
                        durations.1
                    };
                    mean * (0.9 + 0.2 * rng.below(1000) as f64 / 1000.0)
                },
                |s, d| {
                    // Each user always has jobs waiting.
                    next += 1;
                    s.enqueue(0, d.user, next, Ask::default());
                },
            );
            // Core-seconds per user follow the weights (the last half of the run, once the
            // usage that decays has built up).
            let used = |user: UserId| -> f64 {
                made[1000..]
                    .iter()
                    .filter(|(_, d)| d.user == user)
                    .map(|_| if user == 1 { durations.0 } else { durations.1 })
                    .sum()
            };
            let share = used(1) / (used(1) + used(2));
            let want = weights.0 / (weights.0 + weights.1);
            assert!(
                (share - want).abs() < 0.03,
                "user 1 had {share:.3} of the core-seconds, weights give {want:.3}"
            );
        }
    }

    #[test]
    fn fair_share_turns_follow_usage_and_old_usage_stops_counting() {
        let mut s = fair_single(1, 10, 1);
        let t0 = s.now();
        // User 1 used a lot an hour ago, user 2 a little just now.
        s.load_usage(0, 1, 100_000.0, t0 - 3600.0);
        s.load_usage(0, 2, 100.0, t0);
        s.enqueue(0, 1, 1, Ask::default());
        s.enqueue(0, 2, 2, Ask::default());
        assert_eq!(
            jobs(&s.decide()),
            [2],
            "50,000 decayed core-seconds against 100"
        );
        assert!(s.finish(2));
        s.enqueue(0, 2, 3, Ask::default());
        // Forty half-lives later both usages are decayed to almost nothing, user 1's a
        // thousandth of user 2's once user 2 ran one more second at the end.
        s.set_time(t0 + 40.0 * 3600.0);
        s.load_usage(0, 2, 1.0, t0 + 40.0 * 3600.0);
        assert!(s.usage(0, 1).unwrap().value < 1e-6);
        assert_eq!(jobs(&s.decide()), [1], "old usage no longer counts");
        // What a finished job leaves is its user's usage, to be kept.
        s.set_time(t0 + 40.0 * 3600.0 + 100.0);
        let (service, user, usage) = s.finish_with_usage(1).unwrap();
        assert_eq!((service, user), (0, 1));
        let usage = usage.expect("fair share keeps usage");
        assert!((usage.value - 100.0).abs() < 1.0, "{usage:?}");
        assert_eq!(usage.running_cores, 0);
    }

    #[test]
    fn a_user_whose_job_ended_while_waiting_is_ordered_by_their_usage_then() {
        // User 1 takes the only slot at t0 with usage 0 and waits with a second job (their
        // place was taken before the job ran); user 2 has 50 core-seconds. After 100 s the
        // job ends: user 1 has used about 100, so user 2 goes first, though the place user 1
        // got at t0 (usage 0) is ahead of user 2's.
        let mut s = fair_single(1, 10, 1);
        let t0 = s.now();
        s.load_usage(0, 2, 50.0, t0);
        s.enqueue(0, 1, 1, Ask::default());
        s.enqueue(0, 1, 2, Ask::default());
        assert_eq!(jobs(&s.decide()), [1]);
        s.enqueue(0, 2, 3, Ask::default());
        s.set_time(t0 + 100.0);
        assert!(s.finish(1));
        assert_eq!(jobs(&s.decide()), [3], "100 core-seconds against 50");
        // User 2's job runs 100 s too: user 1 (about 100) goes before user 2 (about 150).
        s.enqueue(0, 2, 4, Ask::default());
        s.set_time(t0 + 200.0);
        assert!(s.finish(3));
        assert_eq!(jobs(&s.decide()), [2]);
    }

    #[test]
    fn fair_share_counts_cores_not_jobs() {
        // User 1 runs 4-core jobs, user 2 1-core jobs, equal weights: user 2 starts about
        // four jobs for each of user 1's.
        let mut s = fair_single(8, 100, 100);
        // Without holding a client for a 4-core job, 1-core jobs would take every core that
        // frees, one by one, before four are free together.
        s.set_reserve_after(0, Some(30.0));
        let mut next = 0;
        for _ in 0..20 {
            next += 1;
            s.enqueue(0, 1, next, cores(4));
            next += 1;
            s.enqueue(0, 2, next, cores(1));
        }
        let made = simulate(
            &mut s,
            1_000,
            |_| 10.0,
            |s, d| {
                next += 1;
                s.enqueue(0, d.user, next, cores(if d.user == 1 { 4 } else { 1 }));
            },
        );
        let by = |user| made[500..].iter().filter(|(_, d)| d.user == user).count() as f64;
        let ratio = by(2) / by(1);
        assert!((3.5..=4.5).contains(&ratio), "{ratio}");
    }

    /// A client of 4 cores always busy with 1-core jobs of user 1 started at staggered
    /// times, and one 4-core job of user 2: when does the big one start?
    fn big_behind_small(reserve_after: Option<f64>) -> Option<f64> {
        let mut s = Scheduler::new();
        s.set_time(1000.0);
        let c = with_capacity(&mut s, 4, 0, 0);
        s.add_service(100, 100, vec![c]);
        s.set_reserve_after(0, reserve_after);
        let mut next = 0;
        for _ in 0..4 {
            next += 1;
            s.enqueue(0, 1, next, cores(1));
        }
        let mut ends: Vec<(f64, JobId)> = Vec::new();
        for (i, d) in s.decide().into_iter().enumerate() {
            ends.push((1000.0 + 25.0 * (i as f64 + 1.0), d.job));
        }
        s.enqueue(0, 2, 999, cores(4));
        let start = s.now();
        while s.now() < start + 5_000.0 {
            ends.sort_by(|a, b| b.0.total_cmp(&a.0));
            let Some((at, job)) = ends.pop() else {
                break;
            };
            s.set_time(at);
            s.finish(job);
            // The stream never stops: a new small job whenever one ends.
            next += 1;
            s.enqueue(0, 1, next, cores(1));
            for d in s.decide() {
                if d.job == 999 {
                    return Some(s.now() - start);
                }
                ends.push((s.now() + 100.0, d.job));
            }
            if let Some(t) = s.next_deadline() {
                // The dispatcher wakes at the deadline, even without an end.
                if ends.iter().all(|(at, _)| *at > t) {
                    s.set_time(t);
                    for d in s.decide() {
                        assert_ne!(d.job, 999, "it cannot fit at its deadline");
                        ends.push((s.now() + 100.0, d.job));
                    }
                }
            }
        }
        None
    }

    #[test]
    fn a_big_job_gets_its_client_after_waiting_longer_than_the_bound() {
        assert_eq!(big_behind_small(None), None, "without a bound it starves");
        let waited = big_behind_small(Some(600.0)).expect("it starts");
        // Held at 600 s, the running small jobs (100 s each) drain by 700 s.
        assert!((600.0..=700.0).contains(&waited), "{waited}");
    }

    #[test]
    fn a_held_client_leaves_the_other_clients_to_the_small_jobs() {
        let mut s = Scheduler::new();
        s.set_time(0.0);
        let a = with_capacity(&mut s, 4, 0, 0);
        let b = with_capacity(&mut s, 2, 0, 0);
        s.add_service(100, 100, vec![a, b]);
        s.set_reserve_after(0, Some(60.0));
        for job in 1..=5 {
            s.enqueue(0, 1, job, cores(1));
        }
        // Where the most cores are free: 1, 2, 3 and 5 on a, 4 on b.
        let first = s.decide();
        assert_eq!(
            first.iter().map(|d| d.client).collect::<Vec<_>>(),
            [a, a, a, b, a]
        );
        s.enqueue(0, 2, 100, cores(4));
        assert!(s.decide().is_empty());
        assert_eq!(
            s.waiting_for(100).map(|w| w.reason),
            Some("no_free_resources")
        );
        s.set_time(61.0);
        s.enqueue(0, 1, 6, cores(1));
        // a is held for job 100; b still takes small jobs.
        let d = s.decide();
        assert_eq!(s.reserved_client(100), Some(a));
        assert_eq!(
            d.iter().map(|d| (d.job, d.client)).collect::<Vec<_>>(),
            [(6, b)]
        );
        let w = s.waiting_for(100).unwrap();
        assert_eq!(w.reason, "reserved", "{}", w.message);
        // a drains: a small job that ends there is not replaced by another.
        s.enqueue(0, 1, 7, cores(1));
        for job in [1, 2, 3, 5] {
            assert!(s.finish(job));
            let d = s.decide();
            assert!(d.iter().all(|d| d.client != a || d.job == 100), "{d:?}");
            if job == 5 {
                assert_eq!(jobs(&d), [100], "the big job fits once a is empty");
            }
        }
        assert_eq!(s.reserved_client(100), None);
        // The hold is gone with it: small jobs go to a again once it ends.
        assert!(s.finish(100) && s.finish(4));
        assert_eq!(s.decide().iter().map(|d| d.job).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn random_operations_with_fair_share_keep_every_invariant() {
        for seed in 0..30 {
            let mut rng = Lcg(seed + 5000);
            let mut s = Scheduler::new();
            s.set_time(1e9);
            let caps = [(8, 8_192, 2), (2, 2_048, 0), (4, 4_096, 1)];
            let clients: Vec<_> = caps
                .iter()
                .map(|&(c, m, g)| with_capacity(&mut s, c, m, g))
                .collect();
            let rpu = 1 + rng.below(4) as usize;
            let max = 2 + rng.below(10) as usize;
            let half_life_s = 60 + rng.below(600);
            s.add_service(rpu, max, clients.clone());
            s.set_policy(0, Policy::FairShare { half_life_s });
            let half_life = half_life_s as f64;
            let weights = [1.0, 2.0, 3.0, 0.5];
            for (user, w) in weights.iter().enumerate() {
                s.set_weight(user as i64, *w);
            }
            // The model: queued jobs, active jobs, each user's decayed usage.
            let mut queued: HashMap<UserId, Vec<(JobId, Ask, i64)>> = HashMap::new();
            let mut active: HashMap<JobId, (UserId, ClientId, Ask)> = HashMap::new();
            let mut usage: HashMap<UserId, Decayed> = HashMap::new();
            let mut seq = 0;
            for step in 0..2000 {
                match rng.below(10) {
                    0..=3 => {
                        let user = rng.below(4) as i64;
                        let ask = Ask {
                            cores: [1, 1, 2, 4][rng.below(4) as usize],
                            memory_mb: 1024 * rng.below(3),
                            gpus: u32::from(rng.below(5) == 0),
                            priority: rng.below(3) as i64,
                        };
                        seq += 1;
                        s.enqueue(0, user, step, ask);
                        queued.entry(user).or_default().push((step, ask, seq));
                    }
                    4..=5 if !active.is_empty() => {
                        let job = *active
                            .keys()
                            .nth(rng.below(active.len() as u64) as usize)
                            .unwrap();
                        let (user, _, ask) = active.remove(&job).unwrap();
                        let u = usage.get_mut(&user).unwrap();
                        u.advance(s.now(), half_life);
                        u.running_cores -= u64::from(ask.cores);
                        assert!(s.finish(job));
                    }
                    6 => {
                        let c = clients[rng.below(3) as usize];
                        s.set_client_health(c, rng.below(4) != 0);
                    }
                    _ => s.set_time(s.now() + rng.below(120) as f64),
                }
                let now = s.now();
                let key = |usage: &HashMap<UserId, Decayed>, user: UserId| {
                    usage.get(&user).map_or(0.0, |u| u.value_at(now, half_life))
                        / weights[user as usize]
                };
                let mut last_key = f64::NEG_INFINITY;
                for d in s.decide() {
                    let q = queued.get_mut(&d.user).expect("user had queued jobs");
                    let first = q
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, ask, seq))| (Reverse(ask.priority), *seq))
                        .map(|(i, _)| i)
                        .unwrap();
                    let (job, ask, _) = q.remove(first);
                    assert_eq!(job, d.job, "priority, then FIFO (seed {seed})");
                    assert!(s.client_healthy(d.client));
                    // Within one decision round the users served go by usage / weight
                    // (a round happens at one instant, so no usage changes inside it).
                    let k = key(&usage, d.user);
                    assert!(
                        k >= last_key * (1.0 - 1e-9) - 1e-9,
                        "user {} ({k}) served after a user of usage {last_key} (seed {seed})",
                        d.user
                    );
                    last_key = k;
                    let u = usage.entry(d.user).or_insert(Decayed::at(0.0, now));
                    u.advance(now, half_life);
                    u.running_cores += u64::from(ask.cores);
                    active.insert(job, (d.user, d.client, ask));
                }
                queued.retain(|_, q| !q.is_empty());
                for (user, u) in &usage {
                    let got = s.usage(0, *user).unwrap().value;
                    let want = u.value_at(now, half_life);
                    assert!(
                        (got - want).abs() <= 1e-6 * want.max(1.0),
                        "usage of {user}"
                    );
                }
                assert!(active.len() <= max);
                let mut per_user: HashMap<UserId, usize> = HashMap::new();
                let mut used: HashMap<ClientId, (u32, u64, u32)> = HashMap::new();
                for (user, client, ask) in active.values() {
                    *per_user.entry(*user).or_default() += 1;
                    let u = used.entry(*client).or_default();
                    u.0 += ask.cores;
                    u.1 += ask.memory_mb;
                    u.2 += ask.gpus;
                }
                assert!(per_user.values().all(|n| *n <= rpu));
                for (c, &(cores, memory, gpus)) in clients.iter().zip(&caps) {
                    let u = used.get(c).copied().unwrap_or_default();
                    assert!(u.0 <= cores && u.1 <= memory && u.2 <= gpus, "over {c}");
                }
                if active.len() < max {
                    for (user, q) in &queued {
                        if per_user.get(user).copied().unwrap_or(0) >= rpu {
                            continue;
                        }
                        let (_, ask, _) = q
                            .iter()
                            .min_by_key(|(_, ask, seq)| (Reverse(ask.priority), *seq))
                            .unwrap();
                        for (c, &(cores, memory, gpus)) in clients.iter().zip(&caps) {
                            let u = used.get(c).copied().unwrap_or_default();
                            let fits = u.0 + ask.cores <= cores
                                && u.1 + ask.memory_mb <= memory
                                && u.2 + ask.gpus <= gpus;
                            assert!(
                                !(s.client_healthy(*c) && fits),
                                "user {user}'s job could run on {c} but waits (seed {seed})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The fair-share order's lazy heap against brute force: after random turns, cores that
    /// start and stop, usage loaded (up and down), time passing and re-bases, every user it
    /// takes has a turn (a stale entry is never chosen) and is the least of every user with
    /// a turn by (key now, when last served, user); each user with a turn has exactly one
    /// entry that counts, and that entry's key is at most the user's key now.
    #[test]
    fn the_fair_share_heap_takes_the_least_key_and_never_a_stale_entry() {
        let mut compacted = 0;
        for seed in 0..40 {
            let mut rng = Lcg(seed + 9000);
            let half_life = 30.0 + rng.below(300) as f64;
            let mut now = 1e9;
            let mut fair = Fair::new(half_life, now);
            let mut users: super::HashMap<UserId, UserState> = Default::default();
            let n = 2 + rng.below(60) as i64;
            let mut taken = 0;
            for _ in 0..3000 {
                let user = rng.below(n as u64) as i64;
                match rng.below(12) {
                    0..=2 => {
                        let u = users.entry(user).or_default();
                        if u.fair.turn.is_none() {
                            u.fair.weight = [1.0, 2.0, 0.5][rng.below(3) as usize];
                            fair.push(&mut u.fair, user, now);
                        }
                    }
                    3 | 4 => {
                        let u = &mut users.entry(user).or_default().fair;
                        let running = u.usage.map_or(0, |d| d.running_cores);
                        let cores = 1 + rng.below(4) as u32;
                        let starts = running == 0 || rng.below(2) == 0;
                        fair.run(u, if starts { cores } else { running as u32 }, starts, now);
                    }
                    5 => {
                        let u = &mut users.entry(user).or_default().fair;
                        let value = rng.below(5000) as f64;
                        fair.load(u, user, value, now - rng.below(100) as f64, now);
                    }
                    6 | 7 => {
                        now += rng.below(3 * half_life as u64) as f64;
                        fair.refresh(&mut users, now);
                    }
                    _ => {
                        let scale = ((now - fair.base) / half_life).exp2();
                        let exact = |u: &FairUser| {
                            let t = u.turn.unwrap();
                            if t.may_grow && t.computed < now {
                                Fair::key(u, now, half_life, scale)
                            } else {
                                t.key
                            }
                        };
                        let want = users
                            .iter()
                            .filter(|(_, u)| u.fair.turn.is_some())
                            .map(|(&id, u)| (exact(&u.fair), u.fair.served, id))
                            .min();
                        let fresh_min = users
                            .values()
                            .filter(|u| u.fair.turn.is_some())
                            .map(|u| f64::from_bits(Fair::key(&u.fair, now, half_life, scale).0))
                            .fold(f64::INFINITY, f64::min);
                        let before = fair.order.len();
                        let got = fair.pop(&mut users, now);
                        assert_eq!(got, want.map(|w| w.2), "seed {seed}");
                        // Stale entries never outnumber the turns for long.
                        assert!(fair.order.len() <= 2 * fair.turns + 66, "seed {seed}");
                        compacted += usize::from(before > fair.order.len() + 1);
                        if let Some(id) = got {
                            taken += 1;
                            let u = &users[&id].fair;
                            assert!(u.turn.is_none(), "taken once");
                            let k = f64::from_bits(Fair::key(u, now, half_life, scale).0);
                            assert!(k <= fresh_min * (1.0 + 1e-12) + 1e-9, "seed {seed}");
                            // As a decision does: the user served gets a turn again at once
                            // (their stale first entry is reused).
                            if rng.below(2) == 0 {
                                let u = &mut users.get_mut(&id).unwrap().fair;
                                fair.push(u, id, now);
                            }
                        }
                    }
                }
                // Invariants: one counting entry per turn, a lower bound of the key now.
                let scale = ((now - fair.base) / half_life).exp2();
                let mut counting: HashMap<UserId, usize> = HashMap::new();
                for entry in fair.order.iter() {
                    let Reverse((key, _, id)) = *entry;
                    let Some(u) = users.get(&id).filter(|u| Fair::matches(&u.fair, entry)) else {
                        continue;
                    };
                    *counting.entry(id).or_default() += 1;
                    let k = f64::from_bits(Fair::key(&u.fair, now, half_life, scale).0);
                    assert!(f64::from_bits(key.0) <= k * (1.0 + 1e-12) + 1e-9);
                }
                let with_turn = users.values().filter(|u| u.fair.turn.is_some()).count();
                assert_eq!(fair.turns, with_turn, "seed {seed}");
                assert_eq!(counting.len(), with_turn, "seed {seed}");
                assert!(counting.values().all(|&c| c == 1), "seed {seed}");
            }
            assert!(taken > 100, "seed {seed}: the test takes users");
        }
        assert!(compacted > 0, "stale entries were dropped");
    }
}
