-- Several servers on one database (issue 14). The leader's lease: one row, its holder, the
-- epoch (raised by every takeover, checked by every job-state write: fencing) and its expiry
-- in the database's clock, so the servers' clocks never have to agree.
CREATE TABLE IF NOT EXISTS leader_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT,
    epoch BIGINT NOT NULL,
    since_ms BIGINT,
    expires_at TIMESTAMPTZ
);
INSERT INTO leader_lease (id, holder, epoch) VALUES (1, NULL, 0) ON CONFLICT (id) DO NOTHING;
-- Every server's heartbeat, for /overview and the dashboard.
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    seen_ms BIGINT NOT NULL
);
-- Terminate requests received by a standby, for the leader to carry out: committed, so a
-- request is not lost when the leader dies before acting on it.
CREATE TABLE IF NOT EXISTS terminate_requests (
    job_id BIGINT PRIMARY KEY REFERENCES jobs (id),
    requested_ms BIGINT NOT NULL
);
