"""Finished jobs and their rejects are deleted after [retention] jobs, fetched
items no fetch has seen after [retention] items (issue 10): nothing used to be
deleted, ever."""

from __future__ import annotations

import pytest

from nurseryd.config import ConfigError
from nurseryd.db import Database
from nurseryd.supervisor.retention import (
    RetentionConfig,
    parse_retention,
    sweep_items_once,
    sweep_once,
)


async def _job(db: Database, status: str, finished_days_ago: float | None) -> int:
    job_id: int = await db.fetchval(
        "INSERT INTO jobs (kind, params, timeout_s, status, finished_at)"
        " VALUES ('noop', '{}'::jsonb, 60, $1,"
        " CASE WHEN $2::float8 IS NULL THEN NULL"
        " ELSE now() - make_interval(days => $2::float8::int) END) RETURNING id",
        status, finished_days_ago)
    return job_id


async def test_old_terminal_jobs_go_with_their_rejects_and_nothing_else(db: Database) -> None:
    old_done = await _job(db, "completed", 40)
    old_failed = await _job(db, "failed", 31)
    recent = await _job(db, "completed", 2)
    queued = await _job(db, "queued", None)
    await db.execute(
        "INSERT INTO migration_rejects (job_id, row_number, reason, raw)"
        " VALUES ($1, 1, 'bad', '{\"email\": \"alice@example.org\"}'::jsonb)", old_done)
    deleted = await sweep_once(db, RetentionConfig(jobs_s=30 * 86400, batch=1))
    assert deleted == 2
    left = {row["id"] for row in await db.fetch("SELECT id FROM jobs")}
    assert left == {recent, queued} and old_failed not in left
    assert await db.fetchval("SELECT count(*) FROM migration_rejects") == 0
    assert await sweep_once(db, RetentionConfig(jobs_s=0)) == 0  # 0 keeps everything


async def test_items_no_fetch_has_seen_for_long_go_and_only_they(db: Database) -> None:
    for source, external_id, days in (("a", "1", 200), ("a", "2", 91), ("a", "3", 1),
                                      ("gone", "9", 400)):
        await db.execute(
            "INSERT INTO items (source, external_id, raw, content_hash, last_seen_at)"
            " VALUES ($1, $2, '{}'::jsonb, '\\x00'::bytea,"
            " now() - make_interval(days => $3))", source, external_id, days)
    deleted = await sweep_items_once(db, RetentionConfig(items_s=90 * 86400, batch=2))
    assert deleted == 3
    left = [(row["source"], row["external_id"]) for row in
            await db.fetch("SELECT source, external_id FROM items")]
    assert left == [("a", "3")]
    assert await sweep_items_once(db, RetentionConfig(items_s=0)) == 0  # 0 keeps everything


def test_retention_config() -> None:
    assert parse_retention(None, {}) == RetentionConfig()
    parsed = parse_retention({"jobs": "7d", "items": "1d", "interval": "10m", "batch": 50}, {})
    assert (parsed.jobs_s, parsed.items_s, parsed.interval_s, parsed.batch) == \
        (7 * 86400, 86400, 600, 50)
    for bad, key in (({"jobs": "soon"}, "retention.jobs"), ({"items": "x"}, "retention.items"),
                     ({"interval": 0}, "retention.interval"),
                     ({"keep": 1}, "retention.keep")):
        with pytest.raises(ConfigError) as error:
            parse_retention(bad, {})
        assert error.value.key == key
