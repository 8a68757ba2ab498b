"""``GET /openapi.json``: the API as an OpenAPI 3.1 document.

Why written out rather than introspected: the handlers parse their own bodies
(strictly, with errors a curl user can act on), so nothing in the code knows the
schemas but this module. To keep it from drifting, ``tests/test_openapi.py``
fails when a route of the app, a method, or a status of the error table is
missing here (or here but not in the app), and a bounded schemathesis run checks
answers against it.

The access rules add the same answers to every protected operation (401, 403,
421, and 415 for JSON bodies); :func:`document` adds them, so an operation lists
only what is its own. The document is served under the same access rules as the
API: it names routes, not configured kinds or sources.
"""

from __future__ import annotations

import json
from typing import Any

from quart import Blueprint, Response

blueprint = Blueprint("openapi", __name__)

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
JSON_OBJECT = {"type": "object"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description: str, schema: dict[str, Any] | None = None,
            headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = _json(schema)
    if headers:
        answer["headers"] = headers
    return answer


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": PROBLEM}
    if headers:
        answer["headers"] = headers
    return answer


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}}}
_LOCATION = {"Location": {"schema": {"type": "string"}}}
_LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                  "description": "resume after this event id"}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "the job's id (a whole number; anything else is a 404)"}

#: Answers every protected operation can give, from the access check (access_policy.py).
ACCESS_ANSWERS = {
    "401": _problem("no token, or one that matches none configured",
                    {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    "403": _problem("a cross-site request, or a read token on a write"),
    "421": _problem("a Host this daemon does not answer for"),
}
#: ... and every one that takes a JSON body.
BODY_ANSWERS = {
    "408": _problem("the body did not arrive in time"),
    "413": _problem("the body is larger than the cap"),
    "415": _problem("a body that is not application/json"),
}
#: ... and every one at all: the last-resort handler.
ANY_ANSWERS = {"500": _problem("an unexpected error; the body has a reference for the log")}


def _operations() -> dict[str, dict[str, Any]]:
    job = _answer("the job", _ref("Job"))
    accepted = _answer("the job, recorded and queued", _ref("Job"), _LOCATION)
    busy = _problem("queue full or draining, or the database did not answer", _RETRY_AFTER)
    missing = _problem("no such job (or an id that is not a whole number)")
    invalid = _problem("an invalid parameter; the body names the field")
    migration = _answer("the migration job", _ref("MigrationJob"), _LOCATION)
    json_body = {"required": False, "content": _json(JSON_OBJECT)}
    filters = [{"name": name, "in": "query", "schema": {"type": "string"}}
               for name in ("kind", "status")]
    stream = {"description": "text/event-stream: id, event, data (the job JSON plus rate "
                             "and eta_s)",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return {
        "/jobs/{kind}": {"post": {
            "summary": "start a job of a kind", "requestBody": json_body,
            "parameters": [{"name": "kind", "in": "path", "required": True,
                            "schema": {"type": "string"}},
                           {"name": "timeout_s", "in": "query", "schema": {"type": "number"}}],
            "responses": {"202": accepted, "400": _problem("the body is not a JSON object"),
                          "404": _problem("an unknown kind, or one with its own endpoint"),
                          "409": _problem("a job of this kind is already active"),
                          "422": invalid, "503": busy}}},
        "/jobs": {"get": {
            "summary": "list jobs, newest first",
            "parameters": [{"name": name, "in": "query", "schema": {"type": kind}}
                           for name, kind in (("kind", "string"), ("status", "string"),
                                              ("limit", "string"), ("before", "string"),
                                              ("since", "string"))],
            "responses": {"200": _answer("a page of jobs", _ref("JobPage")),
                          "422": invalid, "503": busy}}},
        "/jobs/{job_id}": {"get": {
            "summary": "one job", "parameters": [_JOB_ID],
            "responses": {"200": job, "404": missing, "503": busy}}},
        "/jobs/{job_id}/cancel": {"post": {
            "summary": "cancel a queued or running job", "parameters": [_JOB_ID],
            "responses": {"200": _answer("the job, stopped", _ref("Job")),
                          "202": _answer("the job, still stopping", _ref("Job")),
                          "404": missing, "409": _problem("the job has already ended"),
                          "503": busy}}},
        "/jobs/{job_id}/rejects": {"get": {
            "summary": "rows a migration could not import",
            "parameters": [_JOB_ID, {"name": "limit", "in": "query",
                                     "schema": {"type": "string"}},
                           {"name": "after", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": _answer("a page of rejects", _ref("RejectPage")),
                          "404": missing, "422": invalid, "503": busy}}},
        "/jobs/{job_id}/retry": {"post": {
            "summary": "run a failed, cancelled or timed-out job again, from its checkpoint",
            "parameters": [_JOB_ID],
            "responses": {"202": accepted, "404": missing,
                          "409": _problem("the job has not ended, its upload is gone, or a "
                                          "job of its kind is already active"),
                          "503": busy}}},
        "/jobs/cancel": {"post": {
            "summary": "cancel every job matching the filters", "parameters": filters,
            "responses": {"200": _answer("how many matched and were cancelled", JSON_OBJECT),
                          "422": invalid, "503": busy}}},
        "/jobs/retry": {"post": {
            "summary": "retry every ended job matching the filters", "parameters": filters,
            "responses": {"200": _answer("how many matched and were requeued", JSON_OBJECT),
                          "422": invalid, "503": busy}}},
        "/jobs/{job_id}/log": {"get": {
            "summary": "the job's log lines: its recorded events and its kind's notes",
            "parameters": [_JOB_ID, {"name": "limit", "in": "query",
                                     "schema": {"type": "string"}}],
            "responses": {"200": _answer("the lines", JSON_OBJECT), "404": missing,
                          "422": invalid, "503": busy}}},
        "/events": {"get": {
            "summary": "server-sent events: one per job change",
            "parameters": [*filters, {"name": "job", "in": "query",
                                      "schema": {"type": "string"}}, _LAST_EVENT_ID],
            "responses": {"200": stream, "422": invalid,
                          "503": _problem("too many open streams, or starting/stopping",
                                          _RETRY_AFTER)}}},
        "/jobs/{job_id}/events": {"get": {
            "summary": "server-sent events of one job, closed after its end",
            "parameters": [_JOB_ID, _LAST_EVENT_ID],
            "responses": {"200": stream, "404": missing, "422": invalid,
                          "503": _problem("too many open streams, or starting/stopping",
                                          _RETRY_AFTER)}}},
        "/healthz": {"get": {
            "summary": "liveness", "security": [],
            "responses": {"200": _answer("alive", JSON_OBJECT)}}},
        "/readyz": {"get": {
            "summary": "readiness", "security": [],
            "responses": {"200": _answer("ready", JSON_OBJECT),
                          "503": _answer("draining or no database", JSON_OBJECT,
                                         _RETRY_AFTER)}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "text format 0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            "summary": "this document",
            "responses": {"200": _answer("OpenAPI 3.1", JSON_OBJECT)}}},
        "/migration/excel": {"post": {
            "summary": "upload a workbook to import",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "contentMediaType":
                                        "application/octet-stream"},
                               "target": {"type": "string"}, "sheet": {"type": "string"}}}}}},
            "responses": {"202": migration, "400": _problem("a malformed multipart body"),
                          "408": _problem("the upload stalled or trickled"),
                          "413": _problem("over migration.max_upload_bytes"),
                          "415": _problem("not multipart, or not an .xlsx workbook"),
                          "422": invalid, "503": busy}}},
        "/migration/database": {"post": {
            "summary": "import from a configured database source", "requestBody": json_body,
            "responses": {"202": migration, "400": _problem("the body is not a JSON object"),
                          "404": _problem("no source of that name is configured"),
                          "422": invalid, "503": busy}}},
        "/migration/google-sheets": {"post": {
            "summary": "import a listed Google Sheet", "requestBody": json_body,
            "responses": {"202": migration, "400": _problem("the body is not a JSON object"),
                          "403": _problem("a spreadsheet the config does not list"),
                          "404": _problem("no spreadsheet of that name is configured"),
                          "409": _problem("Google Sheets access is not configured"),
                          "422": invalid, "503": busy}}},
        "/migration/jobs/{job_id}": {"get": {
            "summary": "a migration job", "parameters": [_JOB_ID],
            "responses": {"200": _answer("the migration job", _ref("MigrationJob")),
                          "404": missing, "503": busy}}},
        "/fetch": {
            "post": {
                "summary": "start the fetch", "requestBody": json_body,
                "parameters": [{"name": "replace", "in": "query",
                                "schema": {"type": "string"}}],
                "responses": {"202": accepted, "400": _problem("the body is not JSON"),
                              "409": _problem("a fetch is active, or nothing to fetch"),
                              "422": invalid, "503": busy}},
            "get": {
                "summary": "the active or latest fetch and each source's state",
                "responses": {"200": _answer("fetch status", JSON_OBJECT), "503": busy}}},
        **_dashboard_operations(invalid),
        "/fetch/cancel": {"post": {
            "summary": "cancel the active fetch",
            "responses": {"200": _answer("the fetch job, stopped", _ref("Job")),
                          "202": _answer("the fetch job, still stopping", _ref("Job")),
                          "404": _problem("no fetch is active"), "503": busy}}},
    }


def _text(media: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _dashboard_operations(invalid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The dashboard's page and sign-in (http/dashboard.py): the page and sign-in
    need no credential, only the Host and cross-site checks."""
    session = _answer("who the session acts for", _ref("Session"))
    sign_in_body = {"required": True, "content": {
        **_json({"type": "object", "required": ["token"],
                 "properties": {"token": {"type": "string"}}}),
        "application/x-www-form-urlencoded": {"schema": {
            "type": "object", "required": ["token"],
            "properties": {"token": {"type": "string"}}}}}}
    return {
        "/": {"get": {"summary": "the dashboard (HTML)",
                      "responses": {"200": _text("text/html", "the page")}}},
        "/dashboard.js": {"get": {"summary": "the dashboard's script",
                                  "responses": {"200": _text("text/javascript", "script")}}},
        "/dashboard.css": {"get": {"summary": "the dashboard's style sheet",
                                   "responses": {"200": _text("text/css", "style sheet")}}},
        "/session": {
            "get": {"summary": "who the caller acts for (session, token or protected mode)",
                    "responses": {"200": session}},
            "post": {
                "summary": "sign in with a token: sets the HttpOnly session cookie",
                "requestBody": sign_in_body,
                "responses": {
                    "200": _answer("signed in (JSON body)", _ref("Session"),
                                   {"Set-Cookie": {"schema": {"type": "string"}}}),
                    "303": {"description": "signed in (form body): back to the dashboard",
                            "headers": {**_LOCATION,
                                        "Set-Cookie": {"schema": {"type": "string"}}}},
                    "400": _problem("the body is not JSON or not a valid form"),
                    "409": _problem("no token is configured (protected mode)"),
                    "422": invalid}}},
        "/session/logout": {"post": {
            "summary": "sign out: forget the session, clear the cookie",
            "responses": {"204": {"description": "signed out"}}}},
        "/dashboard/options": {"get": {
            "summary": "what the import forms may name: targets, database sources and "
                       "spreadsheets of the config file (names only)",
            "responses": {"200": _answer("the names", _ref("DashboardOptions"))}}},
    }


_NULLABLE_STRING = {"type": ["string", "null"]}
_COUNT = {"type": ["integer", "null"]}
JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "kind", "status", "params", "attempts", "created_at"],
    "properties": {
        "id": {"type": "integer"}, "kind": {"type": "string"},
        "status": {"enum": ["queued", "running", "completed", "failed", "cancelled",
                            "timed_out"]},
        "total": _COUNT, "processed": _COUNT, "failed": _COUNT, "error": _NULLABLE_STRING,
        "params": {}, "result": {}, "attempts": {"type": "integer"},
        "timeout_s": {"type": ["number", "null"]}, "created_at": {"type": "string"},
        "started_at": _NULLABLE_STRING, "finished_at": _NULLABLE_STRING,
        "cancel_requested_at": _NULLABLE_STRING, "submitted_by": _NULLABLE_STRING,
        "cancelled_by": _NULLABLE_STRING,
    },
}


def document() -> dict[str, Any]:
    """The whole document, with the shared answers added to each operation."""
    paths = _operations()
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if operation.get("security") != []:
                for status, answer in ACCESS_ANSWERS.items():
                    responses.setdefault(status, answer)
                if method == "post" and path != "/migration/excel":
                    for status, answer in BODY_ANSWERS.items():
                        responses.setdefault(status, answer)
            for status, answer in ANY_ANSWERS.items():
                responses.setdefault(status, answer)
            operation["operationId"] = f"{method}_{path.strip('/').replace('/', '_')}" \
                .replace("{", "").replace("}", "").replace("-", "_").replace(".", "_")
    return {
        "openapi": "3.1.0",
        "info": {"title": "nurseryd", "version": "1",
                 "description": "Background jobs behind an HTTP API; see docs/api.md and "
                                "docs/security.md."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"],
                            "properties": {"type": {"type": "string"},
                                           "title": {"type": "string"},
                                           "status": {"type": "integer"},
                                           "detail": {"type": "string"}}},
                "Job": JOB_SCHEMA,
                "Session": {"type": "object", "required": ["name", "role", "via"],
                            "properties": {"name": {"type": "string"},
                                           "role": {"enum": ["admin", "read"]},
                                           "via": {"type": "string"},
                                           "protected_mode": {"type": "boolean"}}},
                "DashboardOptions": {
                    "type": "object",
                    "required": ["targets", "default_target", "database_sources",
                                 "spreadsheets", "google_sheets"],
                    "properties": {
                        "targets": {"type": "array", "items": {"type": "string"}},
                        "default_target": {"type": "string"},
                        "database_sources": {"type": "array", "items": {"type": "string"}},
                        "spreadsheets": {"type": "array", "items": {"type": "string"}},
                        "google_sheets": {"type": "boolean"}}},
                "MigrationJob": {"allOf": [JOB_SCHEMA, {"type": "object", "properties": {
                    "source_type": _NULLABLE_STRING, "rejects": {"type": "string"}}}]},
                "JobPage": {"type": "object", "required": ["jobs", "next"], "properties": {
                    "jobs": {"type": "array", "items": JOB_SCHEMA}, "next": _NULLABLE_STRING}},
                "RejectPage": {"type": "object", "required": ["job_id", "rejects", "next"],
                               "properties": {
                                   "job_id": {"type": "integer"}, "status": {"type": "string"},
                                   "failed": _COUNT, "next": _NULLABLE_STRING,
                                   "values_hidden": {"type": "boolean"},
                                   "rejects": {"type": "array", "items": {
                                       "type": "object", "properties": {
                                           "row": {"type": "integer"},
                                           "column": _NULLABLE_STRING,
                                           "reason": {"type": "string"},
                                           "values": {"type": ["object", "null"]}}}}}},
            },
        },
    }


_SERVED = json.dumps(document())


@blueprint.get("/openapi.json")
async def openapi() -> Response:
    return Response(_SERVED, content_type="application/json")
