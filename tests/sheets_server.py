"""A local stand-in for the Google Sheets API v4 (and Google's token endpoint).

Real sockets on 127.0.0.1 (Trio + h11, one request per connection). It answers
the way the documented API does: ``spreadsheets.get`` with
``sheets[].properties.gridProperties``; ``values.get`` with a ``ValueRange``
(``{"range": "Sheet1!A1:D5", "majorDimension": "ROWS", "values": [...]}``)
where trailing empty cells and rows are left out and ``values`` is missing
for an empty range; Google-shaped errors ``{"error": {"code", "message",
"status"}}``; and ``POST /token`` that verifies a service account's signed JWT
before issuing a bearer token. Knobs make it misbehave: a burst of 429s, a
hang, a 403.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

_A1 = re.compile(r"^(?:'((?:[^']|'')+)'|([^!]+))!([A-Z]+)(\d+):([A-Z]+)(\d+)$")


def _col(letters: str) -> int:
    number = 0
    for char in letters:
        number = number * 26 + ord(char) - 64
    return number


@dataclass
class Sheet:
    title: str
    rows: list[list[Any]]  # None = empty cell
    row_count: int | None = None  # grid size; defaults to len(rows)
    column_count: int | None = None

    @property
    def grid_rows(self) -> int:
        return self.row_count if self.row_count is not None else len(self.rows)

    @property
    def grid_columns(self) -> int:
        if self.column_count is not None:
            return self.column_count
        return max((len(r) for r in self.rows), default=1)


@dataclass
class SheetsServer:
    spreadsheets: dict[str, list[Sheet]] = field(default_factory=dict)
    api_key: str | None = "test-key"
    #: PEM public key of the service account allowed at /token.
    public_key_pem: bytes | None = None
    forbidden: set[str] = field(default_factory=set)
    #: The next N values.get requests answer 429 with this Retry-After.
    throttle_values: int = 0
    retry_after: str | None = "0"
    #: values.get requests hang until the client goes away.
    hang_values: bool = False
    port: int = 0
    log: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    hung: trio.Event = field(default_factory=trio.Event)
    hang_ended: trio.Event = field(default_factory=trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    def values_requests(self) -> list[str]:
        return [path for method, path, _ in self.log if "/values/" in path]

    # ----------------------------------------------------------- handlers

    def _error(self, code: int, status: str, message: str) -> tuple[int, dict, list]:
        return code, {"error": {"code": code, "message": message, "status": status}}, []

    def _authorized(self, query: dict[str, list[str]], headers: dict[str, str]) -> bool:
        if self.api_key is not None and headers.get("x-goog-api-key") == self.api_key:
            return True
        bearer = headers.get("authorization", "")
        return bearer.startswith("Bearer ") and bearer[7:] in self.tokens

    async def handle(self, method: str, target: str, headers: dict[str, str],
                     body: bytes, stream: trio.SocketStream) -> tuple[int, Any, list] | None:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self.log.append((method, path, query))
        if method == "POST" and path == "/token":
            return self._token(body)
        match = re.match(r"^/v4/spreadsheets/([^/]+)(?:/values/(.+))?$", path)
        if method != "GET" or match is None:
            return self._error(404, "NOT_FOUND", "Requested entity was not found.")
        if not self._authorized(query, headers):
            if headers.get("authorization"):
                return self._error(401, "UNAUTHENTICATED", "Request had invalid authentication "
                                   "credentials.")
            return self._error(403, "PERMISSION_DENIED", "The request is missing a valid API "
                               "key.")
        spreadsheet_id, a1 = match.group(1), match.group(2)
        if spreadsheet_id in self.forbidden:
            return self._error(403, "PERMISSION_DENIED",
                               "The caller does not have permission")
        sheets = self.spreadsheets.get(spreadsheet_id)
        if sheets is None:
            return self._error(404, "NOT_FOUND", "Requested entity was not found.")
        if a1 is None:
            return 200, {"spreadsheetId": spreadsheet_id, "sheets": [
                {"properties": {"sheetId": i, "title": s.title, "index": i, "sheetType": "GRID",
                                "gridProperties": {"rowCount": s.grid_rows,
                                                   "columnCount": s.grid_columns}}}
                for i, s in enumerate(sheets)]}, []
        if self.throttle_values > 0:
            self.throttle_values -= 1
            extra = [("Retry-After", self.retry_after)] if self.retry_after is not None else []
            code, document, _ = self._error(429, "RESOURCE_EXHAUSTED", "Quota exceeded for "
                                            "quota metric 'Read requests' and limit 'Read "
                                            "requests per minute per user'")
            return code, document, extra
        if self.hang_values:
            self.hung.set()
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            self.hang_ended.set()
            return None
        return self._values(sheets, a1, query)

    def _values(self, sheets: list[Sheet], a1: str, query: dict[str, list[str]]
                ) -> tuple[int, Any, list]:
        if query.get("valueRenderOption") != ["UNFORMATTED_VALUE"] or \
                query.get("dateTimeRenderOption") != ["SERIAL_NUMBER"]:
            return self._error(400, "INVALID_ARGUMENT", "test server: unformatted serials only")
        match = _A1.match(a1)
        if match is None:
            return self._error(400, "INVALID_ARGUMENT", f"Unable to parse range: {a1}")
        title = (match.group(1) or "").replace("''", "'") or match.group(2)
        sheet = next((s for s in sheets if s.title == title), None)
        if sheet is None:
            return self._error(400, "INVALID_ARGUMENT", f"Unable to parse range: {a1}")
        c1, r1, c2, r2 = _col(match.group(3)), int(match.group(4)), _col(match.group(5)), \
            int(match.group(6))
        r2, c2 = min(r2, sheet.grid_rows), min(c2, sheet.grid_columns)
        values: list[list[Any]] = []
        for row in sheet.rows[r1 - 1:r2]:
            cells = [("" if v is None else v) for v in row[c1 - 1:c2]]
            while cells and cells[-1] == "":
                cells.pop()  # the API leaves out trailing empty cells
            values.append(cells)
        while values and not values[-1]:
            values.pop()  # ... and trailing empty rows
        document: dict[str, Any] = {"range": a1, "majorDimension": "ROWS"}
        if values:
            document["values"] = values
        return 200, document, []

    def _token(self, body: bytes) -> tuple[int, Any, list]:
        from google.auth import jwt

        form = parse_qs(body.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return 400, {"error": "unsupported_grant_type"}, []
        try:
            claims = jwt.decode(form["assertion"][0], certs=self.public_key_pem,
                                audience=self.token_uri)
        except (ValueError, KeyError) as error:
            return 400, {"error": "invalid_grant", "error_description": str(error)}, []
        if "spreadsheets" not in claims.get("scope", ""):
            return 400, {"error": "invalid_scope"}, []
        token = f"ya29.test-{len(self.tokens)}"
        self.tokens.add(token)
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}, []

    # ------------------------------------------------------------- server

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request = None
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            answer = await self.handle(request.method.decode(), request.target.decode(),
                                       headers, body, stream)
            if answer is None:
                return
            status, document, extra = answer
            payload = json.dumps(document).encode()
            response_headers = [("Content-Type", "application/json; charset=UTF-8"),
                                ("Content-Length", str(len(payload))), ("Connection", "close"),
                                *extra]
            await stream.send_all(conn.send(h11.Response(status_code=status,
                                                         headers=response_headers)))
            await stream.send_all(conn.send(h11.Data(data=payload)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await stream.aclose()


@asynccontextmanager
async def sheets_server(**kwargs: Any) -> AsyncIterator[SheetsServer]:
    server = SheetsServer(**kwargs)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server._serve_one, 0,
                                                host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()
