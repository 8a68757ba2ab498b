"""Is the fetch fresh? Two gauges per configured source, read when ``/metrics`` is scraped.

- ``nurseryd_fetch_last_success_timestamp_seconds{source}``: when the source last
  fetched fine (``ok`` or ``unchanged``), from ``fetch_sources``: true across
  restarts and across daemons sharing the database.
- ``nurseryd_fetch_overdue_seconds{source}`` (only while the schedule is on):
  how far past ``last success + interval + fetch timeout`` it is now, 0 while
  fresh. A source that never succeeded counts from the daemon's start.

The fetch feature lists :func:`fetch_freshness` in ``Feature.metrics``; the
metrics endpoint calls it at most every few seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

from ...db.fetch_sources import source_states
from .config import FETCH_SECTION

if TYPE_CHECKING:
    from ...services import Services


#: About when the daemon started: ``features`` imports this module at start-up.
_STARTED_AT = time.time()


def freshness_families(
    names: list[str], last_success: dict[str, float], *, interval_s: float, timeout_s: float,
    now: float, since: float,
) -> list[Metric]:
    """The two families from plain values (``last_success``: name -> Unix time)."""
    last = GaugeMetricFamily(
        "nurseryd_fetch_last_success_timestamp_seconds",
        "When the source last fetched fine (ok or unchanged), Unix time.", labels=["source"])
    overdue = GaugeMetricFamily(
        "nurseryd_fetch_overdue_seconds",
        "Seconds past last success + fetch.interval + fetch.timeout_s (0: fresh); from the "
        "daemon's start for a source that never succeeded.", labels=["source"])
    for name in names:
        success = last_success.get(name)
        if success is not None:
            last.add_metric([name], success)
        if interval_s:
            reference = success if success is not None else since
            overdue.add_metric([name], max(0.0, now - reference - interval_s - timeout_s))
    return [last, overdue] if interval_s else [last]


async def fetch_freshness(services: Services) -> list[Metric]:
    config = services.settings.section(FETCH_SECTION)
    if not config.sources:
        return []
    states = await source_states(services.db)
    last_success = {name: state["last_success_at"].timestamp()
                    for name, state in states.items() if state["last_success_at"] is not None}
    return freshness_families([source.name for source in config.sources], last_success,
                              interval_s=config.interval_s, timeout_s=config.timeout_s,
                              now=time.time(), since=_STARTED_AT)
