"""Rows from another database (PostgreSQL or SQLite), paged by key, resumable.

Why keyset pages (``WHERE (key) > (last) ORDER BY key LIMIT n``) rather than
one cursor: each page is a short statement, so nothing holds a transaction (or
a snapshot, or locks) open on the source for the hours a big import may take,
a dropped connection costs one page, and the last key of a committed batch is
all a restarted job needs to continue: it is stored in the checkpoint the
pipeline commits with the batch. Memory holds one page (plus the one the
pipeline is writing), whatever the table's size.

PostgreSQL goes through asyncpg on trio-asyncio's loop, one asyncio coroutine
per round trip (see ``db/database.py`` for why): a Trio cancellation becomes an
asyncio cancellation inside ``conn.fetch``, and asyncpg sends a cancel request
for the running statement to the source server before the connection is
closed. The source is not the daemon's database, so this module opens its own
connection (``application_name = nurseryd-migration``, read-only sessions).

SQLite runs in worker threads (``trio.to_thread``), one page per call; a
cancellation interrupts the running statement (``sqlite3.Connection.interrupt``).

Key values travel as text in the checkpoint: PostgreSQL renders them
(``key::text``) and parses them back (``$1::text::keytype``), which round-trips
every key type exactly without a JSON codec per type.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import asyncpg
import outcome
import trio
import trio_asyncio

from ....backoff import GaveUp, RetryPolicy, TryAgain, retry
from ....db.quoting import quote_ident, quote_qualified
from ....db.transient import is_transient
from ..coerce import ColumnSpec
from ..source_config import DatabaseSourceConfig, SecretMissing, sqlite_path
from .base import Emitter, SourceError, SourceEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
APPLICATION_NAME = "nurseryd-migration"


class ErrorClass(Enum):
    TRANSIENT = "transient"  # reconnect after a back-off
    FATAL = "fatal"  # fail the job now, no retry loop


_PG_FATAL_CONNECT = (asyncpg.InvalidAuthorizationSpecificationError,  # auth, unknown role
                     asyncpg.InvalidCatalogNameError)  # no such database


def classify_pg_error(error: BaseException) -> ErrorClass:
    """What an asyncpg/socket error means for the job (pure: tested with values)."""
    if isinstance(error, _PG_FATAL_CONNECT):
        return ErrorClass.FATAL
    return ErrorClass.TRANSIENT if is_transient(error) else ErrorClass.FATAL


_SQLITE_TRANSIENT_WORDS = ("unable to open", "database is locked", "disk i/o error")


def classify_sqlite_error(error: BaseException) -> ErrorClass:
    if isinstance(error, sqlite3.OperationalError) and any(
            word in str(error).lower() for word in _SQLITE_TRANSIENT_WORDS):
        return ErrorClass.TRANSIENT
    if isinstance(error, OSError):
        return ErrorClass.TRANSIENT
    return ErrorClass.FATAL


def reconnect_policy(config: DatabaseSourceConfig) -> RetryPolicy:
    """Exponential back-off with *equal* jitter: in [½, 1) of each step.

    Unlike HTTP retries (full jitter), a reconnect to a database that just
    refused us should never be immediate.
    """
    return RetryPolicy(config.connect_attempts, config.retry_backoff_s,
                       config.retry_backoff_max_s, jitter_floor=0.5)


def describe_error(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}" if isinstance(error, OSError) else text


@dataclass
class Page:
    rows: list[Sequence[Any]]
    last_key: list[Any]  # JSON values: resume after this key


class Backend:
    """One source database connection: what :class:`DatabaseSource` drives."""

    kind: str
    config: DatabaseSourceConfig
    conn: Any = None  # the open connection, None while disconnected

    def classify(self, error: BaseException) -> ErrorClass:
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def columns(self) -> list[str]:
        raise NotImplementedError

    async def count(self) -> int:
        raise NotImplementedError

    async def page(self, after: list[Any] | None, limit: int) -> Page:
        raise NotImplementedError

    def base_sql(self) -> str:
        config = self.config
        if config.query is not None:
            return f"({config.query})"
        return quote_qualified(*(config.table or "").split("."))


# ------------------------------------------------------------------- PostgreSQL


async def _pg_connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        url, timeout=3600,  # the Trio cancel scope around this call is the real limit
        server_settings={"application_name": APPLICATION_NAME,
                         "default_transaction_read_only": "on"})


async def _pg_attributes(conn: asyncpg.Connection, sql: str) -> list[tuple[str, str]]:
    statement = await conn.prepare(sql)
    return [(a.name, quote_qualified(a.type.schema, a.type.name))
            for a in statement.get_attributes()]


async def _pg_fetch(conn: asyncpg.Connection, sql: str, args: Sequence[Any]) -> list[Any]:
    return await conn.fetch(sql, *args)


async def _pg_fetchval(conn: asyncpg.Connection, sql: str) -> Any:
    return await conn.fetchval(sql)


class PostgresBackend(Backend):
    kind = "postgresql"

    def __init__(self, config: DatabaseSourceConfig, url: str) -> None:
        self.config = config
        self.url = url
        self.conn: asyncpg.Connection | None = None
        self.key_names: list[str] = []
        self.key_types: list[str] = []
        self.width = 0

    def classify(self, error: BaseException) -> ErrorClass:
        return classify_pg_error(error)

    async def connect(self) -> None:
        with trio.fail_after(self.config.connect_timeout_s):
            self.conn = await trio_asyncio.aio_as_trio(_pg_connect)(self.url)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(5) as scope:
            try:
                await trio_asyncio.aio_as_trio(conn.close)()
            except Exception as error:  # a dead connection: nothing left to close
                log.debug("closing source connection: %s", error)
        if scope.cancelled_caught:
            conn.terminate()

    def _conn(self) -> asyncpg.Connection:
        if self.conn is None:
            raise asyncpg.InterfaceError("connection is closed")
        return self.conn

    async def columns(self) -> list[str]:
        attributes = await trio_asyncio.aio_as_trio(_pg_attributes)(
            self._conn(), f"SELECT * FROM {self.base_sql()} AS s LIMIT 0")
        names = [name for name, _ in attributes]
        types = dict(attributes)
        self.width = len(names)
        self.key_names = resolve_keys(self.config, names)
        self.key_types = [types[name] for name in self.key_names]
        return names

    async def count(self) -> int:
        return int(await trio_asyncio.aio_as_trio(_pg_fetchval)(
            self._conn(), f"SELECT count(*) FROM {self.base_sql()} AS s"))

    def page_sql(self, resuming: bool) -> str:
        keys = [f"s.{quote_ident(name)}" for name in self.key_names]
        texts = ", ".join(f"{key}::text" for key in keys)
        where = ""
        if resuming:
            casts = ", ".join(f"${i}::text::{kind}"
                              for i, kind in enumerate(self.key_types, 1))
            where = f" WHERE ({', '.join(keys)}) > ({casts})"
        limit = f"${len(self.key_names) + 1}" if resuming else "$1"
        return (f"SELECT s.*, {texts} FROM {self.base_sql()} AS s{where} "
                f"ORDER BY {', '.join(keys)} LIMIT {limit}")

    async def page(self, after: list[Any] | None, limit: int) -> Page:
        args = [*after, limit] if after is not None else [limit]
        rows = await trio_asyncio.aio_as_trio(_pg_fetch)(
            self._conn(), self.page_sql(after is not None), args)
        if not rows:
            return Page([], after or [])
        last = rows[-1]
        return Page(rows, [last[self.width + i] for i in range(len(self.key_names))])


# ----------------------------------------------------------------------- SQLite


class SqliteBackend(Backend):
    """stdlib sqlite3, read-only, every call in a worker thread."""

    kind = "sqlite"

    def __init__(self, config: DatabaseSourceConfig, url: str) -> None:
        self.config = config
        self.path = sqlite_path(url)
        self.conn: sqlite3.Connection | None = None
        self.key_names: list[str] = []
        self.key_positions: list[int] = []

    def classify(self, error: BaseException) -> ErrorClass:
        return classify_sqlite_error(error)

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():  # mode=ro would say only "unable to open database file"
            raise sqlite3.OperationalError(f"unable to open database file {self.path}: "
                                           "no such file")
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                               check_same_thread=False, timeout=5)
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def connect(self) -> None:
        self.conn = await trio.to_thread.run_sync(self._open)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in a thread; a Trio cancellation interrupts the statement."""
        conn = self.conn
        if conn is None:
            raise sqlite3.OperationalError("unable to open database: connection closed")
        finished = False

        async def interrupt_on_cancel() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    conn.interrupt()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_on_cancel)
            # Captured so that an error of the statement leaves the nursery as itself,
            # not wrapped in an exception group.
            result = await outcome.acapture(trio.to_thread.run_sync, fn, conn)
            finished = True
            nursery.cancel_scope.cancel()
        return result.unwrap()

    async def columns(self) -> list[str]:
        sql = f"SELECT * FROM {self.base_sql()} AS s LIMIT 0"
        names = await self._call(lambda conn: [d[0] for d in conn.execute(sql).description])
        self.key_names = resolve_keys(self.config, names)
        self.key_positions = [names.index(name) for name in self.key_names]
        return names

    async def count(self) -> int:
        sql = f"SELECT count(*) FROM {self.base_sql()} AS s"
        return int(await self._call(lambda conn: conn.execute(sql).fetchone()[0]))

    async def page(self, after: list[Any] | None, limit: int) -> Page:
        keys = [f"s.{quote_ident(name)}" for name in self.key_names]
        where = ""
        if after is not None:
            where = f" WHERE ({', '.join(keys)}) > ({', '.join('?' * len(keys))})"
        sql = (f"SELECT s.* FROM {self.base_sql()} AS s{where} ORDER BY {', '.join(keys)} "
               f"LIMIT ?")
        args = [*(after or []), limit]
        rows = await self._call(lambda conn: conn.execute(sql, args).fetchall())
        if not rows:
            return Page([], after or [])
        last = rows[-1]
        key = [last[i] for i in self.key_positions]
        if any(isinstance(value, bytes | bytearray) for value in key):
            raise SourceError(f"source {self.config.name}: BLOB key columns cannot be used for "
                              "keyset paging; pick a text or integer key")
        return Page(rows, key)


def resolve_keys(config: DatabaseSourceConfig, names: Sequence[str]) -> list[str]:
    """The configured key columns as the result spells them (case-insensitive match)."""
    exact = {name: name for name in names}
    folded = {name.casefold(): name for name in names}
    found: list[str] = []
    for key in config.key:
        name = exact.get(key) or folded.get(key.casefold())
        if name is None:
            raise SourceError(f"source {config.name}: key column {key!r} is not in the result "
                              f"(columns: {', '.join(names)}); fix [sources.{config.name}].key")
        found.append(name)
    return found


# ------------------------------------------------------------------------ source


@dataclass
class DatabaseSource:
    """A configured ``[sources.NAME]`` database, streamed page by page."""

    config: DatabaseSourceConfig
    source_type: str = "database"
    #: Injected by tests to watch back-off decisions; real runs sleep.
    sleep: Callable[[float], Awaitable[None]] = trio.sleep
    stats: dict[str, Any] = field(default_factory=lambda: {"pages": 0, "reconnects": 0})
    _backend: Backend | None = None

    def _make_backend(self) -> Backend:
        try:
            url = self.config.resolve_url()
            if url.startswith("sqlite:///"):
                return SqliteBackend(self.config, url)
        except (SecretMissing, ValueError) as error:
            raise SourceError(str(error)) from None
        return PostgresBackend(self.config, url)

    async def _attempt(self, backend: Backend, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` (connecting first if needed), reconnecting after transient
        errors with back-off; the attempt count restarts after every success."""
        where = f"source {self.config.name} ({backend.kind})"

        async def attempt(number: int) -> T:
            try:
                if backend.conn is None:
                    await backend.connect()
                return await operation()
            except SourceError:
                raise
            except Exception as error:
                await backend.close()
                # An error caused by our own cancellation (SQLite's "interrupted") is
                # not the source's fault: let the cancellation through instead.
                await trio.lowlevel.checkpoint_if_cancelled()
                if isinstance(error, trio.TooSlowError):
                    reason = f"no connection within {self.config.connect_timeout_s:g} s"
                else:
                    reason = describe_error(error)
                if backend.classify(error) is ErrorClass.FATAL:
                    raise SourceError(f"{where}: {reason}") from None
                raise TryAgain(reason) from None

        def reconnecting(number: int, delay: float, failure: TryAgain) -> None:
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", where, failure.reason,
                        delay, number + 1, self.config.connect_attempts)
            self.stats["reconnects"] += 1

        try:
            return await retry(reconnect_policy(self.config), attempt, on_retry=reconnecting,
                               sleep=self.sleep)
        except GaveUp as gave_up:
            raise SourceError(f"{where} unreachable after {gave_up.attempts} attempts: "
                              f"{gave_up.reason}") from None

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        backend = self._backend = self._make_backend()
        try:
            await self._stream(backend, columns, resume, send)
        finally:
            await backend.close()

    async def _stream(self, backend: Backend, columns: Sequence[ColumnSpec], resume: Any,
                      send: trio.MemorySendChannel[SourceEvent]) -> None:
        names = await self._attempt(backend, backend.columns)
        emit = Emitter(columns, send, where=f"source {self.config.name}")
        await emit.send_header(names)
        await emit.send_total(await self._attempt(backend, backend.count))
        after, done = _resume_point(resume)
        limit = self.config.batch_rows
        while True:
            page = await self._attempt(backend, functools.partial(backend.page, after, limit))
            if not page.rows:
                return
            if any(value is None for value in page.last_key):
                null_keys = [n for n, v in zip(backend_keys(backend), page.last_key,
                                               strict=True) if v is None]
                raise SourceError(f"source {self.config.name}: key column(s) "
                                  f"{', '.join(null_keys)} hold NULL; keyset paging needs "
                                  "non-null keys")
            self.stats["pages"] += 1
            numbered = [(done + index, row) for index, row in enumerate(page.rows, 1)]
            done += len(page.rows)
            after = page.last_key
            # Coerced in a worker thread (the emitter's default). A page ahead was
            # measured too: no gain (the GIL), a third more memory.
            await emit.send_rows(numbered, {"after": after, "rows": done})
            if len(page.rows) < limit:
                return

    def describe(self) -> dict[str, Any]:
        backend = self._backend
        return {**self.config.describe(),
                "database": backend.kind if backend else None, **self.stats}


def backend_keys(backend: Backend) -> list[str]:
    return list(getattr(backend, "key_names", []))


def _resume_point(resume: Any) -> tuple[list[Any] | None, int]:
    """(keys to continue after, rows already consumed) from a committed position."""
    if isinstance(resume, dict) and isinstance(resume.get("after"), list):
        return list(resume["after"]), int(resume.get("rows") or 0)
    return None, 0

