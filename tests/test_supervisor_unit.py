"""The supervisor's subtle paths on the in-memory job store, under trio's MockClock.

No PostgreSQL, no HTTP: the supervisor runs on :class:`MemoryJobStore`, which
keeps the same rules as the real store (lifecycle transitions, guards by owner
and attempt), and the ``autojump_clock`` fixture makes grace periods and
timeouts take no real time. Each test asserts what the job's row ends up as.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from nurseryd.config import KindLimits, load_settings
from nurseryd.errors import Draining, QueueFull
from nurseryd.kinds.base import JobContext, JobKind, KindRegistry
from nurseryd.store.memory import MemoryJobStore
from nurseryd.supervisor import Supervisor

OWNER = "test-host:1:owner"
#: Events the "gate" kind waits on, by the job's ``name`` parameter.
GATES: dict[str, trio.Event] = {}
STARTED: dict[str, trio.Event] = {}


async def _nap(ctx: JobContext) -> None:
    ctx.report(total=1, processed=0)
    await trio.sleep(float(ctx.params["seconds"]))
    ctx.report(processed=1)
    ctx.set_result({"slept": ctx.params["seconds"]})


async def _gate(ctx: JobContext) -> None:
    STARTED.setdefault(ctx.params["name"], trio.Event()).set()
    await GATES.setdefault(ctx.params["name"], trio.Event()).wait()


#: How many of its first attempts the "flaky" kind fails, by the job's ``name``.
FLAKY: dict[str, int] = {}


async def _flaky(ctx: JobContext) -> None:
    """Fails its first FLAKY[name] attempts the way a dropped database connection
    does (or, with ``permanent``, with an error no retry would cure)."""
    ctx.report(total=2, processed=1)
    if ctx.attempts <= FLAKY[ctx.params["name"]]:
        error: Exception = ValueError("column \"x\" does not exist") \
            if ctx.params.get("permanent") else ConnectionResetError("connection reset by peer")
        if not ctx.params.get("nested"):
            raise error
        async with trio.open_nursery():  # raised through a nursery: an exception group
            raise error
    ctx.report(processed=2)
    ctx.set_result({"attempt": ctx.attempts})


async def _chatty(ctx: JobContext) -> None:
    """Notes ``count`` lines for its log, then fails if ``fail`` is set."""
    for index in range(int(ctx.params["count"])):
        ctx.note(ctx.params.get("text", f"line {index}"), level=ctx.params.get("level", "info"))
    if ctx.params.get("fail"):
        raise ValueError("gave up")


def _any_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return dict(params)


def _kinds() -> KindRegistry:
    registry = KindRegistry()
    registry.add(JobKind("nap", _nap, _any_params))
    registry.add(JobKind("gate", _gate, _any_params))
    registry.add(JobKind("flaky", _flaky, _any_params))
    registry.add(JobKind("chatty", _chatty, _any_params))
    return registry


@pytest.fixture(autouse=True)
def _fresh_gates() -> None:
    GATES.clear()
    STARTED.clear()
    FLAKY.clear()


@asynccontextmanager
async def supervisor(
    store: MemoryJobStore | None = None, *, grace: float = 20.0, queue_size: int = 100,
    concurrency: int = 10, owner: str = OWNER, shared_queue: bool = False,
    cluster_concurrency: int | None = None,
) -> AsyncIterator[tuple[Supervisor, MemoryJobStore]]:
    """One supervisor on ``store``; several on one store are a cluster (each one's
    ``owner`` in ``store.live_owners`` while it counts as alive)."""
    store = store or MemoryJobStore()
    base = load_settings(None, environ={})
    limits = KindLimits(default_timeout_s=3600, max_timeout_s=86400, concurrency=concurrency)
    settings = dataclasses.replace(
        base, shutdown_grace=grace, queue_size=queue_size,
        kinds={"nap": limits, "chatty": limits, "gate": dataclasses.replace(
                   limits, cluster_concurrency=cluster_concurrency),
               "flaky": dataclasses.replace(limits, max_attempts=3)},
        cluster=dataclasses.replace(base.cluster, shared_queue=shared_queue))
    sup = Supervisor(None, settings, _kinds(), owner, store=store)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        try:
            # Virtual time: a test that would wait forever fails in a moment instead.
            with trio.fail_after(7 * 86400):
                yield sup, store
        finally:  # a failing test must not leave the supervisor running
            sup.request_stop()
            sup.request_stop()


async def until_status(store: MemoryJobStore, job_id: int, status: str) -> dict[str, Any]:
    """Wait for the row to reach ``status``, woken by every committed change."""
    changed = trio.Event()
    unsubscribe = store.feed.subscribe(lambda _: changed.set())
    try:
        while store.rows[job_id]["status"] != status:
            await changed.wait()
            changed = trio.Event()
    finally:
        unsubscribe()
    return store.rows[job_id]


async def test_a_job_runs_to_completion_through_the_transitions(autojump_clock: Any) -> None:
    async with supervisor() as (sup, store):
        seen: list[str | None] = []
        store.feed.subscribe(lambda change: seen.append(
            change.event.value if change.event else None))
        job = await sup.submit("nap", {"seconds": 30})
        row = await until_status(store, job["id"], "completed")
    assert (row["attempts"], row["processed"], row["total"], row["result"]) == \
        (1, 1, 1, {"slept": 30})
    assert row["owner"] == OWNER and row["finished_at"] is not None
    assert seen == [None, "start", "complete"]


async def test_grace_expiry_interrupts_the_job_back_to_queued(autojump_clock: Any) -> None:
    async with supervisor(grace=20) as (sup, store):
        short = await sup.submit("nap", {"seconds": 15})  # ends within the grace
        long = await sup.submit("nap", {"seconds": 60})   # does not
        await until_status(store, long["id"], "running")
        start = trio.current_time()
        sup.request_stop()
        with pytest.raises(Draining):
            await sup.submit("nap", {"seconds": 1})
        await until_status(store, long["id"], "queued")
        assert trio.current_time() - start == pytest.approx(20, abs=0.5)
    assert store.rows[short["id"]]["status"] == "completed"
    interrupted = store.rows[long["id"]]
    assert (interrupted["attempts"], interrupted["error"], interrupted["finished_at"]) == \
        (1, None, None)
    assert len(store.rows) == 2  # the refused submission recorded nothing


async def test_a_second_stop_request_ends_the_grace_at_once(autojump_clock: Any) -> None:
    async with supervisor(grace=300) as (sup, store):
        job = await sup.submit("nap", {"seconds": 3600})
        await until_status(store, job["id"], "running")
        start = trio.current_time()
        sup.request_stop()
        await trio.sleep(1)
        assert store.rows[job["id"]]["status"] == "running"  # still in its grace
        sup.request_stop()
        await until_status(store, job["id"], "queued")
        assert trio.current_time() - start < 2


async def test_a_full_queue_refuses_before_recording(autojump_clock: Any) -> None:
    async with supervisor(queue_size=2, concurrency=1) as (sup, store):
        first = await sup.submit("gate", {"name": "a"})
        await STARTED.setdefault("a", trio.Event()).wait()  # running: its slot is free again
        waiting = [await sup.submit("gate", {"name": name}) for name in ("b", "c")]
        with pytest.raises(QueueFull):
            await sup.submit("gate", {"name": "d"})
        assert len(store.rows) == 3
        assert sup.statistics().queued == 2 and sup.statistics().running == 1
        GATES.setdefault("a", trio.Event()).set()
        await until_status(store, first["id"], "completed")
        await STARTED.setdefault("b", trio.Event()).wait()
        # One slot free again: the next submission is accepted.
        await sup.submit("gate", {"name": "e"})
        for name in "bce":
            GATES.setdefault(name, trio.Event()).set()
        for job in waiting:
            await until_status(store, job["id"], "completed")


async def test_cancel_during_the_backlog_load_cancels_once_and_never_starts(
    autojump_clock: Any,
) -> None:
    store = MemoryJobStore()
    # Jobs of ours that nothing holds (their hand-off was lost): the backlog scan
    # loads them. (A dead owner's jobs are released and claimed instead.)
    for name in ("x", "y"):
        await store.insert([_new_job(name, OWNER)])
    slow_load = store.gates["queued_for"] = trio.Event()  # the backlog load waits
    async with trio.open_nursery() as nursery:
        async with supervisor(store) as (sup, _):
            pass_through = trio.Event()

            async def cancel_x() -> None:
                job = await sup.cancel(1)
                assert job["status"] == "cancelled"
                pass_through.set()

            nursery.start_soon(cancel_x)
            await trio.sleep(1)
            assert store.rows[1]["status"] == "queued"  # the cancel waits for the load
            slow_load.set()
            await pass_through.wait()
            await until_status(store, 2, "completed")
    assert store.rows[1]["status"] == "cancelled"
    assert store.rows[1]["attempts"] == 0  # never started
    assert store.rows[1]["error"] == "cancelled on request"


def _new_job(name: str, owner: str | None = "dead-host:9:gone") -> Any:
    from nurseryd.store.base import NewJob

    GATES.setdefault(name, trio.Event()).set()
    return NewJob("gate", {"name": name}, 60.0, owner)


async def test_cancel_racing_the_final_write_keeps_the_real_ending(autojump_clock: Any) -> None:
    async with supervisor() as (sup, store):
        job = await sup.submit("gate", {"name": "a"})
        await STARTED.setdefault("a", trio.Event()).wait()
        slow_write = store.gates["apply"] = trio.Event()  # the final write waits
        GATES.setdefault("a", trio.Event()).set()
        await trio.sleep(0.1)  # the job returned; its final write is in flight
        async with trio.open_nursery() as nursery:
            answers: list[dict[str, Any]] = []

            async def cancel() -> None:
                answers.append(await sup.cancel(job["id"]))

            nursery.start_soon(cancel)
            await trio.sleep(0.1)
            slow_write.set()
        assert answers[0]["status"] == "completed"
    assert store.rows[job["id"]]["status"] == "completed"
    assert store.rows[job["id"]]["error"] is None


async def test_a_lost_claim_writes_nothing(autojump_clock: Any) -> None:
    """Another daemon took the row (it adopted it): this attempt's writes are refused."""
    async with supervisor() as (sup, store):
        job = await sup.submit("gate", {"name": "a"})
        await STARTED.setdefault("a", trio.Event()).wait()
        store.rows[job["id"]].update(owner="other-daemon", status="running", attempts=2)
        GATES["a"].set()
        await trio.sleep(1)
        assert sup.statistics().held == 0
    row = store.rows[job["id"]]
    assert (row["owner"], row["status"], row["attempts"]) == ("other-daemon", "running", 2)


async def test_a_timeout_is_the_jobs_own_cancel_scope(autojump_clock: Any) -> None:
    async with supervisor() as (sup, store):
        job = await sup.submit("nap", {"seconds": 100}, timeout_s=5)
        start = trio.current_time()
        row = await until_status(store, job["id"], "timed_out")
        assert trio.current_time() - start == pytest.approx(5, abs=0.5)
    assert row["error"] == "timed out after 5 s (the job's time limit)"


async def test_a_final_write_is_retried_through_a_database_blip(autojump_clock: Any) -> None:
    async with supervisor() as (sup, store):
        job = await sup.submit("gate", {"name": "a"})
        await STARTED.setdefault("a", trio.Event()).wait()
        store.failures["apply"] = 6  # the next six writes fail: ~6 s of back-off
        GATES.setdefault("a", trio.Event()).set()
        row = await until_status(store, job["id"], "completed")
        assert store.failures["apply"] == 0
    assert row["attempts"] == 1


async def test_the_rescan_runs_a_committed_job_nothing_holds(autojump_clock: Any) -> None:
    """A job whose hand-off was lost (its request died) is found in the table."""
    from nurseryd.store.base import NewJob

    async with supervisor() as (sup, store):
        GATES.setdefault("s", trio.Event()).set()
        [row] = await store.insert([NewJob("gate", {"name": "s"}, 60.0, OWNER)])
        start = trio.current_time()
        await until_status(store, row["id"], "completed")
        assert trio.current_time() - start <= 6


async def test_a_dead_peers_jobs_and_our_unheld_running_rows_are_rescued(
    autojump_clock: Any,
) -> None:
    from nurseryd.store.base import NewJob

    store = MemoryJobStore()
    store.live_owners.add("peer:2:alive")
    async with supervisor(store) as (sup, _):
        for name in ("p", "q", "r"):
            GATES.setdefault(name, trio.Event()).set()
        [peer] = await store.insert([NewJob("gate", {"name": "p"}, 60.0, "peer:2:alive")])
        [dead] = await store.insert([NewJob("gate", {"name": "q"}, 60.0, "peer:3:dead")])
        [ours] = await store.insert([NewJob("gate", {"name": "r"}, 60.0, OWNER)])
        for row in (peer, dead, ours):
            store.rows[row["id"]].update(status="running", attempts=1)
        await until_status(store, dead["id"], "completed")
        await until_status(store, ours["id"], "completed")
        await trio.sleep(30)
        assert store.rows[peer["id"]]["status"] == "running"  # a live peer's: left alone
    assert store.rows[dead["id"]]["attempts"] == 2 and store.rows[dead["id"]]["owner"] == OWNER


async def test_a_lost_owner_lock_requeues_running_jobs_and_pauses_starts(
    autojump_clock: Any,
) -> None:
    async with supervisor() as (sup, store):
        job = await sup.submit("nap", {"seconds": 100})
        await until_status(store, job["id"], "running")
        sup.claim_lost()
        row = await until_status(store, job["id"], "queued")
        assert row["attempts"] == 1 and row["owner"] == OWNER
        await trio.sleep(60)  # rescans come and go: nothing starts without the claim
        assert store.rows[job["id"]]["status"] == "queued"
        other = await sup.submit("nap", {"seconds": 1})
        await trio.sleep(10)
        assert store.rows[other["id"]]["status"] == "queued"
        sup.claim_regained()
        await until_status(store, other["id"], "completed")
        done = await until_status(store, job["id"], "completed")
    assert done["attempts"] == 2


async def test_a_transient_failure_requeues_the_job_and_it_runs_again(
    autojump_clock: Any,
) -> None:
    FLAKY["a"] = 2  # the first two attempts lose their connection; the third completes
    async with supervisor() as (sup, store):
        seen: list[tuple[str | None, str | None]] = []
        store.feed.subscribe(lambda change: seen.append(
            (change.event.value if change.event else None, change.row["error"])))
        job = await sup.submit("flaky", {"name": "a"})
        start = trio.current_time()
        row = await until_status(store, job["id"], "completed")
        waited = trio.current_time() - start
    assert (row["attempts"], row["result"], row["error"]) == (3, {"attempt": 3}, None)
    assert [event for event, _ in seen] == [None, "start", "retry", "start", "retry", "start",
                                            "complete"]
    retry_error = seen[2][1]
    assert retry_error is not None and "attempt 1 failed on a transient error" in retry_error
    assert "connection reset by peer" in retry_error
    assert 1 + 2 <= waited < 2 + 4  # equal jitter: [1, 2) s, then [2, 4) s


@pytest.mark.parametrize("nested", [False, True])
async def test_transient_failures_fail_the_job_once_its_attempts_are_spent(
    autojump_clock: Any, nested: bool,
) -> None:
    FLAKY["a"] = 99
    async with supervisor() as (sup, store):
        job = await sup.submit("flaky", {"name": "a", "nested": nested})
        row = await until_status(store, job["id"], "failed")
    assert row["attempts"] == 3  # the kind's max_attempts
    assert row["error"] == "connection reset by peer"  # the leaf's text, not the group's


@pytest.mark.parametrize("nested", [False, True])
async def test_a_permanent_failure_is_not_retried(autojump_clock: Any, nested: bool) -> None:
    FLAKY["a"] = 99
    async with supervisor() as (sup, store):
        job = await sup.submit("flaky", {"name": "a", "permanent": True, "nested": nested})
        row = await until_status(store, job["id"], "failed")
    assert row["attempts"] == 1 and row["error"] == 'column "x" does not exist'


async def test_a_cancel_during_the_back_off_ends_the_job_without_another_start(
    autojump_clock: Any,
) -> None:
    FLAKY["a"] = 1
    async with supervisor() as (sup, store):
        job = await sup.submit("flaky", {"name": "a"})
        await until_status(store, job["id"], "running")
        await until_status(store, job["id"], "queued")  # requeued: now in its back-off
        assert sup.statistics().held == 1 and sup.statistics().queued == 1
        answer = await sup.cancel(job["id"])
        assert answer["status"] == "cancelled"
        await trio.sleep(120)  # long past any back-off: nothing starts it again
        assert sup.statistics().held == 0 and sup.statistics().queued == 0
    row = store.rows[job["id"]]
    assert (row["status"], row["attempts"], row["error"]) == ("cancelled", 1,
                                                              "cancelled on request")


async def test_a_drain_during_the_back_off_leaves_the_job_queued(autojump_clock: Any) -> None:
    FLAKY["a"] = 1
    async with supervisor() as (sup, store):
        job = await sup.submit("flaky", {"name": "a"})
        await until_status(store, job["id"], "running")
        await until_status(store, job["id"], "queued")
        handle = sup.registry[job["id"]]
        start = trio.current_time()
        sup.request_stop()
        await handle.finished.wait()
        assert trio.current_time() - start < 1  # a waiting job does not wait for the grace
    row = store.rows[job["id"]]
    assert (row["status"], row["attempts"], row["finished_at"]) == ("queued", 1, None)


async def test_a_kinds_notes_land_before_its_final_status(autojump_clock: Any) -> None:
    async with supervisor() as (sup, store):
        seen_at_the_end: list[int] = []
        store.feed.subscribe(lambda change: seen_at_the_end.append(len(store.notes))
                             if change.event is not None and change.event.value == "fail"
                             else None)
        job = await sup.submit("chatty", {"count": 3, "fail": True, "level": "warning"})
        await until_status(store, job["id"], "failed")
    assert [(note.job_id, note.attempt, note.level, note.message) for note in store.notes] == [
        (job["id"], 1, "warning", f"line {index}") for index in range(3)]
    assert seen_at_the_end == [3]  # every note had landed when the status changed


async def test_notes_are_bounded_cut_and_redacted(autojump_clock: Any) -> None:
    from nurseryd.kinds.base import MAX_NOTE_CHARS, MAX_NOTES_PER_ATTEMPT

    async with supervisor() as (sup, store):
        many = await sup.submit("chatty", {"count": MAX_NOTES_PER_ATTEMPT + 50})
        await until_status(store, many["id"], "completed")
        secret = await sup.submit("chatty", {
            "count": 1, "text": "GET https://bob:hunter2@feeds.example/x?token=abc " + "y" * 5000})
        await until_status(store, secret["id"], "completed")
        bad_level = await sup.submit("chatty", {"count": 1, "level": "shout"})
        failed = await until_status(store, bad_level["id"], "failed")
    notes = [note for note in store.notes if note.job_id == many["id"]]
    assert len(notes) == MAX_NOTES_PER_ATTEMPT + 1
    assert notes[-1].level == "warning" and "not kept" in notes[-1].message
    [cut] = [note for note in store.notes if note.job_id == secret["id"]]
    assert len(cut.message) <= MAX_NOTE_CHARS
    assert "hunter2" not in cut.message and "abc" not in cut.message
    assert "level must be one of" in failed["error"]


# -- several supervisors on one store: a cluster ---------------------------------------

A, B = "host-a:1:a", "host-b:2:b"


@asynccontextmanager
async def cluster(**options: Any) -> AsyncIterator[tuple[Supervisor, Supervisor, MemoryJobStore]]:
    store = MemoryJobStore()
    store.live_owners |= {A, B}
    async with supervisor(store, owner=A, **options) as (first, _), \
            supervisor(store, owner=B, **options) as (second, _):
        yield first, second, store


async def test_a_job_without_a_free_slot_here_runs_on_a_peer_that_has_one(
    autojump_clock: Any,
) -> None:
    async with cluster(shared_queue=True, concurrency=1) as (a, b, store):
        first = await a.submit("gate", {"name": "1"})
        await STARTED.setdefault("1", trio.Event()).wait()
        second = await a.submit("gate", {"name": "2"})  # no slot on A: into the table
        assert store.rows[second["id"]]["owner"] is None
        start = trio.current_time()
        await STARTED.setdefault("2", trio.Event()).wait()
        assert trio.current_time() - start < 0.01  # woken by the notification, no poll
        third = await a.submit("gate", {"name": "3"})  # neither has a slot: it waits
        await trio.sleep(30)
        assert store.rows[third["id"]]["status"] == "queued"
        assert a.claimer.claimed == 0 and b.claimer.claimed == 1
        GATES.setdefault("1", trio.Event()).set()  # A's slot frees: A claims the third
        await STARTED.setdefault("3", trio.Event()).wait()
        for name in "23":
            GATES.setdefault(name, trio.Event()).set()
        for job in (first, second, third):
            await until_status(store, job["id"], "completed")
    owners = [store.rows[job["id"]]["owner"] for job in (first, second, third)]
    assert owners == [A, B, A]
    assert [store.rows[job["id"]]["attempts"] for job in (first, second, third)] == [1, 1, 1]


async def test_without_a_shared_queue_a_job_waits_for_its_own_daemon(
    autojump_clock: Any,
) -> None:
    async with cluster(concurrency=1) as (a, b, store):
        first = await a.submit("gate", {"name": "1"})
        second = await a.submit("gate", {"name": "2"})
        await trio.sleep(30)
        assert store.rows[second["id"]]["status"] == "queued"
        assert store.rows[second["id"]]["owner"] == A and b.claimer.claimed == 0
        for name in "12":
            GATES.setdefault(name, trio.Event()).set()
        await until_status(store, second["id"], "completed")
        await until_status(store, first["id"], "completed")


async def test_a_cluster_wide_limit_holds_across_daemons(autojump_clock: Any) -> None:
    running: list[int] = []
    most = 0

    def count(change: Any) -> None:
        nonlocal most
        row = change.row
        if row["status"] == "running" and row["id"] not in running:
            running.append(row["id"])
        elif row["status"] != "running" and row["id"] in running:
            running.remove(row["id"])
        most = max(most, len(running))

    async with cluster(cluster_concurrency=2) as (a, b, store):
        store.feed.subscribe(count)
        jobs = [await (a if index % 2 else b).submit("gate", {"name": str(index)})
                for index in range(6)]
        assert all(store.rows[job["id"]]["owner"] in (A, B, None) for job in jobs)
        await trio.sleep(10)
        assert len(running) == 2
        for index in range(6):
            GATES.setdefault(str(index), trio.Event()).set()
            await trio.sleep(0.5)
        for job in jobs:
            await until_status(store, job["id"], "completed")
    assert most == 2


async def test_a_cancel_through_one_daemon_stops_a_job_on_another_at_once(
    autojump_clock: Any,
) -> None:
    async with cluster() as (a, b, store):
        job = await a.submit("nap", {"seconds": 3600})
        await until_status(store, job["id"], "running")
        start = trio.current_time()
        answer = await b.cancel(job["id"], cancelled_by="ops")
        assert trio.current_time() - start < 0.01  # notifications both ways, no poll
        assert (answer["status"], answer["cancelled_by"]) == ("cancelled", "ops")
    assert store.rows[job["id"]]["owner"] == A


async def test_a_dead_members_jobs_are_taken_over_after_the_confirm_window(
    autojump_clock: Any,
) -> None:
    from nurseryd.supervisor.core import TAKEOVER_CONFIRM_S

    async with cluster() as (a, b, store):
        job = await a.submit("nap", {"seconds": 60})
        await until_status(store, job["id"], "running")
        # A's lock connection is cut: A stops its job; its lock is free from now on.
        a.claim_lost()
        store.live_owners.discard(A)
        lost = trio.current_time()
        await until_status(store, job["id"], "queued")
        row = await until_status(store, job["id"], "running")
        took = trio.current_time() - lost
        assert row["owner"] == B and row["attempts"] == 2
        assert TAKEOVER_CONFIRM_S <= took <= TAKEOVER_CONFIRM_S + 1.0
        a.claim_regained()  # A is back: what it held was fenced, nothing of it runs
        done = await until_status(store, job["id"], "completed")
    assert (done["owner"], done["attempts"]) == (B, 2)
    assert A not in store.members


async def test_a_clean_stop_hands_its_queued_jobs_to_the_peers(autojump_clock: Any) -> None:
    store = MemoryJobStore()
    store.live_owners |= {A, B}
    async with supervisor(store, owner=B, concurrency=1) as (b, _):
        async with supervisor(store, owner=A, concurrency=1, grace=0) as (a, _):
            first = await a.submit("gate", {"name": "1"})
            second = await a.submit("gate", {"name": "2"})  # waits on A's own slot
            await STARTED.setdefault("1", trio.Event()).wait()
        # A stopped cleanly: its queued (and interrupted) jobs went to the pool at once.
        GATES.setdefault("1", trio.Event()).set()
        GATES.setdefault("2", trio.Event()).set()
        await until_status(store, first["id"], "completed")
        await until_status(store, second["id"], "completed")
    assert {store.rows[job["id"]]["owner"] for job in (first, second)} == {B}


async def test_a_job_that_becomes_claimable_during_a_short_claim_is_not_forgotten(
    autojump_clock: Any,
) -> None:
    async with cluster(shared_queue=True, concurrency=2) as (a, b, store):
        for name in "12":
            await a.submit("gate", {"name": name})
            await STARTED.setdefault(name, trio.Event()).wait()
        answer = store.gates["claim:answer"] = trio.Event()
        third = await a.submit("gate", {"name": "3"})  # into the table: B claims it...
        await trio.sleep(0.1)  # (virtual time) ...and B's answer is held on its way back
        assert store.rows[third["id"]]["owner"] == B
        fourth = await a.submit("gate", {"name": "4"})  # claimable while B's claim is out
        del store.gates["claim:answer"]
        answer.set()  # B's claim comes back with one job where it wanted two
        released = trio.current_time()
        await STARTED.setdefault("4", trio.Event()).wait()
        assert trio.current_time() - released < b.claimer.poll_s  # woken, not polled
        assert store.rows[fourth["id"]]["owner"] == B
        for name in "1234":
            GATES.setdefault(name, trio.Event()).set()
