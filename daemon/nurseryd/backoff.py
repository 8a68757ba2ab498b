"""Retries: one policy and one loop for every client in the daemon that tries again.

Who retries: the fetch's HTTP GETs (``kinds/fetch/client.py``), the Google Sheets
source's API requests and the database source's reconnects (``kinds/migrate/sources``).
Each of them keeps only its own judgement of *what* is worth another try (an HTTP
status through :func:`is_retryable_status`, a connection error, a database's
transient errors) and says so by raising :class:`TryAgain` from an attempt;
:class:`RetryPolicy` decides *how long* to wait and when to give up, and
:func:`retry` runs the loop.

Timing: exponential back-off, ``base_s · 2^(n-1)`` capped at ``cap_s``, with jitter
(full jitter by default: uniform in ``[0, step)``), never sooner than a server's
``Retry-After``. A retry is given up when the attempts are spent, when the wait would
not fit in the caller's deadline, or when a ``Retry-After`` asks for longer than the
policy accepts.

The decisions are pure (:meth:`RetryPolicy.delay` takes the random draw and the time
left as arguments, so they are tested with plain values); :func:`retry` sleeps with
``trio.sleep`` unless given another sleep, so it runs under Trio's ``MockClock`` too.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import trio

T = TypeVar("T")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date).

    ``None`` when absent or unreadable (the caller then uses its own back-off).
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    return seconds if seconds >= 0 else None


def backoff_delay(attempt: int, base: float, cap: float, fraction: float) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, base·2^(attempt-1))).

    ``attempt`` is the number of the attempt that just failed (1 for the first);
    ``fraction`` in [0, 1) is the random draw.
    """
    return fraction * min(cap, base * 2 ** (attempt - 1))


#: 5xx statuses that say "never" rather than "not now".
_PERMANENT_5XX = frozenset({501, 505})  # Not Implemented, HTTP Version Not Supported


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status says "try again later": 408 (request timeout), 425
    (too early), 429 (too many requests) and every 5xx but 501 and 505."""
    return status in (408, 425, 429) or (500 <= status < 600 and status not in _PERMANENT_5XX)


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try and how long to wait in between."""

    #: Attempts in all (1 = no retry).
    max_attempts: int
    #: The first back-off step; it doubles per failed attempt ...
    base_s: float
    #: ... up to this.
    cap_s: float
    #: Share of each step that is always waited: 0 is full jitter (uniform in
    #: [0, step)), 0.5 equal jitter ([step/2, step): never at once).
    jitter_floor: float = 0.0
    #: A ``Retry-After`` longer than this gives up at once; ``None`` honours any
    #: wait that fits the caller's deadline.
    max_retry_after_s: float | None = None

    def delay(self, attempt: int, retry_after: float | None = None, *,
              remaining: float | None = None, fraction: float | None = None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up now.

        ``attempt`` is the number of the attempt that just failed (1 for the first);
        ``remaining`` is what is left of the caller's time budget (no point in
        sleeping past it); ``fraction`` in [0, 1) is the random draw (drawn here
        when not given).
        """
        if attempt >= self.max_attempts:
            return None
        if fraction is None:
            fraction = random.random()
        floor = self.jitter_floor
        wait = backoff_delay(attempt, self.base_s, self.cap_s, floor + (1 - floor) * fraction)
        if retry_after is not None:
            if self.max_retry_after_s is not None and retry_after > self.max_retry_after_s:
                return None
            wait = max(wait, retry_after)
        if remaining is not None and wait >= remaining:
            return None
        return wait


class TryAgain(Exception):
    """Raised by an attempt: it failed in a way worth another try.

    ``reason`` is the caller's own account of the failure (a message, or the
    error it would raise), handed back in :class:`GaveUp`; ``retry_after`` is the
    server's ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(self, reason: Any, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class GaveUp(Exception):
    """Raised by :func:`retry` when the policy allows no further attempt."""

    def __init__(self, attempts: int, last: TryAgain) -> None:
        super().__init__(f"gave up after {attempts} attempts: {last.reason}")
        self.attempts = attempts
        self.reason = last.reason
        self.last = last


async def retry(
    policy: RetryPolicy,
    attempt: Callable[[int], Awaitable[T]],
    *,
    deadline: float | None = None,
    on_retry: Callable[[int, float, TryAgain], None] | None = None,
    sleep: Callable[[float], Awaitable[Any]] = trio.sleep,
    rng: random.Random | None = None,
) -> T:
    """``await attempt(n)`` for n = 1, 2, ... until it returns; returns its value.

    An attempt raises :class:`TryAgain` to ask for another try; anything else it
    raises propagates at once (so does cancellation, also while sleeping). Before
    each retry ``on_retry(n, delay, failure)`` is called (for logs and counters),
    then ``sleep(delay)``. ``deadline`` (``trio.current_time()`` clock) bounds the
    waits; when the policy gives up, :class:`GaveUp` carries the last failure.
    """
    number = 0
    while True:
        number += 1
        try:
            return await attempt(number)
        except TryAgain as failure:
            remaining = None if deadline is None else deadline - trio.current_time()
            delay = policy.delay(number, failure.retry_after, remaining=remaining,
                                 fraction=None if rng is None else rng.random())
            if delay is None:
                raise GaveUp(number, failure) from None
            if on_retry is not None:
                on_retry(number, delay, failure)
        await sleep(delay)
