"""source -> row batches -> coerce -> rejects -> COPY into a stage -> upsert -> checkpoint.

Shared by every migration source (Excel now; a database and Google Sheets
next). The source runs as a task that works ahead into a one-slot channel
while this loop writes the previous batch, so parsing (in the Excel parser's
child process) overlaps loading.

Each batch is **one transaction** (one :meth:`Database.run` call): COPY into a
temp stage table, ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE target IS
DISTINCT FROM excluded`` (re-importing an unchanged row writes nothing), the
batch's rejects, and the job's checkpoint with its counters. Either all of it
commits or none of it does, so after a SIGKILL the job resumes exactly after
the last committed batch: every row is applied once and the counters (kept
inside the checkpoint) are exact.

Counters: ``processed`` = rows applied to the target (inserted, updated, or
already identical), ``failed`` = rejected rows; at the end ``total`` is set to
``processed + failed``. The result breaks ``processed`` down into inserted /
updated / unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import trio

from ...db import rejects as rejectsdb
from ...db.quoting import quote_ident
from ..base import JobContext, JobFailed
from .coerce import RejectRecord
from .sources.base import Header, Source, SourceBatch, SourceError, SourceEvent, Total
from .targets import Target, migration_settings

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
STAGE_TABLE = "nurseryd_stage"
#: COPY data is handed to asyncpg in slices this big, with a yield in between,
#: so one large batch never freezes the event loop.
COPY_SLICE = 256 * 1024
#: Batches the source may work ahead (each ~1-2 MB of COPY text for 5000 rows).
QUEUE_BATCHES = 4
#: Upper bounds of rows, and of COPY text, written in one transaction when
#: batches queue up: the rows bound keeps a transaction's work (and a failed
#: one's redo) small, the bytes bound does so for wide rows too.
MAX_MERGED_ROWS = 40_000
MAX_MERGED_BYTES = 32 * 1024**2


COUNTER_NAMES = ("processed", "failed", "inserted", "updated", "unchanged")


@dataclass
class Counters:
    processed: int = 0
    failed: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    #: Rows the source expects in all (not part of the checkpoint).
    expected: int | None = field(default=None, compare=False)

    def saved(self) -> dict[str, int]:
        """The counters kept in the checkpoint and the result."""
        return {name: getattr(self, name) for name in COUNTER_NAMES}

    @classmethod
    def from_checkpoint(cls, checkpoint: Any) -> Counters:
        if not isinstance(checkpoint, dict):
            return cls()
        return cls(**{name: int(checkpoint.get(name) or 0) for name in COUNTER_NAMES})


@dataclass(frozen=True)
class LoadPlan:
    """The SQL for one target and one set of source columns (built once per job)."""

    columns: tuple[str, ...]
    create_stage: str
    upsert: str
    timezone: str
    schema: str = "public"
    table: str = ""
    is_empty: str = ""

    @classmethod
    def build(cls, target: Target, columns: Sequence[str], timezone: str) -> LoadPlan:
        column_list = ", ".join(quote_ident(c) for c in columns)
        key = [c for c in target.key]
        others = [c for c in columns if c not in key]
        create_stage = (f"CREATE TEMP TABLE {STAGE_TABLE} ON COMMIT DROP AS "
                        f"SELECT {column_list} FROM {target.quoted_table} WITH NO DATA")
        if others:
            sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
            mine = ", ".join(f"t.{quote_ident(c)}" for c in others)
            theirs = ", ".join(f"EXCLUDED.{quote_ident(c)}" for c in others)
            if len(others) == 1:
                mine, theirs = f"ROW({mine})", f"ROW({theirs})"
            else:
                mine, theirs = f"({mine})", f"({theirs})"
            conflict = f"DO UPDATE SET {sets} WHERE {mine} IS DISTINCT FROM {theirs}"
        else:
            conflict = "DO NOTHING"
        upsert = (
            f"WITH up AS (INSERT INTO {target.quoted_table} AS t ({column_list}) "
            f"SELECT {column_list} FROM {STAGE_TABLE} "
            f"ON CONFLICT ({', '.join(quote_ident(c) for c in key)}) {conflict} "
            f"RETURNING (xmax = 0) AS inserted) "
            f"SELECT count(*) FILTER (WHERE inserted) AS inserted, "
            f"count(*) FILTER (WHERE NOT inserted) AS updated FROM up")
        schema, table = target.schema_and_table
        is_empty = f"SELECT NOT EXISTS (SELECT 1 FROM {target.quoted_table})"
        return cls(tuple(columns), create_stage, upsert, timezone, schema, table, is_empty)


async def copy_slices(*payloads: Buffer) -> AsyncIterator[memoryview]:
    """The COPY feeder: the ``payloads`` one after the other, in :data:`COPY_SLICE`
    slices, yielding in between.

    Each yield gives the event loop's other tasks (HTTP requests, heartbeats, a
    cancellation) a turn, so one large batch never freezes the loop, and a cancel
    lands within a slice; the batch's transaction then rolls back. The slices are
    views (asyncpg copies each into its send buffer), and merged batches are fed
    as their several payloads, so the COPY text is never joined or copied here.
    """
    for payload in payloads:
        view = memoryview(payload).cast("B")
        for start in range(0, view.nbytes, COPY_SLICE):
            yield view[start:start + COPY_SLICE]
            await asyncio.sleep(0)


@dataclass
class LoadMode:
    """Whether batches may be COPYed straight into the target.

    Into a table that was empty when the job started, a plain COPY is about
    twice as fast as COPY into a stage plus ``INSERT ... ON CONFLICT``. The
    first unique violation (a concurrent import, or duplicate keys across
    batches) rolls that batch back to its savepoint and switches the job to the
    upsert path for good, so the result is the same either way.
    """

    direct: bool = False


async def _write_rows(conn: asyncpg.Connection, plan: LoadPlan, payloads: Sequence[Buffer],
                      written: int, mode: LoadMode) -> tuple[int, int]:
    """COPY (direct or via the stage + upsert); returns (inserted, updated)."""

    def source() -> AsyncIterable[bytes]:
        # asyncpg takes any buffer from the iterable (its stub says bytes).
        return cast("AsyncIterable[bytes]", copy_slices(*payloads))

    if mode.direct:
        try:
            async with conn.transaction():  # a savepoint
                await conn.copy_to_table(plan.table, schema_name=plan.schema,
                                         source=source(), columns=list(plan.columns),
                                         format="text")
            return written, 0
        except asyncpg.UniqueViolationError:
            mode.direct = False
    await conn.execute(plan.create_stage)
    await conn.copy_to_table(STAGE_TABLE, source=source(), columns=list(plan.columns),
                             format="text")
    row = await conn.fetchrow(plan.upsert)
    assert row is not None  # an aggregate without GROUP BY yields exactly one row
    return int(row["inserted"]), int(row["updated"])


async def apply_batch(conn: asyncpg.Connection, plan: LoadPlan, ctx: JobContext,
                      batches: Sequence[SourceBatch], checkpoint: dict[str, Any],
                      mode: LoadMode) -> dict[str, Any]:
    """Asyncio side, inside the transaction :meth:`Database.run` opened.

    ``batches`` are consecutive and written as one; ``checkpoint`` holds the
    counters before them; returns it advanced past them, exactly as committed.
    """
    # Batch and checkpoint commit together, so losing the last commits in a
    # PostgreSQL crash loses both and the job resumes from the one before:
    # still exact. WAL is flushed in order, so the job's synchronous final
    # status write makes every earlier batch durable too.
    await conn.execute("SET LOCAL synchronous_commit = off")
    await conn.execute("SELECT set_config('TimeZone', $1, true)", plan.timezone)
    batch = merge_batches(batches)
    inserted = updated = 0
    if batch.written:
        try:
            async with conn.transaction():  # a savepoint
                inserted, updated = await _write_rows(conn, plan, batch.payloads, batch.written,
                                                      mode)
        except asyncpg.CardinalityViolationError:
            # A key repeated across merged batches (each batch is deduplicated by
            # the coercer, not their union): write them one by one, in order.
            await conn.execute(f"DROP TABLE IF EXISTS {STAGE_TABLE}")
            for part in batches:
                if part.written:
                    await conn.execute(f"DROP TABLE IF EXISTS {STAGE_TABLE}")
                    one_inserted, one_updated = await _write_rows(conn, plan, [part.payload],
                                                                  part.written, mode)
                    inserted += one_inserted
                    updated += one_updated
    # Stored up to the cap; beyond it rejects are counted (``failed``) but not kept.
    stored_before = min(checkpoint["failed"], _rejects_cap(ctx))
    await rejectsdb.insert_rejects_in(conn, ctx.job_id,
                                      batch.rejects[:_rejects_cap(ctx) - stored_before])
    good = batch.rows_seen - len(batch.rejects)
    checkpoint = {**checkpoint, "position": batch.position,
                  "processed": checkpoint["processed"] + good,
                  "failed": checkpoint["failed"] + len(batch.rejects),
                  "inserted": checkpoint["inserted"] + inserted,
                  "updated": checkpoint["updated"] + updated,
                  "unchanged": checkpoint["unchanged"] + good - inserted - updated}
    await ctx.commit_progress(conn, checkpoint, processed=checkpoint["processed"],
                              failed=checkpoint["failed"])
    return checkpoint


def _rejects_cap(ctx: JobContext) -> int:
    return migration_settings(ctx.settings).max_stored_rejects


@dataclass
class MergedBatch:
    """Several consecutive batches written as one (one transaction instead of
    several). Their COPY texts stay the batches' own, in order: joining them would
    hold a second copy of every queued row while the transaction runs."""

    payloads: list[Buffer]
    written: int
    rows_seen: int
    rejects: list[RejectRecord]
    position: Any


def merge_batches(batches: Sequence[SourceBatch]) -> MergedBatch:
    return MergedBatch(payloads=[b.payload for b in batches if b.written],
                       written=sum(b.written for b in batches),
                       rows_seen=sum(b.rows_seen for b in batches),
                       rejects=[r for b in batches for r in b.rejects],
                       position=batches[-1].position)


def _reject_tuple(record: RejectRecord | Sequence[Any]) -> RejectRecord:
    if isinstance(record, RejectRecord):
        return record
    number, column, reason, raw = record
    return RejectRecord(int(number), column, str(reason), raw if isinstance(raw, dict) else {})


async def run_pipeline(ctx: JobContext, source: Source, target: Target, *,
                       timezone: str = "UTC") -> dict[str, Any]:
    """Run one migration to the end (or until cancelled); returns the job result."""
    checkpoint = ctx.checkpoint if isinstance(ctx.checkpoint, dict) and \
        ctx.checkpoint.get("v") == CHECKPOINT_VERSION else None
    counters = Counters.from_checkpoint(checkpoint)
    resume = checkpoint.get("position") if checkpoint else None
    ctx.report(processed=counters.processed, failed=counters.failed)
    plan: LoadPlan | None = None
    header: Header | None = None
    send, receive = trio.open_memory_channel[SourceEvent](QUEUE_BATCHES)
    mode = LoadMode()
    failure: list[BaseException] = []

    async def produce() -> None:
        async with send:
            try:
                await source.run(target.columns, resume, send)
            except SourceError as error:
                failure.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive:
            async for event in receive:
                if isinstance(event, Total):
                    counters.expected = event.total
                    ctx.report(total=max(event.total, counters.processed + counters.failed))
                elif isinstance(event, Header):
                    header = event
                    plan = LoadPlan.build(target, event.columns, timezone)
                    mode.direct = resume is None and await ctx.db.fetchval(plan.is_empty)
                elif isinstance(event, SourceBatch):
                    if plan is None:
                        raise JobFailed(f"source {source.source_type} sent rows before "
                                        "its header")
                    batches, pending = _take_ready(event, receive)
                    before = counters.saved()
                    await _load(ctx, plan, batches, counters, source, mode)
                    ctx.metrics.migration_batch(source.source_type, target.name, before,
                                                counters.saved())  # committed: count it
                    for other in pending:  # a Total that arrived between batches
                        if isinstance(other, Total):
                            counters.expected = other.total
                    done = counters.processed + counters.failed
                    if counters.expected is not None and done > counters.expected:
                        counters.expected = done  # the declared size was wrong
                    if counters.expected is not None:
                        ctx.report(total=counters.expected)
    if failure:
        raise JobFailed(str(failure[0]))
    if header is None:
        raise JobFailed("the source ended without a header row")
    final_total = counters.processed + counters.failed
    ctx.report(total=final_total, processed=counters.processed, failed=counters.failed)
    return {
        "source_type": source.source_type, "target": target.name, "table": target.table,
        "rows": final_total, **counters.saved(), "rejected": counters.failed,
        "columns": list(header.columns), "ignored_columns": list(header.ignored),
        **source.describe(),
    }


def _take_ready(first: SourceBatch, receive: trio.MemoryReceiveChannel[SourceEvent],
                ) -> tuple[list[SourceBatch], list[SourceEvent]]:
    """The batch just received plus any already waiting (group commit).

    While the database is the bottleneck, batches queue up; writing them in one
    transaction saves a stage table, a checkpoint update and a commit per batch.
    When the source is the bottleneck nothing waits and each batch goes alone.
    """
    batches = [first]
    others: list[SourceEvent] = []
    rows = first.rows_seen
    size = len(first.payload)
    while rows < MAX_MERGED_ROWS and size < MAX_MERGED_BYTES:
        try:
            event = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if isinstance(event, SourceBatch):
            batches.append(event)
            rows += event.rows_seen
            size += len(event.payload)
        else:
            others.append(event)
    return batches, others


async def _load(ctx: JobContext, plan: LoadPlan, batches: list[SourceBatch],
                counters: Counters, source: Source, mode: LoadMode) -> None:
    for batch in batches:
        batch.rejects = [_reject_tuple(r) for r in batch.rejects]
    before = {"v": CHECKPOINT_VERSION, "source_type": source.source_type, **counters.saved()}
    checkpoint = await ctx.db.run(apply_batch, plan, ctx, batches, before, mode)
    for name in COUNTER_NAMES:
        setattr(counters, name, checkpoint[name])
    ctx.report(processed=counters.processed, failed=counters.failed)
