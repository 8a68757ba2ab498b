"""The ``migration`` job kind: pick the source and target, run the pipeline, clean up.

Its params are one of three typed records, chosen by ``source_type``:
:class:`ExcelImportParams` here, :class:`~.external_sources.DatabaseImportParams`
and :class:`~.external_sources.SheetsImportParams`. The HTTP handlers that start
imports build them with the same ``parse``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...db.transient import is_transient
from ..base import JobContext, JobFailed, ParamError
from .external_sources import SOURCE_TYPES as EXTERNAL_SOURCE_TYPES
from .external_sources import (
    DatabaseImportParams,
    SheetsImportParams,
    build_source,
    check_names,
    parse_target,
)
from .pipeline import run_pipeline
from .sources.base import Source
from .sources.excel import ExcelSource
from .targets import configured_targets, migration_settings
from .uploads_dir import upload_path

if TYPE_CHECKING:
    from ...config import Settings

log = logging.getLogger(__name__)

SOURCE_TYPES = ("excel", *EXTERNAL_SOURCE_TYPES)


@dataclass(frozen=True)
class ExcelImportParams:
    """Import an uploaded workbook (``POST /migration/excel`` stores it first)."""

    #: The stored file's name in the uploads directory (random, never the client's).
    upload: str
    target: str
    sheet: str | None = None
    #: The client's name for the file and its size: for display only.
    filename: str | None = None
    size: int | None = None
    source_type: ClassVar[str] = "excel"
    FIELDS: ClassVar[tuple[str, ...]] = ("upload", "target", "sheet", "filename", "bytes")

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> ExcelImportParams:
        check_names(params, cls.source_type, cls.FIELDS)
        target = parse_target(params)
        upload = params.get("upload")
        if not isinstance(upload, str):
            raise ParamError("upload", "expected the stored upload's name")
        try:
            upload_path(Path("."), upload)
        except ValueError as error:
            raise ParamError("upload", str(error)) from None
        sheet = params.get("sheet")
        if sheet is not None and not isinstance(sheet, str):
            raise ParamError("sheet", "expected a sheet name")
        filename = params.get("filename")
        if filename is not None and not isinstance(filename, str):
            raise ParamError("filename", "expected the uploaded file's name")
        size = params.get("bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or size < 0):
            raise ParamError("bytes", "expected the upload's size in bytes")
        return cls(upload, target, sheet, filename, size)

    def to_json(self) -> dict[str, Any]:
        return {"source_type": self.source_type, "upload": self.upload, "target": self.target,
                "sheet": self.sheet, "filename": self.filename, "bytes": self.size}


MigrationParams = ExcelImportParams | DatabaseImportParams | SheetsImportParams
PARAMS_BY_SOURCE_TYPE: dict[str, type[MigrationParams]] = {
    "excel": ExcelImportParams, "database": DatabaseImportParams,
    "google_sheets": SheetsImportParams,
}


def parse_migration_params(params: Mapping[str, Any]) -> MigrationParams:
    """The typed params of a migration job, by its ``source_type``."""
    source_type = params.get("source_type")
    params_type = PARAMS_BY_SOURCE_TYPE.get(source_type) if isinstance(source_type, str) else None
    if params_type is None:
        raise ParamError("source_type", f"expected one of {', '.join(SOURCE_TYPES)}")
    return params_type.parse(params)


def parse_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The kind's ``parse_params``: the typed parse, stored as its JSON."""
    return parse_migration_params(params).to_json()


def _source(ctx: JobContext, params: MigrationParams) -> tuple[Source, Path | None]:
    if not isinstance(params, ExcelImportParams):
        return build_source(params, ctx), None
    settings = migration_settings(ctx.settings)
    path = upload_path(ctx.settings.state_dir, params.upload)
    return ExcelSource(path=path, sheet=params.sheet, settings=settings), path


async def run_migration(ctx: JobContext) -> None:
    params = parse_migration_params(ctx.params)
    targets = configured_targets(ctx.settings)
    target = targets.get(params.target)
    if target is None:
        raise JobFailed(f"target {params.target!r} is no longer configured; known: "
                        f"{', '.join(sorted(targets))}")
    source, upload = _source(ctx, params)
    settings = migration_settings(ctx.settings)
    try:
        result = await run_pipeline(ctx, source, target, timezone=settings.timezone)
    except Exception as error:
        # A transient error (the database went away) is tried again: the next
        # attempt needs the file. A failed job keeps it for keep_ended_uploads so
        # an operator's retry resumes from the checkpoint; the sweep removes it then.
        if not is_transient(error) and settings.keep_ended_uploads_s <= 0:
            _remove(upload)
        raise
    ctx.set_result(result)
    _note_outcome(ctx, result)
    _remove(upload)
    # Cancelled (by request, timeout or shutdown) is deliberately not handled here:
    # a shutdown requeues the job and it needs the file to resume, and a cancelled
    # or timed-out job may be retried; the sweeps remove the file once the job has
    # been ended for keep_ended_uploads.


def _note_outcome(ctx: JobContext, result: dict[str, Any]) -> None:
    """What the operator should know that the counters do not say at a glance."""
    rejected = result.get("rejected") or 0
    if rejected:
        kept = migration_settings(ctx.settings).max_stored_rejects
        stored = "" if rejected <= kept else f" (the first {kept} are kept)"
        ctx.note(f"{rejected} row(s) rejected{stored}: GET /jobs/{ctx.job_id}/rejects "
                 "lists each with its row number and reason")
    ignored = result.get("ignored_columns") or []
    if ignored:
        ctx.note(f"{len(ignored)} column(s) matched no target column and were not imported: "
                 + ", ".join(repr(str(name)) for name in ignored[:20])
                 + (" …" if len(ignored) > 20 else ""), level="info")


def rerun_blocker(params: Mapping[str, Any], settings: Settings) -> str | None:
    """Why an ended migration cannot run again: an Excel import whose stored
    upload is gone (removed when the job ended, or by the sweep). The other
    sources read from where they live and can always resume."""
    try:
        parsed = parse_migration_params(params)
    except ParamError as error:
        return f"its params are no longer valid ({error})"
    if not isinstance(parsed, ExcelImportParams):
        return None
    if upload_path(settings.state_dir, parsed.upload).is_file():
        return None
    keep_s = migration_settings(settings).keep_ended_uploads_s
    return (f"its upload ({parsed.filename!r}) is gone: a workbook is kept for "
            f"{keep_s:g} s after its import ended ([migration] keep_ended_uploads); "
            "upload it again with POST /migration/excel")


def _remove(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not delete upload %s: %s", path, error)
