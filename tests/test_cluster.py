"""Three real daemons on one PostgreSQL: shared work, a cancel across daemons, a
cluster-wide limit, a SIGKILL mid-import while every daemon is busy, a schedule
that fires once, and one daemon's event stream that shows every job.

One test, in phases, so the three processes start once (side by side, ~5 s).
Every wait is on state (the table, the stream, the API), never a fixed sleep.
The jobs table and its event log (``job_events``, written by a trigger in the
transaction of each status change) are the record the assertions read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from nurseryd.config import ConfigError, load_settings
from nurseryd.db import Database, open_database
from tests import xlsx_factory as xf
from tests.daemon_process import DaemonProcess, start_daemons
from tests.fetch_servers import json_reply, open_local_server
from tests.polling import eventually

ROWS = 4000
INTERVAL_S = 2.0
TERMINAL = ("completed", "failed", "cancelled", "timed_out")


def _config(path: Path, source_url: str) -> Path:
    path.write_text(f"""
[cluster]
shared_queue = true

[kinds.sleep]
concurrency = 3

[kinds.sql_sleep]
cluster_concurrency = 2

[migration]
batch_rows = 25
reader = "openpyxl"

[fetch]
interval = "{INTERVAL_S:g}s"
backoff_s = 0.01

[[fetch.sources]]
name = "s"
url = "{source_url}"
format = "json"
items = "data.jobs"
""")
    return path


def _workbook(tmp_path: Path) -> Path:
    rows = [xf.chat_row(i) for i in range(1, ROWS + 1)]
    rows[50][12] = "bad bool"  # a reject before the kill
    rows[ROWS - 50][12] = "bad bool"  # and one after it
    return xf.write_xlsxwriter(tmp_path / "cluster.xlsx", rows)


def _pid(owner: str | None) -> int | None:
    return None if owner is None else int(owner.split(":")[-2])


class Stream:
    """Every frame of one daemon's ``GET /events``, collected in the background."""

    def __init__(self) -> None:
        self.finished: set[int] = set()
        self.changed = trio.Event()

    async def run(self, client: httpx.AsyncClient,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with client.stream("GET", "/events") as response:
            assert response.status_code == 200
            task_status.started()
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line.partition(":")[2].strip()
                elif line.startswith("data:") and event == "finished":
                    self.finished.add(json.loads(line.partition(":")[2])["id"])
                    self.changed.set()
                    self.changed = trio.Event()


@asynccontextmanager
async def _logs_on_failure(daemons: list[DaemonProcess]) -> AsyncIterator[None]:
    try:
        yield
    except BaseException:
        for index, daemon in enumerate(daemons):
            print(f"---- daemon {'ABC'[index]} (pid {daemon.process.pid}) ----")
            print(daemon.log_text()[-20000:])
        raise


async def _events(conn: Database, job_id: int) -> list[tuple[str | None, str]]:
    rows = await conn.fetch("SELECT from_status, status FROM job_events WHERE job_id = $1"
                            " ORDER BY id", job_id)
    return [(row["from_status"], row["status"]) for row in rows]


def _never_two_at_once(events: list[tuple[str | None, str]]) -> bool:
    """Each start is followed by that attempt's own ending before the next start."""
    running = False
    for _, status in events:
        if status == "running":
            if running:
                return False
            running = True
        else:
            running = False
    return True


async def test_three_daemons_share_work_cancel_across_survive_a_kill_and_fire_once(
    database_url: str, state_dir: Path, tmp_path: Path, aio_loop: object,
) -> None:
    workbook = _workbook(tmp_path)
    async with open_local_server() as server:
        url = server.static("/jobs", json_reply({"data": {"jobs": [{"id": 1, "title": "a"}]}}))
        env = {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir),
               "NURSERYD_CONFIG": str(_config(tmp_path / "nurseryd.toml", url)),
               "NURSERYD_SHUTDOWN_GRACE": "0"}
        async with open_database(database_url, min_size=1, max_size=2) as conn, \
                start_daemons([env, env, env]) as daemons, _logs_on_failure(daemons), \
                trio.open_nursery() as background:
            # A is whichever daemon leads the fetch schedule: it is the one killed, so
            # the takeover of its jobs and of the schedule are both exercised.
            async def leader() -> DaemonProcess | None:
                leading = [daemon for daemon in daemons
                           if "fetch schedule: this daemon leads" in daemon.log_text()]
                assert len(leading) <= 1, "two leaders"
                return leading[0] if leading else None

            a = await eventually(leader, timeout=10)
            b, c = (daemon for daemon in daemons if daemon is not a)
            daemons[:] = [a, b, c]  # named A, B, C in the logs printed on failure
            clients = [daemon.client() for daemon in daemons]
            ca, cb, cc = clients
            stream = Stream()
            await background.start(stream.run, cc)
            pids = {daemon.process.pid: "ABC"[index] for index, daemon in enumerate(daemons)}

            async def owner_of(job_id: int) -> str | None:
                owner = await conn.fetchval("SELECT owner FROM jobs WHERE id = $1", job_id)
                return pids.get(_pid(owner))  # type: ignore[arg-type]

            async def all_ended(ids: list[int]) -> bool:
                ended = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE id = ANY($1::bigint[])"
                    " AND status = ANY($2::text[])", ids, list(TERMINAL))
                return ended == len(ids)

            # 1. Jobs submitted to A alone spread over all three: A has three sleep
            # slots; the other six wait in the table and B and C claim them.
            spread = [(await ca.post("/jobs/sleep", json={"seconds": 1})).json()["id"]
                      for _ in range(9)]
            await eventually(lambda: all_ended(spread), timeout=20)
            ran_on = [await owner_of(job_id) for job_id in spread]
            assert set(ran_on) == {"A", "B", "C"}, ran_on

            # 2. A cancel posted to C stops a job running on A.
            job = (await ca.post("/jobs/sleep", json={"seconds": 60})).json()["id"]
            await eventually(lambda: _status_is(conn, job, "running"), timeout=10)
            assert await owner_of(job) == "A"
            started = trio.current_time()
            answer = await cc.post(f"/jobs/{job}/cancel")
            took = trio.current_time() - started
            assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
            assert took < 1.0, f"a cross-daemon cancel took {took * 1000:.0f} ms"

            # 3. A cluster-wide limit: sql_sleep runs two at a time across the three.
            limited = [(await clients[index % 3].post(
                "/jobs/sql_sleep", json={"seconds": 0.4})).json()["id"] for index in range(6)]
            await eventually(lambda: all_ended(limited), timeout=30)
            rows = await conn.fetch(
                "SELECT job_id, status FROM job_events WHERE job_id = ANY($1::bigint[])"
                " AND from_status IS NOT NULL ORDER BY at, id", limited)
            running, most = 0, 0
            for row in rows:
                running += 1 if row["status"] == "running" else -1
                most = max(most, running)
            assert most == 2, rows  # (on whichever daemons: a freed slot goes to the quickest)

            # 4. Every daemon busy (three 4 s sleeps each), then an import on A,
            # and A is SIGKILLed mid-import.
            busy = [(await ca.post("/jobs/sleep", json={"seconds": 4})).json()["id"]
                    for _ in range(9)]

            async def all_busy() -> bool:
                return await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE id = ANY($1::bigint[])"
                    " AND status = 'running'", busy) == len(busy)

            await eventually(all_busy, timeout=15)
            response = await ca.post("/migration/excel",
                                     files={"file": ("cluster.xlsx", workbook.read_bytes())})
            assert response.status_code == 202, response.text
            migration = response.json()["id"]

            async def mid_way() -> bool:
                row = await conn.fetchrow("SELECT status, processed FROM jobs WHERE id = $1",
                                          migration)
                return row["status"] == "running" and row["processed"] >= 200

            await eventually(mid_way, timeout=30, interval=0.002)
            assert await owner_of(migration) == "A"
            assert {await owner_of(job_id) for job_id in busy} == {"A", "B", "C"}
            a.kill()
            killed_at = await conn.fetchval("SELECT clock_timestamp()")
            await a.wait()

            await eventually(lambda: all_ended([*busy, migration]), timeout=45)
            done = (await cb.get(f"/migration/jobs/{migration}")).json()
            assert done["status"] == "completed", done
            assert (done["total"], done["processed"], done["failed"]) == (ROWS, ROWS - 2, 2)
            assert done["attempts"] == 2 and await owner_of(migration) in ("B", "C")
            rejects = (await cc.get(f"/jobs/{migration}/rejects")).json()["rejects"]
            assert [reject["row"] for reject in rejects] == [52, ROWS - 48]
            assert await conn.fetchval("SELECT count(*) FROM chats") == ROWS - 2
            assert await conn.fetchval("SELECT count(DISTINCT chat_id) FROM chats") == ROWS - 2
            # Taken over within 5 s of the kill, resumed from its checkpoint.
            resumed_at = await conn.fetchval(
                "SELECT min(at) FROM job_events WHERE job_id = $1 AND status = 'running'"
                " AND at > $2", migration, killed_at)
            assert (resumed_at - killed_at).total_seconds() <= 5.0
            assert await _events(conn, migration) == [
                (None, "queued"), ("queued", "running"), ("running", "queued"),
                ("queued", "running"), ("running", "completed")]

            # Every job ran to one ending, exactly once, never in two places at once.
            every = [*spread, job, *limited, *busy, migration]
            for job_id in every:
                events = await _events(conn, job_id)
                endings = [status for _, status in events if status in TERMINAL]
                assert len(endings) == 1 and _never_two_at_once(events), (job_id, events)
            assert await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1::bigint[]) AND status ="
                " 'completed'", [*spread, *limited, *busy, migration]) == len(every) - 1

            # 5. The event stream of C shows every job, whichever daemon ran it.
            async def stream_saw_all() -> bool:
                return set(every) <= stream.finished

            await eventually(stream_saw_all, timeout=10)

            # 6. The fetch schedule fired once per interval in the cluster, before and
            # after the kill (whichever daemon led it).
            async def fetched_after_the_kill() -> bool:
                return await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE kind = 'fetch' AND status = 'completed'"
                    " AND created_at > $1", killed_at) >= 1

            await eventually(fetched_after_the_kill, timeout=15)
            assert any("previous leader: gone" in daemon.log_text() for daemon in (b, c))
            # Every tick any daemon made (a fetch started, or skipped because the
            # last one still ran), from their logs: one per interval in all. (A line
            # is logged once the tick's submission returns, up to a few hundred ms
            # after the tick on a busy machine; two leaders would tick ~0 s apart.)
            ticks = sorted(
                dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                for daemon in daemons for line in daemon.log
                if "scheduled fetch started" in line or "scheduled fetch skipped" in line)
            gaps = [(later - earlier).total_seconds()
                    for earlier, later in zip(ticks, ticks[1:], strict=False)]
            assert len(ticks) >= 3 and min(gaps) >= 0.5 * INTERVAL_S, gaps
            background.cancel_scope.cancel()
        for client in clients:
            await client.aclose()


async def _status_is(conn: Database, job_id: int, status: str) -> bool:
    return await conn.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == status



def test_cluster_settings_parse_and_refuse_what_is_wrong(tmp_path: Path) -> None:
    config = tmp_path / "nurseryd.toml"
    config.write_text("[cluster]\nshared_queue = true\nbacklog = 500\nclaim_poll = \"250ms\"\n"
                      "[kinds.migration]\ncluster_concurrency = 1\n")
    settings = load_settings(config, environ={})
    assert (settings.cluster.shared_queue, settings.cluster.backlog,
            settings.cluster.claim_poll_s) == (True, 500, 0.25)
    assert settings.limits("migration").cluster_concurrency == 1
    assert settings.limits("migration").concurrency == 2  # the built-in, kept
    assert load_settings(None, environ={}).limits("migration").cluster_concurrency is None
    assert load_settings(None, environ={}).cluster.shared_queue is False
    for text, key in [("[cluster]\nshared = true\n", "cluster.shared"),
                      ("[cluster]\nbacklog = 0\n", "cluster.backlog"),
                      ("[cluster]\nclaim_poll = \"1ms\"\n", "cluster.claim_poll"),
                      ("[kinds.sleep]\ncluster_concurrency = 0\n",
                       "kinds.sleep.cluster_concurrency")]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_settings(config, environ={})
