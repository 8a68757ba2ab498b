"""The one subscriber of the job store's change feed: job metrics and job log lines.

Every committed job change (a job recorded; each transition, with the row as
committed) reaches :class:`JobObserver` right after its commit, so what is
counted and logged is what the table says: nothing is missed, and nothing that
did not commit is reported. Durations come from the committed rows
(``finished_at - started_at``, queue wait ``started_at - created_at``); a start
with ``attempts > 1`` is a retry; a ``recover`` transition is an adoption.

Log lines (logger ``nurseryd.jobs``), one when a job starts and one when it ends::

    job 12 migration excel chats.xlsx → chats started (attempt 1, queued 12 ms)
    job 12 migration excel chats.xlsx → chats completed in 4.3 s: 155000 processed, 0 failed

Each line carries structured fields (``job_id``, ``kind``, ``event``, ``status``,
``attempt``, ``duration_s``, ``queue_wait_s``, ``processed``, ``failed``,
``submitted_by``, ``cancelled_by``, ...): the JSON log format prints them as keys,
the text format only the message, which names who cancelled a job (``cancelled
by ops``) and, at DEBUG, who submitted it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..lifecycle import Event, Status
from ..store.base import ChangeFeed, JobChanged, Row
from .metrics import Metrics

log = logging.getLogger("nurseryd.jobs")

#: Longest error text put into a log line (the row keeps all of it).
MAX_ERROR_CHARS = 500
#: Params that name what a job works on, in the order the description tries them.
_SOURCE_NAMES = ("filename", "source_identifier", "spreadsheet_id")


@dataclass(frozen=True)
class Attempt:
    """A job this daemon saw start, until that attempt ends."""

    kind: str
    source_type: str | None
    #: ``time.monotonic()`` when the start committed.
    clock: float
    #: ``processed + failed`` as committed before this attempt (a resumed job's
    #: earlier work), so a rate counts only what this attempt did.
    done_before: int


class JobObserver:
    """Counts and logs every committed job change; subscribe it to the store's feed."""

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        #: Jobs whose start this daemon committed and whose attempt has not ended.
        self.running: dict[int, Attempt] = {}
        self._clock = clock

    def subscribe(self, feed: ChangeFeed) -> Callable[[], None]:
        return feed.subscribe(self)

    def __call__(self, change: JobChanged) -> None:
        row = change.row
        if change.event is None:
            self._recorded(row)
        elif change.event is Event.START:
            self._started(row)
        elif change.event is Event.INTERRUPT:
            self._interrupted(row)
        elif change.event is Event.RECOVER:
            self._recovered(row)
        elif change.event is Event.RETRY:
            self._requeued(row)
        elif change.event is Event.RERUN:
            log.info("job %d %s queued again by request (from its checkpoint: %s)", row["id"],
                     describe(row["kind"], row["params"]), counts(row),
                     extra=fields(row, "rerun"))
        else:
            self._ended(change.event, row)

    # -- each kind of change ------------------------------------------------------------

    def _recorded(self, row: Row) -> None:
        self.metrics.jobs_submitted.labels(row["kind"]).inc()
        if not log.isEnabledFor(logging.DEBUG):
            return
        log.debug("job %d %s queued%s", row["id"], describe(row["kind"], row["params"]),
                  by(row, "submitted_by"), extra=fields(row, "record"))

    def _started(self, row: Row) -> None:
        kind, attempt = row["kind"], row["attempts"]
        self.running[row["id"]] = Attempt(kind, source_type(row["params"]), self._clock(),
                                          (row["processed"] or 0) + (row["failed"] or 0))
        waited = seconds_between(row["created_at"], row["started_at"])
        if attempt > 1:
            self.metrics.job_retries.labels(kind).inc()
            if not log.isEnabledFor(logging.INFO):  # a busy daemon starts thousands a second
                return
            log.info("job %d %s started again (attempt %d, from its checkpoint: %s)",
                     row["id"], describe(kind, row["params"]), attempt, counts(row),
                     extra=fields(row, "start", processed=row["processed"],
                                  failed=row["failed"]))
            return
        if waited is not None:
            self.metrics.job_queue_wait.labels(kind).observe(max(0.0, waited))
        if not log.isEnabledFor(logging.INFO):
            return
        log.info("job %d %s started (attempt %d, queued %s)", row["id"],
                 describe(kind, row["params"]), attempt, human_seconds(waited),
                 extra=fields(row, "start", queue_wait_s=rounded(waited)))

    def _ended(self, event: Event, row: Row) -> None:
        kind, status = row["kind"], Status(row["status"])
        attempt = self.running.pop(row["id"], None)
        self.metrics.jobs_finished.labels(kind, status.value).inc()
        ran = attempt is not None or event is not Event.CANCEL
        duration = seconds_between(row["started_at"], row["finished_at"]) if ran else None
        if duration is not None:
            self.metrics.job_duration.labels(kind, status.value).observe(max(0.0, duration))
        level = logging.INFO if status in (Status.COMPLETED, Status.CANCELLED) \
            else logging.WARNING
        if not log.isEnabledFor(level):
            return  # the line would be dropped: do not build it
        extra = fields(row, event.value, duration_s=rounded(duration),
                       processed=row["processed"], failed=row["failed"], total=row["total"],
                       **_row_outcomes(row))
        what = f"job {row['id']} {describe(kind, row['params'])}"
        if not ran:
            waited = seconds_between(row["created_at"], row["finished_at"])
            log.info("%s cancelled before it started (queued %s)%s", what,
                     human_seconds(waited), by(row, "cancelled_by"), extra=extra)
            return
        error = one_line(row["error"])
        if error and status is not Status.CANCELLED:
            extra["error"] = error
        verb = {Status.COMPLETED: "completed in", Status.FAILED: "failed after",
                Status.TIMED_OUT: "timed out after", Status.CANCELLED: "cancelled after"}
        message = (f"{what} {verb.get(status, status.value)} {human_seconds(duration)}"
                   f"{by(row, 'cancelled_by') if status is Status.CANCELLED else ''}: "
                   f"{counts(row)}")
        log.log(level, "%s%s", message, f": {error}" if "error" in extra else "", extra=extra)

    def _interrupted(self, row: Row) -> None:
        kind = row["kind"]
        attempt = self.running.pop(row["id"], None)
        self.metrics.jobs_interrupted.labels(kind).inc()
        ran = None if attempt is None else self._clock() - attempt.clock
        log.info("job %d %s interrupted by the shutdown after %s: back to queued with %s; "
                 "it resumes after the restart", row["id"], describe(kind, row["params"]),
                 human_seconds(ran), counts(row),
                 extra=fields(row, "interrupt", duration_s=rounded(ran),
                              processed=row["processed"], failed=row["failed"]))

    def _requeued(self, row: Row) -> None:
        kind = row["kind"]
        attempt = self.running.pop(row["id"], None)
        self.metrics.jobs_requeued.labels(kind).inc()
        ran = None if attempt is None else self._clock() - attempt.clock
        log.warning("job %d %s back to queued after %s: %s", row["id"],
                    describe(kind, row["params"]), human_seconds(ran), one_line(row["error"]),
                    extra=fields(row, "retry", duration_s=rounded(ran),
                                 processed=row["processed"], failed=row["failed"]))

    def _recovered(self, row: Row) -> None:
        self.running.pop(row["id"], None)
        self.metrics.jobs_adopted.inc()
        log.warning("job %d %s adopted: the daemon running it stopped (attempt %d); requeued "
                    "to resume from its checkpoint with %s", row["id"],
                    describe(row["kind"], row["params"]), row["attempts"], counts(row),
                    extra=fields(row, "recover", processed=row["processed"],
                                 failed=row["failed"]))


# -- how a job reads in a line ---------------------------------------------------------------


def describe(kind: str, params: Any) -> str:
    """``migration excel chats.xlsx → chats``, ``fetch (schedule)``, ``sleep``."""
    words = [kind]
    if isinstance(params, Mapping):
        if isinstance(params.get("source_type"), str):
            words.append(params["source_type"])
        for key in _SOURCE_NAMES:
            if isinstance(params.get(key), str):
                words.append(params[key])
                break
        if isinstance(params.get("target"), str):
            words += ["→", params["target"]]
        if isinstance(params.get("trigger"), str):
            words.append(f"({params['trigger']})")
    return printable(" ".join(words), 200)


def source_type(params: Any) -> str | None:
    """A migration's source type (checked when the job was submitted: bounded)."""
    value = params.get("source_type") if isinstance(params, Mapping) else None
    return value if isinstance(value, str) and value.isidentifier() and len(value) <= 32 \
        else None


def fields(row: Row, event: str, **more: Any) -> dict[str, Any]:
    """The structured fields of a job's log line (``None`` values left out)."""
    out: dict[str, Any] = {"job_id": row["id"], "kind": row["kind"], "event": event,
                           "status": row["status"], "attempt": row["attempts"]}
    params = row["params"]
    if (kind_of_source := source_type(params)) is not None:
        out["source_type"] = kind_of_source
    if isinstance(params, Mapping) and isinstance(params.get("target"), str):
        out["target"] = printable(params["target"], 100)
    for who in ("submitted_by", "cancelled_by"):
        if _column(row, who) is not None:
            out[who] = _column(row, who)
    out.update((key, value) for key, value in more.items() if value is not None)
    return out


def _column(row: Row, name: str) -> Any:
    """A column that rows of older code paths (tests' hand-made rows) may lack."""
    try:
        return row[name]
    except (KeyError, IndexError):
        return None


def by(row: Row, column: str) -> str:
    """`` by NAME`` for a line about who did it (a token's name: never a secret)."""
    name = _column(row, column)
    return f" by {printable(name, 64)}" if isinstance(name, str) else ""


def _row_outcomes(row: Row) -> dict[str, int]:
    """A migration's inserted / updated / unchanged, from its result."""
    result = row["result"]
    if not isinstance(result, Mapping):
        return {}
    return {name: result[name] for name in ("inserted", "updated", "unchanged")
            if isinstance(result.get(name), int)}


def counts(row: Row) -> str:
    processed, failed, total = row["processed"] or 0, row["failed"] or 0, row["total"]
    done = f"{processed} processed" if total is None or processed + failed >= total \
        else f"{processed} of {total} processed"
    text = f"{done}, {failed} failed"
    outcomes = _row_outcomes(row)
    if outcomes:
        text += " (" + ", ".join(f"{count} {name}" for name, count in outcomes.items()) + ")"
    return text


def seconds_between(start: Any, end: Any) -> float | None:
    if isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
        return (end - start).total_seconds()
    return None


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def human_seconds(seconds: float | None) -> str:
    """``12 ms``, ``4.3 s``, ``12 min 5 s``, ``2 h 03 min``."""
    if seconds is None:
        return "an unknown time"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{hours} h {rest:02d} min"


def one_line(text: Any) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return None
    return printable(" ".join(text.split()), MAX_ERROR_CHARS)


def printable(text: str, limit: int) -> str:
    """No control characters (a client's file name cannot forge a log line), bounded."""
    clean = "".join(char if char.isprintable() else "?" for char in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"
