"""Diagnostic kinds for operators: ``sleep`` exercises timeouts, cancellation and
shutdown by hand; ``sql_sleep`` shows a cancel reaching the server; ``noop``
measures the supervisor's own overhead.

They are served only when diagnostics are enabled (``[diagnostics] enabled``
or ``NURSERYD_DIAGNOSTICS=1``): each is a way to hold a slot, and ``sql_sleep``
a database connection, for as long as the caller likes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import trio

from .base import JobContext, JobKind, ParamError, parser, refuse_unknown

#: Upper bound for ``seconds``: a week. Longer is almost certainly a typo.
MAX_SLEEP_S = 7 * 86400
#: ``sql_sleep`` holds a work-pool connection all along: ten minutes at most.
MAX_SQL_SLEEP_S = 600


@dataclass(frozen=True)
class SleepParams:
    """``{"seconds": n}``: how long to sleep (``sleep`` and ``sql_sleep``)."""

    seconds: float
    #: The largest ``seconds`` accepted (:class:`SqlSleepParams` lowers it).
    maximum: ClassVar[float] = MAX_SLEEP_S

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> Self:
        refuse_unknown(params, {"seconds"}, "sleep takes only 'seconds'")
        if "seconds" not in params:
            raise ParamError("seconds", "required: how long to sleep, e.g. {\"seconds\": 30}")
        seconds = params["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ParamError("seconds", f"expected a number, got {seconds!r}")
        if not math.isfinite(seconds) or not 0 <= seconds <= cls.maximum:
            raise ParamError("seconds", f"must be between 0 and {cls.maximum:g}")
        return cls(seconds)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds}  # as given: 30 stays 30, not 30.0


@dataclass(frozen=True)
class SqlSleepParams(SleepParams):
    """``{"seconds": n}`` for ``sql_sleep``: at most MAX_SQL_SLEEP_S."""

    maximum: ClassVar[float] = MAX_SQL_SLEEP_S


parse_sleep_params = parser(SleepParams)


async def run_sleep(ctx: JobContext) -> None:
    """Sleep in one-second steps, reporting progress each second, resuming from the
    checkpoint after an interruption (so operators can watch resume work too)."""
    seconds = float(SleepParams.parse(ctx.params).seconds)
    steps = math.ceil(seconds)
    done = int(ctx.checkpoint or 0)
    ctx.report(total=steps, processed=done)
    deadline = trio.current_time() + (seconds - done)
    while done < steps:
        await trio.sleep_until(min(deadline, trio.current_time() + 1.0))
        done += 1
        ctx.report(processed=done)
        if done < steps:
            await ctx.save_checkpoint(done)
    ctx.set_result({"slept_s": seconds})


async def run_sql_sleep(ctx: JobContext) -> None:
    """One long statement on the server: shows that cancelling a job cancels its
    query on the server too (nothing left in ``pg_stat_activity``)."""
    ctx.report(total=1, processed=0)
    await ctx.db.execute("SELECT pg_sleep($1)", float(SqlSleepParams.parse(ctx.params).seconds))
    ctx.report(processed=1)


async def run_noop(ctx: JobContext) -> None:
    await trio.lowlevel.checkpoint()


SLEEP_KIND = JobKind(
    name="sleep", run=run_sleep, parse_params=parse_sleep_params,
    description="sleeps {seconds}, reporting progress every second",
)


SQL_SLEEP_KIND = JobKind(
    name="sql_sleep", run=run_sql_sleep, parse_params=parser(SqlSleepParams),
    description="runs SELECT pg_sleep({seconds}) as one statement",
)


def _parse_noop(params: Mapping[str, Any]) -> dict[str, Any]:
    return dict(params)


NOOP_KIND = JobKind(name="noop", run=run_noop, parse_params=_parse_noop,
                    description="does nothing; for measuring overhead")
