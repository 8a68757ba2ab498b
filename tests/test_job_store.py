"""The PostgreSQL job store: the lifecycle table is the law in SQL too."""

from __future__ import annotations

from nurseryd.db import Database
from nurseryd.db.jobs import PostgresJobStore, status_constraint
from nurseryd.lifecycle import Event, Status
from nurseryd.store.base import JobChanged, NewJob, Progress, Transition, in_rounds

OWNER = "host:1:me"


async def test_the_tables_status_check_is_the_status_enum(db: Database) -> None:
    assert await status_constraint(db) == sorted(status.value for status in Status)


async def _new(store: PostgresJobStore, owner: str = OWNER) -> int:
    [row] = await store.insert([NewJob("noop", {}, 60.0, owner)])
    assert row is not None
    return row["id"]


async def test_transitions_follow_the_table_and_publish_what_committed(db: Database) -> None:
    store = PostgresJobStore(db)
    seen: list[JobChanged] = []
    store.feed.subscribe(seen.append)
    job = await _new(store)
    [started] = await store.apply([Transition(job, Event.START, {"attempts": 1},
                                              owner=OWNER, attempt=0)])
    assert started is not None and started["status"] == "running"
    # Completing is allowed from running; starting again is not (guard: status).
    again, done = await store.apply([
        Transition(job, Event.START, {"attempts": 2}, owner=OWNER, attempt=1),
    ]) + await store.apply([Transition(job, Event.COMPLETE, {"processed": 3},
                                       owner=OWNER, attempt=1)])
    assert again is None
    assert done is not None and (done["status"], done["processed"]) == ("completed", 3)
    # Terminal is final: no event leaves it, so every later change is refused.
    for event in Event:
        [refused] = await store.apply([Transition(job, event)])
        assert refused is None, event
    assert (await store.get(job))["status"] == "completed"
    assert [(change.event, change.row["status"]) for change in seen] == [
        (None, "queued"), (Event.START, "running"), (Event.COMPLETE, "completed")]


async def test_writes_of_an_attempt_that_lost_its_claim_change_nothing(db: Database) -> None:
    store = PostgresJobStore(db)
    job = await _new(store)
    await store.apply([Transition(job, Event.START, {"attempts": 1}, owner=OWNER, attempt=0)])
    # Another daemon took the job over (say, after our lock was lost) and runs attempt 2.
    await db.execute("UPDATE jobs SET owner = 'other', attempts = 2 WHERE id = $1", job)
    progress, final = await store.apply([
        Progress(job, {"processed": 99}, owner=OWNER, attempt=1),
    ]) + await store.apply([Transition(job, Event.FAIL, {"error": "stale"}, owner=OWNER,
                                       attempt=1)])
    assert progress is None and final is None
    row = await store.get(job)
    assert (row["status"], row["processed"], row["error"], row["owner"]) == \
        ("running", 0, None, "other")


async def test_progress_then_final_in_one_batch_is_one_write(db: Database) -> None:
    store = PostgresJobStore(db)
    job = await _new(store)
    await store.apply([Transition(job, Event.START, {"attempts": 1}, owner=OWNER, attempt=0)])
    changes = [Progress(job, {"processed": 1}, owner=OWNER, attempt=1),
               Transition(job, Event.COMPLETE, {"total": 5}, owner=OWNER, attempt=1),
               Progress(job, {"processed": 7}, owner=OWNER, attempt=1)]
    assert len(in_rounds(changes)) == 2  # a progress after the ending waits for it
    first, final, late = await store.apply(changes)
    assert first == final and final is not None
    assert (final["status"], final["processed"], final["total"]) == ("completed", 1, 5)
    assert late is None  # refused: the job is no longer running


async def test_cancel_queued_takes_ours_and_a_dead_daemons(db: Database) -> None:
    store = PostgresJobStore(db)
    mine = await _new(store)
    dead = await _new(store, owner="dead:1:x")
    assert (await store.cancel_queued(mine, OWNER))["status"] == "cancelled"
    assert (await store.cancel_queued(dead, OWNER))["status"] == "cancelled"
    assert await store.cancel_queued(mine, OWNER) is None  # already terminal
