"""The event hub: job changes, durable and live, fanned out to the open event streams.

Where events come from:

- **Status changes** (created, started, requeued, retried, finished) are rows of
  ``job_events``, written by a trigger in the transaction of the change itself
  (``db/migrations/0005_events.sql``). The hub reads them in id order — woken by
  ``LISTEN``/``NOTIFY``, so changes made by another daemon sharing the database
  arrive too, and by a poll every ``poll_interval_s`` when the listening
  connection is down — and every one of them carries its id. A client resuming
  with ``Last-Event-ID`` replays from the table, so it misses no status change,
  also across a restart of the daemon.
- **Progress** comes from this daemon's in-process feed (``store.progress``: the
  committed progress flushes, at most every 0.25 s per job) and is not stored:
  it carries no id, and a resumed client gets the next one.

One task reads the table for all streams (one ``LISTEN`` connection per daemon,
not one per client). Each stream has a bounded buffer; the hub never waits for a
stream: a stream whose buffer is full is closed (its client reconnects with
``Last-Event-ID`` and replays what it missed from the table), so a slow client
neither holds memory without bound nor slows jobs or the other streams.

Ids are assigned when a transaction inserts and become visible when it commits,
so a higher id can appear before a lower one. The hub never steps over a
missing id at once: it waits up to :data:`GAP_WAIT_S` for it to commit (the
usual case, milliseconds) before it takes the gap for a rolled-back insert.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..config import ConfigError, ConfigSection, check_keys, parse_duration, parse_positive_int
from ..db import Database
from ..db import events as event_log
from ..db.transient import CONNECTION_ERRORS
from ..errors import DatabaseUnavailable
from ..lifecycle import Status
from ..store.base import ChangeFeed, JobChanged, job_json

log = logging.getLogger("nurseryd.events")

#: How long a missing event id may hold the hub's cursor back (see the module doc).
GAP_WAIT_S = 10.0
#: How often the table is read while a gap is open.
GAP_RETRY_S = 0.05
#: Live progress events, at most this often per job.
PROGRESS_INTERVAL_S = 0.25
#: Events read from the table per query.
PAGE = 500
#: What a read of the table may fail with and be tried again.
_DB_AWAY: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, DatabaseUnavailable, OSError)
#: How often the listening connection is checked.
LISTEN_CHECK_S = 5.0
#: How often old events are pruned.
PRUNE_INTERVAL_S = 60.0


@dataclass(frozen=True)
class EventSettings:
    """The ``[events]`` table."""

    #: Open streams at most (``GET /events`` and ``GET /jobs/{id}/events``); past it, 503.
    max_streams: int = 100
    #: Events buffered per stream before the stream is closed as too slow.
    stream_buffer: int = 1000
    #: Events are kept this long ...
    retention_s: float = 7 * 86400.0
    #: ... and at most this many (the newest).
    max_events: int = 1_000_000
    #: How often the table is read when notifications are unavailable.
    poll_interval_s: float = 1.0
    #: A comment line this often on an idle stream (keeps proxies from closing it).
    heartbeat_s: float = 15.0


_KEYS = frozenset({"max_streams", "stream_buffer", "retention", "max_events",
                   "poll_interval", "heartbeat"})


def parse_events(raw: Any, whole: Mapping[str, Any]) -> EventSettings:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("events", "expected an [events] table")
    check_keys("events", raw, _KEYS)
    base = EventSettings()
    poll = parse_duration("events.poll_interval", raw.get("poll_interval", base.poll_interval_s))
    heartbeat = parse_duration("events.heartbeat", raw.get("heartbeat", base.heartbeat_s))
    if poll <= 0 or heartbeat <= 0:
        raise ConfigError("events.poll_interval" if poll <= 0 else "events.heartbeat",
                          "must be more than 0")
    return EventSettings(
        max_streams=parse_positive_int("events.max_streams",
                                       raw.get("max_streams", base.max_streams)),
        stream_buffer=parse_positive_int("events.stream_buffer",
                                         raw.get("stream_buffer", base.stream_buffer)),
        retention_s=parse_duration("events.retention", raw.get("retention", base.retention_s)),
        max_events=parse_positive_int("events.max_events",
                                      raw.get("max_events", base.max_events)),
        poll_interval_s=poll, heartbeat_s=heartbeat,
    )


EVENTS_SECTION: ConfigSection[EventSettings] = ConfigSection("events", parse_events,
                                                             EventSettings)


# -- events --------------------------------------------------------------------------------


def event_name(from_status: str | None, status: str) -> str:
    """The stream's name for a status change, from the lifecycle's statuses."""
    if from_status is None:
        return "created"
    to = Status(status)
    if to is Status.RUNNING:
        return "started"
    if to.is_terminal:
        return "finished"
    return "retried" if Status(from_status).is_terminal else "requeued"


def _parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def rate_and_eta(job: Mapping[str, Any], at: dt.datetime) -> tuple[float | None, float | None]:
    """Units per second since the job started, and seconds left at that rate.

    Over the whole run rather than a recent window: stateless, so a replayed event
    shows the same figures as the live one did. ``eta_s`` is ``None`` without a
    known ``total`` or any progress yet, 0 once the job ended.
    """
    started = _parse_time(job.get("started_at"))
    status = job.get("status")
    if status is not None and Status(status).is_terminal:
        end = _parse_time(job.get("finished_at")) or at
        eta: float | None = 0.0
    else:
        end, eta = at, None
    if status == Status.QUEUED.value:
        return None, None
    if started is None:  # ended without running (cancelled while queued)
        return None, eta
    done = (job.get("processed") or 0) + (job.get("failed") or 0)
    elapsed = (end - started).total_seconds()
    if elapsed <= 0:
        return None, eta
    rate = done / elapsed
    total = job.get("total")
    if eta is None and total is not None and rate > 0:
        eta = max(0.0, (total - done) / rate)
    return (round(rate, 3) if math.isfinite(rate) else None,
            None if eta is None else round(eta, 3))


@dataclass(frozen=True)
class JobEvent:
    """One event for the streams: durable (with an id) or live progress (id ``None``)."""

    id: int | None
    name: str
    job: dict[str, Any]
    at: dt.datetime

    @property
    def terminal(self) -> bool:
        return Status(self.job["status"]).is_terminal

    def data(self) -> dict[str, Any]:
        """The job JSON plus ``rate`` (units/s) and ``eta_s``."""
        rate, eta = rate_and_eta(self.job, self.at)
        return {**self.job, "rate": rate, "eta_s": eta}

    @classmethod
    def from_record(cls, record: Any) -> JobEvent:
        return cls(record["id"], event_name(record["from_status"], record["status"]),
                   dict(record["job"]), record["at"])


@dataclass(frozen=True)
class EventFilter:
    """What a stream asked for; ``None`` or empty means any."""

    kind: str | None = None
    statuses: frozenset[str] = frozenset()
    job_id: int | None = None

    def matches(self, job: Mapping[str, Any]) -> bool:
        return ((self.job_id is None or job["id"] == self.job_id)
                and (self.kind is None or job["kind"] == self.kind)
                and (not self.statuses or job["status"] in self.statuses))


class TooManyStreams(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} event streams are open, the most this daemon serves")
        self.limit = limit


class HubClosed(Exception):
    """The hub is not running (the daemon is starting or stopping)."""


@dataclass(eq=False)
class Subscription:
    """One stream's place in the hub: its filter, its bounded buffer, and the id
    up to which the hub had delivered when it subscribed (replay up to there
    comes from the table)."""

    filter: EventFilter
    send: trio.MemorySendChannel[JobEvent]
    receive: trio.MemoryReceiveChannel[JobEvent]
    since: int
    #: Set when the hub closed the stream because its buffer was full.
    overflowed: bool = False


@dataclass(eq=False)
class EventHub:
    """Reads the event log once for all streams; see the module doc."""

    db: Database
    settings: EventSettings
    progress: ChangeFeed
    #: The highest event id delivered to the streams.
    cursor: int = 0
    #: Whether notifications are arriving (else the hub polls).
    listening: bool = False
    running: bool = False
    #: Set once :meth:`run` serves (a request that arrives first waits for it).
    started: trio.Event = field(default_factory=trio.Event)
    #: Set once :meth:`run` ended: the daemon is stopping.
    stopped: bool = False
    _subscriptions: set[Subscription] = field(default_factory=set)
    _wake: trio.Event = field(default_factory=trio.Event)
    _gap_since: float | None = None
    _progress_sent: dict[int, float] = field(default_factory=dict)

    @property
    def streams(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, wanted: EventFilter) -> Subscription:
        if not self.running:
            raise HubClosed("the event stream is not running (starting or stopping)")
        if len(self._subscriptions) >= self.settings.max_streams:
            raise TooManyStreams(self.settings.max_streams)
        send, receive = trio.open_memory_channel[JobEvent](self.settings.stream_buffer)
        subscription = Subscription(wanted, send, receive, self.cursor)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.send.close()

    def _deliver(self, event: JobEvent) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.filter.matches(event.job):
                continue
            try:
                subscription.send.send_nowait(event)
            except trio.WouldBlock:
                subscription.overflowed = True
                self.unsubscribe(subscription)
                log.warning("closed an event stream whose client did not keep up "
                            "(%d events buffered)", self.settings.stream_buffer)
            except trio.ClosedResourceError:
                self._subscriptions.discard(subscription)

    def _on_progress(self, change: JobChanged) -> None:
        """Feed subscriber (synchronous, never blocks): a live progress event,
        at most every :data:`PROGRESS_INTERVAL_S` per job."""
        job = job_json(change.row)
        if Status(job["status"]) is not Status.RUNNING:
            return
        clock = trio.current_time()
        last = self._progress_sent.get(job["id"])
        if last is not None and clock - last < PROGRESS_INTERVAL_S:
            return
        self._progress_sent[job["id"]] = clock
        self._deliver(JobEvent(None, "progress", job, dt.datetime.now(dt.UTC)))

    def wake(self) -> None:
        self._wake.set()

    async def catch_up(self) -> None:
        """Deliver every committed event above the cursor, in id order (gaps: see
        the module doc)."""
        while True:
            records = await event_log.events_after(self.db, self.cursor, PAGE)
            for record in records:
                if record["id"] != self.cursor + 1:
                    now = trio.current_time()
                    if self._gap_since is None:
                        self._gap_since = now
                    if now - self._gap_since < GAP_WAIT_S:
                        return
                    log.warning("event ids %d to %d never committed; going on",
                                self.cursor + 1, record["id"] - 1)
                self._gap_since = None
                self.cursor = record["id"]
                event = JobEvent.from_record(record)
                if event.name != "started":  # its attempt ended: no more progress
                    self._progress_sent.pop(event.job["id"], None)
                self._deliver(event)
            if len(records) < PAGE:
                return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: listen, read, prune. On exit every stream is closed,
        so no response outlives the hub."""
        self.cursor = await event_log.latest_event_id(self.db)
        unsubscribe = self.progress.subscribe(self._on_progress)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                nursery.start_soon(self._prune)
                self.running = True
                self.started.set()
                task_status.started()
                await self._read()
        finally:
            self.running = False
            self.stopped = True
            unsubscribe()
            for subscription in list(self._subscriptions):
                self.unsubscribe(subscription)

    async def _read(self) -> None:
        while True:
            if self._gap_since is not None:
                interval = GAP_RETRY_S
            elif self.listening:
                interval = 5 * self.settings.poll_interval_s  # a safety net only
            else:
                interval = self.settings.poll_interval_s
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.catch_up()
            except _DB_AWAY as error:
                log.warning("reading job events failed (%s); trying again", error)

    async def _listen(self) -> None:
        """Keep a LISTEN connection up; while it is down the reader polls."""
        while True:
            try:
                async with event_log.listen(self.db, self.wake) as alive:
                    self.listening = True
                    self.wake()  # what committed while nobody listened
                    while await alive():  # noqa: ASYNC110 - a connection check, no event
                        await trio.sleep(LISTEN_CHECK_S)
            except _DB_AWAY as error:
                log.warning("listening for job events failed (%s); polling every %gs",
                            error, self.settings.poll_interval_s)
            finally:
                self.listening = False
            await trio.sleep(LISTEN_CHECK_S)

    async def _prune(self) -> None:
        while True:
            # Not at start: the daemon has more urgent work then, and nothing is old yet.
            await trio.sleep(PRUNE_INTERVAL_S)
            try:
                deleted = await event_log.prune(self.db, keep_s=self.settings.retention_s,
                                                max_rows=self.settings.max_events)
                if deleted:
                    log.info("pruned %d old job events", deleted)
            except _DB_AWAY as error:
                log.warning("pruning job events failed (%s)", error)


async def replay(
    db: Database, after_id: int, up_to: int, wanted: EventFilter
) -> Sequence[JobEvent]:
    """One page of the stored events in ``(after_id, up_to]`` (of ``wanted``'s job,
    when it names one), oldest first; the caller applies the rest of the filter
    and asks again from the last id until a page comes back empty."""
    records = await event_log.events_after(db, after_id, PAGE, wanted.job_id, up_to)
    return [JobEvent.from_record(record) for record in records]


def _counts(job: Mapping[str, Any]) -> str:
    total = job.get("total")
    of = "" if total is None else f" of {total}"
    return f"{job.get('processed') or 0}{of} processed, {job.get('failed') or 0} failed"


def log_line(event: JobEvent) -> dict[str, Any]:
    """One line of a job's log (``GET /jobs/{id}/log``) from a stored event.

    The log is the event log read for people: what each change meant, with the
    attempt, the counters and the error, so it survives restarts and is the same
    whichever daemon sharing the database is asked.
    """
    job = event.job
    status = Status(job["status"])
    level, attempt, error = "info", job.get("attempts") or 0, job.get("error")
    if event.name == "created":
        message = f"recorded: {job['kind']} {json.dumps(job.get('params'), default=str)}"
    elif event.name == "started":
        message = f"attempt {attempt} started"
        if (job.get("processed") or 0) + (job.get("failed") or 0):
            message += f" from its checkpoint ({_counts(job)})"
    elif event.name == "requeued":
        level = "warning"
        message = (f"attempt {attempt} stopped and queued again (shutdown, a lost daemon or a "
                   f"transient error) at {_counts(job)}" + (f": {error}" if error else ""))
    elif event.name == "retried":
        message = f"queued again by request, resuming at {_counts(job)}"
    elif status is Status.COMPLETED:
        message = f"completed: {_counts(job)}"
    else:
        level = "warning" if status is Status.CANCELLED else "error"
        message = f"{status.value}: {error or 'no reason recorded'} ({_counts(job)})"
    return {"id": event.id, "at": event.at.isoformat(), "level": level, "event": event.name,
            "message": message}


def note_line(note: Any) -> dict[str, Any]:
    """One line of a job's log from a note its kind wrote (``JobContext.note``);
    ``event`` is ``"note"``, ``id`` the note's own (notes are not stream events)."""
    return {"id": note["id"], "at": note["at"].isoformat(), "level": note["level"],
            "event": "note", "message": f"attempt {note['attempt']}: {note['message']}"}
