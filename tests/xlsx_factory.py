"""Workbooks for the migration tests, written by real writers (openpyxl, xlsxwriter),
plus hand-built hostile archives. Every file is small: the 155k-row workbook
belongs to the benchmark, not to the tests.
"""

from __future__ import annotations

import datetime as dt
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHATS_HEADER = [
    "chat_id", "external_id", "customer_name", "customer_email", "phone", "channel",
    "status", "created_at", "closed_at", "message_count", "rating", "last_message", "is_vip",
]


def chat_row(i: int) -> list[Any]:
    """A deterministic chats row like ../shared/bench/gen_chats_xlsx.py writes."""
    created = dt.datetime(2023, 1, 1, 8, 0, 0) + dt.timedelta(hours=i)
    closed = created + dt.timedelta(minutes=30) if i % 3 == 0 else None
    return [
        100000 + i, f"CH-{i:06d}", "Анна Иванова" if i % 2 else f"John Smith {i}",
        f"user{i}@example.org", None if i % 7 == 0 else f"+7 916 000-00-{i % 100:02d}",
        ["telegram", "whatsapp", "web", "email"][i % 4], ["closed", "open", "pending"][i % 3],
        created, closed, 1 + i % 40, (1.0 + (i % 41) / 10) if closed else None,
        f"Здравствуйте! Заказ №{i}\nне пришёл 😡\tтаб", i % 14 == 0,
    ]


def write_openpyxl(path: Path, rows: Sequence[Sequence[Any]], *, header: Sequence[Any] | None =
                   CHATS_HEADER, sheet: str = "chats", date1904: bool = False,
                   extra: Any = None) -> Path:
    """A normal workbook via openpyxl (shared strings, like Excel writes)."""
    import openpyxl

    workbook = openpyxl.Workbook()
    worksheet = workbook.active
    worksheet.title = sheet
    if date1904:
        workbook.epoch = openpyxl.utils.datetime.CALENDAR_MAC_1904
    if header is not None:
        worksheet.append(list(header))
    for row in rows:
        worksheet.append(list(row))
    if extra is not None:
        extra(workbook, worksheet)
    workbook.save(path)
    return path


def write_xlsxwriter(path: Path, rows: Sequence[Sequence[Any]], *,
                     header: Sequence[Any] | None = CHATS_HEADER, sheet: str = "chats",
                     constant_memory: bool = True, date1904: bool = False,
                     extra: Any = None) -> Path:
    """A workbook via xlsxwriter (inline strings in constant_memory mode)."""
    import xlsxwriter

    workbook = xlsxwriter.Workbook(str(path), {"constant_memory": constant_memory,
                                               "date_1904": date1904,
                                               "strings_to_numbers": False})
    worksheet = workbook.add_worksheet(sheet)
    date_format = workbook.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
    offset = 0
    if header is not None:
        worksheet.write_row(0, 0, list(header))
        offset = 1
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, dt.datetime):
                worksheet.write_datetime(r + offset, c, value, date_format)
            elif isinstance(value, bool):
                worksheet.write_boolean(r + offset, c, value)
            elif isinstance(value, int | float):
                worksheet.write_number(r + offset, c, value)
            else:
                worksheet.write_string(r + offset, c, str(value))
    if extra is not None:
        extra(workbook, worksheet)
    workbook.close()
    return path


# ------------------------------------------------------------------------ hostile

_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
    'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-'
    'officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.'
    'openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    '<Override PartName="/xl/sharedStrings.xml" ContentType="application/vnd.'
    'openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>')
_RELS = (
    '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
    'openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://'
    'schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="xl/workbook.xml"/></Relationships>')
_WB_RELS = (
    '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
    'openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://'
    'schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" '
    'Target="worksheets/sheet1.xml"/><Relationship Id="rId2" Type="http://schemas.'
    'openxmlformats.org/officeDocument/2006/relationships/sharedStrings" '
    'Target="sharedStrings.xml"/></Relationships>')
_WORKBOOK = (
    '<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="http://schemas.openxmlformats.org/'
    'spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships"><sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets>'
    '</workbook>')
_EMPTY_SST = ('<?xml version="1.0" encoding="UTF-8"?><sst xmlns="http://schemas.openxmlformats.'
              'org/spreadsheetml/2006/main" count="0" uniqueCount="0"/>')
SHEET_HEAD = ('<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="http://schemas.'
              'openxmlformats.org/spreadsheetml/2006/main">')


def _write_package_parts(archive: zipfile.ZipFile) -> None:
    """Everything of a minimal .xlsx except the sheet and the shared strings."""
    archive.writestr("[Content_Types].xml", _CONTENT_TYPES)
    archive.writestr("_rels/.rels", _RELS)
    archive.writestr("xl/_rels/workbook.xml.rels", _WB_RELS)
    archive.writestr("xl/workbook.xml", _WORKBOOK)


def raw_workbook(path: Path, sheet_xml: str | bytes, *, shared_strings: str | None = None,
                 compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A minimal .xlsx with the given sheet XML (hand-made, for hostile cases)."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        _write_package_parts(archive)
        archive.writestr("xl/worksheets/sheet1.xml", sheet_xml)
        archive.writestr("xl/sharedStrings.xml", shared_strings or _EMPTY_SST)
    return path


def without_row_numbers(source: Path, path: Path) -> Path:
    """A copy of a workbook whose rows carry no r attribute (legal OOXML: the number
    is then implied; the cells keep theirs), which the sliced reader cannot cut."""
    import re

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.startswith("xl/worksheets/"):
                data = re.sub(rb'(<row\b[^>]*?) r="\d+"', rb"\1", data)
                data = re.sub(rb"<dimension [^>]*/>", b"", data)
            new.writestr(info, data)
    return path


def _inline(ref: str, text: str) -> str:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'


def billion_laughs(path: Path) -> Path:
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    sheet = (f'<?xml version="1.0"?><!DOCTYPE worksheet [{entities}]>'
             + SHEET_HEAD.split("?>", 1)[1]
             + '<sheetData><row r="1">' + _inline("A1", "chat_id") + '</row><row r="2">'
             + _inline("A2", "&lol9;") + "</row></sheetData></worksheet>")
    return raw_workbook(path, sheet)


def xxe(path: Path, target: str = "file:///etc/hostname") -> Path:
    sheet = (f'<?xml version="1.0"?><!DOCTYPE worksheet [<!ENTITY xxe SYSTEM "{target}">]>'
             + SHEET_HEAD.split("?>", 1)[1]
             + '<sheetData><row r="1">' + _inline("A1", "chat_id") + '</row><row r="2">'
             + _inline("A2", "&xxe;") + "</row></sheetData></worksheet>")
    return raw_workbook(path, sheet)


def sparse_dimension(path: Path) -> Path:
    """Cells at A1 and XFD1048576 only: calamine would allocate a 512 GiB grid."""
    sheet = (SHEET_HEAD + '<dimension ref="A1:XFD1048576"/><sheetData>'
             '<row r="1"><c r="A1"><v>1</v></c></row>'
             '<row r="1048576"><c r="XFD1048576"><v>2</v></c></row></sheetData></worksheet>')
    return raw_workbook(path, sheet)


def sparse_no_dimension(path: Path) -> Path:
    """The same without a <dimension>: only the child's memory limit stops calamine."""
    sheet = (SHEET_HEAD + '<sheetData><row r="1"><c r="A1" t="inlineStr"><is><t>chat_id</t>'
             '</is></c></row><row r="1048576"><c r="XFD1048576"><v>2</v></c></row></sheetData>'
             '</worksheet>')
    return raw_workbook(path, sheet)


def huge_cell(path: Path, size: int = 1024**3) -> Path:
    """One text cell of ``size`` bytes that compresses ~1000:1 (a zip bomb)."""
    head = (SHEET_HEAD + '<dimension ref="A1:A2"/><sheetData><row r="1">'
            + _inline("A1", "chat_id") + '</row><row r="2"><c r="A2" t="inlineStr"><is><t>')
    tail = "</t></is></c></row></sheetData></worksheet>"
    path_tmp = path
    with zipfile.ZipFile(path_tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        _write_package_parts(archive)
        archive.writestr("xl/sharedStrings.xml", _EMPTY_SST)
        with archive.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as member:
            member.write(head.encode())
            block = b"A" * (4 * 1024**2)
            written = 0
            while written < size:
                member.write(block)
                written += len(block)
            member.write(tail.encode())
    return path


def many_rows_bomb(path: Path, rows: int = 3_000_000) -> Path:
    """Millions of identical rows (highly compressible) with no <dimension>."""
    row = '<row><c t="inlineStr"><is><t>x</t></is></c><c><v>1</v></c></row>'
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        _write_package_parts(archive)
        archive.writestr("xl/sharedStrings.xml", _EMPTY_SST)
        with archive.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as member:
            member.write((SHEET_HEAD + "<sheetData>").encode())
            chunk = (row * 10_000).encode()
            for _ in range(rows // 10_000):
                member.write(chunk)
            member.write(b"</sheetData></worksheet>")
    return path


# --------------------------------------------------------------------- not xlsx

def ole_file(path: Path, stream_names: Sequence[str]) -> Path:
    """A minimal valid OLE compound file whose directory lists ``stream_names``."""
    sector = 512
    entries = ["Root Entry", *stream_names]
    directory = bytearray()
    for index, name in enumerate(entries):
        encoded = name.encode("utf-16-le") + b"\x00\x00"
        entry = bytearray(128)
        entry[0:len(encoded)] = encoded
        struct.pack_into("<H", entry, 64, len(encoded))
        entry[66] = 5 if index == 0 else 2  # root storage / stream
        struct.pack_into("<III", entry, 68, 0xFFFFFFFF, 0xFFFFFFFF,
                         1 if index == 0 and len(entries) > 1 else 0xFFFFFFFF)
        directory += entry
    while len(directory) % sector:
        directory += b"\x00" * 128
    dir_sectors = len(directory) // sector
    # sector 0: FAT; sectors 1..n: directory
    fat = [0xFFFFFFFD] + [i + 2 for i in range(dir_sectors - 1)] + [0xFFFFFFFE]
    fat += [0xFFFFFFFF] * (sector // 4 - len(fat))
    header = bytearray(512)
    header[0:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    struct.pack_into("<HHHH", header, 24, 0x3E, 3, 0xFFFE, 9)
    struct.pack_into("<H", header, 32, 6)
    struct.pack_into("<I", header, 44, 1)  # number of FAT sectors
    struct.pack_into("<I", header, 48, 1)  # first directory sector
    struct.pack_into("<I", header, 56, 4096)
    struct.pack_into("<I", header, 60, 0xFFFFFFFE)
    struct.pack_into("<I", header, 68, 0xFFFFFFFE)
    difat = [0] + [0xFFFFFFFF] * 108
    struct.pack_into("<109I", header, 76, *difat)
    path.write_bytes(bytes(header) + struct.pack(f"<{sector // 4}I", *fat) + bytes(directory))
    return path


def encrypted_xlsx(path: Path) -> Path:
    return ole_file(path, ["EncryptionInfo", "EncryptedPackage", "\x06DataSpaces"])


def legacy_xls(path: Path) -> Path:
    return ole_file(path, ["Workbook", "\x05SummaryInformation"])


def docx_like(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("[Content_Types].xml", _CONTENT_TYPES)
        archive.writestr("word/document.xml", "<w:document/>")
    return path
