"""Data migration: source -> row batches -> coerce -> rejects -> COPY -> upsert -> checkpoint.

``features.py`` lists this kind, its start-up and background hooks here and its
config sections (``targets.py``, ``source_config.py``) in the migration feature.
The package stays light (no trio, asyncpg or quart at import) because the
Excel parser's child process imports modules of this package, and its start-up
time is on the critical path of every import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import StartupError
from ..base import JobContext, JobKind

if TYPE_CHECKING:
    from ...config import Settings
    from ...services import Services

log = logging.getLogger(__name__)


async def _run(ctx: JobContext) -> None:
    from .job import run_migration

    await run_migration(ctx)


def _rerun_blocker(params: Mapping[str, Any], settings: Settings) -> str | None:
    from .job import rerun_blocker

    return rerun_blocker(params, settings)


def _parse(params: Mapping[str, Any]) -> dict[str, Any]:
    from .job import parse_params

    return parse_params(params)


MIGRATION_KIND = JobKind(
    name="migration",
    run=_run,
    parse_params=_parse,
    generic_endpoint=False,
    commits_progress=True,
    rerun_blocker=_rerun_blocker,
    description="Import rows into a target table from an uploaded .xlsx (POST /migration/excel), "
                "a configured database (POST /migration/database) or a Google Sheet "
                "(POST /migration/google-sheets): coerce, reject, COPY, upsert, resumable.",
)


async def prepare_targets(services: Services) -> None:
    """Start-up: create or verify every target table; remove orphan uploads.

    Raises :class:`~nurseryd.errors.StartupError` when an existing table does
    not match its target.
    """
    from .tables import TargetMismatch, ensure_target_table
    from .targets import configured_targets, migration_settings
    from .uploads_dir import sweep_uploads
    from .xlsx_checks import WorkbookRejected, check_expat

    for target in configured_targets(services.settings).values():
        try:
            outcome = await ensure_target_table(services.db, target)
        except TargetMismatch as error:
            raise StartupError(str(error)) from None
        log.info("migration target %s: table %s %s", target.name, target.table, outcome)
    try:
        check_expat()
    except WorkbookRejected as error:
        log.error("Excel migrations will fail: %s", error)
    keep_s = migration_settings(services.settings).keep_ended_uploads_s
    await sweep_uploads(services.db, services.settings.state_dir,
                        keep_ended_s=keep_s)


async def sweep_uploads_periodically(services: Services) -> None:
    """Background: every 5 minutes, delete the uploads no job may still read (those
    of jobs ended longer than ``keep_ended_uploads`` ago, and of crashed requests)."""
    import trio

    from .targets import migration_settings
    from .uploads_dir import sweep_uploads

    keep_s = migration_settings(services.settings).keep_ended_uploads_s
    while True:
        await trio.sleep(300)
        try:
            await sweep_uploads(services.db, services.settings.state_dir,
                                keep_ended_s=keep_s)
        except Exception:  # a sweep is housekeeping: log and try again later
            log.exception("upload sweep failed")
