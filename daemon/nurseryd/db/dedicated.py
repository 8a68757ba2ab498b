"""Connections of their own, outside the pool: held for an advisory lock or a
LISTEN, which a pooled connection would lose when it is reset on release."""

from __future__ import annotations

import asyncpg
import trio
import trio_asyncio

from .database import Database
from .transient import CONNECTION_ERRORS

#: A polite close waits at most this long; then the socket is simply dropped.
CLOSE_TIMEOUT_S = 5.0


async def close_dedicated(db: Database, conn: asyncpg.Connection) -> None:
    """Close ``conn`` shielded (also when the caller is being cancelled) and bounded:
    a server that does not answer gets the connection terminated, never leaked."""
    if conn.is_closed():
        return
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await trio_asyncio.aio_as_trio(conn.close, loop=db.loop)()
        except CONNECTION_ERRORS:
            pass
    if not conn.is_closed():
        conn.terminate()
