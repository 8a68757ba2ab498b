"""The supervisor: the one long-lived nursery that owns every background job.

::

    HTTP handler ──submit()──▶ INSERT (group commit) ──▶ memory channel ──▶ dispatcher
                                                                             │ start_soon
                                                                             ▼
                                              job nursery: one task per job, each
                                              inside its own CancelScope (deadline =
                                              the job's timeout), gated by its kind's
                                              CapacityLimiter

A handler only records the job and sends it into the channel; the job runs in
the supervisor's nursery, so the request finishing, failing or disconnecting
cannot touch it. Cancellation is per job: the registry maps a job id to its
handle, whose cancel scope is cancelled with a recorded reason (cancel, shutdown)
so the ending can be told apart from a timeout. Every final status write is
shielded, and the committers that perform it outlive the job nursery.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from . import lifecycle
from .batching import CommitterClosed, GroupCommitter
from .config import Settings
from .db import Database
from .db import jobs as jobsdb
from .errors import (  # noqa: F401  (re-exported for the HTTP layer)
    Draining,
    JobAlreadyFinished,
    JobConflict,
    JobNotFound,
    QueueFull,
    SupervisorError,
    UnknownKind,
)
from .kinds.base import JobKind, KindRegistry, ParamError
from .lifecycle import Event, Status, StopReason

log = logging.getLogger(__name__)

#: A final status write gives up after this long (a hung database must not hang
#: shutdown); the job then stays ``running`` in the table and is recovered at the
#: next start, which is the crash path and is safe.
FINAL_WRITE_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 5.0
#: How often reported progress counters reach the table (live status resolution).
PROGRESS_INTERVAL_S = 0.25
#: How often a daemon looks for cancel requests that other daemons recorded for its jobs.
REMOTE_CANCEL_POLL_S = 1.0
BACKLOG_PAGE = 500


@dataclass(eq=False)
class JobHandle:
    """A job this process holds in memory, from acceptance to its final write."""

    id: int
    kind: JobKind
    params: dict[str, Any]
    timeout_s: float
    attempts: int
    checkpoint: Any
    total: int | None
    processed: int
    failed: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: StopReason | None = None
    running: bool = False
    finished: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    cancel_requested_at: Any = None
    #: The kind commits processed/failed with its data (note_checkpoint): progress
    #: flushes then leave them alone, so a flush in flight never lands a stale
    #: count after a newer batch committed.
    commits_own_counters: bool = False
    #: The row as the final status write left it (None if it was not written).
    final_row: Any = None

    def stop(self, reason: StopReason) -> None:
        """Cancel the job's scope; the first reason given is the one that counts."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.scope.cancel()


class _Context:
    """The :class:`~nurseryd.kinds.base.JobContext` handed to a running kind."""

    def __init__(self, supervisor: Supervisor, handle: JobHandle) -> None:
        self._supervisor = supervisor
        self._handle = handle
        self.job_id = handle.id
        self.kind = handle.kind.name
        self.params = handle.params
        self.checkpoint = handle.checkpoint
        self.attempts = handle.attempts
        self.db = supervisor.db
        self.settings = supervisor.settings

    def report(
        self, *, total: int | None = None, processed: int | None = None, failed: int | None = None
    ) -> None:
        if total is not None:
            self._handle.total = total
        if processed is not None:
            self._handle.processed = processed
        if failed is not None:
            self._handle.failed = failed
        self._supervisor._progress_dirty.add(self._handle)

    async def save_checkpoint(self, checkpoint: Any) -> None:
        self.checkpoint = self._handle.checkpoint = checkpoint
        await self._supervisor._updates.submit(jobsdb.JobUpdate(self.job_id, {
            "checkpoint": checkpoint, "total": self._handle.total,
            "processed": self._handle.processed, "failed": self._handle.failed,
        }))

    async def commit_progress(
        self, conn: Any, checkpoint: Any, *, processed: int, failed: int
    ) -> None:
        self._handle.commits_own_counters = True
        await jobsdb.commit_progress_in(conn, self.job_id, self._supervisor.owner,
                                        self._handle.attempts, checkpoint, processed, failed)

    def set_result(self, result: Any) -> None:
        self._handle.result = result


class Supervisor:
    """Owns the job nursery, the channel, the dispatcher, the registry and the drain."""

    def __init__(self, db: Database, settings: Settings, kinds: KindRegistry, owner: str) -> None:
        self.db = db
        self.settings = settings
        self.kinds = kinds
        self.owner = owner
        self.registry: dict[int, JobHandle] = {}
        self._send, self._receive = trio.open_memory_channel[JobHandle](settings.queue_size)
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._waiting = 0  # accepted, not yet running (bounded by queue_size)
        self._running = 0
        self._draining = False
        self._stop_requested = trio.Event()
        self._grace_scope: trio.CancelScope | None = None
        self._force = False
        self._job_ended = trio.Event()
        self._backlog_lock = trio.Lock()
        #: Jobs whose counters changed since the last progress flush.
        self._progress_dirty: set[JobHandle] = set()
        self._inserts: GroupCommitter[jobsdb.NewJob, Any] = GroupCommitter(
            "job inserts", lambda batch: jobsdb.insert_jobs(db, batch)
        )
        self._updates: GroupCommitter[jobsdb.JobUpdate, Any] = GroupCommitter(
            "job updates", lambda batch: jobsdb.apply_updates(db, batch)
        )

    # -- observing ----------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def counts(self) -> dict[str, int]:
        return {"running": self._running, "queued": self._waiting}

    # -- the nursery --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_stop`, then drain; returns when no job is left.

        The committers live in the outer nursery and are closed only after the job
        nursery has exited, so every shielded final write has a writer to go to.
        """
        async with trio.open_nursery() as services:
            services.start_soon(self._inserts.run)
            services.start_soon(self._updates.run)
            adopted = await jobsdb.adopt_orphans(self.db, self.owner)
            if adopted:
                log.info("adopted %d unfinished job(s) from earlier runs", adopted)
            async with trio.open_nursery() as periodic:
                periodic.start_soon(self._heartbeat)
                periodic.start_soon(self._flush_progress)
                periodic.start_soon(self._watch_cancel_requests)
                async with trio.open_nursery() as jobs:
                    jobs.start_soon(self._dispatch, jobs)
                    jobs.start_soon(self._feed_backlog)
                    task_status.started()
                    await self._stop_requested.wait()
                    await self._drain()
                periodic.cancel_scope.cancel()
            self._inserts.close()
            self._updates.close()

    def request_stop(self) -> None:
        """Begin the drain: no intake, grace for running jobs, then cancel the rest.

        A second call ends the grace period at once.
        """
        if self._stop_requested.is_set():
            self._force = True
            if self._grace_scope is not None:
                self._grace_scope.cancel()
            return
        self._draining = True
        self._stop_requested.set()

    async def _drain(self) -> None:
        for handle in list(self.registry.values()):
            if not handle.running:
                handle.stop(StopReason.SHUTDOWN)  # stays queued; runs after restart
        with trio.move_on_after(self.settings.shutdown_grace) as self._grace_scope:
            if self._force:
                self._grace_scope.cancel()
            while self._running:
                await self._job_ended.wait()
        for handle in list(self.registry.values()):
            handle.stop(StopReason.SHUTDOWN)
        self._send.close()

    async def _dispatch(self, jobs: trio.Nursery) -> None:
        """Start every ready job, draining the channel without a pass per job.

        ``receive()`` costs a scheduler pass per item; under load that falls behind
        intake (measured: 15k accepted vs 3.7k started after 10 s). After one
        blocking receive we take everything already buffered with ``receive_nowait``.
        """
        async with self._receive:
            async for handle in self._receive:
                jobs.start_soon(self._run_job, handle, name=f"job-{handle.id}")
                while True:
                    try:
                        handle = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    jobs.start_soon(self._run_job, handle, name=f"job-{handle.id}")

    async def _feed_backlog(self) -> None:
        """Load queued jobs of this owner (adopted at start) page by page."""
        after_id = 0
        while not self._draining:
            async with self._backlog_lock:
                rows = await jobsdb.queued_for(
                    self.db, self.owner, after_id, min(BACKLOG_PAGE, self.settings.queue_size)
                )
                handles = []
                for row in rows:
                    after_id = row["id"]
                    kind = self.kinds.get(row["kind"])
                    if kind is None or row["id"] in self.registry:
                        if kind is None:
                            log.error("job %d has unknown kind %r; left queued", row["id"],
                                      row["kind"])
                        continue
                    handles.append(self._register(row, kind))
            if not rows:
                return
            for handle in handles:
                self._waiting += 1
                try:
                    await self._send.send(handle)
                except trio.ClosedResourceError:  # the drain closed intake: stays queued
                    self._waiting -= 1
                    return
            while self._waiting >= self.settings.queue_size and not self._draining:
                await self._job_ended.wait()

    async def _flush_progress(self) -> None:
        """Write changed counters at most every PROGRESS_INTERVAL_S, all jobs in one batch.

        A kind may report after every row; the table sees at most a few updates
        per second per job, and the final status write carries the exact values.
        """
        while True:
            await trio.sleep(PROGRESS_INTERVAL_S)
            dirty, self._progress_dirty = self._progress_dirty, set()
            for handle in dirty:
                if handle.id in self.registry and not handle.finished.is_set():
                    values: dict[str, Any] = {"total": handle.total}
                    if not handle.commits_own_counters:
                        values.update(processed=handle.processed, failed=handle.failed)
                    self._write_soon(jobsdb.JobUpdate(handle.id, values))

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL_S)
            running = [handle.id for handle in self.registry.values() if handle.running]
            if running:
                try:
                    await jobsdb.heartbeat(self.db, running)
                except Exception as error:
                    log.warning("heartbeat failed: %s", error)

    # -- intake ---------------------------------------------------------------------------

    async def submit(
        self, kind_name: str, params: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Validate, record durably, enqueue; returns the job as JSON.

        The queue slot is reserved *before* the insert, so a full queue is refused
        before anything is written: no job is ever left recorded half-way.
        """
        kind = self.kinds.get(kind_name)
        if kind is None:
            raise UnknownKind(kind_name, self.kinds.names())
        parsed = kind.parse_params(params)
        timeout = self.resolve_timeout(kind_name, timeout_s)
        if self._draining:
            raise Draining()
        if self._waiting >= self.settings.queue_size:
            raise QueueFull(self.settings.queue_size)
        self._waiting += 1
        try:
            row = await self._inserts.submit(
                jobsdb.NewJob(kind_name, parsed, timeout, self.owner)
            )
        except BaseException:
            self._waiting -= 1
            raise
        if row is None:
            self._waiting -= 1
            raise JobConflict(kind_name)
        handle = self._register(row, kind)
        try:
            self._send.send_nowait(handle)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # Draining began while we inserted: the job is durably queued and
            # resumes after the restart; it just does not run in this process.
            self._waiting -= 1
            del self.registry[handle.id]
        return jobsdb.job_json(row)

    def resolve_timeout(self, kind_name: str, timeout_s: Any) -> float:
        limits = self.settings.limits(kind_name)
        if timeout_s is None:
            return limits.default_timeout_s
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
            raise ParamError("timeout_s", f"expected a number of seconds, got {timeout_s!r}")
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ParamError("timeout_s", "must be a number of seconds > 0")
        if timeout_s > limits.max_timeout_s:
            raise ParamError(
                "timeout_s", f"at most {limits.max_timeout_s:g} s for {kind_name} jobs"
            )
        return float(timeout_s)

    def _register(self, row: Mapping[str, Any], kind: JobKind) -> JobHandle:
        handle = JobHandle(
            id=row["id"], kind=kind, params=row["params"], timeout_s=row["timeout_s"],
            attempts=row["attempts"], checkpoint=row["checkpoint"], total=row["total"],
            processed=row["processed"], failed=row["failed"],
        )
        self.registry[handle.id] = handle
        return handle

    # -- cancellation ---------------------------------------------------------------------

    async def cancel(self, job_id: int, *, wait_s: float = 5.0) -> dict[str, Any]:
        """Cancel a queued or running job; returns it once it has stopped (or after
        ``wait_s``, with ``cancel_requested_at`` set, if it is slow to stop)."""
        handle = self.registry.get(job_id)
        if handle is None:
            async with self._backlog_lock:  # the backlog feeder must not load it meanwhile
                handle = self.registry.get(job_id)
                if handle is None:
                    row = await jobsdb.cancel_queued(self.db, job_id, self.owner)
                    if row is not None:
                        return jobsdb.job_json(row)
            if handle is None:
                return await self._cancel_elsewhere(job_id, wait_s)
        if handle.cancel_requested_at is None:
            handle.cancel_requested_at = jobsdb.now()
        handle.stop(StopReason.CANCEL)
        with trio.move_on_after(wait_s):
            await handle.finished.wait()
        if handle.final_row is not None:
            return jobsdb.job_json(handle.final_row)
        if not handle.finished.is_set():  # slow to stop: record the request meanwhile
            await self._updates.submit(jobsdb.JobUpdate(
                job_id, {"cancel_requested_at": handle.cancel_requested_at}))
        job = await self.get_job(job_id)
        assert job is not None
        return job

    async def _cancel_elsewhere(self, job_id: int, wait_s: float) -> dict[str, Any]:
        """Cancel a job this process does not hold: it runs in another daemon that
        shares the database. The request goes through the row; the owner's
        :meth:`_watch_cancel_requests` acts on it within REMOTE_CANCEL_POLL_S."""
        job = await self.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if Status(job["status"]).is_terminal:
            raise JobAlreadyFinished(job)
        await jobsdb.request_cancel(self.db, job_id)

        async def stopped() -> dict[str, Any] | None:
            current = await self.get_job(job_id)
            return current if current and Status(current["status"]).is_terminal else None

        # The other daemon's final write is only visible in the table: ask again.
        with trio.move_on_after(wait_s):
            while (done := await stopped()) is None:  # noqa: ASYNC110 - another process
                await trio.sleep(REMOTE_CANCEL_POLL_S / 4)
            return done
        refreshed = await self.get_job(job_id)
        assert refreshed is not None
        return refreshed

    async def _watch_cancel_requests(self) -> None:
        """Act on cancel requests recorded in the table by another daemon."""
        while True:
            await trio.sleep(REMOTE_CANCEL_POLL_S)
            held = [handle.id for handle in self.registry.values() if handle.stop_reason is None]
            if not held:
                continue
            try:
                requested = await jobsdb.cancel_requests_among(self.db, held)
            except Exception as error:
                log.warning("checking for cancel requests failed: %s", error)
                continue
            for job_id, requested_at in requested:
                handle = self.registry.get(job_id)
                if handle is not None:
                    log.info("job %d: cancel requested through another daemon", job_id)
                    handle.cancel_requested_at = requested_at
                    handle.stop(StopReason.CANCEL)

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        row = await jobsdb.get_job(self.db, job_id)
        return None if row is None else jobsdb.job_json(row)

    # -- running one job ------------------------------------------------------------------

    def _limiter(self, kind: str) -> trio.CapacityLimiter:
        if kind not in self._limiters:
            self._limiters[kind] = trio.CapacityLimiter(self.settings.limits(kind).concurrency)
        return self._limiters[kind]

    def _write_soon(self, update: jobsdb.JobUpdate) -> None:
        try:
            self._updates.submit_nowait(update)
        except CommitterClosed:
            log.warning("job %d: update after the writer closed was dropped", update.job_id)

    async def _run_job(self, handle: JobHandle) -> None:
        raised: Exception | None = None
        started = returned = False
        try:
            with handle.scope:
                if self._draining:
                    handle.stop(StopReason.SHUTDOWN)
                async with self._limiter(handle.kind.name):
                    if self._draining:
                        handle.stop(StopReason.SHUTDOWN)
                        await trio.lowlevel.checkpoint()
                    started = True
                    self._waiting -= 1
                    await self._start(handle)
                    try:
                        await handle.kind.run(_Context(self, handle))
                        returned = True
                    except Exception as error:  # a kind's failure is the job's, not ours
                        raised = error
        finally:
            if not started:
                self._waiting -= 1
            else:
                self._running -= 1
                handle.running = False
            try:
                # Shielded, so the cancellation that ended the job cannot also eat its
                # status; with a deadline of its own, so a hung database cannot hang
                # the shutdown (the job is then recovered at the next start).
                final_write = trio.CancelScope(
                    shield=True, deadline=trio.current_time() + FINAL_WRITE_TIMEOUT_S)
                with final_write:
                    await self._finish(handle, started, returned, raised)
                if final_write.cancelled_caught:
                    log.error("job %d: final status write timed out; recovered at next start",
                              handle.id)
            finally:
                self.registry.pop(handle.id, None)
                handle.finished.set()
                self._job_ended.set()
                self._job_ended = trio.Event()

    async def _start(self, handle: JobHandle) -> None:
        handle.running = True
        self._running += 1
        handle.attempts += 1
        handle.scope.deadline = trio.current_time() + handle.timeout_s
        await self._updates.submit(jobsdb.JobUpdate(handle.id, {
            "status": Status.RUNNING.value, "started_at": jobsdb.now(),
            "attempts": handle.attempts, "owner": self.owner, "error": None,
        }))

    async def _finish(
        self, handle: JobHandle, started: bool, returned: bool, raised: Exception | None
    ) -> None:
        if not started:
            if handle.stop_reason is not StopReason.CANCEL:
                return  # shutdown before it ran: it simply stays queued
            event, status = Event.CANCEL, lifecycle.next_status(Status.QUEUED, Event.CANCEL)
        elif not (returned or raised or handle.scope.cancelled_caught):
            # Cancelled from outside its own scope: the supervisor itself is being
            # torn down. Treat it like a shutdown so the job runs again.
            event, status = Event.INTERRUPT, Status.QUEUED
        else:
            event = lifecycle.event_for_ending(
                raised=raised is not None,
                cancelled=handle.scope.cancelled_caught,
                reason=handle.stop_reason,
            )
            status = lifecycle.next_status(Status.RUNNING, event)
        values: dict[str, Any] = {
            "status": status.value, "total": handle.total, "processed": handle.processed,
            "failed": handle.failed, "result": handle.result, "checkpoint": handle.checkpoint,
            "error": _error_text(event, handle, raised),
            "finished_at": None if status is Status.QUEUED else jobsdb.now(),
        }
        if handle.commits_own_counters:  # committed with the kind's data, by the kind
            for name in ("processed", "failed", "checkpoint"):
                del values[name]
        if handle.cancel_requested_at is not None:
            values["cancel_requested_at"] = handle.cancel_requested_at
        if status is Status.QUEUED:
            del values["result"]
        if event is Event.FAIL:
            log.warning("job %d (%s) failed: %s", handle.id, handle.kind.name, values["error"])
        try:
            handle.final_row = await self._updates.submit(jobsdb.JobUpdate(handle.id, values))
        except Exception as error:
            log.error("job %d: final status %s not written (%s); it will be recovered"
                      " at the next start", handle.id, status.value, error)


def _error_text(event: Event, handle: JobHandle, raised: Exception | None) -> str | None:
    if event is Event.TIME_OUT:
        return f"timed out after {handle.timeout_s:g} s (the job's time limit)"
    if event is Event.CANCEL:
        return "cancelled on request"
    if event is Event.INTERRUPT:
        return None
    if raised is not None:
        return str(raised) or type(raised).__name__
    return None
