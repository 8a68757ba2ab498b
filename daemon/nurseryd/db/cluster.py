"""What daemons sharing one database tell each other: notifications and leadership.

- :func:`listen_for_cluster` keeps one dedicated connection LISTENing on the
  channels of ``migrations/0006_cluster.sql`` and of ``request_cancel`` and hands
  each notification to the supervisor's :class:`~nurseryd.store.base.ClusterSignals`
  (in Trio, never blocking). Notifications are a shortcut: every one of them has a
  poll behind it (claims every ``cluster.claim_poll``, cancel requests every
  second), so a lost connection costs latency, never correctness.
- :class:`Leadership` is "at most one daemon does this now": a session advisory
  lock on a dedicated connection, watched like the owner lock
  (:mod:`.owner_lock`). :func:`lead` runs a duty (the fetch schedule) only while
  this daemon holds it, and a new leader takes over within a second or two of the
  old one dying.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import asyncpg
import trio
import trio_asyncio

from ..store.base import ClusterSignals
from .database import Database
from .dedicated import close_dedicated
from .jobs import CANCEL_CHANNEL, CANCEL_DONE_CHANNEL, CLAIMABLE_CHANNEL, SLOT_FREED_CHANNEL
from .listening import open_listener
from .transient import CONNECTION_ERRORS

log = logging.getLogger(__name__)

#: What asking for leadership may fail with, and be tried again.
_AWAY: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, OSError)

#: How often a leader's lock connection is checked, and a follower tries to lead.
LEADER_CHECK_S = 1.0
#: A new leader whose predecessor did not step down cleanly waits this long before
#: it acts: by then a predecessor that only lost its lock connection has noticed
#: (it checks every LEADER_CHECK_S, each check bounded by as much) and stopped.
LEADER_CONFIRM_S = 2.5


@asynccontextmanager
async def listen_for_cluster(
    db: Database, signals: ClusterSignals
) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """LISTEN on the cluster channels until the block ends; yields ``alive()``."""

    def _int(text: str) -> int | None:
        try:
            return int(text)
        except ValueError:
            return None

    def _deliver(channel: str, payload: str) -> None:  # in Trio
        if channel == CLAIMABLE_CHANNEL:
            signals.claimable(payload)
        elif channel == SLOT_FREED_CHANNEL:
            signals.slot_freed(payload)
        elif (job_id := _int(payload)) is not None:
            if channel == CANCEL_CHANNEL:
                signals.cancel(job_id)
            elif channel == CANCEL_DONE_CHANNEL:
                signals.cancel_done(job_id)

    channels = (CLAIMABLE_CHANNEL, SLOT_FREED_CHANNEL, CANCEL_CHANNEL, CANCEL_DONE_CHANNEL)
    async with open_listener(db, channels, _deliver) as alive:
        yield alive


#: "nurseryd start-up" as a 64-bit advisory lock key (beside migrate.MIGRATION_LOCK_KEY).
STARTUP_LOCK_KEY = 0x6E7572732D757021


@asynccontextmanager
async def one_start_at_a_time(db: Database) -> AsyncIterator[None]:
    """Hold the start-up lock for the block: daemons that start together on a fresh
    database run their start-up checks one after the other (two creating the same
    migration target table at once would fail one of them)."""

    async def _connect() -> asyncpg.Connection:
        conn = await asyncpg.connect(db.dsn, timeout=5)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", STARTUP_LOCK_KEY)
        except BaseException:
            conn.terminate()
            raise
        return conn

    conn = await trio_asyncio.aio_as_trio(_connect, loop=db.loop)()
    try:
        yield
    finally:
        await close_dedicated(db, conn)


def leader_lock_sql(param: str) -> str:
    return f"hashtextextended('nurseryd.leader:' || {param}, 0)"


class Leadership:
    """One duty's leadership, held by at most one daemon of the cluster at a time."""

    def __init__(self, db: Database, name: str, holder: str) -> None:
        self.db = db
        self.name = name
        self.holder = holder
        self.terms = 0
        self._conn: asyncpg.Connection | None = None

    async def _aio(self, fn: Callable[..., Awaitable[Any]], *args: object) -> Any:
        return await trio_asyncio.aio_as_trio(fn, loop=self.db.loop)(*args)

    async def try_lead(self) -> str | None:
        """Take the lock if it is free; returns how the last leader left (``"clean"``,
        or ``"unclean"`` when it may still think it leads), or ``None`` if another
        daemon leads."""

        async def _try() -> tuple[asyncpg.Connection | None, str | None]:
            conn = await asyncpg.connect(self.db.dsn, timeout=5)
            try:
                if not await conn.fetchval(
                        f"SELECT pg_try_advisory_lock({leader_lock_sql('$1')})", self.name):
                    await conn.close()
                    return None, None
                previous = await conn.fetchval(
                    "WITH before AS (SELECT holder FROM cluster_leaders WHERE name = $1)"
                    " , upsert AS (INSERT INTO cluster_leaders (name, holder) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET holder = $2, since = now())"
                    " SELECT holder FROM before", self.name, self.holder)
            except BaseException:
                conn.terminate()
                raise
            return conn, previous

        conn, previous = await self._aio(_try)
        if conn is None:
            return None
        self._conn = conn
        self.terms += 1
        return "clean" if previous is None else "unclean"

    async def alive(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        with trio.move_on_after(LEADER_CHECK_S):
            try:
                return await self._aio(conn.fetchval, "SELECT 1") == 1
            except CONNECTION_ERRORS:
                return False
        return False

    async def step_down(self, *, clean: bool) -> None:
        """Let go; ``clean`` also records that nothing of this term still runs."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                if clean:
                    await self._aio(conn.execute, "UPDATE cluster_leaders SET holder = NULL"
                                    " WHERE name = $1 AND holder = $2", self.name, self.holder)
                await self._aio(conn.close)
            except CONNECTION_ERRORS:
                conn.terminate()


async def lead(
    db: Database, name: str, holder: str, duty: Callable[[bool], Awaitable[None]],
) -> None:
    """Run ``duty`` only while this daemon leads ``name``; until cancelled.

    ``duty(fresh)`` is told whether the previous leader stepped down cleanly (or
    there never was one): a duty that does something "at start" does it only then,
    not when it takes over from a leader that died mid-way. A leader whose lock
    connection stops answering stops its duty at once; a new leader that follows
    an unclean end waits :data:`LEADER_CONFIRM_S` first, so two never act at once.
    """
    leadership = Leadership(db, name, holder)
    while True:
        try:
            how = await leadership.try_lead()
        except _AWAY as error:
            log.warning("%s: could not ask for leadership (%s)", name, error)
            how = None
        if how is None:
            await trio.sleep(LEADER_CHECK_S)
            continue
        clean = False
        try:
            log.info("%s: this daemon leads (previous leader: %s)", name,
                     "stepped down cleanly or none" if how == "clean" else "gone")
            if how == "unclean":
                await trio.sleep(LEADER_CONFIRM_S)
            await _one_term(leadership, partial(duty, how == "clean"))
            log.error("%s: leadership lost (its connection did not answer); stopped", name)
        except BaseException:
            clean = True  # cancelled (shutdown) or failed here: nothing of ours runs now
            raise
        finally:
            await leadership.step_down(clean=clean)
        await trio.sleep(LEADER_CHECK_S)


async def _one_term(leadership: Leadership, duty: Callable[[], Awaitable[None]]) -> None:
    """Run the duty while the leadership's connection answers; return once it does
    not (the duty cancelled). A duty that ends by itself (nothing to do) leaves the
    term idle, still leading, so no other daemon starts it either."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(duty)
        while await leadership.alive():  # noqa: ASYNC110 - a connection check, no event
            await trio.sleep(LEADER_CHECK_S)
        nursery.cancel_scope.cancel()
