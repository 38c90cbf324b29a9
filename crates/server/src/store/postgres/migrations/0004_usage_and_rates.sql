-- Fair-share usage (issue 15): a user's decayed core-seconds in a service as of at_ms, kept
-- when their runs end so a restart does not forget it.
CREATE TABLE user_usage (
    service TEXT NOT NULL,
    user_id BIGINT NOT NULL,
    core_seconds DOUBLE PRECISION NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (service, user_id)
);
-- Rate quotas of uploads: each user's token bucket as one instant (see ratelimit.rs); NULL
-- for a row made just to be locked.
CREATE TABLE upload_rate (
    service TEXT NOT NULL,
    user_id BIGINT NOT NULL,
    tat_ms BIGINT,
    PRIMARY KEY (service, user_id)
);
