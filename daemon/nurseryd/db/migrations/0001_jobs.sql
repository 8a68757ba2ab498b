-- The durable job table: the single source of truth for every accepted job.
CREATE TABLE jobs (
    id                  bigserial PRIMARY KEY,
    kind                text        NOT NULL,
    status              text        NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'running', 'completed', 'failed',
                                          'cancelled', 'timed_out')),
    params              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    total               bigint,
    processed           bigint      NOT NULL DEFAULT 0,
    failed              bigint      NOT NULL DEFAULT 0,
    error               text,
    result              jsonb,
    attempts            integer     NOT NULL DEFAULT 0,
    timeout_s           double precision NOT NULL,
    checkpoint          jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    cancel_requested_at timestamptz,
    heartbeat_at        timestamptz,
    owner               text
);

-- Listing newest first, optionally by kind and status.
CREATE INDEX jobs_kind_status_id ON jobs (kind, status, id DESC);
CREATE INDEX jobs_status_id ON jobs (status, id DESC);
-- Recovery scans only unfinished jobs.
CREATE INDEX jobs_unfinished ON jobs (id) WHERE status IN ('queued', 'running');
