"""The PostgreSQL boundary against a real server."""

from __future__ import annotations

import trio

from nurseryd.db import Database
from nurseryd.db.migrate import apply_migrations, bundled_migrations


async def test_migrations_apply_once_and_record_versions(db: Database) -> None:
    versions = [migration.version for migration in bundled_migrations()]
    assert await apply_migrations(db) == []  # the fixture applied them already
    rows = await db.fetch("SELECT version FROM schema_migrations ORDER BY version")
    assert [row["version"] for row in rows] == versions


async def test_jsonb_round_trips_as_python_values(db: Database) -> None:
    value = await db.fetchval("SELECT $1::jsonb", {"a": [1, "two", None]})
    assert value == {"a": [1, "two", None]}


async def test_cancelled_query_is_cancelled_on_server_and_connection_is_healthy(
    db: Database,
) -> None:
    """Trap (a): a Trio cancel in the middle of a statement must not leak the
    connection nor leave it idle in an aborted transaction."""

    async def long_query(conn, seconds):  # asyncio side, inside a transaction
        await conn.execute("CREATE TEMP TABLE scratch (x int)")
        await conn.execute("SELECT pg_sleep($1)", seconds)

    with trio.move_on_after(0.2) as scope:
        await db.run(long_query, 30)
    assert scope.cancelled_caught
    # Nothing of ours left running or idle-in-transaction on the server.
    with trio.fail_after(5):
        while True:
            rows = await db.fetch(
                "SELECT state, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND (query LIKE '%pg_sleep%' OR state LIKE 'idle in transaction%')"
            )
            if not rows:
                break
            await trio.sleep(0.01)
    # Every pooled connection still works, and none is stuck in a transaction.
    async with trio.open_nursery() as nursery:
        for _ in range(db.pool.get_max_size()):
            nursery.start_soon(db.fetchval, "SELECT 1")
    assert db.pool.get_size() <= db.pool.get_max_size()
    idle_in_tx = "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in%'"
    assert await db.fetchval(idle_in_tx) == 0
