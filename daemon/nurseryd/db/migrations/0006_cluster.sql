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
