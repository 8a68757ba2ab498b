"""What a job kind is, and what it may touch while it runs.

A kind is a small async function plus a parameter parser. It never sees HTTP,
channels or cancel scopes: the supervisor owns those. It receives a
:class:`JobContext`, which is its whole view of the world: its parameters, the
checkpoint it saved on an earlier attempt, the database, and ways to report
progress and results.

Cancellation reaches a kind as ``trio.Cancelled`` at its next checkpoint (timeout,
explicit cancel or shutdown: the supervisor tells them apart, the kind must not
care). A kind must let ``trio.Cancelled`` propagate; whatever it has committed
stays committed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import JobFailed, ParamError  # noqa: F401  (kinds import them from here)

if TYPE_CHECKING:
    import asyncpg

    from ..config import Settings
    from ..db import Database


class JobContext(Protocol):
    """The running job as its kind sees it."""

    job_id: int
    kind: str
    params: Mapping[str, Any]
    #: The JSON value the job saved with :meth:`save_checkpoint` (or committed with
    #: its data) on an earlier attempt; ``None`` on the first run.
    checkpoint: Any
    #: 1 on the first run, 2 after one interruption, and so on.
    attempts: int
    db: Database
    settings: Settings

    def report(
        self,
        *,
        total: int | None = None,
        processed: int | None = None,
        failed: int | None = None,
    ) -> None:
        """Publish absolute progress counters. Never blocks: the table sees them
        within a quarter second (coalesced), and exactly in the final status."""

    async def save_checkpoint(self, checkpoint: Any) -> None:
        """Durably store ``checkpoint`` (JSON) with the current counters."""

    async def commit_progress(
        self, conn: asyncpg.Connection, checkpoint: Any, *, processed: int, failed: int
    ) -> None:
        """Write ``checkpoint`` and the counters inside the kind's own transaction.

        Asyncio side: call it with the connection of a :meth:`Database.run`
        transaction that also writes the data the checkpoint stands for, so both
        commit or neither does. The write is guarded by this attempt's claim on
        the job; when the claim is lost it raises
        :class:`~nurseryd.errors.LostClaim` and the transaction rolls back. Once
        a kind calls it, its checkpoint and processed/failed counters are its
        own: progress flushes and the final status write leave them alone.
        """

    def set_result(self, result: Any) -> None:
        """The JSON result stored with the job when it ends (also on failure)."""


RunFn = Callable[[JobContext], Awaitable[None]]
ParseFn = Callable[[Mapping[str, Any]], dict[str, Any]]


def no_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parser for kinds that take no parameters: anything given is an error."""
    for name in params:
        raise ParamError(name, "this job kind takes no parameters")
    return {}


@dataclass(frozen=True)
class JobKind:
    """A registered kind of job."""

    name: str
    run: RunFn
    parse_params: ParseFn = no_params
    #: Whether ``POST /jobs/{name}`` may start it; kinds with their own endpoints
    #: (uploads, the one-at-a-time fetch) say False.
    generic_endpoint: bool = True
    description: str = ""


@dataclass
class KindRegistry:
    """Job kinds by name."""

    kinds: dict[str, JobKind] = field(default_factory=dict)

    def add(self, kind: JobKind) -> None:
        if kind.name in self.kinds:
            raise ValueError(f"job kind {kind.name!r} registered twice")
        self.kinds[kind.name] = kind

    def get(self, name: str) -> JobKind | None:
        return self.kinds.get(name)

    def names(self) -> list[str]:
        return sorted(self.kinds)
