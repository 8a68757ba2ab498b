"""Claiming: taking jobs nobody holds from the table, as many as there are free slots.

A job is *claimable* when it is queued with no owner: its accepting daemon had no
free slot for its kind (``cluster.shared_queue``), its kind has a cluster-wide
limit (only a claim may give it an owner), or its owner died and was released.
Any daemon with a free slot claims it; the accepting one is only the first to try.

The claimer asks the table only when it may find something: a kind is looked at
again after a notification says a job of it became claimable (or our own
submission recorded one), when a slot of a kind that still had claimable work
frees, and on a poll (every ``cluster.claim_poll``; five times that while
notifications arrive, as a safety net). A kind whose claim came back short is
not asked again until one of those happens, so a daemon whose jobs never
overflow (one daemon, the fast path) never runs a claim at all.

A kind with a cluster-wide limit (``[kinds.NAME] cluster_concurrency``) that came
back short because the limit was reached waits for a *slot freed* notification: an
owned, unfinished job of that kind ended or was released somewhere in the cluster.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping

import trio

from ..errors import QueueFull
from ..kinds.base import JobKind, KindRegistry
from ..store.base import JobStore, Row
from .handle import JobHandle
from .held import HeldJobs
from .intake import Intake

log = logging.getLogger("nurseryd.supervisor")

#: While notifications arrive, the poll is only a safety net: this many times slower.
LISTENING_POLL_FACTOR = 5.0
#: The claimable backlog is counted at most this often (see :class:`Backlog`).
BACKLOG_RECOUNT_S = 0.5
#: Jobs of one kind taken by one claim at most (a kind that got them all is asked
#: again at once).
CLAIM_PAGE = 500
#: After a wake-up, a claim waits this long for more (slots free one job at a time
#: under load: one claim for many of them, not one statement per job; measured).
CLAIM_GATHER_S = 0.005


class Claimer:
    def __init__(
        self,
        *,
        store: JobStore,
        owner: str,
        kinds: KindRegistry,
        held: HeldJobs,
        intake: Intake,
        register: Callable[[Row, JobKind], JobHandle],
        lock: trio.Lock,
        may_claim: Callable[[], bool],
        cluster_limits: Mapping[str, int],
        poll_s: float,
    ) -> None:
        self._store = store
        self._owner = owner
        self._kinds = kinds
        self._names = frozenset(kinds.names())
        self._held = held
        self._intake = intake
        self._register = register
        self._lock = lock
        self._may_claim = may_claim
        self._limits = dict(cluster_limits)
        self.poll_s = poll_s
        #: Kinds the table may have claimable jobs of (all of them at start).
        self._maybe: set[str] = set(self._names)
        #: Kinds said to have claimable jobs since the current claim began: a claim
        #: that came back short forgets a kind only if nothing renewed it meanwhile.
        self._renewed: set[str] = set()
        #: Limited kinds whose last claim stopped at the cluster-wide limit.
        self._blocked: set[str] = set()
        self._wake = trio.Event()
        #: Whether cluster notifications arrive (set by the listener task).
        self.listening = False
        #: Jobs claimed so far (for the logs and tests).
        self.claimed = 0

    # -- what wakes it --------------------------------------------------------------------

    def claimable(self, kind: str) -> None:
        """A job of ``kind`` became claimable (a notification, or our own submission)."""
        if kind in self._names:
            self._maybe.add(kind)
            self._renewed.add(kind)
            self._wake.set()

    def look_again(self) -> None:
        """Look at every kind (after a release, or once notifications are back)."""
        self._maybe |= self._names
        self._renewed |= self._names
        self._wake.set()

    def freed(self, kind: str) -> None:
        """One of our slots of ``kind`` freed: worth a claim if the table had more."""
        if kind in self._maybe:
            self._wake.set()

    def slot_freed(self, kind: str) -> None:
        """A cluster-wide slot of ``kind`` may be free (a job of it ended anywhere)."""
        if kind in self._blocked:
            self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            interval = self.poll_s * (LISTENING_POLL_FACTOR if self.listening else 1.0)
            with trio.move_on_after(interval) as timer:
                await self._wake.wait()
            if timer.cancelled_caught:
                self._maybe |= self._names
            else:
                await trio.sleep(CLAIM_GATHER_S)
            self._wake = trio.Event()
            if self._may_claim():
                await self.claim_round()

    def _wants(self) -> dict[str, int]:
        room = self._intake.queue_size - self._intake.waiting
        wants: dict[str, int] = {}
        for name in sorted(self._maybe):
            count = min(self._held.free(name), room, CLAIM_PAGE)
            if count > 0:
                wants[name] = count
                room -= count
        return wants

    async def claim_round(self) -> int:
        """One claim for every kind that may have work and has free slots here."""
        self._renewed.clear()
        wants = self._wants()
        if not wants:
            return 0
        got: Counter[str] = Counter()
        async with self._lock:  # a cancel of a job not held waits for us (core.cancel)
            try:
                rows = await self._store.claim(self._owner, wants, self._limits)
            except Exception as error:
                log.warning("claiming jobs from the table failed (%s); next try on the "
                            "next wake-up or poll", error)
                return 0
            for row in rows:
                got[row["kind"]] += 1
                kind = self._kinds.get(row["kind"])
                if kind is None or row["id"] in self._held:
                    # An old handle of ours still holds it: that handle starts it if
                    # its attempt is still the row's (else its start is refused and the
                    # backlog scan loads the row afresh).
                    continue
                handle = self._register(row, kind)
                self._intake.take_slot()
                if not self._intake.hand_off(handle):  # draining: leave() releases it
                    self._intake.release()
                    del self._held[handle.id]
        self.claimed += len(rows)
        for name, wanted in wants.items():
            if got[name] >= wanted:
                self._blocked.discard(name)
                self._wake.set()  # a full page: there may be more, and slots for it
            elif name in self._limits:
                self._blocked.add(name)  # the limit, or nothing left: a freed slot tells
            elif name not in self._renewed:  # a job that became claimable during the
                self._maybe.discard(name)    # claim may not be in its snapshot
        if rows:
            log.debug("claimed %d job(s): %s", len(rows), dict(got))
        return len(rows)


class Backlog:
    """The bound on claimable jobs (``cluster.backlog``), counted in the table at
    most every :data:`BACKLOG_RECOUNT_S` and by this daemon's own additions in
    between: past it, a submission that would wait in the table gets 503. The
    bound is cluster-wide and approximate by what the other daemons add within
    one recount."""

    def __init__(self, store: JobStore, limit: int) -> None:
        self._store = store
        self.limit = limit
        self._count = 0
        self._counted_at = -float("inf")
        self._lock = trio.Lock()

    async def check(self) -> None:
        """Raise :class:`QueueFull` if the table holds ``limit`` claimable jobs."""
        if trio.current_time() - self._counted_at >= BACKLOG_RECOUNT_S:
            async with self._lock:  # one count for every submitter waiting on it
                if trio.current_time() - self._counted_at >= BACKLOG_RECOUNT_S:
                    self._count = await self._store.count_claimable(self.limit)
                    self._counted_at = trio.current_time()
        if self._count >= self.limit:
            raise QueueFull(self.limit)

    def added(self) -> None:
        self._count += 1
