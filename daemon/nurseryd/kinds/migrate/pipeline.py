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
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import trio

from ..base import JobContext, JobFailed
from .coerce import RejectRecord
from .sources.base import Header, Source, SourceBatch, SourceError, SourceEvent, Total
from .targets import Target

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
STAGE_TABLE = "nurseryd_stage"
#: COPY data is handed to asyncpg in slices this big, with a yield in between,
#: so one large batch never freezes the event loop.
COPY_SLICE = 256 * 1024


@dataclass
class Counters:
    processed: int = 0
    failed: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    @classmethod
    def from_checkpoint(cls, checkpoint: Any) -> Counters:
        if not isinstance(checkpoint, dict):
            return cls()
        return cls(**{name: int(checkpoint.get(name) or 0) for name in
                      ("processed", "failed", "inserted", "updated", "unchanged")})


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class LoadPlan:
    """The SQL for one target and one set of source columns (built once per job)."""

    columns: tuple[str, ...]
    create_stage: str
    upsert: str
    timezone: str

    @classmethod
    def build(cls, target: Target, columns: Sequence[str], timezone: str) -> LoadPlan:
        column_list = ", ".join(_quote(c) for c in columns)
        key = [c for c in target.key]
        others = [c for c in columns if c not in key]
        create_stage = (f"CREATE TEMP TABLE {STAGE_TABLE} ON COMMIT DROP AS "
                        f"SELECT {column_list} FROM {target.quoted_table} WITH NO DATA")
        if others:
            sets = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in others)
            mine = ", ".join(f"t.{_quote(c)}" for c in others)
            theirs = ", ".join(f"EXCLUDED.{_quote(c)}" for c in others)
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
            f"ON CONFLICT ({', '.join(_quote(c) for c in key)}) {conflict} "
            f"RETURNING (xmax = 0) AS inserted) "
            f"SELECT count(*) FILTER (WHERE inserted) AS inserted, "
            f"count(*) FILTER (WHERE NOT inserted) AS updated FROM up")
        return cls(tuple(columns), create_stage, upsert, timezone)


async def _slices(payload: bytes | memoryview) -> AsyncIterator[bytes]:
    view = memoryview(payload)
    for start in range(0, len(view), COPY_SLICE):
        yield bytes(view[start:start + COPY_SLICE])
        await asyncio.sleep(0)


_INSERT_REJECTS = (
    "INSERT INTO migration_rejects (job_id, row_number, column_name, reason, raw) "
    "SELECT $1, r.row_number, r.column_name, r.reason, r.raw::jsonb "
    "FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[]) "
    "AS r(row_number, column_name, reason, raw) "
    "ON CONFLICT (job_id, row_number) DO NOTHING")
_SAVE_CHECKPOINT = "UPDATE jobs SET checkpoint = $2, processed = $3, failed = $4 WHERE id = $1"


async def apply_batch(conn: asyncpg.Connection, plan: LoadPlan, job_id: int,
                      batch: SourceBatch, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Asyncio side, inside the transaction :meth:`Database.run` opened.

    ``checkpoint`` holds the counters before this batch; returns it advanced
    past the batch, exactly as committed.
    """
    inserted = updated = 0
    if batch.written:
        await conn.execute("SELECT set_config('TimeZone', $1, true)", plan.timezone)
        await conn.execute(plan.create_stage)
        await conn.copy_to_table(STAGE_TABLE, source=_slices(batch.payload),
                                 columns=list(plan.columns), format="text")
        row = await conn.fetchrow(plan.upsert)
        inserted, updated = int(row["inserted"]), int(row["updated"])
    if batch.rejects:
        await conn.execute(
            _INSERT_REJECTS, job_id,
            [r.row_number for r in batch.rejects], [r.column for r in batch.rejects],
            [r.reason for r in batch.rejects],
            [json.dumps(r.raw, ensure_ascii=False, default=str) for r in batch.rejects])
    good = batch.rows_seen - len(batch.rejects)
    checkpoint = {**checkpoint, "position": batch.position,
                  "processed": checkpoint["processed"] + good,
                  "failed": checkpoint["failed"] + len(batch.rejects),
                  "inserted": checkpoint["inserted"] + inserted,
                  "updated": checkpoint["updated"] + updated,
                  "unchanged": checkpoint["unchanged"] + good - inserted - updated}
    await conn.execute(_SAVE_CHECKPOINT, job_id, checkpoint, checkpoint["processed"],
                       checkpoint["failed"])
    return checkpoint


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
    total: int | None = None
    ctx.report(processed=counters.processed, failed=counters.failed)
    plan: LoadPlan | None = None
    header: Header | None = None
    send, receive = trio.open_memory_channel[SourceEvent](1)
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
                    total = event.total
                    ctx.report(total=total)
                elif isinstance(event, Header):
                    header = event
                    plan = LoadPlan.build(target, event.columns, timezone)
                elif isinstance(event, SourceBatch):
                    if plan is None:
                        raise JobFailed(f"source {source.source_type} sent rows before its "
                                        "header")
                    await _load(ctx, plan, event, counters, source)
    if failure:
        raise JobFailed(str(failure[0]))
    if header is None:
        raise JobFailed("the source ended without a header row")
    final_total = counters.processed + counters.failed
    ctx.report(total=final_total, processed=counters.processed, failed=counters.failed)
    del total
    return {
        "source_type": source.source_type, "target": target.name, "table": target.table,
        "rows": final_total, **asdict(counters), "rejected": counters.failed,
        "columns": list(header.columns), "ignored_columns": list(header.ignored),
        **source.describe(),
    }


async def _load(ctx: JobContext, plan: LoadPlan, batch: SourceBatch, counters: Counters,
                source: Source) -> None:
    batch.rejects = [_reject_tuple(r) for r in batch.rejects]
    before = {"v": CHECKPOINT_VERSION, "source_type": source.source_type, **asdict(counters)}
    checkpoint = await ctx.db.run(apply_batch, plan, ctx.job_id, batch, before)
    for name in ("processed", "failed", "inserted", "updated", "unchanged"):
        setattr(counters, name, checkpoint[name])
    ctx.report(processed=counters.processed, failed=counters.failed)
    # Keeps the supervisor's copy in step (it rewrites the checkpoint when the job
    # stops): the same value our transaction has just committed.
    await ctx.save_checkpoint(checkpoint)
