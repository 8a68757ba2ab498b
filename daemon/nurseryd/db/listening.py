"""LISTEN on a connection of its own: the one way nurseryd receives NOTIFY.

A pooled connection is reset on release and would stop listening, so each
listener opens a dedicated one. Both the event hub (``db/events.py``) and the
cluster signals (``db/cluster.py``) listen through :func:`open_listener`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import trio
import trio_asyncio

from .database import Database
from .dedicated import close_dedicated
from .transient import CONNECTION_ERRORS


@asynccontextmanager
async def open_listener(
    db: Database, channels: Sequence[str], deliver: Callable[[str, str], None]
) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """LISTEN on ``channels`` until the block ends; ``deliver(channel, payload)`` is
    called in Trio for every notification. Yields an async ``alive()`` check; the
    connection is closed on exit, also when cancelled."""
    token = trio.lowlevel.current_trio_token()

    def _callback(_conn: Any, _pid: int, channel: str, payload: object) -> None:
        # Asyncio side: hand over to Trio without touching its state from here.
        token.run_sync_soon(deliver, channel, str(payload))

    async def _open() -> asyncpg.Connection:
        conn = await asyncpg.connect(db.dsn, timeout=5)
        try:
            for channel in channels:
                await conn.add_listener(channel, _callback)
        except BaseException:
            conn.terminate()
            raise
        return conn

    conn = await trio_asyncio.aio_as_trio(_open, loop=db.loop)()

    async def alive() -> bool:
        if conn.is_closed():
            return False
        with trio.move_on_after(5):
            try:
                return await trio_asyncio.aio_as_trio(conn.fetchval, loop=db.loop)(
                    "SELECT 1") == 1
            except CONNECTION_ERRORS:
                return False
        return False

    try:
        yield alive
    finally:
        await close_dedicated(db, conn)
