"""The supervisor: the one long-lived nursery that owns every background job.

::

    HTTP handler ──submit()──▶ INSERT (group commit) ──▶ memory channel ──▶ dispatcher
                          │   (a free slot here: the fast path)  ▲           │ start_soon
                          │                                      │ claim     ▼
                          └─▶ INSERT with no owner ──▶ table ────┘   job nursery: one task
                              (no free slot, or a cluster-wide       per job, each inside its
                              limit: any daemon with a free slot     own CancelScope (deadline
                              claims it, woken by NOTIFY)            = the job's timeout), gated
                                                                     by its kind's limiter

A handler only records the job and sends it into the channel; the job runs in
the supervisor's nursery, so the request finishing, failing or disconnecting
cannot touch it. This class only composes the parts, each in its own module:
:mod:`.intake` (slots and the channel), :mod:`.runner` (one job, its start and
final write), :mod:`.drain` (grace, then cancel), :mod:`.watchers` (progress
flushes, cancel requests from other daemons, cluster notifications),
:mod:`.claimer` (jobs nobody holds, from the table) and :mod:`.held` (what a free
slot is). Every write goes through the :class:`~nurseryd.store.base.JobStore` it
is given, so the whole supervisor runs on the in-memory store in unit tests,
several supervisors on one store being a cluster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..batching import CommitterClosed, GroupCommitter
from ..errors import (
    DatabaseUnavailable,
    Draining,
    JobAlreadyFinished,
    JobConflict,
    JobNotFound,
    JobNotRetryable,
    ParamError,
    UnknownKind,
)
from ..kinds.base import JobKind, KindRegistry
from ..lifecycle import ACTIVE, Event, Status, StopReason, statuses_allowing
from ..observe.metrics import Metrics
from ..store.base import (
    Change,
    ClusterSignals,
    JobNote,
    JobStore,
    NewJob,
    Progress,
    Row,
    check_storable,
    job_json,
    now,
)
from .claimer import Backlog, Claimer
from .drain import Drain
from .handle import JobHandle
from .held import HeldJobs
from .intake import Intake
from .runner import JobRunner
from .stats import SupervisorStatistics
from .watchers import ProgressFlusher, listen_for_peers, watch_cancel_requests

if TYPE_CHECKING:
    from ..config import Settings
    from ..db import Database

log = logging.getLogger("nurseryd.supervisor")

#: How often reported progress counters reach the table (live status resolution).
PROGRESS_INTERVAL_S = 0.25
#: How often a daemon looks for cancel requests that other daemons recorded for its jobs.
REMOTE_CANCEL_POLL_S = 1.0
BACKLOG_PAGE = 500
#: How often the table is scanned for work nothing holds: owners that are not
#: members (jobs of older versions), this daemon's queued rows with no handle,
#: its running rows with no handle.
RESCAN_S = 5.0
#: How often the cluster's members are checked for one whose owner lock is free.
MEMBER_SCAN_S = 0.5
#: A member's lock must be seen free in every scan for this long before its jobs
#: are released: a daemon that only lost its lock connection notices within
#: ``owner_lock.WATCH_INTERVAL_S`` plus one bounded check (2 s) and stops its jobs
#: first, so they never run twice at once. A SIGKILLed daemon's jobs are claimable
#: again ~2.5-3 s after its death.
TAKEOVER_CONFIRM_S = 2.5
#: Leaving the cluster at a clean stop is given up after this long (the peers then
#: release our jobs as a dead member's).
LEAVE_TIMEOUT_S = 5.0
#: A submission gives up (503) when recording the job takes longer than this.
SUBMIT_TIMEOUT_S = 10.0


class Supervisor:
    """Owns the job nursery and composes intake, runner, drain and watchers."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        kinds: KindRegistry,
        owner: str,
        *,
        store: JobStore | None = None,
        work_db: Database | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if store is None:
            from ..db.jobs import PostgresJobStore

            store = PostgresJobStore(db)
        self.db = db
        self.settings = settings
        self.kinds = kinds
        self.owner = owner
        self.store = store
        #: What kinds count through ``ctx.metrics`` (a registry of its own if none is given).
        self.metrics = metrics or Metrics(kinds.names())
        self.registry = HeldJobs(lambda kind: settings.limits(kind).concurrency)
        self.inserts: GroupCommitter[NewJob, Row | None] = GroupCommitter(
            "job inserts", store.insert)
        self._writer: GroupCommitter[Change, Row | None] = GroupCommitter(
            "job updates", store.apply)
        #: Kinds' notes for their jobs' logs: written apart from status changes, so
        #: a chatty kind never delays a final status write.
        self._notes: GroupCommitter[JobNote, None] = GroupCommitter(
            "job notes", store.add_notes, max_batch=500)
        self._intake = Intake(settings.queue_size)
        self._drain = Drain(settings.shutdown_grace)
        self._progress = ProgressFlusher(owner, self._write_soon, PROGRESS_INTERVAL_S)
        self._runner = JobRunner(
            owner=owner, db=work_db or db, settings=settings, writer=self._writer,
            intake=self._intake,
            registry=self.registry, progress=self._progress,
            is_draining=lambda: self._drain.draining, wait_for_claim=self._wait_for_claim,
            claim_held=lambda: self._claim_held.is_set(), metrics=self.metrics,
            note_soon=self._note_soon, notes_flushed=self._notes.flushed,
        )
        self._claim_held = trio.Event()
        self._claim_held.set()
        self._backlog_lock = trio.Lock()
        cluster = settings.cluster
        self.claimer = Claimer(
            store=store, owner=owner, kinds=kinds, held=self.registry, intake=self._intake,
            register=self._register, lock=self._backlog_lock,
            may_claim=lambda: not self.draining and self._claim_held.is_set(),
            cluster_limits={name: limits.cluster_concurrency
                            for name in kinds.names()
                            if (limits := settings.limits(name)).cluster_concurrency},
            poll_s=cluster.claim_poll_s)
        self.registry.on_freed = self.claimer.freed
        self._backlog = Backlog(store, cluster.backlog)
        self._cancel_waiters: dict[int, trio.Event] = {}
        self.signals = ClusterSignals(
            claimable=self.claimer.claimable, slot_freed=self.claimer.slot_freed,
            cancel=self._cancel_requested, cancel_done=self._cancel_done)

    # -- observing ----------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._drain.draining

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(running=self._runner.running, queued=self._intake.waiting,
                                    held=len(self.registry), draining=self.draining)

    @property
    def counts(self) -> dict[str, int]:
        stats = self.statistics()
        return {"running": stats.running, "queued": stats.queued}

    # -- the nursery --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_stop`, then drain; returns when no job is left.

        The committers live in the outer nursery and are closed only after the job
        nursery has exited, so every shielded final write has a writer to go to.
        """
        async with trio.open_nursery() as services:
            services.start_soon(self.inserts.run)
            services.start_soon(self._writer.run)
            services.start_soon(self._notes.run)
            await self.store.join(self.owner)
            released = await self.store.release_orphans(self.owner)
            if released:
                log.info("adopted %d unfinished job(s) from earlier runs: claimable again, for"
                         " whichever daemon has a free slot (this one first)", released)
            async with trio.open_nursery() as periodic:
                periodic.start_soon(self._progress.run)
                periodic.start_soon(watch_cancel_requests, self.store, self.registry,
                                    REMOTE_CANCEL_POLL_S)
                periodic.start_soon(listen_for_peers, self.store, self.signals,
                                    self._listening)
                periodic.start_soon(self.claimer.run)
                periodic.start_soon(self._watch_members)
                periodic.start_soon(self._rescue)
                async with trio.open_nursery() as jobs:
                    jobs.start_soon(self._dispatch, jobs)
                    task_status.started()
                    await self._drain.requested.wait()
                    await self._drain.run(lambda: self.registry.values(),
                                          lambda: self._runner.running,
                                          self._runner.wait_job_ended)
                    self._intake.close()
                periodic.cancel_scope.cancel()
            await self._leave()
            self.inserts.close()
            self._writer.close()
            self._notes.close()

    async def _leave(self) -> None:
        """Nothing of ours runs any more: our queued jobs become claimable for the
        peers at once (instead of after our lock frees and a takeover confirms)."""
        with trio.CancelScope(shield=True), trio.move_on_after(LEAVE_TIMEOUT_S):
            try:
                await self.store.leave(self.owner)
            except Exception as error:
                log.warning("leaving the cluster failed (%s); peers release our queued "
                            "jobs once our lock is free", error)

    def _listening(self, up: bool) -> None:
        self.claimer.listening = up
        if up:  # what became claimable while nobody listened
            self.claimer.look_again()

    # -- the owner lock ------------------------------------------------------------------

    def claim_lost(self) -> None:
        """The owner lock is gone: a peer may take our jobs. Stop every running job
        (each goes back to ``queued``, a write guarded by owner and attempt, so
        nothing lands if a peer took it first) and start none until
        :meth:`claim_regained`."""
        if self._claim_held.is_set():
            self._claim_held = trio.Event()
        for handle in list(self.registry.values()):
            if handle.running:
                handle.stop(StopReason.SHUTDOWN)

    def claim_regained(self) -> None:
        """The lock is ours again: jobs may start; the rescan finds what was requeued."""
        self._claim_held.set()

    async def _wait_for_claim(self) -> None:
        await self._claim_held.wait()

    def request_stop(self) -> None:
        """Begin the drain: no intake, grace for running jobs, then cancel the rest.

        A second call ends the grace period at once.
        """
        self._intake.stop_accepting()
        self._drain.request()

    async def _dispatch(self, jobs: trio.Nursery) -> None:
        """Start every ready job, draining the channel without a pass per job.

        ``receive()`` costs a scheduler pass per item; under load that falls behind
        intake (measured: 15k accepted vs 3.7k started after 10 s). After one
        blocking receive we take everything already buffered with ``receive_nowait``.
        """
        receive = self._intake.receive
        async with receive:
            async for handle in receive:
                jobs.start_soon(self._runner.run, handle, name=f"job-{handle.id}")
                while True:
                    try:
                        handle = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    jobs.start_soon(self._runner.run, handle, name=f"job-{handle.id}")

    async def _watch_members(self) -> None:
        """Every MEMBER_SCAN_S: a member whose lock has been free in every scan for
        TAKEOVER_CONFIRM_S is dead; its unfinished jobs become claimable (running
        ones through ``recover``), and every daemon with free slots claims them,
        resuming each from its checkpoint."""
        free_since: dict[str, float] = {}
        while not self.draining:
            await trio.sleep(MEMBER_SCAN_S)
            if not self._claim_held.is_set():
                continue  # our own lock is away: we may be the one cut off
            try:
                dead = await self.store.dead_members(self.owner)
                now_ = trio.current_time()
                free_since = {member: free_since.get(member, now_) for member in dead}
                confirmed = sorted(member for member, since in free_since.items()
                                   if now_ - since >= TAKEOVER_CONFIRM_S)
                if confirmed:
                    released = await self.store.release_orphans(self.owner, confirmed)
                    for member in confirmed:
                        free_since.pop(member, None)
                    log.warning("daemon(s) %s stopped holding their lock; %d unfinished "
                                "job(s) of theirs are claimable again", ", ".join(confirmed),
                                released, extra={"event": "takeover", "jobs": released})
                    self.claimer.look_again()
            except Exception as error:
                log.warning("checking the cluster's members failed (%s)", error)

    async def _rescue(self) -> None:
        """The table is the truth, the channel a shortcut: find what nothing holds.

        At start and then every RESCAN_S: release the unfinished jobs of owners that
        died without being members (an older version's rows; members are
        :meth:`_watch_members`' business), requeue this daemon's ``running`` rows
        that no handle holds (a final write that never landed), and load this
        daemon's queued rows that have no handle (a submission whose hand-off was
        lost). A database error skips one round; it never stops the daemon.
        """
        first = True
        suspects: set[str] = set()
        while not self.draining:
            try:
                if not first and self._claim_held.is_set():
                    # An owner's lock must be found free in two scans in a row: by then
                    # an owner that only lost its lock connection has noticed (it checks
                    # every second) and stopped its jobs, so they never run twice.
                    dead = await self.store.dead_owners(self.owner)
                    confirmed, suspects = dead & suspects, dead - suspects
                    released = await self.store.release_orphans(self.owner, sorted(confirmed))
                    if released:
                        log.info("%d unfinished job(s) of a daemon that stopped are "
                                 "claimable again", released)
                        self.claimer.look_again()
                    recovered = await self.store.recover_own(self.owner, list(self.registry))
                    if recovered:
                        log.warning("requeued %d running job(s) of ours that nothing held",
                                    recovered)
                await self._feed_backlog()
            except Exception as error:
                log.warning("scanning for unheld jobs failed (%s); next try in %g s",
                            error, RESCAN_S)
            first = False
            await trio.sleep(RESCAN_S)

    async def _feed_backlog(self) -> None:
        """Load this owner's queued jobs that nothing holds, page by page."""
        after_id = 0
        while not self.draining:
            async with self._backlog_lock:
                rows = await self.store.queued_for(
                    self.owner, after_id, min(BACKLOG_PAGE, self.settings.queue_size))
                handles = []
                for row in rows:
                    after_id = row["id"]
                    kind = self.kinds.get(row["kind"])
                    if kind is None:
                        log.error("job %d has unknown kind %r; left queued", row["id"],
                                  row["kind"])
                    elif row["id"] not in self.registry:
                        handles.append(self._register(row, kind))
            if not rows:
                return
            for handle in handles:
                self._intake.take_slot()
                if not await self._intake.send(handle):  # the drain closed intake
                    self._intake.release()
                    return
            await self._intake.wait_for_room()

    def _note_soon(self, note: JobNote) -> None:
        try:
            self._notes.submit_nowait(note)
        except CommitterClosed:
            log.warning("job %d: a note after the writer closed was dropped", note.job_id)

    def _write_soon(self, change: Progress) -> None:
        try:
            self._writer.submit_nowait(change)
        except CommitterClosed:
            log.warning("job %d: update after the writer closed was dropped", change.job_id)

    # -- intake ---------------------------------------------------------------------------

    async def submit(
        self, kind_name: str, params: Mapping[str, Any], *, timeout_s: float | None = None,
        submitted_by: str | None = None,
    ) -> dict[str, Any]:
        """Validate, record durably, enqueue; returns the job as JSON.

        ``submitted_by`` is the name of the caller's token, recorded with the job.

        The queue slot is reserved *before* the insert, so a full queue is refused
        before anything is written: no job is ever left recorded half-way.
        """
        kind = self.kinds.get(kind_name)
        if kind is None:
            raise UnknownKind(kind_name, self.kinds.names())
        parsed = kind.parse_params(params)
        check_storable(parsed)
        timeout = self.resolve_timeout(kind_name, timeout_s)

        def record(owner: str | None) -> Awaitable[Row | None]:
            return self.inserts.submit(NewJob(kind_name, parsed, timeout, owner, submitted_by))

        row = await self._record_and_hand_off(kind, record, "recording the job")
        if row is None:
            raise JobConflict(kind_name)
        return job_json(row)

    async def rerun(self, job_id: int) -> dict[str, Any]:
        """Queue an ended job (failed, cancelled, timed out) again, here; it resumes
        from its checkpoint. Like :meth:`submit`: a slot first, then the write."""
        job = await self.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if Status(job["status"]) not in statuses_allowing(Event.RERUN):
            raise JobNotRetryable(job, f"it is {job['status']}; only failed, cancelled or "
                                  "timed_out jobs run again")
        kind = self.kinds.get(job["kind"])
        if kind is None:
            raise JobNotRetryable(job, f"this daemon does not run {job['kind']} jobs")
        blocker = kind.rerun_blocker and kind.rerun_blocker(job["params"], self.settings)
        if blocker:
            raise JobNotRetryable(job, blocker)
        row = await self._record_and_hand_off(
            kind, partial(self.store.rerun, job_id), "queueing the job again")
        if row is None:  # it changed meanwhile (another retry won)
            current = await self.get_job(job_id)
            raise JobNotRetryable(current or job, "it was retried or changed meanwhile")
        return job_json(row)

    def _runs_here(self, kind: JobKind) -> bool:
        """The fast path: hold the job ourselves? Always, unless its kind has a
        cluster-wide limit (only a claim may take it) or the queue is shared and
        we have no free slot for its kind (then the table holds it for whoever has)."""
        if self.settings.limits(kind.name).cluster_concurrency is not None:
            return False
        if not self.settings.cluster.shared_queue:
            return True
        return (self.registry.free(kind.name) > 0
                and self._intake.waiting < self._intake.queue_size)

    async def _record_and_hand_off(
        self, kind: JobKind, write: Callable[[str | None], Awaitable[Row | None]], what: str
    ) -> Row | None:
        """Take a queue slot, make ``write`` record the job for this daemon, then hold
        it and send it to the dispatcher; ``None`` (slot freed) when ``write``
        recorded nothing. Or, when it does not run here (:meth:`_runs_here`), record
        it claimable: the claimers (ours first) take it from the table.

        The slot comes *before* the write, so a full queue is refused before
        anything is written. The write is shielded from the request: a client
        that disconnects once it is on its way must not leave a committed job
        that nothing holds. It is bounded, so a hung database answers 503 instead
        of hanging the request (the rescan picks up the job should the write
        commit after all).
        """
        if not self._runs_here(kind):
            return await self._record_claimable(kind, write, what)
        self._intake.reserve()
        self.registry.reserve(kind.name)
        try:
            with trio.CancelScope(shield=True) as recording:
                recording.deadline = trio.current_time() + SUBMIT_TIMEOUT_S
                try:
                    row = await write(self.owner)
                except BaseException:
                    self._intake.release()
                    raise
        finally:
            self.registry.unreserve(kind.name)
        if recording.cancelled_caught:
            self._intake.release()
            raise DatabaseUnavailable(what)
        if row is None:
            self._intake.release()
            return None
        if row["id"] in self.registry:
            # The backlog scan found the committed row first and holds it (with a
            # slot of its own): one handle per job, or it would run twice.
            self._intake.release()
            return row
        handle = self._register(row, kind)
        if not self._intake.hand_off(handle):
            # Draining began while we wrote: the job is durably queued and resumes
            # after the restart; it just does not run in this process.
            self._intake.release()
            del self.registry[handle.id]
        return row

    async def _record_claimable(
        self, kind: JobKind, write: Callable[[str | None], Awaitable[Row | None]], what: str
    ) -> Row | None:
        """Record the job with no owner (bounded by ``cluster.backlog``); our own
        claimer looks at once, the peers' are woken by the insert's NOTIFY."""
        if not self._intake.accepting:
            raise Draining()
        await self._backlog.check()
        with trio.CancelScope(shield=True) as recording:
            recording.deadline = trio.current_time() + SUBMIT_TIMEOUT_S
            row = await write(None)
        if recording.cancelled_caught:
            raise DatabaseUnavailable(what)
        if row is not None:
            self._backlog.added()
            self.claimer.claimable(kind.name)
        return row

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

    def _register(self, row: Row, kind: JobKind) -> JobHandle:
        handle = JobHandle.from_row(row, kind)
        self.registry[handle.id] = handle
        if row["cancel_requested_at"] is not None:  # asked while nobody held it
            handle.cancel_requested_at = row["cancel_requested_at"]
            handle.stop(StopReason.CANCEL)
        return handle

    # -- what other daemons tell us --------------------------------------------------------

    def _cancel_requested(self, job_id: int) -> None:
        """A cancel request (NOTIFY): stop the job if we hold it. The request may
        come from us (we asked for a job a peer held): then we hold nothing."""
        handle = self.registry.get(job_id)
        if handle is not None and handle.stop_reason is None:
            log.info("job %d: cancel requested through another daemon", job_id)
            handle.cancel_requested_at = now()
            handle.stop(StopReason.CANCEL)

    def _cancel_done(self, job_id: int) -> None:
        waiter = self._cancel_waiters.pop(job_id, None)
        if waiter is not None:
            waiter.set()

    # -- cancellation ---------------------------------------------------------------------

    async def cancel(self, job_id: int, *, wait_s: float = 5.0,
                     cancelled_by: str | None = None) -> dict[str, Any]:
        """Cancel a queued or running job; returns it once it has stopped (or after
        ``wait_s``, with ``cancel_requested_at`` set, if it is slow to stop).

        ``cancelled_by`` (the caller's token name) is recorded by the first request
        to cancel the job, before the job is stopped, so its final row carries it.
        """
        handle = self.registry.get(job_id)
        if handle is None:
            async with self._backlog_lock:  # the backlog feeder must not load it meanwhile
                handle = self.registry.get(job_id)
                if handle is None:
                    row = await self.store.cancel_queued(job_id, self.owner, cancelled_by)
                    if row is not None:
                        return job_json(row)
            if handle is None:
                return await self._cancel_elsewhere(job_id, wait_s, cancelled_by)
        if handle.cancel_requested_at is None:
            handle.cancel_requested_at = now()
            if cancelled_by is not None:
                await self._writer.submit(Progress(job_id, {"cancelled_by": cancelled_by},
                                                   statuses=ACTIVE))
        handle.stop(StopReason.CANCEL)
        with trio.move_on_after(wait_s):
            await handle.finished.wait()
        if handle.final_row is not None:
            return job_json(handle.final_row)
        if not handle.finished.is_set():  # slow to stop: record the request meanwhile
            await self._writer.submit(Progress(
                job_id, {"cancel_requested_at": handle.cancel_requested_at}, statuses=ACTIVE))
        job = await self.get_job(job_id)
        assert job is not None
        return job

    async def _cancel_elsewhere(self, job_id: int, wait_s: float,
                                cancelled_by: str | None) -> dict[str, Any]:
        """Cancel a job this process does not hold: it runs in another daemon that
        shares the database. The request goes through the row and a NOTIFY; the
        holder stops the job at once (its cancel-request watcher, within
        REMOTE_CANCEL_POLL_S, should the notification be lost), and the ending's own
        notification (``cancel_done``) wakes us to read the final row."""
        ended = self._cancel_waiters.setdefault(job_id, trio.Event())
        if await self.store.request_cancel(job_id, cancelled_by) is None:
            if self._cancel_waiters.get(job_id) is ended and not ended.is_set():
                del self._cancel_waiters[job_id]
            job = await self.get_job(job_id)
            if job is None:
                raise JobNotFound(job_id)
            raise JobAlreadyFinished(job)

        async def stopped() -> dict[str, Any] | None:
            current = await self.get_job(job_id)
            return current if current and Status(current["status"]).is_terminal else None

        with trio.move_on_after(wait_s):
            while (done := await stopped()) is None:
                with trio.move_on_after(REMOTE_CANCEL_POLL_S / 4):  # the notification's net
                    await ended.wait()
                ended = self._cancel_waiters.setdefault(job_id, trio.Event())
            return done
        if self._cancel_waiters.get(job_id) is ended and not ended.is_set():
            del self._cancel_waiters[job_id]  # nobody else waits on it (or polls anyway)
        refreshed = await self.get_job(job_id)
        assert refreshed is not None
        return refreshed

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        row = await self.store.get(job_id)
        return None if row is None else job_json(row)

    async def list_jobs(
        self, *, kind: str | None, statuses: list[str] | None, before_id: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        rows = await self.store.list(kind=kind, statuses=statuses, before_id=before_id,
                                     limit=limit)
        return [job_json(row) for row in rows]
