"""HTTP for the fetch: one GET with retries, back-off, a size cap and validators.

Logic and I/O are kept apart the way h11/httpx do it: what a status means is a
pure function here, how long to wait before a retry and how to read
``Retry-After`` are the daemon's one retry policy (:mod:`nurseryd.backoff`), all
tested with plain values; :func:`get_page` only moves bytes and applies them.

Time budget: the caller runs :func:`get_page` inside the source's cancel scope
(``trio.move_on_at(deadline)``) and passes the same ``deadline`` so that a retry
whose wait would not fit in the budget gives up at once instead of sleeping into
the timeout. httpx's own timeouts are off: one mechanism, the cancel scope, ends a
request, and it ends it at once (the socket is closed, nothing keeps running).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

import httpx

from ...backoff import GaveUp, RetryPolicy, TryAgain, is_retryable_status, parse_retry_after, retry


class StatusClass(Enum):
    OK = "ok"
    NOT_MODIFIED = "not_modified"
    RETRY = "retry"
    FAIL = "fail"


def classify_status(status: int) -> StatusClass:
    """What to do with a final (post-redirect) response status."""
    if 200 <= status < 300:
        return StatusClass.OK
    if status == 304:
        return StatusClass.NOT_MODIFIED
    if is_retryable_status(status):
        return StatusClass.RETRY
    return StatusClass.FAIL


def is_transient_error(error: BaseException) -> bool:
    """Connection trouble is worth another try; a bad URL, a redirect loop or a
    body we cannot decode is not."""
    return isinstance(error, httpx.NetworkError | httpx.TimeoutException
                      | httpx.RemoteProtocolError)


@dataclass(frozen=True)
class Page:
    """A response worth looking at: 2xx with its body, or 304 with none."""

    status: int
    url: str
    body: bytes
    content_type: str | None
    etag: str | None
    last_modified: str | None
    attempts: int

    @property
    def not_modified(self) -> bool:
        return self.status == 304


class FetchError(Exception):
    """A source could not be fetched; ``str()`` is shown in the job result.

    ``cause`` is the failure's class for metrics (a bounded label): ``http_4xx``,
    ``http_5xx`` (from ``status``), ``too_large``, ``redirects``, ``network``,
    ``timeout``, ``config``.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1,
                 cause: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.cause = cause or _cause_of(status)


def _cause_of(status: int | None) -> str:
    if status is None:
        return "network"
    return "http_4xx" if status < 500 else "http_5xx"


class _TooLarge(Exception):
    pass


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The decoded body, refusing more than ``max_bytes`` (counted after
    decompression, so a small gzip bomb is refused too)."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _TooLarge(f"response is {int(declared)} bytes, over the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise _TooLarge(f"response exceeded the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def get_page(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str],
    max_bytes: int,
    deadline: float,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> Page:
    """GET ``url`` with retries; returns a 2xx or 304 :class:`Page` or raises :class:`FetchError`.

    Redirects are followed by the client (its ``max_redirects`` turns a loop into
    a :class:`FetchError`). Cancellation (the source or job scope) propagates.
    """

    async def attempt(number: int) -> Page:
        try:
            async with client.stream("GET", url, headers=dict(headers)) as response:
                verdict = classify_status(response.status_code)
                if verdict is StatusClass.OK or verdict is StatusClass.NOT_MODIFIED:
                    body = b"" if verdict is StatusClass.NOT_MODIFIED else await _read_capped(
                        response, max_bytes)
                    return Page(
                        status=response.status_code,
                        url=str(response.url),
                        body=body,
                        content_type=response.headers.get("content-type"),
                        etag=response.headers.get("etag"),
                        last_modified=response.headers.get("last-modified"),
                        attempts=number,
                    )
                failure = FetchError(f"HTTP {response.status_code} from {response.url}",
                                     status=response.status_code, attempts=number)
                if verdict is StatusClass.FAIL:
                    raise failure
                retry_after = parse_retry_after(response.headers.get("retry-after"),
                                                datetime.now(UTC))
        except _TooLarge as error:
            raise FetchError(str(error), status=200, attempts=number,
                             cause="too_large") from None
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects (a redirect loop?) from {url}",
                             attempts=number, cause="redirects") from None
        except httpx.HTTPError as error:
            if not is_transient_error(error):
                raise FetchError(f"{type(error).__name__}: {error}", attempts=number) from None
            raise TryAgain(FetchError(f"{type(error).__name__}: {error or 'connection failed'}",
                                      attempts=number)) from None
        raise TryAgain(failure, retry_after=retry_after)

    try:
        return await retry(policy, attempt, deadline=deadline, rng=rng)
    except GaveUp as gave_up:
        failure = gave_up.reason
        if gave_up.attempts > 1:
            failure.args = (f"{failure} (gave up after {gave_up.attempts} attempts)",)
        raise failure from None


def open_client(*, concurrency: int, user_agent: str, max_redirects: int = 5) -> httpx.AsyncClient:
    """One client per fetch job: a connection pool shared by its sources."""
    return httpx.AsyncClient(
        follow_redirects=True,
        max_redirects=max_redirects,
        timeout=None,
        headers={"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"},
        limits=httpx.Limits(max_connections=max(concurrency * 2, 10),
                            max_keepalive_connections=concurrency),
        trust_env=False,
    )
