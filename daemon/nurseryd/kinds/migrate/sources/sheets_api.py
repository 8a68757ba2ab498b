"""Google Sheets API v4 without I/O: ranges, response bodies, errors, quota, JWT claims.

Kept apart from the source (which only moves bytes) so every decision is tested
with plain values: which A1 range a window asks for, how a ragged ``ValueRange``
becomes rows, what a status means, how long the quota makes us wait. How long
to back off after a failure is the daemon's one retry policy
(:mod:`nurseryd.backoff`).

Facts this relies on (Sheets API v4 reference):
- ``spreadsheets.get`` returns ``sheets[].properties.gridProperties.rowCount /
  columnCount``: the grid size, including empty rows at the end;
- ``spreadsheets.values.get`` returns ``{"range", "majorDimension": "ROWS",
  "values": [[...], ...]}``; trailing empty cells of a row and trailing empty
  rows are omitted, and ``values`` is absent when the range is empty;
- with ``valueRenderOption=UNFORMATTED_VALUE`` numbers are JSON numbers and
  booleans JSON booleans; with ``dateTimeRenderOption=SERIAL_NUMBER`` dates are
  serial days since 1899-12-30 (what the shared coercion already reads);
- errors come as ``{"error": {"code", "message", "status"}}``; quota errors are
  429, to be retried with exponential back-off.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote

from ....backoff import is_retryable_status

JWT_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
VALUE_PARAMS = {"majorDimension": "ROWS", "valueRenderOption": "UNFORMATTED_VALUE",
                "dateTimeRenderOption": "SERIAL_NUMBER"}
METADATA_FIELDS = "sheets.properties(sheetId,title,index,gridProperties(rowCount,columnCount))"


class SheetsProblem(Exception):
    """The sheet cannot be read as asked; ``str()`` is the job's error."""


def column_letters(number: int) -> str:
    """1 -> A, 26 -> Z, 27 -> AA, 702 -> ZZ, 703 -> AAA."""
    if number < 1:
        raise ValueError("columns are numbered from 1")
    letters = ""
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def column_number(letters: str) -> int:
    number = 0
    for char in letters.upper():
        if not "A" <= char <= "Z":
            raise ValueError(f"not a column: {letters!r}")
        number = number * 26 + ord(char) - 64
    return number


def quote_sheet(title: str) -> str:
    """A sheet title as A1 notation wants it: 'My Sheet' quoted, quotes doubled."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", title) and not re.fullmatch(
            r"[A-Za-z]{1,3}[0-9]+", title):
        return title
    return "'" + title.replace("'", "''") + "'"


@dataclass(frozen=True)
class RangeSpec:
    """What the job's ``range`` asks for: a sheet, optionally a column span."""

    sheet: str | None
    first_column: int = 1
    last_column: int | None = None


_COLUMNS = re.compile(r"^([A-Za-z]{1,3})(?:1)?:([A-Za-z]{1,3})$")


def parse_range(text: str | None) -> RangeSpec:
    """``None`` (first sheet), ``"Sheet1"``, ``"'My sheet'!A:F"`` or ``"Sheet1!B1:F"``."""
    if text is None or not text.strip():
        return RangeSpec(None)
    text = text.strip()
    sheet, bang, columns = text.rpartition("!")
    if not bang:
        return RangeSpec(_unquote(text))
    match = _COLUMNS.match(columns)
    if match is None:
        raise SheetsProblem(f"range {text!r}: give a sheet name, optionally with a column span "
                            "like Sheet1!A:F (rows are read in windows by the daemon)")
    first, last = column_number(match.group(1)), column_number(match.group(2))
    if last < first:
        raise SheetsProblem(f"range {text!r}: the last column comes before the first")
    return RangeSpec(_unquote(sheet), first, last)


def _unquote(sheet: str) -> str:
    if len(sheet) >= 2 and sheet[0] == sheet[-1] == "'":
        return sheet[1:-1].replace("''", "'")
    return sheet


@dataclass(frozen=True)
class Grid:
    title: str
    rows: int
    columns: int


def pick_sheet(metadata: Mapping[str, Any], wanted: str | None) -> Grid:
    """The grid of the sheet asked for (the first one when none is named)."""
    sheets = [s.get("properties", {}) for s in metadata.get("sheets", []) or []]
    sheets = [s for s in sheets if isinstance(s, dict)]
    if not sheets:
        raise SheetsProblem("the spreadsheet has no sheets")
    chosen = min(sheets, key=lambda s: s.get("index", 0)) if wanted is None else next(
        (s for s in sheets if s.get("title") == wanted), None)
    if chosen is None:
        titles = ", ".join(repr(s.get("title")) for s in sheets)
        raise SheetsProblem(f"no sheet named {wanted!r} in the spreadsheet; it has: {titles}")
    grid = chosen.get("gridProperties") or {}
    return Grid(str(chosen.get("title")), int(grid.get("rowCount") or 0),
                int(grid.get("columnCount") or 0))


def window_range(title: str, first_row: int, last_row: int, first_column: int,
                 last_column: int) -> str:
    return (f"{quote_sheet(title)}!{column_letters(first_column)}{first_row}:"
            f"{column_letters(last_column)}{last_row}")


def values_path(spreadsheet_id: str, a1_range: str) -> str:
    return f"/v4/spreadsheets/{quote(spreadsheet_id, safe='')}/values/{quote(a1_range, safe='')}"


def metadata_path(spreadsheet_id: str) -> str:
    return f"/v4/spreadsheets/{quote(spreadsheet_id, safe='')}"


def window_rows(body: Mapping[str, Any], expected_rows: int) -> list[list[Any]]:
    """The rows of a ``ValueRange`` body, ragged rows kept (the coercer pads them),
    trailing omitted rows restored as empty rows so row numbers stay exact."""
    if body.get("majorDimension", "ROWS") != "ROWS":
        raise SheetsProblem(f"expected majorDimension ROWS, got {body.get('majorDimension')!r}")
    values = body.get("values") or []
    if not isinstance(values, list) or not all(isinstance(row, list) for row in values):
        raise SheetsProblem("the values response is not a list of rows")
    if len(values) > expected_rows:
        raise SheetsProblem(f"asked for {expected_rows} rows, got {len(values)}")
    return values


def pad_row(row: Sequence[Any], width: int) -> list[Any]:
    return list(row) + [None] * (width - len(row)) if len(row) < width else list(row[:width])


class Verdict(Enum):
    OK = "ok"
    RETRY = "retry"
    FAIL = "fail"
    REAUTH = "reauth"  # 401: the access token expired or was revoked


def classify_status(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.OK
    if status == 401:
        return Verdict.REAUTH
    if is_retryable_status(status):
        return Verdict.RETRY
    return Verdict.FAIL


def google_message(status: int, body: bytes) -> str:
    """Google's own words from an error body (``error.message``), else the status."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and error.get("message"):
            state = f" ({error['status']})" if error.get("status") else ""
            return f"HTTP {status}{state}: {error['message']}"
        if isinstance(error, str):  # the OAuth token endpoint: {"error", "error_description"}
            return f"HTTP {status}: {error}: {document.get('error_description', '')}".rstrip(": ")
    text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else "")


def quota_wait(recent: Sequence[float], now: float, per_minute: int) -> float:
    """Seconds to wait so that no 60 s window holds more than ``per_minute`` requests.

    ``recent`` are the send times of the last requests, oldest first (at most
    ``per_minute`` of them are looked at). Google's read quota is per minute
    (60 per user, 300 per project), so a burst is fine and the pace only
    matters once a minute's worth has been sent; waiting here is cheaper than
    collecting 429s and backing off.
    """
    if per_minute < 1 or len(recent) < per_minute:
        return 0.0
    oldest = recent[-per_minute]
    return max(0.0, oldest + 60.0 - now)


def jwt_claims(client_email: str, token_uri: str, scope: str, now: int) -> dict[str, Any]:
    """The OAuth2 JWT bearer grant assertion for a service account (RFC 7523)."""
    return {"iss": client_email, "scope": scope, "aud": token_uri, "iat": now,
            "exp": now + 3600}


REQUIRED_KEY_FIELDS = ("client_email", "private_key", "token_uri")


def check_service_account(info: Any, where: str) -> dict[str, Any]:
    if not isinstance(info, dict) or info.get("type", "service_account") != "service_account":
        raise SheetsProblem(f"{where} is not a service-account key (type service_account)")
    missing = [name for name in REQUIRED_KEY_FIELDS if not info.get(name)]
    if missing:
        raise SheetsProblem(f"{where} lacks {', '.join(missing)}")
    return info
