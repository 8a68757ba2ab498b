"""An in-memory :class:`~nurseryd.store.base.JobStore`, for supervisor unit tests.

It keeps the rules the PostgreSQL store keeps — transitions consult the
lifecycle table, guards by status, owner and attempt, the one-active-fetch rule,
terminal statuses are final — so the supervisor's subtlest logic (grace and
force, slot accounting, cancel racing the final write) can be tested under
trio's ``MockClock`` without a server. Liveness of other owners is a set the
test controls (:attr:`MemoryJobStore.live_owners`), standing in for advisory
locks. Several supervisors on one store are a cluster: the store delivers to
each one's :class:`ClusterSignals` what PostgreSQL's triggers and NOTIFYs would.

Each call checkpoints once, as a database round trip would, so tests see the
same interleavings a real store allows.
"""

from __future__ import annotations

import builtins
import copy
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import JobConflict
from ..lifecycle import ACTIVE, Event, Status, next_status, statuses_allowing, target_of
from .base import (
    PUBLIC_FIELDS,
    Change,
    ChangeFeed,
    ClusterSignals,
    JobChanged,
    JobNote,
    NewJob,
    Row,
    Transition,
    in_rounds,
    now,
    rerun_change,
)

#: Kinds of which at most one job may be unfinished (the PostgreSQL partial index).
ONE_ACTIVE = frozenset({"fetch"})


class MemoryJobStore:
    def __init__(self) -> None:
        self.feed = ChangeFeed()
        self.progress = ChangeFeed()
        self.rows: dict[int, dict[str, Any]] = {}
        self.live_owners: set[str] = set()
        #: Cluster members (``join``); alive while in :attr:`live_owners` or the caller.
        self.members: set[str] = set()
        #: Whoever listens (``listen``): every supervisor sharing this store.
        self.listeners: list[ClusterSignals] = []
        #: Method name -> event: that call waits for it first ("the database is slow").
        self.gates: dict[str, trio.Event] = {}
        #: Method name -> how many of its next calls fail with ConnectionError
        #: ("the database is away").
        self.failures: dict[str, int] = {}
        self.calls = 0
        self._next_id = 1
        #: What kinds noted for their jobs' logs, in order.
        self.notes: list[JobNote] = []

    async def _round_trip(self, method: str) -> None:
        self.calls += 1
        gate = self.gates.get(method)
        if gate is not None:
            await gate.wait()
        await trio.lowlevel.checkpoint()
        if self.failures.get(method):
            self.failures[method] -= 1
            raise ConnectionError(f"{method}: the database is away")

    def _copy(self, row: dict[str, Any]) -> Row:
        return copy.deepcopy(row)

    async def insert(self, jobs: Sequence[NewJob]) -> list[Row | None]:
        await self._round_trip("insert")
        found: list[Row | None] = []
        for job in jobs:
            if job.kind in ONE_ACTIVE and any(
                    row["kind"] == job.kind and Status(row["status"]) in ACTIVE
                    for row in self.rows.values()):
                found.append(None)
                continue
            row: dict[str, Any] = {name: None for name in PUBLIC_FIELDS}
            row.update(id=self._next_id, kind=job.kind, status=Status.QUEUED.value,
                       params=copy.deepcopy(job.params), timeout_s=job.timeout_s,
                       processed=0, failed=0, attempts=0, created_at=now(),
                       checkpoint=None, owner=job.owner, submitted_by=job.submitted_by)
            self._next_id += 1
            self.rows[row["id"]] = row
            found.append(self._copy(row))
        self.feed.publish(JobChanged(None, row) for row in found if row is not None)
        for kind in {row["kind"] for row in found if row is not None and row["owner"] is None}:
            self._signal("claimable", kind)
        return found

    def _signal(self, name: str, arg: Any) -> None:
        """What the PostgreSQL store's triggers and NOTIFYs would deliver."""
        for signals in list(self.listeners):
            getattr(signals, name)(arg)

    def _changed(self, before: Mapping[str, Any], row: Mapping[str, Any]) -> None:
        """The 0006 triggers: claimable, slot freed, a cancel-requested job ended."""
        was_owned_active = before["owner"] is not None and Status(before["status"]) in ACTIVE
        is_owned_active = row["owner"] is not None and Status(row["status"]) in ACTIVE
        if was_owned_active and not is_owned_active:
            self._signal("slot_freed", row["kind"])
        if row["owner"] is None and row["status"] == Status.QUEUED.value and (
                before["owner"] is not None or before["status"] != Status.QUEUED.value):
            self._signal("claimable", row["kind"])
        if (row["cancel_requested_at"] is not None and Status(row["status"]).is_terminal
                and not Status(before["status"]).is_terminal):
            self._signal("cancel_done", row["id"])

    def _allowed(self, change: Change) -> frozenset[Status]:
        if isinstance(change, Transition):
            return statuses_allowing(change.event)
        return change.statuses

    async def apply(self, changes: Sequence[Change]) -> list[Row | None]:
        await self._round_trip("apply")
        results: list[Row | None] = [None] * len(changes)
        committed: list[JobChanged] = []
        progressed: list[JobChanged] = []
        for round_ in in_rounds(changes):
            for indexes, change in round_:
                row = self.rows.get(change.job_id)
                if row is None or Status(row["status"]) not in self._allowed(change):
                    continue
                if change.owner is not None and row["owner"] != change.owner:
                    continue
                if change.attempt is not None and row["attempts"] != change.attempt:
                    continue
                before = dict(row)
                row.update(copy.deepcopy(dict(change.values)))
                if isinstance(change, Transition):
                    row["status"] = target_of(change.event).value
                    committed.append(JobChanged(change.event, self._copy(row)))
                    self._changed(before, row)
                else:
                    progressed.append(JobChanged(None, self._copy(row)))
                for index in indexes:
                    results[index] = self._copy(row)
        self.feed.publish(committed)
        self.progress.publish(progressed)
        return results

    async def get(self, job_id: int) -> Row | None:
        await self._round_trip("get")
        row = self.rows.get(job_id)
        return None if row is None else self._copy(row)

    async def list(
        self, *, kind: str | None, statuses: Sequence[str] | None, before_id: int | None,
        limit: int, since: dt.datetime | None = None,
    ) -> list[Row]:
        await self._round_trip("list")
        rows = [row for row in sorted(self.rows.values(), key=lambda r: -r["id"])
                if (kind is None or row["kind"] == kind)
                and (not statuses or row["status"] in statuses)
                and (before_id is None or row["id"] < before_id)
                and (since is None or row["created_at"] >= since)]
        return [self._copy(row) for row in rows[:limit]]

    def _owner_dead(self, owner: str | None, me: str) -> bool:
        return owner is None or (owner != me and owner not in self.live_owners)

    async def cancel_queued(self, job_id: int, owner: str, by: str | None = None) -> Row | None:
        await self._round_trip("cancel_queued")
        row = self.rows.get(job_id)
        if row is None or row["status"] != Status.QUEUED.value:
            return None
        if row["owner"] != owner and not self._owner_dead(row["owner"], owner):
            return None
        before = dict(row)
        row.update(status=next_status(Status.QUEUED, Event.CANCEL).value, finished_at=now(),
                   error="cancelled before it started")
        row["cancel_requested_at"] = row["cancel_requested_at"] or now()
        row["cancelled_by"] = row["cancelled_by"] or by
        self.feed.publish([JobChanged(Event.CANCEL, self._copy(row))])
        self._changed(before, row)
        return self._copy(row)

    async def request_cancel(self, job_id: int, by: str | None = None) -> Row | None:
        await self._round_trip("request_cancel")
        row = self.rows.get(job_id)
        if row is None or Status(row["status"]) not in ACTIVE:
            return None
        row["cancel_requested_at"] = row["cancel_requested_at"] or now()
        row["cancelled_by"] = row["cancelled_by"] or by
        self._signal("cancel", job_id)
        return self._copy(row)

    async def cancel_requests_among(self, job_ids: Sequence[int]) -> builtins.list[tuple[int, Any]]:
        await self._round_trip("cancel_requests_among")
        return [(job_id, self.rows[job_id]["cancel_requested_at"]) for job_id in job_ids
                if job_id in self.rows and self.rows[job_id]["cancel_requested_at"]]

    async def dead_owners(self, owner: str) -> set[str]:
        await self._round_trip("dead_owners")
        return {row["owner"] for row in self.rows.values()
                if Status(row["status"]) in ACTIVE and row["owner"] is not None
                and self._owner_dead(row["owner"], owner)}

    async def release_orphans(self, owner: str, owners: Sequence[str] | None = None) -> int:
        await self._round_trip("release_orphans")
        released = 0
        for row in self.rows.values():
            if row["owner"] is None or (owners is not None and row["owner"] not in owners):
                continue
            if Status(row["status"]) in ACTIVE and self._owner_dead(row["owner"], owner):
                released += 1
                before = dict(row)
                row["owner"] = None
                if Status(row["status"]) in statuses_allowing(Event.RECOVER):
                    row["status"] = target_of(Event.RECOVER).value
                    self.feed.publish([JobChanged(Event.RECOVER, self._copy(row))])
                self._changed(before, row)
        self.members -= {member for member in self.members
                         if (owners is None or member in owners)
                         and self._owner_dead(member, owner)}
        return released

    async def claim(self, owner: str, wants: Mapping[str, int],
                    cluster_limits: Mapping[str, int]) -> builtins.list[Row]:
        await self._round_trip("claim")
        claimed: builtins.list[Row] = []
        for kind, wanted in wants.items():
            room = wanted
            if kind in cluster_limits:
                owned = sum(1 for row in self.rows.values() if row["kind"] == kind
                            and row["owner"] is not None and Status(row["status"]) in ACTIVE)
                room = max(0, min(wanted, cluster_limits[kind] - owned))
            for row in sorted(self.rows.values(), key=lambda r: r["id"]):
                if room <= 0:
                    break
                if (row["kind"] == kind and row["owner"] is None
                        and row["status"] == Status.QUEUED.value):
                    row["owner"] = owner
                    claimed.append(self._copy(row))
                    room -= 1
        answer = self.gates.get("claim:answer")  # the claim's answer still on its way
        if answer is not None:
            await answer.wait()
        return claimed

    async def count_claimable(self, up_to: int) -> int:
        await self._round_trip("count_claimable")
        return min(up_to, sum(1 for row in self.rows.values() if row["owner"] is None
                              and row["status"] == Status.QUEUED.value))

    async def join(self, owner: str) -> None:
        await self._round_trip("join")
        self.members.add(owner)

    async def leave(self, owner: str) -> None:
        await self._round_trip("leave")
        self.members.discard(owner)
        for row in self.rows.values():
            if row["owner"] == owner and row["status"] == Status.QUEUED.value:
                before = dict(row)
                row["owner"] = None
                self._changed(before, row)

    async def dead_members(self, owner: str) -> set[str]:
        await self._round_trip("dead_members")
        return {member for member in self.members if self._owner_dead(member, owner)}

    @asynccontextmanager
    async def listen(self, signals: ClusterSignals) -> AsyncIterator[
            Callable[[], Awaitable[bool]]]:
        await self._round_trip("listen")
        self.listeners.append(signals)

        async def alive() -> bool:
            await trio.lowlevel.checkpoint()
            return True

        try:
            yield alive
        finally:
            self.listeners.remove(signals)

    async def queued_for(self, owner: str, after_id: int, limit: int) -> Sequence[Row]:
        await self._round_trip("queued_for")
        rows = [row for row in sorted(self.rows.values(), key=lambda r: r["id"])
                if row["owner"] == owner and row["status"] == Status.QUEUED.value
                and row["id"] > after_id]
        return [self._copy(row) for row in rows[:limit]]

    async def recover_own(self, owner: str, held: Sequence[int]) -> int:
        await self._round_trip("recover_own")
        recovered = 0
        for row in self.rows.values():
            if (row["owner"] == owner and row["id"] not in held
                    and Status(row["status"]) in statuses_allowing(Event.RECOVER)):
                row["status"] = target_of(Event.RECOVER).value
                recovered += 1
                self.feed.publish([JobChanged(Event.RECOVER, self._copy(row))])
        return recovered

    async def add_notes(self, notes: Sequence[JobNote]) -> builtins.list[None]:
        await self._round_trip("add_notes")
        self.notes += [note for note in notes if note.job_id in self.rows]
        return [None] * len(notes)

    async def rerun(self, job_id: int, owner: str | None) -> Row | None:
        row = self.rows.get(job_id)
        if (row is not None and row["kind"] in ONE_ACTIVE
                and Status(row["status"]) in statuses_allowing(Event.RERUN)
                and any(other["kind"] == row["kind"] and Status(other["status"]) in ACTIVE
                        for other in self.rows.values())):
            await self._round_trip("rerun")
            raise JobConflict(row["kind"])
        [found] = await self.apply([rerun_change(job_id, owner)])
        return found
