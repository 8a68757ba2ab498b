"""The jobs this process holds, counted by kind: what "a free slot" means.

A daemon has room for a job of a kind while the jobs of that kind it holds (running,
waiting for its kind's limiter, in a retry's back-off) plus those it is recording
right now number fewer than the kind's ``concurrency``. Both the fast path of a
submission (hand it to our own dispatcher) and a claim from the table (take
another daemon's overflow) ask :meth:`HeldJobs.free`, so a daemon never takes more
than it can start at once, and what it cannot start waits in the table where any
daemon may take it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from .handle import JobHandle


class HeldJobs(dict[int, JobHandle]):
    """``job id -> handle`` (the registry), with counts by kind kept in step."""

    def __init__(self, limit: Callable[[str], int],
                 on_freed: Callable[[str], None] = lambda kind: None) -> None:
        super().__init__()
        self._limit = limit
        self.on_freed = on_freed
        self._by_kind: Counter[str] = Counter()
        self._reserved: Counter[str] = Counter()

    def __setitem__(self, job_id: int, handle: JobHandle) -> None:
        old = super().get(job_id)
        if old is not None:
            self._by_kind[old.kind.name] -= 1
        super().__setitem__(job_id, handle)
        self._by_kind[handle.kind.name] += 1

    def __delitem__(self, job_id: int) -> None:
        handle = super().pop(job_id)
        self._removed(handle)

    def pop(self, job_id: int, *default: Any) -> Any:
        if job_id not in self:
            if default:
                return default[0]
            raise KeyError(job_id)
        handle = super().pop(job_id)
        self._removed(handle)
        return handle

    def _removed(self, handle: JobHandle) -> None:
        self._by_kind[handle.kind.name] -= 1
        self.on_freed(handle.kind.name)

    def of_kind(self, kind: str) -> int:
        return self._by_kind[kind]

    def free(self, kind: str) -> int:
        """Slots of ``kind`` this daemon could fill now (may be negative: a daemon
        not sharing its queue holds more than it runs)."""
        return self._limit(kind) - self._by_kind[kind] - self._reserved[kind]

    def reserve(self, kind: str) -> None:
        """A slot for a job being recorded (until it is held, or given up)."""
        self._reserved[kind] += 1

    def unreserve(self, kind: str) -> None:
        self._reserved[kind] -= 1
