"""The job API end to end: real HTTP on a real socket, real PostgreSQL, the whole
daemon (supervisor + hypercorn) running in the test's Trio run."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
import trio

from nurseryd.config import KindLimits
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.polling import eventually


@pytest.fixture
async def daemon(database_url: str, state_dir: Path):
    async with run_daemon(make_settings(database_url, state_dir)) as running:
        yield running


async def test_the_job_outlives_its_request_and_client(daemon: InProcessDaemon) -> None:
    """The seed's bug: the handler's request ends (here: the client hangs up
    without even reading the response) and the job must still complete."""
    host, port = daemon.base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    body = json.dumps({"seconds": 0.3}).encode()
    await stream.send_all(
        b"POST /jobs/sleep HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    head = await stream.receive_some(4096)
    await stream.aclose()  # the client is gone; its request scope is over
    assert head.startswith(b"HTTP/1.1 202")
    job_id = int(head.lower().split(b"location: /jobs/")[1].split(b"\r\n")[0])
    job = await daemon.wait_for_status(job_id, "completed", "failed", "cancelled")
    assert job["status"] == "completed"
    assert job["result"] == {"slept_s": 0.3}


async def test_trigger_returns_202_with_location_and_the_job(daemon: InProcessDaemon) -> None:
    response = await daemon.client.post("/jobs/sleep", json={"seconds": 0})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["kind"] == "sleep" and job["params"] == {"seconds": 0}
    assert job["status"] == "queued" and job["attempts"] == 0
    done = await daemon.wait_for_status(job["id"], "completed")
    assert done["attempts"] == 1 and done["finished_at"] >= done["started_at"]


async def test_cancel_running_job_inside_long_sql_query(daemon: InProcessDaemon) -> None:
    job = (await daemon.client.post("/jobs/sql_sleep", json={"seconds": 60})).json()
    await daemon.wait_for_status(job["id"], "running")
    db = daemon.services.db
    sleeping_queries = (
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
    )
    await eventually(lambda: db.fetchval(sleeping_queries), timeout=5)  # really on the server
    started = trio.current_time()
    response = await daemon.client.post(f"/jobs/{job['id']}/cancel")
    elapsed = trio.current_time() - started
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["cancel_requested_at"] is not None
    assert elapsed < 0.1, f"cancel took {elapsed * 1000:.0f} ms"
    assert await db.fetchval(sleeping_queries) == 0
    assert await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
    ) == 0
    # The pooled connections are healthy: a full pool's worth of queries works.
    async with trio.open_nursery() as nursery:
        for _ in range(db.pool.get_max_size()):
            nursery.start_soon(db.fetchval, "SELECT 1")


async def test_timeout_ends_as_timed_out_with_the_limit(daemon: InProcessDaemon) -> None:
    job = (await daemon.client.post("/jobs/sleep?timeout_s=0.2", json={"seconds": 30})).json()
    assert job["timeout_s"] == 0.2
    done = await daemon.wait_for_status(job["id"], "timed_out", "completed", "cancelled")
    assert done["status"] == "timed_out"
    assert "0.2 s" in done["error"]


async def test_timeout_in_body_is_bounded_by_the_kind_maximum(daemon: InProcessDaemon) -> None:
    response = await daemon.client.post("/jobs/sleep", json={"seconds": 1, "timeout_s": 1e9})
    assert response.status_code == 422
    assert response.json()["field"] == "timeout_s"
    assert "at most" in response.json()["detail"]


async def test_cancel_a_queued_job_before_it_runs(database_url: str, state_dir: Path) -> None:
    settings = make_settings(database_url, state_dir)
    settings = dataclasses.replace(
        settings, kinds={**settings.kinds, "sleep": KindLimits(60, 60, concurrency=1)}
    )
    async with run_daemon(settings) as daemon:
        first = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        second = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        await daemon.wait_for_status(first["id"], "running")
        response = await daemon.client.post(f"/jobs/{second['id']}/cancel")
        assert response.status_code == 200
        cancelled = response.json()
        assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
        assert cancelled["attempts"] == 0
        assert (await daemon.client.get(f"/jobs/{first['id']}")).json()["status"] == "running"


async def test_queue_full_is_503_and_records_nothing(database_url: str, state_dir: Path) -> None:
    settings = make_settings(database_url, state_dir, queue_size=2)
    settings = dataclasses.replace(
        settings, kinds={**settings.kinds, "sleep": KindLimits(60, 60, concurrency=1)}
    )
    async with run_daemon(settings) as daemon:
        running = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        await daemon.wait_for_status(running["id"], "running")
        for _ in range(2):  # these two wait for the one worker slot
            assert (await daemon.client.post("/jobs/sleep", json={"seconds": 1})).status_code == 202
        refused = await daemon.client.post("/jobs/sleep", json={"seconds": 1})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        assert "waiting" in refused.json()["detail"]
        assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 3


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("post", "/jobs/sleep", b"{not json", 400, "not valid JSON"),
        ("post", "/jobs/sleep", b"[1, 2]", 400, "expected a JSON object"),
        ("post", "/jobs/teleport", b"{}", 404, "unknown job kind 'teleport'"),
        ("post", "/jobs/sleep", b'{"seconds": "soon"}', 422, "'seconds'"),
        ("post", "/jobs/sleep", b'{"seconds": 1, "colour": "red"}', 422, "'colour'"),
        ("post", "/jobs/sleep", b"{}", 422, "required"),
        ("get", "/jobs/999999", None, 404, "no job with id 999999"),
        ("get", "/jobs/abc", None, 404, "whole numbers"),
        ("post", "/jobs/999999/cancel", None, 404, "no job with id 999999"),
        ("get", "/jobs?status=done", None, 422, "unknown status 'done'"),
        ("get", "/jobs?limit=0", None, 422, "limit"),
        ("post", "/jobs/sleep", b" " * (1024 * 1024 + 1), 413, "larger than"),
        ("get", "/nowhere", None, 404, "no such endpoint"),
        ("delete", "/jobs/1", None, 405, "not allowed"),
    ],
)
async def test_bad_input_gets_a_problem_json_4xx(
    daemon: InProcessDaemon, method: str, path: str, body: bytes | None, status: int, needle: str
) -> None:
    response = await daemon.client.request(method.upper(), path, content=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert needle in problem["detail"]


async def test_cancel_of_a_finished_job_is_409_with_its_status(daemon: InProcessDaemon) -> None:
    job = (await daemon.client.post("/jobs/noop", json={})).json()
    await daemon.wait_for_status(job["id"], "completed")
    response = await daemon.client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["job"]["status"] == "completed"
    assert "completed" in response.json()["detail"]


async def test_list_filters_newest_first_and_paginates(daemon: InProcessDaemon) -> None:
    ids = []
    for _ in range(5):
        ids.append((await daemon.client.post("/jobs/noop", json={})).json()["id"])
    sleeper = (await daemon.client.post("/jobs/sleep", json={"seconds": 0})).json()["id"]
    for job_id in ids:
        await daemon.wait_for_status(job_id, "completed")
    page = (await daemon.client.get("/jobs?kind=noop&limit=3")).json()
    assert [job["id"] for job in page["jobs"]] == sorted(ids, reverse=True)[:3]
    rest = (await daemon.client.get(page["next"])).json()
    assert [job["id"] for job in rest["jobs"]] == sorted(ids, reverse=True)[3:]
    assert rest["next"] is None
    by_status = (await daemon.client.get("/jobs?status=completed&kind=noop")).json()
    assert {job["id"] for job in by_status["jobs"]} == set(ids)
    assert sleeper not in {job["id"] for job in by_status["jobs"]}


async def test_list_since_keeps_the_newer_jobs_and_pages_with_it(
        daemon: InProcessDaemon) -> None:
    ids = [(await daemon.client.post("/jobs/noop", json={})).json()["id"] for _ in range(4)]
    for job_id in ids:
        await daemon.wait_for_status(job_id, "completed")
    old = ids[:2]
    await daemon.services.db.execute(
        "UPDATE jobs SET created_at = now() - interval '2 hours' WHERE id = ANY($1)", old)
    an_hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    page = (await daemon.client.get("/jobs", params={"since": an_hour_ago,
                                                     "limit": 1})).json()
    assert [job["id"] for job in page["jobs"]] == [ids[3]]
    assert "since=" in page["next"]  # the next page keeps the window
    rest = (await daemon.client.get(page["next"])).json()
    assert [job["id"] for job in rest["jobs"]] == [ids[2]]
    # An offset other than UTC names the same instant.
    local = (dt.datetime.now(dt.timezone(dt.timedelta(hours=5))) - dt.timedelta(hours=1))
    same = (await daemon.client.get("/jobs", params={"since": local.isoformat(),
                                                     "kind": "noop"})).json()
    assert [job["id"] for job in same["jobs"]] == [ids[3], ids[2]]
    everything = (await daemon.client.get("/jobs", params={"since": "2000-01-01T00:00:00Z"}))
    assert {job["id"] for job in everything.json()["jobs"]} == set(ids)


@pytest.mark.parametrize(("since", "needle"), [
    ("yesterday", "ISO 8601"),
    ("2026-12-03T10:00:00", "UTC offset"),
    ("2026-13-40T10:00:00Z", "ISO 8601"),
    ("0001-01-01T00:00:00+01:00", "outside the years"),  # no UTC instant: once a 500
])
async def test_a_bad_since_is_a_422_problem(daemon: InProcessDaemon, since: str,
                                            needle: str) -> None:
    response = await daemon.client.get("/jobs", params={"since": since})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "since" and needle in response.json()["detail"]


async def test_readyz_is_503_while_draining_and_triggers_are_refused(
    database_url: str, state_dir: Path
) -> None:
    settings = make_settings(database_url, state_dir, shutdown_grace=30)
    async with run_daemon(settings) as daemon:
        assert (await daemon.client.get("/readyz")).status_code == 200
        job = (await daemon.client.post("/jobs/sleep", json={"seconds": 30})).json()
        await daemon.wait_for_status(job["id"], "running")
        daemon.supervisor.request_stop()  # as SIGTERM does; the job holds the grace open
        ready = await daemon.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = await daemon.client.post("/jobs/sleep", json={"seconds": 1})
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["detail"]
        # Status requests are still answered during the drain.
        assert (await daemon.client.get(f"/jobs/{job['id']}")).json()["status"] == "running"
    # The drain (ended early by the fixture's second stop) put the job back in the queue.
    assert (await _job_row(database_url, job["id"]))["status"] == "queued"


async def _job_row(database_url: str, job_id: int) -> dict:
    import asyncpg
    import trio_asyncio

    async with trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(database_url)
        try:
            row = await trio_asyncio.aio_as_trio(conn.fetchrow)(
                "SELECT status, attempts FROM jobs WHERE id = $1", job_id)
        finally:
            await trio_asyncio.aio_as_trio(conn.close)()
    return dict(row)


async def test_json_body_cap_holds_for_chunked_bodies_too(daemon: InProcessDaemon) -> None:
    """No Content-Length: the cap is counted while reading, not trusted from a header."""

    async def chunks():
        for _ in range(64):
            yield b" " * 65536  # 4 MiB in all, never announced

    response = await daemon.client.post("/jobs/sleep", content=chunks())
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_concurrent_triggers_share_insert_round_trips(daemon: InProcessDaemon) -> None:
    """Trap (c): a statement through the trio-asyncio bridge costs ~4x plain asyncio,
    so 200 simultaneous triggers must not cost 200 INSERT round trips."""
    inserts = daemon.supervisor.inserts
    before_flushes, before_items = inserts.flushes, inserts.items_flushed
    statuses: list[int] = []

    async def trigger() -> None:
        statuses.append((await daemon.client.post("/jobs/noop", json={})).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(trigger)
    assert statuses == [202] * 200
    assert inserts.items_flushed - before_items == 200
    assert inserts.flushes - before_flushes < 100, inserts.flushes - before_flushes
    assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 200
