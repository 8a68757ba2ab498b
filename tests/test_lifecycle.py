"""The job state machine, as plain data: no I/O, no Trio."""

from __future__ import annotations

import pytest

from nurseryd.lifecycle import (
    ACTIVE,
    TERMINAL,
    Event,
    InvalidTransition,
    Status,
    StopReason,
    event_for_ending,
    next_status,
    statuses_allowing,
)


@pytest.mark.parametrize(
    ("status", "event", "expected"),
    [
        (Status.QUEUED, Event.START, Status.RUNNING),
        (Status.QUEUED, Event.CANCEL, Status.CANCELLED),
        (Status.RUNNING, Event.COMPLETE, Status.COMPLETED),
        (Status.RUNNING, Event.FAIL, Status.FAILED),
        (Status.RUNNING, Event.TIME_OUT, Status.TIMED_OUT),
        (Status.RUNNING, Event.CANCEL, Status.CANCELLED),
        (Status.RUNNING, Event.INTERRUPT, Status.QUEUED),
        (Status.RUNNING, Event.RECOVER, Status.QUEUED),
        (Status.RUNNING, Event.RETRY, Status.QUEUED),
        (Status.FAILED, Event.RERUN, Status.QUEUED),
        (Status.CANCELLED, Event.RERUN, Status.QUEUED),
        (Status.TIMED_OUT, Event.RERUN, Status.QUEUED),
    ],
)
def test_allowed_transitions(status: Status, event: Event, expected: Status) -> None:
    assert next_status(status, event) is expected


@pytest.mark.parametrize("status", sorted(TERMINAL))
@pytest.mark.parametrize("event", [event for event in Event if event is not Event.RERUN])
def test_terminal_statuses_are_final(status: Status, event: Event) -> None:
    with pytest.raises(InvalidTransition, match=f"a {status.value} job cannot"):
        next_status(status, event)


def test_a_queued_job_cannot_finish_without_running() -> None:
    for event in (Event.COMPLETE, Event.FAIL, Event.TIME_OUT, Event.INTERRUPT):
        with pytest.raises(InvalidTransition):
            next_status(Status.QUEUED, event)


def test_active_and_terminal_partition_the_statuses() -> None:
    assert ACTIVE | TERMINAL == set(Status)
    assert not ACTIVE & TERMINAL
    assert all(status.is_terminal for status in TERMINAL)


def test_cancel_is_allowed_exactly_from_the_active_statuses() -> None:
    assert statuses_allowing(Event.CANCEL) == ACTIVE


@pytest.mark.parametrize(
    ("raised", "cancelled", "reason", "expected"),
    [
        (False, False, None, Event.COMPLETE),
        (True, False, None, Event.FAIL),
        (False, True, None, Event.TIME_OUT),  # the scope's deadline fired by itself
        (False, True, StopReason.TIMEOUT, Event.TIME_OUT),
        (False, True, StopReason.CANCEL, Event.CANCEL),
        (False, True, StopReason.SHUTDOWN, Event.INTERRUPT),
        # A job that raised while being cancelled is still a cancellation.
        (True, True, StopReason.CANCEL, Event.CANCEL),
    ],
)
def test_how_an_attempt_ended(raised, cancelled, reason, expected) -> None:
    assert event_for_ending(raised=raised, cancelled=cancelled, reason=reason) is expected


@pytest.mark.parametrize(("cancelled", "reason", "expected"), [
    (False, None, Event.RETRY),
    # A cancel or a shutdown decides, whatever the kind raised meanwhile.
    (True, StopReason.CANCEL, Event.CANCEL),
    (True, StopReason.SHUTDOWN, Event.INTERRUPT),
])
def test_a_transient_failure_is_retried_unless_the_job_was_stopped(
    cancelled, reason, expected
) -> None:
    assert event_for_ending(raised=True, cancelled=cancelled, reason=reason,
                            retryable=True) is expected


def test_every_event_has_one_target_whatever_it_leaves() -> None:
    from nurseryd.lifecycle import TRANSITIONS, target_of

    for (status, event), target in TRANSITIONS.items():
        assert target_of(event) is target, (status, event)
    assert {event for _, event in TRANSITIONS} == set(Event)


def test_only_an_operators_rerun_leaves_a_terminal_status() -> None:
    for event in Event:
        if event is not Event.RERUN:
            assert not statuses_allowing(event) & TERMINAL, event
    # A completed job is done for good; the other endings may be run again.
    assert statuses_allowing(Event.RERUN) == TERMINAL - {Status.COMPLETED}
