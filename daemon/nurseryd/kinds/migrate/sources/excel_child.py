"""The Excel parser's child process: ``python -m nurseryd.kinds.migrate.sources.excel_child``.

Why a separate process: python-calamine aborts the whole process (a Rust
``abort()``, no exception) when an allocation fails, and a hostile 5 KB file
makes it try to allocate 512 GiB; openpyxl can loop for minutes. Here that
costs one child, limited by ``RLIMIT_AS`` (memory) and ``RLIMIT_CPU`` (time),
and the daemon stays up. It is also what lets parsing run on another core while
the daemon streams the previous batch into PostgreSQL (a thread gains <= 4%:
the GIL).

Which reader: the sheet slice by slice (:mod:`.calamine_stream`), each slice
after the header's through fastexcel into Arrow columns where the slice allows
(:mod:`.arrow_slices`), else as python-calamine rows; a sheet that cannot be cut
safely gets the whole-sheet choice of :func:`choose_reader` (calamine when its
estimate fits the budget, else openpyxl).

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
from typing import TYPE_CHECKING, Any

from ..coerce import ColumnSpec
from ..xlsx_checks import ParseCaps, WorkbookInfo, WorkbookRejected, inspect_workbook
from . import framing
from .base import Emitter, SourceBatch, SourceError
from .calamine_stream import CHUNK_BYTES, ChunkedRows, FastLoader
from .framing import Output
from .sheet_chunks import NotSplittable

if TYPE_CHECKING:  # pyarrow is imported only when the fast path runs
    from typing import TypeAlias

    from ..coerce_arrow import ArrowLines

    #: What the batching loop consumes: a run of numbered rows, or a slice's Arrow lines.
    Segment: TypeAlias = "Iterator[tuple[int, Any]] | ArrowLines"

#: The reader name of python-calamine slice by slice.
STREAM_READER = "calamine-stream"
#: Slice by slice, each slice through fastexcel into Arrow where it can (the default).
ARROW_READER = "arrow-stream"
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
              slice_bytes: int = CHUNK_BYTES,
              ) -> tuple[str, Iterator[tuple[int, Any]] | ChunkedRows, int | None]:
    """(reader name, numbered rows, last row number if known) for the sheet.

    ``auto`` reads python-calamine slice by slice (:mod:`.calamine_stream`):
    calamine's speed at any size, memory bounded by the slice. A sheet that
    cannot be cut safely falls back to the whole-sheet choice.
    """
    if configured in ("auto", STREAM_READER, ARROW_READER):
        try:
            return STREAM_READER, ChunkedRows(path, info, chunk_bytes=slice_bytes), None
        except NotSplittable:
            if configured != "auto":
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


def _fast_loader(rows: ChunkedRows, emit: Emitter) -> FastLoader | None:
    """The Arrow loader for the matched header, or None when a column's kind has no
    Arrow rule (then every slice is read as rows)."""
    from ..coerce_arrow import ArrowCoercer
    from .arrow_slices import ArrowSliceLoader

    assert emit.matched is not None
    coercer = ArrowCoercer(emit.matched)
    if not coercer.possible:
        return None
    loader = ArrowSliceLoader(coercer, skeleton=rows.skeleton, part=rows.info.sheet_part,
                              prolog=rows.splitter.prolog, closing=rows.closing,
                              sheet_name=rows.info.sheet_name)
    return loader.load


def _find_header(segments: Iterator[Segment]) -> tuple[int, Sequence[Any], Iterator[Segment]]:
    """The first non-blank row, and the segments from the row after it on."""
    for segment in segments:
        if not isinstance(segment, Iterator):
            raise RuntimeError("Arrow lines before the header")
        for number, row in segment:
            if not _blank(row):
                return number, row, itertools.chain([segment], segments)
    return 0, (), iter(())


class _Batches:
    """Cuts the rows after the header into batches and writes them to the daemon."""

    def __init__(self, spec: dict[str, Any], out: Output, emit: Emitter, info: WorkbookInfo,
                 header_row: int, caps: ParseCaps) -> None:
        self.out = out
        self.emit = emit
        self.sheet = info.sheet_name
        self.max_rows = caps.max_rows
        self.max_row = header_row + caps.max_rows
        self.start_after = int(spec.get("start_after_row") or 0)
        self.last_seen = max(header_row, self.start_after)
        self.batch_rows = int(spec["batch_rows"])
        self.batch_bytes = int(spec.get("batch_bytes") or DEFAULT_BATCH_BYTES)
        self.size = BatchSize(self.batch_rows, self.batch_bytes)
        self.parent = os.getppid()

    def _check(self, last_row: int) -> None:
        if os.getppid() != self.parent:
            raise BrokenPipeError("the daemon is gone")  # SIGKILLed: stop parsing for nobody
        if last_row > self.max_row:
            raise WorkbookRejected(f"sheet {self.sheet!r} has more than {self.max_rows:,} "
                                   "data rows (migration.max_rows)")
        self.last_seen = max(self.last_seen, last_row)

    def rows(self, segments: Iterator[Segment]) -> None:
        """Every segment, in order: runs of rows batched by :class:`BatchSize`
        (a batch may span slices), Arrow lines written as they come."""
        pending: list[tuple[int, Any]] = []
        for segment in segments:
            if not isinstance(segment, Iterator):  # a slice's Arrow lines
                if pending:
                    self._send_rows(pending)
                    pending = []
                self._send_lines(segment)
                continue
            # islice takes a batch in C: a Python loop over 155k rows cost ~0.15 s here.
            while taken := list(itertools.islice(segment, self.size.rows - len(pending))):
                pending += taken
                if len(pending) >= self.size.rows:
                    self._send_rows(pending)
                    pending = []
        if pending:
            self._send_rows(pending)

    def _send_rows(self, pending: list[tuple[int, Any]]) -> None:
        self._check(pending[-1][0])
        if pending[0][0] <= self.start_after:  # resuming: drop what is committed already
            pending = [item for item in pending if item[0] > self.start_after]
            if not pending:
                return
        batch = self.emit.batch(pending, self.last_seen)
        self.size.saw(len(pending), len(batch.payload))
        self.out.write(*framing.encode_batch(batch))

    def _send_lines(self, lines: ArrowLines) -> None:
        """Arrow lines in batches of ``batch_rows`` rows and about ``batch_bytes``."""
        total = len(lines)
        self._check(lines.first_row + total - 1)
        size = len(lines.payload(0, total))
        step = max(1, min(self.batch_rows, self.batch_bytes * total // max(size, 1)))
        for start in range(0, total, step):
            stop = min(total, start + step)
            batch = SourceBatch(payload=lines.payload(start, stop), written=stop - start,
                                rows_seen=stop - start, position=lines.first_row + stop - 1)
            self.out.write(*framing.encode_batch(batch))


def run(spec: dict[str, Any], out: Output) -> None:
    caps = ParseCaps(**spec["caps"])
    columns = [ColumnSpec(name=c["name"], type=c["type"], nullable=c["nullable"],
                          aliases=tuple(c["aliases"]), key=c["key"]) for c in spec["columns"]]
    path = spec["path"]
    configured = spec.get("reader", "auto")
    info = inspect_workbook(path, spec.get("sheet"), caps)
    reader, rows, last_row = open_rows(
        path, info, configured, int(spec["memory_bytes"]),
        slice_bytes=int(spec.get("slice_bytes") or CHUNK_BYTES))
    chunked = rows if isinstance(rows, ChunkedRows) else None
    if chunked is not None and configured in ("auto", ARROW_READER) and arrow_available():
        reader = ARROW_READER
    declared = info.estimated_rows()
    out.send(framing.INFO, {"reader": reader, "sheet": info.sheet_name,
                            "date1904": info.date1904, "declared_rows": declared,
                            "estimated_calamine_bytes": estimate_calamine_bytes(info)})
    if declared is not None:
        out.send(framing.TOTAL, {"total": max(declared - 1, 0)})

    segments: Iterator[Segment] = (rows.segments() if isinstance(rows, ChunkedRows)
                                   else iter([rows]))
    header_row, header, segments = _find_header(segments)
    if not header_row:
        raise WorkbookRejected(f"sheet {info.sheet_name!r} is empty: no header row found")
    emit = Emitter(columns)
    matched = emit.match(header, date1904=info.date1904)
    out.send(framing.HEADER, {"columns": list(matched.columns),
                              "ignored": list(matched.ignored), "header_row": header_row})
    if last_row is not None:
        out.send(framing.TOTAL, {"total": max(last_row - header_row, 0)})
    batches = _Batches(spec, out, emit, info, header_row, caps)
    if chunked is not None:
        chunked.skip_through(batches.start_after)
        chunked.use_fast(_fast_loader(chunked, emit) if reader == ARROW_READER else None)
    batches.rows(segments)
    done: dict[str, Any] = {"last_row": batches.last_seen}
    if chunked is not None:
        done["slices"] = dict(chunked.slices)
    out.send(framing.DONE, done)


def arrow_available() -> bool:
    """Whether pyarrow and fastexcel import here (the fast path's two libraries)."""
    try:
        import fastexcel  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


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
