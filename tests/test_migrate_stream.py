"""The sliced reader (calamine-stream, the default) against the whole-sheet path.

For varied workbooks, the rows that reach PostgreSQL, the counters, the result
and the rejects (row numbers, reasons, raw values) must be the same whether
python-calamine loads the whole sheet or slices of a few rows each (tiny slices,
so every workbook is cut many times, also between the header and the data).
"""

from __future__ import annotations

import datetime as dt
import itertools
import zipfile
from pathlib import Path
from typing import Any

import pytest

from nurseryd.db import Database
from nurseryd.kinds.migrate.sources.sheet_chunks import NotSplittable, SheetSplitter
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET, MigrationSettings
from nurseryd.kinds.migrate.xlsx_checks import WorkbookRejected
from tests import xlsx_factory as xf
from tests.test_migrate_excel import migrate

HEADER = xf.CHATS_HEADER
WHEN = dt.datetime(2024, 3, 1, 10, 30)


def _varied_rows() -> list[list[Any]]:
    rows: list[list[Any]] = [xf.chat_row(i) for i in range(1, 61)]
    rows[3][12] = "да"
    rows[4][12] = "нет"
    rows[5][12] = "yes"
    rows[6][12] = "FALSE"
    rows[7][12] = 1
    rows[8][12] = "maybe"  # a reject
    rows[9][9] = "twelve"  # a reject in another column
    rows[10][7] = "01.03.2024 13:30"  # a date as text
    rows[11][7] = 45352.5  # a date as a serial number
    rows[12] = [None] * 13  # an empty row in the middle
    rows[13] = rows[13][:8]  # a ragged (short) row: NOT NULL message_count missing
    rows[14] = [*rows[14], "beyond the header"]  # a ragged (long) row
    rows[15][2] = None  # empty cells
    rows[15][4] = ""
    rows[16][0] = rows[17][0]  # a key repeated in the sheet: the later row wins
    return rows


def _offset(rows: list[list[Any]]) -> Any:
    """Header at C3, a blank row and a stray cell in column A further down."""
    def place(workbook: Any, worksheet: Any) -> None:
        for r, row in enumerate([HEADER, *rows], start=3):
            for c, value in enumerate(row, start=3):
                worksheet.cell(r, c, value)
        worksheet.cell(3 + len(rows) + 3, 1, "stray")
    return place


def _workbooks(tmp_path: Path) -> dict[str, Path]:
    rows = _varied_rows()
    return {
        "inline strings": xf.write_xlsxwriter(tmp_path / "inline.xlsx", rows),
        "shared strings": xf.write_openpyxl(tmp_path / "shared.xlsx", rows),
        "shared strings, xlsxwriter, 1904": xf.write_xlsxwriter(
            tmp_path / "sst1904.xlsx", rows, constant_memory=False, date1904=True),
        "openpyxl 1904": xf.write_openpyxl(tmp_path / "opx1904.xlsx", rows, date1904=True),
        "table below A1, ragged": xf.write_openpyxl(tmp_path / "offset.xlsx", [], header=None,
                                                    extra=_offset(rows)),
    }


async def _truncate(db: Database) -> None:
    await ensure_target_table(db, CHATS_TARGET)
    await db.execute("TRUNCATE chats")


async def _snapshot(db: Database, path: Path, reader: str) -> dict[str, Any]:
    await _truncate(db)
    settings = MigrationSettings(batch_rows=7, reader=reader, slice_bytes=2048)
    ctx, result = await migrate(db, path, settings=settings)
    rejects = await db.fetch(
        "SELECT row_number, column_name, reason, raw FROM migration_rejects WHERE job_id = $1 "
        "ORDER BY row_number", ctx.job_id)
    return {
        "rows": [tuple(r) for r in await db.fetch("SELECT * FROM chats ORDER BY chat_id")],
        "counters": ctx.counters, "rejects": [tuple(r) for r in rejects],
        "result": {k: v for k, v in result.items() if k not in ("reader", "slices")},
        "reader": result["reader"],
    }


async def test_sliced_reads_load_what_the_whole_sheet_loads(db: Database,
                                                            tmp_path: Path) -> None:
    for name, path in _workbooks(tmp_path).items():
        whole = await _snapshot(db, path, "calamine")
        assert whole["rows"] and len(whole["rejects"]) >= 3, (name, whole)
        for reader in ("calamine-stream", "arrow-stream"):
            sliced = await _snapshot(db, path, reader)
            assert sliced["reader"] == reader, name
            for part in ("rows", "counters", "rejects", "result"):
                assert sliced[part] == whole[part], (name, reader, part)


async def test_resume_skips_whole_slices_and_stays_exact(db: Database, tmp_path: Path) -> None:
    """A resumed job starts after the committed row, mid-slice or on a slice border."""
    path = xf.write_xlsxwriter(tmp_path / "r.xlsx", [xf.chat_row(i) for i in range(1, 301)])
    for reader, position in itertools.product(("calamine-stream", "arrow-stream"),
                                              (1, 37, 150, 301)):
        settings = MigrationSettings(batch_rows=10, reader=reader, slice_bytes=4096)
        await _truncate(db)
        checkpoint = {"v": 1, "position": position, "processed": position - 1, "failed": 0,
                      "inserted": position - 1, "updated": 0, "unchanged": 0}
        ctx, result = await migrate(db, path, settings=settings, checkpoint=checkpoint)
        assert ctx.counters["processed"] == 300, (reader, position)
        expected = list(range(100000 + position, 100301))
        assert await db.fetchval("SELECT coalesce(array_agg(chat_id ORDER BY chat_id), "
                                 "'{}') FROM chats") == expected, (reader, position)
        if reader == "arrow-stream" and position < 301:
            assert result["slices"]["arrow"] > 0, result["slices"]


def _splitter(tmp_path: Path, sheet_xml: str, chunk_bytes: int = 64) -> SheetSplitter:
    path = xf.raw_workbook(tmp_path / "raw.xlsx", sheet_xml)
    return SheetSplitter(zipfile.ZipFile(path), "xl/worksheets/sheet1.xml",
                         chunk_bytes=chunk_bytes)


def test_slices_are_whole_rows_with_their_numbers(tmp_path: Path) -> None:
    rows = "".join(f'<row r="{n}"><c r="A{n}"><v>{n}</v></c></row>' for n in range(2, 40, 3))
    xml = xf.SHEET_HEAD + '<dimension ref="A2:A38"/><sheetData>' + rows + \
        "</sheetData><mergeCells/></worksheet>"
    splitter = _splitter(tmp_path, xml)
    chunks = list(splitter.chunks())
    assert len(chunks) > 3
    assert b"".join(chunk.body for chunk in chunks) == rows.encode()
    assert chunks[0].first_row == 2 and chunks[-1].last_row == 38
    assert all(chunk.body.endswith(b"</row>") for chunk in chunks)
    assert b"dimension" not in splitter.prolog  # calamine sizes nothing from it


@pytest.mark.parametrize("body, error", [
    ("<row><c><v>1</v></c></row>", NotSplittable),  # no row numbers
    ('<!-- </row> --><row r="1"><c r="A1"><v>1</v></c></row>', NotSplittable),
    ('<row r="5"><c r="A5"><v>1</v></c></row>' * 2 + '<row r="3"><c r="A3"><v>1</v></c></row>',
     WorkbookRejected),  # out of order across slices
    ('<row r="1"><c r="A1"><v>1</v></c>', WorkbookRejected),  # truncated
])
def test_sheets_that_cannot_be_cut_are_refused(tmp_path: Path, body: str, error: type) -> None:
    xml = xf.SHEET_HEAD + "<sheetData>" + body + ("</sheetData></worksheet>"
                                                  if "</row>" in body[-6:] else "")
    with pytest.raises(error):
        list(_splitter(tmp_path, xml, chunk_bytes=16).chunks())


async def test_a_sheet_outside_xl_worksheets_is_read_once(db: Database, tmp_path: Path) -> None:
    """The slices replace the sheet part wherever the relationships put it."""
    source = xf.write_xlsxwriter(tmp_path / "a.xlsx", [xf.chat_row(i) for i in range(1, 41)])
    moved = tmp_path / "moved.xlsx"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(moved, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            name = info.filename
            if name == "xl/worksheets/sheet1.xml":
                name = "xl/data/sheet1.xml"
            elif name in ("xl/_rels/workbook.xml.rels", "[Content_Types].xml"):
                data = data.replace(b"worksheets/sheet1.xml", b"data/sheet1.xml")
            new.writestr(name, data)
    await _truncate(db)
    settings = MigrationSettings(batch_rows=7, reader="calamine-stream", slice_bytes=2048)
    ctx, result = await migrate(db, moved, settings=settings)
    assert result["reader"] == "calamine-stream"
    assert ctx.counters == {"total": 40, "processed": 40, "failed": 0}
    assert result["inserted"] == 40
