"""A snapshot of the supervisor, as trio's ``MemoryChannelStatistics`` is of a channel."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SupervisorStatistics:
    #: Jobs running in this process now.
    running: int
    #: Accepted jobs waiting to start in this process (bounded by ``queue_size``).
    queued: int
    #: How many jobs this process holds in memory (running, waiting, or finishing).
    held: int
    draining: bool
