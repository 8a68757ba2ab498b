"""Integrity at the edges: what a request, a bad neighbour or a lost lock cannot do.

Each test runs the whole daemon (in-process, real sockets, real PostgreSQL) and
asserts on the jobs table, the one truth: a committed job always reaches an
ending, a bad submission fails alone, job work cannot starve the API, and a job
never runs in two places at once.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from functools import partial
from pathlib import Path
from typing import Any

import trio

from nurseryd.lifecycle import TERMINAL, Event
from nurseryd.store.base import JobChanged
from tests.daemon_process import InProcessDaemon, make_settings, run_daemon
from tests.polling import eventually

TERMINAL_VALUES = sorted(status.value for status in TERMINAL)


async def _unfinished(daemon: InProcessDaemon) -> int:
    return await daemon.services.db.fetchval(
        "SELECT count(*) FROM jobs WHERE NOT (status = ANY($1::text[]))", TERMINAL_VALUES)


async def _all_recorded_jobs_ended(daemon: InProcessDaemon) -> bool:
    """Some job was recorded, no insert is still on its way, and every job has ended.

    (Right after a storm the inserts of handlers whose client is gone may still be
    in flight, shielded: an empty table, or one whose last rows are not in yet,
    must not count as "all ended". Each storm has one client that waits for its
    answer, so some job is always recorded.)
    """
    recorded = await daemon.services.db.fetchval("SELECT count(*) FROM jobs")
    return recorded > 0 and daemon.supervisor.inserts.pending == 0 \
        and await _unfinished(daemon) == 0


async def _one_that_waits(host: str, port: int, request: bytes) -> None:
    """One client in the storm that reads its answer: some job is surely recorded
    (202, or 409 because one already is), so "every recorded job ended" cannot
    hold vacuously while the storm's own inserts are slow to land."""
    for _ in range(100):  # a 503 (uploads at their concurrency cap) says: again shortly
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(request)
            head = b""
            while b"\r\n" not in head:
                chunk = await stream.receive_some(4096)
                assert chunk, "the daemon closed the connection without answering"
                head += chunk
        status = head.split(b" ", 2)[1]
        if status != b"503":
            break
        await trio.sleep(0.1)  # the daemon's Retry-After, shortened: the storm is short
    assert status in (b"202", b"409"), head[:200]


def _reset_after_sending(host: str, port: int, request: bytes, give_up_after: float) -> None:
    """Send a whole request, give up on the answer after ``give_up_after`` seconds
    and close with RST (SO_LINGER 0): the client is gone mid-request."""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(request)
        sock.settimeout(give_up_after or None)
        try:
            if give_up_after:
                sock.recv(1)
        except TimeoutError:
            pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def test_clients_that_disconnect_mid_post_strand_no_job(
    database_url: str, state_dir: Path
) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
        request = _post("/jobs/sleep", b'{"seconds": 0.05}')
        async with trio.open_nursery() as nursery:
            # Clients giving up 0-145 ms after sending, while 150 requests compete:
            # many resets land while the handler is recording the job.
            for index in range(150):
                nursery.start_soon(trio.to_thread.run_sync, _reset_after_sending, host,
                                   int(port), request, (index % 30) * 0.005)
            nursery.start_soon(_one_that_waits, host, int(port), request)
        # (Inserts whose client is gone still commit, shielded: rows may appear after
        # the client threads ended, which is why the check below counts again at the end.)

        # Every committed job reaches an ending (the rescan runs every 5 s).
        await eventually(partial(_all_recorded_jobs_ended, daemon), timeout=30)
        statuses = await daemon.services.db.fetch(
            "SELECT status, count(*) FROM jobs GROUP BY status")
        recorded = await daemon.services.db.fetchval("SELECT count(*) FROM jobs")
        assert {row["status"]: row["count"] for row in statuses} == {"completed": recorded}


async def test_poison_submissions_fail_alone(database_url: str, state_dir: Path) -> None:
    """Invalid params are refused before they join a group-committed INSERT, so
    none of the valid submissions sent beside them fails."""
    poison = [
        b'{"x": NaN}', b'{"x": Infinity}', b'{"x": "nul \\u0000 inside"}',
        b'{"x": "\\ud800 lone surrogate"}', b'{"x": ' + b"9" * 5000 + b"}",
        b'{"x": ' + b"[" * 40 + b"]" * 40 + b"}", b'{"x": 99999999999999999999}',
    ]
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        answers: list[tuple[bool, int, dict[str, Any]]] = []

        async def send(body: bytes, valid: bool) -> None:
            response = await daemon.client.post("/jobs/noop", content=body,
                                                headers={"content-type": "application/json"})
            answers.append((valid, response.status_code, response.json()))

        async with trio.open_nursery() as nursery:
            for round_ in range(10):
                for body in poison:
                    nursery.start_soon(send, body, False)
                nursery.start_soon(send, json.dumps({"n": round_}).encode(), True)
                nursery.start_soon(send, b'{"text": "caf\\u00e9 \\ud83d\\ude00"}', True)
        valid = [(status, body) for ok, status, body in answers if ok]
        invalid = [(status, body) for ok, status, body in answers if not ok]
        assert [status for status, _ in valid] == [202] * 20
        assert {status for status, _ in invalid} <= {400, 422}, invalid
        assert all(body["detail"] for _, body in invalid)
        for _, job in valid:
            await daemon.wait_for_status(job["id"], "completed")
        assert await daemon.services.db.fetchval("SELECT count(*) FROM jobs") == 20


async def test_job_work_cannot_starve_the_api(database_url: str, state_dir: Path) -> None:
    """Ten long SQL jobs hold every connection job work may use; reads still answer.

    (``sql_sleep`` runs four at a time by default; here it is let loose on purpose.)
    """
    settings = make_settings(database_url, state_dir)
    loose = dataclasses.replace(settings.limits("sql_sleep"), concurrency=10)
    settings = dataclasses.replace(settings, kinds={**settings.kinds, "sql_sleep": loose})
    async with run_daemon(settings) as daemon:
        jobs = [(await daemon.client.post("/jobs/sql_sleep", json={"seconds": 60})).json()
                for _ in range(10)]

        async def all_in_pg_sleep() -> bool:
            return await daemon.services.db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
                " AND state = 'active'") == 10

        await eventually(all_in_pg_sleep, timeout=15)
        for job in jobs:
            with trio.fail_after(1):
                response = await daemon.client.get(f"/jobs/{job['id']}")
            assert response.status_code == 200 and response.json()["status"] == "running"
        with trio.fail_after(1):
            assert (await daemon.client.get("/jobs?limit=5")).status_code == 200


async def test_a_lost_owner_lock_never_runs_a_job_in_two_places(
    database_url: str, state_dir: Path, tmp_path: Path
) -> None:
    """The lock's connection is terminated while a job runs and a second daemon is
    up: the job completes exactly once, and no two attempts ever overlap."""
    timeline: list[tuple[float, str, Event | None, int]] = []

    def recorder(name: str) -> Any:
        def record(change: JobChanged) -> None:
            timeline.append((trio.current_time(), name, change.event, change.row["attempts"]))
        return record

    async with run_daemon(make_settings(database_url, state_dir)) as first:
        first.supervisor.store.feed.subscribe(recorder("first"))
        job = (await first.client.post("/jobs/sleep", json={"seconds": 4})).json()
        await first.wait_for_status(job["id"], "running")
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        async with run_daemon(make_settings(database_url, second_dir)) as second:
            second.supervisor.store.feed.subscribe(recorder("second"))
            terminated = await first.services.db.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted AND pid IN"
                " (SELECT pid FROM pg_stat_activity WHERE datname = current_database())"
                " AND objid = (hashtextextended($1, 0) & 4294967295)::oid", first.supervisor.owner)
            assert terminated == 1
            done = await first.wait_for_status(job["id"], "completed", timeout=40)
            assert done["attempts"] >= 2
    # Attempts never overlap: each start is followed by that attempt's own ending
    # (or by the stale attempt's refused writes, which publish nothing) before the
    # next start.
    running: str | None = None
    for _, who, event, _attempts in timeline:
        if event is Event.START:
            assert running is None, timeline
            running = who
        elif event in (Event.INTERRUPT, Event.COMPLETE, Event.RECOVER, Event.FAIL):
            running = None
    completions = [entry for entry in timeline if entry[2] is Event.COMPLETE]
    assert len(completions) == 1, timeline


async def test_clients_that_disconnect_mid_post_fetch_leave_no_fetch_blocking(
    database_url: str, state_dir: Path
) -> None:
    """A reset ``POST /fetch`` must not leave a queued fetch that nothing runs
    (it would answer 409 to every later fetch)."""
    from nurseryd.kinds.fetch.config import parse_fetch_section
    from tests.fetch_servers import json_reply, open_local_server

    async with open_local_server() as server:
        url = server.static("/jobs", json_reply({"data": {"jobs": [{"id": 1, "title": "a"}]}}))
        raw = {"backoff_s": 0.01, "sources": [{"name": "s", "url": url, "format": "json",
                                               "items": "data.jobs"}]}
        settings = make_settings(database_url, state_dir,
                                 sections={"fetch": parse_fetch_section(raw, {"fetch": raw})})
        async with run_daemon(settings) as daemon:
            host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
            request = _post("/fetch", b"")
            async with trio.open_nursery() as nursery:
                for index in range(40):
                    nursery.start_soon(trio.to_thread.run_sync, _reset_after_sending, host,
                                       int(port), request, (index % 20) * 0.005)
                nursery.start_soon(_one_that_waits, host, int(port), request)

            await eventually(partial(_all_recorded_jobs_ended, daemon), timeout=30)
            assert await daemon.services.db.fetchval(
                "SELECT count(*) FROM jobs WHERE kind = 'fetch' AND status <> 'completed'") == 0
            again = await daemon.client.post("/fetch")
            assert again.status_code == 202, again.text  # nothing stranded blocks it
            done = await daemon.wait_for_status(again.json()["id"], *TERMINAL_VALUES)
            assert done["status"] == "completed"


async def test_clients_that_disconnect_mid_upload_lose_no_recorded_job(
    database_url: str, state_dir: Path, tmp_path: Path
) -> None:
    """An upload whose client resets once the body is sent: if its job was recorded,
    the file stays for it and the job completes; if not, no file is left behind."""
    from nurseryd.kinds.migrate.uploads_dir import uploads_dir
    from tests import xlsx_factory as xf

    workbook = xf.write_xlsxwriter(tmp_path / "storm.xlsx",
                                   [xf.chat_row(i) for i in range(1, 21)]).read_bytes()
    boundary = "storm"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"storm.xlsx\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + workbook + f"\r\n--{boundary}--\r\n".encode()
    request = _post("/migration/excel", body, f"multipart/form-data; boundary={boundary}")
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        host, port = daemon.base_url.removeprefix("http://").rsplit(":", 1)
        async with trio.open_nursery() as nursery:
            for index in range(30):
                nursery.start_soon(trio.to_thread.run_sync, _reset_after_sending, host,
                                   int(port), request, (index % 15) * 0.01)
            nursery.start_soon(_one_that_waits, host, int(port), request)

        await eventually(partial(_all_recorded_jobs_ended, daemon), timeout=60)
        rows = await daemon.services.db.fetch("SELECT status, error FROM jobs")
        assert rows, "no upload got far enough to be recorded"
        assert {(row["status"], row["error"]) for row in rows} == {("completed", None)}
        # Recorded jobs consumed their files; unrecorded uploads left none behind.
        directory = uploads_dir(state_dir)

        async def no_files() -> bool:
            return not directory.exists() or not any(directory.iterdir())

        await eventually(no_files, timeout=10)
