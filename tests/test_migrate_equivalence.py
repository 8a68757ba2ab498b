"""Varied workbooks → the rows, counters and rejects that reach PostgreSQL, against a
committed reference (``tests/data/migrate_equivalence.json``).

Why a reference file: any faster path (another reader, vectorised casts, more
processes) must load *exactly* what the current path loads, value by value. The
reference was computed by the code before the fast-path work (the commit that adds
this file); a change that alters a single value, counter, reject reason or row
number fails here. Regenerate it only on purpose, after checking the difference:
``NURSERYD_WRITE_EQUIVALENCE=1 .venv/bin/python -m pytest tests/test_migrate_equivalence.py``.

Every reader that can read a workbook is compared with the same reference, so the
whole-sheet reader (the old path, kept callable) is checked too.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nurseryd.db import Database
from nurseryd.kinds.migrate.coerce import ColumnSpec
from nurseryd.kinds.migrate.pipeline import run_pipeline
from nurseryd.kinds.migrate.sources.excel import ExcelSource
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET, MigrationSettings, Target
from tests import xlsx_factory as xf
from tests.test_migrate_pipeline import LocalContext, new_job

REFERENCE = Path(__file__).parent / "data" / "migrate_equivalence.json"
WRITE = os.environ.get("NURSERYD_WRITE_EQUIVALENCE") == "1"


def _col(name: str, type_: str, nullable: bool = True, *aliases: str) -> ColumnSpec:
    return ColumnSpec(name=name, type=type_, nullable=nullable, aliases=aliases, key=name == "id")


#: Every type the coercion supports, once each.
KINDS_TARGET = Target("kinds", "kinds", (
    _col("id", "bigint", False, "№"),
    _col("small", "smallint"),
    _col("count", "integer"),
    _col("amount", "numeric(8,2)", True, "сумма"),
    _col("any_number", "numeric"),
    _col("ratio", "real"),
    _col("score", "double precision"),
    _col("flag", "boolean", True, "флаг"),
    _col("day", "date"),
    _col("at", "timestamp"),
    _col("at_tz", "timestamptz"),
    _col("code", "varchar(4)"),
    _col("note", "text"),
), ("id",))
KINDS_HEADER = ["id", "small", "count", "Сумма", "any_number", "ratio", "score", "Флаг", "day",
                "at", "at_tz", "code", "note"]

WHEN = dt.datetime(2024, 2, 29, 23, 59, 58)


def kinds_rows() -> list[list[Any]]:
    """Values of every shape a reader hands over for every type: each column cycles
    through its good values, and about one cell in 40 is one of its bad ones (so a third
    of the rows are rejects and the others load values of every shape)."""
    good: list[list[Any]] = [
        [],  # the id: see below
        [-7, 32767, "12", "1 000", 3.0, None],
        ["2147483647", 1e3, "7,0", None, -2147483648],
        ["1 234,5", "12.345", 999999.99, "-0", None, 0.125],
        ["1e400", 10**30, "0.1", None, 1 / 3],
        ["3,25", 3.4e38, 1.5e-45, None, 0.1],
        ["2,5e3", "-1.5", None, 1e300, 2 / 3],
        [True, False, "да", "НЕТ", "yes", "No", "Истина", "ложь", "ВКЛ", "выкл", "x", "✓",
         "T", "f", "on", "OFF", 1, 0, "1", "0", "Y", "n", None],
        [WHEN.date(), WHEN, 45352.0, "2024-03-01", "01.03.2024", None, 60.0, 61.0],
        [WHEN, 45352.25, "2024-03-01 12:00:00", "01.03.2024 13:30", "2024-03-01T10:00:00",
         None, WHEN + dt.timedelta(microseconds=7)],
        [WHEN, 45000.5, "2024-03-01 12:00:00+03:00", "2024-03-31 02:30:00", None,
         dt.date(2024, 3, 1), "2024-10-27 02:30:00"],
        ["ab", "abcd", 12, 12.5, " x ", None],
        ["строка\tс табом\nи переводом \\ слэш\r", "", "   ", 1.0, 2.5, True, WHEN, None,
         "😡" * 3, 100001.0, 1e20],
    ]
    bad: list[list[Any]] = [
        [None, "abc", 1.5],
        [32768, 3.5, "x"], [2147483648, "1.5"], [1000000, "abc"], ["NaN", "inf"],
        [1e39, "inf", "1e-50"], ["-inf", "x"], ["maybe", 2, 0.5],
        ["31.02.2024", -1.0, "soon"], [2958466.0, "soon", True], ["tomorrow", 1e9],
        ["abcde"], [],
    ]
    rows: list[list[Any]] = []
    for i in range(1, 241):
        row = [i if i % 17 else f" {i} "]  # ids as numbers and as padded text
        for c in range(1, 13):
            if bad[c] and (i * 7 + c) % 41 == 0:
                row.append(bad[c][(i // 41) % len(bad[c])])
            else:
                row.append(good[c][(i + c) % len(good[c])])
        rows.append(row)
    rows[40] = [None] * 13  # an empty row in the middle
    rows[41] = [42] + [None] * 12  # only the key
    rows[60][0] = rows[59][0]  # a key repeated in the same batch: the last one wins
    rows[150][0] = 7  # a key repeated in a later batch
    rows[99][0] = None  # no key: a reject
    rows[120][0] = "abc"
    return rows


def chats_rows() -> list[list[Any]]:
    rows = [xf.chat_row(i) for i in range(1, 301)]
    rows[10][0] = "not an id"
    rows[20][7] = None  # created_at is NOT NULL
    rows[30][9] = 1.5  # message_count is an integer
    rows[40][12] = "sometimes"
    rows[50] = [None] * 13
    return rows


def _ragged_sheet() -> str:
    """Rows of different lengths, inline and shared strings mixed, booleans as t="b",
    a numeric string cell, and an error cell."""
    head = "".join(f'<c r="{chr(65 + c)}1" t="s"><v>{c}</v></c>' for c in range(4))
    rows = [f'<row r="1">{head}</row>']
    for r in range(2, 40):
        cells = [f'<c r="A{r}"><v>{r}</v></c>']
        if r % 2:
            cells.append(f'<c r="B{r}" t="inlineStr"><is><t>inline {r}</t></is></c>')
        else:
            cells.append(f'<c r="B{r}" t="s"><v>{4 + r % 3}</v></c>')
        if r % 3:
            cells.append(f'<c r="C{r}" t="b"><v>{r % 2}</v></c>')
        if r % 5 == 0:
            cells.append(f'<c r="D{r}" t="str"><v>{r * 1.5}</v></c>')
        if r % 11 == 0:
            cells.append(f'<c r="D{r}" t="e"><v>#DIV/0!</v></c>')
        if r % 13 == 0:
            cells = cells[:1]  # a row with only its id
        rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    rows.append('<row r="45"><c r="A45"><v>45</v></c><c r="B45" t="inlineStr"><is><t>'
                'after a gap</t></is></c></row>')
    return (xf.SHEET_HEAD + '<dimension ref="A1:D45"/><sheetData>' + "".join(rows)
            + "</sheetData></worksheet>")


_STRINGS = ["id", "code", "flag", "note", "shared a", "shared b", "  shared c  "]
_SST = ('<?xml version="1.0" encoding="UTF-8"?><sst xmlns="http://schemas.openxmlformats.org/'
        f'spreadsheetml/2006/main" count="{len(_STRINGS)}" uniqueCount="{len(_STRINGS)}">'
        + "".join(f'<si><t xml:space="preserve">{s}</t></si>' for s in _STRINGS) + "</sst>")
RAGGED_TARGET = Target("ragged", "ragged", (
    _col("id", "bigint", False), _col("code", "text"), _col("flag", "boolean"),
    _col("note", "text"),
), ("id",))


def _below_a1(workbook: Any, worksheet: Any) -> None:
    for r, row in enumerate([KINDS_HEADER, *kinds_rows()[:60]], start=4):
        for c, value in enumerate(row, start=3):
            if value is not None:
                worksheet.cell(r, c, value)


WORKBOOKS: dict[str, tuple[Callable[[Path], Path], Target]] = {
    "chats_inline_strings": (lambda p: xf.write_xlsxwriter(p, chats_rows()), CHATS_TARGET),
    "chats_shared_strings_1904": (lambda p: xf.write_openpyxl(p, chats_rows(), date1904=True),
                                  CHATS_TARGET),
    "kinds_inline_1904": (lambda p: xf.write_xlsxwriter(p, kinds_rows(), header=KINDS_HEADER,
                                                        date1904=True), KINDS_TARGET),
    "kinds_shared_1900": (lambda p: xf.write_openpyxl(p, kinds_rows(), header=KINDS_HEADER),
                          KINDS_TARGET),
    "kinds_below_a1": (lambda p: xf.write_openpyxl(p, [], header=None, extra=_below_a1),
                       KINDS_TARGET),
    "ragged_mixed_strings": (lambda p: xf.raw_workbook(p, _ragged_sheet(), shared_strings=_SST),
                             RAGGED_TARGET),
}


def _exact(value: Any) -> str:
    """A value as text that tells every difference (type and all digits)."""
    return f"{type(value).__name__}:{value!r}"


async def observe(db: Database, path: Path, target: Target, reader: str) -> dict[str, Any]:
    """What one import leaves behind: the table, the counters, the rejects."""
    await db.execute(f"DROP TABLE IF EXISTS {target.table}")
    await ensure_target_table(db, target)
    job = await new_job(db)
    ctx = LocalContext(db, job)
    # The sliced readers get slices of ~2 KiB, so that every workbook is cut into
    # many (the Arrow path never reads the header's slice): both the cuts and each
    # slice's choice of path are under test.
    sliced = reader in ("arrow-stream", "calamine-stream")
    settings = MigrationSettings(batch_rows=50, reader=reader, timezone="Europe/Moscow",
                                 slice_bytes=2048 if sliced else 8 * 1024**2)
    result = await run_pipeline(ctx, ExcelSource(path, None, settings), target,
                                timezone="Europe/Moscow")
    key = target.key[0]
    rows = await db.fetch(f"SELECT * FROM {target.table} ORDER BY {key}")
    rejects = await db.fetch(
        "SELECT row_number, column_name, reason, raw::text FROM migration_rejects"
        " WHERE job_id = $1 ORDER BY row_number, column_name", job)
    return {
        "counters": ctx.counters,
        "inserted": result["inserted"], "updated": result["updated"],
        "rows": [{k: _exact(v) for k, v in row.items()} for row in rows],
        "rejects": [list(r) for r in rejects],
        "slices": result.get("slices"),
    }


def _reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}


@pytest.mark.parametrize("reader", ["auto", "arrow-stream", "calamine-stream", "calamine",
                                    "openpyxl"])
@pytest.mark.parametrize("name", sorted(WORKBOOKS))
async def test_rows_reaching_postgresql_equal_the_reference(db: Database, tmp_path: Path,
                                                            name: str, reader: str) -> None:
    build, target = WORKBOOKS[name]
    path = build(tmp_path / f"{name}.xlsx")
    got = await observe(db, path, target, reader)
    if reader == "openpyxl":
        # openpyxl types a few cells differently from calamine (whole numbers come as
        # int, t="str" stays text): compare it only where the values are the same
        # kind, i.e. the counters of a whole import.
        assert got["counters"] == _reference()[name]["counters"]
        return
    if reader == "arrow-stream" and name.startswith("chats"):
        # Clean slices after the rejects: the Arrow path must have taken some.
        assert got["slices"]["arrow"] > 0, got["slices"]
    got.pop("slices")
    if WRITE and reader == "auto":
        reference = _reference()
        reference[name] = got
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(reference, ensure_ascii=False, indent=1,
                                        sort_keys=True) + "\n")
    expected = _reference()[name]
    assert got["counters"] == expected["counters"]
    assert got["rejects"] == expected["rejects"]
    assert got["rows"] == expected["rows"]
    assert (got["inserted"], got["updated"]) == (expected["inserted"], expected["updated"])
