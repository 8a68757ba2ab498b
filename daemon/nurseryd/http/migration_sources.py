"""``POST /migration/database`` and ``POST /migration/google-sheets``: start an import.

A database source is named, never described: the body carries a
``source_identifier`` that must match a ``[sources.NAME]`` section of the
config file. A body that tries to pass a connection string (``url``, ``dsn``,
...) is refused outright, so nobody can point the daemon at a database the
operator did not configure. Progress is watched at ``/migration/jobs/{id}``
(``source_type`` is ``database`` or ``google_sheets``) like an Excel import.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from ..kinds.migrate.external_sources import SPREADSHEET_ID
from ..kinds.migrate.source_config import database_sources, sheets_config
from ..kinds.migrate.targets import configured_targets, migration_settings
from .context import get_services
from .jobs import json_response, read_json_object
from .migration import migration_job_json
from .problems import Problem

blueprint = Blueprint("migration_sources", __name__)

_CONNECTION_FIELDS = {"url", "dsn", "database_url", "connection_string", "connection", "host",
                      "password"}


def _check_fields(body: dict[str, Any], allowed: set[str], example: str) -> None:
    smuggled = sorted(set(body) & _CONNECTION_FIELDS)
    if smuggled:
        raise Problem(422, f"connection details are never accepted over HTTP ({smuggled[0]!r}); "
                      "configure the database as [sources.NAME] in the config file and send "
                      "its name as source_identifier", field=smuggled[0])
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Problem(422, f"unknown field {unknown[0]!r}; send {example}", field=unknown[0])


def _target(body: dict[str, Any]) -> str:
    services = get_services()
    targets = configured_targets(services.settings)
    target = body.get("target", migration_settings(services.settings).default_target)
    if not isinstance(target, str) or target not in targets:
        raise Problem(422, f"unknown target {target!r}; configured targets: "
                      f"{', '.join(sorted(targets))}", field="target")
    return target


async def _submit(params: dict[str, Any]) -> Response:
    job = await get_services().supervisor.submit("migration", params)
    return json_response(migration_job_json(job), 202,
                         {"Location": f"/migration/jobs/{job['id']}"})


@blueprint.post("/migration/database")
async def import_database() -> Response:
    body = await read_json_object()
    _check_fields(body, {"source_identifier", "target"},
                  '{"source_identifier": "legacy", "target": "chats"}')
    sources = database_sources(get_services().settings)
    known = ", ".join(sorted(sources)) or "none (add [sources.NAME] to the config file)"
    identifier = body.get("source_identifier")
    if not isinstance(identifier, str) or not identifier:
        raise Problem(422, f"source_identifier is required: the name of a configured source; "
                      f"configured: {known}", field="source_identifier")
    if identifier not in sources:
        raise Problem(404, f"no source named {identifier!r} is configured; configured: {known}",
                      title="Unknown source", field="source_identifier",
                      known=sorted(sources))
    return await _submit({"source_type": "database", "source_identifier": identifier,
                          "target": _target(body)})


@blueprint.post("/migration/google-sheets")
async def import_google_sheet() -> Response:
    body = await read_json_object()
    _check_fields(body, {"spreadsheet_id", "range", "target"},
                  '{"spreadsheet_id": "...", "range": "Sheet1", "target": "chats"}')
    spreadsheet = body.get("spreadsheet_id")
    if not isinstance(spreadsheet, str) or not SPREADSHEET_ID.match(spreadsheet):
        raise Problem(422, "spreadsheet_id is required: the id in the sheet's URL "
                      "(https://docs.google.com/spreadsheets/d/<id>/edit)",
                      field="spreadsheet_id")
    sheet_range = body.get("range")
    if sheet_range is not None and (not isinstance(sheet_range, str) or not sheet_range.strip()):
        raise Problem(422, "range must be a sheet name such as \"Sheet1\" (or \"Sheet1!A:F\")",
                      field="range")
    if not sheets_config(get_services().settings).configured:
        raise Problem(409, "Google Sheets access is not configured: set api_key or "
                      "credentials_file in [google_sheets] and restart",
                      title="Google Sheets not configured")
    target = _target(body)
    from ..kinds.migrate.sources.sheets_api import SheetsProblem, parse_range

    try:
        parse_range(sheet_range)
    except SheetsProblem as error:
        raise Problem(422, str(error), field="range") from None
    return await _submit({"source_type": "google_sheets", "spreadsheet_id": spreadsheet,
                          "range": sheet_range, "target": target})
