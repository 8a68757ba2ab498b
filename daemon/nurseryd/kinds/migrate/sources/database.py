"""Rows from another database (PostgreSQL or SQLite), paged by key, resumable.

The reading and the coercion run in a child process (:mod:`.database_child`,
readers in :mod:`.db_readers`); this side owns what belongs to the job: the
resolved URL (secrets are read at job start), the reconnect policy and its
back-off, the counters, and the child's lifetime. It relays the child's frames
as the pipeline's events; a batch frame decodes to the one
:class:`~.base.SourceBatch` with its COPY text a view, never parsed, so the
daemon's event loop spends almost nothing per row (measured in
``docs/benchmarks.md``: a worker thread could not get there, the interpreter
lock is shared with the loop).

Key ranges: one child was the serial bottleneck of an import (it gets one share
of a busy machine), so the source is read by ``readers`` children at once, each
on its own key range (``after < key <= until``), which the job's first child
cuts and announces in a plan frame before its first batch. Each range's relay
stamps its batch, under one lock, with every range's last point and sends it:
batches reach the pipeline, and so commit, in stamp order, so a committed
position tells each range where to continue. The first fatal error of any
range stops all of them and is the job's error.

Reconnects: a child is one session and exits at its first error, saying
whether it is transient (:func:`~nurseryd.db.transient.is_transient` decides, in
the child). Here a transient failure waits the policy's back-off and starts a
new child for that range after its last batch relayed, so no row is read twice or skipped; a
session that relayed batches before failing starts a fresh attempt count.

Cancellation: every child runs under ``trio.run_process`` in this task's nursery;
its ``deliver_cancel`` sends SIGTERM (the child cancels the running statement
on a PostgreSQL source, or just ends on SQLite) and SIGKILL a second later.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ....backoff import GaveUp, RetryPolicy, TryAgain, retry
from ..coerce import ColumnSpec
from ..source_config import DatabaseSourceConfig, SecretMissing, sqlite_path
from . import framing
from .base import Header, SourceError, SourceEvent, Total
from .db_readers import APPLICATION_NAME, ErrorClass, classify_pg_error, classify_sqlite_error

__all__ = ["APPLICATION_NAME", "DatabaseSource", "ErrorClass", "classify_pg_error",
           "classify_sqlite_error", "reconnect_policy"]

log = logging.getLogger(__name__)

CHILD_MODULE = "nurseryd.kinds.migrate.sources.database_child"
READ_SIZE = 1024 * 1024
STDERR_KEEP = 8 * 1024
#: How long a child may take to stop after SIGTERM (cancel its statement, close).
TERM_GRACE_S = 1.0


def reconnect_policy(config: DatabaseSourceConfig) -> RetryPolicy:
    """Exponential back-off with *equal* jitter: in [½, 1) of each step.

    Unlike HTTP retries (full jitter), a reconnect to a database that just
    refused us should never be immediate.
    """
    return RetryPolicy(config.connect_attempts, config.retry_backoff_s,
                       config.retry_backoff_max_s, jitter_floor=0.5)


async def _stop(process: trio.Process) -> None:
    """``deliver_cancel``: ask the child to stop, then make sure it does."""
    process.terminate()
    with trio.move_on_after(TERM_GRACE_S):
        await process.wait()
    if process.returncode is None:
        process.kill()


def child_command() -> list[str]:
    return [sys.executable, "-s", "-m", CHILD_MODULE]


def child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    import nurseryd

    env["PYTHONPATH"] = str(Path(nurseryd.__file__).resolve().parent.parent)
    return env


@dataclass(eq=False)  # a range is itself, whatever its state
class Shard:
    """One key range of the source (``after < key <= until``) and how far it was relayed.

    ``after``/``rows`` advance with each batch relayed (a new session of this
    range continues there); ``rows`` counts the source rows before ``after``,
    so row numbers (of rejects) are the ones one reader in key order gives.
    """

    after: list[Any] | None  # keys to continue after (None: from the start)
    rows: int  # source rows before ``after`` (in the whole key order)
    until: list[Any] | None = None  # last key of the range (None: to the end)
    done: bool = False
    batches: int = 0  # relayed in this run

    def saved(self) -> dict[str, Any]:
        return {"after": self.after, "rows": self.rows, "until": self.until, "done": self.done}


@dataclass
class Progress:
    """Where the stream stands, across the ranges and sessions (children) of one run."""

    shards: list[Shard]
    #: The ranges are fixed: cut earlier in this run, or resumed from a checkpoint
    #: that holds them. Until then the first range's session cuts them.
    planned: bool = True
    header: Header | None = None  # the one sent to the pipeline (the first session's)
    counted: bool = False
    #: The range whose session counts the rows (the first one still to read).
    counter: int = 0
    #: Orders the relay of every range's events into the one pipeline channel.
    lock: trio.Lock = field(default_factory=trio.Lock)

    def position(self) -> dict[str, Any]:
        """The checkpoint's position: every range's last relayed point. Correct
        after any batch, because the pipeline commits batches in the order relayed."""
        return {"shards": [shard.saved() for shard in self.shards]}

    @classmethod
    def resumed(cls, resume: Any, readers: int) -> Progress:
        """From a committed position: ranges (this code's), one ``{"after", "rows"}``
        (a single reader's, from before ranges: its rest is cut again), or nothing."""
        if isinstance(resume, dict) and isinstance(resume.get("shards"), list):
            shards = [Shard(_keys(item.get("after")), int(item.get("rows") or 0),
                            _keys(item.get("until")), bool(item.get("done")))
                      for item in resume["shards"]]
            if shards:
                live = [i for i, shard in enumerate(shards) if not shard.done]
                return cls(shards, planned=True, counter=live[0] if live else 0)
        if isinstance(resume, dict) and isinstance(resume.get("after"), list):
            first = Shard(list(resume["after"]), int(resume.get("rows") or 0))
        else:
            first = Shard(None, 0)
        return cls([first], planned=readers < 2)


def _keys(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, list) else None


@dataclass
class Failure:
    """A session's end by error, as the child classified it."""

    kind: str  # "transient", "fatal", "source" (the user's to fix, already worded)
    reason: str


@dataclass
class DatabaseSource:
    """A configured ``[sources.NAME]`` database, streamed page by page."""

    config: DatabaseSourceConfig
    source_type: str = "database"
    #: Injected by tests to watch back-off decisions; real runs sleep.
    sleep: Callable[[float], Awaitable[None]] = trio.sleep
    stats: dict[str, Any] = field(
        default_factory=lambda: {"pages": 0, "reconnects": 0, "readers": 0})
    kind: str | None = None
    #: Every reader child's pid, in order of start (for logs and tests).
    pids: list[int] = field(default_factory=list)

    def _spec(self) -> dict[str, Any]:
        """The child's spec, without the position (added per session)."""
        try:
            url = self.config.resolve_url()
            path = str(sqlite_path(url).resolve()) if url.startswith("sqlite:///") else None
        except (SecretMissing, ValueError) as error:
            raise SourceError(str(error)) from None
        self.kind = "sqlite" if path is not None else "postgresql"
        config = self.config
        return {"name": config.name, "kind": self.kind, "url": url, "sqlite_path": path,
                "table": config.table, "query": config.query, "key": list(config.key),
                "batch_rows": config.batch_rows, "connect_timeout_s": config.connect_timeout_s}

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        """Every key range read by its own child at once; the first error of any
        ends them all (a failed range's error is the job's, never a group of them)."""
        spec = {**self._spec(), "columns": [asdict(column) for column in columns]}
        progress = Progress.resumed(resume, self.config.readers)
        failures: list[SourceError] = []
        async with trio.open_nursery() as nursery:

            async def read(shard: Shard) -> None:
                try:
                    await self._read_range(spec, progress, shard, send, start)
                except SourceError as error:
                    failures.append(error)
                    nursery.cancel_scope.cancel()  # the other ranges' children stop too

            def start(shards: Sequence[Shard]) -> None:
                self.stats["readers"] = len(progress.shards)
                for shard in shards:
                    nursery.start_soon(read, shard)

            live = [shard for shard in progress.shards if not shard.done]
            start(live or progress.shards[:1])
        if failures:
            raise failures[0]

    async def _read_range(self, spec: dict[str, Any], progress: Progress, shard: Shard,
                          send: trio.MemorySendChannel[SourceEvent],
                          start: Callable[[Sequence[Shard]], None]) -> None:
        """One range to its end, session after session, reconnecting with back-off."""
        where = f"source {self.config.name} ({self.kind})"
        policy = reconnect_policy(self.config)

        async def attempt(number: int) -> Failure | None:
            before = shard.batches
            failure = await self._session(spec, progress, shard, send, start)
            if failure is None:
                return None
            if failure.kind == "source":
                raise SourceError(failure.reason)
            if failure.kind != "transient":
                raise SourceError(f"{where}: {failure.reason}")
            if shard.batches > before:
                return failure  # it got somewhere: a fresh attempt count
            raise TryAgain(failure.reason)

        def reconnecting(number: int, delay: float, failure: TryAgain) -> None:
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", where, failure.reason,
                        delay, number + 1, self.config.connect_attempts)
            self.stats["reconnects"] += 1

        while True:
            try:
                lost = await retry(policy, attempt, on_retry=reconnecting, sleep=self.sleep)
            except GaveUp as gave_up:
                raise SourceError(f"{where} unreachable after {gave_up.attempts} attempts: "
                                  f"{gave_up.reason}") from None
            if lost is None:
                return
            # Lost mid-stream after progress: back off as after a first failed attempt.
            delay = policy.delay(1)
            if delay is None:
                raise SourceError(f"{where} unreachable after 1 attempts: {lost.reason}")
            reconnecting(1, delay, TryAgain(lost.reason))
            await self.sleep(delay)

    async def _session(self, spec: dict[str, Any], progress: Progress, shard: Shard,
                       send: trio.MemorySendChannel[SourceEvent],
                       start: Callable[[Sequence[Shard]], None]) -> Failure | None:
        """One child from the range's current position to its end; None when it is done."""
        index = next(i for i, one in enumerate(progress.shards) if one is shard)
        plan = self.config.readers if not progress.planned and index == 0 else 0
        body = json.dumps({**spec, "after": shard.after, "done": shard.rows,
                           "until": shard.until, "plan": plan,
                           "count": index == progress.counter and not progress.counted}).encode()
        relay = _Relay(self, progress, shard, send, start)
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(
                trio.run_process, child_command(), stdin=body, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, check=False, deliver_cancel=_stop, env=child_env()))
            self.pids.append(process.pid)
            nursery.start_soon(relay.drain_stderr, process)
            await relay.frames(process)
            await process.wait()
        if relay.failure is not None:
            return relay.failure
        if shard.done:
            return None
        tail = relay.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        said = f" (it said: {tail[0][:300]})" if tail else ""
        return Failure("fatal", f"the reader process exited with code {process.returncode} "
                                f"before finishing{said}")

    def describe(self) -> dict[str, Any]:
        return {**self.config.describe(), "database": self.kind, **self.stats}


def _no_start(shards: Sequence[Shard]) -> None:
    raise RuntimeError("a plan where none was asked for")


@dataclass
class _Relay:
    """Reads one child's frames and passes them on as the pipeline's events."""

    source: DatabaseSource
    progress: Progress
    shard: Shard
    send: trio.MemorySendChannel[SourceEvent]
    #: Starts the readers of the ranges a plan adds (the run's nursery).
    start: Callable[[Sequence[Shard]], None] = _no_start
    failure: Failure | None = None
    stderr: bytearray = field(default_factory=bytearray)

    async def frames(self, process: trio.Process) -> None:
        assert process.stdout is not None
        frames = framing.FrameBuffer()
        while data := await process.stdout.receive_some(READ_SIZE):
            frames.feed(data)
            while True:
                try:
                    frame = frames.next_frame()
                except ValueError as error:
                    self.failure = Failure("fatal", f"the reader sent malformed output ({error})")
                    process.kill()
                    return
                if frame is None:
                    break
                kind, body = frame
                await self.handle(kind, body)
                if self.failure is not None:  # nothing after an error is relayed
                    if kind != framing.ERROR:  # our verdict, not the child's: stop it
                        process.kill()
                    return

    async def handle(self, kind: bytes, body: bytes | bytearray) -> None:
        progress, shard = self.progress, self.shard
        if kind == framing.BATCH:
            batch = framing.decode_batch(body)
            # One range at a time: the position stamped on a batch is every range's
            # state as of that batch, and batches reach the channel in stamp order.
            async with progress.lock:
                shard.after = list(batch.position["after"])
                shard.rows = int(batch.position["rows"])
                batch.position = progress.position()
                await self.send.send(batch)
            # Relayed: a new session continues after it, whatever happens next.
            shard.batches += 1
            self.source.stats["pages"] += 1
            return
        value = json.loads(body)
        if kind == framing.HEADER:
            header = Header(tuple(value["columns"]), tuple(value["ignored"]))
            async with progress.lock:
                if progress.header is None:
                    await self.send.send(header)
                    progress.header = header
                elif header != progress.header:  # another range's or a reconnected session
                    # The pipeline's COPY plan is built for the first header: rows of
                    # another layout would land in the wrong columns.
                    name = self.source.config.name
                    self.failure = Failure("source", f"source {name}: its columns changed "
                                                     "during the import; run it again")
        elif kind == framing.TOTAL:
            progress.counted = True
            async with progress.lock:
                await self.send.send(Total(int(value["total"])))
        elif kind == framing.PLAN:
            self.plan(value["shards"])
        elif kind == framing.ERROR:
            self.failure = Failure(str(value["kind"]), str(value["reason"]))
        elif kind == framing.DONE:
            shard.done = True  # every batch of it is relayed: later positions say so

    def plan(self, ranges: list[dict[str, Any]]) -> None:
        """The ranges the first session cut (before its first batch): it reads the
        first, new readers start on the others."""
        progress, shard = self.progress, self.shard
        if progress.planned or progress.shards[0] is not shard or len(progress.shards) != 1 \
                or not ranges:
            self.failure = Failure("fatal", "the reader sent a plan nobody asked for")
            return
        first, *others = ranges
        shard.until = _keys(first["until"])
        added = [Shard(_keys(item["after"]), int(item["rows"]), _keys(item["until"]))
                 for item in others]
        progress.shards.extend(added)
        progress.planned = True
        self.start(added)

    async def drain_stderr(self, process: trio.Process) -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            self.stderr += chunk
            if len(self.stderr) > STDERR_KEEP:
                del self.stderr[:-STDERR_KEEP]
