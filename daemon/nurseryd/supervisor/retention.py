"""``[retention]``: finished jobs (and their rejects) are deleted after a while.

Why: nothing was ever deleted, so every job, every stored reject with its raw
row values (customer data) and every params blob stayed forever, and the tables
grew with each caller's requests. Terminal jobs older than ``jobs`` are deleted
in bounded batches every ``interval``; queued and running jobs are never
touched, whatever their age. Fetched items no fetch has seen for ``items`` go
too (a source that dropped an item, or a source removed from the config).
``0`` keeps everything (the old behaviour) for either.

Example::

    [retention]
    jobs = "30d"        # terminal jobs (and their rejects) older than this go
    items = "90d"       # fetched items not seen by any fetch for this long go
    interval = "1h"     # how often to look
    batch = 1000        # rows per DELETE
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..config import ConfigError, ConfigSection, check_keys, parse_duration, parse_positive_int
from ..db.items import delete_unseen_before
from ..db.jobs import delete_finished_before

if TYPE_CHECKING:
    from ..db import Database
    from ..services import Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionConfig:
    #: Seconds a terminal job is kept after it finished; 0 keeps every job.
    jobs_s: float = 30 * 86400.0
    #: Seconds a fetched item is kept after a fetch last saw it; 0 keeps every item.
    items_s: float = 90 * 86400.0
    interval_s: float = 3600.0
    batch: int = 1000


def parse_retention(raw: Any, whole: Mapping[str, Any]) -> RetentionConfig:
    if raw is None:
        return RetentionConfig()
    if not isinstance(raw, dict):
        raise ConfigError("retention", "expected a [retention] table")
    check_keys("retention", raw, {"jobs", "items", "interval", "batch"})
    base = RetentionConfig()
    interval = parse_duration("retention.interval", raw.get("interval", base.interval_s))
    if interval < 1:
        raise ConfigError("retention.interval", "must be at least 1 second")
    return RetentionConfig(
        jobs_s=parse_duration("retention.jobs", raw.get("jobs", base.jobs_s)),
        items_s=parse_duration("retention.items", raw.get("items", base.items_s)),
        interval_s=interval,
        batch=parse_positive_int("retention.batch", raw.get("batch", base.batch)),
    )


RETENTION_SECTION: ConfigSection[RetentionConfig] = ConfigSection(
    "retention", parse_retention, RetentionConfig)


async def sweep_once(db: Database, config: RetentionConfig) -> int:
    """Delete the jobs past retention, batch after batch; returns how many."""
    return await _in_batches(delete_finished_before, db, config.jobs_s, config.batch)


async def sweep_items_once(db: Database, config: RetentionConfig) -> int:
    """Delete the fetched items past retention, batch after batch; returns how many."""
    return await _in_batches(delete_unseen_before, db, config.items_s, config.batch)


async def _in_batches(delete: Callable[[Database, float, int], Awaitable[int]], db: Database,
                      older_than_s: float, batch: int) -> int:
    if older_than_s <= 0:
        return 0
    deleted = 0
    while True:
        count = await delete(db, older_than_s, batch)
        deleted += count
        if count < batch:  # each DELETE is its own statement: reads go in between
            return deleted


async def sweep_periodically(services: Services) -> None:
    """Background task: a sweep at start and every ``interval``."""
    config = services.settings.section(RETENTION_SECTION)
    if config.jobs_s <= 0 and config.items_s <= 0:
        log.info("retention off ([retention] jobs = 0, items = 0): nothing is deleted")
        return
    while True:
        try:
            deleted = await sweep_once(services.db, config)
            if deleted:
                log.info("retention: deleted %d job(s) finished more than %g s ago, with "
                         "their rejects", deleted, config.jobs_s)
            items = await sweep_items_once(services.db, config)
            if items:
                log.info("retention: deleted %d fetched item(s) not seen for %g s", items,
                         config.items_s)
        except Exception as error:  # housekeeping: log, try again next interval
            log.warning("retention sweep failed (%s); next try in %g s", error,
                        config.interval_s)
        await trio.sleep(config.interval_s)
