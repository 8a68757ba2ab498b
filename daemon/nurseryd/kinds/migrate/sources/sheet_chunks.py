"""Cut a worksheet's XML into runs of whole rows, each wrapped as a small workbook.

Why: python-calamine is the fastest reader we have (~10x openpyxl) but it
loads a whole sheet at once (~1.3 KiB per row of the chats workbook: 1.28 GiB
at 1M rows, past the parser child's budget), and it has no streaming API
(upstream: calamine's lazy reader is not exposed; python-calamine#42). So we
stream the sheet ourselves and hand calamine one slice at a time: the sheet
member is inflated in pieces, cut after a ``</row>`` every ``chunk_bytes``, and
each slice becomes a stored (uncompressed) zip holding the original
workbook.xml, styles, shared strings and relationships plus a worksheet made of
the original prolog, the slice's rows and a closing tag. calamine then sees an
ordinary workbook whose rows keep their own ``r="N"`` numbers, so values, types
(dates via styles, the 1904 flag, shared strings) and row numbers are exactly
what the whole-sheet load gives; memory is bounded by the slice, not the sheet.

This module only handles bytes (no calamine import), so it is testable alone.
A sheet it cannot cut safely raises :class:`NotSplittable` before any row was
produced (the caller then uses a whole-sheet reader): no ``<sheetData>`` near
the start, CDATA or comments (a literal ``</row>`` could hide in them), or a
first row without its ``r`` number.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from ..xlsx_checks import WorkbookRejected

#: Inflate the sheet member in pieces of this size.
READ_BYTES = 4 * 1024**2
#: The prolog (everything before ``<sheetData>``) must end within this many bytes.
MAX_PROLOG_BYTES = 8 * 1024**2
_SHEET_DATA = re.compile(rb"<((?:[A-Za-z_][\w.-]*:)?)sheetData(?:\s[^>]*)?(/?)>")
_DIMENSION = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?dimension\b[^>]*/>")
_ROW_NUMBER = re.compile(rb"\sr\s*=\s*[\"'](\d{1,9})[\"']")
#: Parts of a workbook calamine never needs to read one sheet's cell values.
_SKIPPED_PREFIXES = ("xl/worksheets/", "xl/media/", "xl/drawings/", "xl/charts/",
                     "xl/pivotCache", "xl/pivotTables/", "xl/externalLinks/", "xl/embeddings/",
                     "xl/printerSettings/", "xl/comments", "xl/threadedComments/",
                     "xl/persons/", "docProps/", "customXml/")


class NotSplittable(Exception):
    """The sheet's XML is not laid out so that it can be cut safely."""


@dataclass(frozen=True)
class Chunk:
    """A run of whole ``<row>`` elements and the sheet row numbers it spans."""

    body: bytes
    first_row: int  # from the first row's r attribute
    last_row: int | None  # from the last row's r attribute, when it has one


class SheetSplitter:
    """Iterates a worksheet member as :class:`Chunk` s of about ``chunk_bytes``.

    ``max_row_bytes`` bounds one row: a slice that finds no cut point within it
    is refused (a hostile single row; the caps on declared sizes came first).
    """

    def __init__(self, archive: zipfile.ZipFile, part: str, *, chunk_bytes: int,
                 max_row_bytes: int = 256 * 1024**2) -> None:
        self.archive = archive
        self.part = part
        self.chunk_bytes = chunk_bytes
        self.max_row_bytes = max_row_bytes
        self.prolog = b""
        self.namespace = b""

    def chunks(self) -> Iterator[Chunk]:
        with self.archive.open(self.part) as member:
            buffer = bytearray()
            match = None
            while match is None:
                data = member.read(READ_BYTES)
                buffer += data
                match = _SHEET_DATA.search(buffer)
                if match is None and (not data or len(buffer) > MAX_PROLOG_BYTES):
                    raise NotSplittable("no <sheetData> near the start of the sheet")
            self.namespace = match.group(1)
            self.prolog = _DIMENSION.sub(b"", bytes(buffer[:match.start()])) + \
                b"<" + self.namespace + b"sheetData>"
            if match.group(2):  # <sheetData/>: no rows at all
                return
            del buffer[:match.end()]
            yield from self._rows(member, buffer)

    def _rows(self, member: IO[bytes], buffer: bytearray) -> Iterator[Chunk]:
        open_tag = b"<" + self.namespace + b"row"
        close_tag = b"</" + self.namespace + b"row>"
        end_tag = b"</" + self.namespace + b"sheetData>"
        ended = False
        wanted = self.chunk_bytes
        previous_last: int | None = None
        first = True
        while True:
            while not ended and len(buffer) < wanted:
                data = member.read(READ_BYTES)
                ended = not data
                buffer += data
            end = buffer.find(end_tag)
            region = end if end >= 0 else len(buffer)
            if region > self.chunk_bytes or end < 0:
                # Cut after the last row that ends within chunk_bytes, or after the
                # first row at all when one row is larger than that.
                cut = buffer.rfind(close_tag, 0, self.chunk_bytes)
                if cut < 0:
                    cut = buffer.find(close_tag, 0, region)
                if cut < 0:
                    if ended or end >= 0:
                        raise WorkbookRejected("the sheet XML ends in the middle of a row")
                    if len(buffer) > self.max_row_bytes:
                        raise WorkbookRejected(
                            f"a row of sheet part {self.part} is larger than "
                            f"{self.max_row_bytes:,} bytes of XML")
                    wanted = len(buffer) + READ_BYTES  # one row larger than a chunk
                    continue
                cut += len(close_tag)
                end = -1
            else:
                cut = end
            wanted = self.chunk_bytes
            body = bytes(buffer[:cut])
            del buffer[:cut]
            if b"<!--" in body or b"<![CDATA[" in body:
                raise (NotSplittable if first else WorkbookRejected)(
                    "the sheet XML has comments or CDATA between its rows; set "
                    "migration.reader = \"calamine\"")
            if open_tag in body:
                chunk = self._chunk(body, open_tag, first, previous_last)
                first = False
                previous_last = chunk.last_row if chunk.last_row is not None else chunk.first_row
                yield chunk
            if end >= 0:
                return

    def _chunk(self, body: bytes, open_tag: bytes, first: bool,
               previous_last: int | None) -> Chunk:
        start = body.find(open_tag)
        head_end = body.find(b">", start)
        number = _ROW_NUMBER.search(body, start, head_end) if start >= 0 else None
        if number is None:
            if first:
                raise NotSplittable("the first row carries no r (row number) attribute")
            raise WorkbookRejected("a row of the sheet has no row number where one is needed "
                                   "(r attribute); set migration.reader = \"calamine\"")
        first_row = int(number.group(1))
        if previous_last is not None and first_row <= previous_last:
            raise WorkbookRejected(f"the sheet's rows are out of order (row {first_row} "
                                   f"follows row {previous_last})")
        last_start = body.rfind(open_tag)
        last_head = body.find(b">", last_start)
        last = _ROW_NUMBER.search(body, last_start, last_head)
        return Chunk(body, first_row, int(last.group(1)) if last else None)

    def closing(self) -> bytes:
        return b"</" + self.namespace + b"sheetData></" + self.namespace + b"worksheet>"


def skeleton_parts(archive: zipfile.ZipFile, sheet_part: str) -> dict[str, bytes]:
    """The members a one-sheet copy of the workbook needs: all but the sheets (the one
    read, wherever it lives, is replaced by each slice) and media."""
    return {info.filename: archive.read(info) for info in archive.infolist()
            if not info.is_dir() and info.filename != sheet_part
            and not info.filename.startswith(_SKIPPED_PREFIXES)}


def chunk_workbook(skeleton: dict[str, bytes], part: str, prolog: bytes, body: bytes,
                   closing: bytes) -> bytes:
    """A stored zip: the skeleton plus ``part`` made of prolog + rows + closing tags."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in skeleton.items():
            archive.writestr(name, data)
        archive.writestr(part, b"".join((prolog, body, closing)))
    return out.getvalue()
