"""``/fetch`` end to end: the whole daemon in the test's Trio run (real HTTP,
real PostgreSQL, the real supervisor), fetching from local HTTP servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio

from nurseryd.kinds.fetch import scheduled_tick
from nurseryd.kinds.fetch.config import parse_fetch_section
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.fetch_servers import LocalServer, hang, json_reply, open_local_server

TERMINAL = ("completed", "failed", "cancelled", "timed_out")


def jobs_page(count: int) -> Any:
    return json_reply({"data": {"jobs": [{"id": n, "title": f"Job {n}"} for n in range(count)]}})


def source(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "format": "json", "items": "data.jobs", **extra}


@asynccontextmanager
async def fetch_daemon(database_url: str, state_dir: Path, sources: list[dict[str, Any]],
                       **fetch: Any) -> AsyncIterator[InProcessDaemon]:
    raw = {"backoff_s": 0.01, **fetch, "sources": sources}
    settings = make_settings(database_url, state_dir,
                             sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})
    async with run_daemon(settings) as daemon:
        yield daemon


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    async with open_local_server() as local:
        yield local


async def start_hanging_fetch(daemon: InProcessDaemon, server: LocalServer) -> dict[str, Any]:
    response = await daemon.client.post("/fetch")
    assert response.status_code == 202, response.text
    job = response.json()
    with trio.fail_after(5):
        await server.wait_until(lambda: len(server.requests_to("/hang")) == 1)
    return await daemon.wait_for_status(job["id"], "running")


async def test_post_fetch_runs_a_job_and_get_fetch_reports_it(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    sources = [source("good", server.static("/good", jobs_page(3))),
               source("bad", server.static("/bad", json_reply({"oops": 1})))]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        response = await daemon.client.post("/fetch")
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/jobs/{job['id']}"
        assert job["kind"] == "fetch" and job["params"] == {"trigger": "api"}
        assert job["timeout_s"] == 300
        done = await daemon.wait_for_status(job["id"], *TERMINAL)
        status = (await daemon.client.get("/fetch")).json()
        log_lines = (await daemon.client.get(f"/jobs/{job['id']}/log")).json()["lines"]
    # One source failing does not fail the fetch; the job's log says which did.
    [note] = [line for line in log_lines if line["event"] == "note"]
    assert note["level"] == "warning" and "source bad failed" in note["message"]
    assert "no list of items at 'data.jobs'" in note["message"]
    assert done["status"] == "completed"
    assert (done["total"], done["processed"], done["failed"]) == (3, 3, 0)
    assert done["result"]["sources"]["good"]["new"] == 3
    assert "no list of items at 'data.jobs'" in done["result"]["sources"]["bad"]["error"]
    assert status["job"]["id"] == job["id"] and status["active"] is False
    by_name = {entry["name"]: entry for entry in status["sources"]}
    assert by_name["good"]["last_outcome"] == "ok" and by_name["good"]["last_success_at"]
    assert by_name["bad"]["last_outcome"] == "error" and by_name["bad"]["last_error_at"]
    assert by_name["bad"]["last_success_at"] is None


async def test_every_source_failing_fails_the_job(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    sources = [source("gone", server.static("/gone", json_reply({}, status=404)))]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        job = (await daemon.client.post("/fetch")).json()
        done = await daemon.wait_for_status(job["id"], *TERMINAL)
    assert done["status"] == "failed"
    assert done["error"].startswith("all 1 sources failed: gone: HTTP 404")
    assert done["result"]["sources"]["gone"]["http_status"] == 404


async def test_overlap_is_409_with_the_active_job_and_cancel_stops_it(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    server.route("/hang", hang)
    sources = [source("slow", server.url("/hang"), timeout_s=60),
               source("quick", server.static("/quick", jobs_page(2)))]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        running = await start_hanging_fetch(daemon, server)

        second = await daemon.client.post("/fetch")
        assert second.status_code == 409
        assert second.headers["content-type"] == "application/problem+json"
        assert second.headers["location"] == f"/jobs/{running['id']}"
        assert second.json()["job"]["id"] == running["id"]
        assert "POST /fetch?replace=true" in second.json()["detail"]
        assert (await daemon.client.get("/fetch")).json()["active"] is True

        started = trio.current_time()
        cancelled = await daemon.client.post("/fetch/cancel")
        elapsed = trio.current_time() - started
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert elapsed < 0.1, f"cancel took {elapsed * 1000:.0f} ms"
        result = cancelled.json()["result"]["sources"]
        assert result["slow"]["outcome"] == "interrupted"
        assert result["quick"]["outcome"] == "ok"  # finished before: its items stay
        assert await daemon.services.db.fetchval(
            "SELECT count(*) FROM items WHERE source = 'quick'") == 2
        with trio.fail_after(2):  # the in-flight request was dropped, not left running
            await server.abandoned_event.wait()

        none_left = await daemon.client.post("/fetch/cancel")
        assert none_left.status_code == 404
        assert "start one with POST /fetch" in none_left.json()["detail"]


async def test_replace_cancels_the_active_fetch_and_starts_a_new_one(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    server.route("/hang", hang)
    sources = [source("slow", server.url("/hang"), timeout_s=60)]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        first = await start_hanging_fetch(daemon, server)
        response = await daemon.client.post("/fetch?replace=true")
        assert response.status_code == 202, response.text
        replacement = response.json()
        assert replacement["id"] != first["id"]
        assert response.headers["location"] == f"/jobs/{replacement['id']}"
        old = (await daemon.client.get(f"/jobs/{first['id']}")).json()
        assert old["status"] == "cancelled"
        await daemon.wait_for_status(replacement["id"], "running")
        await daemon.client.post("/fetch/cancel")


async def test_concurrent_posts_start_exactly_one_fetch(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    server.route("/hang", hang)
    sources = [source("slow", server.url("/hang"), timeout_s=60)]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        statuses: list[int] = []

        async def post() -> None:
            statuses.append((await daemon.client.post("/fetch")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(post)
        assert sorted(statuses) == [202] + [409] * 7
        assert await daemon.services.db.fetchval(
            "SELECT count(*) FROM jobs WHERE kind = 'fetch'") == 1
        await daemon.client.post("/fetch/cancel")


async def test_the_database_itself_refuses_a_second_active_fetch(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    """The rule lives in PostgreSQL, so another daemon on the same database hits it too."""
    sources = [source("s", server.static("/s", jobs_page(1)))]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        db = daemon.services.db
        insert = "INSERT INTO jobs (kind, status, timeout_s) VALUES ('fetch', $1, 1)"
        await db.execute(insert, "running")
        with pytest.raises(asyncpg.UniqueViolationError, match="jobs_one_active_fetch"):
            await db.execute("INSERT INTO jobs (kind, timeout_s) VALUES ('fetch', 1)")
        # Finished fetches do not count.
        await db.execute(insert, "failed")
        response = await daemon.client.post("/fetch")
        assert response.status_code == 409
        await db.execute("UPDATE jobs SET status = 'completed' WHERE kind = 'fetch'")


async def test_whole_fetch_timeout_is_timed_out(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    server.route("/hang", hang)
    sources = [source("slow", server.url("/hang"), timeout_s=60),
               source("quick", server.static("/quick", jobs_page(1)))]
    async with fetch_daemon(database_url, state_dir, sources, timeout_s=0.5) as daemon:
        job = (await daemon.client.post("/fetch")).json()
        assert job["timeout_s"] == 0.5
        done = await daemon.wait_for_status(job["id"], *TERMINAL)
    assert done["status"] == "timed_out"
    assert done["result"]["sources"]["slow"]["outcome"] == "interrupted"
    assert done["result"]["sources"]["quick"]["outcome"] == "ok"


async def test_schedule_runs_at_start_in_the_daemon(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    sources = [source("s", server.static("/s", jobs_page(2)))]
    async with fetch_daemon(database_url, state_dir, sources, interval="1h",
                            run_at_start=True) as daemon:
        with trio.fail_after(5):
            await server.wait_until(lambda: len(server.requests_to("/s")) == 1)
        job_id = await daemon.services.db.fetchval("SELECT id FROM jobs WHERE kind = 'fetch'")
        done = await daemon.wait_for_status(job_id, *TERMINAL)
    assert done["status"] == "completed" and done["params"] == {"trigger": "schedule"}


async def test_bad_requests_are_4xx_problems(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    sources = [source("s", server.static("/s", jobs_page(1)))]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        client = daemon.client
        bad_replace = await client.post("/fetch?replace=maybe")
        assert bad_replace.status_code == 422 and bad_replace.json()["field"] == "replace"
        unknown = await client.post("/fetch?url=http://evil.example/")
        assert unknown.status_code == 422 and "only ?replace=true" in unknown.json()["detail"]
        with_params = await client.post("/fetch", json={"url": "http://evil.example/"})
        assert with_params.status_code == 422
        not_json = await client.post("/fetch", content=b"{nope")
        assert not_json.status_code == 400
        generic = await client.post("/jobs/fetch")
        assert generic.status_code == 404 and "own endpoint" in generic.json()["detail"]
        assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 0


async def test_post_fetch_without_sources_is_409(database_url: str, state_dir: Path) -> None:
    async with fetch_daemon(database_url, state_dir, []) as daemon:
        response = await daemon.client.post("/fetch")
        status = (await daemon.client.get("/fetch")).json()
    assert response.status_code == 409 and "[[fetch.sources]]" in response.json()["detail"]
    assert status == {"job": None, "active": False, "schedule": {"interval_s": None,
                      "run_at_start": False}, "sources": []}


async def test_scheduled_tick_is_skipped_not_queued_while_a_fetch_is_active(
    database_url: str, state_dir: Path, server: LocalServer,
) -> None:
    server.route("/hang", hang)
    sources = [source("slow", server.url("/hang"), timeout_s=60)]
    async with fetch_daemon(database_url, state_dir, sources) as daemon:
        running = await start_hanging_fetch(daemon, server)
        assert await scheduled_tick(daemon.services) is None
        assert await daemon.services.db.fetchval(
            "SELECT count(*) FROM jobs WHERE kind = 'fetch'") == 1
        await daemon.client.post("/fetch/cancel")
        started = await scheduled_tick(daemon.services)
        assert started is not None and started["params"] == {"trigger": "schedule"}
        assert started["id"] != running["id"]
        await daemon.client.post("/fetch/cancel")
