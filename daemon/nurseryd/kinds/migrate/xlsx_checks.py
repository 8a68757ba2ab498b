"""What a workbook claims about itself, checked before anyone parses it.

Two layers, because the dangers differ:

* :func:`sniff_upload` runs in the daemon at upload time and reads only magic
  bytes and the zip directory (no XML): is this an .xlsx at all, or an old .xls,
  a password-protected (encrypted OLE) workbook, an .xlsb/.ods/.docx, a CSV...?
  The answer is a 415/422 with a detail saying what was received.
* :func:`inspect_workbook` runs in the parser's child process, before the
  reader touches the sheet: declared sizes and compression ratios of the zip
  entries, the sheet's declared ``<dimension>``, the 1904 date flag. A zip bomb
  or a 5 KB "sparse dimension" file (A1 and XFD1048576: calamine tries to
  allocate 512 GiB and aborts) is refused here in milliseconds with a reason.

Entity expansion ("billion laughs") and external entities are left to expat:
Python 3.11's bundled expat >= 2.4 refuses them (measured), calamine does not
process DTDs at all; :func:`check_expat` refuses to parse with an older expat.
"""

from __future__ import annotations

import posixpath
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
MIN_EXPAT = (2, 4, 0)


class UploadRejected(ValueError):
    """The uploaded file is not something we can import; carries the HTTP status."""

    def __init__(self, status: int, detail: str, received: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.received = received


class WorkbookRejected(ValueError):
    """The workbook exceeds a configured cap or is malformed; ``str()`` is the job error."""


@dataclass(frozen=True)
class ParseCaps:
    """Limits on what a workbook may declare (configured in ``[migration]``)."""

    max_entry_bytes: int = 2 * 1024**3  # one uncompressed zip member
    max_total_bytes: int = 4 * 1024**3  # all members together
    max_ratio: float = 200.0  # uncompressed / compressed, for members > ratio_floor
    ratio_floor: int = 16 * 1024**2
    max_entries: int = 10_000
    max_rows: int = 5_000_000
    max_columns: int = 1_000


@dataclass(frozen=True)
class WorkbookInfo:
    sheet_name: str
    sheet_part: str  # zip member of the worksheet
    sheet_bytes: int  # declared uncompressed size of the worksheet XML
    shared_strings_bytes: int
    dimension: tuple[int, int, int, int] | None  # first row, first col, last row, last col
    date1904: bool
    sheet_names: tuple[str, ...]

    def estimated_rows(self) -> int | None:
        """Rows the dimension declares (header included), if it declares any."""
        if self.dimension is None:
            return None
        return self.dimension[2] - self.dimension[0] + 1


# --------------------------------------------------------------------------- expat


def check_expat(version: str | None = None) -> None:
    """Refuse to parse untrusted XML with an expat lacking billion-laughs protection."""
    if version is None:
        import pyexpat

        version = pyexpat.EXPAT_VERSION
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", version)
    found = tuple(int(part) for part in match.groups()) if match else (0, 0, 0)
    if found < MIN_EXPAT:
        raise WorkbookRejected(
            f"this Python's XML parser is {version}; parsing untrusted workbooks needs expat "
            f">= {'.'.join(map(str, MIN_EXPAT))} (entity-expansion protection); upgrade Python")


# ------------------------------------------------------------------------- sniffing

_KNOWN_MAGIC = [
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"Rar!", "a RAR archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"{\\rtf", "an RTF document"),
]
EXPECTED = "an Excel .xlsx workbook (Office Open XML, as saved by Excel 2007 or later)"


def _describe_bytes(head: bytes) -> str:
    if not head:
        return "an empty file"
    for magic, name in _KNOWN_MAGIC:
        if head.startswith(magic):
            return name
    stripped = head.lstrip()
    if stripped[:1] in (b"<",):
        return "an XML/HTML text file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    if "," in text or ";" in text or "\t" in text:
        return "a text file (CSV-like)"
    return "a text file"


#: The member names :func:`sniff_upload` tells formats apart by.
_TELLING_NAMES = frozenset({"xl/workbook.xml", "[Content_Types].xml", "xl/workbook.bin",
                            "content.xml", "mimetype", "word/document.xml",
                            "ppt/presentation.xml"})


class BadZip(ValueError):
    """The zip structure cannot be read."""


class TooManyEntries(ValueError):
    def __init__(self, entries: int) -> None:
        super().__init__(f"{entries} zip entries")
        self.entries = entries


_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"


def zip_member_names(file: BinaryIO, wanted: frozenset[str], *, max_entries: int) -> set[str]:
    """Which of ``wanted`` the zip's central directory names, in constant memory.

    Why not ``zipfile.ZipFile``: it builds a ``ZipInfo`` for every entry before
    anyone can look at the count (a 45 MB zip of 500,000 entries cost 264 MB in
    the daemon). Here the entry count comes from the end-of-central-directory
    record (ZIP64 too) and is refused above ``max_entries`` before a single entry
    is read; then the entries are walked one fixed header at a time.
    """
    size = file.seek(0, 2)
    tail_length = min(size, 22 + 65535)
    file.seek(size - tail_length)
    tail = file.read(tail_length)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        raise BadZip("no end-of-central-directory record")
    entries, cd_size, cd_offset = struct.unpack_from("<HII", tail, at + 10)
    if entries == 0xFFFF or cd_offset == 0xFFFFFFFF:
        locator = at - 20
        if locator < 0 or tail[locator:locator + 4] != _EOCD64_LOCATOR:
            raise BadZip("a ZIP64 archive without its locator")
        file.seek(struct.unpack_from("<Q", tail, locator + 8)[0])
        record = file.read(56)
        if len(record) < 56 or record[:4] != _EOCD64:
            raise BadZip("a damaged ZIP64 end-of-central-directory record")
        entries, cd_size, cd_offset = struct.unpack_from("<QQQ", record, 32)
    if entries > max_entries:
        raise TooManyEntries(entries)
    # Data prepended to the archive (self-extractors) shifts every offset alike.
    shift = (size - tail_length + at) - (cd_offset + cd_size)
    if shift < 0:
        raise BadZip("the central directory lies outside the file")
    file.seek(cd_offset + shift)
    found: set[str] = set()
    for _ in range(entries):
        header = file.read(46)
        if len(header) < 46 or header[:4] != _CENTRAL:
            raise BadZip("a damaged central directory entry")
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", header, 28)
        name = file.read(name_length).decode("utf-8", "replace")
        if name in wanted:
            found.add(name)
        file.seek(extra_length + comment_length, 1)
    return found


def sniff_upload(path: Path, max_entries: int = ParseCaps.max_entries) -> None:
    """Raise :class:`UploadRejected` unless ``path`` looks like an .xlsx workbook."""
    with open(path, "rb") as file:
        head = file.read(8)
        if head.startswith(OLE_MAGIC):
            names = _ole_stream_names(file)
            if {"encryptedpackage", "encryptioninfo"} & names:
                raise UploadRejected(
                    422, f"the workbook is password-protected (encrypted); expected {EXPECTED}. "
                         "Remove the password in Excel (File > Info > Protect Workbook) and "
                         "upload it again", "an encrypted Office document")
            if {"workbook", "book"} & names:
                raise UploadRejected(
                    415, f"received an old Excel 97-2003 .xls workbook; expected {EXPECTED}. "
                         "Save it as .xlsx in Excel and upload it again", "an Excel .xls workbook")
            raise UploadRejected(
                415, f"received an OLE compound document (e.g. an old Word/Excel file); "
                     f"expected {EXPECTED}", "an OLE compound document")
    if not (head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC)):
        what = _describe_bytes(head + _read_more(path))
        raise UploadRejected(415, f"received {what}; expected {EXPECTED}", what)
    try:
        with open(path, "rb") as file:
            names = zip_member_names(file, _TELLING_NAMES, max_entries=max_entries)
    except TooManyEntries as error:
        raise UploadRejected(
            422, f"the workbook has {error.entries:,} zip entries; the limit is {max_entries:,}",
            "a zip archive with too many entries") from None
    except (BadZip, OSError) as error:
        raise UploadRejected(
            422, f"the file starts like a zip archive but cannot be read as one ({error}); "
                 f"expected {EXPECTED}; was the upload truncated?", "a damaged zip archive",
        ) from None
    if "xl/workbook.xml" in names and "[Content_Types].xml" in names:
        return
    if "xl/workbook.bin" in names:
        what = "an Excel binary workbook (.xlsb)"
    elif "content.xml" in names and "mimetype" in names:
        what = "an OpenDocument file (.ods/.odt)"
    elif "word/document.xml" in names:
        what = "a Word document (.docx)"
    elif "ppt/presentation.xml" in names:
        what = "a PowerPoint presentation (.pptx)"
    else:
        what = "a zip archive without an Excel workbook part (xl/workbook.xml)"
    raise UploadRejected(415, f"received {what}; expected {EXPECTED}", what)


def _read_more(path: Path) -> bytes:
    with open(path, "rb") as file:
        file.seek(8)
        return file.read(512)


def _ole_stream_names(file: BinaryIO) -> set[str]:
    """Names of the entries in an OLE compound file's directory (lower case).

    A minimal reader of the CFB format ([MS-CFB]): enough to tell an encrypted
    OOXML package (streams EncryptionInfo/EncryptedPackage) from a legacy .xls
    (stream Workbook or Book). Bounded: at most 4096 directory sectors.
    """
    try:
        file.seek(0)
        header = file.read(512)
        if len(header) < 512:
            return set()
        sector_shift = struct.unpack_from("<H", header, 30)[0]
        if sector_shift not in (9, 12):
            return set()
        sector_size = 1 << sector_shift
        first_dir = struct.unpack_from("<I", header, 48)[0]
        difat = struct.unpack_from("<109I", header, 76)

        def read_sector(number: int) -> bytes:
            file.seek((number + 1) * sector_size)
            return file.read(sector_size)

        fat: list[int] = []
        for sector in difat:
            if sector >= 0xFFFFFFFA:
                break
            data = read_sector(sector)
            fat.extend(struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4]))
        names: set[str] = set()
        sector = first_dir
        for _ in range(4096):
            if sector >= 0xFFFFFFFA or sector >= len(fat) + 1_000_000:
                break
            data = read_sector(sector)
            for offset in range(0, len(data) - 127, 128):
                length = struct.unpack_from("<H", data, offset + 64)[0]
                if 2 <= length <= 64:
                    raw = data[offset: offset + length - 2]
                    names.add(raw.decode("utf-16-le", "replace").lower())
            if sector >= len(fat):
                break
            sector = fat[sector]
        return names
    except (OSError, struct.error):
        return set()


# ------------------------------------------------------------------------ inspection

_DIMENSION = re.compile(rb"<(?:\w+:)?dimension\s+ref=\"([A-Za-z]{1,3})(\d{1,7})"
                        rb"(?::([A-Za-z]{1,3})(\d{1,7}))?\"")
_SHEET_DATA = re.compile(rb"<(?:\w+:)?sheetData[\s>/]")
_REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_MAIN_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_STRICT_MAIN_NS = "http://purl.oclc.org/ooxml/spreadsheetml/main"


def column_number(letters: str) -> int:
    number = 0
    for char in letters.upper():
        number = number * 26 + (ord(char) - 64)
    return number


def _check_entries(archive: zipfile.ZipFile, caps: ParseCaps) -> None:
    infos = archive.infolist()
    if len(infos) > caps.max_entries:
        raise WorkbookRejected(f"the workbook has {len(infos)} zip entries; the limit is "
                               f"{caps.max_entries}")
    total = 0
    for info in infos:
        size = info.file_size
        total += size
        if size > caps.max_entry_bytes:
            raise WorkbookRejected(
                f"zip entry {info.filename} declares {size:,} bytes uncompressed; the limit is "
                f"{caps.max_entry_bytes:,} (migration.max_entry_bytes)")
        if size > caps.ratio_floor:
            ratio = size / max(info.compress_size, 1)
            if ratio > caps.max_ratio:
                raise WorkbookRejected(
                    f"zip entry {info.filename} inflates {ratio:,.0f}x ({info.compress_size:,} "
                    f"-> {size:,} bytes); the limit is {caps.max_ratio:g}x "
                    "(migration.max_compression_ratio): this looks like a zip bomb")
    if total > caps.max_total_bytes:
        raise WorkbookRejected(f"the workbook declares {total:,} bytes uncompressed; the limit "
                               f"is {caps.max_total_bytes:,} (migration.max_total_bytes)")


def _read_small(archive: zipfile.ZipFile, name: str, limit: int = 16 * 1024**2) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise WorkbookRejected(f"{name} is {info.file_size:,} bytes; at most {limit:,} expected")
    with archive.open(info) as member:
        return member.read(limit + 1)[:limit]


def _parse_xml(data: bytes, name: str) -> Element:
    import xml.etree.ElementTree as ElementTree

    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise WorkbookRejected(f"{name} is not well-formed XML ({error})") from None


def inspect_workbook(path: Path | str, sheet: str | None, caps: ParseCaps) -> WorkbookInfo:
    """Check the zip entries, find the sheet, read its declared dimension.

    Raises :class:`WorkbookRejected` with a reason fit for the job's error.
    """
    check_expat()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise WorkbookRejected(f"the file is not a readable zip archive ({error})") from None
    with archive:
        _check_entries(archive, caps)
        names = set(archive.namelist())
        if "xl/workbook.xml" not in names:
            raise WorkbookRejected("the archive has no xl/workbook.xml: not an .xlsx workbook")
        workbook = _parse_xml(_read_small(archive, "xl/workbook.xml"), "xl/workbook.xml")
        namespace = _STRICT_MAIN_NS if workbook.tag.startswith("{" + _STRICT_MAIN_NS) else _MAIN_NS
        pr = workbook.find(f"{{{namespace}}}workbookPr")
        date1904 = pr is not None and pr.get("date1904", "").lower() in ("1", "true")
        sheets: list[tuple[str, str | None]] = []
        for element in workbook.iter(f"{{{namespace}}}sheet"):
            rel_id = next((value for key, value in element.attrib.items()
                           if key.endswith("}id")), None)
            sheets.append((element.get("name", ""), rel_id))
        if not sheets:
            raise WorkbookRejected("the workbook lists no worksheets")
        chosen: tuple[str, str | None] | None
        if sheet is None:
            chosen = sheets[0]
        else:
            chosen = next((entry for entry in sheets if entry[0] == sheet), None)
            if chosen is None:
                chosen = next((entry for entry in sheets
                               if entry[0].casefold() == sheet.strip().casefold()), None)
            if chosen is None:
                raise WorkbookRejected(
                    f"the workbook has no sheet named {sheet!r}; its sheets are: "
                    + ", ".join(repr(name) for name, _ in sheets))
        part = _resolve_sheet_part(archive, names, chosen[1])
        info = archive.getinfo(part)
        shared = archive.getinfo("xl/sharedStrings.xml").file_size \
            if "xl/sharedStrings.xml" in names else 0
        dimension = _read_dimension(archive, part)
    if dimension is not None:
        first_row, first_col, last_row, last_col = dimension
        rows, cols = last_row - first_row + 1, last_col - first_col + 1
        if last_col > caps.max_columns:
            raise WorkbookRejected(
                f"sheet {chosen[0]!r} declares cells up to column {last_col} (dimension "
                f"{_ref(dimension)}); the limit is {caps.max_columns} columns "
                "(migration.max_columns)")
        if rows > caps.max_rows:
            raise WorkbookRejected(
                f"sheet {chosen[0]!r} declares {rows:,} rows (dimension {_ref(dimension)}); "
                f"the limit is {caps.max_rows:,} (migration.max_rows)")
        del cols
    return WorkbookInfo(
        sheet_name=chosen[0], sheet_part=part, sheet_bytes=info.file_size,
        shared_strings_bytes=shared, dimension=dimension, date1904=date1904,
        sheet_names=tuple(name for name, _ in sheets))


def _ref(dimension: tuple[int, int, int, int]) -> str:
    def letters(number: int) -> str:
        out = ""
        while number:
            number, rest = divmod(number - 1, 26)
            out = chr(65 + rest) + out
        return out

    r1, c1, r2, c2 = dimension
    return f"{letters(c1)}{r1}:{letters(c2)}{r2}"


def _resolve_sheet_part(archive: zipfile.ZipFile, names: set[str], rel_id: str | None) -> str:
    rels_name = "xl/_rels/workbook.xml.rels"
    if rel_id and rels_name in names:
        rels = _parse_xml(_read_small(archive, rels_name), rels_name)
        for rel in rels:
            if rel.get("Id") == rel_id:
                target = rel.get("Target", "")
                part = target.lstrip("/") if target.startswith("/") \
                    else posixpath.normpath(posixpath.join("xl", target))
                if part in names:
                    return part
                raise WorkbookRejected(f"the workbook points at sheet part {part}, which the "
                                       "archive does not contain")
    fallback = "xl/worksheets/sheet1.xml"
    if fallback in names:
        return fallback
    raise WorkbookRejected("cannot find the worksheet part in the archive")


def _read_dimension(archive: zipfile.ZipFile, part: str) -> tuple[int, int, int, int] | None:
    """The sheet's ``<dimension ref>``, read from its first 64 KiB only."""
    with archive.open(part) as member:
        head = member.read(64 * 1024)
    data_at = _SHEET_DATA.search(head)
    match = _DIMENSION.search(head, 0, data_at.start() if data_at else len(head))
    if not match:
        return None
    c1, r1, c2, r2 = match.group(1), match.group(2), match.group(3), match.group(4)
    first_row, first_col = int(r1), column_number(c1.decode())
    if c2 is None:
        return first_row, first_col, first_row, first_col
    return first_row, first_col, int(r2), column_number(c2.decode())
