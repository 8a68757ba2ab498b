"""The Excel source: owns the parser child process and relays its frames.

The child (:mod:`.excel_child`) does everything that touches the untrusted file
(zip and dimension checks, parsing, coercion with the sources' one
:class:`~.base.Emitter`) under memory and CPU limits and sends ready COPY text.
This side only reads frames and passes the events on (a batch frame decodes to
the one :class:`~.base.SourceBatch`, its COPY text a view, never parsed), so the
daemon's event loop spends almost nothing per row.

Cancellation: the child runs under ``trio.run_process`` in this task's nursery
with a ``deliver_cancel`` that sends SIGKILL, so cancelling the job (timeout,
``POST /jobs/{id}/cancel``, shutdown) kills the parser at once, also while it
is deep inside python-calamine's load where it cannot notice anything else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..coerce import ColumnSpec
from ..targets import MigrationSettings
from . import framing
from .base import Header, SourceError, SourceEvent, Total

CHILD_MODULE = "nurseryd.kinds.migrate.sources.excel_child"
READ_SIZE = 1024 * 1024
STDERR_KEEP = 8 * 1024


async def _kill(process: trio.Process) -> None:
    process.kill()


def child_command() -> list[str]:
    # -I would drop our package from sys.path when running from a checkout; -s/-E
    # keep the child independent of user site-packages and PYTHON* variables.
    return [sys.executable, "-s", "-m", CHILD_MODULE]


#: The only variables the parser child inherits: it reads an untrusted file and
#: needs no secret of the daemon's (database URLs, API keys, tokens).
CHILD_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def child_env() -> dict[str, str]:
    env = {key: os.environ[key] for key in CHILD_ENV_KEYS if key in os.environ}
    import nurseryd

    package_root = str(Path(nurseryd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root
    # openpyxl would switch to defusedxml when importable: ~30% slower for no
    # gain with expat >= 2.4 (checked in the child).
    env["OPENPYXL_DEFUSEDXML"] = "False"
    # The Arrow fast path: malloc instead of pyarrow's mimalloc/jemalloc pools, whose
    # up-front address-space reservations count against the child's RLIMIT_AS.
    env["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    return env


@dataclass
class ExcelSource:
    path: Path
    sheet: str | None
    settings: MigrationSettings
    source_type: str = "excel"
    facts: dict[str, Any] = field(default_factory=dict)
    #: The parser child's pid while it runs (for logs and tests).
    pid: int | None = None
    #: Set when the child has checked the workbook and started reading it.
    reading: trio.Event = field(default_factory=trio.Event)

    def spec(self, columns: Sequence[ColumnSpec], resume: Any) -> dict[str, Any]:
        return {
            "path": str(self.path), "sheet": self.sheet,
            "columns": [asdict(column) for column in columns],
            "caps": asdict(self.settings.caps), "batch_rows": self.settings.batch_rows,
            "batch_bytes": self.settings.batch_bytes,
            "memory_bytes": self.settings.memory_budget_bytes,
            "cpu_seconds": self.settings.parse_timeout_s,
            "reader": self.settings.reader, "slice_bytes": self.settings.slice_bytes,
            "start_after_row": int(resume) if resume is not None else 0,
        }

    def describe(self) -> dict[str, Any]:
        return dict(self.facts)

    async def run(self, columns: Sequence[ColumnSpec], resume: Any,
                  send: trio.MemorySendChannel[SourceEvent]) -> None:
        if not self.path.is_file():
            raise SourceError(f"the uploaded file {self.path.name} is gone from the state "
                              "directory; upload the workbook again")
        spec = json.dumps(self.spec(columns, resume)).encode()
        state = _RunState()
        with trio.move_on_after(self.settings.parse_timeout_s) as timer:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(partial(
                    trio.run_process, child_command(), stdin=spec, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, check=False, deliver_cancel=_kill,
                    env=child_env()))
                self.pid = process.pid
                nursery.start_soon(_drain_stderr, process, state)
                await self._relay(process, send, state)
                await process.wait()
        if timer.cancelled_caught:
            raise SourceError(f"parsing took longer than {self.settings.parse_timeout_s:g} s "
                              "(migration.parse_timeout_s); the parser was stopped")
        if state.error is not None:
            raise SourceError(state.error)
        if not state.done:
            raise SourceError(self._crash_reason(process.returncode, state))

    def _crash_reason(self, code: int | None, state: _RunState) -> str:
        budget = self.settings.memory_budget_bytes // 1024**2
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            if -code == signal.SIGXCPU:
                return (f"the parser used more than {self.settings.parse_timeout_s:g} s of CPU "
                        "(migration.parse_timeout_s) and was stopped")
            return (f"the parser crashed ({name}) while reading the workbook, most likely at "
                    f"its memory limit of {budget} MiB (migration.memory_budget_mb): the "
                    "sheet is too large or malformed" + _tail(state))
        return f"the parser exited with code {code} before finishing" + _tail(state)

    async def _relay(self, process: trio.Process, send: trio.MemorySendChannel[SourceEvent],
                     state: _RunState) -> None:
        assert process.stdout is not None
        frames = framing.FrameBuffer()
        while data := await process.stdout.receive_some(READ_SIZE):
            frames.feed(data)
            while True:
                try:
                    frame = frames.next_frame()
                except ValueError as error:
                    state.error = f"the parser sent malformed output ({error})"
                    process.kill()
                    return
                if frame is None:
                    break
                await self._handle(*frame, send, state)
                if state.error is not None:
                    return

    async def _handle(self, kind: bytes, body: bytes | bytearray,
                      send: trio.MemorySendChannel[SourceEvent], state: _RunState) -> None:
        if kind == framing.BATCH:
            await send.send(framing.decode_batch(body))
            return
        value = json.loads(body)
        if kind == framing.INFO:
            self.facts.update({"reader": value["reader"], "sheet": value["sheet"],
                               "date1904": value["date1904"]})
            self.reading.set()
        elif kind == framing.TOTAL:
            await send.send(Total(int(value["total"])))
        elif kind == framing.HEADER:
            self.facts["header_row"] = value["header_row"]
            await send.send(Header(tuple(value["columns"]), tuple(value["ignored"])))
        elif kind == framing.ERROR:
            state.error = str(value["reason"])
        elif kind == framing.DONE:
            state.done = True
            if isinstance(value.get("slices"), dict):  # how many slices took which path
                self.facts["slices"] = {str(k): int(v) for k, v in value["slices"].items()}


@dataclass
class _RunState:
    error: str | None = None
    done: bool = False
    stderr: bytearray = field(default_factory=bytearray)


def _tail(state: _RunState) -> str:
    text = state.stderr.decode("utf-8", "replace").strip()
    if not text:
        return ""
    last = text.splitlines()[-1]
    return f" (parser said: {last[:300]})"


async def _drain_stderr(process: trio.Process, state: _RunState) -> None:
    assert process.stderr is not None
    async for chunk in process.stderr:
        state.stderr += chunk
        if len(state.stderr) > STDERR_KEEP:
            del state.stderr[:-STDERR_KEEP]
