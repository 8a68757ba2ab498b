"""Gauges of state, computed when ``/metrics`` is scraped.

A gauge that is state (how many jobs run now, how many connections are in use)
is read from where that state lives at the moment of the scrape, never kept up
to date by hand: a missed decrement cannot leave it wrong for ever. What needs
the database (the cluster-wide job counts, a feature's own state) is read by
:class:`~.hub.Observability` before the scrape, at most every few seconds, and
handed to :class:`StateCollector` as plain values.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from ..lifecycle import ACTIVE
from .jobs import Attempt

if TYPE_CHECKING:
    from ..db import Database


class KindView(Protocol):
    @property
    def name(self) -> str: ...


class HandleView(Protocol):
    """What is read of a job the supervisor holds."""

    @property
    def kind(self) -> KindView: ...
    @property
    def running(self) -> bool: ...
    @property
    def processed(self) -> int: ...
    @property
    def failed(self) -> int: ...


class SupervisorView(Protocol):
    @property
    def registry(self) -> Mapping[int, HandleView]: ...
    @property
    def draining(self) -> bool: ...


class StateCollector:
    """A custom collector: every state gauge, from the supervisor and pools as they are."""

    def __init__(
        self,
        supervisor: SupervisorView,
        attempts: Mapping[int, Attempt],
        pools: Mapping[str, Database],
        kinds: Sequence[str],
        lag: Callable[[], float],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._supervisor = supervisor
        self._attempts = attempts
        self._pools = pools
        self._kinds = tuple(kinds)
        self._lag = lag
        self._clock = clock
        #: ``(kind, status) -> jobs`` in the whole table (every daemon), or ``None``
        #: when the last read failed (the family is then left out, not shown stale).
        self.cluster: Mapping[tuple[str, str], int] | None = None
        #: Families the features computed for the last refresh.
        self.extra: Sequence[Metric] = ()

    def collect(self) -> Iterator[Metric]:
        registry = self._supervisor.registry
        handles = list(registry.values())
        yield from self._jobs(handles)
        yield self._rows_per_second(registry)
        yield from self._pool_gauges()
        yield GaugeMetricFamily("nurseryd_draining",
                                "1 while the daemon drains (SIGTERM received), else 0.",
                                value=1.0 if self._supervisor.draining else 0.0)
        yield GaugeMetricFamily(
            "nurseryd_event_loop_lag_seconds",
            "The longest delay of a timer wake-up in the last 10 s, measured in the event "
            "loop (a blocked loop shows here).", value=self._lag())
        if self.cluster is not None:
            yield self._cluster(self.cluster)
        yield from self.extra

    def _jobs(self, handles: Iterable[HandleView]) -> Iterator[Metric]:
        running: Counter[str] = Counter()
        queued: Counter[str] = Counter()
        for handle in handles:
            (running if handle.running else queued)[handle.kind.name] += 1
        kinds = sorted({*self._kinds, *running, *queued})
        running_family = GaugeMetricFamily(
            "nurseryd_jobs_running", "Jobs running in this daemon now.", labels=["kind"])
        queued_family = GaugeMetricFamily(
            "nurseryd_jobs_queued", "Jobs this daemon holds that wait for a worker slot.",
            labels=["kind"])
        for kind in kinds:
            running_family.add_metric([kind], running[kind])
            queued_family.add_metric([kind], queued[kind])
        yield running_family
        yield queued_family

    def _rows_per_second(self, registry: Mapping[int, HandleView]) -> Metric:
        """Rows per second of each running migration, over its attempt so far, summed."""
        family = GaugeMetricFamily(
            "nurseryd_migration_rows_per_second",
            "Rows per second of the migrations running in this daemon (processed and "
            "rejected, since each one's attempt started), summed by source type.",
            labels=["source_type"])
        rates: dict[str, float] = {}
        now = self._clock()
        for job_id, attempt in list(self._attempts.items()):
            handle = registry.get(job_id)
            if attempt.source_type is None or handle is None or not handle.running:
                continue
            elapsed = now - attempt.clock
            done = handle.processed + handle.failed - attempt.done_before
            rate = max(0, done) / elapsed if elapsed > 0 else 0.0
            rates[attempt.source_type] = rates.get(attempt.source_type, 0.0) + rate
        for source_type, rate in sorted(rates.items()):
            family.add_metric([source_type], rate)
        return family

    def _pool_gauges(self) -> Iterator[Metric]:
        in_use = GaugeMetricFamily(
            "nurseryd_db_pool_connections_in_use",
            "Connections of the pool lent out now (control: API and job records; work: "
            "what jobs run).", labels=["pool"])
        size = GaugeMetricFamily("nurseryd_db_pool_connections",
                                 "Connections the pool holds open now.", labels=["pool"])
        maximum = GaugeMetricFamily("nurseryd_db_pool_max_connections",
                                    "The most connections the pool may open.", labels=["pool"])
        for name, database in sorted(self._pools.items()):
            pool = database.pool
            open_now = pool.get_size()
            in_use.add_metric([name], open_now - pool.get_idle_size())
            size.add_metric([name], open_now)
            maximum.add_metric([name], pool.get_max_size())
        yield from (in_use, size, maximum)

    def _cluster(self, counts: Mapping[tuple[str, str], int]) -> Metric:
        family = GaugeMetricFamily(
            "nurseryd_cluster_jobs",
            "Unfinished jobs in the database, across every daemon that shares it (read at "
            "scrape, cached a few seconds; every daemon reports the same: use max).",
            labels=["kind", "status"])
        kinds = sorted({*self._kinds, *(kind for kind, _ in counts)})
        for kind in kinds:
            for status in sorted(ACTIVE):
                family.add_metric([kind, status.value], counts.get((kind, status.value), 0))
        return family
