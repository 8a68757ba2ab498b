"""Keyset-paged readers of a source database, as the database reader child runs them.

Why keyset pages (``WHERE (key) > (last) ORDER BY key LIMIT n``) rather than
one cursor: each page is a short statement, so nothing holds a transaction (or
a snapshot, or locks) open on the source for the hours a big import may take,
a dropped connection costs one page, and the last key of a committed batch is
all a restarted job needs to continue: it is stored in the checkpoint the
pipeline commits with the batch. Memory holds one page, whatever the table's size.
The same predicate bounded above (``AND (key) <= (until)``) is a key range,
which lets several children read one source at once, each its own range.

These readers run in the child process (:mod:`.database_child`), on plain
asyncio: PostgreSQL through asyncpg (a cancelled ``fetch`` makes asyncpg send a
cancel request for the running statement to the source server), SQLite through
stdlib sqlite3 called directly (the child has nothing else to do while a page
is read; the daemon stops it with a signal). They raise the driver's own
errors; :meth:`Reader.classify` says which are worth a reconnect, asking
:func:`~nurseryd.db.transient.is_transient`, the one home of that rule.

Key values travel as text in the checkpoint for PostgreSQL: it renders them
(``key::text``) and parses them back (``$1::text::keytype``), which round-trips
every key type exactly without a JSON codec per type.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ....db.quoting import quote_ident, quote_qualified
from ....db.transient import is_transient
from .base import SourceError

APPLICATION_NAME = "nurseryd-migration"


class ErrorClass(Enum):
    TRANSIENT = "transient"  # reconnect after a back-off
    FATAL = "fatal"  # fail the job now, no retry loop


def classify_pg_error(error: BaseException) -> ErrorClass:
    """What an asyncpg/socket error means for the job (pure: tested with values)."""
    import asyncpg

    if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError |  # auth, unknown role
                  asyncpg.InvalidCatalogNameError):  # no such database
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


def describe_error(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}" if isinstance(error, OSError) else text


@dataclass
class Page:
    rows: list[Sequence[Any]]
    last_key: list[Any]  # JSON values: resume after this key


@dataclass
class ReaderSpec:
    """What a reader needs: the part of ``[sources.NAME]`` that reaches the child."""

    name: str
    url: str
    key: list[str]
    table: str | None = None
    query: str | None = None
    connect_timeout_s: float = 10.0

    def base_sql(self) -> str:
        if self.query is not None:
            return f"({self.query})"
        return quote_qualified(*(self.table or "").split("."))


def resolve_keys(spec: ReaderSpec, names: Sequence[str]) -> list[str]:
    """The configured key columns as the result spells them (case-insensitive match)."""
    exact = {name: name for name in names}
    folded = {name.casefold(): name for name in names}
    found: list[str] = []
    for key in spec.key:
        name = exact.get(key) or folded.get(key.casefold())
        if name is None:
            raise SourceError(f"source {spec.name}: key column {key!r} is not in the result "
                              f"(columns: {', '.join(names)}); fix [sources.{spec.name}].key")
        found.append(name)
    return found


class Reader:
    """One source connection: what the child's stream loop drives."""

    kind: str
    key_names: list[str]

    def classify(self, error: BaseException) -> ErrorClass:
        raise NotImplementedError

    def _marks(self, first: int) -> str:
        """The placeholders of one key's values, numbered from ``first`` where the
        driver numbers them."""
        raise NotImplementedError

    def _where(self, after: list[Any] | None, until: list[Any] | None,
               args: list[Any]) -> str:
        """``WHERE`` of a key range ``after < key <= until`` (None: unbounded on that
        side); appends its parameters to ``args``."""
        keys = f"({', '.join(f's.{quote_ident(name)}' for name in self.key_names)})"
        terms = []
        for operator, bound in ((">", after), ("<=", until)):
            if bound is not None:
                marks = self._marks(len(args) + 1)
                args.extend(bound)
                terms.append(f"{keys} {operator} {marks}")
        return f" WHERE {' AND '.join(terms)}" if terms else ""

    def _order(self) -> str:
        return ", ".join(f"s.{quote_ident(name)}" for name in self.key_names)

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def columns(self) -> list[str]:
        raise NotImplementedError

    async def count(self, after: list[Any] | None = None) -> int:
        """Rows in the source (after ``after``, when given)."""
        raise NotImplementedError

    async def key_at(self, after: list[Any] | None, offset: int) -> list[Any] | None:
        """The key of the row ``offset`` rows past ``after`` (0: the first), as a
        checkpoint holds it; None when there is no such row. Cuts the key ranges."""
        raise NotImplementedError

    async def page(self, after: list[Any] | None, limit: int,
                   until: list[Any] | None = None) -> Page:
        """Up to ``limit`` rows with ``after < key <= until`` (None: unbounded), in key order."""
        raise NotImplementedError


class PostgresReader(Reader):
    kind = "postgresql"

    def __init__(self, spec: ReaderSpec) -> None:
        self.spec = spec
        self.conn: Any = None
        self.key_names = []
        self.key_types: list[str] = []
        self.width = 0

    def classify(self, error: BaseException) -> ErrorClass:
        return classify_pg_error(error)

    async def connect(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(
            self.spec.url, timeout=self.spec.connect_timeout_s,
            server_settings={"application_name": APPLICATION_NAME,
                             "default_transaction_read_only": "on"})

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        import asyncio

        try:
            await asyncio.wait_for(conn.close(), 5)
        except Exception:  # a dead connection, or a slow close: nothing left to wait for
            conn.terminate()

    async def columns(self) -> list[str]:
        statement = await self.conn.prepare(
            f"SELECT * FROM {self.spec.base_sql()} AS s LIMIT 0")
        attributes = [(a.name, quote_qualified(a.type.schema, a.type.name))
                      for a in statement.get_attributes()]
        names = [name for name, _ in attributes]
        types = dict(attributes)
        self.width = len(names)
        self.key_names = resolve_keys(self.spec, names)
        self.key_types = [types[name] for name in self.key_names]
        return names

    def _marks(self, first: int) -> str:
        """Parameters ``$first…`` for one key, each cast from its text to the key's type."""
        return "(" + ", ".join(f"${first + i}::text::{kind}"
                               for i, kind in enumerate(self.key_types)) + ")"

    async def count(self, after: list[Any] | None = None) -> int:
        args: list[Any] = []
        where = self._where(after, None, args)
        return int(await self.conn.fetchval(
            f"SELECT count(*) FROM {self.spec.base_sql()} AS s{where}", *args))

    async def key_at(self, after: list[Any] | None, offset: int) -> list[Any] | None:
        args: list[Any] = []
        where = self._where(after, None, args)
        texts = ", ".join(f"s.{quote_ident(name)}::text" for name in self.key_names)
        row = await self.conn.fetchrow(
            f"SELECT {texts} FROM {self.spec.base_sql()} AS s{where} ORDER BY {self._order()} "
            f"LIMIT 1 OFFSET ${len(args) + 1}", *args, offset)
        return None if row is None else list(row)

    def page_sql(self, after: list[Any] | None, until: list[Any] | None,
                 args: list[Any]) -> str:
        texts = ", ".join(f"s.{quote_ident(name)}::text" for name in self.key_names)
        where = self._where(after, until, args)
        return (f"SELECT s.*, {texts} FROM {self.spec.base_sql()} AS s{where} "
                f"ORDER BY {self._order()} LIMIT ${len(args) + 1}")

    async def page(self, after: list[Any] | None, limit: int,
                   until: list[Any] | None = None) -> Page:
        args: list[Any] = []
        sql = self.page_sql(after, until, args)
        rows = await self.conn.fetch(sql, *args, limit)
        if not rows:
            return Page([], after or [])
        last = rows[-1]
        return Page(rows, [last[self.width + i] for i in range(len(self.key_names))])


class SqliteReader(Reader):
    """stdlib sqlite3, read-only (``mode=ro`` and ``query_only``)."""

    kind = "sqlite"

    def __init__(self, spec: ReaderSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.key_names = []
        self.key_positions: list[int] = []

    def classify(self, error: BaseException) -> ErrorClass:
        return classify_sqlite_error(error)

    async def connect(self) -> None:
        if not self.path.exists():  # mode=ro would say only "unable to open database file"
            raise sqlite3.OperationalError(f"unable to open database file {self.path}: "
                                           "no such file")
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        conn.execute("PRAGMA query_only = ON")
        self.conn = conn

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.OperationalError("unable to open database: connection closed")
        return self.conn

    async def columns(self) -> list[str]:
        sql = f"SELECT * FROM {self.spec.base_sql()} AS s LIMIT 0"
        names = [d[0] for d in self._conn().execute(sql).description]
        self.key_names = resolve_keys(self.spec, names)
        self.key_positions = [names.index(name) for name in self.key_names]
        return names

    def _marks(self, first: int) -> str:
        return "(" + ", ".join("?" * len(self.key_names)) + ")"

    async def count(self, after: list[Any] | None = None) -> int:
        args: list[Any] = []
        where = self._where(after, None, args)
        sql = f"SELECT count(*) FROM {self.spec.base_sql()} AS s{where}"
        return int(self._conn().execute(sql, args).fetchone()[0])

    async def key_at(self, after: list[Any] | None, offset: int) -> list[Any] | None:
        args: list[Any] = []
        where = self._where(after, None, args)
        keys = ", ".join(f"s.{quote_ident(name)}" for name in self.key_names)
        sql = (f"SELECT {keys} FROM {self.spec.base_sql()} AS s{where} ORDER BY {self._order()} "
               f"LIMIT 1 OFFSET ?")
        row = self._conn().execute(sql, [*args, offset]).fetchone()
        return None if row is None else self._checked_key(list(row))

    async def page(self, after: list[Any] | None, limit: int,
                   until: list[Any] | None = None) -> Page:
        args: list[Any] = []
        where = self._where(after, until, args)
        sql = (f"SELECT s.* FROM {self.spec.base_sql()} AS s{where} ORDER BY {self._order()} "
               f"LIMIT ?")
        rows = self._conn().execute(sql, [*args, limit]).fetchall()
        if not rows:
            return Page([], after or [])
        last = rows[-1]
        return Page(rows, self._checked_key([last[i] for i in self.key_positions]))

    def _checked_key(self, key: list[Any]) -> list[Any]:
        if any(isinstance(value, bytes | bytearray) for value in key):
            raise SourceError(f"source {self.spec.name}: BLOB key columns cannot be used for "
                              "keyset paging; pick a text or integer key")
        return key
