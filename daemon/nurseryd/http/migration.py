"""``/migration``: upload a workbook to import, watch the import, list its rejected rows.

The handler only receives the file (streamed to the state dir under a random
name), checks it is an .xlsx at all, and records the job; all parsing happens
in the job, in a child process. The stored file outlives the request (a
restarted daemon resumes from it) and is deleted when the job ends.
"""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, Response, request

from ..db import rejects as rejectsdb
from ..kinds.migrate.job import ExcelImportParams
from ..kinds.migrate.targets import configured_targets, migration_settings
from ..kinds.migrate.uploads_dir import new_upload_paths
from ..kinds.migrate.xlsx_checks import UploadRejected, sniff_upload
from ..supervisor import JobNotFound
from .access import caller_is_admin, caller_name, route_rules
from .access_policy import MULTIPART
from .context import get_services
from .jobs import json_response, parse_job_id
from .problems import Problem
from .query import int_arg
from .uploads import discard, receive_upload

blueprint = Blueprint("migration", __name__)

MAX_REJECTS_PAGE = 1000
DEFAULT_REJECTS_PAGE = 100


def migration_job_json(job: dict[str, Any]) -> dict[str, Any]:
    params = job.get("params") or {}
    return {**job, "source_type": params.get("source_type"),
            "rejects": f"/jobs/{job['id']}/rejects"}


@blueprint.post("/migration/excel")
@route_rules(body_type=MULTIPART)
async def upload_excel() -> Response:
    services = get_services()
    settings = migration_settings(services.settings)
    targets = configured_targets(services.settings)
    part_path, final_path = new_upload_paths(services.settings.state_dir)
    upload = await receive_upload(part_path, max_bytes=settings.max_upload_bytes,
                                  text_fields=frozenset({"target", "sheet"}))
    try:
        if not upload.has_file:
            raise Problem(422, "no workbook in the request: send it in form field 'file' "
                          "(curl -F file=@chats.xlsx ...)", field="file")
        target = upload.fields.get("target") or settings.default_target
        if target not in targets:
            raise Problem(422, f"unknown target {target!r}; configured targets: "
                          f"{', '.join(sorted(targets))}", field="target")
        sheet = upload.fields.get("sheet") or None
        try:
            await trio.to_thread.run_sync(sniff_upload, part_path, settings.caps.max_entries)
        except UploadRejected as error:
            raise Problem(error.status, error.detail, field="file", received=error.received,
                          filename=upload.filename) from None
        await trio.to_thread.run_sync(part_path.rename, final_path)
        params = ExcelImportParams.parse({
            "upload": final_path.name, "target": target, "sheet": sheet,
            "filename": upload.filename, "bytes": upload.size})
        job = await services.supervisor.submit("migration", params.to_json(),
                                               submitted_by=caller_name())
    except BaseException:
        discard(part_path, final_path)
        raise
    return json_response(migration_job_json(job), 202,
                         {"Location": f"/migration/jobs/{job['id']}"})


async def _migration_job(raw_id: str) -> dict[str, Any]:
    number = parse_job_id(raw_id)
    job = await get_services().supervisor.get_job(number)
    if job is None:
        raise JobNotFound(number)
    if job["kind"] != "migration":
        raise Problem(404, f"job {number} is a {job['kind']} job, not a migration; see "
                      f"/jobs/{number}")
    return job


@blueprint.get("/migration/jobs/<job_id>")
async def get_migration_job(job_id: str) -> Response:
    return json_response(migration_job_json(await _migration_job(job_id)))


@blueprint.get("/jobs/<job_id>/rejects")
async def list_rejects(job_id: str) -> Response:
    """Rejected rows by row number, keyset-paginated (``after`` = last row number seen).

    The raw values of a rejected row are customer data (names, e-mails, phones), so
    only an admin caller sees them; a read token gets row, column and reason, and
    ``values`` is ``null`` with ``values_hidden: true``.
    """
    job = await _migration_job(job_id)
    unknown = sorted(set(request.args) - {"limit", "after"})
    if unknown:
        raise Problem(422, f"unknown query parameter {unknown[0]!r}; allowed: limit, after",
                      field=unknown[0])
    limit = int_arg("limit", DEFAULT_REJECTS_PAGE, 1, MAX_REJECTS_PAGE)
    after = int_arg("after", 0, 0, 2**63 - 1)
    rows = await rejectsdb.page(get_services().db, job["id"], after, limit)
    show_values = caller_is_admin()
    rejects = [{"row": row["row_number"], "column": row["column_name"],
                "reason": row["reason"], "values": row["raw"] if show_values else None}
               for row in rows]
    next_url = None
    if len(rejects) == limit:
        next_url = f"/jobs/{job['id']}/rejects?after={rejects[-1]['row']}&limit={limit}"
    cap = migration_settings(get_services().settings).max_stored_rejects
    return json_response({"job_id": job["id"], "status": job["status"], "failed": job["failed"],
                          "not_stored": max((job["failed"] or 0) - cap, 0),
                          "rejects": rejects, "next": next_url,
                          **({} if show_values else {"values_hidden": True})})
