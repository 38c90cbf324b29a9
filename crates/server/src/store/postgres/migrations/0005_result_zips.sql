-- Result ZIPs of at most MAX_RESULT_IN_DB (256 KiB, issue 18): written in the transaction of
-- the final state they come with, deleted in the one that marks the job Cleaned. A ZIP is
-- compressed already: stored out of line without another try at compressing it.
CREATE TABLE IF NOT EXISTS result_zips (
    job_id BIGINT PRIMARY KEY,
    zip BYTEA NOT NULL
);
ALTER TABLE result_zips ALTER COLUMN zip SET STORAGE EXTERNAL;
