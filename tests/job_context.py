"""A JobContext for tests that call a kind (or the migration pipeline) directly.

No supervisor: the database is real, and what the kind reports is recorded in
memory, so a test can assert on the counters and result and *await* them
(``wait_until`` wakes on every report; no polling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from nurseryd.config import Settings, load_settings
from nurseryd.db import Database
from nurseryd.observe.metrics import Metrics


def _fresh_counters() -> dict[str, int | None]:
    return {"total": None, "processed": 0, "failed": 0}


@dataclass
class RecordingContext:
    db: Database
    job_id: int = 1
    settings: Settings = field(default_factory=lambda: load_settings(None, environ={}))
    checkpoint: Any = None
    kind: str = "test"
    params: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1
    counters: dict[str, int | None] = field(default_factory=_fresh_counters)
    result: Any = None
    #: What the kind noted for its log: (level, message).
    notes: list[tuple[str, str]] = field(default_factory=list)
    #: Called with the counters after every report (a test may interrupt from it).
    on_report: Callable[[dict[str, int | None]], None] | None = None
    #: Write save_checkpoint() to the job's row, as the supervisor would.
    persist_checkpoint: bool = False
    #: What the kind counted (a registry of its own, as each daemon has).
    metrics: Metrics = field(default_factory=Metrics)
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds after a report or result."""
        while not predicate():
            await self._changed.wait()

    async def processed_at_least(self, threshold: int) -> None:
        await self.wait_until(lambda: (self.counters["processed"] or 0) >= threshold)

    def report(self, *, total: int | None = None, processed: int | None = None,
               failed: int | None = None) -> None:
        for name, value in (("total", total), ("processed", processed), ("failed", failed)):
            if value is not None:
                self.counters[name] = value
        if self.on_report is not None:
            self.on_report(self.counters)
        self._notify()

    async def save_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint
        if self.persist_checkpoint:
            await self.db.execute("UPDATE jobs SET checkpoint = $2 WHERE id = $1",
                                  self.job_id, checkpoint)

    async def commit_progress(self, conn: Any, checkpoint: Any, *, processed: int,
                              failed: int) -> None:
        """As the supervisor's does, minus the claim guard (no supervisor started
        the job): the row's checkpoint and counters, in the kind's transaction."""
        await conn.execute("UPDATE jobs SET checkpoint = $2, processed = $3, failed = $4"
                           " WHERE id = $1", self.job_id, checkpoint, processed, failed)
        self.checkpoint = checkpoint

    def set_result(self, result: Any) -> None:
        self.result = result
        self._notify()

    def note(self, message: str, *, level: str = "warning") -> None:
        self.notes.append((level, message))
