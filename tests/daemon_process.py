"""Run nurseryd for tests: in-process (fast, real sockets) or as a real subprocess
(for signals, SIGKILL and systemd notifications).

In-process::

    async with run_daemon(settings) as daemon:      # real HTTP on 127.0.0.1:<random>
        response = await daemon.client.post("/jobs/sleep", json={"seconds": 1})
        ...                                          # daemon.services.supervisor etc.

Subprocess::

    async with DaemonProcess.start(env) as proc:    # waits until /readyz is 200
        proc.send_signal(signal.SIGTERM); code = await proc.wait()

Several subprocesses at once (a cluster on one database), started side by side::

    async with start_daemons([env_a, env_b, env_c]) as (a, b, c):
        ...
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from nurseryd.config import Settings, load_settings
from nurseryd.features import FEATURES
from nurseryd.root import serve
from nurseryd.services import Services
from tests.polling import eventually


def make_settings(database_url: str, state_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test daemon: random port, the test's database and state dir,
    diagnostic kinds served (``sleep`` and ``sql_sleep`` are the tests' workhorses).

    ``sections=`` replaces only the sections it names; the others keep their defaults.
    """
    base = load_settings(None, environ={}, features=FEATURES)
    if "sections" in overrides:
        overrides["sections"] = {**base.sections, **overrides["sections"]}
    return dataclasses.replace(
        base, bind_host="127.0.0.1", bind_port=0, database_url=database_url,
        state_dir=state_dir, **{"diagnostics": True, **overrides},
    )


@dataclass
class InProcessDaemon:
    services: Services
    base_url: str
    client: httpx.AsyncClient

    @property
    def supervisor(self):  # noqa: ANN201 - convenience for tests
        return self.services.supervisor

    async def wait_for_status(self, job_id: int, *statuses: str, timeout: float = 10) -> dict:
        """Ask the public API until the job reaches one of ``statuses``."""

        async def reached() -> dict | None:
            job = (await self.client.get(f"/jobs/{job_id}")).json()
            return job if job["status"] in statuses else None

        return await eventually(reached, timeout=timeout, interval=0.01)


@asynccontextmanager
async def run_daemon(settings: Settings) -> AsyncIterator[InProcessDaemon]:
    """The whole daemon (supervisor + hypercorn) inside this test's Trio run.

    Leaving the block stops it the way SIGTERM would (drain), with grace ended.
    """
    async with trio.open_nursery() as nursery:
        services: Services = await nursery.start(serve, settings)
        base_url = services.binds[0]
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            try:
                yield InProcessDaemon(services, base_url, client)
            finally:
                services.supervisor.request_stop()
                services.supervisor.request_stop()  # no grace in tests


_LISTENING = re.compile(r"listening on (http://[^\s\"]+)")  # text or JSON log lines


@dataclass
class DaemonProcess:
    """``nurseryd serve`` as a child process of the test."""

    process: trio.Process
    env: dict[str, str]
    base_url: str = ""
    log: list[str] = field(default_factory=list)
    _listening: trio.Event = field(default_factory=trio.Event)

    @classmethod
    @asynccontextmanager
    async def start(
        cls, env: Mapping[str, str], *, ready_timeout: float = 30, args: list[str] | None = None
    ) -> AsyncIterator[DaemonProcess]:
        full_env = {**os.environ, "NURSERYD_BIND": "127.0.0.1:0", "NURSERYD_DIAGNOSTICS": "1",
                    **env}
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "nurseryd.cli", "serve", *(args or [])],
            env=full_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )
        daemon = cls(process, full_env)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon._read_log)
                with trio.fail_after(ready_timeout):
                    await daemon._listening.wait()
                    if not daemon.base_url:
                        await process.wait()
                        raise RuntimeError(
                            f"daemon exited with {process.returncode} before listening:\n"
                            + daemon.log_text()
                        )
                    await daemon.wait_ready()
                yield daemon
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async for chunk in self.process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.log.append(line)
                match = _LISTENING.search(line)
                if match and not self._listening.is_set():
                    self.base_url = match.group(1)
                    self._listening.set()
        self._listening.set()  # exited: let start() report it instead of hanging

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout=30)

    def client(self, timeout: float = 10) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float = 30) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    def log_text(self) -> str:
        return "\n".join(self.log)


@asynccontextmanager
async def start_daemons(
    envs: Sequence[Mapping[str, str]], *, ready_timeout: float = 45
) -> AsyncIterator[list[DaemonProcess]]:
    """``nurseryd serve`` once per env, all started at once; yields them once every
    one answers ``/readyz``. Each is killed (if still running) when the block ends."""
    daemons: list[DaemonProcess] = []
    try:
        async with trio.open_nursery() as nursery:
            for env in envs:
                full_env = {**os.environ, "NURSERYD_BIND": "127.0.0.1:0",
                            "NURSERYD_DIAGNOSTICS": "1", **env}
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "nurseryd.cli", "serve"],
                    env=full_env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
                daemon = DaemonProcess(process, full_env)
                daemons.append(daemon)
                nursery.start_soon(daemon._read_log)
            with trio.fail_after(ready_timeout):
                for daemon in daemons:
                    await daemon._listening.wait()
                    if not daemon.base_url:
                        await daemon.process.wait()
                        raise RuntimeError(
                            f"daemon exited with {daemon.process.returncode} before "
                            f"listening:\n{daemon.log_text()}")
                async with trio.open_nursery() as ready:
                    for daemon in daemons:
                        ready.start_soon(daemon.wait_ready)
            yield daemons
            nursery.cancel_scope.cancel()
    finally:
        for daemon in daemons:
            if daemon.process.returncode is None:
                daemon.process.kill()
        with trio.CancelScope(shield=True):
            for daemon in daemons:
                await daemon.process.wait()
