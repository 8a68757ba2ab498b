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

Bodies are decoded here, one bounded step at a time (:class:`BoundedDecoder`):
httpx inflates each received chunk whole, so ``Content-Encoding: gzip, gzip``
turned 660 bytes into 600 MB before any cap could look. Stacked codings are
refused outright. Redirects are followed here too (:func:`redirect_target`):
only to the same origin unless a source allows others, never from https to
http, and the configured headers (API keys) never go to another origin.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from urllib.parse import urljoin, urlsplit

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


class _Undecodable(Exception):
    pass


#: Bytes one decompression step may produce: what a hostile body costs per step.
DECODE_STEP = 64 * 1024
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
            "deflate": zlib.MAX_WBITS}


class BoundedDecoder:
    """Decodes one ``Content-Encoding`` (gzip or deflate, or none) in steps of at
    most :data:`DECODE_STEP` output bytes, so a cap can stop a bomb mid-chunk."""

    def __init__(self, content_encoding: str | None) -> None:
        codings = [part.strip().lower() for part in (content_encoding or "").split(",")]
        codings = [coding for coding in codings if coding and coding != "identity"]
        if len(codings) > 1:
            raise _Undecodable(f"stacked Content-Encoding {content_encoding!r} refused")
        if codings and codings[0] not in _CODINGS:
            raise _Undecodable(f"unsupported Content-Encoding {codings[0]!r}")
        self.coding = codings[0] if codings else None
        self._inflate = zlib.decompressobj(_CODINGS[self.coding]) if self.coding else None
        self._raw_deflate_tried = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._inflate is None:
            yield data
            return
        pending = data
        while pending:
            try:
                out = self._inflate.decompress(pending, DECODE_STEP)
            except zlib.error as error:
                if self.coding == "deflate" and not self._raw_deflate_tried:
                    # Some servers send raw deflate without the zlib header (as httpx allows).
                    self._raw_deflate_tried = True
                    self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise _Undecodable(f"the {self.coding} body cannot be decoded ({error})") \
                    from None
            self._raw_deflate_tried = True
            pending = self._inflate.unconsumed_tail
            if out:
                yield out
            elif not pending:
                break


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The decoded body, refusing more than ``max_bytes`` (counted after
    decompression, step by step, so a small gzip bomb is refused too)."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _TooLarge(f"response is {int(declared)} bytes, over the limit of {max_bytes}")
    decoder = BoundedDecoder(response.headers.get("content-encoding"))
    chunks: list[bytes] = []
    size = 0
    async for raw in response.aiter_raw():
        for chunk in decoder.feed(raw):
            size += len(chunk)
            if size > max_bytes:
                raise _TooLarge(f"response exceeded the limit of {max_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def origin_of(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def redirect_target(current: str, location: str, *, cross_origin: bool) -> str:
    """Where a redirect may lead, or :class:`FetchError` naming why it may not."""
    target = urljoin(current, location.strip())
    scheme = urlsplit(target).scheme
    if scheme not in ("http", "https"):
        raise FetchError(f"redirect from {current} to a {scheme or 'relative'} URL refused",
                         cause="redirects")
    if urlsplit(current).scheme == "https" and scheme == "http":
        raise FetchError(f"redirect from {current} to plain http refused", cause="redirects")
    if not cross_origin and origin_of(target) != origin_of(current):
        raise FetchError(f"redirect from {current} to another origin ({target}) refused; set "
                         "cross_origin_redirects = true on the source to allow it",
                         cause="redirects")
    return target


async def get_page(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str],
    max_bytes: int,
    deadline: float,
    policy: RetryPolicy,
    rng: random.Random | None = None,
    max_redirects: int = 5,
    cross_origin_redirects: bool = False,
) -> Page:
    """GET ``url`` with retries; returns a 2xx or 304 :class:`Page` or raises :class:`FetchError`.

    Redirects are followed here, at most ``max_redirects`` (a loop is a
    :class:`FetchError`), by :func:`redirect_target`'s rules; ``headers`` are
    dropped once a redirect leaves the first origin. Cancellation (the source or
    job scope) propagates.
    """

    async def attempt(number: int) -> Page:
        try:
            current, sent = url, dict(headers)
            for _ in range(max_redirects + 1):
                async with client.stream("GET", current, headers=sent) as response:
                    location = response.headers.get("location")
                    if response.status_code not in REDIRECT_STATUSES or location is None:
                        return await _answer(response, number)
                    current = redirect_target(current, location,
                                              cross_origin=cross_origin_redirects)
                if origin_of(current) != origin_of(url):
                    sent = {}  # a configured API key goes to its own origin only
            raise httpx.TooManyRedirects(f"more than {max_redirects} redirects")
        except _TooLarge as error:
            raise FetchError(str(error), status=200, attempts=number,
                             cause="too_large") from None
        except _Undecodable as error:
            raise FetchError(str(error), status=200, attempts=number) from None
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects (a redirect loop?) from {url}",
                             attempts=number, cause="redirects") from None
        except httpx.HTTPError as error:
            if not is_transient_error(error):
                raise FetchError(f"{type(error).__name__}: {error}", attempts=number) from None
            raise TryAgain(FetchError(f"{type(error).__name__}: {error or 'connection failed'}",
                                      attempts=number)) from None

    async def _answer(response: httpx.Response, number: int) -> Page:
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
        retry_after = parse_retry_after(response.headers.get("retry-after"), datetime.now(UTC))
        raise TryAgain(failure, retry_after=retry_after)

    try:
        return await retry(policy, attempt, deadline=deadline, rng=rng)
    except GaveUp as gave_up:
        failure = gave_up.reason
        if gave_up.attempts > 1:
            failure.args = (f"{failure} (gave up after {gave_up.attempts} attempts)",)
        raise failure from None


def open_client(*, concurrency: int, user_agent: str) -> httpx.AsyncClient:
    """One client per fetch job: a connection pool shared by its sources. Redirects
    and decoding are :func:`get_page`'s (bounded, and by its rules)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        timeout=None,
        headers={"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"},
        limits=httpx.Limits(max_connections=max(concurrency * 2, 10),
                            max_keepalive_connections=concurrency),
        trust_env=False,
    )
