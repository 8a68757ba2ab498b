"""Job statuses and the transitions between them, as data.

Like h11's connection state machine, this module only *decides*: given where a
job is and what happened, it answers where the job goes, or refuses. The
supervisor and the database layer act on the answer. Keeping the table free of
I/O lets every rule be tested with plain function calls.

::

    queued ──start──▶ running ──complete──▶ completed
      │                 │ ├──fail────────▶ failed
      │                 │ ├──time_out────▶ timed_out
      │                 │ └──cancel──────▶ cancelled
      │                 └──interrupt / recover / retry──▶ queued
      │                      (shutdown, a dead owner, a transient failure)
      └──cancel──▶ cancelled

    failed | cancelled | timed_out ──rerun──▶ queued
                      (an operator's POST /jobs/{id}/retry; resumes from its checkpoint)
"""

from __future__ import annotations

import functools
from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


class Event(StrEnum):
    START = "start"
    COMPLETE = "complete"
    FAIL = "fail"
    TIME_OUT = "time_out"
    CANCEL = "cancel"
    #: The daemon is shutting down and stopped the job; it runs again after restart.
    INTERRUPT = "interrupt"
    #: The process that ran the job died (SIGKILL, OOM), or its final write never
    #: landed; found by a rescan or at the next start.
    RECOVER = "recover"
    #: The attempt failed in a way another attempt would not (the database went
    #: away): back to queued, tried again after a back-off while attempts remain.
    RETRY = "retry"
    #: An operator asked to run an ended job again (``POST /jobs/{id}/retry``). The
    #: only event that leaves a terminal status, and only the API issues it: no
    #: writer of a running attempt can, so a writer that lost its claim still
    #: changes nothing (a rerun job starts a new attempt, which fences the old one).
    RERUN = "rerun"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT})
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})

TRANSITIONS: dict[tuple[Status, Event], Status] = {
    (Status.QUEUED, Event.START): Status.RUNNING,
    (Status.QUEUED, Event.CANCEL): Status.CANCELLED,
    (Status.RUNNING, Event.COMPLETE): Status.COMPLETED,
    (Status.RUNNING, Event.FAIL): Status.FAILED,
    (Status.RUNNING, Event.TIME_OUT): Status.TIMED_OUT,
    (Status.RUNNING, Event.CANCEL): Status.CANCELLED,
    (Status.RUNNING, Event.INTERRUPT): Status.QUEUED,
    (Status.RUNNING, Event.RECOVER): Status.QUEUED,
    (Status.RUNNING, Event.RETRY): Status.QUEUED,
    (Status.FAILED, Event.RERUN): Status.QUEUED,
    (Status.CANCELLED, Event.RERUN): Status.QUEUED,
    (Status.TIMED_OUT, Event.RERUN): Status.QUEUED,
}


class InvalidTransition(ValueError):
    def __init__(self, status: Status, event: Event) -> None:
        super().__init__(f"a {status.value} job cannot {event.value}")
        self.status = status
        self.event = event


def next_status(status: Status, event: Event) -> Status:
    """Where a job in ``status`` goes on ``event``; raises :class:`InvalidTransition`."""
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(status, event) from None


@functools.cache  # asked for every write of a running job; the table never changes
def statuses_allowing(event: Event) -> frozenset[Status]:
    """The statuses from which ``event`` is allowed."""
    return frozenset(status for (status, each), _ in TRANSITIONS.items() if each is event)


def target_of(event: Event) -> Status:
    """Where ``event`` takes a job, whichever status it leaves.

    Every event has exactly one target (checked below, at import), which is what
    lets the job store apply a transition in one guarded statement:
    ``SET status = target_of(event) WHERE status = ANY(statuses_allowing(event))``.
    """
    return _TARGETS[event]


def _targets() -> dict[Event, Status]:
    targets: dict[Event, Status] = {}
    for (_, event), target in TRANSITIONS.items():
        if targets.setdefault(event, target) is not target:
            raise AssertionError(f"event {event.value} has two targets")
    missing = set(Event) - set(targets)
    if missing:
        raise AssertionError(f"events with no transition: {sorted(missing)}")
    return targets


_TARGETS = _targets()


class StopReason(StrEnum):
    """Why the supervisor cancelled a job's scope; decides the event that follows."""

    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"


def event_for_ending(
    *, raised: bool, cancelled: bool, reason: StopReason | None, retryable: bool = False
) -> Event:
    """The event a finished job attempt produces.

    ``cancelled`` is whether the job's own scope caught a cancellation; ``reason``
    is what the supervisor recorded when it cancelled the scope (``None`` if the
    scope's deadline expired on its own); ``retryable`` is whether the error it
    raised is transient and attempts remain (then it is tried again, not failed).
    """
    if cancelled:
        if reason is StopReason.CANCEL:
            return Event.CANCEL
        if reason is StopReason.SHUTDOWN:
            return Event.INTERRUPT
        return Event.TIME_OUT
    if raised:
        return Event.RETRY if retryable else Event.FAIL
    return Event.COMPLETE
