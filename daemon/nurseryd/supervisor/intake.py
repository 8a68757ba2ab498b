"""Intake: queue slots and the channel from the handlers to the dispatcher.

Backpressure comes before durability: a slot is reserved *before* a job is
recorded, so a full queue is refused with nothing written, and a recorded job
always has a place in the channel. ``waiting`` counts accepted jobs that do not
run yet (in the channel, or waiting for their kind's limiter); it is released
when a job starts, or ends without starting.
"""

from __future__ import annotations

import trio

from ..errors import Draining, QueueFull
from .handle import JobHandle


class Intake:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.waiting = 0
        self.accepting = True
        self._send, self.receive = trio.open_memory_channel[JobHandle](queue_size)
        self._slot_freed = trio.Event()

    def reserve(self) -> None:
        """Take a slot for a job about to be recorded, or refuse (503 upstream)."""
        if not self.accepting:
            raise Draining()
        if self.waiting >= self.queue_size:
            raise QueueFull(self.queue_size)
        self.waiting += 1

    def take_slot(self) -> None:
        """A slot for a job that is already recorded (the backlog)."""
        self.waiting += 1

    def release(self) -> None:
        self.waiting -= 1
        self._slot_freed.set()
        self._slot_freed = trio.Event()

    def hand_off(self, handle: JobHandle) -> bool:
        """Send a recorded job to the dispatcher; False once intake has closed."""
        try:
            self._send.send_nowait(handle)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def send(self, handle: JobHandle) -> bool:
        try:
            await self._send.send(handle)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    async def wait_for_room(self) -> None:
        """Until a slot is free (or intake stopped accepting)."""
        while self.waiting >= self.queue_size and self.accepting:
            await self._slot_freed.wait()

    def stop_accepting(self) -> None:
        self.accepting = False
        self._slot_freed.set()

    def close(self) -> None:
        """No more hand-offs: the dispatcher ends once the channel is empty."""
        self.stop_accepting()
        self._send.close()
