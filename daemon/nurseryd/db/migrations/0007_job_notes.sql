-- Lines a job's kind writes for its operator (JobContext.note): a fetch source that
-- failed while the others went on, rows an import rejected. They sit beside the
-- status events in GET /jobs/{id}/log. Bounded per job by the insert
-- (nurseryd.db.notes.MAX_NOTES_PER_JOB) and deleted with the job.
CREATE TABLE job_notes (
    id      bigserial   PRIMARY KEY,
    job_id  bigint      NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt integer     NOT NULL,
    at      timestamptz NOT NULL,
    level   text        NOT NULL CHECK (level IN ('info', 'warning', 'error')),
    message text        NOT NULL
);
CREATE INDEX job_notes_job_id ON job_notes (job_id, id);
