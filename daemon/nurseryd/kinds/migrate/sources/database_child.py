"""The database reader's child process: ``python -m nurseryd.kinds.migrate.sources.database_child``.

Why a separate process: reading a page (sqlite3 building row tuples, asyncpg
decoding records) and coercing it into COPY text is Python CPU work, and in the
daemon it shared one interpreter lock with the event loop that streams the
previous batch into PostgreSQL. A worker thread does not help there (the
coercion already ran in one: ~1.0x pgloader); a process puts reading and
coercion on the machine's other core and leaves the daemon only the relay of
ready COPY bytes, as the Excel parser child does.

One child is one *session* of one key range: connect, match the header,
optionally count, optionally cut the ranges (the job's first child: several
children read a source at once, as each gets its own share of the machine),
then pages of its range after the given key until its end or the first error. It does not retry:
it reports the error as transient or fatal (:meth:`.db_readers.Reader.classify`)
and exits, and the daemon (which owns the back-off policy, its counters and
the job's cancellation) starts a new child after the last batch it relayed.

Input: one JSON object on stdin (the resolved URL travels here, never in argv).
Output: frames on stdout (see :mod:`.framing`): header, total, plan, batches (the one
:class:`~.base.SourceBatch`, built by the one :class:`~.base.Emitter`), then
done or error. Backpressure is the pipe: when the daemon is busy, ``write`` blocks.

Stopping: SIGTERM. For PostgreSQL it cancels the running statement (asyncpg
sends the server a cancel request, then closes the connection), so nothing
keeps running on the source; for SQLite the default action ends the process
at once (a read-only file has nothing to clean up). The daemon follows up
with SIGKILL if the child has not exited within a second.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..coerce import ColumnSpec, match_header
from . import framing
from .base import Emitter, SourceError
from .db_readers import (
    ErrorClass,
    PostgresReader,
    Reader,
    ReaderSpec,
    SqliteReader,
    describe_error,
)
from .framing import Output


def make_reader(spec: dict[str, Any]) -> Reader:
    reader_spec = ReaderSpec(name=spec["name"], url=spec["url"], key=list(spec["key"]),
                             table=spec.get("table"), query=spec.get("query"),
                             connect_timeout_s=float(spec["connect_timeout_s"]))
    if spec["kind"] == "sqlite":
        return SqliteReader(reader_spec, Path(spec["sqlite_path"]))
    return PostgresReader(reader_spec)


async def stream(reader: Reader, spec: dict[str, Any], out: Output) -> None:
    """One session: header, total (when asked), the plan (when asked), then every
    page of its key range, ``spec["after"] < key <= spec["until"]``."""
    name = spec["name"]
    columns = [ColumnSpec(name=c["name"], type=c["type"], nullable=c["nullable"],
                          aliases=tuple(c["aliases"]), key=c["key"]) for c in spec["columns"]]
    try:
        await reader.connect()
    except TimeoutError:
        raise ConnectTimeout(f"no connection within {float(spec['connect_timeout_s']):g} s") \
            from None
    emit = Emitter(columns, where=f"source {name}")
    names = await reader.columns()
    header = emit.match(names)
    out.send(framing.HEADER, {"columns": list(header.columns), "ignored": list(header.ignored)})
    after: list[Any] | None = spec.get("after")
    until: list[Any] | None = spec.get("until")
    done = int(spec.get("done") or 0)
    limit = int(spec["batch_rows"])
    total: int | None = None
    if spec.get("count", True):
        total = await reader.count()
        out.send(framing.TOTAL, {"total": total})
    if int(spec.get("plan") or 0) > 1:
        remaining = total if after is None and total is not None else await reader.count(after)
        ranges = await cut_ranges(reader, after, done, remaining, int(spec["plan"]), limit) \
            if keys_decide_target_keys(names, reader.key_names, columns) else []
        if not ranges:
            ranges = [{"after": after, "rows": done, "until": None}]
        out.send(framing.PLAN, {"shards": ranges})
        until = ranges[0]["until"]
    parent = os.getppid()
    while True:
        page = await reader.page(after, limit, until)
        if not page.rows:
            break
        if any(value is None for value in page.last_key):
            null_keys = [key for key, value in zip(reader.key_names, page.last_key, strict=True)
                         if value is None]
            raise SourceError(f"source {name}: key column(s) {', '.join(null_keys)} hold NULL; "
                              "keyset paging needs non-null keys")
        numbered = [(done + index, row) for index, row in enumerate(page.rows, 1)]
        last_page = len(page.rows) < limit
        done += len(page.rows)
        after = page.last_key
        batch = emit.batch(numbered, {"after": after, "rows": done})
        del numbered, page.rows
        out.write(*framing.encode_batch(batch))
        del batch
        if os.getppid() != parent:
            raise BrokenPipeError("the daemon is gone")  # SIGKILLed: read for nobody no more
        if last_page:
            break
    out.send(framing.DONE, {"rows": done})


def keys_decide_target_keys(names: list[str], key_names: list[str],
                            columns: list[ColumnSpec]) -> bool:
    """Whether every source key column feeds a target key column.

    Only then can two rows of different key ranges never meet on one target
    key, so the order in which the ranges' batches interleave cannot change
    which row wins: the table ends up as one reader in key order leaves it.
    """
    match = match_header(names, columns)
    fed_keys = {position for column, position in zip(match.columns, match.positions,
                                                     strict=True) if column.key}
    return all(names.index(key) in fed_keys for key in key_names)


async def cut_ranges(reader: Reader, after: list[Any] | None, done: int, remaining: int,
                     wanted: int, limit: int) -> list[dict[str, Any]]:
    """``wanted`` key ranges of about equal row counts after ``after``, or [] for one.

    Each range starts its row numbers at the rows before it (``done`` plus the
    offset of its cut), so rejects carry the numbers one reader would give. A
    range holds at least one full page, or it is not worth a process.
    """
    shards = min(wanted, remaining // limit)
    if shards < 2:
        return []
    cuts = [remaining * index // shards for index in range(1, shards)]
    bounds: list[list[Any]] = []
    for cut in cuts:
        key = await reader.key_at(after, cut - 1)  # the last key of the range before
        if key is None or any(value is None for value in key):
            return []  # rows vanished since the count, or NULL keys: one reader says why
        bounds.append(key)
    starts = [after, *bounds]
    ends: list[list[Any] | None] = [*bounds, None]
    rows = [done, *(done + cut for cut in cuts)]
    return [{"after": start, "rows": first, "until": end}
            for start, first, end in zip(starts, rows, ends, strict=True)]


class ConnectTimeout(TimeoutError):
    """The connect did not finish within ``connect_timeout_s`` (transient)."""


def error_frame(reader: Reader, error: BaseException) -> dict[str, str]:
    """How the daemon should take an error: retry (transient), fail, or pass it on."""
    if isinstance(error, SourceError):  # the user's to fix, already worded
        return {"kind": "source", "reason": str(error)}
    reason = str(error) if isinstance(error, ConnectTimeout) else describe_error(error)
    transient = reader.classify(error) is ErrorClass.TRANSIENT
    return {"kind": "transient" if transient else "fatal", "reason": reason}


async def session(spec: dict[str, Any], out: Output) -> int:
    reader = make_reader(spec)
    if reader.kind == "postgresql":
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await stream(reader, spec, out)
    except asyncio.CancelledError:
        return 1  # stopped by the daemon: it wants no report
    except BrokenPipeError:
        return 1  # the daemon went away: nothing to tell
    except Exception as error:
        out.send(framing.ERROR, error_frame(reader, error))
    finally:
        await asyncio.shield(reader.close())
    return 0


def main() -> int:
    spec = json.loads(sys.stdin.buffer.read())
    # Nothing here builds reference cycles; the collector would only rescan the
    # page of live rows again and again (measured in the Excel child: ~30% of coercion).
    gc.disable()
    return asyncio.run(session(spec, Output()))


if __name__ == "__main__":
    sys.exit(main())
