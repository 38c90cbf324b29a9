-- What a job asks for (issue 15), fixed at upload; rows made before asked for nothing: one
-- core, no GPU, priority 0.
ALTER TABLE jobs
    ADD COLUMN cores BIGINT NOT NULL DEFAULT 1,
    ADD COLUMN memory_mb BIGINT,
    ADD COLUMN gpus BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN walltime_s BIGINT,
    ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;
