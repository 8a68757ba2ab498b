"""The embedded PostgreSQL used when no ``database_url`` is configured.

It lives in ``STATE_DIR/pgdata`` and is run by the ``pgserver`` package's bundled
binaries (as the unprivileged ``pgserver`` user when we are root), listening on a
unix socket only.

Why "reuse or start" rather than "start": a daemon that was SIGKILLed (or OOM
killed) cannot stop its server, so the next start finds it still running from
``postmaster.pid``. Starting a second one would fail on the lock; leaving it would
leak it. We adopt it, and stop it on our own clean exit, so at most one server
per state dir ever runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedServer:
    pgdata: Path
    dsn: str
    pid: int
    adopted: bool


def _start_or_adopt(pgdata: Path) -> EmbeddedServer:
    import pgserver
    from pgserver.utils import PostmasterInfo

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    before = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    adopted = before is not None and before.is_running()
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    pid = server.get_pid()
    assert pid is not None
    return EmbeddedServer(pgdata=pgdata, dsn=server.get_uri(), pid=pid, adopted=adopted)


def _stop(pgdata: Path) -> None:
    from pgserver import _commands
    from pgserver.postgres_server import PostgresServer

    server = PostgresServer._instances.get(pgdata.resolve())
    user = server.system_user if server is not None else None
    # pgserver sets one function per bundled binary on _commands at import time.
    pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=30)


@asynccontextmanager
async def open_embedded_server(state_dir: Path) -> AsyncIterator[EmbeddedServer]:
    """Start (or adopt) the state dir's server; stop it when the block exits."""
    pgdata = (state_dir / "pgdata").resolve()
    server = await trio.to_thread.run_sync(_start_or_adopt, pgdata)
    log.info(
        "embedded PostgreSQL %s (pid %d, data %s)",
        "adopted from an earlier run" if server.adopted else "started", server.pid, pgdata,
    )
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(_stop, pgdata)
                log.info("embedded PostgreSQL stopped")
            except Exception:  # the daemon is exiting; say so and go on
                log.exception("could not stop the embedded PostgreSQL in %s", pgdata)
