"""Every SQL statement about the ``job_events`` table (the durable event log).

Rows are written by a trigger on ``jobs`` (``migrations/0005_events.sql``) in the
transaction of the status change they record, so nothing here writes events:
this module reads them in id order, prunes old ones, and listens for the
``NOTIFY`` each insert sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from .database import Database
from .listening import open_listener

#: The channel the trigger notifies (payload: the new event's id).
CHANNEL = "nurseryd_job_events"

_COLUMNS = "id, job_id, from_status, status, at, job"


async def events_after(
    db: Database, after_id: int, limit: int, job_id: int | None = None,
    up_to: int | None = None,
) -> list[asyncpg.Record]:
    """Events with ids above ``after_id`` (and at most ``up_to``), oldest first;
    of one job, when given."""
    return await db.fetch(
        f"SELECT {_COLUMNS} FROM job_events WHERE id > $1"
        " AND ($3::bigint IS NULL OR job_id = $3) AND ($4::bigint IS NULL OR id <= $4)"
        " ORDER BY id LIMIT $2",
        after_id, limit, job_id, up_to)


async def latest_event_id(db: Database) -> int:
    """The highest event id there is (0 when none)."""
    return await db.fetchval("SELECT coalesce(max(id), 0) FROM job_events")


async def prune(db: Database, *, keep_s: float, max_rows: int) -> int:
    """Delete events older than ``keep_s`` and all but the newest ``max_rows``;
    returns how many. Both bounds are cheap: ``at`` and ``id`` are indexed."""
    status = await db.execute(
        "DELETE FROM job_events WHERE at < now() - make_interval(secs => $1)"
        " OR id <= (SELECT coalesce(max(id), 0) FROM job_events) - $2",
        keep_s, max_rows)
    return int(status.rsplit(" ", 1)[-1])


@asynccontextmanager
async def listen(db: Database, on_notify: Callable[[], None]) -> AsyncIterator[Callable[[], Any]]:
    """LISTEN on a dedicated connection (not the pool's: a pooled connection is
    reset on release and would stop listening); ``on_notify`` is called in Trio
    for every notification. Yields an async ``alive()`` check; the connection is
    closed on exit, also when cancelled."""
    async with open_listener(db, (CHANNEL,), lambda _channel, _payload: on_notify()) as alive:
        yield alive


async def job_history(db: Database, job_id: int, limit: int) -> list[asyncpg.Record]:
    """The newest ``limit`` stored events of one job, oldest first."""
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM job_events WHERE job_id = $1 ORDER BY id DESC LIMIT $2",
        job_id, limit)
    return rows[::-1]
