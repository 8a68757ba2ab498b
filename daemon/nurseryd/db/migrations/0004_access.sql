-- Who did it: the name of the API token that submitted a job and of the one that
-- asked to cancel it (never the secret). NULL for jobs the daemon started itself
-- (the fetch schedule) and for jobs recorded before this migration.
ALTER TABLE jobs ADD COLUMN submitted_by text;
ALTER TABLE jobs ADD COLUMN cancelled_by text;
