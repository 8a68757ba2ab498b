"""What the pipeline needs from a source, and a source fed from a list.

A source runs as a task and sends events into a bounded channel (so memory is
bounded by the channel size, and the source works ahead while the previous
batch is being written):

* :class:`Header` once: which target columns the source feeds (the header
  matched against the target's names and aliases);
* :class:`Total` whenever it learns how many data rows to expect;
* :class:`SourceBatch` with the COPY text of its good rows, its rejects and the
  position to resume *after* it.

Sources coerce their own rows (with :class:`~..coerce.RowCoercer`), because the
Excel source does that in its child process, away from the daemon's event loop;
an in-process source does it here with the same code.

A source raises :class:`SourceError` for anything the user must fix (missing
columns, a hostile file, a crashed parser); the pipeline turns it into the
job's error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..coerce import ColumnSpec, HeaderError, RejectRecord, RowCoercer, match_header


class SourceError(Exception):
    """The source cannot go on; ``str()`` is the job's error."""


@dataclass(frozen=True)
class Header:
    columns: tuple[str, ...]  # target columns fed, in target order
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Total:
    total: int  # data rows expected in the whole source (not only after the resume point)


@dataclass
class SourceBatch:
    payload: bytes | memoryview  # COPY text of the rows to upsert
    written: int  # lines in payload
    rows_seen: int  # good + rejected source rows
    rejects: list[RejectRecord] = field(default_factory=list)
    position: Any = None  # JSON value: resume after this batch


SourceEvent = Header | Total | SourceBatch


class Source(Protocol):
    """Anything that yields (header, row batches) with a resumable position."""

    source_type: str

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        """Send a Header, then batches after ``resume`` (None: from the start)."""

    def describe(self) -> dict[str, Any]:
        """Facts for the job's result (reader used, sheet...)."""


@dataclass
class ListSource:
    """Rows from memory: for tests and small in-process sources.

    Position = index of the last row consumed (``rows[position]`` done), so a
    resumed run starts at ``position + 1``. Row numbers in rejects are
    spreadsheet-like: the header is row 1, ``rows[0]`` is row 2.
    """

    header: Sequence[Any]
    rows: Sequence[Sequence[Any]]
    batch_rows: int = 1000
    source_type: str = "list"
    date1904: bool = False
    #: Set by a test to break off after N batches (an interruption point).
    stop_after_batches: int | None = None

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        try:
            match = match_header(self.header, columns)
        except HeaderError as error:
            raise SourceError(str(error)) from None
        await send.send(Header(tuple(c.name for c in match.columns), match.ignored))
        await send.send(Total(len(self.rows)))
        coercer = RowCoercer(match, date1904=self.date1904)
        start = 0 if resume is None else int(resume) + 1
        sent = 0
        for begin in range(start, len(self.rows), self.batch_rows):
            if self.stop_after_batches is not None and sent >= self.stop_after_batches:
                raise SourceError(f"source stopped after {sent} batches")
            chunk = self.rows[begin:begin + self.batch_rows]
            batch = coercer.coerce_rows([(begin + i + 2, row) for i, row in enumerate(chunk)])
            await send.send(SourceBatch(batch.copy_bytes(), batch.written, batch.rows_seen,
                                        batch.rejects, begin + len(chunk) - 1))
            sent += 1
            await trio.lowlevel.checkpoint()

    def describe(self) -> dict[str, Any]:
        return {"rows": len(self.rows)}
