//! The scheduling core: quotas, fair share and placement. Pure: no I/O, no clock, no locks.
//!
//! State per service: one FIFO queue of job ids per user, a ring of users that have queued
//! jobs and may run one more (round-robin), a set of users that have queued jobs but are at
//! their `runs_per_user` quota ("blocked"), and counts of active jobs. A user moves from
//! blocked back to the ring when one of their jobs stops being active. A decision therefore
//! costs O(1) amortised plus a scan of the service's clients, whatever the number of queued
//! jobs or users.
//!
//! Placement: the healthy client of the service with the most free capacity, then the lowest
//! reported load, then the lowest index. A client's capacity is its advertised `/info` slots;
//! a client without `/info` (seed-contract only) is given the service's `max_runs`, so there
//! the service quota is the only limit. Capacity is shared by every service a client serves.

use std::collections::{HashMap, HashSet, VecDeque};

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

#[derive(Debug, Clone)]
struct ClientState {
    healthy: bool,
    slots: Option<usize>,
    load: f64,
    active: usize,
}

#[derive(Debug, Default)]
struct ServiceState {
    runs_per_user: usize,
    max_runs: usize,
    clients: Vec<ClientId>,
    queues: HashMap<UserId, VecDeque<JobId>>,
    /// Users with queued jobs that may run one more, in turn order.
    ring: VecDeque<UserId>,
    in_ring: HashSet<UserId>,
    /// Users with queued jobs at their quota.
    blocked: HashSet<UserId>,
    active_by_user: HashMap<UserId, usize>,
    active: usize,
    queued: usize,
}

#[derive(Debug, Clone, Copy)]
struct ActiveJob {
    service: ServiceId,
    user: UserId,
    client: Option<ClientId>,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    services: Vec<ServiceState>,
    clients: Vec<ClientState>,
    active: HashMap<JobId, ActiveJob>,
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
            load: 0.0,
            active: 0,
        });
        self.clients.len() - 1
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
            ..Default::default()
        });
        self.services.len() - 1
    }

    /// Updates what is known of a client: reachable or not, advertised slots, load (0-100).
    pub fn set_client(&mut self, client: ClientId, healthy: bool, slots: Option<usize>, load: f64) {
        let c = &mut self.clients[client];
        c.healthy = healthy;
        c.slots = slots;
        c.load = load;
    }

    pub fn set_client_health(&mut self, client: ClientId, healthy: bool) {
        self.clients[client].healthy = healthy;
    }

    pub fn client_slots(&self, client: ClientId) -> Option<usize> {
        self.clients[client].slots
    }

    /// Last reported CPU load of a client, 0 to 100.
    pub fn client_load(&self, client: ClientId) -> f64 {
        self.clients[client].load
    }

    /// (user, active, queued) for every user with jobs active or queued in a service.
    pub fn user_usage(&self, service: ServiceId) -> Vec<(UserId, usize, usize)> {
        let state = &self.services[service];
        let mut users: Vec<UserId> = state
            .queues
            .keys()
            .chain(state.active_by_user.keys())
            .copied()
            .collect();
        users.sort_unstable();
        users.dedup();
        users
            .into_iter()
            .map(|user| {
                let active = state.active_by_user.get(&user).copied().unwrap_or(0);
                let queued = state.queues.get(&user).map_or(0, |q| q.len());
                (user, active, queued)
            })
            .filter(|(_, active, queued)| active + queued > 0)
            .collect()
    }

    /// Quotas of a service: (runs_per_user, max_runs).
    pub fn quotas(&self, service: ServiceId) -> (usize, usize) {
        let state = &self.services[service];
        (state.runs_per_user, state.max_runs)
    }

    pub fn client_healthy(&self, client: ClientId) -> bool {
        self.clients[client].healthy
    }

    /// Adds a job at the back of its user's queue.
    pub fn enqueue(&mut self, service: ServiceId, user: UserId, job: JobId) {
        let s = &mut self.services[service];
        s.queues.entry(user).or_default().push_back(job);
        s.queued += 1;
        s.offer_turn(user);
    }

    /// Puts a job that was active back at the front of its user's queue (it keeps its place).
    pub fn requeue(&mut self, job: JobId) -> bool {
        let Some(entry) = self.release(job) else {
            return false;
        };
        let s = &mut self.services[entry.service];
        s.queues.entry(entry.user).or_default().push_front(job);
        s.queued += 1;
        s.offer_turn(entry.user);
        true
    }

    /// Puts a job at the front of its user's queue (a job queued again keeps its place).
    pub fn push_front(&mut self, service: ServiceId, user: UserId, job: JobId) {
        let s = &mut self.services[service];
        s.queues.entry(user).or_default().push_front(job);
        s.queued += 1;
        s.offer_turn(user);
    }

    /// Removes a queued job (cancelled). Cost: the length of that user's queue.
    pub fn remove_queued(&mut self, service: ServiceId, user: UserId, job: JobId) -> bool {
        let s = &mut self.services[service];
        let Some(queue) = s.queues.get_mut(&user) else {
            return false;
        };
        let Some(at) = queue.iter().position(|j| *j == job) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            s.queues.remove(&user);
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
    ) {
        if self.active.contains_key(&job) {
            return;
        }
        let s = &mut self.services[service];
        s.active += 1;
        *s.active_by_user.entry(user).or_default() += 1;
        if let Some(c) = client {
            self.clients[c].active += 1;
        }
        self.active.insert(
            job,
            ActiveJob {
                service,
                user,
                client,
            },
        );
    }

    /// The job's payload has ended on its client (the client said so) while the job is still
    /// active here, its results being fetched: the client's slot is free for the next job
    /// now, while the job counts against its user's and service's quotas until [`finish`].
    /// Returns whether a slot was freed.
    ///
    /// [`finish`]: Scheduler::finish
    pub fn leave_client(&mut self, job: JobId) -> bool {
        let Some(entry) = self.active.get_mut(&job) else {
            return false;
        };
        let Some(c) = entry.client.take() else {
            return false;
        };
        self.clients[c].active -= 1;
        true
    }

    /// A job stopped being active (finished, killed, failed): frees its quota and its slot.
    pub fn finish(&mut self, job: JobId) -> bool {
        self.release(job).is_some()
    }

    fn release(&mut self, job: JobId) -> Option<ActiveJob> {
        let entry = self.active.remove(&job)?;
        if let Some(c) = entry.client {
            self.clients[c].active -= 1;
        }
        let s = &mut self.services[entry.service];
        s.active -= 1;
        let count = s.active_by_user.get_mut(&entry.user).expect("counted user");
        *count -= 1;
        if *count == 0 {
            s.active_by_user.remove(&entry.user);
        }
        if s.blocked.remove(&entry.user) {
            s.offer_turn(entry.user);
        }
        Some(entry)
    }

    /// Chooses every job that may be dispatched now, and counts them as active.
    pub fn decide(&mut self) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for service in 0..self.services.len() {
            loop {
                let s = &self.services[service];
                if s.active >= s.max_runs || s.queued == 0 {
                    break;
                }
                let Some(client) = self.place(service) else {
                    break;
                };
                let Some((user, job)) = self.services[service].next_job() else {
                    break;
                };
                self.activate(service, user, job, Some(client));
                let s = &mut self.services[service];
                if s.queues.contains_key(&user) {
                    s.offer_turn(user);
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

    /// The healthy client of `service` with the most free capacity, if any has some.
    fn place(&self, service: ServiceId) -> Option<ClientId> {
        let s = &self.services[service];
        s.clients
            .iter()
            .filter_map(|&id| {
                let c = &self.clients[id];
                let capacity = c.slots.unwrap_or(s.max_runs);
                let free = capacity.saturating_sub(c.active);
                (c.healthy && free > 0).then_some((id, free, c.load))
            })
            .min_by(|a, b| b.1.cmp(&a.1).then(a.2.total_cmp(&b.2)).then(a.0.cmp(&b.0)))
            .map(|(id, _, _)| id)
    }

    pub fn queued(&self, service: ServiceId) -> usize {
        self.services[service].queued
    }

    pub fn active(&self, service: ServiceId) -> usize {
        self.services[service].active
    }

    pub fn active_of_user(&self, service: ServiceId, user: UserId) -> usize {
        self.services[service]
            .active_by_user
            .get(&user)
            .copied()
            .unwrap_or(0)
    }

    pub fn active_on_client(&self, client: ClientId) -> usize {
        self.clients[client].active
    }

    pub fn is_active(&self, job: JobId) -> bool {
        self.active.contains_key(&job)
    }
}

impl ServiceState {
    /// Gives `user` a turn (back of the ring) if they have queued jobs and are under quota;
    /// otherwise parks them as blocked. Never adds a user twice.
    fn offer_turn(&mut self, user: UserId) {
        if self.in_ring.contains(&user) || self.blocked.contains(&user) {
            return;
        }
        if !self.queues.contains_key(&user) {
            return;
        }
        if self.active_by_user.get(&user).copied().unwrap_or(0) >= self.runs_per_user {
            self.blocked.insert(user);
        } else {
            self.in_ring.insert(user);
            self.ring.push_back(user);
        }
    }

    /// Takes the next user's first job. Users whose queue emptied (cancellations) or who
    /// reached their quota leave the ring on the way.
    fn next_job(&mut self) -> Option<(UserId, JobId)> {
        while let Some(user) = self.ring.pop_front() {
            self.in_ring.remove(&user);
            let Some(queue) = self.queues.get_mut(&user) else {
                continue;
            };
            if self.active_by_user.get(&user).copied().unwrap_or(0) >= self.runs_per_user {
                self.blocked.insert(user);
                continue;
            }
            let job = queue.pop_front().expect("queues are never kept empty");
            if queue.is_empty() {
                self.queues.remove(&user);
            }
            self.queued -= 1;
            return Some((user, job));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_that_ended_frees_its_client_slot_but_not_the_quotas() {
        let mut s = single(2, 10, Some(1));
        for j in 1..=3 {
            s.enqueue(0, 7, j);
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
            s.enqueue(0, 1, job);
        }
        for job in 11..=14 {
            s.enqueue(0, 2, job);
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
            s.enqueue(0, 7, job);
        }
        assert_eq!(s.decide().len(), 5);
        assert!(s.decide().is_empty());
    }

    #[test]
    fn round_robin_across_users_fifo_within() {
        let mut s = single(10, 1, Some(10));
        for job in 1..=3 {
            s.enqueue(0, 100, job);
        }
        for job in 11..=13 {
            s.enqueue(0, 200, job);
        }
        for job in 21..=23 {
            s.enqueue(0, 300, job);
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
            s.enqueue(0, 1, job);
        }
        assert_eq!(jobs(&s.decide()), [1]);
        s.enqueue(0, 2, 50);
        s.finish(1);
        assert_eq!(jobs(&s.decide()), [2]);
        s.finish(2);
        assert_eq!(jobs(&s.decide()), [50]);
    }

    #[test]
    fn blocked_user_returns_when_a_job_finishes() {
        let mut s = single(1, 10, Some(10));
        for job in 1..=3 {
            s.enqueue(0, 1, job);
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
            s.enqueue(0, 1, job);
        }
        assert_eq!(jobs(&s.decide()), [1]);
        assert!(s.requeue(1));
        assert_eq!(s.active_on_client(0), 0);
        assert_eq!(jobs(&s.decide()), [1]);
    }

    #[test]
    fn cancelled_queued_jobs_are_skipped() {
        let mut s = single(10, 10, Some(10));
        s.enqueue(0, 1, 1);
        s.enqueue(0, 2, 2);
        s.enqueue(0, 2, 3);
        assert!(s.remove_queued(0, 1, 1));
        assert!(!s.remove_queued(0, 1, 1));
        assert!(s.remove_queued(0, 2, 2));
        assert_eq!(jobs(&s.decide()), [3]);
        // The emptied user can queue again and is not counted twice in the ring.
        s.enqueue(0, 1, 4);
        s.enqueue(0, 1, 5);
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
            s.enqueue(0, 1, job);
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
        s.enqueue(0, 1, 1);
        assert!(s.decide().is_empty());
        s.set_client_health(0, true);
        assert_eq!(jobs(&s.decide()), [1]);
    }

    #[test]
    fn a_client_without_slots_is_limited_by_the_service_quota() {
        let mut s = single(100, 4, None);
        for job in 1..=10 {
            s.enqueue(0, 1, job);
        }
        assert_eq!(s.decide().len(), 4);
    }

    #[test]
    fn activated_jobs_count_against_quotas() {
        let mut s = single(2, 10, Some(10));
        s.activate(0, 1, 100, Some(0));
        s.activate(0, 1, 101, None);
        s.enqueue(0, 1, 1);
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
        s.enqueue(0, 1, 1);
        s.enqueue(0, 1, 2);
        s.enqueue(1, 1, 3);
        s.enqueue(1, 1, 4);
        assert_eq!(s.decide().len(), 3);
    }

    #[test]
    fn many_queued_jobs_decide_cheaply() {
        // 100,000 queued jobs from 1,000 users; each decision must not scan them.
        let mut s = single(2, 50, Some(50));
        for i in 0..100_000 {
            s.enqueue(0, i % 1000, i);
        }
        let start = std::time::Instant::now();
        let mut dispatched = 0;
        for _ in 0..2_000 {
            let d = s.decide();
            dispatched += d.len();
            for decision in d {
                s.finish(decision.job);
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(dispatched, 100_000);
        // All jobs went through; every user kept its FIFO order and the rounds interleaved.
        assert!(
            elapsed < std::time::Duration::from_secs(5),
            "deciding took {elapsed:?}"
        );
    }

    #[test]
    fn fairness_holds_with_many_users() {
        let mut s = single(1, 10, Some(10));
        for i in 0..1000 {
            s.enqueue(0, i % 100, i);
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
                        s.enqueue(0, user, next);
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
}
