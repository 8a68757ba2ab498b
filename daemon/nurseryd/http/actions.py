"""Operator actions on jobs: retry one, and cancel or retry every job matching a filter.

The bulk routes take the filters of ``GET /jobs`` (``kind``, ``status``) and act
on each matching job through the same supervisor calls as the one-job routes,
so a bulk action follows the lifecycle exactly as single ones do. At least one
filter is required: "everything" is never the accident of a missing parameter.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from ..errors import Draining, JobAlreadyFinished, JobNotFound, JobNotRetryable, QueueFull
from ..lifecycle import ACTIVE, Event, Status, statuses_allowing
from .context import get_services
from .jobs import json_response, parse_job_id
from .problems import Problem

blueprint = Blueprint("actions", __name__)

#: Jobs one bulk request acts on at most (the newest first); ``more`` says if others matched.
MAX_BULK = 10_000
#: Skipped jobs listed in a bulk answer at most.
MAX_SKIPPED_LISTED = 50
_PAGE = 500


def _bulk_filter(default: frozenset[Status], action: str) -> tuple[str | None, list[str]]:
    kind = request.args.get("kind") or None
    raw = [value for value in request.args.get("status", "").split(",") if value]
    if kind is None and not raw:
        raise Problem(422, f"name the jobs to {action} with ?kind= and/or ?status= (as for GET "
                      f"/jobs); ?status={','.join(sorted(default))} {action}s every one that "
                      "can be", field="status")
    if kind is not None and get_services().kinds.get(kind) is None:
        raise Problem(422, f"unknown kind {kind!r}", field="kind")
    for status in raw:
        if status not in {each.value for each in default}:
            raise Problem(422, f"status {status!r} cannot be {action}ed; use one or more of "
                          f"{', '.join(sorted(default))}, comma-separated", field="status")
    return kind, raw or sorted(default)


async def _matching(kind: str | None, statuses: list[str]) -> tuple[list[int], bool]:
    """Ids of the matching jobs, newest first, at most MAX_BULK; and whether more matched."""
    supervisor = get_services().supervisor
    ids: list[int] = []
    before = None
    while len(ids) <= MAX_BULK:
        page = await supervisor.list_jobs(kind=kind, statuses=statuses, before_id=before,
                                          limit=_PAGE)
        ids += [job["id"] for job in page]
        if len(page) < _PAGE:
            break
        before = page[-1]["id"]
    return ids[:MAX_BULK], len(ids) > MAX_BULK


def _answer(matched: list[int], more: bool, affected: list[int],
            skipped: list[dict[str, Any]], stopped: str | None) -> Response:
    return json_response({
        "matched": len(matched), "affected": len(affected), "more": more,
        "skipped": len(skipped), "skipped_jobs": skipped[:MAX_SKIPPED_LISTED],
        "stopped": stopped,
    })


@blueprint.post("/jobs/<job_id>/retry")
async def retry_job(job_id: str) -> Response:
    job = await get_services().supervisor.rerun(parse_job_id(job_id))
    return json_response(job, 202, {"Location": f"/jobs/{job['id']}"})


@blueprint.post("/jobs/cancel")
async def cancel_matching() -> Response:
    kind, statuses = _bulk_filter(ACTIVE, "cancel")
    supervisor = get_services().supervisor
    ids, more = await _matching(kind, statuses)
    affected: list[int] = []
    skipped: list[dict[str, Any]] = []
    for job_id in ids:
        try:
            await supervisor.cancel(job_id, wait_s=0)
        except (JobAlreadyFinished, JobNotFound) as error:  # it ended meanwhile
            skipped.append({"id": job_id, "reason": str(error)})
        else:
            affected.append(job_id)
    return _answer(ids, more, affected, skipped, None)


@blueprint.post("/jobs/retry")
async def retry_matching() -> Response:
    kind, statuses = _bulk_filter(statuses_allowing(Event.RERUN), "retry")
    supervisor = get_services().supervisor
    ids, more = await _matching(kind, statuses)
    affected: list[int] = []
    skipped: list[dict[str, Any]] = []
    stopped = None
    # Oldest first: when the queue fills, the jobs that waited longest went first.
    for job_id in reversed(ids):
        try:
            await supervisor.rerun(job_id)
        except (JobNotRetryable, JobNotFound) as error:
            skipped.append({"id": job_id, "reason": str(error)})
        except (QueueFull, Draining) as error:
            stopped = f"{error}; {len(ids) - len(affected) - len(skipped)} job(s) not retried"
            break
        else:
            affected.append(job_id)
    return _answer(ids, more, affected, skipped, stopped)
