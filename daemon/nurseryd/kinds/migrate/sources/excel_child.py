"""The Excel parser's child process: ``python -m nurseryd.kinds.migrate.sources.excel_child``.

Why a separate process: python-calamine aborts the whole process (a Rust
``abort()``, no exception) when an allocation fails, and a hostile 5 KB file
makes it try to allocate 512 GiB; openpyxl can loop for minutes. Here that
costs one child, limited by ``RLIMIT_AS`` (memory) and ``RLIMIT_CPU`` (time),
and the daemon stays up. It is also what lets parsing run on another core while
the daemon streams the previous batch into PostgreSQL (a thread gains <= 4%:
the GIL).

Which reader: python-calamine slice by slice (:mod:`.calamine_stream`) unless
the sheet cannot be cut safely; then the whole-sheet choice of
:func:`choose_reader` (calamine when its estimate fits the budget, else openpyxl).

Input: one JSON object on stdin (path, sheet, target columns, caps, resume
position...). Output: frames on stdout (see :mod:`.framing`): info, header,
total, batches (the same :class:`~.base.SourceBatch` every source emits, built
by the same :class:`~.base.Emitter`), then done or error. Backpressure is the
pipe: when the daemon is busy, ``write`` blocks.

Kept light on imports (no trio, no asyncpg): start-up time is on the critical
path of every import.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import resource
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ..coerce import ColumnSpec
from ..xlsx_checks import ParseCaps, WorkbookInfo, WorkbookRejected, inspect_workbook
from . import framing
from .base import Emitter, SourceError
from .calamine_stream import CHUNK_BYTES, ChunkedRows
from .framing import Output
from .sheet_chunks import NotSplittable

#: The reader name of python-calamine slice by slice (the default).
STREAM_READER = "calamine-stream"
#: Interpreter + python-calamine + our modules, measured at ~20 MiB RSS; address
#: space (what RLIMIT_AS limits) is larger.
BASE_BYTES = 96 * 1024**2


def estimate_calamine_bytes(info: WorkbookInfo) -> int:
    """Peak memory python-calamine needs for the sheet (it loads it whole).

    Measured on the chats workbook: 128 MB of sheet XML -> 214 MiB peak RSS;
    836 MB -> 1.28 GiB; i.e. ~1.5 bytes per byte of sheet XML, plus the shared
    strings table, plus a dense grid of ~32 bytes per declared cell.
    """
    cells = 0
    if info.dimension is not None:
        r1, c1, r2, c2 = info.dimension
        cells = (r2 - r1 + 1) * (c2 - c1 + 1)
    return int(BASE_BYTES + 1.6 * info.sheet_bytes + 3 * info.shared_strings_bytes + 32 * cells)


def choose_reader(info: WorkbookInfo, configured: str, budget: int) -> str:
    """The whole-sheet reader to use when the sheet cannot be read in slices."""
    if configured in ("calamine", "openpyxl"):
        return configured
    return "calamine" if estimate_calamine_bytes(info) <= budget else "openpyxl"


def open_rows(path: str, info: WorkbookInfo, configured: str, budget: int, *,
              slice_bytes: int = CHUNK_BYTES) -> tuple[str, Iterator[tuple[int, Any]], int | None]:
    """(reader name, numbered rows, last row number if known) for the sheet.

    ``auto`` reads python-calamine slice by slice (:mod:`.calamine_stream`):
    calamine's speed at any size, memory bounded by the slice. A sheet that
    cannot be cut safely falls back to the whole-sheet choice.
    """
    if configured in ("auto", STREAM_READER):
        try:
            return STREAM_READER, ChunkedRows(path, info, chunk_bytes=slice_bytes), None
        except NotSplittable:
            if configured == STREAM_READER:
                raise
    reader = choose_reader(info, configured, budget)
    if reader == "calamine":
        return reader, *calamine_rows(path, info)
    return reader, *openpyxl_rows(path, info)


def _blank(row: Sequence[Any]) -> bool:
    return all(cell is None or cell == "" or (isinstance(cell, str) and not cell.strip())
               for cell in row)


def calamine_rows(path: str, info: WorkbookInfo) -> tuple[Iterator[tuple[int, list[Any]]], int]:
    """(row number, values) from python-calamine, plus the sheet's last row number.

    ``iter_rows`` starts at sheet row 1 even when the data starts lower (it yields
    the leading empty rows; only leading empty *columns* are trimmed), while
    ``start``/``height`` describe the used range: last row = start + height.
    """
    from python_calamine import CalamineWorkbook

    workbook = CalamineWorkbook.from_path(path)
    sheet = workbook.get_sheet_by_name(info.sheet_name)
    start = sheet.start
    last_row = (start[0] if start else 0) + sheet.height
    return enumerate(sheet.iter_rows(), 1), last_row


def openpyxl_rows(path: str, info: WorkbookInfo) -> tuple[Iterator[tuple[int, Any]], int | None]:
    """(row number, values) streamed by openpyxl read-only (memory ~flat)."""
    import openpyxl

    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    sheet = workbook[info.sheet_name]
    return enumerate(sheet.iter_rows(min_row=1, values_only=True), 1), None


DEFAULT_BATCH_BYTES = 8 * 1024**2
#: The first batch takes at most this many rows, before any row's size is known.
FIRST_BATCH_ROWS = 100


class BatchSize:
    """How many rows the next batch takes: at most ``batch_rows``, and about
    ``batch_bytes`` of COPY text.

    Rows are cut by count (the pipeline's checkpoints count rows), but a count
    alone lets a batch of wide rows grow to hundreds of MiB on both sides of the
    pipe. The first batch is small; each batch's bytes per row then set the next
    count, halving on a batch over the target, doubling back towards
    ``batch_rows`` while they stay well under it.
    """

    def __init__(self, batch_rows: int, batch_bytes: int) -> None:
        self.limit = batch_rows
        self.target = batch_bytes
        self.rows = min(batch_rows, FIRST_BATCH_ROWS)

    def saw(self, rows: int, payload_bytes: int) -> None:
        if payload_bytes > self.target:
            fitting = rows * self.target // payload_bytes
            self.rows = max(1, min(fitting, rows // 2 or 1))
        elif payload_bytes * 2 < self.target:
            self.rows = min(self.limit, max(self.rows, rows) * 2)


def run(spec: dict[str, Any], out: Output) -> None:
    caps = ParseCaps(**spec["caps"])
    columns = [ColumnSpec(name=c["name"], type=c["type"], nullable=c["nullable"],
                          aliases=tuple(c["aliases"]), key=c["key"]) for c in spec["columns"]]
    path = spec["path"]
    start_after = int(spec.get("start_after_row") or 0)
    batch_rows = int(spec["batch_rows"])
    info = inspect_workbook(path, spec.get("sheet"), caps)
    reader, rows, last_row = open_rows(
        path, info, spec.get("reader", "auto"), int(spec["memory_bytes"]),
        slice_bytes=int(spec.get("slice_bytes") or CHUNK_BYTES))
    declared = info.estimated_rows()
    out.send(framing.INFO, {"reader": reader, "sheet": info.sheet_name,
                            "date1904": info.date1904, "declared_rows": declared,
                            "estimated_calamine_bytes": estimate_calamine_bytes(info)})
    if declared is not None:
        out.send(framing.TOTAL, {"total": max(declared - 1, 0)})

    header_row = 0
    header: Sequence[Any] = ()
    for number, row in rows:
        if not _blank(row):
            header_row, header = number, row
            break
    if not header_row:
        raise WorkbookRejected(f"sheet {info.sheet_name!r} is empty: no header row found")
    emit = Emitter(columns)
    matched = emit.match(header, date1904=info.date1904)
    out.send(framing.HEADER, {"columns": list(matched.columns),
                              "ignored": list(matched.ignored), "header_row": header_row})
    if last_row is not None:
        out.send(framing.TOTAL, {"total": max(last_row - header_row, 0)})
    max_row = header_row + caps.max_rows
    last_seen = max(header_row, start_after)
    if isinstance(rows, ChunkedRows):
        rows.skip_through(start_after)
    parent = os.getppid()
    size = BatchSize(batch_rows, int(spec.get("batch_bytes") or DEFAULT_BATCH_BYTES))
    # islice takes a batch in C: a Python loop over 155k rows cost ~0.15 s here.
    while pending := list(itertools.islice(rows, size.rows)):
        if os.getppid() != parent:
            raise BrokenPipeError("the daemon is gone")  # SIGKILLed: stop parsing for nobody
        if pending[-1][0] > max_row:
            raise WorkbookRejected(f"sheet {info.sheet_name!r} has more than {caps.max_rows:,} "
                                   "data rows (migration.max_rows)")
        last_seen = max(last_seen, pending[-1][0])
        if pending[0][0] <= start_after:  # resuming: drop what is committed already
            pending = [item for item in pending if item[0] > start_after]
            if not pending:
                continue
        batch = emit.batch(pending, last_seen)
        size.saw(len(pending), len(batch.payload))
        out.write(*framing.encode_batch(batch))
        del pending, batch
    out.send(framing.DONE, {"last_row": last_seen})


#: Descriptors the parser needs: stdio, the workbook, a few module files at import.
MAX_OPEN_FILES = 64
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def set_limits(memory_bytes: int, cpu_seconds: float) -> None:
    """Address-space and CPU limits for this process (and nothing else)."""
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if cpu_seconds > 0:
        seconds = int(cpu_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))


def confine() -> list[str]:
    """What a hostile workbook gets if it takes over the parser: as little as the
    platform allows. No core dumps (they would hold the workbook's data), no file
    it could write or grow, few descriptors, no new processes, no privileges
    gained through exec, and, where the kernel lets an unprivileged process make
    its own namespaces, no network at all. Returns what was applied (tests and
    logs); a step the platform refuses is skipped, never fatal."""
    applied = []
    for name, limit in (("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", 0),
                        ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_NPROC", 0)):
        try:
            resource.setrlimit(getattr(resource, name), (limit, limit))
            applied.append(name)
        except (ValueError, OSError):
            pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            applied.append("no_new_privs")
        # A new network namespace has only a down loopback: no route anywhere. As
        # root CLONE_NEWNET alone works; unprivileged, with a user namespace.
        if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
            applied.append("no_network")
    except (OSError, AttributeError):
        pass
    return applied


def main() -> int:
    # openpyxl imports numpy whenever it is importable (e.g. next to pandas): ~0.1 s
    # of start-up for nothing, and OpenBLAS reserves per-thread buffers at import,
    # which fails under our RLIMIT_AS. The parser never needs it.
    sys.modules["numpy"] = None  # type: ignore[assignment]
    spec = json.loads(sys.stdin.buffer.read())
    out = Output()
    # Nothing here builds reference cycles; the collector would only rescan the
    # (large) batch of live rows again and again (measured: ~30% of coercion).
    gc.disable()
    try:
        set_limits(int(spec["memory_bytes"]), float(spec.get("cpu_seconds", 0)))
        confine()
        run(spec, out)
    except NotSplittable as error:  # only when calamine-stream was configured
        out.send(framing.ERROR, {"kind": "rejected", "reason": (
            f"the sheet cannot be read in slices ({error}); set migration.reader = \"auto\"")})
    except SourceError as error:  # the header does not fit the target
        out.send(framing.ERROR, {"kind": "header", "reason": str(error)})
    except WorkbookRejected as error:
        out.send(framing.ERROR, {"kind": "rejected", "reason": str(error)})
    except MemoryError:
        out.send(framing.ERROR, {"kind": "memory", "reason": (
            f"the parser ran out of memory (limit {int(spec['memory_bytes']) // 1024**2} MiB, "
            "migration.memory_budget_mb); the sheet is too large or malformed")})
    except BrokenPipeError:
        return 1  # the daemon went away or cancelled us: nothing to tell
    except Exception as error:  # any reader error becomes the job's error, not a traceback
        text = f"{type(error).__name__}: {error}"
        out.send(framing.ERROR, {"kind": "parse", "reason": (
            "the workbook could not be read: " + (text if len(text) < 600 else text[:600] + "…"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
