"""``POST /migration/database`` and ``POST /migration/google-sheets``: start an import.

A spreadsheet is named too: ``spreadsheet`` names a ``[google_sheets.spreadsheets]``
entry, and a ``spreadsheet_id`` is taken only if the file lists it, so a caller
cannot make the service account read whatever else it can reach.

A database source is named, never described: the body carries a
``source_identifier`` that must match a ``[sources.NAME]`` section of the
config file. A body that tries to pass a connection string (``url``, ``dsn``,
...) is refused outright, so nobody can point the daemon at a database the
operator did not configure. Progress is watched at ``/migration/jobs/{id}``
(``source_type`` is ``database`` or ``google_sheets``) like an Excel import.

The params are built by the typed ``parse`` the migration kind itself runs
(:mod:`nurseryd.kinds.migrate.external_sources`), so a body is held to exactly
the kind's rules; what only the daemon's settings can answer (is the source,
the target, Google access configured?) is checked here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response

from ..kinds.migrate.external_sources import DatabaseImportParams, SheetsImportParams
from ..kinds.migrate.source_config import database_sources, sheets_config
from ..kinds.migrate.targets import configured_targets, migration_settings
from .access import caller_name
from .context import get_services
from .jobs import json_response, read_json_object
from .migration import migration_job_json
from .problems import Problem

blueprint = Blueprint("migration_sources", __name__)

_CONNECTION_FIELDS = {"url", "dsn", "database_url", "connection_string", "connection", "host",
                      "password"}


def _refuse_connection_details(body: dict[str, Any]) -> None:
    smuggled = sorted(set(body) & _CONNECTION_FIELDS)
    if smuggled:
        raise Problem(422, f"connection details are never accepted over HTTP ({smuggled[0]!r}); "
                      "configure the database as [sources.NAME] in the config file and send "
                      "its name as source_identifier", field=smuggled[0])


def _with_target(body: dict[str, Any]) -> dict[str, Any]:
    """The body with the default target filled in (the params' parse checks the rest)."""
    services = get_services()
    return {**body, "target": body.get("target",
                                       migration_settings(services.settings).default_target)}


def _check_target(target: str) -> None:
    targets = configured_targets(get_services().settings)
    if target not in targets:
        raise Problem(422, f"unknown target {target!r}; configured targets: "
                      f"{', '.join(sorted(targets))}", field="target")


async def _submit(params: dict[str, Any]) -> Response:
    job = await get_services().supervisor.submit("migration", params,
                                                 submitted_by=caller_name())
    return json_response(migration_job_json(job), 202,
                         {"Location": f"/migration/jobs/{job['id']}"})


@blueprint.post("/migration/database")
async def import_database() -> Response:
    body = await read_json_object()
    _refuse_connection_details(body)
    params = DatabaseImportParams.parse(_with_target(body))
    sources = database_sources(get_services().settings)
    if params.source_identifier not in sources:
        known = ", ".join(sorted(sources)) or "none (add [sources.NAME] to the config file)"
        raise Problem(404, f"no source named {params.source_identifier!r} is configured; "
                      f"configured: {known}", title="Unknown source",
                      field="source_identifier", known=sorted(sources))
    _check_target(params.target)
    return await _submit(params.to_json())


def _named_spreadsheet(body: dict[str, Any], allowed: Mapping[str, str]) -> dict[str, Any]:
    """``{"spreadsheet": NAME}`` becomes the configured ``spreadsheet_id``."""
    if "spreadsheet" not in body:
        return body
    rest = {key: value for key, value in body.items() if key != "spreadsheet"}
    if "spreadsheet_id" in rest:
        raise Problem(422, "send spreadsheet (a configured name) or spreadsheet_id, not both",
                      field="spreadsheet")
    name = body["spreadsheet"]
    if not isinstance(name, str) or name not in allowed:
        known = ", ".join(sorted(allowed)) or "none (add [google_sheets.spreadsheets])"
        raise Problem(404, f"no spreadsheet named {name!r} is configured; configured: {known}",
                      title="Unknown spreadsheet", field="spreadsheet", known=sorted(allowed))
    return {**rest, "spreadsheet_id": allowed[name]}


@blueprint.post("/migration/google-sheets")
async def import_google_sheet() -> Response:
    body = await read_json_object()
    _refuse_connection_details(body)
    sheets = sheets_config(get_services().settings)
    params = SheetsImportParams.parse(_with_target(_named_spreadsheet(body,
                                                                      sheets.spreadsheets)))
    if not sheets.configured:
        raise Problem(409, "Google Sheets access is not configured: set api_key or "
                      "credentials_file in [google_sheets] and restart",
                      title="Google Sheets not configured")
    if not sheets.allows(params.spreadsheet_id):
        raise Problem(403, "this spreadsheet is not one the daemon may read: list it in "
                      "[google_sheets.spreadsheets] (NAME = \"<id>\") and send its name as "
                      "spreadsheet", title="Spreadsheet not allowed", field="spreadsheet_id")
    _check_target(params.target)
    return await _submit(params.to_json())
