"""Every SQL statement about the ``migration_rejects`` table: rows a migration refused.

A reject is written in the same transaction as its batch and the job's
checkpoint, so :func:`insert_rejects_in` takes the batch's connection (asyncio
side) instead of a :class:`Database`: a SIGKILL then loses the batch, its
rejects and its checkpoint together, and the resumed job writes them once.
``ON CONFLICT DO NOTHING`` on ``(job_id, row_number)``: should rows ever be
written again (a job restarted from the beginning, say), a row number is still
stored once per job and the batch does not fail on it.

The whole batch of rejects is one statement: four arrays unnested by
PostgreSQL, the raw values as JSON text cast to ``jsonb`` there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg

from .database import Database

_INSERT = (
    "INSERT INTO migration_rejects (job_id, row_number, column_name, reason, raw) "
    "SELECT $1, r.row_number, r.column_name, r.reason, r.raw::jsonb "
    "FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[]) "
    "AS r(row_number, column_name, reason, raw) "
    "ON CONFLICT (job_id, row_number) DO NOTHING")

_PAGE = (
    "SELECT row_number, column_name, reason, raw FROM migration_rejects"
    " WHERE job_id = $1 AND row_number > $2 ORDER BY row_number LIMIT $3")


class Reject(Protocol):
    """What a rejected row carries (the migrate kind's ``RejectRecord`` fits)."""

    @property
    def row_number(self) -> int: ...
    @property
    def column(self) -> str | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def raw(self) -> dict[str, Any]: ...


async def insert_rejects_in(conn: asyncpg.Connection, job_id: int,
                            rejects: Sequence[Reject]) -> None:
    """Asyncio side, inside the caller's (the batch's) transaction: store ``rejects``."""
    if not rejects:
        return
    await conn.execute(
        _INSERT, job_id,
        [r.row_number for r in rejects], [r.column for r in rejects],
        [r.reason for r in rejects],
        [json.dumps(r.raw, ensure_ascii=False, default=str) for r in rejects])


async def page(db: Database, job_id: int, after: int, limit: int) -> list[asyncpg.Record]:
    """Up to ``limit`` rejects of a job with row numbers above ``after``, in row order
    (keyset pagination: ``after`` is the last row number the caller saw)."""
    return await db.fetch(_PAGE, job_id, after, limit)
