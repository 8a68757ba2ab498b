-- Fetched items, one row per (source, external id); upserted in batches by the fetch job.
CREATE TABLE items (
    source          text        NOT NULL,
    external_id     text        NOT NULL,
    title           text,
    url             text,
    published_at    timestamptz,
    author          text,
    summary         text,
    raw             jsonb       NOT NULL,
    -- sha256 of the normalised fields and raw: an unchanged item is not rewritten.
    content_hash    bytea       NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, external_id)
);
CREATE INDEX items_published_at ON items (published_at DESC NULLS LAST);

-- Per-source state across fetches: conditional-GET validators and the last outcome.
CREATE TABLE fetch_sources (
    name            text        PRIMARY KEY,
    -- Validators only apply to this URL; a source whose URL changed starts afresh.
    url             text        NOT NULL,
    etag            text,
    last_modified   text,
    last_outcome    text,
    last_status     integer,
    last_job_id     bigint,
    last_success_at timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One fetch at a time, enforced where every daemon sharing this database sees it.
CREATE UNIQUE INDEX jobs_one_active_fetch ON jobs (kind)
    WHERE kind = 'fetch' AND status IN ('queued', 'running');
