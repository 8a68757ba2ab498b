"""Every SQL statement about the ``jobs`` table.

:class:`PostgresJobStore` is the :class:`~nurseryd.store.base.JobStore` the daemon
runs on; the functions below it answer the few questions other modules ask of the
table. No statement names a status literally: statuses come from
:mod:`nurseryd.lifecycle` as parameters, so the transition table is the only place
that says which status may follow which.

The batched calls (:meth:`PostgresJobStore.insert`, :meth:`PostgresJobStore.apply`)
are what the supervisor's group committers flush: one round trip for many jobs.
"""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ..errors import JobConflict, LostClaim
from ..lifecycle import (
    ACTIVE,
    TERMINAL,
    Event,
    Status,
    next_status,
    statuses_allowing,
    target_of,
)
from ..store.base import (
    PUBLIC_FIELDS,
    UPDATABLE,
    Change,
    ChangeFeed,
    ClusterSignals,
    JobChanged,
    JobNote,
    NewJob,
    Row,
    Transition,
    in_rounds,
    job_json,
    now,
    rerun_change,
)
from .database import Database
from .notes import insert_notes

__all__ = ["NewJob", "PostgresJobStore", "job_json", "now"]

ROW_FIELDS = (*PUBLIC_FIELDS, "checkpoint", "owner")
_RETURNING = ", ".join(f"jobs.{name}" for name in ROW_FIELDS)
_SELECT = f"SELECT {', '.join(ROW_FIELDS)} FROM jobs"


def _values(statuses: Iterable[Status]) -> list[str]:
    return sorted(status.value for status in statuses)


def owner_lock_sql(param: str) -> str:
    """The advisory-lock key of an owner: held by its process for its whole life."""
    return f"hashtextextended({param}, 0)"


async def hold_owner_lock(conn: asyncpg.Connection, owner: str) -> None:
    await conn.execute(f"SELECT pg_advisory_lock({owner_lock_sql('$1')})", owner)


def kind_lock_sql(param: str) -> str:
    """The advisory-lock key that serialises claims of one kind with a cluster-wide
    limit (a transaction lock: held only while one claim counts and takes)."""
    return f"hashtextextended('nurseryd.kind:' || {param}, 0)"


#: NOTIFY channels (``migrations/0006_cluster.sql`` and the statements below);
#: ``db/cluster.py`` LISTENs to them for the supervisor.
CLAIMABLE_CHANNEL = "nurseryd_claimable"      # payload: a kind with a job nobody holds
SLOT_FREED_CHANNEL = "nurseryd_slot_freed"    # payload: a kind one of whose owned jobs ended
CANCEL_CHANNEL = "nurseryd_cancel"            # payload: the id of a job asked to cancel
CANCEL_DONE_CHANNEL = "nurseryd_cancel_done"  # payload: the id of such a job, now ended


# -- statements ---------------------------------------------------------------------------

_INSERT = f"""
WITH input AS (
    SELECT nextval(pg_get_serial_sequence('jobs', 'id')) AS id, t.*
    FROM unnest($1::text[], $2::jsonb[], $3::float8[], $4::text[], $5::text[]) WITH ORDINALITY
         AS t(kind, params, timeout_s, owner, submitted_by, ord)
), inserted AS (
    INSERT INTO jobs (id, kind, params, timeout_s, owner, submitted_by)
    SELECT id, kind, params, timeout_s, owner, submitted_by FROM input ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING {_RETURNING}
)
SELECT input.ord, inserted.* FROM input LEFT JOIN inserted USING (id) ORDER BY input.ord
"""


def _apply_sql(columns: tuple[str, ...], sets_status: bool) -> str:
    """One guarded UPDATE for every change of one shape (same columns)."""
    assignments = [f"{name} = u.{name}" for name in columns]
    if sets_status:
        assignments.insert(0, "status = u.to_status")
    arrays = "".join(
        f", ${index}::{UPDATABLE[name]}[]" for index, name in enumerate(columns, 6))
    names = "".join(f", {name}" for name in columns)
    return (
        f"UPDATE jobs SET {', '.join(assignments)}"
        f" FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::integer[]{arrays})"
        f" AS u(id, to_status, from_statuses, guard_owner, guard_attempt{names})"
        " WHERE jobs.id = u.id AND jobs.status = ANY(string_to_array(u.from_statuses, ','))"
        " AND (u.guard_owner IS NULL OR jobs.owner = u.guard_owner)"
        " AND (u.guard_attempt IS NULL OR jobs.attempts = u.guard_attempt)"
        f" RETURNING {_RETURNING}"
    )


def _guard(change: Change) -> tuple[str | None, str]:
    """(target status or None, the statuses it may start from, comma-joined)."""
    if isinstance(change, Transition):
        return _transition_guard(change.event)
    return None, ",".join(_values(change.statuses))


@functools.cache
def _transition_guard(event: Event) -> tuple[str, str]:
    return target_of(event).value, ",".join(_values(statuses_allowing(event)))


_CANCEL_QUEUED = f"""
UPDATE jobs SET status = $3, finished_at = now(),
    cancel_requested_at = coalesce(cancel_requested_at, now()),
    cancelled_by = coalesce(cancelled_by, $5),
    error = 'cancelled before it started'
WHERE id = $1 AND status = $4
  AND (owner IS NULL OR owner = $2 OR pg_try_advisory_xact_lock({owner_lock_sql('owner')}))
RETURNING {_RETURNING}
"""
if Status.QUEUED not in statuses_allowing(Event.CANCEL):  # pragma: no cover - table edit
    raise AssertionError("cancel_queued needs queued -> cancel in the lifecycle table")

# A dead owner's unfinished jobs go back to the pool: no owner, queued (``recover``
# for the running ones), so the daemons with free slots for their kinds claim them.
# The lock is tried again for every row inside the statement: an owner that came
# back meanwhile keeps its jobs.
_RELEASE = f"""
WITH orphans AS MATERIALIZED (
    SELECT id, status AS was FROM jobs
    WHERE status = ANY($2::text[]) AND owner IS NOT NULL AND owner <> $1
      AND ($5::text[] IS NULL OR owner = ANY($5::text[]))
      AND pg_try_advisory_xact_lock({owner_lock_sql('owner')})
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET owner = NULL,
    status = CASE WHEN orphans.was = ANY($3::text[]) THEN $4 ELSE jobs.status END
FROM orphans WHERE jobs.id = orphans.id
RETURNING {_RETURNING}, orphans.was
"""

# Claiming: the oldest claimable jobs of each kind, as many as the daemon has free
# slots for, in one statement. The locked selection is MATERIALIZED: folded into the
# UPDATE as a semi-join, it would be run again per row and take more than its
# LIMIT (measured). SKIP LOCKED lets claimers pass each other; a row
# another claimer took meanwhile fails the re-checked ``owner IS NULL`` and is
# skipped. The claim only gives the row an owner: the start (which bumps
# ``attempts``) is the owner's guarded ``start`` transition, as for any job.
_CLAIM = f"""
WITH want AS (SELECT * FROM unnest($2::text[], $3::integer[]) AS w(kind, n)),
picked AS MATERIALIZED (
    SELECT j.id FROM want CROSS JOIN LATERAL (
        SELECT id FROM jobs WHERE kind = want.kind AND status = $4 AND owner IS NULL
        ORDER BY id LIMIT want.n FOR UPDATE SKIP LOCKED) AS j
)
UPDATE jobs SET owner = $1 FROM picked WHERE jobs.id = picked.id AND jobs.owner IS NULL
RETURNING {_RETURNING}
"""

# Claiming a kind with a cluster-wide limit: inside a transaction that first took the
# kind's advisory lock (so two claimers never both count the same free slot), take
# at most ``limit - owned unfinished jobs of the kind``. Running in READ COMMITTED,
# this statement's snapshot is taken after the lock: it sees every earlier claim.
_CLAIM_LIMITED = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM jobs WHERE kind = $2 AND status = $6 AND owner IS NULL
    ORDER BY id
    LIMIT greatest(0, least($3::integer, $4::integer - (
        SELECT count(*) FROM jobs WHERE kind = $2 AND owner IS NOT NULL
          AND status = ANY($5::text[]))))
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET owner = $1 FROM picked WHERE jobs.id = picked.id AND jobs.owner IS NULL
RETURNING {_RETURNING}
"""


# -- the store ----------------------------------------------------------------------------


class PostgresJobStore:
    """The jobs table as a :class:`~nurseryd.store.base.JobStore`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.feed = ChangeFeed()
        self.progress = ChangeFeed()

    async def insert(self, jobs: Sequence[NewJob]) -> list[Row | None]:
        """Insert many jobs in one statement (atomic by itself: no BEGIN/COMMIT)."""

        async def _insert(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return await conn.fetch(
                _INSERT,
                [job.kind for job in jobs], [job.params for job in jobs],
                [job.timeout_s for job in jobs], [job.owner for job in jobs],
                [job.submitted_by for job in jobs],
            )

        rows = await self.db.run(_insert, transaction=False)
        # A row a unique index refused (ON CONFLICT DO NOTHING) comes back with NULLs.
        found: list[Row | None] = [row if row["kind"] is not None else None for row in rows]
        self.feed.publish(JobChanged(None, row) for row in found if row is not None)
        return found

    async def apply(self, changes: Sequence[Change]) -> list[Row | None]:
        """Every change guarded by its statuses, owner and attempt; atomically.

        Usually a batch is one round of one shape: one statement, no BEGIN/COMMIT.
        """
        rounds = in_rounds(changes)
        statements: list[list[tuple[str, list[Any], list[list[int]], list[Change]]]] = []
        for round_ in rounds:
            by_shape: dict[tuple[bool, tuple[str, ...]], list[tuple[list[int], Change]]] = \
                defaultdict(list)
            for indexes, change in round_:
                shape = (isinstance(change, Transition), tuple(sorted(change.values)))
                by_shape[shape].append((indexes, change))
            parts = []
            for (sets_status, columns), items in by_shape.items():
                if not sets_status and not columns:
                    continue
                guards = [_guard(change) for _, change in items]
                args: list[Any] = [
                    [change.job_id for _, change in items],
                    [target for target, _ in guards], [allowed for _, allowed in guards],
                    [change.owner for _, change in items],
                    [change.attempt for _, change in items],
                ]
                args += [[change.values[name] for _, change in items] for name in columns]
                parts.append((_apply_sql(columns, sets_status), args,
                              [indexes for indexes, _ in items],
                              [change for _, change in items]))
            statements.append(parts)
        count = sum(len(parts) for parts in statements)
        results: list[Row | None] = [None] * len(changes)
        if not count:
            return results

        async def _apply(conn: asyncpg.Connection) -> list[dict[int, asyncpg.Record]]:
            found = []
            for parts in statements:
                for sql, args, _, _ in parts:
                    found.append({row["id"]: row for row in await conn.fetch(sql, *args)})
            return found

        found = iter(await self.db.run(_apply, transaction=count > 1))
        committed: list[JobChanged] = []
        progressed: list[JobChanged] = []
        for parts in statements:
            for _, _, indexes_list, applied in parts:
                rows = next(found)
                for indexes, change in zip(indexes_list, applied, strict=True):
                    row = rows.get(change.job_id)
                    for index in indexes:
                        results[index] = row
                    if row is not None and isinstance(change, Transition):
                        committed.append(JobChanged(change.event, row))
                    elif row is not None:
                        progressed.append(JobChanged(None, row))
        self.feed.publish(committed)
        self.progress.publish(progressed)
        return results

    async def get(self, job_id: int) -> Row | None:
        return await self.db.fetchrow(f"{_SELECT} WHERE id = $1", job_id)

    async def list(
        self, *, kind: str | None, statuses: Sequence[str] | None, before_id: int | None,
        limit: int, since: dt.datetime | None = None,
    ) -> Sequence[Row]:
        # ``since`` has no index of its own: the scan walks ids downwards, and the
        # table is bounded by retention, so a narrow window costs one pass at most.
        return await self.db.fetch(
            f"{_SELECT} WHERE ($1::text IS NULL OR kind = $1)"
            " AND ($2::text[] IS NULL OR status = ANY($2))"
            " AND ($3::bigint IS NULL OR id < $3)"
            " AND ($5::timestamptz IS NULL OR created_at >= $5)"
            " ORDER BY id DESC LIMIT $4",
            kind, list(statuses) if statuses else None, before_id, limit, since,
        )

    async def cancel_queued(self, job_id: int, owner: str, by: str | None = None) -> Row | None:
        """A live daemon's queued job is left to that daemon (``request_cancel``),
        which would otherwise still start it."""
        row = await self.db.fetchrow(
            _CANCEL_QUEUED, job_id, owner, next_status(Status.QUEUED, Event.CANCEL).value,
            Status.QUEUED.value, by)
        if row is not None:
            self.feed.publish([JobChanged(Event.CANCEL, row)])
        return row

    async def request_cancel(self, job_id: int, by: str | None = None) -> Row | None:
        """Record the request and NOTIFY it (delivered at commit to every daemon:
        the one holding the job stops it at once; the 1 s poll is the fallback)."""
        return await self.db.fetchrow(
            "WITH asked AS (UPDATE jobs"
            " SET cancel_requested_at = coalesce(cancel_requested_at, now()),"
            " cancelled_by = coalesce(cancelled_by, $3)"
            f" WHERE id = $1 AND status = ANY($2::text[]) RETURNING {_RETURNING})"
            f" SELECT asked.*, pg_notify('{CANCEL_CHANNEL}', asked.id::text) FROM asked",
            job_id, _values(ACTIVE), by)

    async def cancel_requests_among(self, job_ids: Sequence[int]) -> builtins.list[tuple[int, Any]]:
        rows = await self.db.fetch(
            "SELECT id, cancel_requested_at FROM jobs"
            " WHERE id = ANY($1::bigint[]) AND cancel_requested_at IS NOT NULL", list(job_ids))
        return [(row["id"], row["cancel_requested_at"]) for row in rows]

    async def dead_owners(self, owner: str) -> set[str]:
        rows = await self.db.fetch(
            "SELECT owner FROM (SELECT DISTINCT owner FROM jobs WHERE status = ANY($2::text[])"
            " AND owner IS NOT NULL AND owner <> $1) AS owners"
            f" WHERE pg_try_advisory_xact_lock({owner_lock_sql('owner')})",
            owner, _values(ACTIVE))
        return {row["owner"] for row in rows}

    async def release_orphans(self, owner: str, owners: Sequence[str] | None = None) -> int:
        """An owner is alive exactly while its process holds its advisory lock (a
        session lock dies with the connection, so a SIGKILLed daemon releases it
        at once): no lease to wait out, and a live daemon's jobs are never taken,
        so a job never runs twice at once. Released jobs are claimable; the dead
        owners' member rows go in the same transaction."""

        async def _release(conn: asyncpg.Connection) -> builtins.list[asyncpg.Record]:
            rows = await conn.fetch(
                _RELEASE, owner, _values(ACTIVE), _values(statuses_allowing(Event.RECOVER)),
                target_of(Event.RECOVER).value, None if owners is None else list(owners))
            await conn.execute(
                "DELETE FROM cluster_members WHERE owner <> $1"
                " AND ($2::text[] IS NULL OR owner = ANY($2::text[]))"
                f" AND pg_try_advisory_xact_lock({owner_lock_sql('owner')})",
                owner, None if owners is None else list(owners))
            return rows

        rows = await self.db.run(_release)
        recoverable = {status.value for status in statuses_allowing(Event.RECOVER)}
        self.feed.publish(JobChanged(Event.RECOVER, row) for row in rows
                          if row["was"] in recoverable)
        return len(rows)

    async def claim(self, owner: str, wants: Mapping[str, int],
                    cluster_limits: Mapping[str, int]) -> builtins.list[Row]:
        """Take up to ``wants[kind]`` claimable jobs of each kind for ``owner``,
        oldest first; a kind in ``cluster_limits`` only while fewer than its limit
        of its jobs are owned and unfinished across the cluster."""
        free = {kind: n for kind, n in wants.items() if n > 0 and kind not in cluster_limits}
        limited = {kind: n for kind, n in wants.items() if n > 0 and kind in cluster_limits}
        rows: builtins.list[Row] = []
        if free:
            rows += await self.db.fetch(_CLAIM, owner, builtins.list(free),
                                        builtins.list(free.values()), Status.QUEUED.value)
        for kind, n in limited.items():

            async def _claim_limited(conn: asyncpg.Connection, kind: str = kind,
                                     n: int = n) -> builtins.list[asyncpg.Record]:
                await conn.execute(f"SELECT pg_advisory_xact_lock({kind_lock_sql('$1')})",
                                   kind)
                return await conn.fetch(_CLAIM_LIMITED, owner, kind, n, cluster_limits[kind],
                                        _values(ACTIVE), Status.QUEUED.value)

            rows += await self.db.run(_claim_limited)
        return rows

    async def count_claimable(self, up_to: int) -> int:
        """How many jobs nobody holds wait in the table (counted up to ``up_to``)."""
        return await self.db.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE status = $1 AND owner IS NULL"
            " LIMIT $2) AS claimable", Status.QUEUED.value, up_to)

    async def join(self, owner: str) -> None:
        await self.db.execute("INSERT INTO cluster_members (owner) VALUES ($1)"
                              " ON CONFLICT DO NOTHING", owner)

    async def leave(self, owner: str) -> None:
        """A clean stop: our member row goes, and our queued jobs go back to the
        pool at once (nothing of ours runs any more), for peers to claim."""

        async def _leave(conn: asyncpg.Connection) -> None:
            await conn.execute("UPDATE jobs SET owner = NULL WHERE owner = $1 AND status = $2",
                               owner, Status.QUEUED.value)
            await conn.execute("DELETE FROM cluster_members WHERE owner = $1", owner)

        await self.db.run(_leave)

    async def dead_members(self, owner: str) -> set[str]:
        rows = await self.db.fetch(
            "SELECT owner FROM cluster_members WHERE owner <> $1"
            f" AND pg_try_advisory_xact_lock({owner_lock_sql('owner')})", owner)
        return {row["owner"] for row in rows}

    @asynccontextmanager
    async def listen(self, signals: ClusterSignals) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
        from .cluster import listen_for_cluster

        async with listen_for_cluster(self.db, signals) as alive:
            yield alive

    async def queued_for(self, owner: str, after_id: int, limit: int) -> Sequence[Row]:
        return await self.db.fetch(
            f"{_SELECT} WHERE owner = $1 AND status = $2 AND id > $3 ORDER BY id LIMIT $4",
            owner, Status.QUEUED.value, after_id, limit,
        )


    async def recover_own(self, owner: str, held: Sequence[int]) -> int:
        rows = await self.db.fetch(
            f"UPDATE jobs SET status = $3 WHERE owner = $1 AND status = ANY($4::text[])"
            f" AND NOT (id = ANY($2::bigint[])) RETURNING {_RETURNING}",
            owner, list(held), target_of(Event.RECOVER).value,
            _values(statuses_allowing(Event.RECOVER)))
        self.feed.publish(JobChanged(Event.RECOVER, row) for row in rows)
        return len(rows)

    async def add_notes(self, notes: Sequence[JobNote]) -> builtins.list[None]:
        return await insert_notes(self.db, notes)

    async def rerun(self, job_id: int, owner: str | None) -> Row | None:
        try:
            [row] = await self.apply([rerun_change(job_id, owner)])
        except asyncpg.UniqueViolationError:  # jobs_one_active_fetch
            kind = await self.db.fetchval("SELECT kind FROM jobs WHERE id = $1", job_id)
            raise JobConflict(kind) from None
        return row


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


async def uploads_in_use(db: Database, kind: str = "migration",
                         keep_ended_s: float = 0.0) -> set[str]:
    """``params.upload`` of every job of ``kind`` that may still read its file: the
    unfinished ones, and those that ended otherwise than completed less than
    ``keep_ended_s`` ago (a retry resumes them from the file)."""
    rows = await db.fetch(
        "SELECT params->>'upload' AS upload FROM jobs WHERE kind = $1 AND params ? 'upload'"
        " AND (status = ANY($2::text[]) OR (status = ANY($3::text[])"
        " AND finished_at > now() - make_interval(secs => $4)))",
        kind, _values(ACTIVE), _values(statuses_allowing(Event.RERUN)), keep_ended_s)
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


async def status_constraint(db: Database) -> list[str]:
    """The statuses the table's CHECK constraint allows (tested against ``Status``)."""
    definition = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'jobs'::regclass AND contype = 'c'"
        " AND pg_get_constraintdef(oid) LIKE '%status%'")
    return sorted(re.findall(r"'([a-z_]+)'::text", definition or ""))


async def counts_by_kind_and_status(
    db: Database, statuses: Iterable[Status]
) -> dict[tuple[str, str], int]:
    """``(kind, status) -> jobs`` for ``statuses``, across every daemon sharing the
    table (one statement; the metrics scrape reads it, cached)."""
    rows = await db.fetch(
        "SELECT kind, status, count(*) AS jobs FROM jobs WHERE status = ANY($1::text[])"
        " GROUP BY kind, status", _values(statuses))
    return {(row["kind"], row["status"]): row["jobs"] for row in rows}


async def delete_finished_before(db: Database, older_than_s: float, limit: int) -> int:
    """Delete up to ``limit`` terminal jobs that finished more than ``older_than_s``
    ago (oldest first; their rejects go with them, ``ON DELETE CASCADE``); returns
    how many. Bounded, so one sweep never holds a long lock or a huge transaction."""
    status = await db.execute(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status = ANY($1::text[])"
        " AND finished_at < now() - make_interval(secs => $2) ORDER BY id LIMIT $3)",
        _values(TERMINAL), older_than_s, limit)
    return int(status.split()[-1]) if status else 0

