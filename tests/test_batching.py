"""Group commit: what arrives during a flush goes out together, results reach
the right caller, and nobody waits forever."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nurseryd.batching import CommitterClosed, GroupCommitter


async def test_items_arriving_during_a_flush_share_the_next_one() -> None:
    batches: list[list[int]] = []
    release = trio.Event()

    async def flush(items: list[int]) -> list[int]:
        batches.append(items)
        if len(batches) == 1:
            await release.wait()  # hold the first flush open
        return [item * 10 for item in items]

    committer = GroupCommitter("test", flush)
    results: dict[int, int] = {}

    async def submit(item: int) -> None:
        results[item] = await committer.submit(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        nursery.start_soon(submit, 1)
        await trio.testing.wait_all_tasks_blocked()
        for item in (2, 3, 4):
            nursery.start_soon(submit, item)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        committer.close()
    assert [sorted(batch) for batch in batches] == [[1], [2, 3, 4]]  # task order is random
    assert results == {1: 10, 2: 20, 3: 30, 4: 40}


async def test_a_failed_flush_fails_its_callers_only() -> None:
    async def flush(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky batch")
        return items

    committer = GroupCommitter("test", flush)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        with pytest.raises(ValueError, match="unlucky"):
            await committer.submit(13)
        assert await committer.submit(7) == 7
        committer.close()


async def test_close_writes_what_is_pending_then_refuses() -> None:
    written: list[int] = []

    async def flush(items: list[int]) -> list[None]:
        written.extend(items)
        return [None] * len(items)

    committer = GroupCommitter("test", flush)
    committer.submit_nowait(1)
    committer.submit_nowait(2)
    committer.close()
    await committer.run()  # returns once the pending writes are done
    assert written == [1, 2]
    with pytest.raises(CommitterClosed):
        committer.submit_nowait(3)


async def test_waiters_are_released_if_the_committer_is_cancelled() -> None:
    async def flush(items: list[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    committer = GroupCommitter("test", flush)
    outcome: list[BaseException] = []

    async def submit() -> None:
        try:
            await committer.submit(1)
        except CommitterClosed as error:
            outcome.append(error)

    async with trio.open_nursery() as outer:
        outer.start_soon(submit)
        async with trio.open_nursery() as inner:
            inner.start_soon(committer.run)
            await trio.testing.wait_all_tasks_blocked()
            inner.cancel_scope.cancel()
    assert len(outcome) == 1 and "cancelled during this write" in str(outcome[0])


async def test_a_failing_batch_is_retried_item_by_item_so_only_the_bad_one_fails() -> None:
    release = trio.Event()
    calls: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            await release.wait()
        if 13 in items:
            raise ValueError("13 cannot be stored")
        return [item * 10 for item in items]

    committer = GroupCommitter("test", flush)
    outcomes: dict[int, object] = {}

    async def submit(item: int) -> None:
        try:
            outcomes[item] = await committer.submit(item)
        except ValueError as error:
            outcomes[item] = str(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        nursery.start_soon(submit, 0)
        await trio.testing.wait_all_tasks_blocked()
        for item in (12, 13, 14):
            nursery.start_soon(submit, item)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        committer.close()
    assert outcomes == {0: 0, 12: 120, 13: "13 cannot be stored", 14: 140}
