"""The job store: the one door through which a job's row changes.

The supervisor never writes SQL and never decides a status itself. It hands the
store *changes*, and the store applies them in batches:

- :class:`Transition` is a status change. The store asks :mod:`nurseryd.lifecycle`
  where the event leads (``target_of``) and from which statuses it may start
  (``statuses_allowing``), and writes the row only if it is in one of those
  statuses and, when given, still held by ``owner`` in ``attempt``. A change
  the guard refuses writes nothing and comes back as ``None``.
- :class:`Progress` sets counters, a checkpoint or a cancel request without a
  status change, under the same kind of guard (by default: the job is running).

Because every status change passes through :meth:`JobStore.apply` (and the two
narrower doors :meth:`~JobStore.cancel_queued` and :meth:`~JobStore.release_orphans`,
which are transitions too), whatever must see every change — the event stream,
metrics, a job's log, notifications to other daemons — subscribes here with
:meth:`ChangeFeed.subscribe` and can neither miss a change nor report one that did
not commit.

Two implementations: :class:`nurseryd.db.jobs.PostgresJobStore` (the real one)
and :class:`nurseryd.store.memory.MemoryJobStore` (for supervisor unit tests,
like procrastinate's in-memory connector).
"""

from __future__ import annotations

import builtins
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..lifecycle import Event, Status

log = logging.getLogger(__name__)

class Row(Protocol):
    """A job row as the store returns it (``PUBLIC_FIELDS`` plus ``checkpoint`` and ``owner``).

    Read it by column name only: the PostgreSQL store hands out asyncpg records,
    which are no ``Mapping`` (iterating one yields its values, not its keys), the
    memory store hands out dicts.
    """

    def __getitem__(self, key: str, /) -> Any: ...

PUBLIC_FIELDS = (
    "id", "kind", "status", "total", "processed", "failed", "error", "params", "result",
    "attempts", "timeout_s", "created_at", "started_at", "finished_at", "cancel_requested_at",
    "submitted_by", "cancelled_by",
)

#: Columns a change may set besides ``status`` (and their PostgreSQL types).
UPDATABLE: dict[str, str] = {
    "total": "bigint", "processed": "bigint", "failed": "bigint", "error": "text",
    "result": "jsonb", "attempts": "integer", "checkpoint": "jsonb",
    "started_at": "timestamptz", "finished_at": "timestamptz",
    "cancel_requested_at": "timestamptz", "owner": "text", "cancelled_by": "text",
}


def job_json(row: Row) -> dict[str, Any]:
    """The public JSON view of a job row (timestamps as ISO 8601)."""
    out: dict[str, Any] = {}
    for name in PUBLIC_FIELDS:
        value = row[name]
        out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
    return out


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


#: Bounds on what a job's params may hold (they are stored as jsonb and shown by the API).
MAX_PARAMS_DEPTH = 32
MAX_INT_ABS = 2**63 - 1


def check_storable(value: Any, field: str = "params", depth: int = 0) -> None:
    """Refuse what PostgreSQL cannot store as jsonb, before it joins a batch.

    NaN and Infinity (Python's ``json`` accepts them), NUL characters and lone
    surrogates in strings, integers beyond 64 bits and deep nesting would fail
    the whole group-committed INSERT; here they fail only their own request,
    with :class:`ParamError` naming where.
    """
    from ..errors import ParamError

    if depth > MAX_PARAMS_DEPTH:
        raise ParamError(field, f"nested deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise ParamError(field, "contains a NUL character (\\u0000), which cannot be stored")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ParamError(field, "contains a lone surrogate (not valid Unicode)") from None
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_INT_ABS:
            raise ParamError(field, "integer out of range (at most 64 bits)")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ParamError(field, "NaN and Infinity are not JSON numbers")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_storable(key, field, depth + 1)
            check_storable(item, f"{field}.{key}" if field != "params" else str(key),
                           depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_storable(item, f"{field}[{index}]", depth + 1)


@dataclass(frozen=True)
class NewJob:
    kind: str
    params: dict[str, Any]
    timeout_s: float
    #: ``None``: recorded *claimable* (no process holds it; any daemon with a free
    #: slot for its kind claims it).
    owner: str | None
    #: The name of the token that submitted it (``None``: the daemon itself, a schedule).
    submitted_by: str | None = None


#: The levels of a :class:`JobNote` (the job log's levels).
NOTE_LEVELS = ("info", "warning", "error")


@dataclass(frozen=True)
class JobNote:
    """A line a job's kind wrote for its operator (``JobContext.note``)."""

    job_id: int
    attempt: int
    level: str
    message: str
    at: dt.datetime


def _check_columns(values: Mapping[str, Any]) -> None:
    unknown = set(values) - set(UPDATABLE)
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")


@dataclass(frozen=True)
class Transition:
    """A status change of one job: ``event`` plus the columns that go with it."""

    job_id: int
    event: Event
    values: Mapping[str, Any] = field(default_factory=dict)
    #: Guard: the row must still name this owner (``None``: any owner).
    owner: str | None = None
    #: Guard: the row's ``attempts`` must be this (``None``: any attempt).
    attempt: int | None = None

    def __post_init__(self) -> None:
        _check_columns(self.values)


RUNNING_ONLY = frozenset({Status.RUNNING})


@dataclass(frozen=True)
class Progress:
    """Columns to set on one job without changing its status."""

    job_id: int
    values: Mapping[str, Any]
    owner: str | None = None
    attempt: int | None = None
    #: Guard: the statuses in which the write applies.
    statuses: frozenset[Status] = RUNNING_ONLY

    def __post_init__(self) -> None:
        _check_columns(self.values)


Change = Transition | Progress


@dataclass(frozen=True)
class JobChanged:
    """What subscribers of the :class:`ChangeFeed` receive, once a change committed.

    ``event`` is ``None`` for a newly recorded job, and the lifecycle event for a
    status change. ``row`` is the job as committed.
    """

    event: Event | None
    row: Row


Subscriber = Callable[[JobChanged], None]


class ChangeFeed:
    """Committed job changes, for whoever must see every one of them.

    A subscriber is called synchronously right after the commit, so it must not
    block: it records or sends without waiting (a bounded channel's
    ``send_nowait``, a counter). One that raises is logged and skipped; it
    never undoes or hides a committed change from the others.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` for every committed change; returns the unsubscribe."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, changes: Iterable[JobChanged]) -> None:
        for change in changes:
            for subscriber in list(self._subscribers):
                try:
                    subscriber(change)
                except Exception:
                    log.exception("a job change subscriber failed")


@dataclass(frozen=True)
class ClusterSignals:
    """What the store tells the supervisor of other daemons' doings, as it happens
    (PostgreSQL: NOTIFY; the memory store: its own calls). Each callback runs in
    Trio and must not block. All of them are shortcuts with a poll behind them."""

    #: A job of this kind became claimable (recorded or released with no owner).
    claimable: Callable[[str], None]
    #: An owned, unfinished job of this kind ended or was released: a cluster-wide
    #: slot of the kind may be free.
    slot_freed: Callable[[str], None]
    #: Someone asked to cancel this job (whoever holds it stops it).
    cancel: Callable[[int], None]
    #: A job someone asked to cancel has ended (a waiting ``cancel`` may answer).
    cancel_done: Callable[[int], None]


class JobStore(Protocol):
    """Where jobs are recorded and every change to them is applied."""

    feed: ChangeFeed
    #: Committed progress writes (counters, no status change; ``event`` is ``None``),
    #: a few per second per running job: for live displays, which may drop them.
    progress: ChangeFeed

    async def insert(self, jobs: Sequence[NewJob]) -> list[Row | None]:
        """Record many jobs at once; ``None`` where a unique rule refused one
        (the one-active-fetch index)."""
        ...

    async def apply(self, changes: Sequence[Change]) -> list[Row | None]:
        """Apply many changes at once, atomically; each one's row, or ``None``
        where its guard refused it."""
        ...

    async def get(self, job_id: int) -> Row | None: ...

    async def list(
        self, *, kind: str | None, statuses: Sequence[str] | None, before_id: int | None,
        limit: int, since: dt.datetime | None = None,
    ) -> Sequence[Row]:
        """Newest first; keyset pagination by id (``before_id``); ``since`` keeps the
        jobs created at or after that instant (the dashboard's time filter)."""
        ...

    async def cancel_queued(self, job_id: int, owner: str, by: str | None = None) -> Row | None:
        """Cancel a queued job no live process holds in memory: ours but not loaded
        yet, unowned, or owned by a dead daemon (the ``cancel`` transition); ``by``
        becomes its ``cancelled_by``."""
        ...

    async def request_cancel(self, job_id: int, by: str | None = None) -> Row | None:
        """Record a cancel request (and who asked: ``cancelled_by``, first asker wins)
        for the daemon that holds the job, and tell it (``ClusterSignals.cancel``);
        the row, or ``None`` if the job is not queued or running."""
        ...

    async def cancel_requests_among(self, job_ids: Sequence[int]) -> builtins.list[tuple[int, Any]]:
        """``(id, cancel_requested_at)`` of those jobs someone asked to cancel."""
        ...

    async def dead_owners(self, owner: str) -> set[str]:
        """Other owners of unfinished jobs whose lock is free now."""
        ...

    async def release_orphans(self, owner: str, owners: Sequence[str] | None = None) -> int:
        """Requeue (the ``recover`` transition) every unfinished job whose owner is
        dead (only of ``owners``, when given) as claimable, and forget those
        owners' member rows; returns how many jobs."""
        ...

    async def claim(self, owner: str, wants: Mapping[str, int],
                    cluster_limits: Mapping[str, int]) -> builtins.list[Row]:
        """Give ``owner`` up to ``wants[kind]`` claimable jobs of each kind, oldest
        first; for a kind in ``cluster_limits``, only while fewer than its limit of
        its jobs are owned and unfinished (counted and taken under one lock)."""
        ...

    async def count_claimable(self, up_to: int) -> int:
        """Claimable jobs in the table, counted up to ``up_to``."""
        ...

    async def join(self, owner: str) -> None:
        """Record ``owner`` as a member of the cluster (alive while it holds its lock)."""
        ...

    async def leave(self, owner: str) -> None:
        """A clean stop: forget the member, make its queued jobs claimable."""
        ...

    async def dead_members(self, owner: str) -> set[str]:
        """Other members whose owner lock is free now."""
        ...

    def listen(self, signals: ClusterSignals) -> AbstractAsyncContextManager[
            Callable[[], Awaitable[bool]]]:
        """Deliver :class:`ClusterSignals` for the life of the block; yields an
        ``alive()`` check (False: signals may be missed, poll)."""
        ...

    async def queued_for(self, owner: str, after_id: int, limit: int) -> Sequence[Row]:
        """This owner's queued jobs with ids above ``after_id``, oldest first."""
        ...

    async def recover_own(self, owner: str, held: Sequence[int]) -> int:
        """Requeue (``recover``) this owner's running jobs whose ids are not in
        ``held``: nothing in the process runs them any more."""
        ...

    async def add_notes(self, notes: Sequence[JobNote]) -> builtins.list[None]:
        """Store the lines kinds wrote for their jobs' logs (bounded per job)."""
        ...

    async def rerun(self, job_id: int, owner: str | None) -> Row | None:
        """The ``rerun`` transition: an ended job back to ``queued`` for ``owner``
        (``None``: claimable),
        its outcome cleared and its checkpoint and counters kept (it resumes);
        ``None`` if its status does not allow it. Raises
        :class:`~nurseryd.errors.JobConflict` when a unique rule refuses (another
        fetch is active)."""
        ...


def rerun_change(job_id: int, owner: str | None) -> Transition:
    """What :meth:`JobStore.rerun` writes, the same in every store."""
    return Transition(job_id, Event.RERUN, {
        "owner": owner, "error": None, "result": None, "finished_at": None,
        "cancel_requested_at": None})


Round = list[tuple[list[int], Change]]


def in_rounds(changes: Sequence[Change]) -> list[Round]:
    """Split a batch so that each round holds at most one change per job.

    Consecutive progress writes of one job merge (later values win), and
    progress merges into the transition that follows it, so the common batch is
    one round; a change that follows a job's transition in the same batch goes
    into the next round and meets that transition's result (its guard decides).
    Each entry keeps the indexes of the inputs it stands for.
    """
    rounds: list[dict[int, tuple[list[int], Change]]] = []
    for index, change in enumerate(changes):
        for round_ in rounds:
            existing = round_.get(change.job_id)
            if existing is None:
                round_[change.job_id] = ([index], change)
                break
            indexes, current = existing
            if isinstance(current, Progress):
                merged: Change
                if isinstance(change, Progress):
                    merged = Progress(change.job_id, {**current.values, **change.values},
                                      change.owner, change.attempt, change.statuses)
                else:
                    merged = Transition(change.job_id, change.event,
                                        {**current.values, **change.values},
                                        change.owner, change.attempt)
                round_[change.job_id] = ([*indexes, index], merged)
                break
        else:
            rounds.append({change.job_id: ([index], change)})
    return [list(round_.values()) for round_ in rounds]
