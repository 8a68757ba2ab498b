"""The generic job API: trigger, list, inspect, cancel; health and readiness."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any
from urllib.parse import quote

import trio
from quart import Blueprint, Response, request

from ..errors import JobAlreadyFinished
from ..lifecycle import Status
from ..store.base import job_json
from ..supervisor import JobNotFound
from .access import caller_name, route_rules
from .access_policy import RouteAccess
from .context import get_services
from .problems import Problem
from .query import int_arg, status_args

blueprint = Blueprint("jobs", __name__)

#: JSON bodies are small; uploads stream on their own path with their own cap.
MAX_JSON_BODY = 1024 * 1024
#: The whole of a JSON body must arrive within this (a body sent at 1 byte per
#: 40 s would otherwise hold its request, and its memory, for as long as it likes).
JSON_BODY_DEADLINE_S = 30.0

DEFAULT_PAGE = 50
MAX_PAGE = 500
#: A page of jobs stops growing past this many bytes of JSON (at least one job is
#: always sent): 500 jobs with large params made one answer of 31 MB.
MAX_PAGE_BYTES = 4 * 1024 * 1024


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, default=str), status=status, headers=headers or {},
                    content_type="application/json")


def accepted(job: dict[str, Any]) -> Response:
    """202 for a newly recorded job, pointing at where to watch it."""
    return json_response(job, 202, {"Location": f"/jobs/{job['id']}"})


async def read_body(limit: int = MAX_JSON_BODY) -> bytes:
    """The whole body, refused with 413 as soon as it exceeds ``limit`` bytes.

    The app sets no global body cap (uploads stream with their own), so every
    handler that buffers a body goes through here: the cap holds for chunked
    bodies without Content-Length too, and nothing beyond it is kept in memory.
    The whole body must arrive within :data:`JSON_BODY_DEADLINE_S` (408 otherwise).
    """
    too_large = Problem(413, f"the body is larger than {limit} bytes; send a small JSON "
                        "object (files go to their upload endpoints)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(JSON_BODY_DEADLINE_S) as deadline:
        async for chunk in request.body:
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise Problem(408, f"the body did not arrive within {JSON_BODY_DEADLINE_S:g} s",
                      headers={"Connection": "close"})
    return b"".join(chunks)


async def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}``."""
    raw = await read_body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Problem(400, f"the body is not valid JSON ({error}); send a JSON object such"
                      " as {\"seconds\": 5}") from None
    except (ValueError, RecursionError) as error:  # NaN/Infinity, 4,300+ digits, nesting
        reason = str(error) if isinstance(error, ValueError) else "nested too deeply"
        raise Problem(400, f"the body is not strict JSON ({reason}); numbers must be finite"
                      " and of reasonable size") from None
    if not isinstance(body, dict):
        raise Problem(400, f"expected a JSON object of parameters, got {type(body).__name__}")
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_job_id(raw: str) -> int:
    try:
        job_id = int(raw)
    except ValueError:
        raise Problem(404, f"job ids are whole numbers, got {raw!r}") from None
    if job_id <= 0 or job_id > 2**63 - 1:
        raise Problem(404, f"no job with id {raw}")
    return job_id


def _query_timeout() -> float | None:
    raw = request.args.get("timeout_s")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise Problem(422, f"timeout_s must be a number of seconds, got {raw!r}",
                      field="timeout_s") from None
    if not math.isfinite(value):
        raise Problem(422, "timeout_s must be finite", field="timeout_s")
    return value


@blueprint.post("/jobs/<kind>")
async def trigger(kind: str) -> Response:
    services = get_services()
    known = services.kinds.get(kind)
    if known is not None and not known.generic_endpoint:
        raise Problem(404, f"{kind} jobs are not started through /jobs; use their own endpoint"
                      " (see docs/api.md)")
    params = await read_json_object()
    timeout_s = params.pop("timeout_s", None)
    if timeout_s is None:
        timeout_s = _query_timeout()
    job = await services.supervisor.submit(kind, params, timeout_s=timeout_s,
                                           submitted_by=caller_name())
    return accepted(job)


def _since_arg() -> dt.datetime | None:
    """``?since=`` as an aware instant: ISO 8601 with an offset (``Z`` or ``+02:00``).

    A time without an offset is refused rather than guessed: the daemon's zone,
    the browser's and the database's may all differ, and a silently shifted
    window shows the wrong jobs."""
    raw = request.args.get("since")
    if raw is None or raw == "":
        return None
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise Problem(422, f"since must be an ISO 8601 time such as 2026-12-03T10:00:00Z, "
                      f"got {raw!r}", field="since") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise Problem(422, "since needs a UTC offset (2026-12-03T10:00:00Z or "
                      "...+02:00): a time without one is ambiguous", field="since")
    try:
        return value.astimezone(dt.UTC)  # the driver sends UTC; year 1 at +01:00 has none
    except OverflowError:
        raise Problem(422, f"since is outside the years 1 to 9999 in UTC, got {raw!r}",
                      field="since") from None


@blueprint.get("/jobs")
async def list_jobs() -> Response:
    kind = request.args.get("kind") or None
    statuses = status_args()
    limit = int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    before = int_arg("before", None, 1, 2**63 - 1)
    since = _since_arg()
    jobs = await _list(kind, statuses or None, before, limit, since)
    fitted = fit_page(jobs, MAX_PAGE_BYTES)
    body: dict[str, Any] = {"jobs": fitted, "next": None}
    if len(jobs) == limit or len(fitted) < len(jobs):  # the next page starts after the last sent
        query = [f"before={fitted[-1]['id']}", f"limit={limit}"]
        if kind:
            query.append(f"kind={quote(kind, safe='')}")
        if statuses:
            query.append(f"status={','.join(statuses)}")
        if since is not None:
            query.append(f"since={quote(since.isoformat(), safe='')}")
        body["next"] = "/jobs?" + "&".join(query)
    return json_response(body)


async def _list(kind: str | None, statuses: list[str] | None, before: int | None, limit: int,
                since: dt.datetime | None) -> list[dict[str, Any]]:
    supervisor = get_services().supervisor
    if since is None:
        return await supervisor.list_jobs(kind=kind, statuses=statuses, before_id=before,
                                          limit=limit)
    # The supervisor's list_jobs has no time window (yet): a windowed read goes to
    # its store, the same query with one more condition. A read changes nothing the
    # supervisor has to know about.
    rows = await supervisor.store.list(kind=kind, statuses=statuses, before_id=before,
                                       limit=limit, since=since)
    return [job_json(row) for row in rows]


def fit_page(jobs: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """The longest prefix of ``jobs`` whose JSON stays within ``max_bytes`` (never empty
    when ``jobs`` is not)."""
    size = 0
    for index, job in enumerate(jobs):
        size += len(json.dumps(job, default=str)) + 2
        if size > max_bytes and index > 0:
            return jobs[:index]
    return jobs


@blueprint.get("/jobs/<job_id>")
async def get_job(job_id: str) -> Response:
    number = parse_job_id(job_id)
    job = await get_services().supervisor.get_job(number)
    if job is None:
        raise JobNotFound(number)
    return json_response(job)


@blueprint.post("/jobs/<job_id>/cancel")
async def cancel_job(job_id: str) -> Response:
    job = await get_services().supervisor.cancel(parse_job_id(job_id),
                                                 cancelled_by=caller_name())
    if job["status"] != Status.CANCELLED and Status(job["status"]).is_terminal:
        # It ended by itself while the cancel was on its way (its final write had
        # committed, its task had not yet let go): the cancel changed nothing.
        raise JobAlreadyFinished(job)
    status = 200 if Status(job["status"]).is_terminal else 202
    return json_response(job, status)


@blueprint.get("/healthz")
@route_rules(RouteAccess.PUBLIC)
async def healthz() -> Response:
    return json_response({"status": "alive"})


@blueprint.get("/readyz")
@route_rules(RouteAccess.PUBLIC)
async def readyz() -> Response:
    services = get_services()
    if services.supervisor.draining:
        return json_response({"status": "draining"}, 503, {"Retry-After": "5"})
    if not await services.db.ping():
        return json_response({"status": "database unreachable"}, 503, {"Retry-After": "5"})
    return json_response({"status": "ready", **services.supervisor.counts})
