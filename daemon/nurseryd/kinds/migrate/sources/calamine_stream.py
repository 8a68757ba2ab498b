"""python-calamine over a sheet cut into slices: calamine's speed, bounded memory.

The slices come from :mod:`.sheet_chunks`; this module loads them with
python-calamine and yields ``(sheet row number, values)`` exactly as the
whole-sheet path (``iter_rows`` enumerated from 1) does, so the emitter and
coercion downstream cannot tell the difference:

* rows keep their sheet numbers (calamine reports where each slice's used
  range starts); the blank rows between slices are not yielded, and blank
  rows are skipped downstream anyway;
* every row is padded with ``''`` (calamine's empty cell) to the widest row
  seen so far and shifted so that index 0 is column A: the header and the data
  rows then line up however each slice's used range starts and ends.

Why threads: python-calamine releases the GIL while it parses (measured: a
Python loop in the main thread ran at full speed during a load), so two
workers parse the next slices while the main thread coerces the current one
and writes it to the daemon. Loads are submitted ahead in order and at most
:data:`AHEAD` slices are in flight, which bounds memory.

The fast path: once the header is known, the child may hand
:meth:`ChunkedRows.use_fast` a loader (:mod:`.arrow_slices`) that reads a slice
into Arrow columns and coerces them in the same worker thread; the slice then
arrives as ready COPY lines, with no Python object per cell. A slice the loader
declines is parsed here as rows, so every slice takes exactly one of the two
paths and the rows stay in sheet order. The worker threads also build each
slice's small workbook (the re-zip), which used to run on the main thread.

Resume: :meth:`ChunkedRows.skip_through` drops whole slices that end at or
before the committed position without parsing them.
"""

from __future__ import annotations

import io
import itertools
import zipfile
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..xlsx_checks import WorkbookInfo
from .sheet_chunks import Chunk, SheetSplitter, chunk_workbook, skeleton_parts

if TYPE_CHECKING:  # pyarrow is only imported where the fast path runs
    from typing import TypeAlias

    from ..coerce_arrow import ArrowLines

    #: What a worker hands back for a slice: calamine's (start, rows), or Arrow runs.
    Loaded: TypeAlias = "tuple[tuple[int, int] | None, list[Row]] | list[ArrowLines]"

#: Sheet XML per slice. 8 MiB is ~10k rows of the chats workbook, ~25 MiB of
#: calamine cells; larger slices did not load faster (measured 8 vs 16 MiB).
CHUNK_BYTES = 8 * 1024**2
WORKERS = 2
AHEAD = 3

Row = list[Any]


def _load(workbook: bytes, sheet_name: str) -> tuple[tuple[int, int] | None, list[Row]]:
    """Parse one slice (runs in a worker thread; calamine drops the GIL meanwhile)."""
    from python_calamine import CalamineWorkbook

    book = CalamineWorkbook.from_filelike(io.BytesIO(workbook))
    try:
        sheet = book.get_sheet_by_name(sheet_name)
        return sheet.start, sheet.to_python(skip_empty_area=True)
    finally:
        book.close()


#: A fast loader: (slice, skip rows through) -> runs of COPY lines, or None for the row path.
FastLoader = Callable[[Chunk, int], "list[ArrowLines] | None"]


class ChunkedRows:
    """A sheet one slice at a time: :meth:`segments` yields, in sheet order, a run of
    ``(row number, values)`` per slice read as rows and, once :meth:`use_fast`
    gave a loader, :class:`~..coerce_arrow.ArrowLines` for the slices it took."""

    def __init__(self, path: str, info: WorkbookInfo, *, chunk_bytes: int = CHUNK_BYTES,
                 workers: int = WORKERS) -> None:
        self.archive = zipfile.ZipFile(path)
        self.info = info
        self.splitter = SheetSplitter(self.archive, info.sheet_part, chunk_bytes=chunk_bytes)
        self.chunks = self.splitter.chunks()
        try:
            # Raises NotSplittable now, before any row is produced, if the sheet
            # cannot be cut: the caller falls back to a whole-sheet reader.
            self.first: Chunk | None = next(self.chunks, None)
        except BaseException:
            self.archive.close()
            raise
        self.skeleton = skeleton_parts(self.archive, info.sheet_part)
        self.closing = self.splitter.closing()
        self.workers = workers
        self.slices = {"arrow": 0, "rows": 0}
        self._skip = 0
        self._fast: FastLoader | None = None
        self._decided = False
        self._segments = self._iterate()

    def skip_through(self, row: int) -> None:
        """Slices that end at or before ``row`` need not be parsed (resume)."""
        self._skip = row

    def use_fast(self, loader: FastLoader | None) -> None:
        """From the next slice on, try ``loader`` first (None: rows only).

        Until this is called one slice at a time is parsed, so no slice after the
        header's is started before the header is known.
        """
        self._fast = loader
        self._decided = True

    def segments(self) -> Iterator[Iterator[tuple[int, Row]] | ArrowLines]:
        return self._segments

    def close(self) -> None:
        self._segments.close()
        self.archive.close()

    def _all_chunks(self) -> Iterator[Chunk]:
        if self.first is not None:
            yield self.first
            self.first = None
        yield from self.chunks

    def _work(self, chunk: Chunk, fast: FastLoader | None) -> Loaded:
        """One slice, in a worker thread: the fast loader, else calamine's rows."""
        if fast is not None:
            lines = fast(chunk, self._skip)
            if lines is not None:
                return lines
        book = chunk_workbook(self.skeleton, self.info.sheet_part, self.splitter.prolog,
                              chunk.body, self.closing)
        return _load(book, self.info.sheet_name)

    def _iterate(self) -> Generator[Iterator[tuple[int, Row]] | ArrowLines, None, None]:
        width = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="calamine") as pool:
            pending: deque[Future[Loaded]] = deque()
            chunks = self._all_chunks()

            def submit() -> None:
                while len(pending) < (AHEAD if self._decided else 1):
                    chunk = next(chunks, None)
                    if chunk is None:
                        return
                    if chunk.last_row is not None and chunk.last_row <= self._skip:
                        continue  # committed already: not even parsed
                    pending.append(pool.submit(self._work, chunk, self._fast))

            try:
                while True:
                    submit()
                    if not pending:
                        return
                    loaded = pending.popleft().result()
                    if self._decided:
                        submit()
                    if isinstance(loaded, list):  # the fast loader's runs
                        self.slices["arrow"] += 1
                        yield from loaded
                        continue
                    self.slices["rows"] += 1
                    start, rows = loaded
                    if start is None or not rows:
                        continue
                    first_row, first_column = start
                    # calamine's range is dense: every row of a slice is as wide.
                    width = max(width, len(rows[0]) + first_column)
                    if first_column or len(rows[0]) + first_column != width:
                        lead = [""] * first_column
                        rows = [lead + row + [""] * (width - first_column - len(row))
                                for row in rows]
                    yield zip(itertools.count(first_row + 1), rows)
                    del rows
            finally:
                for future in pending:
                    future.cancel()
