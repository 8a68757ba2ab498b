"""Excel workbooks from real writers through the parser child into PostgreSQL,
and hostile workbooks failing fast with a clear reason."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest
import trio

from nurseryd.db import Database
from nurseryd.kinds.base import JobFailed
from nurseryd.kinds.migrate.coerce import ColumnSpec
from nurseryd.kinds.migrate.pipeline import run_pipeline
from nurseryd.kinds.migrate.sources.excel import ExcelSource
from nurseryd.kinds.migrate.tables import ensure_target_table
from nurseryd.kinds.migrate.targets import CHATS_TARGET, MigrationSettings, Target
from nurseryd.kinds.migrate.xlsx_checks import (
    ParseCaps,
    UploadRejected,
    WorkbookRejected,
    check_expat,
    sniff_upload,
)
from tests import xlsx_factory as xf
from tests.test_migrate_pipeline import LocalContext, new_job

ROWS = [xf.chat_row(i) for i in range(1, 121)]


async def migrate(db: Database, path: Path, *, reader: str = "auto", sheet: str | None = None,
                  target: Target = CHATS_TARGET, settings: MigrationSettings | None = None,
                  checkpoint=None, job: int | None = None):
    await ensure_target_table(db, target)
    settings = settings or MigrationSettings(batch_rows=50, reader=reader)
    ctx = LocalContext(db, job or await new_job(db), checkpoint=checkpoint)
    source = ExcelSource(path, sheet, settings)
    result = await run_pipeline(ctx, source, target, timezone="UTC")
    return ctx, result


async def chats_checksum(db: Database) -> list:
    return [tuple(r) for r in await db.fetch("SELECT * FROM chats ORDER BY chat_id")]


@pytest.mark.parametrize("reader", ["arrow-stream", "calamine-stream", "calamine",
                                    "openpyxl"])
async def test_both_writers_and_both_readers_load_the_same_rows(db: Database, tmp_path: Path,
                                                                reader: str) -> None:
    by_xlsxwriter = xf.write_xlsxwriter(tmp_path / "a.xlsx", ROWS)
    by_openpyxl = xf.write_openpyxl(tmp_path / "b.xlsx", ROWS)
    ctx, result = await migrate(db, by_xlsxwriter, reader=reader)
    assert ctx.counters == {"total": 120, "processed": 120, "failed": 0}
    assert result["reader"] == reader and result["inserted"] == 120
    first = await chats_checksum(db)
    row = await db.fetchrow("SELECT * FROM chats WHERE chat_id = 100003")
    assert row["rating"] == pytest.approx(1.3) and row["closed_at"] is not None
    assert row["message_count"] == 4 and row["last_message"].endswith("😡\tтаб")
    ctx, result = await migrate(db, by_openpyxl, reader=reader)
    assert result["unchanged"] == 120  # same values whichever writer made the file
    assert await chats_checksum(db) == first


async def test_odd_layouts(db: Database, tmp_path: Path) -> None:
    """Aliased/odd headers, empty rows, merged cells, formulas with cached values,
    dates as serials and as text, trailing empty columns."""
    header = ["ID чата", " External ID ", "Клиент", "CHANNEL", "Статус", "Дата создания",
              "messages", "VIP", "ignored col"]
    rows = [
        [1, "E1", "Анна", "web", "open", dt.datetime(2024, 3, 1, 10), 3, "да", "x"],
        [None] * 9,  # empty row in the middle
        [2, "E2", "Merged", "web", "open", 45352.5, 4, "no", None],  # date as serial
        [3, "E3", None, "email", "closed", "2024-03-01 12:00:00", 5, True, None],
        [4, "E4", None, "web", "open", "01.03.2024 13:30", None, False, None],  # formula below
    ]

    def extra(workbook, worksheet) -> None:
        worksheet.merge_range("C4:C5", "Merged")  # C4 holds the value, C5 is empty
        worksheet.write_formula("G6", "=2+3", None, 5)  # cached value 5
        worksheet.write_blank("Z6", None)  # a trailing empty (formatted) column

    path = xf.write_xlsxwriter(tmp_path / "odd.xlsx", rows, header=header,
                               constant_memory=False, extra=extra)
    ctx, result = await migrate(db, path)
    assert ctx.counters == {"total": 4, "processed": 4, "failed": 0}, result
    assert result["ignored_columns"] == ["ignored col"]
    got = {r["chat_id"]: r for r in await db.fetch("SELECT * FROM chats")}
    assert got[2]["created_at"] == dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC)
    assert got[3]["created_at"] == dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC)
    assert got[4]["created_at"] == dt.datetime(2024, 3, 1, 13, 30, tzinfo=dt.UTC)
    assert got[4]["message_count"] == 5  # the formula's cached value
    assert got[1]["is_vip"] is True and got[2]["is_vip"] is False
    assert got[2]["customer_name"] == "Merged" and got[3]["customer_name"] is None


@pytest.mark.parametrize("writer", ["openpyxl", "xlsxwriter"])
async def test_1904_date_system(db: Database, tmp_path: Path, writer: str) -> None:
    rows = [[1, "E1", "web", "open", dt.datetime(2024, 3, 1, 10), 1, False]]
    header = ["chat_id", "external_id", "channel", "status", "created_at", "message_count",
              "is_vip"]
    write = xf.write_openpyxl if writer == "openpyxl" else xf.write_xlsxwriter
    path = write(tmp_path / "mac.xlsx", rows, header=header, date1904=True)
    for reader in ("arrow-stream", "calamine-stream", "calamine", "openpyxl"):
        ctx, result = await migrate(db, path, reader=reader)
        assert result["date1904"] is True
        assert await db.fetchval("SELECT created_at FROM chats") == \
            dt.datetime(2024, 3, 1, 10, tzinfo=dt.UTC), reader


async def test_resume_after_interruption_through_the_child(db: Database, tmp_path: Path) -> None:
    path = xf.write_xlsxwriter(tmp_path / "r.xlsx", ROWS)
    job = await new_job(db)
    await ensure_target_table(db, CHATS_TARGET)
    settings = MigrationSettings(batch_rows=20)
    ctx = LocalContext(db, job)
    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                await run_pipeline(ctx, ExcelSource(path, None, settings), CHATS_TARGET)

            nursery.start_soon(run)
            await ctx.processed_at_least(40)  # interrupt after two batches
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    checkpoint = await db.fetchval("SELECT checkpoint FROM jobs WHERE id = $1", job)
    done = checkpoint["processed"]
    assert done >= 40 and checkpoint["position"] == done + 1  # header is row 1
    assert await db.fetchval("SELECT count(*) FROM chats") == done
    ctx2, result = await migrate(db, path, checkpoint=checkpoint, job=job, settings=settings)
    assert ctx2.counters == {"total": 120, "processed": 120, "failed": 0}
    assert result["inserted"] == 120 and result["unchanged"] == 0
    assert await db.fetchval("SELECT count(DISTINCT chat_id) FROM chats") == 120


async def test_cancel_while_parsing_kills_the_child_fast(db: Database, tmp_path: Path) -> None:
    path = xf.many_rows_bomb(tmp_path / "slow.xlsx", rows=400_000)
    target = Target("x", "xs", (ColumnSpec("x", "text", False, key=True),), ("x",))
    settings = MigrationSettings(reader="openpyxl", caps=ParseCaps(max_ratio=1e9))
    await ensure_target_table(db, target)
    ctx = LocalContext(db, await new_job(db))
    source = ExcelSource(path, None, settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_pipeline, ctx, source, target)
        await source.reading.wait()
        await trio.sleep(0.2)  # let openpyxl get deep into the sheet (not a sync point)
        pid = source.pid
        begin = time.monotonic()
        nursery.cancel_scope.cancel()
    elapsed = time.monotonic() - begin
    assert elapsed < 0.1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


HOSTILE = {
    "billion laughs": (xf.billion_laughs, "could not be read"),
    "external entity": (xf.xxe, "could not be read"),
    "sparse dimension A1:XFD1048576": (xf.sparse_dimension, "up to column 16384"),
    "zip bomb: 256 MiB cell": (lambda p: xf.huge_cell(p, 256 * 1024**2), "zip bomb"),
    "zip bomb: millions of rows": (lambda p: xf.many_rows_bomb(p, 3_000_000), "zip bomb"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("reader", ["arrow-stream", "calamine-stream", "calamine",
                                    "openpyxl"])
async def test_hostile_workbooks_fail_fast_with_a_reason(db: Database, tmp_path: Path,
                                                          name: str, reader: str) -> None:
    build, reason = HOSTILE[name]
    path = build(tmp_path / "evil.xlsx")
    begin = time.monotonic()
    with pytest.raises(JobFailed, match=reason) as info:
        await migrate(db, path, reader=reader)
    assert time.monotonic() - begin < 2, info.value
    assert "/etc/hostname" not in str(info.value) or name == "external entity"


async def test_sparse_sheet_without_dimension_hits_the_memory_limit(db: Database,
                                                                    tmp_path: Path) -> None:
    """No <dimension> to refuse: calamine tries a 512 GiB grid and aborts; the
    child dies, the job fails with a clear reason, this process is untouched."""
    path = xf.sparse_no_dimension(tmp_path / "sparse.xlsx")
    settings = MigrationSettings(reader="calamine", memory_budget_bytes=512 * 1024**2)
    begin = time.monotonic()
    with pytest.raises(JobFailed, match="memory limit of 512 MiB"):
        await migrate(db, path, settings=settings)
    assert time.monotonic() - begin < 2


async def test_row_cap_holds_when_the_dimension_is_missing(db: Database, tmp_path: Path) -> None:
    path = xf.many_rows_bomb(tmp_path / "rows.xlsx", rows=30_000)
    target = Target("x", "xs", (ColumnSpec("x", "text", False, key=True),), ("x",))
    settings = MigrationSettings(caps=ParseCaps(max_rows=10_000, max_ratio=1e9))
    with pytest.raises(JobFailed, match="more than 10,000 data rows"):
        await migrate(db, path, target=target, settings=settings)


async def test_missing_sheet_and_missing_columns_are_clear(db: Database, tmp_path: Path) -> None:
    path = xf.write_openpyxl(tmp_path / "s.xlsx", ROWS[:3])
    with pytest.raises(JobFailed, match="no sheet named 'Лист2'; its sheets are: 'chats'"):
        await migrate(db, path, sheet="Лист2")
    path = xf.write_openpyxl(tmp_path / "h.xlsx", [r[:5] for r in ROWS[:3]],
                             header=xf.CHATS_HEADER[:5])
    with pytest.raises(JobFailed, match="lacks required column.*channel, status, created_at, "
                                        "message_count, is_vip"):
        await migrate(db, path)


def test_old_expat_is_refused() -> None:
    check_expat("expat_2.5.0")
    with pytest.raises(WorkbookRejected, match="needs expat >= 2.4.0"):
        check_expat("expat_2.2.10")


@pytest.mark.parametrize("build,status,says", [
    (lambda p: p.write_bytes(b"a,b,c\n1,2,3\n") and p, 415, "CSV"),
    (lambda p: p.write_bytes(b"%PDF-1.4 ...") and p, 415, "PDF"),
    (lambda p: p.write_bytes(b"") and p, 415, "empty file"),
    (xf.legacy_xls, 415, "Excel 97-2003 .xls"),
    (xf.encrypted_xlsx, 422, "password-protected"),
    (xf.docx_like, 415, "Word document"),
    (lambda p: p.write_bytes(b"PK\x03\x04garbage") and p, 422, "truncated"),
])
def test_sniffing_names_what_was_received(tmp_path: Path, build, status: int, says: str) -> None:
    path = tmp_path / "upload.bin"
    build(path)
    with pytest.raises(UploadRejected) as info:
        sniff_upload(path)
    assert info.value.status == status and says in info.value.detail
    assert ".xlsx" in info.value.detail


def test_real_workbooks_pass_sniffing(tmp_path: Path) -> None:
    sniff_upload(xf.write_openpyxl(tmp_path / "a.xlsx", ROWS[:2]))
    sniff_upload(xf.write_xlsxwriter(tmp_path / "b.xlsx", ROWS[:2]))



@pytest.mark.parametrize("reader", ["arrow-stream", "calamine-stream", "calamine",
                                    "openpyxl"])
async def test_table_starting_below_and_right_of_a1(db: Database, tmp_path: Path,
                                                    reader: str) -> None:
    """Leading empty rows and columns: row numbers stay the sheet's, no row is lost."""
    header = ["chat_id", "external_id", "channel", "status", "created_at", "message_count",
              "is_vip"]

    def place(workbook, worksheet) -> None:
        worksheet.delete_rows(1, 100)
        for r, row in enumerate([header, *rows, [None] * 7, rows_last], start=3):
            for c, value in enumerate(row, start=3):
                worksheet.cell(r, c, value)

    when = dt.datetime(2024, 1, 1)
    rows = [[i, f"E{i}", "web", "open", when, i, False] for i in range(1, 4)]
    rows[1][6] = "sometimes"  # a reject: its row number must be the sheet's (row 5)
    rows_last = [9, "E9", "web", "open", when, 9, True]
    path = xf.write_openpyxl(tmp_path / "offset.xlsx", [], header=None, extra=place)
    job = await new_job(db)
    await ensure_target_table(db, CHATS_TARGET)
    ctx = LocalContext(db, job)
    await run_pipeline(ctx, ExcelSource(path, None, MigrationSettings(reader=reader)),
                       CHATS_TARGET)
    assert ctx.counters == {"total": 4, "processed": 3, "failed": 1}
    assert await db.fetchval("SELECT array_agg(chat_id ORDER BY chat_id) FROM chats") == \
        [1, 3, 9]
    assert await db.fetchval("SELECT row_number FROM migration_rejects WHERE job_id = $1",
                             job) == 5


async def test_reader_follows_the_memory_budget(db: Database, tmp_path: Path) -> None:
    """By default the sheet is read in slices whatever its size; a sheet that cannot be
    cut (here: rows without numbers) goes to whole-sheet calamine when its estimate fits
    the budget, else to openpyxl, which streams."""
    from nurseryd.kinds.migrate.sources.excel_child import BASE_BYTES

    rows = [xf.chat_row(i) for i in range(1, 1001)]
    sliced = xf.write_xlsxwriter(tmp_path / "sliced.xlsx", rows)
    ctx, result = await migrate(db, sliced)
    assert result["reader"] == "arrow-stream" and ctx.counters["processed"] == 1000
    path = xf.without_row_numbers(sliced, tmp_path / "budget.xlsx")
    fits = MigrationSettings(memory_budget_bytes=BASE_BYTES + 64 * 1024**2)
    tight = MigrationSettings(memory_budget_bytes=BASE_BYTES + 256 * 1024)
    ctx, result = await migrate(db, path, settings=fits)
    assert result["reader"] == "calamine" and ctx.counters["processed"] == 1000
    assert result["unchanged"] == 1000
    ctx, result = await migrate(db, path, settings=tight)
    assert result["reader"] == "openpyxl" and ctx.counters["processed"] == 1000
    assert result["unchanged"] == 1000  # the same values through the other reader


def test_the_parser_child_stays_light() -> None:
    """The child imports the sources' shared emitter and batch type but no event loop:
    its start-up is on the critical path of every import (trio alone costs ~0.15 s)."""
    import subprocess
    import sys

    from nurseryd.kinds.migrate.sources.excel import child_env

    code = ("import sys, nurseryd.kinds.migrate.sources.excel_child\n"
            "print(sorted(m for m in ('trio', 'asyncpg', 'httpx', 'quart') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-s", "-c", code], env=child_env(),
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_batch_crosses_the_pipe_as_itself() -> None:
    """The child's frames carry the one SourceBatch type: what goes in comes out."""
    from nurseryd.kinds.migrate.coerce import RejectRecord
    from nurseryd.kinds.migrate.sources import framing
    from nurseryd.kinds.migrate.sources.base import SourceBatch

    batch = SourceBatch(b"1\tx\n2\ty\n", 2, 3, [RejectRecord(4, "chat_id", "not a number",
                                                            {"chat_id": "z"})], 4)
    head, *rest = framing.encode_batch(batch)
    kind, length = framing.decode_head(head)
    body = b"".join(rest)
    assert kind == framing.BATCH and length == len(body)
    again = framing.decode_batch(body)
    assert bytes(again.payload) == batch.payload
    assert (again.written, again.rows_seen, again.rejects, again.position) == \
        (batch.written, batch.rows_seen, batch.rejects, batch.position)


async def test_batches_of_wide_rows_are_bounded_by_bytes_not_only_rows(
    db: Database, tmp_path: Path
) -> None:
    """Rows of ~20 KB each with batch_rows far above what fits: every batch's COPY
    text stays near batch_bytes (the first is small, later ones adapt), and every
    row still lands exactly once."""
    from nurseryd.kinds.migrate.sources.base import SourceBatch
    from nurseryd.kinds.migrate.sources.excel_child import FIRST_BATCH_ROWS

    rows = [xf.chat_row(i) for i in range(1, 401)]
    for row in rows:
        row[11] = "x" * 20_000  # the long text column
    path = xf.write_xlsxwriter(tmp_path / "wide.xlsx", rows)
    target_bytes = 256 * 1024
    settings = MigrationSettings(batch_rows=5000, batch_bytes=target_bytes)
    source = ExcelSource(path, None, settings)
    send, receive = trio.open_memory_channel(100)
    sizes: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        async def read_all() -> None:
            async with send:
                await source.run(CHATS_TARGET.columns, None, send)

        nursery.start_soon(read_all)
        async with receive:
            async for event in receive:
                if isinstance(event, SourceBatch):
                    sizes.append((event.rows_seen, len(event.payload)))
    assert sizes[0][0] == FIRST_BATCH_ROWS
    assert sum(rows_seen for rows_seen, _ in sizes) == 400
    # One batch may overshoot while it learns the row size; none grows past twice it.
    assert max(payload for _, payload in sizes) < 2 * FIRST_BATCH_ROWS * 21_000
    assert all(payload <= 2 * target_bytes for _, payload in sizes[1:])
    _, result = await migrate(db, path, settings=MigrationSettings(batch_rows=5000,
                                                                     batch_bytes=target_bytes))
    assert result["rows"] == 400 and result["rejected"] == 0
    assert await db.fetchval("SELECT count(*) FROM chats WHERE length(last_message) = 20000") \
        == 400


def cut_frames(stream: bytes, piece: int) -> list[tuple[bytes, bytes | bytearray]]:
    """The frames a FrameBuffer cuts out of ``stream`` fed ``piece`` bytes at a time."""
    from nurseryd.kinds.migrate.sources import framing

    frames = framing.FrameBuffer()
    got = []
    for start in range(0, len(stream), piece):
        frames.feed(stream[start:start + piece])
        while (frame := frames.next_frame()) is not None:
            got.append(frame)
    return got


def test_frames_are_cut_out_as_their_bytes_arrive() -> None:
    """The children's output in arbitrary pieces gives back exactly the frames sent."""
    from nurseryd.kinds.migrate.sources import framing

    stream = framing.encode(framing.INFO, {"a": 1}) + framing.encode(framing.DONE, {"b": "é"})
    for piece in (1, 3, 7, len(stream)):
        got = cut_frames(stream, piece)
        assert [(kind, json.loads(body)) for kind, body in got] == \
            [(framing.INFO, {"a": 1}), (framing.DONE, {"b": "é"})]
    hostile = framing.FrameBuffer()
    hostile.feed(b"B" + (framing.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="frame of"):
        hostile.next_frame()
