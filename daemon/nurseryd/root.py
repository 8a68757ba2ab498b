"""The process's one tree of tasks.

::

    trio.run
    └── trio_asyncio.open_loop          (asyncpg's event loop)
        └── PostgreSQL (embedded or configured) → pool → schema migrations
            └── root nursery
                ├── supervisor.run       (job nursery: every job, each in its cancel scope)
                ├── hypercorn serve      (HTTP; handlers only submit into the channel)
                └── aux nursery          (signals, systemd watchdog/status, event-loop
                                          lag, schedulers)

Shutdown runs top-down: a signal stops intake and drains the supervisor (grace,
then cancel, statuses written shielded); only when every job has ended is
hypercorn told to stop, so status requests are answered during the whole drain.

What runs in the tree comes from the features (:data:`nurseryd.features.FEATURES`
unless told otherwise): their kinds fill the registry, their start-up checks run
before HTTP listens, their blueprints make the app, their background tasks run
in the aux nursery.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio
import trio_asyncio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve

from .config import Settings
from .db import open_database
from .db.cluster import one_start_at_a_time
from .db.embedded import open_embedded_server
from .db.migrate import apply_migrations
from .db.owner_lock import hold_owner_lock
from .errors import StartupError
from .features import FEATURES, Feature, build_registry, enabled_features, missing_sections
from .http.app import create_app
from .observe.hub import Observability
from .observe.logs import ACCESS_LOG_FORMAT
from .observe.metrics import Metrics
from .services import Services
from .supervisor import Supervisor
from .systemd import Notifier

log = logging.getLogger(__name__)

#: Connections for the control plane: supervisor writes and API reads.
CONTROL_POOL_SIZE = 4
CONTROL_ACQUIRE_TIMEOUT_S = 5.0
CONTROL_COMMAND_TIMEOUT_S = 30.0
#: Connections for job work (what kinds reach as ``ctx.db``).
WORK_POOL_SIZE = 10
#: Reaching PostgreSQL at start: this many tries with back-off, then one line and exit.
CONNECT_ATTEMPTS = 6


@asynccontextmanager
async def open_postgres_dsn(settings: Settings) -> AsyncIterator[str]:
    """The configured database URL, or the embedded server's when none is set."""
    if settings.database_url:
        yield settings.database_url
        return
    async with open_embedded_server(settings.state_dir) as server:
        yield server.dsn


def warn_if_shared(state_dir: Path) -> bool:
    """Warn when other local users can read the state directory: it holds the
    uploaded workbooks and the embedded database (customer data)."""
    mode = state_dir.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("state_dir %s is accessible to other users (mode %o): it holds uploads "
                    "and the database; chmod 700 it", state_dir, stat.S_IMODE(mode))
        return True
    return False


def _hypercorn_config(settings: Settings) -> HyperConfig:
    config = HyperConfig()
    config.bind = [settings.bind]
    # Requests that arrived during the drain have been answered by now; this only
    # bounds how long idle keep-alive connections may hold the exit up.
    config.graceful_timeout = 0.25
    if settings.access_log:  # through the daemon's handler: its format, redacted
        config.accesslog = logging.getLogger("hypercorn.access")
        config.access_log_format = ACCESS_LOG_FORMAT
    else:
        config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    config.include_server_header = False  # no version banner for scanners
    return config


async def serve(
    settings: Settings,
    *,
    features: Sequence[Feature] = FEATURES,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Services | list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or ``services.supervisor.request_stop()``).

    ``settings`` must have been loaded with (at least) ``features``' config sections.
    """
    missing = missing_sections(features, settings.sections)
    if missing:
        raise StartupError(f"the settings lack the config section(s) {', '.join(missing)}: "
                           "load them with the same features the daemon serves")
    features = enabled_features(features, settings)
    notifier = notifier or Notifier()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    warn_if_shared(settings.state_dir)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with (
            trio_asyncio.open_loop(),
            open_postgres_dsn(settings) as dsn,
            # The control plane (the supervisor's writes, the API's reads) has a pool
            # of its own that job work cannot take, with timeouts: it answers 503
            # rather than hang. Job work (ctx.db) gets the other one.
            open_database(dsn, min_size=1, max_size=CONTROL_POOL_SIZE,
                          acquire_timeout=CONTROL_ACQUIRE_TIMEOUT_S,
                          command_timeout=CONTROL_COMMAND_TIMEOUT_S,
                          connect_attempts=CONNECT_ATTEMPTS) as db,
            open_database(dsn, max_size=WORK_POOL_SIZE) as work_db,
        ):
            await apply_migrations(db)
            kinds = build_registry(features)
            metrics = Metrics(kinds.names())
            supervisor = Supervisor(db, settings, kinds, owner, work_db=work_db, metrics=metrics)
            # Subscribed to the job feed before the supervisor runs: adoptions at start count.
            observability = Observability(
                metrics, supervisor, supervisor.store.feed, db=db,
                pools={"control": db, "work": work_db},
                hooks=[hook for feature in features for hook in feature.metrics])
            async with hold_owner_lock(db, owner, on_lost=supervisor.claim_lost,
                                       on_regained=supervisor.claim_regained):
                services = Services(settings=settings, db=db, kinds=kinds, supervisor=supervisor,
                                    observability=observability)
                async with one_start_at_a_time(db):  # daemons starting together
                    for feature in features:
                        for prepare in feature.startup:
                            await prepare(services)
                await _run_tree(services, features, notifier, signals, task_status)
    notifier.close()


async def _run_tree(
    services: Services,
    features: Sequence[Feature],
    notifier: Notifier,
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[Services | list[str]],
) -> None:
    supervisor = services.supervisor
    settings = services.settings
    supervisor_done = trio.Event()
    http_stop = trio.Event()

    async def run_supervisor(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            await supervisor.run(task_status=task_status)
        finally:
            supervisor_done.set()

    async def watch_signals(aux: trio.Nursery) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if supervisor.draining:
                log.warning("%s again: ending the grace period now", name)
            else:
                log.info("%s: draining (grace %gs)", name, settings.shutdown_grace)
                notifier.stopping(f"draining: {supervisor.counts['running']} job(s) running")
                aux.start_soon(notifier.extend_while_draining)
            supervisor.request_stop()

    def describe() -> str:
        counts = supervisor.counts
        state = "draining" if supervisor.draining else "serving"
        return f"{state}: {counts['running']} running, {counts['queued']} queued"

    app = create_app(services, features)
    async with trio.open_nursery() as root:
        await root.start(run_supervisor)
        binds = await root.start(
            partial(hypercorn_serve, app, _hypercorn_config(settings),
                    shutdown_trigger=http_stop.wait)
        )
        log.info("listening on %s", ", ".join(binds))
        services.binds = binds
        async with trio.open_nursery() as aux:
            aux.start_soon(watch_signals, aux)
            aux.start_soon(notifier.keep_watchdog_fed)
            aux.start_soon(notifier.report_status, describe)
            aux.start_soon(services.observability.lag.run)
            for feature in features:
                for background in feature.background:
                    aux.start_soon(background, services)
            notifier.ready(describe())
            task_status.started(services)
            await supervisor_done.wait()
            aux.cancel_scope.cancel()
        http_stop.set()
    log.info("stopped")
