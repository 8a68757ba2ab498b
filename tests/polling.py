"""Waiting for state that lives in another process.

A job's status in PostgreSQL, a daemon subprocess's HTTP answers, a server's
``pg_stat_activity``: none of these can signal a Trio event in the test, so the
test asks again until the answer is right, within a deadline. Inside one process
tests await events instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 10, interval: float = 0.02
) -> T:
    """Return the first truthy result of ``check()``; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not (result := await check()):  # noqa: ASYNC110 - cross-process state
            await trio.sleep(interval)
    return result
