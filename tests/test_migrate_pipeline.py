"""The migration pipeline against real PostgreSQL, driven by a list-fed source.

The context (tests/job_context.py) implements the JobContext protocol over the
real jobs table (the supervisor's own context is exercised end to end).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
import trio

from nurseryd.db import Database
from nurseryd.kinds.base import JobFailed
from nurseryd.kinds.migrate.pipeline import LoadPlan, run_pipeline
from nurseryd.kinds.migrate.sources.base import ListSource
from nurseryd.kinds.migrate.tables import TargetMismatch, ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET, Target
from tests.job_context import RecordingContext
from tests.source_dbs import StopAfter
from tests.xlsx_factory import CHATS_HEADER, chat_row


def LocalContext(db: Database, job_id: int, checkpoint: Any = None) -> RecordingContext:
    """A migration job's context over the real jobs table."""
    return RecordingContext(db, job_id, checkpoint=checkpoint, kind="migration",
                            persist_checkpoint=True)


async def new_job(db: Database) -> int:
    return await db.fetchval(
        "INSERT INTO jobs (kind, timeout_s, status) VALUES ('migration', 60, 'running')"
        " RETURNING id")


async def committed_checkpoint(db: Database, job_id: int) -> Any:
    return await db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job_id)


ROWS = [chat_row(i) for i in range(1, 251)]


async def test_import_is_exact_and_idempotent(db: Database) -> None:
    assert await ensure_target_table(db, CHATS_TARGET) == "created"
    job = await new_job(db)
    ctx = LocalContext(db, job)
    result = await run_pipeline(ctx, ListSource(CHATS_HEADER, ROWS, batch_rows=64),
                                CHATS_TARGET, timezone="Europe/Moscow")
    assert ctx.counters == {"total": 250, "processed": 250, "failed": 0}
    assert result["inserted"] == 250 and result["updated"] == 0
    assert await db.fetchval("SELECT count(*) FROM chats") == 250
    row = await db.fetchrow("SELECT * FROM chats WHERE chat_id = 100014")
    assert row["customer_name"] == "John Smith 14"
    assert row["last_message"] == "Здравствуйте! Заказ №14\nне пришёл 😡\tтаб"
    assert row["is_vip"] is True and row["phone"] is None and row["message_count"] == 15
    # Naive Excel times are local to the configured zone (Moscow is UTC+3).
    assert row["created_at"] == dt.datetime(2023, 1, 1, 19, 0, tzinfo=dt.UTC)
    # Checkpoint and counters were committed with the last batch.
    committed = await db.fetchrow("SELECT checkpoint, processed FROM jobs WHERE id = $1", job)
    assert committed["checkpoint"]["position"] == 249 and committed["processed"] == 250

    xmin_before = await db.fetchval("SELECT sum(xmin::text::bigint) FROM chats")
    again = LocalContext(db, await new_job(db))
    result = await run_pipeline(again, ListSource(CHATS_HEADER, ROWS, batch_rows=100),
                                CHATS_TARGET, timezone="Europe/Moscow")
    assert result["unchanged"] == 250 and result["inserted"] == result["updated"] == 0
    assert again.counters["processed"] == 250
    # Nothing was rewritten: IS DISTINCT FROM skipped every identical row.
    assert await db.fetchval("SELECT sum(xmin::text::bigint) FROM chats") == xmin_before


async def test_changed_rows_are_updated_and_duplicates_do_not_double(db: Database) -> None:
    await ensure_target_table(db, CHATS_TARGET)
    await run_pipeline(LocalContext(db, await new_job(db)), ListSource(CHATS_HEADER, ROWS[:10]),
                       CHATS_TARGET)
    changed = [list(r) for r in ROWS[:10]]
    changed[3][6] = "closed-later"
    rows = changed + [changed[3]]  # the same key twice in one batch
    ctx = LocalContext(db, await new_job(db))
    result = await run_pipeline(ctx, ListSource(CHATS_HEADER, rows), CHATS_TARGET)
    assert result["updated"] == 1 and result["processed"] == 11
    assert await db.fetchval("SELECT count(*) FROM chats") == 10
    assert await db.fetchval("SELECT status FROM chats WHERE chat_id = 100004") == "closed-later"


async def test_rejects_are_stored_with_reasons_and_counted(db: Database) -> None:
    await ensure_target_table(db, CHATS_TARGET)
    rows = [list(r) for r in ROWS[:20]]
    rows[4][0] = "not-a-number"
    rows[9][7] = None  # created_at is NOT NULL
    rows[12][12] = "perhaps"
    rows[15] = [None] * 13  # an empty row: neither data nor reject
    job = await new_job(db)
    ctx = LocalContext(db, job)
    result = await run_pipeline(ctx, ListSource(CHATS_HEADER, rows, batch_rows=7), CHATS_TARGET)
    assert ctx.counters == {"total": 19, "processed": 16, "failed": 3}
    assert result["rejected"] == 3
    rejects = await db.fetch("SELECT row_number, column_name, reason, raw FROM migration_rejects"
                             " WHERE job_id = $1 ORDER BY row_number", job)
    assert [(r["row_number"], r["column_name"]) for r in rejects] == [
        (6, "chat_id"), (11, "created_at"), (14, "is_vip")]
    assert "not a number" in rejects[0]["reason"] and rejects[0]["raw"]["chat_id"] == \
        "not-a-number"
    assert "required" in rejects[1]["reason"]
    assert await db.fetchval("SELECT count(*) FROM chats") == 16


async def test_resume_from_checkpoint_applies_each_row_once(db: Database) -> None:
    await ensure_target_table(db, CHATS_TARGET)
    rows = [list(r) for r in ROWS]
    rows[100][12] = "bad bool"  # a reject before the interruption
    rows[200][12] = "bad bool"  # and one after
    job = await new_job(db)
    first = LocalContext(db, job)
    # Interruption point: the source breaks off after its third batch, as a crash would.
    with pytest.raises(JobFailed, match="interrupted after 3 batches"):
        source = StopAfter(ListSource(CHATS_HEADER, rows, batch_rows=50), 3)
        await run_pipeline(first, source, CHATS_TARGET)
    checkpoint = await committed_checkpoint(db, job)
    assert checkpoint["position"] == 149 and checkpoint["processed"] == 149
    assert await db.fetchval("SELECT count(*) FROM chats") == 149

    second = LocalContext(db, job, checkpoint=checkpoint)
    result = await run_pipeline(second, ListSource(CHATS_HEADER, rows, batch_rows=50),
                                CHATS_TARGET)
    assert second.counters == {"total": 250, "processed": 248, "failed": 2}
    assert result["inserted"] == 248 and result["unchanged"] == 0
    assert await db.fetchval("SELECT count(*) FROM chats") == 248
    assert await db.fetchval("SELECT count(*) FROM migration_rejects WHERE job_id = $1",
                             job) == 2


async def test_cancelled_batch_rolls_back_with_its_checkpoint(db: Database) -> None:
    """A batch and its checkpoint commit together or not at all."""
    await ensure_target_table(db, CHATS_TARGET)
    job = await new_job(db)
    plan = LoadPlan.build(CHATS_TARGET, CHATS_HEADER, "UTC")

    async def slow_batch(conn) -> None:  # asyncio side: the batch, then a stall
        await conn.execute(plan.create_stage)
        await conn.execute("INSERT INTO chats (chat_id, external_id, channel, status,"
                           " created_at, message_count, is_vip) VALUES"
                           " (1, 'x', 'web', 'open', now(), 1, false)")
        await conn.execute("UPDATE jobs SET checkpoint = '{\"position\": 9}' WHERE id = $1", job)
        await conn.execute("SELECT pg_sleep(30)")

    with trio.move_on_after(0.3):
        await db.run(slow_batch)
    assert await db.fetchval("SELECT count(*) FROM chats") == 0
    assert await committed_checkpoint(db, job) is None


async def test_header_missing_required_column_fails_at_once(db: Database) -> None:
    await ensure_target_table(db, CHATS_TARGET)
    header = [h for h in CHATS_HEADER if h not in ("status", "is_vip")]
    with pytest.raises(JobFailed, match="status, is_vip"):
        await run_pipeline(LocalContext(db, await new_job(db)),
                           ListSource(header, [r[:6] + r[7:12] for r in ROWS]), CHATS_TARGET)


async def test_existing_table_mismatch_is_refused_with_reasons(db: Database) -> None:
    await db.execute("CREATE TABLE chats (chat_id bigint PRIMARY KEY, external_id text,"
                     " rating numeric(2,1), is_vip boolean NOT NULL, extra text NOT NULL)")
    with pytest.raises(TargetMismatch) as info:
        await ensure_target_table(db, CHATS_TARGET)
    text = str(info.value)
    assert "column rating is numeric(2,1), the target says double precision" in text
    assert "column status is missing" in text
    assert "extra is NOT NULL without a default" in text
    assert "[targets.chats]" in text


async def test_existing_matching_table_with_aliases_types_is_accepted(db: Database) -> None:
    target = Target("t", "public.things", (
        dataclasses.replace(CHATS_TARGET.columns[0]),
        dataclasses.replace(CHATS_TARGET.columns[7], type="timestamp with time zone"),
    ), ("chat_id",))
    await db.execute("CREATE TABLE things (chat_id int8, created_at timestamptz NOT NULL,"
                     " note text, UNIQUE (chat_id))")
    assert await ensure_target_table(db, target) == "verified"


def _batch(rows: list[list[Any]], first_row: int, position: int):
    from nurseryd.kinds.migrate.coerce import RowCoercer, match_header
    from nurseryd.kinds.migrate.sources.base import SourceBatch

    coerced = RowCoercer(match_header(CHATS_HEADER, CHATS_TARGET.columns)).coerce_rows(
        [(first_row + i, row) for i, row in enumerate(rows)])
    return SourceBatch.of(coerced, position)


async def test_merged_batches_with_a_key_in_both_and_direct_copy_fallback(db: Database) -> None:
    """Batches written in one transaction may repeat a key across them (each is
    deduplicated alone); a direct COPY into a table that is not empty after all
    falls back to the upsert. Both keep every row exactly once, last one wins."""
    from nurseryd.kinds.migrate.pipeline import LoadMode, apply_batch

    await ensure_target_table(db, CHATS_TARGET)
    job = await new_job(db)
    plan = LoadPlan.build(CHATS_TARGET, CHATS_HEADER, "UTC")
    start = {"v": 1, "processed": 0, "failed": 0, "inserted": 0, "updated": 0, "unchanged": 0}
    later = [list(r) for r in ROWS[:3]]
    later[0][6] = "reopened"
    for direct in (True, False):
        await db.execute("TRUNCATE chats")
        ctx = RecordingContext(db, job_id=job)
        await db.run(apply_batch, plan, ctx, [_batch([list(ROWS[0])], 2, 2)], start,
                     LoadMode(direct=False))  # the table is not empty any more
        mode = LoadMode(direct=direct)
        checkpoint = await db.run(apply_batch, plan, ctx,
                                  [_batch(ROWS[:3], 2, 4), _batch(later, 5, 7)], start, mode)
        assert not mode.direct  # switched to the upsert path for good
        assert (checkpoint["processed"], checkpoint["position"]) == (6, 7)
        assert await db.fetchval("SELECT count(*) FROM chats") == 3
        assert await db.fetchval("SELECT status FROM chats WHERE chat_id = 100001") == \
            "reopened"


async def test_total_is_never_below_the_rows_seen(db: Database) -> None:
    """A source that under-declares its size (a lying <dimension>): the total
    follows the rows actually seen and is exact at the end."""
    from nurseryd.kinds.migrate.sources.base import Total

    class UnderDeclared(ListSource):
        async def run(self, columns, resume, send) -> None:
            await send.send(Total(10))  # says 10, has 250
            await super().run(columns, resume, _SkipTotals(send))

    class _SkipTotals:
        def __init__(self, inner) -> None:
            self.inner = inner

        async def send(self, event) -> None:
            if not isinstance(event, Total):
                await self.inner.send(event)

    await ensure_target_table(db, CHATS_TARGET)
    ctx = LocalContext(db, await new_job(db))
    totals: list[int] = []
    report = ctx.report

    def spy(**values) -> None:
        report(**values)
        if values.get("total") is not None:
            totals.append(values["total"])
            assert values["total"] >= ctx.counters["processed"] + ctx.counters["failed"]

    ctx.report = spy
    await run_pipeline(ctx, UnderDeclared(CHATS_HEADER, ROWS, batch_rows=50), CHATS_TARGET)
    assert totals[0] == 10 and totals[-1] == 250 and len(totals) >= 3  # raised mid-way too
    assert all(later >= earlier for earlier, later in zip(totals, totals[1:], strict=False))
    assert ctx.counters == {"total": 250, "processed": 250, "failed": 0}


def test_merged_batches_keep_their_own_payloads_and_stop_at_the_byte_bound() -> None:
    """Batches merged into one transaction are COPYed as their several payloads
    (the same objects, never joined into a second copy), and a queue of wide
    batches is merged only up to MAX_MERGED_BYTES, not only up to the row bound."""
    from nurseryd.kinds.migrate import pipeline
    from nurseryd.kinds.migrate.sources.base import SourceBatch, SourceEvent

    texts = [b"".join(b"%d\tx\n" % (i * 10 + j) for j in range(10)) for i in range(3)]
    batches = [SourceBatch(memoryview(text), 10, 10, [], i) for i, text in enumerate(texts)]
    merged = pipeline.merge_batches(batches)
    assert all(mine is batch.payload for mine, batch in zip(merged.payloads, batches,
                                                              strict=True))
    assert (merged.written, merged.rows_seen, merged.position) == (30, 30, 2)
    import asyncio

    async def feed() -> list[bytes]:  # the asyncio side, as asyncpg drives it
        return [bytes(piece) async for piece in pipeline.copy_slices(*merged.payloads)]

    fed = asyncio.run(feed())
    assert b"".join(fed) == b"".join(texts)

    wide = pipeline.MAX_MERGED_BYTES // 2 + 1
    send, receive = trio.open_memory_channel[SourceEvent](10)
    for position in range(4):
        send.send_nowait(SourceBatch(b"x" * wide, 1, 1, [], position))
    first = receive.receive_nowait()
    assert isinstance(first, SourceBatch)
    taken, _ = pipeline._take_ready(first, receive)
    assert [batch.position for batch in taken] == [0, 1]  # 2 rows, far below the row bound
