"""The migration sources that are not uploads: a configured database, a Google Sheet.

Their parameters are typed (:class:`DatabaseImportParams`,
:class:`SheetsImportParams`): ``POST /migration/database`` and
``POST /migration/google-sheets`` build them with the same ``parse`` the
migration kind runs on submission and again on every attempt (the params are
stored as JSON and re-read), so each rule about them exists once. A database
source is referenced by name only (never by URL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import JobContext, JobFailed, ParamError, refuse_unknown
from .source_config import SPREADSHEET_ID, database_sources, sheets_config
from .sources.base import Source

SOURCE_TYPES = ("database", "google_sheets")
MAX_RANGE = 200


def check_names(params: Mapping[str, Any], source_type: str, fields: tuple[str, ...]) -> None:
    """Only ``fields`` (and ``source_type``, which must be this one) may be given."""
    refuse_unknown(params, {"source_type", *fields},
                   f"allowed: {', '.join(sorted({'source_type', *fields}))}")
    if params.get("source_type", source_type) != source_type:
        raise ParamError("source_type", f"expected {source_type!r} here")


def parse_target(params: Mapping[str, Any]) -> str:
    """The target's name; whether it is configured is checked where settings are known."""
    target = params.get("target")
    if not isinstance(target, str) or not target:
        raise ParamError("target", "expected a target name")
    return target


@dataclass(frozen=True)
class DatabaseImportParams:
    """Import from a ``[sources.NAME]`` database of the config file."""

    source_identifier: str
    target: str
    source_type: ClassVar[str] = "database"
    FIELDS: ClassVar[tuple[str, ...]] = ("source_identifier", "target")

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> DatabaseImportParams:
        check_names(params, cls.source_type, cls.FIELDS)
        identifier = params.get("source_identifier")
        if not isinstance(identifier, str) or not identifier:
            raise ParamError("source_identifier", "required: the name of a [sources.NAME] "
                             "section of the config file")
        return cls(identifier, parse_target(params))

    def to_json(self) -> dict[str, Any]:
        return {"source_type": self.source_type, "source_identifier": self.source_identifier,
                "target": self.target}


@dataclass(frozen=True)
class SheetsImportParams:
    """Import a Google Sheet: its id and, optionally, which sheet (and columns)."""

    spreadsheet_id: str
    target: str
    #: ``None`` (the first sheet), ``"Sheet1"``, ``"'My sheet'!A:F"``: see
    #: :func:`~.sources.sheets_api.parse_range`.
    range: str | None = None
    source_type: ClassVar[str] = "google_sheets"
    FIELDS: ClassVar[tuple[str, ...]] = ("spreadsheet_id", "range", "target")

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> SheetsImportParams:
        from .sources.sheets_api import SheetsProblem, parse_range

        check_names(params, cls.source_type, cls.FIELDS)
        spreadsheet = params.get("spreadsheet_id")
        if not isinstance(spreadsheet, str) or not SPREADSHEET_ID.match(spreadsheet):
            raise ParamError("spreadsheet_id", "required: the id in the sheet's URL "
                             "(https://docs.google.com/spreadsheets/d/<id>/edit: letters, "
                             "digits, - and _)")
        sheet_range = params.get("range")
        if sheet_range is not None:
            if not isinstance(sheet_range, str) or not sheet_range.strip() \
                    or len(sheet_range) > MAX_RANGE:
                raise ParamError("range", "expected a sheet name such as \"Sheet1\" (or "
                                 f"\"Sheet1!A:F\"), at most {MAX_RANGE} characters")
            try:
                parse_range(sheet_range)
            except SheetsProblem as error:
                raise ParamError("range", str(error)) from None
        return cls(spreadsheet, parse_target(params), sheet_range)

    def to_json(self) -> dict[str, Any]:
        return {"source_type": self.source_type, "spreadsheet_id": self.spreadsheet_id,
                "range": self.range, "target": self.target}


ExternalParams = DatabaseImportParams | SheetsImportParams


def build_source(params: ExternalParams, ctx: JobContext) -> Source:
    """The source for a database or Google Sheets job."""
    if isinstance(params, DatabaseImportParams):
        from .sources.database import DatabaseSource

        sources = database_sources(ctx.settings)
        config = sources.get(params.source_identifier)
        if config is None:
            raise JobFailed(f"source {params.source_identifier!r} is no longer configured; "
                            f"known: {', '.join(sorted(sources)) or 'none'}")
        return DatabaseSource(config)
    from .sources.google_sheets import SheetsSource

    sheets = sheets_config(ctx.settings)
    if not sheets.configured:
        raise JobFailed("Google Sheets access is not configured: set api_key or "
                        "credentials_file in [google_sheets]")
    if not sheets.allows(params.spreadsheet_id):  # checked again: the file may have changed
        raise JobFailed("the spreadsheet is no longer listed in [google_sheets.spreadsheets]")
    return SheetsSource(sheets, params.spreadsheet_id, params.range)
