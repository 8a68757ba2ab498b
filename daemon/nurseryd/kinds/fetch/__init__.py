"""The fetch aggregator: configured HTTP sources (JSON, RSS, Atom) into the items table.

- :data:`FETCH_KIND` is the job kind (not startable through ``POST /jobs/fetch``:
  ``POST /fetch`` owns the one-at-a-time rule and its 409).
- :func:`run_fetch_schedule` is the background task that starts fetches every
  ``fetch.interval``.
- :data:`FETCH_SECTION` is the ``[fetch]`` config section; ``features.py`` lists
  all three in the fetch feature.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...db import jobs as jobsdb
from ...errors import JobConflict
from ..base import JobKind
from .config import FETCH_SECTION, FetchConfig, parse_fetch_section
from .job import parse_fetch_params, run_fetch
from .schedule import schedule_loop

if TYPE_CHECKING:
    from ...services import Services

log = logging.getLogger("nurseryd.fetch.schedule")

FETCH_KIND = JobKind(
    name="fetch",
    run=run_fetch,
    parse_params=parse_fetch_params,
    generic_endpoint=False,
    description="Fetch every configured source (JSON, RSS, Atom) and upsert its items; "
                "one at a time, started by POST /fetch or the schedule.",
)


def fetch_config(services: Services) -> FetchConfig:
    return services.settings.section(FETCH_SECTION)


async def submit_fetch(services: Services, trigger: str, *,
                       submitted_by: str | None = None) -> dict[str, Any]:
    """Start a fetch job; raises ``JobConflict`` if one is already queued or running."""
    config = fetch_config(services)
    return await services.supervisor.submit("fetch", {"trigger": trigger},
                                            timeout_s=config.timeout_s,
                                            submitted_by=submitted_by)


async def seconds_since_last_fetch(services: Services) -> float | None:
    return await jobsdb.seconds_since_latest(services.db, "fetch")


async def scheduled_tick(services: Services) -> dict[str, Any] | None:
    """One tick: start a fetch, or skip it (``None``) if one is queued or running.

    Skipped, not queued: the partial unique index refuses the row, so nothing is
    left waiting to run after the active fetch. Other errors are logged; the next
    tick tries again.
    """
    try:
        job = await submit_fetch(services, "schedule")
    except JobConflict:
        log.info("scheduled fetch skipped: a fetch is already queued or running")
        return None
    except Exception:
        log.exception("scheduled fetch could not be started; the next tick will try again")
        return None
    log.info("scheduled fetch started as job %s", job["id"])
    return job


async def run_fetch_schedule(services: Services) -> None:
    """Start a fetch every ``fetch.interval`` until cancelled (at shutdown)."""
    config = fetch_config(services)
    if not config.interval_s or not config.sources:
        log.info("fetch schedule off (fetch.interval is 0 or no sources are configured)")
        return

    try:
        since_last = await seconds_since_last_fetch(services)
    except Exception:
        log.exception("could not read the latest fetch time; scheduling from now")
        since_last = None
    log.info("fetch schedule on: every %g s", config.interval_s)
    await schedule_loop(interval=config.interval_s, run_at_start=config.run_at_start,
                        since_last=since_last, trigger=lambda: scheduled_tick(services))


__all__ = ["FETCH_KIND", "FETCH_SECTION", "parse_fetch_section", "run_fetch_schedule",
           "scheduled_tick", "submit_fetch"]
