"""This daemon's claim on its jobs: a session advisory lock, held and watched.

Other daemons (and our own next start) treat an owner whose lock is free as dead
and release its unfinished jobs for whoever has free slots to claim
(``PostgresJobStore.release_orphans``): at a start at once, a running peer's once
its lock has been seen free for ``supervisor.core.TAKEOVER_CONFIRM_S``. The lock
lives on a dedicated connection, so losing that connection — a
``pg_terminate_backend``, a PostgreSQL restart, a failover, a proxy timeout —
silently frees it, and a peer may take jobs this daemon is still running; hence
the watch below must notice within that confirm window (it takes at most two
:data:`WATCH_INTERVAL_S`: one sleep, one bounded check).

So the lock is watched. Every :data:`WATCH_INTERVAL_S` the connection is asked a
trivial question; when it does not answer, the claim is lost: ``on_lost`` runs
(the supervisor stops its running jobs, which go back to ``queued``, and starts
none until the claim is back), and the lock is taken again on a new connection
with back-off. Once held again, ``on_regained`` runs. Whatever a peer took in
between is fenced: every write of a running job is guarded by owner and attempt,
so this daemon's stale attempts change nothing.

Decision: re-acquire rather than exit. An exit would only trade the same
requeue for a restart, and a daemon without systemd would stay down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import trio
import trio_asyncio

from ..backoff import RetryPolicy
from .database import Database
from .dedicated import close_dedicated
from .jobs import owner_lock_sql
from .transient import CONNECTION_ERRORS

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often the lock's connection is checked; also the bound on each check.
WATCH_INTERVAL_S = 1.0
#: Re-acquiring after a loss: quick at first, then at most every 5 s.
REACQUIRE = RetryPolicy(max_attempts=1_000_000, base_s=0.2, cap_s=5.0, jitter_floor=0.5)


class OwnerLock:
    """The lock's connection, and whether this daemon holds its claim now."""

    def __init__(self, db: Database, owner: str) -> None:
        self.db = db
        self.owner = owner
        self.held = False
        self.losses = 0
        self._conn: asyncpg.Connection | None = None

    async def _aio(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        return await trio_asyncio.aio_as_trio(fn, loop=self.db.loop)(*args)

    async def acquire(self, *, wait: bool) -> bool:
        """Take the lock on a new connection; with ``wait``, block until it is free."""

        async def _connect() -> asyncpg.Connection | None:
            conn = await asyncpg.connect(self.db.dsn)
            try:
                if wait:
                    await conn.execute(f"SELECT pg_advisory_lock({owner_lock_sql('$1')})",
                                       self.owner)
                elif not await conn.fetchval(
                        f"SELECT pg_try_advisory_lock({owner_lock_sql('$1')})", self.owner):
                    await conn.close()
                    return None
            except BaseException:
                conn.terminate()
                raise
            return conn

        conn = await self._aio(_connect)
        if conn is None:
            return False
        self._conn = conn
        self.held = True
        return True

    async def alive(self) -> bool:
        """Does the lock's connection still answer?"""
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        with trio.move_on_after(WATCH_INTERVAL_S):
            try:
                return await self._aio(conn.fetchval, "SELECT 1") == 1
            except CONNECTION_ERRORS:
                return False
        return False

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self.held = False
        if conn is not None:
            await close_dedicated(self.db, conn)

    async def watch(self, on_lost: Callable[[], None], on_regained: Callable[[], None]) -> None:
        """Run until cancelled: notice a lost lock, tell, take it again, tell."""
        while True:
            await trio.sleep(WATCH_INTERVAL_S)
            if await self.alive():
                continue
            self.losses += 1
            self.held = False
            log.error("owner lock lost (its connection did not answer); stopping this"
                      " daemon's jobs and taking the lock again")
            on_lost()
            await self.close()
            attempt = 0
            while True:
                attempt += 1
                try:
                    if await self.acquire(wait=False):
                        break
                    reason = "another session holds it"
                except CONNECTION_ERRORS as error:
                    reason = type(error).__name__
                delay = REACQUIRE.delay(attempt) or REACQUIRE.cap_s
                log.warning("owner lock not taken yet (%s); next try in %.1f s", reason, delay)
                await trio.sleep(delay)
            log.info("owner lock taken again")
            on_regained()


@asynccontextmanager
async def hold_owner_lock(
    db: Database, owner: str, *, on_lost: Callable[[], None] = lambda: None,
    on_regained: Callable[[], None] = lambda: None,
) -> AsyncIterator[OwnerLock]:
    """Hold and watch this daemon's lock for the life of the block."""
    lock = OwnerLock(db, owner)
    await lock.acquire(wait=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.watch, on_lost, on_regained)
            yield lock
            nursery.cancel_scope.cancel()
    finally:
        await lock.close()
