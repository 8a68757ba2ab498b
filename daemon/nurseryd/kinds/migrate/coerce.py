"""Turn whatever a source hands us into PostgreSQL COPY text fields, or say why not.

Pure functions only (no I/O, no trio, no asyncpg), because this module runs in
two places: inside the Excel parser's child process (so the daemon's own CPU
stays free for HTTP) and in the daemon for sources that yield few rows.

Why the output is COPY *text* fields rather than typed Python values: the child
can then send ready-to-load bytes, and the daemon only forwards them to
PostgreSQL without decoding a single value. Each converter returns ``None`` for
SQL NULL or a string PostgreSQL parses for the column's type; text values are
escaped for the COPY text format here.

What the readers give us (measured, see ``docs/migrations.md``):
- python-calamine: ``''`` for empty cells, ``float`` for every number
  (``100001.0``), ``datetime``/``date``/``time``/``timedelta`` for date cells,
  ``bool`` for booleans.
- openpyxl: ``None`` for empty cells, ``int`` for whole numbers (a 5.0 rating is
  ``5``), ``float`` otherwise, ``datetime`` for date cells.
- Databases / Google Sheets (issue 5): typed values or strings.

Naive timestamps are emitted without an offset on purpose: the loader sets the
session ``TimeZone`` to the configured zone, so PostgreSQL applies the zone
(and its DST rules) itself, which is both exact and much cheaper than
attaching ``zoneinfo`` objects in Python to every value.
"""

from __future__ import annotations

import datetime as dt
import math
import operator
import re
import struct
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

#: A converter returns a COPY text field (already escaped) or None for NULL, and
#: raises :class:`CoerceError` with a human reason when the value does not fit.
Converter = Callable[[Any], "str | None"]

INT_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}

TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "on", "да", "д", "истина", "вкл", "x", "✓"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "off", "нет", "н", "ложь", "выкл"})

#: Excel day 0: 1899-12-30 in the 1900 system (the Lotus leap-year bug shifts
#: serials below 61 by one day), 1904-01-01 in the Mac 1904 system.
EXCEL_EPOCH_1900 = dt.datetime(1899, 12, 30)
EXCEL_EPOCH_1904 = dt.datetime(1904, 1, 1)
#: 9999-12-31 is serial 2958465; anything beyond is not a date.
MAX_EXCEL_SERIAL = 2958466


class CoerceError(ValueError):
    """A value does not fit its column; ``str()`` is the reason stored with the reject."""


@dataclass(frozen=True)
class ColumnType:
    """A column's PostgreSQL type reduced to what coercion needs.

    ``kind`` is one of: text, int, float, numeric, bool, date, timestamp, timestamptz.
    """

    kind: str
    sql: str  # canonical SQL spelling used in DDL
    int_name: str | None = None  # smallint/integer/bigint
    max_length: int | None = None  # varchar(n)
    precision: int | None = None  # numeric(p, s)
    scale: int | None = None


_TYPE_ALIASES = {
    "text": "text", "varchar": "text", "character varying": "text", "string": "text",
    "smallint": "smallint", "int2": "smallint",
    "integer": "integer", "int": "integer", "int4": "integer",
    "bigint": "bigint", "int8": "bigint",
    "real": "real", "float4": "real",
    "double precision": "double precision", "float8": "double precision",
    "float": "double precision", "double": "double precision",
    "numeric": "numeric", "decimal": "numeric",
    "boolean": "boolean", "bool": "boolean",
    "date": "date",
    "timestamp": "timestamp", "timestamp without time zone": "timestamp",
    "timestamptz": "timestamptz", "timestamp with time zone": "timestamptz",
}
SUPPORTED_TYPES = ("text", "varchar(n)", "smallint", "integer", "bigint", "real",
                   "double precision", "numeric[(p[,s])]", "boolean", "date", "timestamp",
                   "timestamptz")
_TYPE_RE = re.compile(r"^\s*([a-z][a-z0-9 ]*?)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\s*$")


def parse_column_type(text: str) -> ColumnType:
    """Parse a configured type such as ``bigint``, ``varchar(20)``, ``numeric(2,1)``.

    Raises ``ValueError`` naming the supported types.
    """
    match = _TYPE_RE.match(str(text).lower())
    base = _TYPE_ALIASES.get(match.group(1)) if match else None
    if base is None or match is None:
        raise ValueError(f"unsupported type {text!r}; supported: {', '.join(SUPPORTED_TYPES)}")
    first, second = match.group(2), match.group(3)
    if base == "text":
        if match.group(1) == "text" and first:
            raise ValueError(f"type {text!r}: text takes no length; use varchar(n)")
        if first is None:
            return ColumnType("text", "text")
        length = int(first)
        if length < 1:
            raise ValueError(f"type {text!r}: length must be >= 1")
        return ColumnType("text", f"varchar({length})", max_length=length)
    if base == "numeric":
        if first is None:
            return ColumnType("numeric", "numeric")
        precision, scale = int(first), int(second or 0)
        if not 1 <= precision <= 1000 or not 0 <= scale <= precision:
            raise ValueError(f"type {text!r}: need 1 <= precision <= 1000, 0 <= scale <= precision")
        return ColumnType("numeric", f"numeric({precision},{scale})",
                          precision=precision, scale=scale)
    if first is not None:
        raise ValueError(f"type {text!r}: {base} takes no modifier")
    if base in INT_RANGES:
        return ColumnType("int", base, int_name=base)
    if base in ("real", "double precision"):
        return ColumnType("float", base)
    if base == "boolean":
        return ColumnType("bool", "boolean")
    return ColumnType(base, "timestamp with time zone" if base == "timestamptz" else base)


# --------------------------------------------------------------------------- helpers


def _blank(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, str) and not value.strip())


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def escape_copy_text(text: str) -> str:
    """Escape a value for PostgreSQL's COPY text format."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if "\t" in text:
        text = text.replace("\t", "\\t")
    if "\n" in text:
        text = text.replace("\n", "\\n")
    if "\r" in text:
        text = text.replace("\r", "\\r")
    return text


def _number_text(value: float) -> str:
    """Excel numbers shown as text: 100001.0 -> '100001', 3.5 -> '3.5'."""
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


_NUMBER_CLEAN = re.compile(r"[\s\u00a0\u202f']")


def _parse_number_text(text: str) -> Decimal:
    """'1 234,5', '1234.5', '-3' -> Decimal; a lone comma is a decimal comma."""
    cleaned = _NUMBER_CLEAN.sub("", text)
    if "," in cleaned:
        if "." in cleaned or cleaned.count(",") > 1:
            cleaned = cleaned.replace(",", "")  # thousands separators: 1,234.5
        else:
            cleaned = cleaned.replace(",", ".")  # decimal comma: 4,5
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        raise CoerceError(f"not a number: {_describe(text)}") from None
    if not number.is_finite():
        raise CoerceError(f"not a finite number: {_describe(text)}")
    return number


# ------------------------------------------------------------------------ converters


def plain_text(value: Any, max_length: int | None = None) -> str | None:
    """A source value as the text a text column stores, *not yet* COPY-escaped."""
    if type(value) is str:
        text = value.strip()
        if not text:
            return None
    elif value is None:
        return None
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CoerceError(f"not a finite number: {value!r}")
        text = _number_text(value)
    elif isinstance(value, dt.datetime | dt.date | dt.time):
        text = value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    else:
        text = str(value).strip()
        if not text:
            return None
    if "\x00" in text:
        raise CoerceError("text contains a NUL character, which PostgreSQL cannot store")
    if max_length is not None and len(text) > max_length:
        raise CoerceError(f"text is {len(text)} characters long, the column allows "
                          f"{max_length}")
    return text


def text_converter(max_length: int | None = None) -> Converter:
    def convert(value: Any) -> str | None:
        text = plain_text(value, max_length)
        return None if text is None else escape_copy_text(text)

    return convert


def int_converter(int_name: str = "bigint") -> Converter:
    low, high = INT_RANGES[int_name]

    def convert(value: Any) -> str | None:
        kind = type(value)
        if kind is float:
            if not value.is_integer():
                raise CoerceError(f"expected a whole number, got {value!r}")
            number = int(value)
        elif kind is int:
            number = value
        elif value is None:
            return None
        elif kind is str:
            text = value.strip()
            if not text:
                return None
            try:
                number = int(text)
            except ValueError:
                decimal = _parse_number_text(text)
                if decimal != decimal.to_integral_value():
                    raise CoerceError(f"expected a whole number, got {_describe(text)}") from None
                number = int(decimal)
        elif isinstance(value, bool):
            raise CoerceError(f"expected a whole number, got boolean {value}")
        elif isinstance(value, Decimal):
            if value != value.to_integral_value():
                raise CoerceError(f"expected a whole number, got {value}")
            number = int(value)
        elif isinstance(value, int):
            number = int(value)
        else:
            raise CoerceError(f"expected a whole number, got {type(value).__name__} "
                              f"{_describe(value)}")
        if not low <= number <= high:
            raise CoerceError(f"{number} is out of range for {int_name}")
        return str(number)

    return convert


def fits_real(value: float) -> bool:
    """Whether PostgreSQL stores ``value`` in a ``real`` column: float4 rounding must
    neither overflow nor flush a non-zero value to zero (both make PostgreSQL refuse
    the text, and with it the whole COPY)."""
    try:
        single = _FLOAT4.unpack(_FLOAT4.pack(value))[0]
    except OverflowError:
        return False
    return (single != 0.0 or value == 0.0) and single - single == 0.0  # not flushed, not inf


_FLOAT4 = struct.Struct("f")


def float_converter(*, real: bool = False) -> Converter:
    def checked(text: str, number: float) -> str:
        if real and not fits_real(number):
            raise CoerceError(f"out of range for real: {_describe(number)}")
        return text

    def convert(value: Any) -> str | None:
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                raise CoerceError(f"not a finite number: {value!r}")
            return checked(repr(value), value)
        if kind is int:
            return checked(str(value), float(value)) if real else str(value)
        if value is None:
            return None
        if kind is str:
            text = value.strip()
            if not text:
                return None
            number = float(_parse_number_text(text))
            return checked(str(number), number)
        if isinstance(value, bool):
            raise CoerceError(f"expected a number, got boolean {value}")
        if isinstance(value, int | float | Decimal):
            number = float(value)
            return checked(str(number), number)
        raise CoerceError(f"expected a number, got {type(value).__name__} {_describe(value)}")

    return convert


def numeric_converter(precision: int | None = None, scale: int | None = None) -> Converter:
    limit = Decimal(10) ** (precision - (scale or 0)) if precision is not None else None
    quantum = Decimal(1).scaleb(-(scale or 0)) if precision is not None else None

    def convert(value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise CoerceError(f"expected a number, got boolean {value}")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise CoerceError(f"not a finite number: {value!r}")
            number = Decimal(repr(value))  # shortest repr: 3.9, not 3.899999...
        elif isinstance(value, int | Decimal):
            number = Decimal(value)
        elif isinstance(value, str):
            if not value.strip():
                return None
            number = _parse_number_text(value.strip())
        else:
            raise CoerceError(f"expected a number, got {type(value).__name__} {_describe(value)}")
        if limit is not None and quantum is not None:
            rounded = number.quantize(quantum)
            if abs(rounded) >= limit:
                raise CoerceError(f"{number} does not fit numeric({precision},{scale or 0})")
            return str(rounded)
        return str(number)

    return convert


def bool_converter() -> Converter:
    def convert(value: Any) -> str | None:
        if value is True:
            return "t"
        if value is False:
            return "f"
        if value is None:
            return None
        if isinstance(value, str):
            word = value.strip().casefold()
            if not word:
                return None
            if word in TRUE_WORDS:
                return "t"
            if word in FALSE_WORDS:
                return "f"
            raise CoerceError(f"expected a boolean (true/false, yes/no, 1/0, да/нет), "
                              f"got {_describe(value)}")
        if isinstance(value, int | float) and value in (0, 1):
            return "t" if value else "f"
        raise CoerceError(f"expected a boolean, got {_describe(value)}")

    return convert


def excel_serial_to_datetime(serial: float, date1904: bool = False) -> dt.datetime:
    """An Excel serial day number as a naive datetime (rounded to microseconds)."""
    if not math.isfinite(serial) or not 0 <= serial < MAX_EXCEL_SERIAL:
        raise CoerceError(f"{serial!r} is not an Excel date serial number")
    if date1904:
        epoch = EXCEL_EPOCH_1904
    else:
        if 60 <= serial < 61:
            raise CoerceError("Excel serial 60 is 1900-02-29, a day that does not exist")
        # Excel pretends 1900 was a leap year: serials 1..59 are one day later
        # than the 1899-12-30 epoch gives.
        epoch = EXCEL_EPOCH_1900 + dt.timedelta(days=1) if serial < 60 else EXCEL_EPOCH_1900
    return epoch + dt.timedelta(microseconds=round(serial * 86_400_000_000))


_DMY = re.compile(r"^(\d{1,2})[./](\d{1,2})[./](\d{4})(?:[ T,]+(\d{1,2}):(\d{2})(?::(\d{2})"
                  r"(?:\.(\d{1,6}))?)?)?$")


def parse_datetime_text(text: str) -> dt.datetime:
    """ISO 8601 ('2024-03-01T10:00:00+03:00', 'Z' allowed) or 'DD.MM.YYYY[ HH:MM[:SS]]'."""
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        pass
    match = _DMY.match(text)
    if match:
        day, month, year, hour, minute, second, fraction = match.groups()
        try:
            return dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                               int(second or 0), int((fraction or "0").ljust(6, "0")))
        except ValueError as error:
            raise CoerceError(f"not a valid date: {_describe(text)} ({error})") from None
    raise CoerceError(f"expected a date/time (ISO 8601 like 2024-03-01 10:00:00, or "
                      f"DD.MM.YYYY), got {_describe(text)}")


def _to_datetime(value: Any, date1904: bool) -> dt.datetime | None:
    if type(value) is dt.datetime:
        return value
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        return parse_datetime_text(text) if text else None
    if isinstance(value, bool):
        raise CoerceError(f"expected a date/time, got boolean {value}")
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    if isinstance(value, int | float):
        return excel_serial_to_datetime(float(value), date1904)
    raise CoerceError(f"expected a date/time, got {type(value).__name__} {_describe(value)}")


def timestamp_converter(*, with_tz: bool, date1904: bool = False) -> Converter:
    """timestamptz: naive values are local to the session TimeZone (see module doc);
    timestamp: aware values keep their wall time in their own zone dropped."""

    def convert(value: Any) -> str | None:
        stamp = _to_datetime(value, date1904)
        if stamp is None:
            return None
        if stamp.tzinfo is not None and not with_tz:
            stamp = stamp.replace(tzinfo=None)
        return stamp.isoformat(sep=" ")

    return convert


def date_converter(*, date1904: bool = False) -> Converter:
    def convert(value: Any) -> str | None:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value.isoformat()
        stamp = _to_datetime(value, date1904)
        return None if stamp is None else stamp.date().isoformat()

    return convert


def make_converter(column_type: ColumnType, *, date1904: bool = False) -> Converter:
    """The scalar rule of the column's kind (see :data:`KINDS`)."""
    return kind_rule(column_type.kind).scalar(column_type, date1904)


# ----------------------------------------------------------------------- header match


def normalize_header(name: Any) -> str:
    """Case, spacing, punctuation and ё/е insensitive form of a header cell.

    'Chat ID', 'chat_id', ' CHAT-id ' -> 'chatid'; 'Дата  Создания' -> 'датасоздания'.
    """
    text = unicodedata.normalize("NFKC", "" if name is None else str(name)).casefold()
    text = text.replace("ё", "е")
    return "".join(ch for ch in text if ch.isalnum())


@dataclass(frozen=True)
class ColumnSpec:
    """One target column as the coercer needs it (picklable, JSON-able)."""

    name: str
    type: str
    nullable: bool = True
    aliases: tuple[str, ...] = ()
    key: bool = False

    @property
    def column_type(self) -> ColumnType:
        return parse_column_type(self.type)


class HeaderError(ValueError):
    """The header row cannot feed the target; ``str()`` lists what is missing."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


@dataclass(frozen=True)
class HeaderMatch:
    """Which source column feeds which target column."""

    columns: tuple[ColumnSpec, ...]  # matched target columns, in target order
    positions: tuple[int, ...]  # their index in the source row
    ignored: tuple[str, ...] = ()  # source headers that feed nothing


def match_header(header: Sequence[Any], columns: Sequence[ColumnSpec]) -> HeaderMatch:
    """Map source headers to target columns by name or alias (normalised).

    Every NOT NULL column (and every key column) must be present; nullable ones
    may be missing and are then left untouched by the upsert.
    """
    by_norm: dict[str, int] = {}
    for source_index, cell in enumerate(header):
        norm = normalize_header(cell)
        if norm and norm not in by_norm:
            by_norm[norm] = source_index
    matched: list[ColumnSpec] = []
    positions: list[int] = []
    used: set[int] = set()
    missing: list[str] = []
    for column in columns:
        index = None
        for candidate in (column.name, *column.aliases):
            found = by_norm.get(normalize_header(candidate))
            if found is not None and found not in used:
                index = found
                break
        if index is None:
            if column.key or not column.nullable:
                missing.append(column.name)
            continue
        used.add(index)
        matched.append(column)
        positions.append(index)
    if missing:
        seen = [str(cell).strip() for cell in header if not _blank(cell)]
        raise HeaderError(
            f"the header row lacks required column(s) {', '.join(missing)} "
            f"(found: {', '.join(seen) or 'no header cells'}); rename the columns or add "
            f"aliases to the target", missing)
    ignored = tuple(str(header[i]).strip() for i in range(len(header))
                    if i not in used and not _blank(header[i]))
    return HeaderMatch(tuple(matched), tuple(positions), ignored)


# ------------------------------------------------------------------------- row level


@dataclass
class RejectRecord:
    row_number: int
    column: str | None
    reason: str
    raw: dict[str, Any]


@dataclass
class CoercedBatch:
    """The COPY text of the good rows plus the rejects of one batch."""

    #: COPY text (tab-separated, newline-terminated lines) of the rows to upsert.
    payload: str = ""
    rejects: list[RejectRecord] = field(default_factory=list)
    #: Non-empty source rows examined (good + rejected).
    rows_seen: int = 0
    #: Lines in ``payload`` (fewer than the good rows when keys repeat in the batch).
    written: int = 0

    @property
    def good(self) -> int:
        return self.rows_seen - len(self.rejects)

    def copy_bytes(self) -> bytes:
        return self.payload.encode("utf-8")


def json_safe(value: Any) -> Any:
    """A raw cell as a JSON value for the rejects table."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


NULL = "\\N"  # COPY text NULL marker
_SEPARATOR = "\x00"  # never inside a stored text value (PostgreSQL refuses NUL)


def _convert_slow(convert: Converter, value: Any, index: int, errors: dict[int, str]) -> str:
    try:
        result = convert(value)
    except CoerceError as error:
        errors[index] = str(error)
        return NULL
    return NULL if result is None else result


def convert_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                   errors: dict[int, str]) -> list[str]:
    """Convert one column of a batch; failures go to ``errors`` by row index.

    Why column-wise: a Python call per value costs ~1 us, and the 155k-row
    workbook has 2 million values. When a column holds only the type a reader
    actually produces (all floats, all str, all datetimes...), the conversion
    runs in C (``map``, ``str.join``, ``str.replace``); otherwise one
    comprehension handles the common type inline and sends the rest to the
    scalar converter, which also produces the reject reasons. Which column rule
    a kind has is in :data:`KINDS`.
    """
    return kind_rule(column_type.kind).column(column_type, convert, values, errors)


def _int_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                errors: dict[int, str]) -> list[str]:
    types = set(map(type, values))
    low, high = INT_RANGES[column_type.int_name or "bigint"]
    if types == {float} and all(map(float.is_integer, values)) \
            and low <= min(values) and max(values) <= high:
        return list(map(str, map(int, values)))
    if types == {int} and low <= min(values) and max(values) <= high:
        return list(map(str, values))
    return [str(int(v)) if type(v) is float and v.is_integer() and low <= v <= high
            else _convert_slow(convert, v, i, errors) for i, v in enumerate(values)]


def _float_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                  errors: dict[int, str]) -> list[str]:
    types = set(map(type, values))
    real = column_type.sql == "real"
    if types == {float} and all(map(math.isfinite, values)) \
            and (not real or all(map(fits_real, values))):
        return list(map(repr, values))
    return [repr(v) if type(v) is float and v - v == 0 and (not real or fits_real(v))
            else NULL if v == "" or v is None
            else _convert_slow(convert, v, i, errors) for i, v in enumerate(values)]


def _bool_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                 errors: dict[int, str]) -> list[str]:
    fast = _fast_with_nulls("bool", set(map(type, values)), values)
    if fast is not None:
        return fast
    return ["t" if v is True else "f" if v is False else NULL if v == "" or v is None
            else _convert_slow(convert, v, i, errors) for i, v in enumerate(values)]


def _timestamp_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                      errors: dict[int, str]) -> list[str]:
    fast = _fast_with_nulls(column_type.kind, set(map(type, values)), values)
    if fast is not None:
        return fast
    datetime_type = dt.datetime
    return [v.isoformat() if type(v) is datetime_type and v.tzinfo is None
            else NULL if v == "" or v is None
            else _convert_slow(convert, v, i, errors) for i, v in enumerate(values)]


def _per_value_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                      errors: dict[int, str]) -> list[str]:
    """numeric and date: no reader hands them over in one cheap shape."""
    return [_convert_slow(convert, v, i, errors) for i, v in enumerate(values)]


_BOOL_TEXT = {True: "t", False: "f"}  # 1 == True and 0 == False: SQLite's 0/1 map too
_TZINFO = operator.attrgetter("tzinfo")
_NONE_TYPE = type(None)


def _fast_with_nulls(kind: str, types: set[type], values: Sequence[Any]) -> list[str] | None:
    """The column converted in C when its non-NULL values all have one easy type,
    with NULLs put back in place; ``None`` when the per-value path is needed."""
    present: Sequence[Any] = values
    if _NONE_TYPE in types:
        types = types - {_NONE_TYPE}
        present = [v for v in values if v is not None]
    if not present:
        return None
    converted = (_fast_bools(types, present) if kind == "bool"
                 else _fast_datetimes(kind, types, present))
    if converted is None or present is values:
        return converted
    filled = iter(converted)
    return [NULL if v is None else next(filled) for v in values]


def _fast_bools(types: set[type], values: Sequence[Any]) -> list[str] | None:
    if not types <= {bool, int}:
        return None
    try:
        return list(map(_BOOL_TEXT.__getitem__, values))
    except KeyError:  # an int other than 0/1: the per-value path rejects it
        return None


def _fast_datetimes(kind: str, types: set[type], values: Sequence[Any]) -> list[str] | None:
    datetime_type = dt.datetime
    if types == {datetime_type}:
        if not any(map(_TZINFO, values)):
            return list(map(datetime_type.isoformat, values))
        if kind == "timestamptz" and all(map(_TZINFO, values)):
            # Aware values (asyncpg's timestamptz): the ISO text carries the offset
            # and PostgreSQL stores the same instant, so no per-value conversion.
            return list(map(datetime_type.isoformat, values))
        return None
    if types == {str}:
        # ISO text (what SQLite stores): parsed and re-printed in C. Anything else
        # (empty cells, other formats, an offset on a naive column) takes the
        # per-value path, which also produces the reject reasons.
        try:
            parsed = list(map(datetime_type.fromisoformat, values))
        except ValueError:
            return None
        if kind == "timestamptz" or not any(map(_TZINFO, parsed)):
            return list(map(datetime_type.isoformat, parsed))
    return None


def _text_column(column_type: ColumnType, convert: Converter, values: Sequence[Any],
                 errors: dict[int, str]) -> list[str]:
    if set(map(type, values)) == {str}:
        stripped = list(map(str.strip, values))
    else:
        stripped = [v.strip() if type(v) is str else
                    "" if v is None else
                    _plain_text(v, i, errors) for i, v in enumerate(values)]
    joined = _SEPARATOR.join(stripped)
    if joined.count(_SEPARATOR) != max(len(stripped) - 1, 0):
        for i, text in enumerate(stripped):
            if _SEPARATOR in text:
                errors[i] = "text contains a NUL character, which PostgreSQL cannot store"
                stripped[i] = ""
        joined = _SEPARATOR.join(stripped)
    if column_type.max_length is not None:
        limit = column_type.max_length
        for i, text in enumerate(stripped):
            if len(text) > limit:
                errors[i] = f"text is {len(text)} characters long, the column allows {limit}"
    escaped = escape_copy_text(joined).split(_SEPARATOR) if stripped else []
    return [text or NULL for text in escaped]


def _plain_text(value: Any, index: int, errors: dict[int, str]) -> str:
    """A non-str value as unescaped text ('' for NULL): the whole column is escaped
    once, after joining, so this must not escape it too."""
    try:
        result = plain_text(value)
    except CoerceError as error:
        errors[index] = str(error)
        return ""
    return "" if result is None else result


ColumnRule = Callable[[ColumnType, Converter, Sequence[Any], dict[int, str]], list[str]]


@dataclass(frozen=True)
class KindRule:
    """A column kind's two rules, side by side.

    ``scalar`` builds the per-value converter: the precise rule, and the only
    place a reject reason is written. ``column`` converts a batch's whole column,
    in C where the column has the one shape a reader produces, and hands every
    other value to the scalar converter, so both paths give the same field text
    and the same rejects (``tests/test_migrate_coerce.py`` and
    ``tests/test_migrate_equivalence.py`` check that). The Excel child's third path,
    over Arrow arrays, is :data:`.coerce_arrow.ARROW_RULES`, keyed by the same kinds:
    it converts only what gives these rules' text, and declines the rest to them.
    """

    scalar: Callable[[ColumnType, bool], Converter]  # (column type, date1904)
    column: ColumnRule


#: The one table of column kinds (``ColumnType.kind``): adding a type is a row here.
KINDS: dict[str, KindRule] = {
    "text": KindRule(lambda t, _: text_converter(t.max_length), _text_column),
    "int": KindRule(lambda t, _: int_converter(t.int_name or "bigint"), _int_column),
    "float": KindRule(lambda t, _: float_converter(real=t.sql == "real"), _float_column),
    "numeric": KindRule(lambda t, _: numeric_converter(t.precision, t.scale), _per_value_column),
    "bool": KindRule(lambda t, _: bool_converter(), _bool_column),
    "date": KindRule(lambda t, d1904: date_converter(date1904=d1904), _per_value_column),
    "timestamp": KindRule(lambda t, d1904: timestamp_converter(with_tz=False, date1904=d1904),
                          _timestamp_column),
    "timestamptz": KindRule(lambda t, d1904: timestamp_converter(with_tz=True, date1904=d1904),
                            _timestamp_column),
}


def kind_rule(kind: str) -> KindRule:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"no converter for column kind {kind!r}") from None


class RowCoercer:
    """Coerces raw source rows of one header layout into COPY lines.

    Duplicate keys inside one batch keep the last row (PostgreSQL refuses an
    ``ON CONFLICT DO UPDATE`` that touches the same row twice in one statement);
    the earlier duplicate still counts as applied, exactly as if it had been
    written and then overwritten by the later row.
    """

    def __init__(self, match: HeaderMatch, *, date1904: bool = False) -> None:
        self.match = match
        self.names = [column.name for column in match.columns]
        self.types = [column.column_type for column in match.columns]
        self.converters = [make_converter(column_type, date1904=date1904)
                           for column_type in self.types]
        self.required = [not column.nullable or column.key for column in match.columns]
        self.key_indexes = [i for i, column in enumerate(match.columns) if column.key]
        self.positions = list(match.positions)
        self.width = max(self.positions, default=-1) + 1
        self._key_of = operator.itemgetter(*self.key_indexes) if self.key_indexes else None

    def raw_values(self, row: Sequence[Any]) -> dict[str, Any]:
        return {name: json_safe(row[pos] if pos < len(row) else None)
                for name, pos in zip(self.names, self.positions, strict=True)}

    def coerce_rows(self, numbered_rows: Sequence[tuple[int, Sequence[Any]]]) -> CoercedBatch:
        """Rows as (source row number, raw values); blank rows are skipped."""
        batch = CoercedBatch()
        if not numbered_rows:
            return batch
        width = self.width
        rows = [row for _, row in numbered_rows]
        shortest, longest = min(map(len, rows)), max(map(len, rows))
        if shortest < width:
            rows = [row if len(row) >= width else list(row) + [None] * (width - len(row))
                    for row in rows]
            shortest = width
        # Rows of one batch may differ in width (a sliced sheet widens as it goes);
        # only the first `width` cells feed columns, the rest still count for blankness.
        raw_columns = list(zip(*rows, strict=True)) if shortest == longest else \
            list(zip(*(row[:width] for row in rows), strict=True))
        row_errors: dict[int, tuple[str, str]] = {}
        columns: list[list[str]] = []
        for pos, column_type, convert, required, name in zip(
                self.positions, self.types, self.converters, self.required, self.names,
                strict=True):
            errors: dict[int, str] = {}
            converted = convert_column(column_type, convert, raw_columns[pos], errors)
            for index, reason in errors.items():
                row_errors.setdefault(index, (name, reason))
            if required and NULL in converted:
                for index, field_text in enumerate(converted):
                    if field_text == NULL:
                        row_errors.setdefault(
                            index, (name, "a value is required (the column is NOT NULL)"))
            columns.append(converted)
        key_columns = [columns[i] for i in self.key_indexes]
        if not row_errors and all(len(set(col)) == len(col) for col in key_columns[:1]) \
                and len(key_columns) <= 1:
            # The common case: no rejects, no repeated key. zip() reuses its tuple
            # when nothing keeps it, so no per-row objects are built.
            batch.rows_seen = batch.written = len(rows)
            batch.payload = "\n".join(map("\t".join, zip(*columns, strict=True))) + "\n"
            return batch
        good: list[tuple[str, ...]] = []
        for index, fields in enumerate(zip(*columns, strict=True)):
            failure = row_errors.get(index)
            if failure is None:
                good.append(fields)
                continue
            row = rows[index]
            if all(_blank(cell) for cell in row):
                continue  # an empty row in the middle of the sheet: not data
            batch.rejects.append(RejectRecord(numbered_rows[index][0], failure[0],
                                              failure[1], self.raw_values(row)))
        batch.rows_seen = len(good) + len(batch.rejects)
        if self._key_of is not None:
            keys = list(map(self._key_of, good))
            if len(set(keys)) != len(keys):
                good = list(dict(zip(keys, good, strict=True)).values())
        batch.written = len(good)
        batch.payload = "\n".join(map("\t".join, good)) + "\n" if good else ""
        return batch
