-- Rows a migration job could not import, with the reason and the raw values.
-- Written in the same transaction as the batch and its checkpoint, so a resumed
-- job never stores a reject twice (the primary key makes that an error, not a duplicate).
CREATE TABLE migration_rejects (
    job_id      bigint  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    row_number  bigint  NOT NULL,
    column_name text,
    reason      text    NOT NULL,
    raw         jsonb   NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, row_number)
);
