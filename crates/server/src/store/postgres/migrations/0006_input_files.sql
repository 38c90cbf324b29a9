-- Input files of uploads of at most MAX_INPUTS_IN_DB (64 KiB, issue 18), a row per file in
-- the order they are sent: written in the transaction that inserts the job, deleted with the
-- final state that stores its results (or by a later delete after a terminate's partial ZIP)
-- and with Cleaned. Scripts and small inputs compress: the default storage is kept.
CREATE TABLE IF NOT EXISTS input_files (
    job_id BIGINT NOT NULL,
    pos INTEGER NOT NULL,
    name TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    PRIMARY KEY (job_id, pos)
);
