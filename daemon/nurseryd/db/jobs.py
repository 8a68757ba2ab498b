"""Every SQL statement about the ``jobs`` table, and the row → JSON view.

Handlers and the supervisor never build SQL; they call these functions. The
batched ones (:func:`insert_jobs`, :func:`apply_updates`) are what the group
committers flush: one round trip for many jobs.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ..errors import LostClaim
from ..lifecycle import ACTIVE, Status
from .database import Database

PUBLIC_FIELDS = (
    "id", "kind", "status", "total", "processed", "failed", "error", "params", "result",
    "attempts", "timeout_s", "created_at", "started_at", "finished_at", "cancel_requested_at",
)
_SELECT = f"SELECT {', '.join(PUBLIC_FIELDS)}, checkpoint, owner FROM jobs"


def job_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """The public JSON view of a job row (timestamps as ISO 8601)."""
    out: dict[str, Any] = {}
    for name in PUBLIC_FIELDS:
        value = row[name]
        out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
    return out


@dataclass(frozen=True)
class NewJob:
    kind: str
    params: dict[str, Any]
    timeout_s: float
    owner: str


_INSERT = """
WITH input AS (
    SELECT nextval(pg_get_serial_sequence('jobs', 'id')) AS id, t.*
    FROM unnest($1::text[], $2::jsonb[], $3::float8[], $4::text[]) WITH ORDINALITY
         AS t(kind, params, timeout_s, owner, ord)
), inserted AS (
    INSERT INTO jobs (id, kind, params, timeout_s, owner)
    SELECT id, kind, params, timeout_s, owner FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING {fields}, checkpoint, owner
)
SELECT input.ord, inserted.* FROM input LEFT JOIN inserted USING (id) ORDER BY input.ord
""".format(fields=", ".join(PUBLIC_FIELDS))


async def _insert(conn: asyncpg.Connection, jobs: list[NewJob]) -> list[asyncpg.Record | None]:
    rows = await conn.fetch(
        _INSERT,
        [job.kind for job in jobs], [job.params for job in jobs],
        [job.timeout_s for job in jobs], [job.owner for job in jobs],
    )
    # A row a unique index refused (ON CONFLICT DO NOTHING) comes back with NULLs.
    return [row if row["kind"] is not None else None for row in rows]


async def insert_jobs(db: Database, jobs: list[NewJob]) -> list[asyncpg.Record | None]:
    """Insert many jobs in one statement; ``None`` where a unique index refused one.

    One statement is atomic by itself: no BEGIN/COMMIT round trips.
    """
    return await db.run(_insert, jobs, transaction=False)


# -- batched updates ---------------------------------------------------------------------

_UPDATE_TYPES: dict[str, str] = {
    "status": "text", "total": "bigint", "processed": "bigint", "failed": "bigint",
    "error": "text", "result": "jsonb", "attempts": "integer", "checkpoint": "jsonb",
    "started_at": "timestamptz", "finished_at": "timestamptz", "heartbeat_at": "timestamptz",
    "cancel_requested_at": "timestamptz", "owner": "text",
}


@dataclass
class JobUpdate:
    """Columns to set on one job. Only the given keys are written (None means NULL)."""

    job_id: int
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.values) - set(_UPDATE_TYPES)
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")


def merge_updates(updates: Iterable[JobUpdate]) -> dict[int, dict[str, Any]]:
    """Later values win, per job, so a batch writes each job once."""
    merged: dict[int, dict[str, Any]] = defaultdict(dict)
    for update in updates:
        merged[update.job_id].update(update.values)
    return dict(merged)


def _group_by_shape(
    merged: dict[int, dict[str, Any]],
) -> dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]]:
    by_shape: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for job_id, values in merged.items():
        by_shape[tuple(sorted(values))].append((job_id, values))
    return by_shape


async def _apply(
    conn: asyncpg.Connection, by_shape: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]]
) -> dict[int, asyncpg.Record]:
    rows: dict[int, asyncpg.Record] = {}
    for columns, items in by_shape.items():
        assignments = ", ".join(f"{name} = u.{name}" for name in columns)
        arrays = ", ".join(
            f"${index}::{_UPDATE_TYPES[name]}[]" for index, name in enumerate(columns, 2)
        )
        sql = (
            f"UPDATE jobs SET {assignments} FROM unnest($1::bigint[], {arrays})"
            f" AS u(id, {', '.join(columns)}) WHERE jobs.id = u.id"
            f" RETURNING {', '.join('jobs.' + name for name in PUBLIC_FIELDS)}"
        )
        args = [[job_id for job_id, _ in items]]
        args += [[values[name] for _, values in items] for name in columns]
        for row in await conn.fetch(sql, *args):
            rows[row["id"]] = row
    return rows


async def apply_updates(db: Database, updates: list[JobUpdate]) -> list[asyncpg.Record | None]:
    """Write a batch of updates atomically; returns each updated job's row.

    Usually a batch has one shape (same columns) and is one statement, which
    needs no BEGIN/COMMIT; mixed shapes share one transaction.
    """
    by_shape = _group_by_shape(merge_updates(updates))
    if not by_shape:
        return [None] * len(updates)
    rows = await db.run(_apply, by_shape, transaction=len(by_shape) > 1)
    return [rows.get(update.job_id) for update in updates]


# -- single-row reads and guarded writes ------------------------------------------------


async def get_job(db: Database, job_id: int) -> asyncpg.Record | None:
    return await db.fetchrow(f"{_SELECT} WHERE id = $1", job_id)


async def list_jobs(
    db: Database,
    *,
    kind: str | None,
    statuses: Sequence[str] | None,
    before_id: int | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Newest first; keyset pagination by id (``before_id``)."""
    return await db.fetch(
        f"{_SELECT} WHERE ($1::text IS NULL OR kind = $1)"
        " AND ($2::text[] IS NULL OR status = ANY($2))"
        " AND ($3::bigint IS NULL OR id < $3)"
        " ORDER BY id DESC LIMIT $4",
        kind, list(statuses) if statuses else None, before_id, limit,
    )


async def cancel_queued(db: Database, job_id: int, owner: str) -> asyncpg.Record | None:
    """Cancel a queued job that no live process holds in memory: ours but not loaded
    yet, unowned, or owned by a dead daemon. A live daemon's queued job is left to
    that daemon (``request_cancel``), which would otherwise still start it."""
    return await db.fetchrow(
        "UPDATE jobs SET status = 'cancelled', finished_at = now(),"
        " cancel_requested_at = coalesce(cancel_requested_at, now()),"
        " error = 'cancelled before it started'"
        " WHERE id = $1 AND status = 'queued' AND (owner IS NULL OR owner = $2"
        f" OR pg_try_advisory_xact_lock({owner_lock_sql('owner')}))"
        f" RETURNING {', '.join(PUBLIC_FIELDS)}, checkpoint, owner",
        job_id, owner,
    )


async def request_cancel(db: Database, job_id: int) -> None:
    """Record a cancel request for the daemon that holds the job."""
    await db.execute("UPDATE jobs SET cancel_requested_at = coalesce(cancel_requested_at, now())"
                     " WHERE id = $1 AND status IN ('queued', 'running')", job_id)


async def cancel_requests_among(db: Database, job_ids: list[int]) -> list[asyncpg.Record]:
    """Which of these jobs someone asked (through the table) to cancel."""
    return await db.fetch(
        "SELECT id, cancel_requested_at FROM jobs"
        " WHERE id = ANY($1::bigint[]) AND cancel_requested_at IS NOT NULL", job_ids)


async def heartbeat(db: Database, job_ids: list[int]) -> None:
    await db.execute("UPDATE jobs SET heartbeat_at = now() WHERE id = ANY($1::bigint[])", job_ids)


# -- ownership and recovery ---------------------------------------------------------------


def owner_lock_sql(param: str) -> str:
    """The advisory-lock key of an owner: held by its process for its whole life."""
    return f"hashtextextended({param}, 0)"


async def hold_owner_lock(conn: asyncpg.Connection, owner: str) -> None:
    await conn.execute(f"SELECT pg_advisory_lock({owner_lock_sql('$1')})", owner)


_ADOPT = f"""
WITH orphans AS (
    SELECT id FROM jobs
    WHERE status IN ('queued', 'running')
      AND (owner IS NULL OR owner = $1
           OR (owner <> $2 AND pg_try_advisory_xact_lock({owner_lock_sql('owner')})))
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET status = 'queued', owner = $2
FROM orphans WHERE jobs.id = orphans.id
RETURNING jobs.id
"""


async def _adopt(conn: asyncpg.Connection, previous_owner: str | None, owner: str) -> int:
    rows = await conn.fetch(_ADOPT, previous_owner or "", owner)
    return len(rows)


async def adopt_orphans(db: Database, owner: str, previous_owner: str | None = None) -> int:
    """Requeue and take over every unfinished job whose owner is dead.

    An owner is alive exactly while its process holds its advisory lock (a
    session lock dies with the connection, so a SIGKILLed daemon releases it at
    once): no lease to wait out, and a live daemon's jobs are never taken, so a
    job never runs twice at once.
    """
    return await db.run(_adopt, previous_owner, owner)


async def queued_for(
    db: Database, owner: str, after_id: int, limit: int
) -> list[asyncpg.Record]:
    return await db.fetch(
        f"{_SELECT} WHERE owner = $1 AND status = 'queued' AND id > $2 ORDER BY id LIMIT $3",
        owner, after_id, limit,
    )


# -- questions other modules ask of the jobs table ----------------------------------------


async def seconds_since_latest(db: Database, kind: str) -> float | None:
    """Seconds since the newest job of ``kind`` was created (``None``: never)."""
    return await db.fetchval(
        "SELECT extract(epoch FROM now() - max(created_at))::float8 FROM jobs WHERE kind = $1",
        kind)


async def active_job_id(db: Database, kind: str) -> int | None:
    """The newest queued or running job of ``kind``."""
    return await db.fetchval(
        "SELECT id FROM jobs WHERE kind = $1 AND status = ANY($2::text[])"
        " ORDER BY id DESC LIMIT 1", kind, _values(ACTIVE))


async def latest_job_id(db: Database, kind: str) -> int | None:
    return await db.fetchval("SELECT max(id) FROM jobs WHERE kind = $1", kind)


async def uploads_in_use(db: Database, kind: str = "migration") -> set[str]:
    """``params.upload`` of every unfinished job of ``kind``: files still needed."""
    rows = await db.fetch(
        "SELECT params->>'upload' AS upload FROM jobs WHERE kind = $1"
        " AND status = ANY($2::text[]) AND params ? 'upload'", kind, _values(ACTIVE))
    return {row["upload"] for row in rows}


async def commit_progress_in(
    conn: asyncpg.Connection, job_id: int, owner: str, attempt: int,
    checkpoint: Any, processed: int, failed: int,
) -> None:
    """Asyncio side, inside the caller's transaction: the checkpoint and counters of
    a running job, guarded by its owner and attempt. Raises :class:`LostClaim`
    (the caller's transaction then rolls back) when this attempt no longer holds
    the job."""
    status = await conn.execute(
        "UPDATE jobs SET checkpoint = $2, processed = $3, failed = $4"
        " WHERE id = $1 AND status = $5 AND owner = $6 AND attempts = $7",
        job_id, checkpoint, processed, failed, Status.RUNNING.value, owner, attempt)
    if status != "UPDATE 1":
        raise LostClaim(job_id)


def _values(statuses: Iterable[Status]) -> list[str]:
    return sorted(status.value for status in statuses)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)

