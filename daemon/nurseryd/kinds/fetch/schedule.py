"""The fetch schedule: a pure "when is the next tick" plus a thin Trio loop.

Rules:
- a tick tries to start a fetch; if one is already queued or running (the
  database's partial unique index refuses the insert) the tick is *skipped*, not
  queued;
- ticks never pile up: after a long stall (or a long submit) the ticks that were
  missed collapse into the next one on the grid;
- across restarts: without ``run_at_start`` the first tick comes one interval
  after the latest fetch (whatever started it), or at once if that is overdue, so
  a daemon restarted more often than ``interval`` still fetches, once.

The decisions are the pure functions :func:`first_due` and :func:`next_due`;
:func:`schedule_loop` only sleeps and calls ``trigger``, so it is tested with
``trio.testing.MockClock`` and a fake trigger.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("nurseryd.fetch.schedule")


def first_due(now: float, interval: float, *, run_at_start: bool,
              since_last: float | None) -> float:
    """Clock time of the first tick. ``since_last``: seconds since the latest fetch
    job was created, or ``None`` if there never was one."""
    if run_at_start:
        return now
    if since_last is None:
        return now + interval
    return now + min(interval, max(0.0, interval - since_last))


def next_due(due: float, now: float, interval: float) -> float:
    """The first grid point (``due + k·interval``) strictly after ``now``."""
    if now < due:
        return due + interval
    missed = math.floor((now - due) / interval) + 1
    return due + missed * interval


async def schedule_loop(
    *,
    interval: float,
    run_at_start: bool,
    since_last: float | None,
    trigger: Callable[[], Awaitable[object]],
) -> None:
    """Call ``trigger`` on schedule until cancelled. ``trigger`` must not raise
    for ordinary failures (it logs them); the schedule outlives any one tick."""
    due = first_due(trio.current_time(), interval, run_at_start=run_at_start,
                    since_last=since_last)
    while True:
        await trio.sleep_until(due)
        await trigger()
        due = next_due(due, trio.current_time(), interval)
