"""What the pipeline needs from a source, the one way a source emits, and a list source.

A source runs as a task and sends events into a bounded channel (so memory is
bounded by the channel size, and the source works ahead while the previous
batch is being written):

* :class:`Header` once: which target columns the source feeds (the header
  matched against the target's names and aliases);
* :class:`Total` whenever it learns how many data rows to expect;
* :class:`SourceBatch` with the COPY text of its good rows, its rejects and the
  position to resume *after* it: the one batch type, also what the Excel
  parser's child process sends over its pipe (see :mod:`.framing`).

Every source goes through :class:`Emitter`: it matches the header, coerces rows
(with one :class:`~..coerce.RowCoercer`) and builds the batches, so that sequence
is written once. In-process sources (a database, Google Sheets, a list) send
with its ``send_*`` methods; the Excel source's child process, which has no
event loop, uses its pure :meth:`Emitter.match` and :meth:`Emitter.batch` and
writes the results as frames, so coercion stays away from the daemon's event loop.

This module is imported by that child, so it must not import trio at import
time (trio costs the child ~0.15 s of start-up): the async parts import it
where they run.

A source raises :class:`SourceError` for anything the user must fix (missing
columns, a hostile file, a crashed parser); the pipeline turns it into the
job's error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..coerce import (
    CoercedBatch,
    ColumnSpec,
    HeaderError,
    HeaderMatch,
    RejectRecord,
    RowCoercer,
    match_header,
)

if TYPE_CHECKING:
    import trio


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
    """One batch of coerced rows, ready to load."""

    payload: bytes | memoryview  # COPY text of the rows to upsert
    written: int  # lines in payload
    rows_seen: int  # good + rejected source rows
    rejects: list[RejectRecord] = field(default_factory=list)
    position: Any = None  # JSON value: resume after this batch

    @classmethod
    def of(cls, coerced: CoercedBatch, position: Any) -> SourceBatch:
        return cls(coerced.copy_bytes(), coerced.written, coerced.rows_seen,
                   coerced.rejects, position)


SourceEvent = Header | Total | SourceBatch


class EventSender(Protocol):
    """Where a source's events go: the pipeline's channel (or a test's wrapper)."""

    def send(self, event: SourceEvent) -> Awaitable[None]: ...


class Source(Protocol):
    """Anything that yields (header, row batches) with a resumable position."""

    source_type: str

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        """Send a Header, then batches after ``resume`` (None: from the start)."""

    def describe(self) -> dict[str, Any]:
        """Facts for the job's result (reader used, sheet...)."""


class Emitter:
    """The emission sequence of every source: the header, totals, coerced batches.

    ``where`` prefixes header errors (``"source legacy"``, ``"sheet 'Chats'"``).
    Rows are ``(source row number, raw values)``; row numbers are what a reject
    reports. A batch before the header is a bug, refused here.
    """

    def __init__(self, columns: Sequence[ColumnSpec], send: EventSender | None = None, *,
                 where: str = "") -> None:
        self.columns = columns
        self.where = where
        self._send = send
        self._coercer: RowCoercer | None = None

    # -- pure: also used by the Excel parser's child process -----------------------------

    def match(self, header: Sequence[Any], *, date1904: bool = False) -> Header:
        """Match the source's header row against the target; raises :class:`SourceError`."""
        try:
            match = match_header(header, self.columns)
        except HeaderError as error:
            raise SourceError(f"{self.where}: {error}" if self.where else str(error)) from None
        self._coercer = RowCoercer(match, date1904=date1904)
        return Header(tuple(column.name for column in match.columns), match.ignored)

    @property
    def matched(self) -> HeaderMatch | None:
        """The header match (None before :meth:`match`): fast paths build on it."""
        return None if self._coercer is None else self._coercer.match

    def batch(self, numbered_rows: Sequence[tuple[int, Sequence[Any]]],
              position: Any) -> SourceBatch:
        """Coerce rows into a batch that resumes after ``position``."""
        if self._coercer is None:
            raise RuntimeError("rows before the header was matched")
        return SourceBatch.of(self._coercer.coerce_rows(numbered_rows), position)

    # -- async: in-process sources -------------------------------------------------------

    async def send_header(self, header: Sequence[Any], *, date1904: bool = False) -> Header:
        event = self.match(header, date1904=date1904)
        await self._sender().send(event)
        return event

    async def send_total(self, total: int) -> None:
        await self._sender().send(Total(total))

    async def send_rows(self, numbered_rows: Sequence[tuple[int, Sequence[Any]]],
                        position: Any, *, in_thread: bool = True) -> None:
        """Coerce and send one batch. Coercion is CPU work: by default it runs in a
        worker thread, so the event loop (HTTP, the loader's COPY) stays responsive."""
        if in_thread:
            import trio

            batch = await trio.to_thread.run_sync(self.batch, numbered_rows, position)
        else:
            batch = self.batch(numbered_rows, position)
        await self._sender().send(batch)

    def _sender(self) -> EventSender:
        if self._send is None:
            raise RuntimeError("this emitter has nowhere to send")
        return self._send


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

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        emit = Emitter(columns, send)
        await emit.send_header(self.header, date1904=self.date1904)
        await emit.send_total(len(self.rows))
        start = 0 if resume is None else int(resume) + 1
        for begin in range(start, len(self.rows), self.batch_rows):
            chunk = self.rows[begin:begin + self.batch_rows]
            await emit.send_rows([(begin + i + 2, row) for i, row in enumerate(chunk)],
                                 begin + len(chunk) - 1, in_thread=False)

    def describe(self) -> dict[str, Any]:
        return {"rows": len(self.rows)}
