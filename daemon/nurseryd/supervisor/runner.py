"""Running one job: limiter, start, the kind, and the final status write.

The lifecycle decides, the runner acts: the start and the ending are
:class:`~nurseryd.store.base.Transition` s guarded by this daemon's claim
(owner and attempt), so an attempt that lost its claim changes nothing.

Every status write here is shielded, so the cancellation that ended the job
cannot also eat its status, and bounded, so a hung database cannot hang the
shutdown (the job then stays ``running`` in the table and is recovered at the
next start, which is the crash path and is safe).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import trio

from .. import lifecycle
from ..backoff import RetryPolicy
from ..batching import CommitterClosed, GroupCommitter
from ..db.transient import is_transient
from ..errors import LostClaim, describe_failure
from ..lifecycle import Event, Status, StopReason
from ..store.base import Change, JobNote, Progress, Row, Transition, now
from .handle import JobHandle, RunningJob
from .intake import Intake
from .watchers import ProgressFlusher

if TYPE_CHECKING:
    from ..config import Settings
    from ..db import Database
    from ..observe.metrics import Metrics

log = logging.getLogger("nurseryd.supervisor")

#: A status write (start or final) gives up after this long: see the module docstring.
STATUS_WRITE_TIMEOUT_S = 10.0
#: How long a final write waits for the job's notes to land (they are not worth a
#: late status: past this the status goes first and the notes follow).
NOTES_FLUSH_TIMEOUT_S = 2.0
#: However long the database is away, a final write is given up after this long.
FINAL_WRITE_GIVE_UP_S = 120.0
#: Back-off between attempts of a job that failed transiently: equal jitter, from
#: [1, 2) s after the first failure, doubling, at most a minute.
RETRY_BASE_S = 2.0
RETRY_CAP_S = 60.0


class JobRunner:
    def __init__(
        self,
        *,
        owner: str,
        db: Database,
        settings: Settings,
        writer: GroupCommitter[Change, Row | None],
        intake: Intake,
        registry: MutableMapping[int, JobHandle],
        progress: ProgressFlusher,
        is_draining: Callable[[], bool],
        wait_for_claim: Callable[[], Awaitable[None]],
        claim_held: Callable[[], bool],
        metrics: Metrics,
        note_soon: Callable[[JobNote], None],
        notes_flushed: Callable[[], Awaitable[None]],
    ) -> None:
        self.owner = owner
        self._note_soon = note_soon
        self._notes_flushed = notes_flushed
        self._db = db
        self._settings = settings
        self._writer = writer
        self._intake = intake
        self._registry = registry
        self._progress = progress
        self._is_draining = is_draining
        self._wait_for_claim = wait_for_claim
        self._claim_held = claim_held
        self._metrics = metrics
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self.running = 0
        self._job_ended = trio.Event()

    async def wait_job_ended(self) -> None:
        await self._job_ended.wait()

    def _limiter(self, kind: str) -> trio.CapacityLimiter:
        if kind not in self._limiters:
            self._limiters[kind] = trio.CapacityLimiter(self._settings.limits(kind).concurrency)
        return self._limiters[kind]

    async def run(self, handle: JobHandle) -> None:
        """The job's task in the job nursery: from waiting for a slot to its final write.

        An attempt that failed transiently (the database went away) is requeued and,
        after a back-off, tried again by this same task: the handle stays held, so
        no rescan loads it twice.
        """
        try:
            while (delay := await self._attempt(handle)) is not None:
                if not await self._back_off(handle, delay):
                    break
        finally:
            self._registry.pop(handle.id, None)
            handle.finished.set()
            self._job_ended.set()
            self._job_ended = trio.Event()

    async def _attempt(self, handle: JobHandle) -> float | None:
        """One attempt; the back-off before the next one if it was requeued as a retry."""
        raised: Exception | None = None
        started = returned = released = False
        try:
            with handle.scope:
                if self._is_draining():
                    handle.stop(StopReason.SHUTDOWN)
                async with self._limiter(handle.kind.name):
                    if self._is_draining():
                        handle.stop(StopReason.SHUTDOWN)
                        await trio.lowlevel.checkpoint()
                    await self._wait_for_claim()  # no start while the owner lock is lost
                    self._intake.release()
                    released = True
                    started = await self._start(handle)
                    if started and not self._claim_held():
                        # The owner lock went while the start was being written.
                        handle.stop(StopReason.SHUTDOWN)
                    if started:
                        try:
                            await handle.kind.run(self._context(handle))
                            returned = True
                        except Exception as error:  # a kind's failure is the job's, not ours
                            raised = error
        finally:
            if not released:
                self._intake.release()
            if started:
                self.running -= 1
                handle.running = False
            retry_in = await self._write_final(handle, started, returned, raised)
        return retry_in

    async def _back_off(self, handle: JobHandle, delay: float) -> bool:
        """Wait ``delay`` as a queued job this daemon holds; False if stopped meanwhile.

        A cancel during the wait is written here (the job never started again); a
        drain leaves the row ``queued`` for the restart. The job holds an intake slot
        meanwhile (taken with the retry's write), like any job waiting to start.
        """
        handle.scope = trio.CancelScope()
        with handle.scope:
            if self._is_draining():
                handle.stop(StopReason.SHUTDOWN)
            await trio.sleep(delay)
        if handle.stop_reason is None:
            handle.scope = trio.CancelScope()  # a scope is entered once: the next attempt's
            return True
        self._intake.release()
        await self._write_final(handle, started=False, returned=False, raised=None)
        return False

    def _context(self, handle: JobHandle) -> RunningJob:
        async def save_checkpoint(handle: JobHandle) -> None:
            await self._writer.submit(Progress(handle.id, {
                "checkpoint": handle.checkpoint, "total": handle.total,
                "processed": handle.processed, "failed": handle.failed,
            }, owner=self.owner, attempt=handle.attempts))

        return RunningJob(handle, owner=self.owner, db=self._db, settings=self._settings,
                          metrics=self._metrics, progressed=self._progress.mark,
                          save_checkpoint=save_checkpoint, noted=self._note_soon)

    async def _write(self, change: Change, timeout: float = STATUS_WRITE_TIMEOUT_S) -> Row | None:
        """Shielded and bounded; ``None`` if the guard refused it.

        Raises ``trio.TooSlowError`` when the database did not answer in time.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            return await self._writer.submit(change)
        raise trio.TooSlowError(f"no answer within {timeout:g} s")

    async def _start(self, handle: JobHandle) -> bool:
        """The ``start`` transition; the job runs only if it committed."""
        attempt = handle.attempts + 1
        try:
            row = await self._write(Transition(handle.id, Event.START, {
                "started_at": now(), "attempts": attempt, "owner": self.owner, "error": None,
            }, owner=self.owner, attempt=handle.attempts))
        except Exception as error:
            log.error("job %d: could not be started (%s); it stays queued", handle.id, error)
            return False
        if row is None:
            log.warning("job %d: not started: its row is no longer queued for this daemon",
                        handle.id)
            return False
        handle.attempts = attempt
        handle.running = True
        self.running += 1
        handle.scope.deadline = trio.current_time() + handle.timeout_s
        return True

    async def _write_final(
        self, handle: JobHandle, started: bool, returned: bool, raised: Exception | None
    ) -> float | None:
        """Write how the attempt ended; the back-off to wait if it was requeued as a retry."""
        retry_in = self._retry_delay(handle, raised) if started else None
        transition = self._final_transition(handle, started, returned, raised, retry_in)
        if transition is None:
            return None
        if handle.noted:  # its notes first, so the log is complete when the status shows
            handle.noted = False
            with trio.CancelScope(shield=True), trio.move_on_after(NOTES_FLUSH_TIMEOUT_S):
                await self._notes_flushed()
        retrying = transition.event is Event.RETRY
        if retrying:  # waiting again from the moment the row says queued (/readyz, bound)
            self._intake.take_slot()
        row: Row | None = None
        try:
            row = await self._write_until_it_lands(transition)
        except Exception as error:
            log.error("job %d: final status %s not written (%s); the job stays as the table"
                      " has it and is requeued by the rescan or the next start", handle.id,
                      transition.event.value, error)
        else:
            if row is None and started:
                log.warning("job %d: final status not written: this attempt no longer holds"
                            " it", handle.id)
        if not retrying:
            handle.final_row = row
            return None
        if row is None:
            self._intake.release()
            return None
        return retry_in

    def _retry_delay(self, handle: JobHandle, raised: Exception | None) -> float | None:
        """The back-off before another attempt, if ``raised`` deserves one: it is
        transient, attempts remain, and the daemon is not draining."""
        if raised is None or self._is_draining() or not is_transient(raised):
            return None
        limits = self._settings.limits(handle.kind.name)
        policy = RetryPolicy(max_attempts=limits.max_attempts, base_s=RETRY_BASE_S,
                             cap_s=RETRY_CAP_S, jitter_floor=0.5)
        return policy.delay(handle.attempts)

    async def _write_until_it_lands(self, transition: Transition) -> Row | None:
        """A final status is retried with back-off through a database blip.

        The job's handle stays held meanwhile, so nothing else requeues it. Gives
        up (raising the last error) once the daemon has been draining for
        STATUS_WRITE_TIMEOUT_S, or after FINAL_WRITE_GIVE_UP_S in all: the crash
        path then applies (the rescan or the next start requeues the job).
        """
        delay = 0.1
        give_up_at = trio.current_time() + FINAL_WRITE_GIVE_UP_S
        while True:
            try:
                return await self._write(transition)
            except CommitterClosed:
                raise  # the supervisor is being torn down: no later try can land either
            except Exception as error:
                now_ = trio.current_time()
                if self._is_draining():
                    give_up_at = min(give_up_at, now_ + STATUS_WRITE_TIMEOUT_S)
                if now_ + delay >= give_up_at:
                    raise
                log.warning("job %d: final status %s not written yet (%s); retrying in %.1f s",
                            transition.job_id, transition.event.value, error, delay)
            with trio.CancelScope(shield=True):
                await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _final_transition(
        self, handle: JobHandle, started: bool, returned: bool, raised: Exception | None,
        retry_in: float | None = None,
    ) -> Transition | None:
        """What the lifecycle says this ending is, as a guarded transition (or nothing)."""
        if isinstance(raised, LostClaim):
            log.warning("%s; stopped", raised)
            return None
        if not started:
            if handle.stop_reason is not StopReason.CANCEL:
                return None  # shutdown (or a failed start) before it ran: it stays queued
            event = Event.CANCEL
        elif not (returned or raised or handle.scope.cancelled_caught):
            # Cancelled from outside its own scope: the supervisor itself is being
            # torn down. Treat it like a shutdown so the job runs again.
            event = Event.INTERRUPT
        else:
            event = lifecycle.event_for_ending(
                raised=raised is not None,
                cancelled=handle.scope.cancelled_caught,
                reason=handle.stop_reason,
                retryable=retry_in is not None,
            )
        target = lifecycle.target_of(event)
        values: dict[str, Any] = {
            "total": handle.total, "processed": handle.processed, "failed": handle.failed,
            "result": handle.result, "checkpoint": handle.checkpoint,
            "error": _error_text(event, handle, raised, retry_in),
            "finished_at": None if target is Status.QUEUED else now(),
        }
        if handle.commits_own_progress:  # committed with the kind's data, by the kind
            for name in ("processed", "failed", "checkpoint"):
                del values[name]
        if handle.cancel_requested_at is not None:
            values["cancel_requested_at"] = handle.cancel_requested_at
        if target is Status.QUEUED:
            del values["result"]
        if not started:  # a queued job, cancelled before it ran: only this daemon holds it
            return Transition(handle.id, event, values, owner=self.owner)
        return Transition(handle.id, event, values, owner=self.owner, attempt=handle.attempts)


def _error_text(
    event: Event, handle: JobHandle, raised: Exception | None, retry_in: float | None
) -> str | None:
    if event is Event.RETRY:
        assert raised is not None
        return (f"attempt {handle.attempts} failed on a transient error, tried again in "
                f"{retry_in or 0:.1f} s: {describe_failure(raised)}")
    if event is Event.TIME_OUT:
        return f"timed out after {handle.timeout_s:g} s (the job's time limit)"
    if event is Event.CANCEL:
        return "cancelled on request"
    if event is Event.INTERRUPT:
        return None
    if raised is not None:
        return describe_failure(raised)
    return None
