"""Where migrated rows go (``[targets.NAME]``) and how migrations are limited (``[migration]``).

A target is a table, its columns with PostgreSQL types, the key columns the
upsert conflicts on, and header aliases (matched case-, spacing- and
punctuation-insensitively, so ``Chat ID``, ``chat_id`` and ``ID чата`` can all
feed ``chat_id``). The built-in ``chats`` target matches
``../shared/bench/gen_chats_xlsx.py`` so that a fresh daemon imports that
workbook with no configuration at all.

Example::

    [targets.orders]
    table = "orders"
    key = ["order_id"]
    columns = [
      { name = "order_id", type = "bigint", nullable = false, aliases = ["Номер заказа"] },
      { name = "amount",   type = "numeric(12,2)" },
      { name = "placed",   type = "timestamptz", aliases = ["Дата"] },
    ]

This module only parses configuration (no I/O), because the parser's child
process imports the column definitions too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...config import (
    ConfigError,
    ConfigSection,
    check_keys,
    parse_duration,
    parse_positive_int,
)
from .coerce import ColumnSpec, parse_column_type
from .xlsx_checks import ParseCaps

if TYPE_CHECKING:
    from ...config import Settings

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Target:
    name: str
    table: str  # possibly schema-qualified: "schema.table"
    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...]

    @property
    def schema_and_table(self) -> tuple[str, str]:
        schema, _, table = self.table.rpartition(".")
        return schema or "public", table

    @property
    def quoted_table(self) -> str:
        # Imported here: importing nurseryd.db loads asyncpg and trio-asyncio, which
        # the parser child (it imports this module) must not pay for at start-up.
        from ...db.quoting import quote_qualified

        return quote_qualified(*self.schema_and_table)

    def column(self, name: str) -> ColumnSpec:
        return next(column for column in self.columns if column.name == name)


@dataclass(frozen=True)
class MigrationSettings:
    default_target: str = "chats"
    max_upload_bytes: int = 200 * 1024**2
    #: Memory the parser child may use (RLIMIT_AS); the fast in-memory reader is
    #: chosen only when its estimate for the sheet fits in it.
    memory_budget_bytes: int = 1024 * 1024**2
    parse_timeout_s: float = 1800.0
    batch_rows: int = 5000
    #: A batch's COPY text stops growing past about this many bytes (fewer rows
    #: then): what crosses the pipe and waits in the pipeline is bounded by bytes
    #: too, not only by rows, whatever a hostile file puts in its cells.
    batch_bytes: int = 8 * 1024**2
    timezone: str = "UTC"
    #: "auto" (slice by slice, each slice through fastexcel/Arrow where it can, else as
    #: python-calamine rows; a sheet that cannot be cut: calamine whole when it fits the
    #: budget, else openpyxl), "arrow-stream", "calamine-stream" (slices, rows only),
    #: "calamine" (whole sheet) or "openpyxl".
    reader: str = "auto"
    #: Sheet XML per slice for calamine-stream: memory of the parser grows with
    #: it (~3x, twice over while the next slices parse), speed does not.
    slice_bytes: int = 8 * 1024**2
    caps: ParseCaps = ParseCaps()
    #: Rejected rows stored per job, raw values included; the rest are only counted
    #: (a small upload declaring 5 M bad rows must not store 5 M rows of customer data).
    max_stored_rejects: int = 10_000
    #: Seconds the workbook of an import that ended failed, cancelled or timed out
    #: is kept, so ``POST /jobs/{id}/retry`` can resume it from its checkpoint; a
    #: completed import's file goes at once. 0: removed as soon as the job ends.
    keep_ended_uploads_s: float = 86400.0


def _c(name: str, type_: str, nullable: bool = True, *aliases: str) -> ColumnSpec:
    return ColumnSpec(name=name, type=type_, nullable=nullable, aliases=tuple(aliases),
                      key=name == "chat_id")


#: Matches ../shared/bench/gen_chats_xlsx.py (13 columns).
CHATS_TARGET = Target(
    name="chats",
    table="chats",
    key=("chat_id",),
    columns=(
        _c("chat_id", "bigint", False, "id", "chat", "id чата", "номер чата", "чат"),
        _c("external_id", "text", False, "external id", "внешний id", "внешний идентификатор"),
        _c("customer_name", "text", True, "customer", "name", "client", "клиент", "имя клиента",
           "имя", "фио"),
        _c("customer_email", "text", True, "email", "e-mail", "почта", "электронная почта"),
        _c("phone", "text", True, "phone number", "телефон", "номер телефона"),
        _c("channel", "text", False, "канал", "source"),
        _c("status", "text", False, "статус", "state"),
        _c("created_at", "timestamptz", False, "created", "создан", "дата создания", "создано"),
        _c("closed_at", "timestamptz", True, "closed", "закрыт", "дата закрытия", "закрыто"),
        _c("message_count", "integer", False, "messages", "сообщений", "количество сообщений",
           "число сообщений"),
        _c("rating", "double precision", True, "score", "оценка", "рейтинг"),
        _c("last_message", "text", True, "last message", "последнее сообщение", "сообщение"),
        _c("is_vip", "boolean", False, "vip", "вип", "vip клиент"),
    ),
)
BUILTIN_TARGETS = {"chats": CHATS_TARGET}


def _parse_target(name: str, raw: Any) -> Target:
    where = f"targets.{name}"
    if not _IDENT.match(name):
        raise ConfigError(where, "target names are letters, digits and _ (at most 63)")
    if not isinstance(raw, dict):
        raise ConfigError(where, "expected a table with table, key and columns")
    check_keys(where, raw, {"table", "key", "columns"})
    table = raw.get("table", name)
    if not isinstance(table, str) or not all(_IDENT.match(part) for part in table.split(".")) \
            or table.count(".") > 1:
        raise ConfigError(f"{where}.table", f"expected a table name like 'chats' or "
                          f"'schema.chats' (letters, digits, _), got {table!r}")
    columns_raw = raw.get("columns")
    if not isinstance(columns_raw, list) or not columns_raw:
        raise ConfigError(f"{where}.columns", "expected a non-empty array of "
                          "{ name = ..., type = ..., nullable = ..., aliases = [...] }")
    key_raw = raw.get("key")
    if isinstance(key_raw, str):
        key_raw = [key_raw]
    if not isinstance(key_raw, list) or not key_raw or not all(isinstance(k, str)
                                                               for k in key_raw):
        raise ConfigError(f"{where}.key", "expected the key column name(s), e.g. key = ['id']")
    names: list[str] = []
    specs: list[tuple[str, str, bool, tuple[str, ...]]] = []
    for index, column in enumerate(columns_raw):
        at = f"{where}.columns[{index}]"
        if not isinstance(column, dict):
            raise ConfigError(at, "expected { name = ..., type = ... }")
        unknown = set(column) - {"name", "type", "nullable", "aliases"}
        if unknown:
            raise ConfigError(f"{at}.{sorted(unknown)[0]}",
                              "unknown key; allowed: name, type, nullable, aliases")
        column_name = column.get("name")
        if not isinstance(column_name, str) or not _IDENT.match(column_name):
            raise ConfigError(f"{at}.name", f"expected a column name (letters, digits, _), "
                              f"got {column_name!r}")
        if column_name in names:
            raise ConfigError(f"{at}.name", f"column {column_name!r} listed twice")
        try:
            parse_column_type(column.get("type", ""))
        except ValueError as error:
            raise ConfigError(f"{at}.type", str(error)) from None
        nullable = column.get("nullable", True)
        if not isinstance(nullable, bool):
            raise ConfigError(f"{at}.nullable", "expected true or false")
        aliases = column.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ConfigError(f"{at}.aliases", "expected an array of header names")
        names.append(column_name)
        specs.append((column_name, str(column["type"]), nullable, tuple(aliases)))
    for key in key_raw:
        if key not in names:
            raise ConfigError(f"{where}.key", f"key column {key!r} is not among the columns")
    columns = tuple(
        ColumnSpec(name=n, type=t, nullable=nullable and n not in key_raw, aliases=a,
                   key=n in key_raw)
        for n, t, nullable, a in specs)
    return Target(name=name, table=table, columns=columns, key=tuple(key_raw))


def parse_targets(raw: Any, whole: Mapping[str, Any]) -> dict[str, Target]:
    """Built-in targets, overridden or extended by ``[targets.NAME]`` tables."""
    targets = dict(BUILTIN_TARGETS)
    if raw is None:
        return targets
    if not isinstance(raw, dict):
        raise ConfigError("targets", "expected [targets.NAME] tables")
    for name, table in raw.items():
        targets[name] = _parse_target(name, table)
    tables: dict[str, str] = {}
    for target in targets.values():
        other = tables.setdefault(target.table, target.name)
        if other != target.name:
            raise ConfigError(f"targets.{target.name}.table",
                              f"table {target.table!r} is already used by target {other!r}")
    return targets


_MIGRATION_KEYS = {
    "default_target", "max_upload_bytes", "memory_budget_mb", "parse_timeout_s", "batch_rows",
    "batch_bytes", "timezone", "reader", "max_entry_bytes", "max_total_bytes",
    "max_compression_ratio", "max_rows", "max_columns", "slice_bytes", "max_stored_rejects",
    "keep_ended_uploads",
}


def parse_migration(raw: Any, whole: Mapping[str, Any]) -> MigrationSettings:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("migration", "expected a [migration] table")
    check_keys("migration", raw, _MIGRATION_KEYS)
    base = MigrationSettings()
    default_target = raw.get("default_target", base.default_target)
    targets = set(BUILTIN_TARGETS) | set((whole.get("targets") or {}) if isinstance(
        whole.get("targets"), dict) else {})
    if default_target not in targets:
        known = ", ".join(sorted(targets))
        raise ConfigError("migration.default_target",
                          f"{default_target!r} is not a target; known: {known}")
    timezone = raw.get("timezone", base.timezone)
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(str(timezone))
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise ConfigError("migration.timezone", f"unknown time zone {timezone!r}; use an IANA "
                          "name like 'UTC' or 'Europe/Moscow'") from None
    reader = raw.get("reader", base.reader)
    if reader not in ("auto", "arrow-stream", "calamine-stream", "calamine", "openpyxl"):
        raise ConfigError("migration.reader", "expected 'auto', 'arrow-stream', "
                          "'calamine-stream', 'calamine' or 'openpyxl'")
    ratio = raw.get("max_compression_ratio", base.caps.max_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 2:
        raise ConfigError("migration.max_compression_ratio", "expected a number >= 2")
    caps = ParseCaps(
        max_entry_bytes=parse_positive_int("migration.max_entry_bytes",
                                           raw.get("max_entry_bytes", base.caps.max_entry_bytes)),
        max_total_bytes=parse_positive_int("migration.max_total_bytes",
                                           raw.get("max_total_bytes", base.caps.max_total_bytes)),
        max_ratio=float(ratio),
        max_rows=parse_positive_int("migration.max_rows", raw.get("max_rows",
                                                                  base.caps.max_rows)),
        max_columns=parse_positive_int("migration.max_columns",
                                       raw.get("max_columns", base.caps.max_columns)),
    )
    budget_mb = parse_positive_int("migration.memory_budget_mb",
                                   raw.get("memory_budget_mb",
                                           base.memory_budget_bytes // 1024**2), minimum=128)
    timeout = parse_duration("migration.parse_timeout_s",
                             raw.get("parse_timeout_s", base.parse_timeout_s))
    if timeout <= 0:
        raise ConfigError("migration.parse_timeout_s", "must be > 0")
    return MigrationSettings(
        default_target=str(default_target),
        max_upload_bytes=parse_positive_int("migration.max_upload_bytes",
                                            raw.get("max_upload_bytes", base.max_upload_bytes)),
        memory_budget_bytes=budget_mb * 1024**2,
        parse_timeout_s=timeout,
        batch_rows=parse_positive_int("migration.batch_rows",
                                      raw.get("batch_rows", base.batch_rows), minimum=1),
        batch_bytes=parse_positive_int("migration.batch_bytes",
                                       raw.get("batch_bytes", base.batch_bytes),
                                       minimum=64 * 1024),
        timezone=str(timezone),
        reader=str(reader),
        slice_bytes=parse_positive_int("migration.slice_bytes",
                                       raw.get("slice_bytes", base.slice_bytes),
                                       minimum=64 * 1024),
        caps=caps,
        max_stored_rejects=parse_positive_int(
            "migration.max_stored_rejects",
            raw.get("max_stored_rejects", base.max_stored_rejects), minimum=0),
        keep_ended_uploads_s=parse_duration(
            "migration.keep_ended_uploads",
            raw.get("keep_ended_uploads", base.keep_ended_uploads_s)),
    )


#: ``[targets.NAME]`` tables, over the built-in targets.
TARGETS_SECTION: ConfigSection[dict[str, Target]] = ConfigSection("targets", parse_targets,
                                                                  dict)
#: The ``[migration]`` table.
MIGRATION_SECTION: ConfigSection[MigrationSettings] = ConfigSection(
    "migration", parse_migration, MigrationSettings)


def migration_settings(settings: Settings) -> MigrationSettings:
    """The parsed ``[migration]`` section."""
    return settings.section(MIGRATION_SECTION)


def configured_targets(settings: Settings) -> dict[str, Target]:
    """Every target by name: the built-in ones and ``[targets.NAME]``."""
    return settings.section(TARGETS_SECTION)
