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

Reconnects: a child is one session and exits at its first error, saying
whether it is transient (:func:`~nurseryd.db.transient.is_transient` decides, in
the child). Here a transient failure waits the policy's back-off and starts a
new child after the last batch relayed, so no row is read twice or skipped; a
session that relayed batches before failing starts a fresh attempt count.

Cancellation: the child runs under ``trio.run_process`` in this task's nursery;
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


@dataclass
class Progress:
    """Where the stream stands, across the sessions (children) of one run."""

    after: list[Any] | None  # keys to continue after (None: from the start)
    done: int  # source rows consumed, committed or relayed
    header: Header | None = None  # the one sent to the pipeline (the first session's)
    counted: bool = False
    finished: bool = False
    batches: int = 0  # relayed in this run


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
    stats: dict[str, Any] = field(default_factory=lambda: {"pages": 0, "reconnects": 0})
    kind: str | None = None
    #: Every reader child's pid, in order (for logs and tests).
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
        spec = {**self._spec(), "columns": [asdict(column) for column in columns]}
        progress = Progress(*_resume_point(resume))
        where = f"source {self.config.name} ({self.kind})"
        policy = reconnect_policy(self.config)

        async def attempt(number: int) -> Failure | None:
            before = progress.batches
            failure = await self._session(spec, progress, send)
            if failure is None:
                return None
            if failure.kind == "source":
                raise SourceError(failure.reason)
            if failure.kind != "transient":
                raise SourceError(f"{where}: {failure.reason}")
            if progress.batches > before:
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

    async def _session(self, spec: dict[str, Any], progress: Progress,
                       send: trio.MemorySendChannel[SourceEvent]) -> Failure | None:
        """One child from the current position to its end; None when the stream is done."""
        body = json.dumps({**spec, "after": progress.after, "done": progress.done,
                           "count": not progress.counted}).encode()
        relay = _Relay(self, progress, send)
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
        if progress.finished:
            return None
        tail = relay.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        said = f" (it said: {tail[0][:300]})" if tail else ""
        return Failure("fatal", f"the reader process exited with code {process.returncode} "
                                f"before finishing{said}")

    def describe(self) -> dict[str, Any]:
        return {**self.config.describe(), "database": self.kind, **self.stats}


@dataclass
class _Relay:
    """Reads one child's frames and passes them on as the pipeline's events."""

    source: DatabaseSource
    progress: Progress
    send: trio.MemorySendChannel[SourceEvent]
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

    async def handle(self, kind: bytes, body: bytes) -> None:
        progress = self.progress
        if kind == framing.BATCH:
            batch = framing.decode_batch(body)
            await self.send.send(batch)
            # Relayed: a new session continues after it, whatever happens next.
            progress.after = list(batch.position["after"])
            progress.done = int(batch.position["rows"])
            progress.batches += 1
            self.source.stats["pages"] += 1
            return
        value = json.loads(body)
        if kind == framing.HEADER:
            header = Header(tuple(value["columns"]), tuple(value["ignored"]))
            if progress.header is None:
                await self.send.send(header)
                progress.header = header
            elif header != progress.header:  # a reconnected session matched it again
                # The pipeline's COPY plan is built for the first header: rows of another
                # layout would land in the wrong columns.
                name = self.source.config.name
                self.failure = Failure("source", f"source {name}: its columns changed during "
                                                 "the import (seen on reconnecting); run it again")
        elif kind == framing.TOTAL:
            progress.counted = True
            await self.send.send(Total(int(value["total"])))
        elif kind == framing.ERROR:
            self.failure = Failure(str(value["kind"]), str(value["reason"]))
        elif kind == framing.DONE:
            progress.finished = True

    async def drain_stderr(self, process: trio.Process) -> None:
        assert process.stderr is not None
        async for chunk in process.stderr:
            self.stderr += chunk
            if len(self.stderr) > STDERR_KEEP:
                del self.stderr[:-STDERR_KEEP]


def _resume_point(resume: Any) -> tuple[list[Any] | None, int]:
    """(keys to continue after, rows already consumed) from a committed position."""
    if isinstance(resume, dict) and isinstance(resume.get("after"), list):
        return list(resume["after"]), int(resume.get("rows") or 0)
    return None, 0
