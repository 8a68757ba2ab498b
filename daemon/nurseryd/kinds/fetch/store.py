"""The fetch's SQL: batched item upserts and per-source state.

One round trip per batch: the whole batch travels as *one* text parameter, a
JSON array of rows that the parse thread already serialised (see
``Item.row_json``), and PostgreSQL unpacks it in C. Measured against nine typed
arrays, this takes the per-element encoding off the event loop's thread, which
matters because that thread shares the GIL with the parse threads. The
statement also says what happened to each row, because the job result must tell
new from updated from unchanged items: ``xmax = 0`` marks an insert, and
``updated_at`` moves only when the content hash differs, so ``updated_at =
now()`` marks a changed row (one batch is one transaction and never holds an id
twice).

Why not ``DO UPDATE ... WHERE content_hash IS DISTINCT FROM`` plus a second
``UPDATE`` for ``last_seen_at`` of the unchanged rows: that second statement is a
join whose plan (measured) hashes every row of the source, so each batch cost
grew with the table (14 ms for 250 items at 10k rows). Arbiter-index probes keep
the cost per batch flat; an unchanged row gets a new ``last_seen_at`` either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ...db import Database
from .parse import Item

UPSERT_ITEMS = """
WITH upserted AS (
    INSERT INTO items AS i (source, external_id, title, url, published_at, author, summary,
                            content_hash, raw)
    SELECT $1, r->>0, r->>1, r->>2, (r->>3)::timestamptz, r->>4, r->>5,
           decode(r->>6, 'hex'), r->7
    FROM jsonb_array_elements($2::text::jsonb) AS r
    ON CONFLICT (source, external_id) DO UPDATE SET
        title = EXCLUDED.title, url = EXCLUDED.url, published_at = EXCLUDED.published_at,
        author = EXCLUDED.author, summary = EXCLUDED.summary, raw = EXCLUDED.raw,
        content_hash = EXCLUDED.content_hash, last_seen_at = now(),
        updated_at = CASE WHEN i.content_hash = EXCLUDED.content_hash THEN i.updated_at
                          ELSE now() END
    RETURNING (i.xmax = 0) AS inserted, (i.updated_at = now()) AS changed
)
SELECT count(*) FILTER (WHERE inserted) AS new,
       count(*) FILTER (WHERE changed AND NOT inserted) AS updated,
       count(*) FILTER (WHERE NOT changed) AS unchanged
FROM upserted
"""

SAVE_SOURCE_STATE = """
INSERT INTO fetch_sources AS s (name, url, etag, last_modified, last_outcome, last_status,
                                last_job_id, last_success_at, last_error, last_error_at)
VALUES ($1, $2, $3, $4, $5, $6, $7,
        CASE WHEN $8 THEN now() END, $9, CASE WHEN $9::text IS NOT NULL THEN now() END)
ON CONFLICT (name) DO UPDATE SET
    url = EXCLUDED.url,
    -- Validators change only on success; a URL change drops the old ones.
    etag = CASE WHEN $8 THEN EXCLUDED.etag
                WHEN s.url IS DISTINCT FROM EXCLUDED.url THEN NULL ELSE s.etag END,
    last_modified = CASE WHEN $8 THEN EXCLUDED.last_modified
                         WHEN s.url IS DISTINCT FROM EXCLUDED.url THEN NULL
                         ELSE s.last_modified END,
    last_outcome = EXCLUDED.last_outcome,
    last_status = EXCLUDED.last_status,
    last_job_id = EXCLUDED.last_job_id,
    last_success_at = COALESCE(EXCLUDED.last_success_at, s.last_success_at),
    last_error = COALESCE(EXCLUDED.last_error, s.last_error),
    last_error_at = COALESCE(EXCLUDED.last_error_at, s.last_error_at),
    updated_at = now()
"""

SOURCE_STATES = """
SELECT name, url, etag, last_modified, last_outcome, last_status, last_job_id,
       last_success_at, last_error, last_error_at
FROM fetch_sources ORDER BY name
"""


@dataclass(frozen=True)
class UpsertCounts:
    new: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass(frozen=True)
class Validators:
    etag: str | None
    last_modified: str | None


async def _upsert(conn: asyncpg.Connection, source: str, rows_json: str) -> asyncpg.Record:
    return await conn.fetchrow(UPSERT_ITEMS, source, rows_json)


async def upsert_items(db: Database, source: str, items: Sequence[Item]) -> UpsertCounts:
    """Upsert one batch (ids unique within it) in one transaction and one round trip."""
    if not items:
        return UpsertCounts()
    rows_json = "[" + ",".join(item.row_json for item in items) + "]"
    row = await db.run(_upsert, source, rows_json)
    return UpsertCounts(new=row["new"], updated=row["updated"], unchanged=row["unchanged"])


async def load_validators(db: Database, name: str, url: str) -> Validators:
    """The ETag / Last-Modified saved for this source, if they belong to this URL."""
    row = await db.fetchrow("SELECT url, etag, last_modified FROM fetch_sources WHERE name = $1",
                            name)
    if row is None or row["url"] != url:
        return Validators(None, None)
    return Validators(row["etag"], row["last_modified"])


async def save_source_state(
    db: Database,
    *,
    name: str,
    url: str,
    outcome: str,
    status: int | None,
    job_id: int,
    success: bool,
    validators: Validators | None = None,
    error: str | None = None,
) -> None:
    validators = validators or Validators(None, None)
    await db.execute(SAVE_SOURCE_STATE, name, url, validators.etag, validators.last_modified,
                     outcome, status, job_id, success, error)


async def source_states(db: Database) -> dict[str, dict[str, Any]]:
    return {row["name"]: dict(row) for row in await db.fetch(SOURCE_STATES)}


async def active_fetch_id(db: Database) -> int | None:
    """The queued or running fetch job (at most one: see ``jobs_one_active_fetch``)."""
    return await db.fetchval(
        "SELECT id FROM jobs WHERE kind = 'fetch' AND status IN ('queued', 'running')"
        " ORDER BY id DESC LIMIT 1"
    )


async def latest_fetch_id(db: Database) -> int | None:
    return await db.fetchval("SELECT max(id) FROM jobs WHERE kind = 'fetch'")
