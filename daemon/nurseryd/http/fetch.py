"""``/fetch``: start, replace, cancel and inspect the one-at-a-time fetch.

The rule "one fetch at a time" is not checked here: the database refuses a second
active fetch row (partial unique index ``jobs_one_active_fetch``), so it also
holds between daemons sharing one PostgreSQL and between a request and the
schedule. This module only turns that refusal into a useful 409: the active job
and where to watch it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from quart import Blueprint, Response, request

from ..db import jobs as jobsdb
from ..db.fetch_sources import source_states
from ..kinds.fetch import fetch_config, submit_fetch
from ..lifecycle import Status
from ..observe.logs import redact
from ..services import Services
from ..supervisor import JobAlreadyFinished, JobConflict, JobNotFound
from .access import caller_name
from .context import get_services
from .jobs import accepted, json_response, read_json_object
from .problems import Problem

blueprint = Blueprint("fetch", __name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _replace_arg() -> bool:
    unknown = sorted(set(request.args) - {"replace"})
    if unknown:
        raise Problem(422, f"unknown query parameter {unknown[0]!r}; POST /fetch accepts only "
                      "?replace=true", field=unknown[0])
    raw = request.args.get("replace", "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise Problem(422, f"replace must be true or false, got {raw!r}", field="replace")


async def _conflict(services: Services, *, replacing: bool) -> Problem:
    """409 naming the active fetch (looked up now: the index only said "there is one")."""
    active_id = await jobsdb.active_job_id(services.db, "fetch")
    job = None if active_id is None else await services.supervisor.get_job(active_id)
    if job is None:  # it ended between the refusal and this lookup
        return Problem(409, "a fetch was active a moment ago and has just ended; retry now",
                       title="Fetch already active")
    if replacing:
        detail = (f"fetch job {job['id']} was asked to stop but is still {job['status']} "
                  "(it may run in another daemon sharing this database); retry shortly")
    else:
        detail = (f"fetch job {job['id']} is already {job['status']}; watch it at "
                  f"/jobs/{job['id']}, stop it with POST /fetch/cancel, or start over with "
                  "POST /fetch?replace=true")
    return Problem(409, detail, title="Fetch already active", job=job,
                   headers={"Location": f"/jobs/{job['id']}"})


@blueprint.post("/fetch")
async def start_fetch() -> Response:
    replace = _replace_arg()
    if await read_json_object():
        raise Problem(422, "POST /fetch takes no parameters: the sources are configured in the "
                      "[fetch] section of the config file")
    services = get_services()
    if not fetch_config(services).sources:
        raise Problem(409, "no fetch sources are configured; add [[fetch.sources]] to the "
                      "config file (see docs/fetch.md) and restart", title="Nothing to fetch")
    if replace:
        active_id = await jobsdb.active_job_id(services.db, "fetch")
        if active_id is not None:
            try:
                await services.supervisor.cancel(active_id, cancelled_by=caller_name())
            except (JobNotFound, JobAlreadyFinished):
                pass  # it ended by itself meanwhile: nothing to replace
    try:
        job = await submit_fetch(services, "api", submitted_by=caller_name())
    except JobConflict:
        raise await _conflict(services, replacing=replace) from None
    return accepted(job)


@blueprint.post("/fetch/cancel")
async def cancel_fetch() -> Response:
    services = get_services()
    active_id = await jobsdb.active_job_id(services.db, "fetch")
    if active_id is None:
        raise Problem(404, "no fetch is queued or running; start one with POST /fetch",
                      title="No active fetch")
    job = await services.supervisor.cancel(active_id, cancelled_by=caller_name())
    status = 200 if Status(job["status"]).is_terminal else 202
    return json_response(job, status, {"Location": f"/jobs/{job['id']}"})


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


@blueprint.get("/fetch")
async def fetch_status() -> Response:
    """The active (else the latest) fetch job, the schedule, and every configured
    source with what the last fetches recorded about it."""
    services = get_services()
    config = fetch_config(services)
    job_id = (await jobsdb.active_job_id(services.db, "fetch")
              or await jobsdb.latest_job_id(services.db, "fetch"))
    job = None if job_id is None else await services.supervisor.get_job(job_id)
    states = await source_states(services.db)
    sources = []
    for source in config.sources:
        state = states.get(source.name) or {}
        known = state.get("url") == source.url
        sources.append({
            # Redacted like a log line: a source URL may carry a password or a token.
            "name": source.name, "url": redact(source.url), "format": source.format,
            **{key: _iso(state.get(key)) for key in (
                "last_outcome", "last_status", "last_job_id", "last_success_at",
                "last_error", "last_error_at")},
            "etag": state.get("etag") if known else None,
            "last_modified": state.get("last_modified") if known else None,
        })
    return json_response({
        "job": job,
        "active": job is not None and not Status(job["status"]).is_terminal,
        "schedule": {"interval_s": config.interval_s or None,
                     "run_at_start": config.run_at_start},
        "sources": sources,
    })
