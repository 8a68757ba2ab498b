"""Retry timing shared by every HTTP client in the daemon (fetch sources, Google Sheets).

Pure functions: the random draw is passed in, so the logic is testable without
clocks or sockets.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime


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
