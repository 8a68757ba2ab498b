-- The durable event log behind GET /events: one row per committed status change of a job.
--
-- Written by a trigger on jobs, so the event commits in the same transaction as the
-- change it records, whatever statement made it (group-committed inserts and
-- transitions, cancel_queued, adoption, recovery) and whichever daemon ran it: a
-- client that resumes with Last-Event-ID misses no status change, across restarts
-- and across daemons sharing the database. Progress counters are not stored here
-- (they change several times a second); live progress comes from each daemon's
-- in-process feed.
--
-- The trigger names no status: it records the status before and after, and
-- nurseryd.observe.events derives the event's name from the lifecycle table.
CREATE TABLE job_events (
    id          bigserial   PRIMARY KEY,
    job_id      bigint      NOT NULL,
    from_status text,
    status      text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The job as committed (its public fields), so a replay shows what was true then.
    job         jsonb       NOT NULL
);
CREATE INDEX job_events_job_id ON job_events (job_id, id);
-- Pruning by age (nurseryd.db.events.prune).
CREATE INDEX job_events_at ON job_events (at);

CREATE FUNCTION nurseryd_record_job_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
BEGIN
    INSERT INTO job_events (job_id, from_status, status, job)
    VALUES (NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status,
            jsonb_build_object(
                'id', NEW.id, 'kind', NEW.kind, 'status', NEW.status, 'total', NEW.total,
                'processed', NEW.processed, 'failed', NEW.failed, 'error', NEW.error,
                'params', NEW.params, 'result', NEW.result, 'attempts', NEW.attempts,
                'timeout_s', NEW.timeout_s, 'created_at', NEW.created_at,
                'started_at', NEW.started_at, 'finished_at', NEW.finished_at,
                'cancel_requested_at', NEW.cancel_requested_at))
    RETURNING id INTO event_id;
    -- Delivered at commit, to every daemon listening (nurseryd.db.events.listen).
    PERFORM pg_notify('nurseryd_job_events', event_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_record_created AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION nurseryd_record_job_event();
CREATE TRIGGER jobs_record_status AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION nurseryd_record_job_event();
