"""Rows from a Google Sheet (Sheets API v4), read in row windows, resumable.

One ``spreadsheets.get`` for the grid size (rows x columns), one
``values.get`` for the header row, then ``values.get`` per window of
``window_rows`` rows. The position committed with each batch is the last sheet
row of its window, so a restarted job asks for the next window only; memory
holds one window.

Every request runs in its own cancel scope (``request_timeout_s``); httpx's
own timeouts are off, so one mechanism ends a request and it ends it at once.
A job cancellation lands in the same ``await`` and closes the socket: no
request keeps running. 408, 425, 429 and 5xx (but 501/505), network errors and
timeouts are retried by the daemon's one retry policy (:mod:`nurseryd.backoff`:
exponential back-off with full jitter, never sooner than ``Retry-After``);
403/404 fail at once with Google's message.

Auth: an API key (the ``X-Goog-Api-Key`` header on every request, never ``?key=``
in a URL; link-shared sheets) or a service
account: a JWT signed with the account's private key by ``google-auth`` (the
maintained signer; we do not hand-roll RS256) exchanged at the key's
``token_uri`` for a bearer token (OAuth2 JWT bearer grant, RFC 7523). The
exchange itself goes through httpx, so it is async and cancellable like every
other request (google-auth's own refresh is synchronous).
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from ....backoff import GaveUp, RetryPolicy, TryAgain, parse_retry_after, retry
from ..coerce import ColumnSpec
from ..source_config import SHEETS_SCOPE, SecretMissing, SheetsConfig
from . import sheets_api as api
from .base import Emitter, SourceError, SourceEvent

log = logging.getLogger(__name__)

USER_AGENT = "nurseryd-migration/0.1"


def retry_policy(config: SheetsConfig) -> RetryPolicy:
    """Full jitter; a ``Retry-After`` beyond ``backoff_max_s`` fails the job rather
    than leaving it asleep for as long as Google likes."""
    return RetryPolicy(config.max_attempts, config.backoff_s, config.backoff_max_s,
                       max_retry_after_s=config.backoff_max_s)


@dataclass
class _Token:
    value: str
    expires_at: float  # time.time() seconds


@dataclass
class SheetsSource:
    config: SheetsConfig
    spreadsheet_id: str
    range: str | None = None
    source_type: str = "google_sheets"
    #: Injected by tests to watch the back-off; real runs sleep.
    sleep: Callable[[float], Awaitable[None]] = trio.sleep
    stats: dict[str, Any] = field(default_factory=lambda: {"requests": 0, "retries": 0,
                                                           "windows": 0})
    _token: _Token | None = None
    _sheet: str | None = None
    #: Send times of the last requests (for the per-minute quota).
    _sent: collections.deque[float] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self._sent = collections.deque(maxlen=self.config.requests_per_minute)

    # ---------------------------------------------------------------- HTTP

    async def _auth(self, client: httpx.AsyncClient) -> tuple[dict[str, str], dict[str, str]]:
        """(query params, headers) that authenticate one request."""
        if self.config.api_key is not None:
            try:
                # A header, not ?key=: URLs end up in logs, proxies and error texts.
                return {}, {"X-Goog-Api-Key": self.config.api_key.resolve(
                    "google_sheets.api_key")}
            except SecretMissing as error:
                raise SourceError(str(error)) from None
        if self._token is None or self._token.expires_at - time.time() < 60:
            self._token = await self._fetch_token(client)
        return {}, {"Authorization": f"Bearer {self._token.value}"}

    async def _fetch_token(self, client: httpx.AsyncClient) -> _Token:
        path = self.config.credentials_file
        where = f"credentials_file {path}"
        try:
            text = await trio.Path(str(path)).read_text()
            info = api.check_service_account(json.loads(text), where)
        except (OSError, ValueError) as error:
            raise SourceError(f"cannot read {where}: {error}") from None
        except api.SheetsProblem as error:
            raise SourceError(str(error)) from None
        from google.auth import crypt, jwt

        try:
            signer = crypt.RSASigner.from_service_account_info(info)
        except ValueError as error:
            raise SourceError(f"{where}: the private key cannot be used: {error}") from None
        claims = api.jwt_claims(info["client_email"], info["token_uri"], SHEETS_SCOPE,
                                int(time.time()))
        assertion = jwt.encode(signer, claims).decode("ascii")
        response = await self._send(client, "POST", info["token_uri"], data={
            "grant_type": api.JWT_GRANT_TYPE, "assertion": assertion}, what="token exchange")
        try:
            body = response.json()
            token = str(body["access_token"])
            expires_in = float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"the token endpoint {info['token_uri']} answered without an "
                              "access_token") from None
        return _Token(token, time.time() + expires_in)

    async def _send(self, client: httpx.AsyncClient, method: str, url: str, *, what: str,
                    params: Mapping[str, str] | None = None,
                    headers: Mapping[str, str] | None = None,
                    data: Mapping[str, str] | None = None,
                    bearer: bool = False) -> httpx.Response:
        """One request with retries; returns a 2xx response or raises SourceError."""
        config = self.config

        async def attempt(number: int) -> httpx.Response:
            wait = api.quota_wait(self._sent, trio.current_time(), config.requests_per_minute)
            if wait > 0:
                self.stats["quota_waits"] = self.stats.get("quota_waits", 0) + 1
                await self.sleep(wait)
            self._sent.append(trio.current_time())
            self.stats["requests"] += 1
            with trio.move_on_after(config.request_timeout_s) as scope:
                try:
                    response = await client.request(method, url, params=params,
                                                    headers=headers, data=data)
                except httpx.TransportError as error:
                    raise TryAgain(f"{type(error).__name__}: {error}".rstrip(": ")) from None
            if scope.cancelled_caught:
                raise TryAgain(f"no answer within {config.request_timeout_s:g} s")
            verdict = api.classify_status(response.status_code)
            if verdict is api.Verdict.OK:
                return response
            reason = api.google_message(response.status_code, response.content)
            if verdict is api.Verdict.REAUTH and bearer and number == 1:
                self._token = None
                raise _Reauthenticate()
            if verdict is api.Verdict.RETRY:
                raise TryAgain(reason, retry_after=parse_retry_after(
                    response.headers.get("retry-after"), datetime.now(UTC)))
            raise SourceError(f"Google Sheets {what} failed: {reason}")

        def retrying(number: int, delay: float, failure: TryAgain) -> None:
            log.info("Google Sheets %s: %s; retrying in %.2f s", what, failure.reason, delay)
            self.stats["retries"] += 1

        try:
            return await retry(retry_policy(config), attempt, on_retry=retrying,
                               sleep=self.sleep)
        except GaveUp as gave_up:
            raise SourceError(f"Google Sheets {what} failed after {gave_up.attempts} attempts: "
                              f"{gave_up.reason}") from None

    async def _get_json(self, client: httpx.AsyncClient, path: str, params: dict[str, str],
                        what: str) -> dict[str, Any]:
        for _ in range(2):  # a second pass only after a 401 dropped the token
            auth_params, headers = await self._auth(client)
            try:
                response = await self._send(client, "GET", path, what=what,
                                            params={**params, **auth_params}, headers=headers,
                                            bearer=bool(headers))
            except _Reauthenticate:
                continue
            try:
                body = response.json()
            except ValueError:
                raise SourceError(f"Google Sheets {what}: the answer is not JSON") from None
            if not isinstance(body, dict):
                raise SourceError(f"Google Sheets {what}: expected a JSON object")
            return body
        raise SourceError(f"Google Sheets {what}: the access token was refused twice (401)")

    # -------------------------------------------------------------- stream

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        try:
            spec = api.parse_range(self.range)
        except api.SheetsProblem as error:
            raise SourceError(str(error)) from None
        async with httpx.AsyncClient(base_url=self.config.api_base, timeout=None,
                                     headers={"User-Agent": USER_AGENT}) as client:
            await self._stream(client, spec, columns, resume, send)

    async def _stream(self, client: httpx.AsyncClient, spec: api.RangeSpec,
                      columns: Sequence[ColumnSpec], resume: Any,
                      send: trio.MemorySendChannel[SourceEvent]) -> None:
        metadata = await self._get_json(client, api.metadata_path(self.spreadsheet_id),
                                        {"fields": api.METADATA_FIELDS}, "spreadsheets.get")
        try:
            grid = api.pick_sheet(metadata, spec.sheet)
        except api.SheetsProblem as error:
            raise SourceError(str(error)) from None
        self._sheet = grid.title
        first_column = spec.first_column
        last_column = min(spec.last_column or grid.columns, grid.columns)
        if grid.rows < 1 or last_column < first_column:
            raise SourceError(f"sheet {grid.title!r} is empty: no header row")
        header_body = await self._get_json(
            client, api.values_path(self.spreadsheet_id, api.window_range(
                grid.title, 1, 1, first_column, last_column)), api.VALUE_PARAMS, "values.get")
        header_rows = self._rows(header_body, 1)
        emit = Emitter(columns, send, where=f"sheet {grid.title!r}")
        await emit.send_header(header_rows[0] if header_rows else [])
        # The grid counts empty rows at the end too: an estimate until the end,
        # when the pipeline replaces it with the exact number.
        await emit.send_total(max(grid.rows - 1, 0))
        done = int(resume["row"]) if isinstance(resume, dict) and "row" in resume else 1
        window = self.config.window_rows
        while done < grid.rows:
            first, last = done + 1, min(done + window, grid.rows)
            body = await self._get_json(
                client, api.values_path(self.spreadsheet_id, api.window_range(
                    grid.title, first, last, first_column, last_column)),
                api.VALUE_PARAMS, "values.get")
            rows = self._rows(body, last - first + 1)
            self.stats["windows"] += 1
            done = last
            await emit.send_rows([(first + index, row) for index, row in enumerate(rows)],
                                 {"row": done})

    @staticmethod
    def _rows(body: Mapping[str, Any], expected: int) -> list[list[Any]]:
        try:
            return api.window_rows(body, expected)
        except api.SheetsProblem as error:
            raise SourceError(str(error)) from None

    def describe(self) -> dict[str, Any]:
        return {"spreadsheet_id": self.spreadsheet_id, "sheet": self._sheet,
                "auth": "api_key" if self.config.api_key is not None else "service_account",
                **self.stats}


class _Reauthenticate(Exception):
    """A 401 with a bearer token: fetch a new token and send the request again."""
