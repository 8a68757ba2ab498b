"""The one place that lists what the daemon can do: job kinds, HTTP blueprints,
background tasks and start-up preparations. Adding a feature is adding lines here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from quart import Blueprint

from .errors import StartupError  # noqa: F401  (re-exported)
from .kinds.base import JobKind, KindRegistry
from .services import Services


def job_kinds() -> list[JobKind]:
    from .kinds.sleep import NOOP_KIND, SLEEP_KIND, SQL_SLEEP_KIND

    kinds = [SLEEP_KIND, SQL_SLEEP_KIND, NOOP_KIND]
    # FEATURE-KINDS (one line per feature below)
    from .kinds.migrate import MIGRATION_KIND
    from .kinds.migrate.source_config import parse_sources  # noqa: F401  (config sections)
    kinds.append(MIGRATION_KIND)
    from .kinds.fetch import FETCH_KIND
    kinds.append(FETCH_KIND)
    return kinds


def blueprints() -> list[Blueprint]:
    from .http.jobs import blueprint as jobs_blueprint

    found = [jobs_blueprint]
    # FEATURE-BLUEPRINTS (one line per feature below)
    from .http.migration_sources import blueprint as migration_sources_blueprint
    found.append(migration_sources_blueprint)
    from .http.migration import blueprint as migration_blueprint
    found.append(migration_blueprint)
    from .http.fetch import blueprint as fetch_blueprint
    found.append(fetch_blueprint)
    return found


def startup_preparations() -> list[Callable[[Services], Awaitable[None]]]:
    """Run once after schema migrations, before HTTP listens; may raise StartupError."""
    found: list[Callable[[Services], Awaitable[None]]] = []
    # FEATURE-STARTUP (one line per feature below)
    from .kinds.migrate import prepare_targets
    found.append(prepare_targets)
    return found


def background_tasks() -> list[Callable[[Services], Awaitable[None]]]:
    """Long-running tasks (schedulers); they run until shutdown cancels them."""
    found: list[Callable[[Services], Awaitable[None]]] = []
    # FEATURE-BACKGROUND (one line per feature below)
    from .kinds.migrate import sweep_uploads_periodically
    found.append(sweep_uploads_periodically)
    from .kinds.fetch import run_fetch_schedule
    found.append(run_fetch_schedule)
    return found


def build_registry() -> KindRegistry:
    registry = KindRegistry()
    for kind in job_kinds():
        registry.add(kind)
    return registry
