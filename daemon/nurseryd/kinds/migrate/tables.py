"""Make each target's table exist, or prove an existing one fits (at start-up).

Why refuse to start on a mismatch: a table whose column types, NULL rules or
key differ from the target would fail every batch at 3 a.m. (or, worse, accept
rows into the wrong shape). Types are compared the way PostgreSQL spells them:
the configured DDL is created as a throw-away temp table and both are read back
through ``format_type``, so ``int8``/``bigint`` or ``timestamptz``/``timestamp
with time zone`` never cause a false alarm.
"""

from __future__ import annotations

import asyncpg

from ...db import Database
from ...db.quoting import quote_ident
from .coerce import parse_column_type
from .targets import Target


class TargetMismatch(RuntimeError):
    """An existing table does not fit its target; ``str()`` is the operator's line."""


def create_table_sql(target: Target, table_sql: str | None = None) -> str:
    columns = [f"{quote_ident(c.name)} {parse_column_type(c.type).sql}"
               f"{'' if c.nullable else ' NOT NULL'}" for c in target.columns]
    columns.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in target.key)})")
    return f"CREATE TABLE {table_sql or target.quoted_table} ({', '.join(columns)})"


_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, a.atthasdef OR a.attidentity <> '' AS has_default
FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_UNIQUE_KEYS = """
SELECT array_agg(a.attname ORDER BY a.attname) AS columns
FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid
"""


async def _ensure(conn: asyncpg.Connection, target: Target) -> str:
    schema, table = target.schema_and_table
    exists = await conn.fetchval("SELECT to_regclass($1)", target.quoted_table)
    if exists is None:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(create_table_sql(target))
        return "created"
    await conn.execute(create_table_sql(target, "pg_temp.nurseryd_probe").replace(
        "CREATE TABLE", "CREATE TEMP TABLE", 1) + " ON COMMIT DROP")
    expected = {row["name"]: row for row in await conn.fetch(_COLUMNS, "pg_temp.nurseryd_probe")}
    actual = {row["name"]: row for row in await conn.fetch(_COLUMNS, target.quoted_table)}
    problems: list[str] = []
    for column in target.columns:
        want = expected[column.name]
        have = actual.get(column.name)
        if have is None:
            problems.append(f"column {column.name} is missing")
            continue
        if have["type"] != want["type"]:
            problems.append(f"column {column.name} is {have['type']}, the target says "
                            f"{want['type']}")
        if have["not_null"] and column.nullable:
            problems.append(f"column {column.name} is NOT NULL, the target says nullable")
    for name, have in actual.items():
        if name not in expected and have["not_null"] and not have["has_default"]:
            problems.append(f"column {name} is NOT NULL without a default and not in the "
                            "target, so no row could be inserted")
    keys = [sorted(row["columns"]) for row in await conn.fetch(_UNIQUE_KEYS, target.quoted_table)]
    if sorted(target.key) not in keys:
        problems.append(f"no primary key or unique index on exactly ({', '.join(target.key)}), "
                        "which the upsert needs")
    if problems:
        raise TargetMismatch(
            f"table {schema}.{table} does not match target {target.name!r}: "
            + "; ".join(problems)
            + f". Fix the table, or the [targets.{target.name}] section of the config file")
    return "verified"


async def ensure_target_table(db: Database, target: Target) -> str:
    """Create the table if missing (returns 'created') or verify it ('verified')."""
    return await db.run(_ensure, target)
