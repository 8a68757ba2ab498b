"""The PostgreSQL boundary against a real server."""

from __future__ import annotations

from collections.abc import Iterable

import trio

from nurseryd.db import Database
from nurseryd.db.migrate import apply_migrations, bundled_migrations
from nurseryd.kinds.migrate.pipeline import COPY_SLICE, copy_slices


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


async def _max_scheduling_gap(work) -> tuple[float, object]:
    """Run ``work()`` while a task ticks every millisecond; the longest gap between
    ticks is how long the event loop was frozen."""
    gaps: list[float] = []
    result: list[object] = []

    async def ticker(done: trio.Event) -> None:
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.001)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker, done)
        await trio.sleep(0.01)
        result.append(await work())
        done.set()
    return max(gaps), result[0]


def _copy_text(rows: Iterable[tuple[object, ...]]) -> bytes:
    """Rows as COPY text (tab-separated, one line each), as the coercer writes them."""
    return "".join("\t".join(map(str, row)) + "\n" for row in rows).encode()


async def _no_copy_or_open_transaction_left(db: Database) -> None:
    """Wait until no other session of this database is copying or idle in a
    transaction (the server finishes a cancelled COPY asynchronously)."""
    with trio.fail_after(5):
        while True:
            rows = await db.fetch(
                "SELECT state, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND ((state = 'active' AND query LIKE 'COPY%')"
                "      OR state LIKE 'idle in transaction%')"
            )
            if not rows:
                break
            await trio.sleep(0.01)
    idle_in_tx = "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in%'"
    assert await db.fetchval(idle_in_tx) == 0


async def test_copy_fed_by_the_pipeline_slicer_keeps_the_loop_responsive(db: Database) -> None:
    """Trap (b): a COPY must not freeze every other task (and cancellation) while
    it runs. The migration pipeline feeds its COPY text through ``copy_slices``,
    which hands control back after every slice, whatever the socket buffers do.
    (Handed this payload as one piece, asyncpg 0.32 over this unix socket froze
    the loop for ~200 ms, so this test does catch the trap.)"""
    rows = [(i, f"row {i} " * 20, i * 0.5) for i in range(300_000)]
    payload = _copy_text(rows)
    assert len(payload) > 100 * COPY_SLICE  # many slices, so many yields to measure
    await db.execute("CREATE TABLE copied (id int, label text, value float8)")

    async def copy_sliced(conn) -> str:  # asyncio side, as in the pipeline's batch
        return await conn.copy_to_table("copied", source=copy_slices(payload),
                                        columns=["id", "label", "value"], format="text")

    longest_gap, _ = await _max_scheduling_gap(lambda: db.run(copy_sliced))
    assert await db.fetchval("SELECT count(*) FROM copied") == len(rows)
    assert await db.fetchval("SELECT sum(id) FROM copied") == sum(row[0] for row in rows)
    assert longest_gap < 0.1, f"loop frozen for {longest_gap * 1000:.0f} ms"


async def test_cancel_lands_during_a_sliced_copy_and_rolls_it_back(db: Database) -> None:
    # ~80 MB: well over a second of COPY here, so the cancel lands in the middle.
    payload = _copy_text((i, f"row {i}") for i in range(4_000_000))
    await db.execute("CREATE TABLE copied (id int, label text)")

    async def copy_sliced(conn) -> str:
        return await conn.copy_to_table("copied", source=copy_slices(payload),
                                        columns=["id", "label"], format="text")

    started = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await db.run(copy_sliced)
    assert scope.cancelled_caught
    assert trio.current_time() - started < 0.2 + 0.1
    assert await db.fetchval("SELECT count(*) FROM copied") == 0  # rolled back
    await _no_copy_or_open_transaction_left(db)
    assert await db.fetchval("SELECT 1") == 1  # and the pool is healthy
