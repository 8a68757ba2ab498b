"""Source databases for migration tests and the benchmark: real SQLite files and
real PostgreSQL databases, filled server-side (``generate_series`` / a recursive
CTE), so 100k or 1M rows cost a fraction of a second and no Python loop.

Every source row ``i`` (1..n) is the same in both engines and maps onto the
built-in ``chats`` target; ``legacy_note`` is a column the target lacks.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nurseryd.config import Settings, load_settings, sections_of
from nurseryd.db import Database
from nurseryd.features import FEATURES
from tests.job_context import RecordingContext

SQLITE_SCHEMA = """
CREATE TABLE chats (
    chat_id INTEGER PRIMARY KEY, external_id TEXT NOT NULL, customer_name TEXT,
    customer_email TEXT, phone TEXT, channel TEXT, status TEXT, created_at TEXT,
    closed_at TEXT, message_count INTEGER, rating REAL, last_message TEXT, is_vip INTEGER,
    legacy_note TEXT)
"""

SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM n WHERE i < {stop})
INSERT INTO chats SELECT
    100000 + i, 'CH-' || i, 'Customer ' || i, 'user' || i || '@example.org',
    CASE WHEN i % 7 = 0 THEN NULL ELSE '+7 916 ' || i END,
    CASE i % 4 WHEN 0 THEN 'telegram' WHEN 1 THEN 'whatsapp' WHEN 2 THEN 'web' ELSE 'email' END,
    CASE i % 3 WHEN 0 THEN 'closed' WHEN 1 THEN 'open' ELSE 'pending' END,
    strftime('%Y-%m-%d %H:%M:%S', '2023-01-01 08:00:00', '+' || i || ' minutes'),
    CASE WHEN i % 3 = 0
         THEN strftime('%Y-%m-%d %H:%M:%S', '2023-01-01 08:30:00', '+' || i || ' minutes') END,
    1 + i % 40, CASE WHEN i % 3 = 0 THEN 1.0 + (i % 41) / 10.0 END,
    'Здравствуйте! Заказ №' || i || char(10) || 'таб' || char(9), i % 14 = 0, 'note ' || i
FROM n
"""

PG_SCHEMA = """
CREATE TABLE legacy_chats (
    chat_id bigint PRIMARY KEY, external_id text NOT NULL, customer_name text,
    customer_email text, phone text, channel text, status text, created_at timestamptz,
    closed_at timestamptz, message_count integer, rating double precision, last_message text,
    is_vip boolean, legacy_note text)
"""

PG_FILL = """
INSERT INTO legacy_chats SELECT
    100000 + i, 'CH-' || i, 'Customer ' || i, 'user' || i || '@example.org',
    CASE WHEN i % 7 = 0 THEN NULL ELSE '+7 916 ' || i END,
    (ARRAY['telegram', 'whatsapp', 'web', 'email'])[i % 4 + 1],
    (ARRAY['closed', 'open', 'pending'])[i % 3 + 1],
    timestamptz '2023-01-01 08:00:00+00' + i * interval '1 minute',
    CASE WHEN i % 3 = 0 THEN timestamptz '2023-01-01 08:30:00+00' + i * interval '1 minute' END,
    1 + i % 40, CASE WHEN i % 3 = 0 THEN 1.0 + (i % 41) / 10.0 END,
    'Здравствуйте! Заказ №' || i || E'\\nтаб\\t', i % 14 = 0, 'note ' || i
FROM generate_series($1::bigint, $2::bigint) AS i
"""


def make_sqlite_source(path: Path, rows: int, *, start: int = 1) -> Path:
    """A SQLite file with ``rows`` chats (ids 100000+start ...)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        if start == 1:
            conn.execute(SQLITE_SCHEMA)
        if rows:
            conn.execute(SQLITE_FILL.format(start=start, stop=start + rows - 1))
        conn.commit()
    finally:
        conn.close()
    return path


def pg_fill_sql() -> tuple[str, str]:
    return PG_SCHEMA, PG_FILL


def settings_with(base: Settings, toml: str) -> Settings:
    """``base`` with the feature sections parsed from ``toml`` (as the daemon would)."""
    raw: dict[str, Any] = tomllib.loads(toml)
    sections = dict(base.sections)
    for name, section in sections_of(FEATURES).items():
        if name in raw:
            sections[name] = section.parse(raw[name], raw)
    return dataclasses.replace(base, sections=sections)


def plain_settings(toml: str = "") -> Settings:
    return settings_with(load_settings(None, environ={}, features=FEATURES), toml)


def expected_chat(i: int) -> dict[str, Any]:
    """A few fields of source row ``i`` as the target must hold them."""
    return {"chat_id": 100000 + i, "external_id": f"CH-{i}",
            "phone": None if i % 7 == 0 else f"+7 916 {i}",
            "message_count": 1 + i % 40, "is_vip": i % 14 == 0,
            "last_message": f"Здравствуйте! Заказ №{i}\nтаб"}  # text is trimmed


def SourceContext(db: Database, job_id: int, settings: Settings,
                  checkpoint: Any = None) -> RecordingContext:
    """A migration job's context over the real jobs table; ``on_report`` may interrupt."""
    return RecordingContext(db, job_id, settings, checkpoint=checkpoint, kind="migration")


async def new_job(db: Database) -> int:
    return await db.fetchval(
        "INSERT INTO jobs (kind, timeout_s, status) VALUES ('migration', 60, 'running')"
        " RETURNING id")


class StopAfter:
    """Runs a real source but intervenes after ``batches`` batches: by default it
    breaks off the way a crash would (the pipeline commits what it received,
    then the job fails); with ``action`` it awaits ``action()`` and goes on.

    An intervention at an exact point (a cancel from a progress report lands
    wherever the pipeline's group commit happens to be), so tests know what
    was committed and what the source was doing.
    """

    def __init__(self, inner: Any, batches: int,
                 action: Callable[[], Any] | None = None) -> None:
        self.inner = inner
        self.batches = batches
        self.action = action
        self.source_type = inner.source_type

    async def run(self, columns: Any, resume: Any, send: Any) -> None:
        import trio

        from nurseryd.kinds.migrate.sources.base import SourceBatch, SourceError

        inner_send, inner_receive = trio.open_memory_channel[Any](0)
        forwarded = 0
        stopped = False

        async def run_inner() -> None:
            async with inner_send:
                await self.inner.run(columns, resume, inner_send)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_inner)
            async with inner_receive:
                async for event in inner_receive:
                    if isinstance(event, SourceBatch):
                        if forwarded == self.batches:
                            if self.action is None:
                                stopped = True
                                nursery.cancel_scope.cancel()
                                break
                            await self.action()
                        forwarded += 1
                    await send.send(event)
        if stopped:
            raise SourceError(f"interrupted after {forwarded} batches")

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()
