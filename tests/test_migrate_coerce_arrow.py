"""The Arrow column rules (``coerce_arrow``) against the row path's rules (``coerce``).

Each rule either gives the field text the row path gives for the same values (the
same value once PostgreSQL parses it) or declines; a declined slice is read by the
row path, so declining is never wrong. These tests hold both halves: equal where it
converts, declining exactly where the row path would reject or decide otherwise.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from nurseryd.db import Database
from nurseryd.kinds.migrate.coerce import (
    NULL,
    ColumnSpec,
    make_converter,
    match_header,
    parse_column_type,
)
from nurseryd.kinds.migrate.coerce_arrow import ARROW_RULES, ArrowCoercer
from nurseryd.kinds.migrate.pipeline import run_pipeline
from nurseryd.kinds.migrate.sources.excel import ExcelSource
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import MigrationSettings, Target
from tests import xlsx_factory as xf
from tests.test_migrate_pipeline import LocalContext, new_job


def arrow_fields(type_: str, values: list[Any], arrow_type: pa.DataType) -> list[str] | None:
    column = parse_column_type(type_)
    converted = ARROW_RULES[column.kind](pa.array(values, arrow_type), column)
    return None if converted is None else converted.fill_null(NULL).to_pylist()


def row_fields(type_: str, values: list[Any]) -> list[str]:
    convert = make_converter(parse_column_type(type_))
    return [NULL if (text := convert(v)) is None else text for v in values]


WHEN = dt.datetime(2024, 2, 29, 23, 59, 58, 125000)

SAME = [
    ("text", ["plain", "  padded\u00a0", "tab\there", "new\nline", "back\\slash", "\u3000", "",
              "😡", None], pa.string()),
    ("varchar(5)", ["abcde", " ab ", None], pa.string()),
    ("text", [100001.0, -0.0, 12.0, None, 9.999999999999998e15], pa.float64()),
    ("text", [True, False, None], pa.bool_()),
    ("bigint", [1.0, -9.223372036854776e18, 2.0**53, None], pa.float64()),
    ("smallint", [-32768.0, 32767.0], pa.float64()),
    ("integer", [7, -2147483648, None], pa.int64()),
    ("double precision", [0.1, 1 / 3, 1e300, -0.0, 5.0, 1e-7, None], pa.float64()),
    ("boolean", [True, False, None], pa.bool_()),
    ("timestamp", [WHEN, dt.datetime(1904, 1, 2), None], pa.timestamp("ms")),
    ("timestamptz", [WHEN, None], pa.timestamp("us")),
]


def _parsed(type_: str, text: str) -> Any:
    """What PostgreSQL would make of a field, for the types whose text may differ."""
    if text == NULL:
        return None
    kind = parse_column_type(type_).kind
    if kind == "float":
        return float(text)
    if kind in ("timestamp", "timestamptz"):
        return dt.datetime.fromisoformat(text)
    return text


@pytest.mark.parametrize(("type_", "values", "arrow_type"), SAME)
def test_arrow_rule_gives_what_the_row_path_gives(type_: str, values: list[Any],
                                                  arrow_type: pa.DataType) -> None:
    got = arrow_fields(type_, values, arrow_type)
    assert got is not None
    expected = row_fields(type_, values)
    assert [_parsed(type_, t) for t in got] == [_parsed(type_, t) for t in expected]


DECLINED = [
    ("text", ["a\x00b"], pa.string()),  # NUL: a reject
    ("varchar(3)", ["abcd"], pa.string()),  # too long: a reject
    ("text", [3.5], pa.float64()),  # repr() of a fraction: the row path's business
    ("text", [1e16], pa.float64()),
    ("text", [WHEN], pa.timestamp("ms")),
    ("integer", [1.5], pa.float64()),
    ("integer", [2.0**31], pa.float64()),
    ("bigint", [2.0**63], pa.float64()),
    ("smallint", [40000], pa.int64()),
    ("integer", ["12"], pa.string()),
    ("double precision", [float("inf")], pa.float64()),
    ("real", [0.1], pa.float64()),  # float4 rounding of another digit string
    ("boolean", ["yes"], pa.string()),
    ("boolean", [1.0], pa.float64()),
    ("timestamp", [dt.datetime(1900, 1, 1)], pa.timestamp("ms")),  # near Excel's day 0
    ("timestamptz", [WHEN], pa.timestamp("ms", tz="UTC")),
    ("timestamp", [dt.date(2024, 1, 1)], pa.date32()),
]


@pytest.mark.parametrize(("type_", "values", "arrow_type"), DECLINED)
def test_arrow_rule_declines_what_the_row_path_must_decide(type_: str, values: list[Any],
                                                           arrow_type: pa.DataType) -> None:
    assert arrow_fields(type_, values, arrow_type) is None


def _coercer(*types: str) -> ArrowCoercer:
    columns = [ColumnSpec(f"c{i}", t, nullable=i != 0, key=i == 0) for i, t in enumerate(types)]
    return ArrowCoercer(match_header([c.name for c in columns], columns))


def test_lines_are_copy_text_with_row_numbers() -> None:
    coercer = _coercer("bigint", "text", "boolean")
    lines = coercer.lines([pa.array([1.0, 2.0]), pa.array(["a\tb", None]),
                           pa.array([True, None])], first_row=7)
    assert lines is not None and lines.first_row == 7 and len(lines) == 2
    assert bytes(lines.payload(0, 2)) == b"1\ta\\tb\tt\n2\t\\N\t\\N\n"
    assert bytes(lines.payload(1, 2)) == b"2\t\\N\t\\N\n"


@pytest.mark.parametrize("columns", [
    [pa.array([1.0, None]), pa.array(["a", "b"])],  # a NULL key: a reject
    [pa.array([1.0, 1.0]), pa.array(["a", "b"])],  # a repeated key: the last one wins there
    [pa.array([1.0, None]), pa.array(["a", "  "])],  # a blank row: skipped and not counted
])
def test_lines_decline_rejects_repeats_and_blank_rows(columns: list[pa.Array]) -> None:
    assert _coercer("bigint", "text").lines(columns, first_row=2) is None


def test_lines_decline_a_kind_without_an_arrow_rule() -> None:
    assert not _coercer("bigint", "numeric").possible
    assert not _coercer("bigint", "date").possible


DEEP = Target("deep", "deep", (ColumnSpec("id", "bigint", False, key=True),
                               ColumnSpec("name", "text"), ColumnSpec("score", "double precision")),
              ("id",))


def _deep_sheet(first: int, count: int) -> str:
    """A header in row 1 and data from row ``first`` on, starting in column B."""
    head = ('<row r="1"><c r="B1" t="inlineStr"><is><t>id</t></is></c>'
            '<c r="C1" t="inlineStr"><is><t>name</t></is></c>'
            '<c r="D1" t="inlineStr"><is><t>score</t></is></c></row>')
    rows = [head]
    for r in range(first, first + count):
        name = "" if r % 7 == 0 else f'<c r="C{r}" t="inlineStr"><is><t> n{r} </t></is></c>'
        rows.append(f'<row r="{r}"><c r="B{r}"><v>{r}</v></c>{name}'
                    f'<c r="D{r}"><v>{r / 8}</v></c></row>')
    return ('<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
            f'<sheetData>{"".join(rows)}</sheetData></worksheet>')


async def test_a_slice_deep_in_the_sheet_loads_what_the_row_path_loads(
        db: Database, tmp_path: Path) -> None:
    """Data from row 500,000 on, starting in column B: the anchor puts column A at index 0
    and the rows above the slices are never built (they were, as 400 MiB of empty cells)."""
    path = xf.raw_workbook(tmp_path / "deep.xlsx", _deep_sheet(500_000, 400))
    seen = {}
    for reader in ("arrow-stream", "calamine-stream"):
        await db.execute("DROP TABLE IF EXISTS deep")
        await ensure_target_table(db, DEEP)
        ctx = LocalContext(db, await new_job(db))
        settings = MigrationSettings(batch_rows=64, reader=reader, slice_bytes=4096)
        result = await run_pipeline(ctx, ExcelSource(path, None, settings), DEEP)
        rows = await db.fetch("SELECT id, name, score FROM deep ORDER BY id")
        seen[reader] = ([tuple(r) for r in rows], ctx.counters, result["slices"])
    assert seen["arrow-stream"][0] == seen["calamine-stream"][0]
    assert seen["arrow-stream"][1] == seen["calamine-stream"][1] == {
        "total": 400, "processed": 400, "failed": 0}
    assert seen["arrow-stream"][0][0] == (500_000, "n500000", 62500.0)
    assert seen["arrow-stream"][2]["arrow"] > 5 and seen["calamine-stream"][2]["arrow"] == 0
