"""The command-line client as a user runs it: a subprocess against a running daemon.

Exit statuses are the contract scripts rely on: 0 completed (or accepted), 1
failed, 3 cancelled or timed out, 2 a usage or connection error with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from nurseryd.console import render
from nurseryd.console.client import ClientError
from nurseryd.console.commands import parse_params
from tests import xlsx_factory as xf
from tests.daemon_process import DaemonProcess


@pytest.fixture
async def daemon(database_url: str, state_dir: Path) -> AsyncIterator[DaemonProcess]:
    env = {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir)}
    async with DaemonProcess.start(env) as running:
        yield running


async def cli(daemon: DaemonProcess | None, *args: str, url: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    env = {"NURSERYD_URL": url or (daemon.base_url if daemon else "")}
    result = await trio.run_process(
        [sys.executable, "-m", "nurseryd.cli", *args], capture_stdout=True,
        capture_stderr=True, check=False, env={**os.environ, **env})
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


async def test_submit_and_wait_ends_with_the_jobs_status(daemon: DaemonProcess) -> None:
    done = await cli(daemon, "submit", "sleep", "seconds=1", "--wait")
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("job ") and "sleep completed" in last

    timed_out = await cli(daemon, "submit", "sleep", "seconds=30", "--timeout", "0.5", "--wait")
    assert timed_out.returncode == 3, timed_out.stderr
    assert "timed_out" in timed_out.stdout and "time limit" in timed_out.stdout


async def test_watch_json_streams_one_object_per_update_until_the_end(
    daemon: DaemonProcess,
) -> None:
    accepted = await cli(daemon, "submit", "sleep", "seconds=2", "--json")
    job = json.loads(accepted.stdout)
    watched = await cli(daemon, "watch", str(job["id"]), "--json")
    assert watched.returncode == 0, watched.stderr
    updates = [json.loads(line) for line in watched.stdout.splitlines()]
    assert updates[-1]["status"] == "completed" and updates[-1]["processed"] == 2
    assert all(update["id"] == job["id"] for update in updates)


async def test_cancel_then_watch_exits_3(daemon: DaemonProcess) -> None:
    job = json.loads((await cli(daemon, "submit", "sleep", "seconds=60", "--json")).stdout)
    cancelled = await cli(daemon, "cancel", str(job["id"]))
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    watched = await cli(daemon, "watch", str(job["id"]))
    assert watched.returncode == 3
    shown = json.loads((await cli(daemon, "show", str(job["id"]), "--json")).stdout)
    assert shown["status"] == "cancelled"


async def test_import_a_workbook_and_read_its_rejects_as_csv(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    rows = [xf.chat_row(i) for i in range(1, 51)]
    rows[9][12] = "not a bool"  # one reject, on sheet row 11
    workbook = xf.write_xlsxwriter(tmp_path / "chats.xlsx", rows)
    imported = await cli(daemon, "import", str(workbook), "--wait")
    assert imported.returncode == 0, imported.stderr
    assert "completed: 50/50 (1 failed)" in imported.stdout
    job_id = imported.stdout.strip().splitlines()[-1].split()[1]
    csv_text = (await cli(daemon, "rejects", job_id, "--csv")).stdout
    header, first, *rest = csv_text.strip().splitlines()
    assert header == "row,column,reason,values" and first.startswith("11,") and not rest
    listing = await cli(daemon, "jobs", "--kind", "migration")
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split() == ["ID", "KIND", "STATUS", "PROGRESS",
                                                      "ATTEMPTS", "CREATED"]
    assert listing.stdout.splitlines()[1].split()[:3] == [job_id, "migration", "completed"]


async def test_errors_are_one_line_and_exit_2(daemon: DaemonProcess) -> None:
    unknown = await cli(daemon, "submit", "no_such_kind")
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1 and unknown.stderr.startswith("nurseryd: ")
    assert "no_such_kind" in unknown.stderr
    bad_param = await cli(daemon, "submit", "sleep", "seconds=-1")
    assert bad_param.returncode == 2 and "seconds" in bad_param.stderr
    missing = await cli(daemon, "show", "999999")
    assert missing.returncode == 2 and "999999" in missing.stderr


async def test_an_unreachable_daemon_is_one_line_and_exit_2() -> None:
    gone = await cli(None, "jobs", url="http://127.0.0.1:1")
    assert gone.returncode == 2
    assert gone.stderr.startswith("nurseryd: cannot reach nurseryd at http://127.0.0.1:1")
    assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr


# -- the pure parts ----------------------------------------------------------------------------


def test_params_parse_as_json_where_they_can() -> None:
    assert parse_params(["seconds=5", "name=x", "flag=true", "list=[1,2]", "empty="]) == \
        {"seconds": 5, "name": "x", "flag": True, "list": [1, 2], "empty": ""}
    with pytest.raises(ClientError, match="expected key=value"):
        parse_params(["seconds"])


@pytest.mark.parametrize(("status", "code"), [("completed", 0), ("failed", 1),
                                              ("cancelled", 3), ("timed_out", 3)])
def test_exit_status_of_an_ending(status: str, code: int) -> None:
    assert render.exit_status({"status": status}) == code


def test_progress_line_shows_share_rate_and_eta() -> None:
    line = render.progress_line({"id": 7, "kind": "migration", "status": "running",
                                 "total": 200, "processed": 90, "failed": 10, "rate": 50.0,
                                 "eta_s": 2.0}, width=10)
    assert line == "job 7 migration running [#####.....]  50% 100/200 (10 failed) 50/s eta 2 s"
    unknown_total = render.progress_line({"id": 1, "kind": "sleep", "status": "queued",
                                          "total": None, "processed": 0}, width=4)
    assert unknown_total == "job 1 sleep queued [    ]     0"


async def test_import_db_retry_show_and_log(database_url: str, state_dir: Path,
                                            tmp_path: Path) -> None:
    from tests.source_dbs import make_sqlite_source

    source = make_sqlite_source(tmp_path / "legacy.db", 300)
    config = tmp_path / "nurseryd.toml"
    config.write_text(f'[sources.legacy]\nurl = "sqlite:///{source}"\ntable = "chats"\n'
                      'key = ["chat_id"]\nbatch_rows = 100\n')
    env = {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir)}
    async with DaemonProcess.start(env, args=["--config", str(config)]) as daemon:
        imported = await cli(daemon, "import-db", "legacy", "--wait")
        assert imported.returncode == 0, imported.stderr
        assert "completed: 300/300" in imported.stdout
        unknown = await cli(daemon, "import-db", "nope")
        assert unknown.returncode == 2 and "nope" in unknown.stderr

        job = json.loads((await cli(daemon, "submit", "sleep", "seconds=60", "--json")).stdout)
        assert (await cli(daemon, "cancel", str(job["id"]))).returncode == 0
        retried = await cli(daemon, "retry", str(job["id"]))
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.strip() == f"job {job['id']} queued again"
        again = await cli(daemon, "retry", str(job["id"]))
        assert again.returncode == 2 and "cannot be retried" in again.stderr
        shown = await cli(daemon, "show", str(job["id"]))
        assert shown.returncode == 0 and "sleep" in shown.stdout
        await cli(daemon, "cancel", str(job["id"]))

        log = await cli(daemon, "log", str(job["id"]))
        assert log.returncode == 0, log.stderr
        messages = [line.split(None, 3)[-1] for line in log.stdout.splitlines()]
        assert messages[0].startswith("recorded: sleep")
        assert any(message.startswith("queued again by request") for message in messages)
        as_json = json.loads((await cli(daemon, "log", str(job["id"]), "--json")).stdout)
        assert [line["event"] for line in as_json["lines"]][:2] == ["created", "started"]
