"""Group commit: many tasks' small writes become one database round trip.

A statement through the trio-asyncio bridge costs about four times a plain
asyncio call (measured), so one INSERT per accepted job or one UPDATE per status
change caps the daemon at a few hundred jobs per second. A :class:`GroupCommitter`
collects what arrives while the previous flush is in flight and writes it in
one call: under light load every write goes out at once (no added latency),
under heavy load batches grow by themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class CommitterClosed(RuntimeError):
    """The committer is not running any more; the write was not made."""


@dataclass
class _Waiter(Generic[R]):
    done: trio.Event = field(default_factory=trio.Event)
    result: R | None = None
    error: BaseException | None = None


class GroupCommitter(Generic[T, R]):
    """Batches items for ``flush(items) -> results`` (one result per item, in order).

    ``run`` must be running in a nursery that outlives every task that submits:
    a shielded ``submit`` from a job's final status write relies on it.
    """

    def __init__(
        self, name: str, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 2000
    ) -> None:
        self.name = name
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[T, _Waiter[R] | None]] = []
        self._wakeup = trio.Event()
        self._closing = False
        self._stopped = False
        #: Round trips made and items they carried (observability, and the tests).
        self.flushes = 0
        self.items_flushed = 0
        self._queued = 0  # items ever queued
        self._settled = 0  # of those, items written, failed or dropped at the stop
        self._settled_changed = trio.Event()

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait until its batch is committed; returns its result."""
        waiter: _Waiter[R] = _Waiter()
        self._enqueue(item, waiter)
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def submit_nowait(self, item: T) -> None:
        """Queue ``item`` without waiting (progress updates); errors are logged."""
        self._enqueue(item, None)

    def _enqueue(self, item: T, waiter: _Waiter[R] | None) -> None:
        if self._stopped or self._closing:
            raise CommitterClosed(f"{self.name}: no longer accepting writes")
        self._pending.append((item, waiter))
        self._queued += 1
        self._wakeup.set()

    async def flushed(self) -> None:
        """Wait until every item queued before this call is written (or its write
        failed, or the committer stopped): a barrier for ``submit_nowait`` items."""
        target = self._queued
        while self._settled < target and not self._stopped:
            await self._settled_changed.wait()

    def _settle(self, count: int) -> None:
        self._settled += count
        self._settled_changed.set()
        self._settled_changed = trio.Event()

    def close(self) -> None:
        """Accept nothing more; ``run`` returns once what is pending is written."""
        self._closing = True
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    await self._write(batch)
                finally:
                    self._settle(len(batch))
        finally:
            self._stopped = True
            leftovers, self._pending = self._pending, []
            self._settle(len(leftovers))
            for _, waiter in leftovers:
                if waiter is not None:
                    waiter.error = CommitterClosed(f"{self.name}: stopped before this write")
                    waiter.done.set()

    async def _write(self, batch: list[tuple[T, _Waiter[R] | None]]) -> None:
        self.flushes += 1
        self.items_flushed += len(batch)
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as error:
            if len(batch) > 1:
                # One bad item must not sink its neighbours: each goes alone, so
                # only the offending one gets the error.
                log.warning("%s: a batch of %d failed (%s); writing its items one by one",
                            self.name, len(batch), error)
                for one in batch:
                    await self._write([one])
                return
            log.error("%s: writing a batch failed: %s", self.name, error)
            for _, waiter in batch:
                if waiter is not None:
                    waiter.error = error
                    waiter.done.set()
            return
        except BaseException:  # cancelled mid-flush: nobody may wait forever
            for _, waiter in batch:
                if waiter is not None:
                    waiter.error = CommitterClosed(f"{self.name}: cancelled during this write")
                    waiter.done.set()
            raise
        for (_, waiter), result in zip(batch, results, strict=True):
            if waiter is not None:
                waiter.result = result
                waiter.done.set()
