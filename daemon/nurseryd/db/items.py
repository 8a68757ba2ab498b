"""Every SQL statement about the ``items`` table: batched upserts of fetched items.

One round trip per batch: the whole batch travels as *one* text parameter, a
JSON array of rows that the fetch's parse thread already serialised (see
``Item.row_json`` in ``kinds/fetch/parse.py``), and PostgreSQL unpacks it in C.
Measured against nine typed arrays, this takes the per-element encoding off the
event loop's thread, which matters because that thread shares the GIL with the
parse threads. The statement also says what happened to each row, because the
job result must tell new from updated from unchanged items: ``xmax = 0`` marks
an insert, and ``updated_at`` moves only when the content hash differs, so
``updated_at = now()`` marks a changed row (one batch is one transaction and
never holds an id twice).

Why not ``DO UPDATE ... WHERE content_hash IS DISTINCT FROM`` plus a second
``UPDATE`` for ``last_seen_at`` of the unchanged rows: that second statement is a
join whose plan (measured) hashes every row of the source, so each batch cost
grew with the table (14 ms for 250 items at 10k rows). Arbiter-index probes keep
the cost per batch flat; an unchanged row gets a new ``last_seen_at`` either way.

This module takes rows already serialised, not the fetch kind's ``Item``: the
database layer does not depend on any kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from .database import Database

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


@dataclass(frozen=True)
class UpsertCounts:
    new: int = 0
    updated: int = 0
    unchanged: int = 0


async def _upsert(conn: asyncpg.Connection, source: str, rows_json: str) -> asyncpg.Record:
    row = await conn.fetchrow(UPSERT_ITEMS, source, rows_json)
    assert row is not None  # an aggregate without GROUP BY yields exactly one row
    return row


async def upsert_items(db: Database, source: str, rows_json: Sequence[str]) -> UpsertCounts:
    """Upsert one batch (ids unique within it) in one transaction and one round trip.

    ``rows_json`` holds one JSON array per item, ``[id, title, url, published_at,
    author, summary, hash_hex, raw]``; only joining them happens here, on the
    event loop's thread.
    """
    if not rows_json:
        return UpsertCounts()
    row = await db.run(_upsert, source, "[" + ",".join(rows_json) + "]")
    return UpsertCounts(new=row["new"], updated=row["updated"], unchanged=row["unchanged"])


async def delete_unseen_before(db: Database, older_than_s: float, limit: int) -> int:
    """Delete up to ``limit`` items no fetch has seen for ``older_than_s`` seconds
    (their source dropped them, or the source is gone); returns how many. Bounded
    like every retention statement: one sweep never holds a long lock."""
    status = await db.execute(
        "DELETE FROM items WHERE ctid IN (SELECT ctid FROM items"
        " WHERE last_seen_at < now() - make_interval(secs => $1) LIMIT $2)",
        older_than_s, limit)
    return int(status.split()[-1]) if status else 0
