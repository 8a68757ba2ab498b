"""The wire format between a source's child process and the daemon.

The children: the Excel parser and the database reader.

Each frame is ``kind (1 byte) | length (4 bytes, big endian) | body``. Control
frames carry JSON; a batch frame carries a :class:`~.base.SourceBatch`, the one
batch type: a JSON meta block (its counts, rejects and position) followed by the
COPY text of its rows, so the daemon forwards row data to PostgreSQL without
decoding it (and never unpickles anything a parser of hostile files produced).
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from ..coerce import RejectRecord
from .base import SourceBatch

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

INFO = b"I"  # {"reader", "sheet", "estimated_rows", "date1904"}
HEADER = b"H"  # {"columns": [...], "ignored": [...], "header_row": n}
TOTAL = b"T"  # {"total": data rows expected}
BATCH = b"B"  # a SourceBatch: meta {"position", "rows_seen", "written", "rejects"} + payload
ERROR = b"E"  # {"reason", "kind"}
DONE = b"D"  # {"last_row"}; the Excel child adds {"slices": {"arrow": n, "rows": m}}
PLAN = b"P"  # the database reader's key ranges: {"shards": [{"after", "rows", "until"}, ...]}

_HEAD = struct.Struct(">cI")
_META = struct.Struct(">I")
HEAD_SIZE = _HEAD.size
#: A frame larger than this is a protocol error (a batch of 5000 wide rows is ~2 MB).
MAX_FRAME = 256 * 1024**2
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1024 * 1024


def encode(kind: bytes, value: Any) -> bytes:
    body = json.dumps(value, ensure_ascii=False).encode("utf-8")
    return _HEAD.pack(kind, len(body)) + body


def encode_batch(batch: SourceBatch) -> list[Buffer]:
    """A batch frame as pieces, the payload among them as it is (any bytes-like
    object: bytes, a memoryview, a pyarrow Buffer), never copied: the child's
    largest object is written from where it was built (:meth:`Output.write`)."""
    meta = {"position": batch.position, "rows_seen": batch.rows_seen, "written": batch.written,
            "rejects": [[r.row_number, r.column, r.reason, r.raw] for r in batch.rejects]}
    meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    payload: Buffer = batch.payload
    length = _META.size + len(meta_bytes) + memoryview(payload).nbytes
    return [_HEAD.pack(BATCH, length), _META.pack(len(meta_bytes)), meta_bytes, payload]


def decode_head(data: Buffer) -> tuple[bytes, int]:
    kind, length = _HEAD.unpack(bytes(memoryview(data)[:HEAD_SIZE]))
    if length > MAX_FRAME:
        raise ValueError(f"parser sent a frame of {length} bytes")
    return kind, length


class FrameBuffer:
    """Frames out of a child's output as its bytes arrive, with no I/O in it (as
    h11 does it: feed the bytes read, take the frames complete so far). Both
    parser children's readers use it, one frame at a time, so a frame is handled
    (and its batch sent on, with back-pressure) before the next is cut out.

    Each byte is copied once, from the chunk read into the body of its frame,
    which is allocated at its full length as soon as its head is known: no
    growing buffer (whose reallocations briefly hold two copies of a batch), no
    copy of the body out of it, no shifting of the rest down after each frame.
    """

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()  # fed, not yet cut into a frame
        self._head = bytearray()  # the head of the next frame, as far as it came
        self._kind = b""
        self._body: bytearray | None = None  # the frame being filled, once its head is known
        self._filled = 0

    def feed(self, data: Buffer) -> None:
        """Bytes read from the child (kept by reference until cut: do not change them)."""
        view = memoryview(data).cast("B")
        if view.nbytes:
            self._chunks.append(view)

    def _take(self, into: bytearray, start: int, wanted: int) -> int:
        """Copies up to ``wanted`` fed bytes into ``into[start:]``; returns how many."""
        taken = 0
        while taken < wanted and self._chunks:
            chunk = self._chunks[0]
            size = min(wanted - taken, chunk.nbytes)
            into[start + taken:start + taken + size] = chunk[:size]
            taken += size
            if size == chunk.nbytes:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[size:]
        return taken

    def next_frame(self) -> tuple[bytes, bytearray] | None:
        """The next complete ``(kind, body)``, or ``None`` until more bytes arrive.

        The body is the caller's (no view of this buffer). Raises ``ValueError``
        for a malformed frame head (a frame over MAX_FRAME).
        """
        if self._body is None:
            missing = HEAD_SIZE - len(self._head)
            head = bytearray(missing)
            got = self._take(head, 0, missing)
            self._head += head[:got]
            if len(self._head) < HEAD_SIZE:
                return None
            self._kind, length = decode_head(self._head)
            self._head.clear()
            self._body = bytearray(length)
            self._filled = 0
        body = self._body
        self._filled += self._take(body, self._filled, len(body) - self._filled)
        if self._filled < len(body):
            return None
        self._body = None
        return self._kind, body


def decode_batch(body: bytes | bytearray | memoryview) -> SourceBatch:
    """The batch a frame body carries; its COPY text is a view into ``body``, not a copy."""
    view = memoryview(body)
    (meta_length,) = _META.unpack(bytes(view[:_META.size]))
    meta = json.loads(bytes(view[_META.size:_META.size + meta_length]))
    rejects = [RejectRecord(int(number), column, str(reason), raw if isinstance(raw, dict) else {})
               for number, column, reason, raw in meta["rejects"]]
    return SourceBatch(payload=view[_META.size + meta_length:], written=int(meta["written"]),
                       rows_seen=int(meta["rows_seen"]), rejects=rejects,
                       position=meta["position"])


class Output:
    """Frames to fd 1, written fully (blocking: the pipe is our backpressure)."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        try:
            import fcntl

            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
        except (OSError, ImportError):
            pass  # not a pipe (tests may use a file), or not Linux

    def write(self, *pieces: Buffer) -> None:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view:
                written = os.write(self.fd, view)
                view = view[written:]

    def send(self, kind: bytes, value: Any) -> None:
        self.write(encode(kind, value))
