"""The column rules of :mod:`.coerce` over Arrow arrays: the Excel child's fast path.

Why: building a Python object per cell and converting it in Python is what made
the parser child the bottleneck of an import (per 155k-row workbook: ~0.4 s to
iterate rows and ~1.5 s to coerce them, beside ~2 s of XML parsing). fastexcel
hands a slice of the sheet over as Arrow columns, and ``pyarrow.compute`` turns
them into COPY text in C++, with the GIL released, in the worker threads that
parse.

The contract that keeps this exact: every rule here either produces the very
COPY text fields the row path (:data:`.coerce.KINDS`) would produce for the
same cells — the same value once PostgreSQL has parsed it — or declines
(returns ``None``). A slice with one declined column, one value that would be a
reject, one blank row or one repeated key is read again by the row path, which
is the only place a reject reason is written. So the rules are deliberately
narrow: each kind accepts only the Arrow types a reader produces for clean data
(numbers as doubles, text as strings, dates as timestamps, booleans), and
``tests/test_migrate_equivalence.py`` holds both paths to the same rows.

Imported only in the parser child (pyarrow is not a dependency of the daemon's
own process).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .coerce import INT_RANGES, NULL, ColumnType, HeaderMatch

#: COPY text escapes, backslash first (as :func:`.coerce.escape_copy_text`).
_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))
#: Earlier timestamps are declined: around Excel's day 0 the readers disagree
#: (python-calamine turns serial 1 into a time of day, fastexcel into 1899-12-31).
_EARLIEST_TIMESTAMP = dt.datetime(1904, 1, 2)
#: Whole numbers shown as text: below this magnitude the row path prints ``int(v)``.
_INT_TEXT_LIMIT = 1e16

ArrowRule = Callable[[pa.Array, ColumnType], "pa.Array | None"]


def _any(mask: pa.Array) -> bool:
    return bool(pc.any(mask, skip_nulls=True).as_py())


def _whole_numbers(values: pa.Array, low: float, high_exclusive: float) -> pa.Array | None:
    """Doubles that are all whole and in ``[low, high_exclusive)`` as int64, else None.

    The bounds are doubles compared exactly (2**63 is one, 2**63 - 1 is not)."""
    present = pc.drop_null(values)
    if len(present) == 0:
        return pc.cast(values, pa.int64())
    if not _all(pc.is_finite(present)) or not _all(pc.equal(pc.floor(present), present)):
        return None
    if pc.min(present).as_py() < low or pc.max(present).as_py() >= high_exclusive:
        return None
    return pc.cast(values, pa.int64())


def _all(mask: pa.Array) -> bool:
    return bool(pc.all(mask, skip_nulls=True).as_py())


def _escaped(text: pa.Array) -> pa.Array:
    for needle, replacement in _ESCAPES:
        if _any(pc.match_substring(text, needle)):
            text = pc.replace_substring(text, needle, replacement)
    return text


def text_rule(values: pa.Array, column: ColumnType) -> pa.Array | None:
    """Strings stripped, ``''`` as NULL; booleans as ``true``/``false``; whole numbers
    as digits.

    ``utf8_trim_whitespace`` strips what ``str.strip()`` does: both call a character
    whitespace when its Unicode category is Zs or its bidirectional class is WS, B
    or S (Arrow took Python's definition)."""
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if _any(pc.match_substring(values, "\x00")):
            return None  # a reject
        stripped = pc.utf8_trim_whitespace(values)
        text = pc.if_else(pc.equal(stripped, ""), pa.scalar(None, kind), stripped)
    elif pa.types.is_boolean(kind):
        text = pc.cast(values, pa.string())
    elif pa.types.is_floating(kind):
        # The row path prints int(v) when abs(v) < 1e16, repr(v) otherwise (not ours).
        whole = _whole_numbers(values, math.nextafter(-_INT_TEXT_LIMIT, 0), _INT_TEXT_LIMIT)
        if whole is None:
            return None
        text = pc.cast(whole, pa.string())
    elif pa.types.is_integer(kind):
        text = pc.cast(values, pa.string())
    else:
        return None  # dates, times, durations: the row path's isoformat()
    if column.max_length is not None and len(text) \
            and (pc.max(pc.utf8_length(text)).as_py() or 0) > column.max_length:
        return None  # a reject: the row path says why
    return _escaped(text)


def int_rule(values: pa.Array, column: ColumnType) -> pa.Array | None:
    low, high = INT_RANGES[column.int_name or "bigint"]
    kind = values.type
    if pa.types.is_floating(kind):
        whole = _whole_numbers(values, float(low), float(high) + 1.0)
        return None if whole is None else pc.cast(whole, pa.string())
    if pa.types.is_integer(kind):
        present = pc.drop_null(values)
        if len(present) and (pc.min(present).as_py() < low or pc.max(present).as_py() > high):
            return None
        return pc.cast(values, pa.string())
    return None


def float_rule(values: pa.Array, column: ColumnType) -> pa.Array | None:
    """Doubles in Arrow's shortest round-trip text: PostgreSQL parses the same double
    the row path's ``repr()`` gives. ``real`` is declined: float4 rounding of a
    different digit string is not ours to prove equal."""
    if column.sql == "real":
        return None
    kind = values.type
    if pa.types.is_floating(kind):
        if not _all(pc.is_finite(pc.drop_null(values))):
            return None
        return pc.cast(values, pa.string())
    if pa.types.is_integer(kind):
        return pc.cast(values, pa.string())
    return None


def bool_rule(values: pa.Array, column: ColumnType) -> pa.Array | None:
    if not pa.types.is_boolean(values.type):
        return None  # words, 0/1: the row path knows them all
    return pc.if_else(values, "t", "f")


def timestamp_rule(values: pa.Array, column: ColumnType) -> pa.Array | None:
    """Naive timestamps as ``YYYY-MM-DD HH:MM:SS.fff``: PostgreSQL applies the session
    zone, exactly as to the row path's ``isoformat()``."""
    kind = values.type
    if not pa.types.is_timestamp(kind) or kind.tz is not None:
        return None
    present = pc.drop_null(values)
    if len(present) and pc.min(present).as_py() < _EARLIEST_TIMESTAMP:
        return None  # serials below 61 (the 1900 leap-year bug) and below 1: reader quirks
    return pc.cast(values, pa.string())


#: The kinds of :data:`.coerce.KINDS` that have an Arrow rule; the others
#: (numeric, date) always take the row path.
ARROW_RULES: dict[str, ArrowRule] = {
    "text": text_rule,
    "int": int_rule,
    "float": float_rule,
    "bool": bool_rule,
    "timestamp": timestamp_rule,
    "timestamptz": timestamp_rule,
}


@dataclass(frozen=True)
class ArrowLines:
    """A slice's rows as COPY text lines, one Arrow string per line (``\\n`` included)."""

    lines: pa.Array
    first_row: int  # sheet row number of ``lines[0]``

    def __len__(self) -> int:
        return len(self.lines)

    def payload(self, start: int, stop: int) -> memoryview:
        """The COPY text of lines ``[start, stop)``: a view of Arrow's buffer, no copy."""
        offsets = memoryview(self.lines.buffers()[1]).cast("i")
        base = self.lines.offset
        begin, end = offsets[base + start], offsets[base + stop]
        return memoryview(self.lines.buffers()[2])[begin:end]


def _blank(values: pa.Array) -> pa.Array:
    """Per row: is this cell empty as :func:`.coerce._blank` sees it?"""
    empty = pc.is_null(values)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        empty = pc.or_(empty, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True))
    return empty


class ArrowCoercer:
    """A slice's Arrow columns -> COPY lines, or ``None`` when the row path must decide.

    ``columns`` are the slice's columns by sheet position (index 0 is column A, as
    the row path's rows).
    """

    def __init__(self, match: HeaderMatch) -> None:
        self.names = [column.name for column in match.columns]
        self.types = [column.column_type for column in match.columns]
        self.rules = [ARROW_RULES.get(column_type.kind) for column_type in self.types]
        self.required = [not column.nullable or column.key for column in match.columns]
        self.positions = list(match.positions)
        self.keys = [i for i, column in enumerate(match.columns) if column.key]

    @property
    def possible(self) -> bool:
        """Whether any slice can take this path (every column's kind has a rule)."""
        return all(rule is not None for rule in self.rules) and len(self.keys) <= 1

    def lines(self, columns: Sequence[pa.Array], first_row: int) -> ArrowLines | None:
        if not columns or not self.possible:
            return None
        rows = len(columns[0])
        blank = _blank(columns[0])
        for values in columns[1:]:
            blank = pc.and_(blank, _blank(values))
        if _any(blank):
            return None  # an empty row: the row path skips it and numbers the rest
        fields: list[pa.Array] = []
        for rule, column_type, position, required in zip(
                self.rules, self.types, self.positions, self.required, strict=True):
            assert rule is not None
            values = columns[position] if position < len(columns) \
                else pa.nulls(rows, pa.string())
            if pa.types.is_null(values.type):
                values = pa.nulls(rows, pa.string())
            converted = rule(values, column_type)
            if converted is None or (required and converted.null_count):
                return None
            fields.append(pc.fill_null(converted, NULL))
        if self.keys and pc.count_distinct(fields[self.keys[0]]).as_py() != rows:
            return None  # a repeated key: the row path keeps the last one
        line = pc.binary_join_element_wise(*fields, "\t") if len(fields) > 1 else fields[0]
        return ArrowLines(pc.binary_join_element_wise(line, "", "\n"), first_row)
