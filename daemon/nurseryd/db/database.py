"""Trio-facing access to PostgreSQL through asyncpg running on trio-asyncio.

Why every call is one asyncio-side coroutine
--------------------------------------------
asyncpg lives on the asyncio side of trio-asyncio. If Trio code drives
``pool.acquire()`` or ``conn.transaction()`` as separate bridged context managers
and a Trio cancellation lands between them, the connection is leaked or left
"idle in transaction (aborted)" (measured on this stack). So acquire, transaction,
statement and release always run inside *one* asyncio coroutine that the bridge
calls as a unit: a Trio cancel becomes an asyncio ``CancelledError`` inside that
coroutine, asyncpg cancels the statement on the server, rolls back and returns
the connection to the pool before the cancellation reaches Trio.

Code that needs several statements in one transaction (a batch of migrated rows
plus its checkpoint, say) passes an asyncio coroutine function to :meth:`Database.run`.

A COPY inside such a function is fed from an async iterator, never one big
buffer: the migration pipeline hands asyncpg its COPY text slice by slice with
``await asyncio.sleep(0)`` between slices (``copy_slices`` in
``kinds/migrate/pipeline.py``), so the event loop and cancellation keep working
during a copy, and a cancel rolls the copy back with its transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import trio
import trio_asyncio

from ..backoff import RetryPolicy
from ..errors import DatabaseUnavailable, StartupError
from .transient import CONNECTION_ERRORS

log = logging.getLogger(__name__)

#: Back-off between connection attempts at start (about 1, 2, 4, 8 s ...).
CONNECT_RETRY = RetryPolicy(max_attempts=1000, base_s=1.0, cap_s=8.0, jitter_floor=0.5)


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a connection URL: what to show, never the password."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = parts.hostname or (query.get("host") or ["localhost"])[0]
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}/{parts.path.lstrip('/') or '(default)'}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."

T = TypeVar("T")
P = ParamSpec("P")


async def _init_connection(conn: asyncpg.Connection) -> None:
    """Decode json/jsonb as Python values, so callers never see JSON text."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class Database:
    """A pool of PostgreSQL connections usable from Trio tasks.

    Every method is safe to cancel: the statement is cancelled on the server and
    the connection goes back to the pool healthy.
    """

    def __init__(self, pool: asyncpg.Pool, dsn: str, loop: asyncio.AbstractEventLoop, *,
                 acquire_timeout: float | None = None) -> None:
        self.pool = pool
        self.dsn = dsn
        #: The trio-asyncio loop asyncpg runs on (for code that must bridge itself).
        self.loop = loop
        #: How long a call may wait for a free connection before it fails with
        #: :class:`~nurseryd.errors.DatabaseUnavailable` (``None``: as long as it takes).
        self.acquire_timeout = acquire_timeout

    async def run(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        transaction: bool = True,
    ) -> T:
        """Run ``await fn(conn, *args)`` on the asyncio side with a pooled connection.

        ``fn`` is an asyncio coroutine function; with ``transaction`` (the default)
        it runs inside one transaction that commits when it returns and rolls back
        if it raises or is cancelled.
        """

        async def _acquire_and_run() -> T:
            try:
                conn = await self.pool.acquire(timeout=self.acquire_timeout)
            except TimeoutError:
                raise DatabaseUnavailable(
                    f"no free connection within {self.acquire_timeout:g} s") from None
            async with _Released(self.pool, conn):
                if not transaction:
                    return await fn(conn, *args)
                async with conn.transaction():
                    return await fn(conn, *args)

        return await trio_asyncio.aio_as_trio(_acquire_and_run, loop=self.loop)()

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.run(_execute, sql, args, transaction=False)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.run(_fetch, sql, args, transaction=False)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.run(_fetchrow, sql, args, transaction=False)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.run(_fetchval, sql, args, transaction=False)

    async def ping(self) -> bool:
        """True if a trivial query answers within a second."""
        with trio.move_on_after(1):
            try:
                return await self.fetchval("SELECT 1") == 1
            except (CONNECTION_ERRORS + (DatabaseUnavailable,)):
                return False
        return False


async def _execute(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> str:
    return await conn.execute(sql, *args)


async def _fetch(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> list[asyncpg.Record]:
    return await conn.fetch(sql, *args)


async def _fetchrow(
    conn: asyncpg.Connection, sql: str, args: Sequence[Any]
) -> asyncpg.Record | None:
    return await conn.fetchrow(sql, *args)


async def _fetchval(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> Any:
    return await conn.fetchval(sql, *args)


class _Released:
    """Gives an acquired connection back to its pool, whatever happens (asyncio side)."""

    def __init__(self, pool: asyncpg.Pool, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        self._pool = pool
        self._conn = conn

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        await self._pool.release(self._conn)


@asynccontextmanager
async def open_database(
    dsn: str, *, min_size: int = 2, max_size: int = 10, acquire_timeout: float | None = None,
    command_timeout: float | None = None, connect_attempts: int = 1,
) -> AsyncIterator[Database]:
    """Open a pool on the running trio-asyncio loop and close it on exit.

    With ``connect_attempts`` > 1 an unreachable server is tried again with
    back-off; the last failure is a :class:`StartupError` whose one line names
    the server (never its password) and why.

    Must be entered inside ``trio_asyncio.open_loop()``.
    """
    loop = asyncio.get_event_loop()

    async def _create() -> asyncpg.Pool:
        return await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection,
            command_timeout=command_timeout,
        )

    attempt = 0
    while True:
        attempt += 1
        try:
            pool = await trio_asyncio.aio_as_trio(_create, loop=loop)()
            break
        except CONNECTION_ERRORS as error:
            delay = CONNECT_RETRY.delay(attempt) if attempt < connect_attempts else None
            reason = _one_line(error)
            if delay is None:
                raise StartupError(f"cannot reach PostgreSQL at {describe_dsn(dsn)}"
                                   f" after {attempt} attempt(s): {reason}") from None
            log.warning("PostgreSQL at %s not reachable yet (%s); next try in %.1f s",
                        describe_dsn(dsn), reason, delay)
            await trio.sleep(delay)
    try:
        yield Database(pool, dsn, loop, acquire_timeout=acquire_timeout)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio_asyncio.aio_as_trio(pool.close, loop=loop)()
