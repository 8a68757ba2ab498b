"""Retrying ended jobs and bulk actions, through the real API and PostgreSQL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests import xlsx_factory as xf
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.polling import eventually
from tests.test_events import open_stream


async def _processed_at_least(daemon: InProcessDaemon, job_id: int, count: int) -> dict:
    async def reached() -> dict | None:
        job = (await daemon.client.get(f"/jobs/{job_id}")).json()
        return job if job["processed"] >= count else None

    return await eventually(reached, timeout=15, interval=0.05)


async def test_a_cancelled_job_retries_from_its_checkpoint(database_url: str,
                                                           state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        await _processed_at_least(daemon, job["id"], 1)
        cancelled = (await daemon.client.post(f"/jobs/{job['id']}/cancel")).json()
        assert cancelled["status"] == "cancelled"
        async with open_stream(daemon.client, f"/events?job={job['id']}") as stream:
            response = await daemon.client.post(f"/jobs/{job['id']}/retry")
            assert response.status_code == 202
            assert response.json()["status"] == "queued"
            assert response.json()["error"] is None and response.json()["finished_at"] is None
            frames = await stream.until(lambda frame: frame.event == "started")
        names = [frame.event for frame in frames]
        # The cancel's own event may still be on its way to the hub when the stream opens.
        assert names[names.index("retried"):] == ["retried", "started"]
        assert set(names[:names.index("retried")]) <= {"finished"}
        again = frames[-1].data
        assert again is not None
        assert again["attempts"] == cancelled["attempts"] + 1
        assert again["processed"] >= cancelled["processed"] >= 1  # resumed, not restarted
        # Running again: not retryable; cancel it for good.
        running = await daemon.client.post(f"/jobs/{job['id']}/retry")
        assert running.status_code == 409
        assert running.headers["content-type"] == "application/problem+json"
        await daemon.client.post(f"/jobs/{job['id']}/cancel")


async def test_only_failed_cancelled_or_timed_out_jobs_retry(database_url: str,
                                                              state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        done = (await daemon.client.post("/jobs/noop", json={})).json()
        await daemon.wait_for_status(done["id"], "completed")
        refused = await daemon.client.post(f"/jobs/{done['id']}/retry")
        assert refused.status_code == 409 and "completed" in refused.json()["detail"]
        assert (await daemon.client.post("/jobs/999/retry")).status_code == 404
        assert (await daemon.client.post("/jobs/x/retry")).status_code == 404
        timed_out = (await daemon.client.post("/jobs/sleep?timeout_s=0.2",
                                              json={"seconds": 5})).json()
        await daemon.wait_for_status(timed_out["id"], "timed_out")
        retried = await daemon.client.post(f"/jobs/{timed_out['id']}/retry")
        assert retried.status_code == 202
        await daemon.wait_for_status(timed_out["id"], "timed_out")  # its timeout holds again


async def test_a_failed_import_whose_upload_is_gone_says_so(database_url: str, state_dir: Path,
                                                            tmp_path: Path) -> None:
    settings = make_settings(database_url, state_dir)
    migration = dataclasses.replace(settings.section("migration"), keep_ended_uploads_s=0)
    settings = dataclasses.replace(settings,
                                   sections={**settings.sections, "migration": migration})
    async with run_daemon(settings) as daemon:
        content = xf.sparse_dimension(tmp_path / "sparse.xlsx").read_bytes()
        job = (await daemon.client.post("/migration/excel",
                                        files={"file": ("sparse.xlsx", content)})).json()
        await daemon.wait_for_status(job["id"], "failed")
        refused = await daemon.client.post(f"/jobs/{job['id']}/retry")
        assert refused.status_code == 409
        assert "upload" in refused.json()["detail"] and "gone" in refused.json()["detail"]
        assert (await daemon.client.get(f"/jobs/{job['id']}")).json()["status"] == "failed"


async def test_bulk_cancel_and_retry_by_filter(database_url: str, state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        ids = [(await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()["id"]
               for _ in range(3)]
        other = (await daemon.client.post("/jobs/sql_sleep", json={"seconds": 30})).json()
        cancelled = await daemon.client.post("/jobs/cancel?kind=sleep")
        assert cancelled.status_code == 200
        assert (cancelled.json()["matched"], cancelled.json()["affected"]) == (3, 3)
        for job_id in ids:
            await daemon.wait_for_status(job_id, "cancelled")
        assert (await daemon.client.get(f"/jobs/{other['id']}")).json()["status"] in (
            "queued", "running")
        retried = await daemon.client.post("/jobs/retry?kind=sleep&status=cancelled")
        assert (retried.json()["matched"], retried.json()["affected"]) == (3, 3)
        for job_id in ids:
            await daemon.wait_for_status(job_id, "queued", "running")
        everything = await daemon.client.post("/jobs/cancel?status=queued,running")
        assert everything.json()["affected"] == 4
        for bad in ("/jobs/cancel", "/jobs/retry", "/jobs/cancel?status=completed",
                    "/jobs/retry?status=running", "/jobs/retry?kind=nope"):
            response = await daemon.client.post(bad)
            assert response.status_code == 422, bad
            assert response.headers["content-type"] == "application/problem+json"


async def test_a_jobs_log_tells_its_attempts_and_how_each_ended(database_url: str,
                                                                state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job = (await daemon.client.post("/jobs/sleep?timeout_s=0.3",
                                        json={"seconds": 5})).json()
        await daemon.wait_for_status(job["id"], "timed_out")
        assert (await daemon.client.post(f"/jobs/{job['id']}/retry")).status_code == 202
        await daemon.wait_for_status(job["id"], "timed_out")

        # Each event commits with its status change: once the status shows, so does its line.
        body = (await daemon.client.get(f"/jobs/{job['id']}/log")).json()
        lines = body["lines"]
        assert [line["event"] for line in lines] == [
            "created", "started", "finished", "retried", "started", "finished"]
        assert lines[1]["message"] == "attempt 1 started"
        assert lines[2]["level"] == "error" and lines[2]["message"].startswith("timed_out")
        assert lines[4]["message"].startswith("attempt 2 started")
        assert body["truncated"] is False
        newest = (await daemon.client.get(f"/jobs/{job['id']}/log?limit=2")).json()
        assert [line["event"] for line in newest["lines"]] == ["started", "finished"]
        assert newest["truncated"] is True
        assert (await daemon.client.get("/jobs/999/log")).status_code == 404
        assert (await daemon.client.get(f"/jobs/{job['id']}/log?limit=0")).status_code == 422


async def test_notes_are_kept_per_job_up_to_their_bound(database_url: str,
                                                         state_dir: Path) -> None:
    from nurseryd.db.notes import MAX_NOTES_PER_JOB, insert_notes
    from nurseryd.store.base import JobNote, now

    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job = (await daemon.client.post("/jobs/noop", json={})).json()
        await daemon.wait_for_status(job["id"], "completed")
        db = daemon.services.db
        notes = [JobNote(job["id"], 1, "info", f"n{index}", now())
                 for index in range(MAX_NOTES_PER_JOB + 20)]
        await insert_notes(db, notes[:MAX_NOTES_PER_JOB - 10])
        await insert_notes(db, notes[MAX_NOTES_PER_JOB - 10:])
        await insert_notes(db, [JobNote(999_999, 1, "info", "of no job", now())])
        assert await db.fetchval("SELECT count(*) FROM job_notes WHERE job_id = $1",
                                 job["id"]) == MAX_NOTES_PER_JOB
        body = (await daemon.client.get(f"/jobs/{job['id']}/log?limit=1000")).json()
        assert [line["event"] for line in body["lines"][:3]] == ["created", "started",
                                                                "finished"]
        assert body["lines"][3]["message"] == "attempt 1: n0"
