"""Recovery at start: orphaned jobs are adopted at once, a live owner's never,
and a backlog larger than the queue is fed in as room frees up."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlsplit

import trio
from pgserver._commands import POSTGRES_BIN_PATH

from nurseryd.config import KindLimits
from tests.daemon_process import make_settings, run_daemon
from tests.pgtools import PgServer
from tests.polling import eventually

LIVE_OWNER = "alive-elsewhere:7:abc"


async def test_orphans_are_adopted_a_live_owners_jobs_are_not(
    database_url: str, state_dir: Path, pg_server: PgServer
) -> None:
    async with run_daemon(make_settings(database_url, state_dir)):
        pass  # creates the schema
    name = urlsplit(database_url).path.lstrip("/")
    # 40 jobs left behind by a dead daemon: half queued, half mid-run ...
    pg_server.psql(
        "INSERT INTO jobs (kind, params, timeout_s, status, owner, attempts)"
        " SELECT 'noop', '{}', 60, CASE WHEN i % 2 = 0 THEN 'queued' ELSE 'running' END,"
        " 'dead-host:1:abc', i % 2 FROM generate_series(1, 40) AS i", name)
    # ... and one running in a daemon that is alive: it holds its owner lock.
    pg_server.psql("INSERT INTO jobs (kind, params, timeout_s, status, owner)"
                   f" VALUES ('noop', '{{}}', 60, 'running', '{LIVE_OWNER}')", name)
    live_owner = await trio.lowlevel.open_process([
        str(POSTGRES_BIN_PATH / "psql"), "-qAt", database_url,
        "-c", f"SELECT pg_advisory_lock(hashtextextended('{LIVE_OWNER}', 0))",
        "-c", "SELECT pg_sleep(600)",
    ])
    try:
        def lock_held() -> bool:
            return pg_server.psql(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
                name).strip() == "1"

        await eventually(lambda: trio.to_thread.run_sync(lock_held), timeout=10)
        settings = make_settings(database_url, state_dir, queue_size=5)
        settings = dataclasses.replace(
            settings, kinds={**settings.kinds, "noop": KindLimits(60, 60, concurrency=2)})
        async with run_daemon(settings) as daemon:
            db = daemon.services.db

            async def all_orphans_completed() -> bool:
                return await db.fetchval(
                    "SELECT count(*) FROM jobs WHERE status = 'completed'") == 40

            await eventually(all_orphans_completed, timeout=30)
            live = await db.fetchrow("SELECT status, owner FROM jobs WHERE owner = $1",
                                     LIVE_OWNER)
            assert dict(live) == {"status": "running", "owner": LIVE_OWNER}
            attempts = await db.fetch("SELECT attempts FROM jobs WHERE status = 'completed'")
            # The queued ones ran once; the interrupted ones ran for the second time.
            assert sorted(row["attempts"] for row in attempts) == [1] * 20 + [2] * 20
    finally:
        live_owner.kill()
        await live_owner.wait()
