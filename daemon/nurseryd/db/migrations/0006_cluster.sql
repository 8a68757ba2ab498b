-- Several daemons on one database: shared claiming, members, leadership.
--
-- A queued job with no owner is *claimable*: no process holds it, and any daemon with a
-- free slot for its kind may take it (nurseryd.db.jobs: _CLAIM, FOR UPDATE SKIP LOCKED).
-- Jobs become claimable when the daemon that accepted them has no free slot for their
-- kind (cluster.shared_queue), when their kind has a cluster-wide limit (only the
-- claiming statement may give them an owner), and when their owner died (released).

-- The claim's scan: oldest claimable job of a kind first.
CREATE INDEX jobs_claimable ON jobs (kind, id) WHERE status = 'queued' AND owner IS NULL;
-- The cluster-wide limit counts the owned, unfinished jobs of a kind.
CREATE INDEX jobs_owned_active ON jobs (kind) WHERE status IN ('queued', 'running')
    AND owner IS NOT NULL;

-- A claimable job wakes the daemons that LISTEN (nurseryd.db.cluster): the payload is
-- the kind, so a daemon only asks the table for kinds it runs. Identical payloads in
-- one transaction are delivered once (PostgreSQL folds them), so a batch of 500
-- claimable inserts of one kind is one notification.
CREATE FUNCTION nurseryd_notify_claimable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nurseryd_claimable', NEW.kind);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_claimable_created AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.owner IS NULL)
    EXECUTE FUNCTION nurseryd_notify_claimable();
CREATE TRIGGER jobs_claimable_released AFTER UPDATE OF status, owner ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.owner IS NULL
                       AND (OLD.owner IS NOT NULL OR OLD.status <> 'queued'))
    EXECUTE FUNCTION nurseryd_notify_claimable();

-- An owned, unfinished job stopped being one (it ended, or was released): a slot of its
-- kind is free somewhere, which is what a claimer held back by a cluster-wide limit
-- (nurseryd.db.jobs: _CLAIM_LIMITED) waits for. Folded per transaction like the above.
CREATE FUNCTION nurseryd_notify_slot_freed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nurseryd_slot_freed', NEW.kind);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_slot_freed AFTER UPDATE OF status, owner ON jobs
    FOR EACH ROW WHEN (OLD.owner IS NOT NULL AND OLD.status IN ('queued', 'running')
                       AND (NEW.owner IS NULL OR NEW.status NOT IN ('queued', 'running')))
    EXECUTE FUNCTION nurseryd_notify_slot_freed();

-- A job someone asked to cancel (request_cancel NOTIFYs its holder) has ended: the
-- daemon that asked, waiting to answer the request, reads the final row at once.
CREATE FUNCTION nurseryd_notify_cancel_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nurseryd_cancel_done', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_cancel_done AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.cancel_requested_at IS NOT NULL
                       AND OLD.status IN ('queued', 'running')
                       AND NEW.status NOT IN ('queued', 'running'))
    EXECUTE FUNCTION nurseryd_notify_cancel_done();

-- The daemons that share this database, one row per process (its owner name). A member
-- is alive exactly while its process holds its owner lock (the same advisory lock that
-- fences its jobs), so peers find a dead one with one small query, twice a second,
-- instead of scanning every unfinished job.
CREATE TABLE cluster_members (
    owner      text        PRIMARY KEY,
    joined_at  timestamptz NOT NULL DEFAULT now()
);

-- Who led a periodic duty last (nurseryd.db.cluster.Leadership): the advisory lock is the
-- leadership itself; this row only tells a new leader whether the previous one stepped
-- down cleanly (holder NULL) or may still believe it leads (then it waits that out).
CREATE TABLE cluster_leaders (
    name   text        PRIMARY KEY,
    holder text,
    since  timestamptz NOT NULL DEFAULT now()
);
