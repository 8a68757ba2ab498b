"""The daemon as a real subprocess: signals, SIGKILL, restart, systemd, config errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import trio

from tests.conftest import pg_traversable_dir
from tests.daemon_process import DaemonProcess
from tests.pgtools import PgServer
from tests.polling import eventually


def _env(database_url: str, state_dir: Path, **extra: str) -> dict[str, str]:
    return {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir),
            "NURSERYD_SHUTDOWN_GRACE": "1", **extra}


async def _wait_status(client, job_id: int, *statuses: str, timeout: float = 15) -> dict:
    async def reached() -> dict | None:
        job = (await client.get(f"/jobs/{job_id}")).json()
        return job if job["status"] in statuses else None

    return await eventually(reached, timeout=timeout)


async def test_sigterm_requeues_the_running_job_and_restart_completes_it(
    database_url: str, state_dir: Path, pg_server: PgServer
) -> None:
    env = _env(database_url, state_dir)
    async with DaemonProcess.start(env) as daemon, daemon.client() as client:
        job = (await client.post("/jobs/sleep", json={"seconds": 3})).json()
        running = await _wait_status(client, job["id"], "running")
        async def checkpointed() -> bool:  # let it commit one checkpoint
            return (await client.get(f"/jobs/{job['id']}")).json()["processed"] >= 1

        await eventually(checkpointed, timeout=5)
        started = trio.current_time()
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait()
        elapsed = trio.current_time() - started
    assert code == 0, daemon.log_text()
    assert elapsed < 1 + 1, f"exit took {elapsed:.2f}s with a 1 s grace"
    between = pg_server.psql(
        f"SELECT status, attempts, checkpoint FROM jobs WHERE id = {job['id']}",
        urlsplit(database_url).path.lstrip("/"),
    ).strip()
    status, attempts, checkpoint = between.split("|")
    assert (status, attempts) == ("queued", "1")  # back in the queue, attempt counted
    assert int(checkpoint) >= 1  # and its checkpoint kept
    async with DaemonProcess.start(env) as again, again.client() as client:
        done = await _wait_status(client, job["id"], "completed", "failed")
        again.send_signal(signal.SIGTERM)
        assert await again.wait() == 0
    assert running["attempts"] == 1
    assert done["status"] == "completed" and done["attempts"] == 2
    assert done["processed"] == done["total"] == 3


async def test_sigkill_mid_job_then_restart_resumes_and_completes_once(
    database_url: str, state_dir: Path
) -> None:
    env = _env(database_url, state_dir)
    async with DaemonProcess.start(env) as daemon, daemon.client() as client:
        job = (await client.post("/jobs/sleep", json={"seconds": 2})).json()
        await _wait_status(client, job["id"], "running")
        daemon.kill()
        assert await daemon.wait() == -signal.SIGKILL
    async with DaemonProcess.start(env) as again, again.client() as client:
        done = await _wait_status(client, job["id"], "completed", "failed")
        listed = (await client.get("/jobs?kind=sleep")).json()["jobs"]
        again.send_signal(signal.SIGTERM)
        assert await again.wait() == 0
    assert done["status"] == "completed"
    assert done["attempts"] == 2  # ran again exactly once, not twice
    assert [each["id"] for each in listed] == [job["id"]]
    assert "adopted 1 unfinished job" in again.log_text()


async def test_second_signal_ends_the_grace_early(database_url: str, state_dir: Path) -> None:
    env = _env(database_url, state_dir, NURSERYD_SHUTDOWN_GRACE="60")
    async with DaemonProcess.start(env) as daemon, daemon.client() as client:
        job = (await client.post("/jobs/sleep", json={"seconds": 60})).json()
        await _wait_status(client, job["id"], "running")
        daemon.send_signal(signal.SIGTERM)
        async def draining() -> bool:
            return (await client.get("/readyz")).status_code == 503

        await eventually(draining, timeout=5)
        daemon.send_signal(signal.SIGINT)
        assert await daemon.wait(timeout=5) == 0
    assert "ending the grace period now" in daemon.log_text()


async def test_systemd_notifications_arrive_in_order(
    database_url: str, state_dir: Path, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(path)
    env = _env(database_url, state_dir, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    messages: list[str] = []

    async def collect() -> None:
        while True:
            messages.append((await sock.recv(4096)).decode())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        async with DaemonProcess.start(env) as daemon, daemon.client() as client:
            job = (await client.post("/jobs/sleep", json={"seconds": 30})).json()
            await _wait_status(client, job["id"], "running")
            async def fed_three_times() -> bool:  # fed every WATCHDOG_USEC/2
                return sum(message == "WATCHDOG=1" for message in messages) >= 3

            await eventually(fed_three_times, timeout=5)
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
        await trio.sleep(0.05)  # the socket is local: let the last datagrams land
        nursery.cancel_scope.cancel()
    sock.close()

    def first(prefix: str) -> int:
        return next(i for i, message in enumerate(messages) if message.startswith(prefix))

    assert first("READY=1") < first("WATCHDOG=1") < first("STOPPING=1")
    assert first("STOPPING=1") < first("EXTEND_TIMEOUT_USEC=")
    assert "STATUS=" in messages[first("READY=1")]
    assert "draining" in messages[first("STOPPING=1")]


async def test_embedded_server_left_by_sigkill_is_adopted_then_stopped() -> None:
    state_dir = pg_traversable_dir("nurseryd-test-embedded-")
    env = {"NURSERYD_STATE_DIR": str(state_dir), "NURSERYD_DATABASE_URL": "",
           "NURSERYD_SHUTDOWN_GRACE": "1"}
    async with DaemonProcess.start(env) as daemon:
        daemon.kill()
        await daemon.wait()
    postmaster_pid = int((state_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    assert psutil.pid_exists(postmaster_pid)  # orphaned by the SIGKILL
    async with DaemonProcess.start(env) as again, again.client() as client:
        assert (await client.get("/readyz")).status_code == 200
        again.send_signal(signal.SIGTERM)
        assert await again.wait() == 0
    assert "adopted from an earlier run" in again.log_text()
    assert f"pid {postmaster_pid}" in again.log_text()
    async def postmaster_gone() -> bool:
        try:
            return psutil.Process(postmaster_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await eventually(postmaster_gone, timeout=5)
    shutil.rmtree(state_dir, ignore_errors=True)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nurseryd.cli", *args], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=60,
    )


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    ok = _cli("check-config")
    assert ok.returncode == 0 and "configuration OK" in ok.stdout
    bad_env = _cli("check-config", NURSERYD_SHUTDOWN_GRACE="soon")
    assert bad_env.returncode == 2
    assert bad_env.stderr.strip().splitlines() == [
        "nurseryd: config error: shutdown_grace: expected seconds or a duration like '15m',"
        " got 'soon'"
    ]
    config = tmp_path / "nurseryd.toml"
    config.write_text('[kinds.sleep]\nconcurrency = 0\n')
    bad_file = _cli("check-config", "--config", str(config))
    assert bad_file.returncode == 2
    assert "kinds.sleep.concurrency" in bad_file.stderr
    assert len(bad_file.stderr.strip().splitlines()) == 1
    serve_refuses = _cli("serve", NURSERYD_BIND="localhost")
    assert serve_refuses.returncode == 2 and "bind" in serve_refuses.stderr


async def test_cancel_through_another_daemon_sharing_the_database(
    database_url: str, tmp_path: Path
) -> None:
    """Two daemons on one database: a cancel sent to the one that does not run the
    job reaches the one that does, through the row."""
    one_at_a_time = tmp_path / "one.toml"
    one_at_a_time.write_text("[kinds.sleep]\nconcurrency = 1\n")
    first_env = _env(database_url, tmp_path / "a", NURSERYD_CONFIG=str(one_at_a_time))
    second_env = _env(database_url, tmp_path / "b")
    async with (
        DaemonProcess.start(first_env) as runner, runner.client() as runner_client,
        DaemonProcess.start(second_env) as other, other.client() as other_client,
    ):
        job = (await runner_client.post("/jobs/sleep", json={"seconds": 60})).json()
        waiting = (await runner_client.post("/jobs/sleep", json={"seconds": 60})).json()
        await _wait_status(runner_client, job["id"], "running")
        # Queued in the runner's memory: the other daemon must not cancel it behind
        # the runner's back (it would still start it), but ask the runner.
        response = await other_client.post(f"/jobs/{waiting['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        assert response.json()["started_at"] is None
        started = trio.current_time()
        response = await other_client.post(f"/jobs/{job['id']}/cancel")
        elapsed = trio.current_time() - started
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        assert response.json()["cancel_requested_at"] is not None
        assert elapsed < 3, f"took {elapsed:.1f} s"

        async def runner_idle() -> dict | None:
            ready = (await runner_client.get("/readyz")).json()
            return ready if ready["running"] == ready["queued"] == 0 else None

        await eventually(runner_idle, timeout=5)  # the freed slot started nothing
        after = (await runner_client.get(f"/jobs/{waiting['id']}")).json()
        assert (after["status"], after["attempts"]) == ("cancelled", 0)
        for daemon in (runner, other):
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
    assert "cancel requested through another daemon" in runner.log_text()


def test_an_unreachable_database_at_start_is_one_line_and_a_non_zero_exit(
    tmp_path: Path,
) -> None:
    """Bounded retries with back-off, then one line naming the server, never the password."""
    refused = _cli("serve", NURSERYD_DATABASE_URL="postgresql://nurseryd:s3cretpw@127.0.0.1:1/app",
                   NURSERYD_STATE_DIR=str(tmp_path / "state"))
    assert refused.returncode == 1
    output = refused.stdout + refused.stderr
    assert "s3cretpw" not in output and "Traceback" not in output
    tries = [line for line in output.splitlines() if "not reachable yet" in line]
    assert len(tries) == 5  # six attempts, five waits between them
    last = output.strip().splitlines()[-1]
    assert last.startswith("nurseryd: cannot start: cannot reach PostgreSQL at 127.0.0.1:1/app "
                           "after 6 attempt(s)")
