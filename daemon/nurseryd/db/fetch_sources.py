"""Every SQL statement about the ``fetch_sources`` table: what each fetch source last did.

One row per configured source name, written after every fetch of that source
(even one being cancelled: it is what ``GET /fetch`` shows). It also keeps the
source's HTTP validators (ETag / Last-Modified) for conditional GETs. They belong
to a URL: they change only on success, and a changed URL drops the old ones, so
a source pointed elsewhere never sends another server's validators and gets a
wrong 304. Errors and success times are kept across outcomes (``COALESCE``), so
the row says both when the source last worked and what last went wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .database import Database

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
class Validators:
    etag: str | None
    last_modified: str | None


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
    """Every recorded source by name (including ones no longer configured)."""
    return {row["name"]: dict(row) for row in await db.fetch(SOURCE_STATES)}
