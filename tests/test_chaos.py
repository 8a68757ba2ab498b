"""Chaos: PostgreSQL restarted under a running daemon (a real subprocess).

The server is stopped the way an administrator's restart or a failover stops it
(``pg_ctl stop -m fast``: every session terminated), kept down for a few
seconds, and started again on the same socket, while a job runs. The promise:
the job completes (its transient failures requeue it, it resumes from its
checkpoint), nothing is left ``running``, and the daemon stays up throughout.

Each scenario has a server of its own, so restarting it disturbs no other test.
Bounded: each waits at most a minute for the job to finish.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from nurseryd.db import open_database
from tests import xlsx_factory as xf
from tests.conftest import pg_traversable_dir
from tests.daemon_process import DaemonProcess
from tests.pgtools import PgServer, start_test_server
from tests.polling import eventually

#: How long the database is away: longer than a pool's connect attempt, shorter
#: than the final write's patience (120 s).
OUTAGE_S = 3.0
ROWS = 4000


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PgServer]:
    """A PostgreSQL server for this test alone (one it can restart)."""
    monkeypatch.delenv("NURSERYD_TEST_DATABASE_URL", raising=False)
    directory = pg_traversable_dir("nurseryd-chaos-pg-")
    server = start_test_server(directory)
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


async def restart(server: PgServer) -> None:
    """Stop the server as a restart does, keep it down OUTAGE_S, start it again."""
    await trio.to_thread.run_sync(server.stop, "fast")
    await trio.sleep(OUTAGE_S)  # the outage itself: what the daemon must live through
    await trio.to_thread.run_sync(server.start)


@asynccontextmanager
async def daemon_on(server: PgServer, state_dir: Path, **env: str) -> AsyncIterator[DaemonProcess]:
    server.create_database("chaos")
    environment = {"NURSERYD_DATABASE_URL": server.url("chaos"),
                   "NURSERYD_STATE_DIR": str(state_dir), **env}
    async with DaemonProcess.start(environment) as daemon:
        try:
            yield daemon
        except BaseException:
            print(daemon.log_text())  # shown by pytest for a failing test
            raise


async def until_finished(client, path: str) -> dict:  # noqa: ANN001 - an httpx client
    async def finished() -> dict | None:
        try:
            response = await client.get(path)
        except OSError:
            return None
        job = response.json() if response.status_code == 200 else None
        return job if job and job["status"] not in ("queued", "running") else None

    return await eventually(finished, timeout=60, interval=0.1)


async def restart_mid_job(server: PgServer, client, path: str,  # noqa: ANN001 - httpx
                          reached: Callable[[dict], bool]) -> dict:
    """Once the job at ``path`` has ``reached`` a point mid-way, restart the server;
    returns the job as it ended."""

    async def mid_way() -> bool:
        return reached((await client.get(path)).json())

    await eventually(mid_way, timeout=30, interval=0.005)
    await restart(server)
    return await until_finished(client, path)


async def assert_still_serving(daemon: DaemonProcess, client) -> None:  # noqa: ANN001
    assert daemon.process.returncode is None
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200


async def nothing_running(server: PgServer) -> int:
    async with open_database(server.url("chaos"), min_size=1, max_size=1) as db:
        return await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'running'")


async def test_postgres_restarted_mid_job(own_server: PgServer, state_dir: Path,
                                          aio_loop: object) -> None:
    async with daemon_on(own_server, state_dir) as daemon, daemon.client() as client:
        job = (await client.post("/jobs/sleep", json={"seconds": 6})).json()
        done = await restart_mid_job(
            own_server, client, f"/jobs/{job['id']}",
            lambda job: job["status"] == "running" and job["processed"] >= 2)
        assert done["status"] == "completed", done
        assert done["result"] == {"slept_s": 6} and done["processed"] == 6
        assert done["attempts"] >= 2  # the outage cost it an attempt, resumed from a checkpoint
        await assert_still_serving(daemon, client)
    assert await nothing_running(own_server) == 0


async def test_postgres_restarted_mid_import(own_server: PgServer, state_dir: Path,
                                             tmp_path: Path, aio_loop: object) -> None:
    workbook = xf.write_xlsxwriter(tmp_path / "chaos.xlsx",
                                   [xf.chat_row(i) for i in range(1, ROWS + 1)])
    config = tmp_path / "nurseryd.toml"
    # Small batches: the import is many transactions long, so the restart lands mid-way.
    config.write_text("[migration]\nbatch_rows = 25\nreader = \"openpyxl\"\n")
    async with daemon_on(own_server, state_dir, NURSERYD_CONFIG=str(config)) as daemon, \
            daemon.client() as client:
        response = await client.post("/migration/excel",
                                     files={"file": ("chaos.xlsx", workbook.read_bytes())})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        upload = state_dir / "uploads" / response.json()["params"]["upload"]
        done = await restart_mid_job(
            own_server, client, f"/migration/jobs/{job_id}",
            lambda job: job["status"] == "running" and job["processed"] >= 200)
        assert done["status"] == "completed", done
        assert (done["total"], done["processed"], done["failed"]) == (ROWS, ROWS, 0)
        await assert_still_serving(daemon, client)
    assert not upload.exists()  # kept through the outage, removed once completed
    async with open_database(own_server.url("chaos"), min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT count(*) FROM chats") == ROWS
        assert await db.fetchval("SELECT count(DISTINCT chat_id) FROM chats") == ROWS
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'running'") == 0
