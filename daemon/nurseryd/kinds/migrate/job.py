"""The ``migration`` job kind: pick the source and target, run the pipeline, clean up."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..base import JobContext, JobFailed, ParamError
from .external_sources import SOURCE_TYPES as EXTERNAL_SOURCE_TYPES
from .external_sources import build_source, parse_external_params
from .pipeline import run_pipeline
from .sources.base import Source
from .sources.excel import ExcelSource
from .targets import configured_targets, migration_settings
from .uploads_dir import upload_path

log = logging.getLogger(__name__)

SOURCE_TYPES = ("excel", *EXTERNAL_SOURCE_TYPES)


def parse_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params are built by our own endpoints; still validated (they are stored JSON)."""
    if params.get("source_type") in EXTERNAL_SOURCE_TYPES:
        return parse_external_params(params)
    allowed = {"source_type", "upload", "target", "sheet", "filename", "bytes"}
    for name in params:
        if name not in allowed:
            raise ParamError(name, f"unknown parameter; allowed: {', '.join(sorted(allowed))}")
    source_type = params.get("source_type")
    if source_type not in SOURCE_TYPES:
        raise ParamError("source_type", f"expected one of {', '.join(SOURCE_TYPES)}")
    target = params.get("target")
    if not isinstance(target, str) or not target:
        raise ParamError("target", "expected a target name")
    upload = params.get("upload")
    if source_type == "excel":
        if not isinstance(upload, str):
            raise ParamError("upload", "expected the stored upload's name")
        try:
            upload_path(Path("."), upload)
        except ValueError as error:
            raise ParamError("upload", str(error)) from None
    sheet = params.get("sheet")
    if sheet is not None and not isinstance(sheet, str):
        raise ParamError("sheet", "expected a sheet name")
    return dict(params)


def _source(ctx: JobContext) -> tuple[Source, Path | None]:
    if (external := build_source(ctx)) is not None:
        return external, None
    settings = migration_settings(ctx.settings)
    params = ctx.params
    if params["source_type"] == "excel":
        path = upload_path(ctx.settings.state_dir, params["upload"])
        return ExcelSource(path=path, sheet=params.get("sheet"), settings=settings), path
    raise JobFailed(f"unknown source type {params['source_type']!r}")


async def run_migration(ctx: JobContext) -> None:
    targets = configured_targets(ctx.settings)
    target = targets.get(ctx.params["target"])
    if target is None:
        raise JobFailed(f"target {ctx.params['target']!r} is no longer configured; known: "
                        f"{', '.join(sorted(targets))}")
    source, upload = _source(ctx)
    settings = migration_settings(ctx.settings)
    try:
        result = await run_pipeline(ctx, source, target, timezone=settings.timezone)
    except Exception:
        _remove(upload)  # failed is terminal: the file is no longer needed
        raise
    ctx.set_result(result)
    _remove(upload)
    # Cancelled (by request, timeout or shutdown) is deliberately not handled:
    # a shutdown requeues the job and it needs the file to resume; the sweep at
    # start and the periodic sweep remove files of jobs that ended cancelled.


def _remove(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not delete upload %s: %s", path, error)
