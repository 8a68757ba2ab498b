"""One slice of a sheet read by fastexcel into Arrow columns and coerced there.

The slices are those of :mod:`.sheet_chunks`, parsed in the worker threads of
:class:`.calamine_stream.ChunkedRows`; fastexcel is python-calamine's parser
with an Arrow output, so the cells, their types (dates by style, the 1904 flag,
shared strings) and the row numbers are the ones the row path sees. What
differs is handled here, before :class:`~..coerce_arrow.ArrowCoercer` runs:

* fastexcel numbers a slice's columns from its first used column, not from
  column A, and with an explicit ``skip_rows`` it allocates every row above the
  slice as empty cells (measured: 100 rows at row 1,000,000 took 0.55 s and
  400 MiB). So each slice gets an *anchor* just above it, one error cell in
  column A (``A{first_row - 1}``), and is read with ``skip_rows=None``, which
  starts at the first used row without allocating the ones above. fastexcel
  reads an error cell as empty, so the anchor changes no column's type; it is
  table row 0 and dropped. Column 0 is then A in every slice, as in the row
  path's rows, at any depth in the sheet.
* fastexcel turns error cells (``#DIV/0!``) into empty ones, the row path into
  their text: a slice holding one (``t="e"``) is left to the row path.
* ``dtype_coercion="strict"`` over all rows: a column mixing types in a slice
  (numbers and text, booleans and numbers) is an error here, and the slice
  goes to the row path, which converts each value on its own.

Any ``None`` returned sends the slice to the row path: a fallback is never
wrong, only slower.
"""

from __future__ import annotations

import logging

import fastexcel

from ..coerce_arrow import ArrowCoercer, ArrowLines
from .sheet_chunks import Chunk, chunk_workbook

# fastexcel warns about each column it cannot type (an empty one); those slices
# are the row path's anyway, and the warnings would crowd the parser's stderr tail.
logging.getLogger("fastexcel").setLevel(logging.ERROR)

#: An error cell's type attribute: any slice holding one is not read here.
_ERROR_CELL = b't="e"'


def column_a_anchor(first_row: int) -> bytes:
    """The row above a slice (the header or an earlier slice holds it, never this
    one) with one error cell in column A: see the module's docstring."""
    row = first_row - 1
    return f'<row r="{row}"><c r="A{row}" t="e"><v>#N/A</v></c></row>'.encode()


class ArrowSliceLoader:
    """Reads slices into :class:`ArrowLines` for one sheet and one header match."""

    def __init__(self, coercer: ArrowCoercer, *, skeleton: dict[str, bytes], part: str,
                 prolog: bytes, closing: bytes, sheet_name: str) -> None:
        self.coercer = coercer
        self.skeleton = skeleton
        self.part = part
        self.prolog = prolog
        self.closing = closing
        self.sheet_name = sheet_name

    def load(self, chunk: Chunk, skip_through: int) -> list[ArrowLines] | None:
        """The slice's rows after ``skip_through`` as COPY lines, or None: the row
        path reads the slice."""
        if chunk.first_row < 2 or _ERROR_CELL in chunk.body:
            return None
        book = chunk_workbook(self.skeleton, self.part, self.prolog,
                              column_a_anchor(chunk.first_row) + chunk.body, self.closing)
        try:
            sheet = fastexcel.read_excel(book).load_sheet(
                self.sheet_name, header_row=None, skip_rows=None, dtype_coercion="strict",
                schema_sample_rows=None)
            table = sheet.to_arrow()
        except fastexcel.FastExcelError:
            return None  # mixed types, or anything odd: the row path says what
        # Row 0 is the anchor, at first_row - 1; row i is first_row - 1 + i.
        first_row = max(chunk.first_row, skip_through + 1)  # resuming inside the slice
        table = table.slice(first_row - chunk.first_row + 1)
        if table.num_rows == 0:
            return []
        lines = self.coercer.lines(table.columns, first_row)
        return None if lines is None else [lines]
