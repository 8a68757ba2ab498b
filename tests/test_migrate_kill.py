"""Kill and restart the real daemon mid-import: every row lands exactly once and
the counters are exact (SIGKILL: resume from the last committed batch; SIGTERM
with no grace: the job is requeued and resumes)."""

from __future__ import annotations

import signal
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests import xlsx_factory as xf
from tests.daemon_process import DaemonProcess
from tests.polling import eventually

ROWS = 4000


@asynccontextmanager
async def _log_on_failure(daemon: DaemonProcess) -> AsyncIterator[None]:
    try:
        yield
    except BaseException:
        print(daemon.log_text())  # shown by pytest for a failing test
        raise


def _env(database_url: str, state_dir: Path, config: Path, **extra: str) -> dict[str, str]:
    return {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir),
            "NURSERYD_CONFIG": str(config), "NURSERYD_SHUTDOWN_GRACE": "0", **extra}


def _workbook(tmp_path: Path) -> Path:
    rows = [xf.chat_row(i) for i in range(1, ROWS + 1)]
    rows[50][12] = "bad bool"  # a reject before the kill
    rows[ROWS - 50][12] = "bad bool"  # and one after it
    return xf.write_xlsxwriter(tmp_path / "kill.xlsx", rows)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "nurseryd.toml"
    # Small batches so the import is many transactions long and a kill lands mid-way.
    path.write_text("[migration]\nbatch_rows = 25\nreader = \"openpyxl\"\n")
    return path


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_kill_mid_import_then_restart_gives_exact_rows_and_counts(
        database_url: str, state_dir: Path, tmp_path: Path, how: str, aio_loop: object,
) -> None:
    workbook = _workbook(tmp_path)
    env = _env(database_url, state_dir, _config(tmp_path))
    async with DaemonProcess.start(env) as daemon, daemon.client() as client, \
            _log_on_failure(daemon):
        response = await client.post("/migration/excel",
                                     files={"file": ("kill.xlsx", workbook.read_bytes())})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        async def mid_way() -> dict | None:
            job = (await client.get(f"/migration/jobs/{job_id}")).json()
            return job if 200 <= job["processed"] else None

        seen = await eventually(mid_way, timeout=30, interval=0.002)
        assert seen["status"] == "running" and seen["processed"] < ROWS - 100
        if how == "SIGKILL":
            daemon.kill()
        else:
            daemon.send_signal(signal.SIGTERM)
        await daemon.wait()
    upload = state_dir / "uploads" / response.json()["params"]["upload"]
    assert upload.exists()  # kept: the job needs it to resume

    from nurseryd.db import open_database

    async with open_database(database_url, min_size=1, max_size=1) as db:
        # The stored checkpoint is exactly the committed data: after SIGKILL the
        # batch transaction wrote it; after SIGTERM the supervisor rewrote it from
        # its copy, which the pipeline synced as it stopped.
        job = await db.fetchrow("SELECT status, checkpoint FROM jobs WHERE id = $1", job_id)
        assert job["status"] in ("queued", "running")  # requeued, or left running by SIGKILL
        rows_in_table = await db.fetchval("SELECT count(*) FROM chats")
        assert 200 <= rows_in_table == job["checkpoint"]["processed"] < ROWS

    async with DaemonProcess.start(env) as again, again.client() as client, \
            _log_on_failure(again):
        async def done() -> dict | None:
            job = (await client.get(f"/migration/jobs/{job_id}")).json()
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        job = await eventually(done, timeout=60, interval=0.05)
        assert job["status"] == "completed", job
        assert (job["total"], job["processed"], job["failed"]) == (ROWS, ROWS - 2, 2)
        assert job["attempts"] == 2
        rejects = (await client.get(f"/jobs/{job_id}/rejects")).json()["rejects"]
        assert [r["row"] for r in rejects] == [52, ROWS - 48]
    assert not upload.exists()  # deleted once the job completed

    async with open_database(database_url, min_size=1, max_size=1) as db:
        assert await db.fetchval("SELECT count(*) FROM chats") == ROWS - 2
        assert await db.fetchval("SELECT count(DISTINCT chat_id) FROM chats") == ROWS - 2
        # Content, not only counts: a row from before and one from after the kill.
        assert await db.fetchval("SELECT external_id FROM chats WHERE chat_id = 100010") \
            == "CH-000010"
        assert await db.fetchval("SELECT message_count FROM chats WHERE chat_id = $1",
                                 100000 + ROWS) == 1 + ROWS % 40


async def test_daemon_refuses_to_start_when_a_target_table_does_not_match(
        database_url: str, state_dir: Path, tmp_path: Path, aio_loop: object) -> None:
    from nurseryd.db import open_database

    async with open_database(database_url, min_size=1, max_size=1) as db:
        await db.execute("CREATE TABLE chats (chat_id text PRIMARY KEY)")
    env = _env(database_url, state_dir, _config(tmp_path))
    try:
        async with DaemonProcess.start(env):
            pytest.fail("the daemon started on a mismatching table")
    except (RuntimeError, BaseExceptionGroup) as error:  # the harness's nursery may wrap it
        text = "".join(traceback.format_exception(error))
    assert "exited with 1 before listening" in text
    assert "nurseryd: cannot start: table public.chats does not match target 'chats'" in text
    log = text.split("before listening:", 1)[1]
    assert "Traceback" not in log  # one clear line for the operator, not a stack
    assert "column chat_id is text, the target says bigint" in text
