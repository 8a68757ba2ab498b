"""A job this process holds in memory, and the context its kind runs with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..db import jobs as jobsdb
from ..kinds.base import MAX_NOTE_CHARS, MAX_NOTES_PER_ATTEMPT, JobKind
from ..lifecycle import StopReason
from ..observe.logs import redact
from ..store.base import NOTE_LEVELS, JobNote, Row, now

if TYPE_CHECKING:
    from ..config import Settings
    from ..db import Database
    from ..observe.metrics import Metrics


@dataclass(eq=False)
class JobHandle:
    """A job this process holds, from acceptance to its final write."""

    id: int
    kind: JobKind
    params: dict[str, Any]
    timeout_s: float
    attempts: int
    checkpoint: Any
    total: int | None
    processed: int
    failed: int
    #: The job's own cancel scope: its deadline is the timeout, set when it starts.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: StopReason | None = None
    running: bool = False
    finished: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    cancel_requested_at: Any = None
    #: The kind commits its checkpoint and processed/failed with its own data
    #: (``commit_progress``): progress flushes and the final write leave them alone,
    #: so a write in flight never lands a stale count after a newer batch committed.
    commits_own_progress: bool = False
    #: The row as the final status write left it (None if it was not written).
    final_row: Row | None = None
    #: The kind wrote a note this attempt: the final write waits for notes to land,
    #: so a job's log is complete once its status says it ended.
    noted: bool = False

    @classmethod
    def from_row(cls, row: Row, kind: JobKind) -> JobHandle:
        return cls(
            id=row["id"], kind=kind, params=row["params"], timeout_s=row["timeout_s"],
            attempts=row["attempts"], checkpoint=row["checkpoint"], total=row["total"],
            processed=row["processed"], failed=row["failed"],
            commits_own_progress=kind.commits_progress,
        )

    def stop(self, reason: StopReason) -> None:
        """Cancel the job's scope; the first reason given is the one that counts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.scope.cancel()


class RunningJob:
    """The :class:`~nurseryd.kinds.base.JobContext` handed to a running kind."""

    def __init__(
        self,
        handle: JobHandle,
        *,
        owner: str,
        db: Database,
        settings: Settings,
        metrics: Metrics,
        progressed: Callable[[JobHandle], None],
        save_checkpoint: Callable[[JobHandle], Awaitable[None]],
        noted: Callable[[JobNote], None],
    ) -> None:
        self._handle = handle
        self._noted = noted
        self._notes_written = 0
        self._owner = owner
        self._progressed = progressed
        self._save_checkpoint = save_checkpoint
        self.job_id = handle.id
        self.kind = handle.kind.name
        self.params: Mapping[str, Any] = handle.params
        self.checkpoint = handle.checkpoint
        self.attempts = handle.attempts
        self.db = db
        self.settings = settings
        self.metrics = metrics

    def report(
        self, *, total: int | None = None, processed: int | None = None, failed: int | None = None
    ) -> None:
        if total is not None:
            self._handle.total = total
        if processed is not None:
            self._handle.processed = processed
        if failed is not None:
            self._handle.failed = failed
        self._progressed(self._handle)

    async def save_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoint = self._handle.checkpoint = checkpoint
        await self._save_checkpoint(self._handle)

    async def commit_progress(
        self, conn: Any, checkpoint: Any, *, processed: int, failed: int
    ) -> None:
        self._handle.commits_own_progress = True
        await jobsdb.commit_progress_in(conn, self.job_id, self._owner, self._handle.attempts,
                                        checkpoint, processed, failed)

    def set_result(self, result: Any) -> None:
        self._handle.result = result

    def note(self, message: str, *, level: str = "warning") -> None:
        if level not in NOTE_LEVELS:
            raise ValueError(f"level must be one of {', '.join(NOTE_LEVELS)}, not {level!r}")
        self._notes_written += 1
        if self._notes_written > MAX_NOTES_PER_ATTEMPT + 1:
            return
        if self._notes_written == MAX_NOTES_PER_ATTEMPT + 1:
            level, message = "warning", (f"more than {MAX_NOTES_PER_ATTEMPT} notes in this "
                                         "attempt: the rest are not kept")
        message = str(message).replace("\x00", "\ufffd")  # text columns hold no NUL
        if len(message) > MAX_NOTE_CHARS:
            message = message[:MAX_NOTE_CHARS - 1] + "…"
        self._handle.noted = True
        self._noted(JobNote(self.job_id, self.attempts, level, redact(message), now()))
