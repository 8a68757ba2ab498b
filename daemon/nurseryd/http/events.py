"""``GET /events`` and ``GET /jobs/{id}/events``: job changes as server-sent events.

A stream is the request's own: its generator runs in the request's task, holds
one :class:`~nurseryd.observe.events.Subscription` of the daemon's event hub,
and gives it back when the response ends for whatever reason (client gone,
daemon stopping, buffer overflow). Nothing of it outlives the request.

Each stream first replays, from the table, the events after ``Last-Event-ID``
up to where the hub stood when it subscribed, then forwards the hub's live
events; so a resumed client sees every status change once, in order.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response, request

from ..db import events as event_log
from ..db.notes import notes_of
from ..lifecycle import Status
from ..observe.events import (
    EVENTS_SECTION,
    GAP_WAIT_S,
    EventFilter,
    EventHub,
    HubClosed,
    JobEvent,
    TooManyStreams,
    log_line,
    note_line,
    replay,
)
from ..services import Services
from ..supervisor import JobNotFound
from .context import get_services
from .jobs import json_response, parse_job_id
from .problems import Problem
from .query import int_arg, status_args

blueprint = Blueprint("events", __name__)

EVENT_STREAM = "text/event-stream"
#: How soon a client should reconnect after the stream ends (the SSE ``retry:`` field).
RECONNECT_MS = 2000
RETRY_AFTER_S = "5"
#: How long a request that arrives before the hub runs waits for it.
HUB_START_WAIT_S = 5.0


def format_event(event: JobEvent) -> bytes:
    """One SSE frame: ``id:`` for stored events, ``event:`` its name, ``data:`` one line."""
    lines = [] if event.id is None else [f"id: {event.id}"]
    lines += [f"event: {event.name}", "data: " + json.dumps(event.data(), default=str)]
    return ("\n".join(lines) + "\n\n").encode()


def _filter(services: Services, job_id: int | None) -> EventFilter:
    kind = request.args.get("kind") or None
    if kind is not None and services.kinds.get(kind) is None:
        raise Problem(422, f"unknown kind {kind!r}; use one of "
                      f"{', '.join(sorted(services.kinds.names()))}", field="kind")
    statuses = status_args()
    raw_job = request.args.get("job")
    if job_id is None and raw_job:
        try:
            job_id = int(raw_job)
        except ValueError:
            raise Problem(422, f"job must be a job id (a whole number), got {raw_job!r}",
                          field="job") from None
        if not 1 <= job_id <= 2**63 - 1:
            raise Problem(422, "job must be a job id between 1 and 2^63-1", field="job")
    return EventFilter(kind, frozenset(statuses), job_id)


def _last_event_id() -> int | None:
    """``Last-Event-ID`` (what an EventSource sends when it reconnects), or
    ``?last_event_id=`` for a first connection that resumes (EventSource cannot
    set headers)."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise Problem(422, f"Last-Event-ID must be an event id (a whole number), got {raw!r}",
                      field="Last-Event-ID") from None
    if not 0 <= value <= 2**63 - 1:
        raise Problem(422, "Last-Event-ID must be between 0 and 2^63-1", field="Last-Event-ID")
    return value


async def _hub(services: Services) -> EventHub:
    hub = services.events
    if hub is not None and not hub.running and not hub.stopped:
        # HTTP listens a moment before background tasks start.
        with trio.move_on_after(HUB_START_WAIT_S):
            await hub.started.wait()
    if hub is None or not hub.running:
        raise Problem(503, "the event stream is not running yet (the daemon is starting or "
                      "stopping); try again shortly", headers={"Retry-After": RETRY_AFTER_S})
    if hub.streams >= hub.settings.max_streams:
        raise Problem(503, f"{hub.settings.max_streams} event streams are open, the most this "
                      "daemon serves ([events] max_streams); try again later",
                      headers={"Retry-After": RETRY_AFTER_S})
    return hub


async def _stream(services: Services, hub: EventHub, wanted: EventFilter, after: int | None,
                  one_job: bool) -> AsyncIterator[bytes]:
    try:
        subscription = hub.subscribe(wanted)
    except (TooManyStreams, HubClosed) as error:  # filled up since the request was checked
        yield f"retry: {RECONNECT_MS}\n: {error}\n\n".encode()
        return
    try:
        yield f"retry: {RECONNECT_MS}\n: connected\n\n".encode()
        # A job's own stream starts with its history; the all-jobs stream with now.
        last = 0 if after is None and one_job else after
        # A job's stream ends at its terminal event, unless a later one (a retry) follows.
        ended = False
        if last is not None:
            while True:
                assert last is not None
                page = await replay(services.db, last, subscription.since, wanted)
                if not page:
                    break
                for event in page:
                    last = event.id
                    if wanted.matches(event.job):
                        yield format_event(event)
                        ended = event.terminal
        if one_job and ended:
            return
        # The job may have ended after the hub's cursor (its event comes live) or
        # its events may have been pruned (then nothing comes): wait a bounded time.
        ended_row = None
        if one_job:
            assert wanted.job_id is not None
            ended_row = await services.supervisor.get_job(wanted.job_id)
            if ended_row is not None and not Status(ended_row["status"]).is_terminal:
                ended_row = None
        heartbeat = hub.settings.heartbeat_s
        wait_for_end = GAP_WAIT_S + 5 * hub.settings.poll_interval_s
        while True:
            timeout = min(heartbeat, wait_for_end) if ended_row is not None else heartbeat
            with trio.move_on_after(timeout) as idle:
                try:
                    event = await subscription.receive.receive()
                except trio.EndOfChannel:
                    break
            if idle.cancelled_caught:
                if ended_row is not None:
                    wait_for_end -= timeout
                    if wait_for_end <= 0:
                        yield format_event(JobEvent(None, "finished", ended_row,
                                                    _finished_at(ended_row)))
                        return
                yield b": heartbeat\n\n"
                continue
            if event.id is not None and last is not None and event.id <= last:
                continue
            if event.id is not None:
                last = event.id
            yield format_event(event)
            if one_job and event.terminal:
                return
        if subscription.overflowed:
            yield b": this client fell behind and was disconnected; reconnect with " \
                b"Last-Event-ID to replay what it missed\n\n"
    finally:
        hub.unsubscribe(subscription)


def _finished_at(job: dict[str, Any]) -> dt.datetime:
    value = job.get("finished_at")
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else dt.datetime.now(dt.UTC)


def _response(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, content_type=EVENT_STREAM,
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None  # the stream lasts as long as the client wants it
    return response


@blueprint.get("/events")
async def events() -> Response:
    services = get_services()
    wanted = _filter(services, None)
    after = _last_event_id()
    hub = await _hub(services)
    return _response(_stream(services, hub, wanted, after, one_job=False))


@blueprint.get("/jobs/<job_id>/events")
async def job_events(job_id: str) -> Response:
    services = get_services()
    number = parse_job_id(job_id)
    wanted = _filter(services, number)
    after = _last_event_id()
    hub = await _hub(services)
    if await services.supervisor.get_job(number) is None:
        raise JobNotFound(number)
    return _response(_stream(services, hub, wanted, after, one_job=True))


#: Lines of a job's log in one answer: the newest, at most this many.
MAX_LOG_LINES = 1000


@blueprint.get("/jobs/<job_id>/log")
async def job_log(job_id: str) -> Response:
    """The job's log: start, requeues, retries, the error, the end (from the event
    log), and the notes its kind wrote (``JobContext.note``), in time order."""
    services = get_services()
    number = parse_job_id(job_id)
    limit = int_arg("limit", 200, 1, MAX_LOG_LINES)
    if await services.supervisor.get_job(number) is None:
        raise JobNotFound(number)
    records = await event_log.job_history(services.db, number, limit + 1)
    notes = await notes_of(services.db, number, limit + 1)
    timed = [(record["at"], 0, log_line(JobEvent.from_record(record))) for record in records]
    timed += [(note["at"], 1, note_line(note)) for note in notes]
    timed.sort(key=lambda entry: entry[:2])  # at a tie, the status change first
    lines = [line for _, _, line in timed]
    return json_response({"job": number, "lines": lines[-limit:],
                          "truncated": len(lines) > limit})


async def prepare_event_hub(services: Services) -> None:
    """Start-up hook of the events feature: the daemon's one hub exists before HTTP
    listens, so an early request waits for it rather than finding none."""
    services.events = EventHub(services.db, services.settings.section(EVENTS_SECTION),
                               services.supervisor.store.progress)


async def run_event_hub(services: Services) -> None:
    """Background task of the events feature: the hub runs for as long as the
    daemon serves; when it stops it closes every stream."""
    assert services.events is not None, "prepare_event_hub runs at start-up"
    await services.events.run()
