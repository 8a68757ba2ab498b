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

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self

from ..errors import JobFailed, ParamError  # noqa: F401  (kinds import them from here)

if TYPE_CHECKING:
    import asyncpg

    from ..config import Settings
    from ..db import Database
    from ..observe.metrics import Metrics


#: Notes one attempt of a job may write; one more line says the rest were dropped.
MAX_NOTES_PER_ATTEMPT = 100
#: A note's message is cut to this many characters.
MAX_NOTE_CHARS = 2000


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
    #: The daemon's metrics, for what only the kind sees (rows migrated, sources
    #: fetched): count there what has committed. Job counts need nothing from a kind.
    metrics: Metrics

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

    def note(self, message: str, *, level: str = "warning") -> None:
        """A line for the job's own log (``GET /jobs/{id}/log``), for what the
        operator should know that no status says: a source that failed while the
        others went on, rows rejected. Never blocks (written in the background,
        like progress); ``level`` is ``info``, ``warning`` or ``error``. Bounded:
        at most :data:`MAX_NOTES_PER_ATTEMPT` per attempt reach the log, each cut
        to :data:`MAX_NOTE_CHARS` and redacted like a log line."""


RunFn = Callable[[JobContext], Awaitable[None]]
ParseFn = Callable[[Mapping[str, Any]], dict[str, Any]]


class Params(Protocol):
    """A kind's parameters, typed: one parse, so every rule about them exists once.

    A kind defines a frozen dataclass with these two methods. Its
    :attr:`JobKind.parse_params` is :func:`parser` of it (the supervisor checks a
    submission and stores ``to_json()``), its ``run`` reads ``parse(ctx.params)``,
    and an HTTP handler that builds the params goes through the same ``parse``.
    """

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> Self:
        """Check ``params``; raises :class:`~nurseryd.errors.ParamError` naming the field."""
        ...

    def to_json(self) -> dict[str, Any]:
        """The JSON stored in the job's row (what ``parse`` reads back)."""
        ...


def parser(params_type: type[Params]) -> ParseFn:
    """The :attr:`JobKind.parse_params` of a :class:`Params` type."""

    def parse_params(params: Mapping[str, Any]) -> dict[str, Any]:
        return params_type.parse(params).to_json()

    parse_params.__doc__ = f"``{params_type.__name__}.parse(params).to_json()``"
    return parse_params


def refuse_unknown(params: Mapping[str, Any], allowed: Iterable[str], hint: str) -> None:
    """Raise :class:`ParamError` for the first (sorted) name not in ``allowed``."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter; {hint}")


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
    #: The kind writes its checkpoint and processed/failed counters itself, in the
    #: transactions that write its data (``ctx.commit_progress``). The supervisor
    #: then never writes them, from the job's first moment: a progress flush of
    #: older counters could otherwise land after a batch committed newer ones.
    commits_progress: bool = False
    #: Before an ended job of this kind is run again (``POST /jobs/{id}/retry``):
    #: ``(params, settings)`` returns why it cannot (``None``: it can), e.g. its
    #: upload is gone.
    rerun_blocker: Callable[[Mapping[str, Any], Settings], str | None] | None = None


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
