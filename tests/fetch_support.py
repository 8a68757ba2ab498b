"""Running the fetch kind without the supervisor: a JobContext over the real database.

Not a mock of the supervisor: the kind's contract *is* the JobContext protocol,
and this is a plain implementation of it that remembers what the kind reported,
so the kind's own behaviour (outcomes, counters, cancel) is tested at unit level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from nurseryd.config import Settings
from nurseryd.db import Database
from nurseryd.kinds.fetch.config import parse_fetch_section


@dataclass
class LocalJobContext:
    db: Database
    settings: Settings
    job_id: int = 1
    kind: str = "fetch"
    params: dict[str, Any] = field(default_factory=lambda: {"trigger": "api"})
    checkpoint: Any = None
    attempts: int = 1
    counters: dict[str, int | None] = field(default_factory=dict)
    result: Any = None
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no polling) until ``predicate()`` holds after a report or result."""
        while not predicate():
            await self._changed.wait()

    def report(self, *, total: int | None = None, processed: int | None = None,
               failed: int | None = None) -> None:
        for name, value in (("total", total), ("processed", processed), ("failed", failed)):
            if value is not None:
                self.counters[name] = value
        self._notify()

    async def save_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint

    def note_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint

    def set_result(self, result: Any) -> None:
        self.result = result
        self._notify()

    def source(self, name: str) -> dict[str, Any]:
        return self.result["sources"][name]


def fetch_settings(sources: list[dict[str, Any]], **fetch: Any) -> Settings:
    """Settings whose [fetch] section is parsed by the real validator."""
    raw = {"retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, **fetch, "sources": sources}
    return Settings(sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})


def context(db: Database, sources: list[dict[str, Any]], **fetch: Any) -> LocalJobContext:
    return LocalJobContext(db=db, settings=fetch_settings(sources, **fetch))
