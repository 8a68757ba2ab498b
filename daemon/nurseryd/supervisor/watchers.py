"""Periodic work beside the jobs: progress to the table, cancel requests from it,
and the notifications other daemons send (:func:`listen_for_peers`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import trio

from ..lifecycle import StopReason
from ..store.base import ClusterSignals, JobStore, Progress
from .handle import JobHandle

log = logging.getLogger("nurseryd.supervisor")


class ProgressFlusher:
    """Changed counters reach the table at most every ``interval`` s, all jobs in one batch.

    A kind may report after every row; the table sees a few updates per second
    per job, and the final status write carries the exact values. Each write is
    guarded by the job's owner and attempt, so a flush that arrives after the
    job ended (or after another attempt took it) changes nothing.
    """

    def __init__(self, owner: str, write_soon: Callable[[Progress], None],
                 interval: float) -> None:
        self.owner = owner
        self.interval = interval
        self._write_soon = write_soon
        self._dirty: set[JobHandle] = set()

    def mark(self, handle: JobHandle) -> None:
        self._dirty.add(handle)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for handle in dirty:
            if not handle.running or handle.finished.is_set():
                continue
            values: dict[str, object] = {"total": handle.total}
            if not handle.commits_own_progress:
                values.update(processed=handle.processed, failed=handle.failed)
            self._write_soon(Progress(handle.id, values, owner=self.owner,
                                      attempt=handle.attempts))

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.flush()


async def watch_cancel_requests(
    store: JobStore, registry: Mapping[int, JobHandle], interval: float
) -> None:
    """Act on cancel requests another daemon recorded in the table for our jobs."""
    while True:
        await trio.sleep(interval)
        held = [handle.id for handle in registry.values() if handle.stop_reason is None]
        if not held:
            continue
        try:
            requested = await store.cancel_requests_among(held)
        except Exception as error:
            log.warning("checking for cancel requests failed: %s", error)
            continue
        for job_id, requested_at in requested:
            handle = registry.get(job_id)
            if handle is not None and handle.stop_reason is None:
                log.info("job %d: cancel requested through another daemon", job_id)
                handle.cancel_requested_at = requested_at
                handle.stop(StopReason.CANCEL)


#: How often the notification connection is checked, and retried after a failure.
LISTEN_CHECK_S = 5.0


async def listen_for_peers(
    store: JobStore, signals: ClusterSignals, listening: Callable[[bool], None]
) -> None:
    """Keep the store's notifications coming; ``listening`` is told when they start
    and stop (meanwhile the claimer and the cancel watcher poll)."""
    while True:
        try:
            async with store.listen(signals) as alive:
                listening(True)
                try:
                    while await alive():  # noqa: ASYNC110 - a connection check, no event
                        await trio.sleep(LISTEN_CHECK_S)
                finally:
                    listening(False)
            log.warning("the cluster notification connection stopped answering; polling")
        except Exception as error:
            log.warning("listening for other daemons failed (%s); polling meanwhile", error)
        await trio.sleep(LISTEN_CHECK_S)
