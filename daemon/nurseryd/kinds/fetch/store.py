"""The fetch's SQL: batched item upserts and per-source state.

One round trip per batch: the batch travels as parallel arrays and is unnested on
the server, so a thousand items cost one statement, not a thousand. The statement
also says what happened to each row, because the job result must tell new from
updated from unchanged items:

- ``written`` inserts new rows and rewrites rows whose content hash changed
  (``xmax = 0`` marks an insert);
- ``touched`` only moves ``last_seen_at`` of rows whose hash is the same, which
  keeps unchanged items cheap (no new jsonb, no index churn: a HOT update).

Both CTEs see the table as it was before the statement, so no row is counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ...db import Database
from .parse import Item

UPSERT_ITEMS = """
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
                         $7::text[], $8::text[], $9::bytea[])
        AS t(external_id, title, url, published_at, author, summary, raw, content_hash)
),
written AS (
    INSERT INTO items AS i (source, external_id, title, url, published_at, author, summary,
                            raw, content_hash)
    SELECT $1, external_id, title, url, published_at, author, summary, raw::jsonb, content_hash
    FROM input
    ON CONFLICT (source, external_id) DO UPDATE SET
        title = EXCLUDED.title, url = EXCLUDED.url, published_at = EXCLUDED.published_at,
        author = EXCLUDED.author, summary = EXCLUDED.summary, raw = EXCLUDED.raw,
        content_hash = EXCLUDED.content_hash, last_seen_at = now(), updated_at = now()
    WHERE i.content_hash IS DISTINCT FROM EXCLUDED.content_hash
    RETURNING (i.xmax = 0) AS inserted
),
touched AS (
    UPDATE items AS i SET last_seen_at = now()
    FROM input
    WHERE i.source = $1 AND i.external_id = input.external_id
      AND i.content_hash = input.content_hash
    RETURNING 1
)
SELECT count(*) FILTER (WHERE inserted) AS new,
       count(*) FILTER (WHERE NOT inserted) AS updated,
       (SELECT count(*) FROM touched) AS unchanged
FROM written
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


async def _upsert(conn: asyncpg.Connection, source: str, items: Sequence[Item]) -> asyncpg.Record:
    return await conn.fetchrow(
        UPSERT_ITEMS, source,
        [item.external_id for item in items],
        [item.title for item in items],
        [item.url for item in items],
        [item.published_at for item in items],
        [item.author for item in items],
        [item.summary for item in items],
        [item.raw_json for item in items],
        [item.content_hash for item in items],
    )


async def upsert_items(db: Database, source: str, items: Sequence[Item]) -> UpsertCounts:
    """Upsert one batch (ids unique within it) in one transaction and one round trip."""
    if not items:
        return UpsertCounts()
    row = await db.run(_upsert, source, items)
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
