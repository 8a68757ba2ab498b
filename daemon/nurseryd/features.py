"""The one place that lists what the daemon can do: :data:`FEATURES`.

A feature is a plain record of its job kinds, HTTP blueprints, config sections,
start-up checks and background tasks. Nothing registers itself by being
imported: config loading (``load_settings(..., features=FEATURES)``), the app
factory (``create_app(services, FEATURES)``) and the task tree
(``root.serve(settings, features=FEATURES)``) are each handed the list. Adding a
feature is adding one record here.

This module sits above ``http/`` and ``kinds/`` (it imports both) and below
``root``; neither ``http/`` nor ``kinds/`` imports it (see tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from quart import Blueprint

from .config import ConfigSection, Settings
from .db.cluster import lead
from .http.actions import blueprint as actions_blueprint
from .http.events import blueprint as events_blueprint
from .http.events import prepare_event_hub, run_event_hub
from .http.fetch import blueprint as fetch_blueprint
from .http.migration import blueprint as migration_blueprint
from .http.migration_sources import blueprint as migration_sources_blueprint
from .kinds.base import JobKind, KindRegistry
from .kinds.fetch import FETCH_KIND, FETCH_SECTION, run_fetch_schedule
from .kinds.fetch.freshness import fetch_freshness
from .kinds.migrate import MIGRATION_KIND, prepare_targets, sweep_uploads_periodically
from .kinds.migrate.source_config import GOOGLE_SHEETS_SECTION, SOURCES_SECTION
from .kinds.migrate.targets import MIGRATION_SECTION, TARGETS_SECTION
from .kinds.sleep import NOOP_KIND, SLEEP_KIND, SQL_SLEEP_KIND
from .observe.events import EVENTS_SECTION
from .observe.hub import MetricsHook
from .services import Services
from .supervisor.retention import RETENTION_SECTION, sweep_periodically

#: A start-up check or background task: it gets the shared objects.
Hook = Callable[[Services], Awaitable[None]]


@dataclass(frozen=True)
class Feature:
    """What one feature adds to the daemon."""

    name: str
    kinds: tuple[JobKind, ...] = ()
    #: Registered after the core ``/jobs`` routes, in this order.
    blueprints: tuple[Blueprint, ...] = ()
    #: Top-level TOML tables this feature owns; each is parsed at start, present or not.
    config_sections: tuple[ConfigSection[Any], ...] = ()
    #: Run once after schema migrations, before HTTP listens; may raise StartupError.
    startup: tuple[Hook, ...] = ()
    #: Long-running tasks (schedulers), started once HTTP listens; shutdown cancels them.
    background: tuple[Hook, ...] = ()
    #: Called when ``/metrics`` is scraped (at most every few seconds): metric families
    #: of state only this feature knows, such as how fresh the fetch is.
    metrics: tuple[MetricsHook, ...] = ()
    #: Whether the daemon serves this feature with these settings (its config
    #: sections are parsed either way, so a bad value is caught while it is off).
    enabled: Callable[[Settings], bool] = lambda settings: True


async def run_fetch_schedule_once_in_cluster(services: Services) -> None:
    """The fetch schedule, run by one daemon of those sharing the database: the
    leader of ``fetch schedule`` (an advisory lock; see ``db/cluster.py``). A
    daemon that takes the lead from one that died continues the grid from the
    latest fetch (``run_at_start`` is for a cluster's start, not a takeover)."""
    config = services.settings.section(FETCH_SECTION)
    if not config.interval_s or not config.sources:
        await run_fetch_schedule(services)  # it says that it is off, and returns
        return

    async def duty(fresh: bool) -> None:
        if fresh or not config.run_at_start:
            await run_fetch_schedule(services)
            return
        settings = services.settings
        continuing = dataclasses.replace(settings, sections={
            **settings.sections,
            FETCH_SECTION.name: dataclasses.replace(config, run_at_start=False)})
        await run_fetch_schedule(dataclasses.replace(services, settings=continuing))

    await lead(services.db, "fetch schedule", services.supervisor.owner, duty)


DIAGNOSTICS = Feature(
    name="diagnostics",
    kinds=(SLEEP_KIND, SQL_SLEEP_KIND, NOOP_KIND),
    enabled=lambda settings: settings.diagnostics,
)

MIGRATION = Feature(
    name="migration",
    kinds=(MIGRATION_KIND,),
    blueprints=(migration_sources_blueprint, migration_blueprint),
    config_sections=(TARGETS_SECTION, MIGRATION_SECTION, SOURCES_SECTION,
                     GOOGLE_SHEETS_SECTION),
    startup=(prepare_targets,),
    background=(sweep_uploads_periodically,),
)

FETCH = Feature(
    name="fetch",
    kinds=(FETCH_KIND,),
    blueprints=(fetch_blueprint,),
    config_sections=(FETCH_SECTION,),
    background=(run_fetch_schedule_once_in_cluster,),
    metrics=(fetch_freshness,),
)

RETENTION = Feature(
    name="retention",
    config_sections=(RETENTION_SECTION,),
    background=(sweep_periodically,),
)

#: What an operator console needs of the daemon: the event stream, job actions.
CONSOLE = Feature(
    name="console",
    blueprints=(events_blueprint, actions_blueprint),
    config_sections=(EVENTS_SECTION,),
    startup=(prepare_event_hub,),
    background=(run_event_hub,),
)

#: Everything the standard daemon does.
FEATURES: tuple[Feature, ...] = (DIAGNOSTICS, MIGRATION, FETCH, RETENTION, CONSOLE)


def enabled_features(features: Iterable[Feature], settings: Settings) -> list[Feature]:
    """The features ``settings`` switch on, in their order."""
    return [feature for feature in features if feature.enabled(settings)]


def build_registry(features: Iterable[Feature] = FEATURES) -> KindRegistry:
    """The job kinds of ``features``; a kind name used twice is refused."""
    registry = KindRegistry()
    for feature in features:
        for kind in feature.kinds:
            registry.add(kind)
    return registry


def missing_sections(features: Iterable[Feature], loaded: Iterable[str]) -> list[str]:
    """Sections that ``features`` own but settings were loaded without."""
    have = set(loaded)
    return [section.name for feature in features for section in feature.config_sections
            if section.name not in have]
