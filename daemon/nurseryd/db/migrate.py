"""Versioned schema migrations, applied at start under an advisory lock.

Files in ``migrations/`` are named ``NNNN_description.sql`` and applied in order,
each in its own transaction together with its row in ``schema_migrations``. The
advisory lock makes concurrent starts (two daemons, or a test and a daemon)
apply each version exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from .database import Database

#: Arbitrary constant: "nurseryd schema" as a 64-bit advisory lock key.
MIGRATION_LOCK_KEY = 0x6E75727365727964


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The migrations shipped in the package, ordered by version."""
    found = []
    for entry in resources.files("nurseryd.db").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[int]:
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name,
                )
            applied.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


async def apply_migrations(db: Database, migrations: list[Migration] | None = None) -> list[int]:
    """Apply what is missing; returns the versions applied now."""
    return await db.run(_apply, migrations or bundled_migrations(), transaction=False)
