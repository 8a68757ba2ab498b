"""The daemon's HTTP API as the command-line client calls it.

One small synchronous client (httpx): a CLI does one thing at a time, and a
blocking call is what a terminal user waits on anyway. Every failure becomes a
:class:`ClientError` carrying one line for the user: the problem+json
``detail`` the daemon sent, or what could not be reached. Nothing here prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8084"
#: How long one request may take; ``watch`` streams have no read timeout.
REQUEST_TIMEOUT_S = 30.0


class ClientError(Exception):
    """One line for the user; ``status`` is the HTTP status, or None when there was none."""

    def __init__(self, message: str, status: int | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = dict(body or {})


class ApiClient:
    """``--url`` / ``NURSERYD_URL`` and ``--token`` / ``NURSERYD_API_TOKEN``."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 *, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.url = (url or environ.get("NURSERYD_URL") or DEFAULT_URL).rstrip("/")
        token = token or environ.get("NURSERYD_API_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=REQUEST_TIMEOUT_S)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Mapping[str, Any] | None = None, **params: Any) -> Any:
        return self._call("POST", path, json=body,
                          params={k: v for k, v in params.items() if v is not None})

    def upload(self, path: str, file: Path, **fields: str | None) -> Any:
        try:
            handle = file.open("rb")
        except OSError as error:
            raise ClientError(f"cannot read {file}: {error.strerror or error}") from None
        with handle:
            return self._call("POST", path, files={"file": (file.name, handle)},
                              data={k: v for k, v in fields.items() if v is not None})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ClientError(f"{self.url} did not answer within {REQUEST_TIMEOUT_S:g} s") \
                from None
        except httpx.HTTPError as error:
            raise ClientError(f"cannot reach nurseryd at {self.url}: {error}") from None
        return _answer(response)

    def events(self, path: str) -> Iterator[dict[str, Any]]:
        """The ``data:`` of each server-sent event at ``path``, as JSON, until it ends.

        Raises :class:`ClientError` with status 404 when the daemon has no such
        stream (an older daemon): the caller then polls instead.
        """
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(
                    REQUEST_TIMEOUT_S, read=None)) as response:
                if response.status_code != 200:
                    response.read()
                    _answer(response)
                data: list[str] = []
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.HTTPError as error:
            raise ClientError(f"the event stream from {self.url} broke: {error}") from None


def _answer(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; a :class:`ClientError` with the problem's detail otherwise."""
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if response.is_success:
        return body
    detail = body.get("detail") if isinstance(body, dict) else None
    message = detail or f"{response.status_code} {response.reason_phrase}"
    if response.status_code == 401:
        message += " (give a token with --token or NURSERYD_API_TOKEN)"
    raise ClientError(message, response.status_code, body if isinstance(body, dict) else None)
