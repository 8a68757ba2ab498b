"""One daemon's observability, wired once by ``root``: :class:`Observability`.

It owns the :class:`~.metrics.Metrics`, subscribes the :class:`~.jobs.JobObserver`
to the job store's change feed (before the supervisor runs, so adoptions at start
are seen too), registers the scrape-time :class:`~.state.StateCollector`, and
renders ``/metrics``. Reads that need the database (the job counts across every
daemon, and what features add) happen at a scrape, at most every
:data:`REFRESH_S`, bounded by :data:`READ_TIMEOUT_S`: a scrape while PostgreSQL
is away answers at once, without those families.

:class:`LagMonitor` is the event-loop lag task; ``root`` runs it in the aux
nursery of the task tree.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import trio
from prometheus_client import generate_latest
from prometheus_client.core import Metric

from ..db.jobs import counts_by_kind_and_status
from ..lifecycle import ACTIVE
from ..store.base import ChangeFeed
from .jobs import JobObserver
from .metrics import Metrics
from .state import StateCollector, SupervisorView

if TYPE_CHECKING:
    from ..db import Database
    from ..services import Services

log = logging.getLogger(__name__)

#: Database reads for a scrape are reused for this long (several scrapers, one query).
REFRESH_S = 5.0
#: A scrape waits at most this long for the database.
READ_TIMEOUT_S = 2.0

#: A feature's scrape-time metrics: families of state only it knows (``Feature.metrics``).
MetricsHook = Callable[["Services"], Awaitable[Iterable[Metric]]]


class LagMonitor:
    """How late a timer fires, measured from inside the event loop.

    Every :attr:`interval` the task sleeps until a deadline and notes how much
    later it woke: a statement that blocks the loop, a CPU-bound parse in the
    wrong place, a stalled scheduler. The gauge is the worst delay of the last
    :attr:`window` seconds, so a spike between two scrapes is not lost.
    """

    def __init__(self, interval: float = 0.25, window: float = 10.0) -> None:
        self.interval = interval
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    async def run(self) -> None:
        while True:
            due = trio.current_time() + self.interval
            await trio.sleep_until(due)
            self.record(max(0.0, trio.current_time() - due))

    def record(self, lag: float) -> None:
        now = time.monotonic()
        self._samples.append((now, lag))
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()

    def worst(self) -> float:
        horizon = time.monotonic() - self.window
        return max((lag for at, lag in self._samples if at >= horizon), default=0.0)


class Observability:
    """Metrics, the job observer and the state gauges of one daemon."""

    def __init__(
        self,
        metrics: Metrics,
        supervisor: SupervisorView,
        feed: ChangeFeed,
        *,
        db: Database,
        pools: Mapping[str, Database],
        hooks: Sequence[MetricsHook] = (),
    ) -> None:
        self.metrics = metrics
        self.observer = JobObserver(metrics)
        self.observer.subscribe(feed)
        self.lag = LagMonitor()
        self.state = StateCollector(supervisor, self.observer.running, pools, metrics.kinds,
                                    self.lag.worst)
        metrics.registry.register(self.state)
        self._db = db
        self._hooks = tuple(hooks)
        self._refreshed_at = float("-inf")
        self._refreshing = trio.Lock()

    async def render(self, services: Services) -> bytes:
        """The Prometheus text exposition, after a refresh of what needs the database."""
        await self.refresh(services)
        return generate_latest(self.metrics.registry)

    async def refresh(self, services: Services) -> None:
        async with self._refreshing:  # concurrent scrapes share one refresh
            if time.monotonic() - self._refreshed_at < REFRESH_S:
                return
            cluster = None
            with trio.move_on_after(READ_TIMEOUT_S) as bounded:
                try:
                    cluster = await counts_by_kind_and_status(self._db, ACTIVE)
                except Exception as error:  # a scrape must answer with what it has
                    log.warning("metrics: job counts unavailable (%s)", error)
            if bounded.cancelled_caught:
                log.warning("metrics: job counts not read within %g s", READ_TIMEOUT_S)
            extra: list[Metric] = []
            for hook in self._hooks:
                name = getattr(hook, "__name__", repr(hook))
                with trio.move_on_after(READ_TIMEOUT_S) as bounded:
                    try:
                        extra.extend(await hook(services))
                    except Exception as error:
                        log.warning("metrics: %s failed (%s)", name, error)
                if bounded.cancelled_caught:
                    log.warning("metrics: %s did not answer within %g s", name, READ_TIMEOUT_S)
            self.state.cluster = cluster
            self.state.extra = extra
            self._refreshed_at = time.monotonic()
