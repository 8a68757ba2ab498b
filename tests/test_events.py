"""The event stream as a client sees it: real HTTP (httpx streaming) against the
real daemon and PostgreSQL, including a restart and a second daemon."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from nurseryd.observe.events import EVENTS_SECTION, EventFilter, EventHub, EventSettings, JobEvent
from nurseryd.store.base import ChangeFeed, now
from tests.daemon_process import DaemonProcess, make_settings, run_daemon


@dataclass
class Frame:
    id: int | None
    event: str | None
    data: dict[str, Any] | None
    comment: str | None = None


class SseReader:
    """Frames of one ``text/event-stream`` response, as an EventSource parses them."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 15) -> Frame:
        """The next frame with data or a comment; ``StopAsyncIteration`` at the end."""
        fields: dict[str, str] = {}
        comment = None
        with trio.fail_after(timeout):
            async for line in self._lines:
                if line == "":
                    if "data" in fields or comment is not None:
                        return Frame(int(fields["id"]) if "id" in fields else None,
                                     fields.get("event"),
                                     json.loads(fields["data"]) if "data" in fields else None,
                                     comment)
                    continue
                if line.startswith(":"):
                    comment = line[1:].strip()
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        raise StopAsyncIteration

    async def until(self, predicate: Any, timeout: float = 15) -> list[Frame]:
        """Data frames up to and including the first that ``predicate`` accepts."""
        seen: list[Frame] = []
        with trio.fail_after(timeout):
            while True:
                frame = await self.next(timeout)
                if frame.data is None:
                    continue
                seen.append(frame)
                if predicate(frame):
                    return seen


@asynccontextmanager
async def open_stream(client: httpx.AsyncClient, url: str,
                      headers: dict[str, str] | None = None) -> AsyncIterator[SseReader]:
    async with client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200, (await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)


def _finished(job_id: int) -> Any:
    return lambda frame: frame.data["id"] == job_id and frame.event == "finished"


async def test_one_event_per_change_with_ids_rate_and_eta(database_url: str,
                                                          state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        async with open_stream(daemon.client, "/events?kind=sleep") as stream:
            job = (await daemon.client.post("/jobs/sleep", json={"seconds": 1.5})).json()
            frames = await stream.until(_finished(job["id"]))
        names = [frame.event for frame in frames]
        assert names[0] == "created" and names[1] == "started" and names[-1] == "finished"
        assert "progress" in names
        durable = [frame for frame in frames if frame.event != "progress"]
        assert all(frame.id is not None for frame in durable)
        assert [frame.id for frame in durable] == sorted(frame.id for frame in durable)
        assert all(frame.id is None for frame in frames if frame.event == "progress")
        last = frames[-1].data
        assert last is not None
        assert last["status"] == "completed" and last["eta_s"] == 0
        assert last["rate"] is not None and last["rate"] > 0
        progress = next(frame.data for frame in frames if frame.event == "progress")
        assert progress is not None and {"rate", "eta_s", "total", "processed"} <= set(progress)


async def test_filters_and_resume_replay_from_the_table(database_url: str,
                                                        state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        async with open_stream(daemon.client, "/events?status=completed") as stream:
            first = (await daemon.client.post("/jobs/noop", json={})).json()
            [done] = await stream.until(_finished(first["id"]))
        assert done.data is not None and done.data["status"] == "completed"
        second = (await daemon.client.post("/jobs/noop", json={})).json()
        await daemon.wait_for_status(second["id"], "completed")
        # Resuming after the first job's last event replays the second one's, in order.
        async with open_stream(daemon.client, "/events",
                               {"Last-Event-ID": str(done.id)}) as stream:
            frames = await stream.until(_finished(second["id"]))
        assert [frame.event for frame in frames] == ["created", "started", "finished"]
        assert all(frame.data is not None and frame.data["id"] == second["id"]
                   for frame in frames)


async def test_bad_filters_are_422_problems(database_url: str, state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        for url, headers in [("/events?status=done", {}), ("/events?kind=nope", {}),
                             ("/events?job=x", {}), ("/events?job=0", {}),
                             ("/events", {"Last-Event-ID": "abc"}),
                             ("/jobs/1/events?status=bogus", {})]:
            response = await daemon.client.get(url, headers=headers)
            assert response.status_code == 422, url
            assert response.headers["content-type"] == "application/problem+json"
        missing = await daemon.client.get("/jobs/999/events")
        assert missing.status_code == 404


async def test_a_jobs_stream_replays_its_history_and_closes_at_the_end(
        database_url: str, state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job = (await daemon.client.post("/jobs/noop", json={})).json()
        await daemon.wait_for_status(job["id"], "completed")
        async with open_stream(daemon.client, f"/jobs/{job['id']}/events") as stream:
            frames = await stream.until(_finished(job["id"]))
            try:
                extra = await stream.next(timeout=5)
            except StopAsyncIteration:
                extra = None
        assert [frame.event for frame in frames] == ["created", "started", "finished"]
        assert extra is None  # the server closed the stream after the terminal event
        # A running job's stream follows it live until it ends.
        job = (await daemon.client.post("/jobs/sleep", json={"seconds": 1})).json()
        async with open_stream(daemon.client, f"/jobs/{job['id']}/events") as stream:
            frames = await stream.until(_finished(job["id"]))
        assert frames[-1].data is not None and frames[-1].data["status"] == "completed"


async def test_open_streams_are_capped_and_given_back(database_url: str,
                                                      state_dir: Path) -> None:
    settings = make_settings(database_url, state_dir,
                             sections={EVENTS_SECTION.name: EventSettings(max_streams=1)})
    async with run_daemon(settings) as daemon:
        hub = daemon.services.events
        assert hub is not None
        async with open_stream(daemon.client, "/events") as stream:
            await stream.next()  # the retry: frame means the stream is subscribed
            refused = await daemon.client.get("/events")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"]
            assert refused.headers["content-type"] == "application/problem+json"
        # The client went away: its subscription goes with its request.
        with trio.fail_after(10):
            while hub.streams:  # noqa: ASYNC110 - the request task ends in hypercorn
                await trio.sleep(0.01)
        async with open_stream(daemon.client, "/events"):
            pass


def test_a_slow_stream_is_closed_not_waited_for() -> None:
    hub = EventHub(db=None, settings=EventSettings(stream_buffer=2),  # type: ignore[arg-type]
                   progress=ChangeFeed())
    hub.running = True
    slow = hub.subscribe(EventFilter())
    fast = hub.subscribe(EventFilter())
    job = {"id": 1, "kind": "noop", "status": "queued"}
    for number in range(1, 4):
        hub._deliver(JobEvent(number, "created", job, now()))
        if number <= 2:
            fast.receive.receive_nowait()
    assert slow.overflowed and hub.streams == 1  # the third event found its buffer full
    assert not fast.overflowed
    assert [slow.receive.receive_nowait().id for _ in range(2)] == [1, 2]


def _env(database_url: str, state_dir: Path) -> dict[str, str]:
    return {"NURSERYD_DATABASE_URL": database_url, "NURSERYD_STATE_DIR": str(state_dir),
            "NURSERYD_SHUTDOWN_GRACE": "0"}


async def test_resume_across_a_daemon_restart_misses_no_status_change(
        database_url: str, state_dir: Path) -> None:
    env = _env(database_url, state_dir)
    async with DaemonProcess.start(env) as daemon, daemon.client() as client:
        job = (await client.post("/jobs/sleep", json={"seconds": 3})).json()
        async with open_stream(client, f"/jobs/{job['id']}/events") as stream:
            seen = await stream.until(lambda frame: frame.event == "started")
        last_id = seen[-1].id
        # Stopped mid-job: the interrupt (back to queued) happens while no client listens.
        daemon.send_signal(15)
        assert await daemon.wait() == 0
    async with DaemonProcess.start(env) as again, again.client() as client:
        async with open_stream(client, f"/jobs/{job['id']}/events",
                               {"Last-Event-ID": str(last_id)}) as stream:
            frames = await stream.until(_finished(job["id"]), timeout=30)
    statuses = [(frame.event, frame.data["status"]) for frame in frames
                if frame.event != "progress" and frame.data is not None]
    assert statuses == [("requeued", "queued"), ("started", "running"),
                        ("finished", "completed")]


async def test_a_change_by_another_daemon_reaches_the_stream(database_url: str,
                                                              state_dir: Path) -> None:
    other_state = state_dir / "other"
    other_state.mkdir()
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        hub = daemon.services.events
        assert hub is not None
        async with open_stream(daemon.client, "/events") as stream:
            async with DaemonProcess.start(_env(database_url, other_state)) as other, \
                    other.client() as client:
                assert hub.listening
                job = (await client.post("/jobs/noop", json={})).json()
                frames = await stream.until(_finished(job["id"]))
        assert [frame.event for frame in frames] == ["created", "started", "finished"]


async def test_heartbeats_and_the_poll_fallback_without_listen(
        database_url: str, state_dir: Path, monkeypatch: Any) -> None:
    from nurseryd.db import events as event_log

    @asynccontextmanager
    async def no_listen(*_: Any) -> AsyncIterator[Any]:
        raise OSError("LISTEN is not available here")
        yield  # pragma: no cover

    monkeypatch.setattr(event_log, "listen", no_listen)
    settings = make_settings(database_url, state_dir, sections={EVENTS_SECTION.name: EventSettings(
        heartbeat_s=0.2, poll_interval_s=0.1)})
    async with run_daemon(settings) as daemon:
        hub = daemon.services.events
        assert hub is not None
        async with open_stream(daemon.client, "/events") as stream:
            assert (await stream.next()).comment == "connected"
            assert (await stream.next()).comment == "heartbeat"
            assert not hub.listening
            job = (await daemon.client.post("/jobs/noop", json={})).json()
            frames = await stream.until(_finished(job["id"]))
        assert [frame.event for frame in frames] == ["created", "started", "finished"]


async def test_a_retried_jobs_stream_follows_the_new_attempt(database_url: str,
                                                             state_dir: Path) -> None:
    async with run_daemon(make_settings(database_url, state_dir)) as daemon:
        job = (await daemon.client.post("/jobs/sleep?timeout_s=0.2",
                                        json={"seconds": 5})).json()
        await daemon.wait_for_status(job["id"], "timed_out")
        assert (await daemon.client.post(f"/jobs/{job['id']}/retry")).status_code == 202
        async with open_stream(daemon.client, f"/jobs/{job['id']}/events") as stream:
            frames = await stream.until(
                lambda frame: frame.event == "finished" and frame.data["attempts"] == 2)
        names = [frame.event for frame in frames if frame.event != "progress"]
        assert names == ["created", "started", "finished", "retried", "started", "finished"]
