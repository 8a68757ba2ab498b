"""The drain: what SIGTERM sets off.

1. Intake stops (the handlers answer 503) and jobs that have not started are
   stopped where they wait: they stay ``queued`` and run after the restart.
2. Running jobs get ``shutdown_grace`` seconds to finish by themselves.
3. Whatever still runs then is cancelled with :attr:`StopReason.SHUTDOWN`, which
   the lifecycle turns into ``interrupt``: back to ``queued``, checkpoint kept.

A second request (a second SIGTERM, or Ctrl-C twice) ends the grace at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from ..lifecycle import StopReason
from .handle import JobHandle

log = logging.getLogger("nurseryd.supervisor")


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested = trio.Event()
        self.forced = False
        self._grace_scope: trio.CancelScope | None = None

    @property
    def draining(self) -> bool:
        return self.requested.is_set()

    def request(self) -> None:
        """Begin the drain; a second call ends the grace period at once."""
        if self.requested.is_set():
            self.forced = True
            if self._grace_scope is not None:
                self._grace_scope.cancel()
            return
        self.requested.set()

    async def run(
        self,
        held: Callable[[], Iterable[JobHandle]],
        running: Callable[[], int],
        job_ended: Callable[[], Awaitable[None]],
    ) -> None:
        """Stop waiting jobs, give running ones the grace, then stop the rest."""
        waiting = 0
        for handle in list(held()):
            if not handle.running:
                handle.stop(StopReason.SHUTDOWN)  # stays queued; runs after restart
                waiting += 1
        started = trio.current_time()
        log.info("drain: %d running job(s) get up to %g s to finish; %d waiting job(s) stay "
                 "queued", running(), 0 if self.forced else self.grace_s, waiting,
                 extra={"event": "drain", "running": running(), "waiting": waiting})
        with trio.move_on_after(self.grace_s) as self._grace_scope:
            if self.forced:
                self._grace_scope.cancel()
            while running():
                await job_ended()
        left = running()
        if left:
            log.warning("drain: grace over after %.1f s; stopping %d job(s), they resume "
                        "after the restart", trio.current_time() - started, left,
                        extra={"event": "drain", "running": left})
        else:
            log.info("drain: no job running after %.1f s", trio.current_time() - started,
                     extra={"event": "drain", "running": 0})
        for handle in list(held()):
            handle.stop(StopReason.SHUTDOWN)
