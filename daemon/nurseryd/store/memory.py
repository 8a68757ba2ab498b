"""An in-memory :class:`~nurseryd.store.base.JobStore`, for supervisor unit tests.

It keeps the rules the PostgreSQL store keeps — transitions consult the
lifecycle table, guards by status, owner and attempt, the one-active-fetch rule,
terminal statuses are final — so the supervisor's subtlest logic (grace and
force, slot accounting, cancel racing the final write) can be tested under
trio's ``MockClock`` without a server. Liveness of other owners is a set the
test controls (:attr:`MemoryJobStore.live_owners`), standing in for advisory
locks.

Each call checkpoints once, as a database round trip would, so tests see the
same interleavings a real store allows.
"""

from __future__ import annotations

import builtins
import copy
import datetime as dt
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import JobConflict
from ..lifecycle import ACTIVE, Event, Status, next_status, statuses_allowing, target_of
from .base import (
    PUBLIC_FIELDS,
    Change,
    ChangeFeed,
    JobChanged,
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
        #: Method name -> event: that call waits for it first ("the database is slow").
        self.gates: dict[str, trio.Event] = {}
        #: Method name -> how many of its next calls fail with ConnectionError
        #: ("the database is away").
        self.failures: dict[str, int] = {}
        self.calls = 0
        self._next_id = 1

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
        return found

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
                row.update(copy.deepcopy(dict(change.values)))
                if isinstance(change, Transition):
                    row["status"] = target_of(change.event).value
                    committed.append(JobChanged(change.event, self._copy(row)))
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
        row.update(status=next_status(Status.QUEUED, Event.CANCEL).value, finished_at=now(),
                   error="cancelled before it started")
        row["cancel_requested_at"] = row["cancel_requested_at"] or now()
        row["cancelled_by"] = row["cancelled_by"] or by
        self.feed.publish([JobChanged(Event.CANCEL, self._copy(row))])
        return self._copy(row)

    async def request_cancel(self, job_id: int, by: str | None = None) -> None:
        await self._round_trip("request_cancel")
        row = self.rows.get(job_id)
        if row is not None and Status(row["status"]) in ACTIVE:
            row["cancel_requested_at"] = row["cancel_requested_at"] or now()
            row["cancelled_by"] = row["cancelled_by"] or by

    async def cancel_requests_among(self, job_ids: Sequence[int]) -> builtins.list[tuple[int, Any]]:
        await self._round_trip("cancel_requests_among")
        return [(job_id, self.rows[job_id]["cancel_requested_at"]) for job_id in job_ids
                if job_id in self.rows and self.rows[job_id]["cancel_requested_at"]]

    async def dead_owners(self, owner: str) -> set[str]:
        await self._round_trip("dead_owners")
        return {row["owner"] for row in self.rows.values()
                if Status(row["status"]) in ACTIVE and row["owner"] is not None
                and self._owner_dead(row["owner"], owner)}

    async def adopt_orphans(self, owner: str, owners: Sequence[str] | None = None) -> int:
        await self._round_trip("adopt_orphans")
        adopted = 0
        for row in self.rows.values():
            if owners is not None and row["owner"] is not None and row["owner"] not in owners:
                continue
            if Status(row["status"]) in ACTIVE and self._owner_dead(row["owner"], owner):
                adopted += 1
                row["owner"] = owner
                if Status(row["status"]) in statuses_allowing(Event.RECOVER):
                    row["status"] = target_of(Event.RECOVER).value
                    self.feed.publish([JobChanged(Event.RECOVER, self._copy(row))])
        return adopted

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

    async def rerun(self, job_id: int, owner: str) -> Row | None:
        row = self.rows.get(job_id)
        if (row is not None and row["kind"] in ONE_ACTIVE
                and Status(row["status"]) in statuses_allowing(Event.RERUN)
                and any(other["kind"] == row["kind"] and Status(other["status"]) in ACTIVE
                        for other in self.rows.values())):
            await self._round_trip("rerun")
            raise JobConflict(row["kind"])
        [found] = await self.apply([rerun_change(job_id, owner)])
        return found
