"""The migration sources that are not uploads: a configured database, a Google Sheet.

``job.py`` (the migration kind) hands params and contexts of these source types
here, so adding them cost the kind three lines. Params are recorded by our own
endpoints but stored as JSON and re-read on every attempt, so they are checked
again here; a database source is referenced by name only (never by URL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..base import JobContext, JobFailed, ParamError
from .source_config import database_sources, sheets_config
from .sources.base import Source

SOURCE_TYPES = ("database", "google_sheets")
DATABASE_PARAMS = {"source_type", "source_identifier", "target"}
SHEETS_PARAMS = {"source_type", "spreadsheet_id", "range", "target"}
#: Spreadsheet ids are URL-safe base64-ish; refusing anything else keeps the
#: id from smuggling a path or query into the request URL.
SPREADSHEET_ID = re.compile(r"^[A-Za-z0-9_-]{10,200}$")
MAX_RANGE = 200


def parse_external_params(params: Mapping[str, Any]) -> dict[str, Any]:
    source_type = params.get("source_type")
    allowed = DATABASE_PARAMS if source_type == "database" else SHEETS_PARAMS
    for name in params:
        if name not in allowed:
            raise ParamError(name, f"unknown parameter; allowed: {', '.join(sorted(allowed))}")
    target = params.get("target")
    if not isinstance(target, str) or not target:
        raise ParamError("target", "expected a target name")
    if source_type == "database":
        identifier = params.get("source_identifier")
        if not isinstance(identifier, str) or not identifier:
            raise ParamError("source_identifier", "expected the name of a [sources.NAME] "
                             "section of the config file")
    elif source_type == "google_sheets":
        spreadsheet = params.get("spreadsheet_id")
        if not isinstance(spreadsheet, str) or not SPREADSHEET_ID.match(spreadsheet):
            raise ParamError("spreadsheet_id", "expected a spreadsheet id (the part of the "
                             "sheet's URL after /d/: letters, digits, - and _)")
        sheet_range = params.get("range")
        if sheet_range is not None and (not isinstance(sheet_range, str) or not sheet_range
                                        or len(sheet_range) > MAX_RANGE):
            raise ParamError("range", "expected a sheet name such as 'Sheet1' (or "
                             "'Sheet1!A:F')")
    else:
        raise ParamError("source_type", f"expected one of {', '.join(SOURCE_TYPES)}")
    return dict(params)


def build_source(ctx: JobContext) -> Source | None:
    """The source for a database or Google Sheets job; ``None`` for other types."""
    params = ctx.params
    source_type = params.get("source_type")
    if source_type == "database":
        from .sources.database import DatabaseSource

        sources = database_sources(ctx.settings)
        config = sources.get(params["source_identifier"])
        if config is None:
            raise JobFailed(f"source {params['source_identifier']!r} is no longer configured; "
                            f"known: {', '.join(sorted(sources)) or 'none'}")
        return DatabaseSource(config)
    if source_type == "google_sheets":
        from .sources.google_sheets import SheetsSource

        config = sheets_config(ctx.settings)
        if not config.configured:
            raise JobFailed("Google Sheets access is not configured: set api_key or "
                            "credentials_file in [google_sheets]")
        return SheetsSource(config, params["spreadsheet_id"], params.get("range"))
    return None
