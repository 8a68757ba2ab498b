"""Streamed multipart uploads to a file, with a byte cap that also holds for chunked bodies.

Why not ``await request.files``: Quart buffers the whole body in memory first,
and its ``MAX_CONTENT_LENGTH`` does not stop a chunked upload without
``Content-Length`` (measured). Here the body is read chunk by chunk from
``request.body``, parsed as multipart on the fly, and the file part is written
to disk as it arrives; the count is checked on every chunk, so memory stays at
one chunk plus a small write buffer and an oversized upload is cut off at the
cap with a 413 and its partial file removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from quart import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header

from .problems import Problem

#: Bytes gathered before one write to disk (one thread hop per write).
WRITE_CHUNK = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 4 * 1024
MAX_PREAMBLE_BYTES = 64 * 1024
#: A client that sends nothing for this long is dropped (slowloris).
IDLE_TIMEOUT_S = 60.0
#: ... and one that trickles: after the grace, the average rate must stay above this
#: (a 200 MiB workbook at this rate still arrives in under four hours).
MIN_RATE_BYTES_S = 16 * 1024
MIN_RATE_GRACE_S = 30.0
#: Uploads received at once; more get 503 with Retry-After (each holds a file and a
#: connection, and its sniff runs in a thread).
MAX_CONCURRENT_UPLOADS = 4
#: Transport padding allowed after a boundary (RFC 2046: linear white space).
MAX_PADDING_BYTES = 1024
#: RFC 2046 section 5.1.1: 1 to 70 of these, not ending in a space.
_BCHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")
_SLOTS_KEY = "nurseryd_uploads_in_flight"


@dataclass
class ReceivedUpload:
    path: Path  # where the file part was written
    size: int = 0
    filename: str | None = None  # the client's name: for display only, never a path
    fields: dict[str, str] = field(default_factory=dict)
    has_file: bool = False


class _Multipart:
    """Incremental multipart/form-data parser (RFC 7578): feed bytes, get events."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary
        # Pretend a CRLF came before the first boundary so one pattern fits all.
        self.buffer = bytearray(b"\r\n")
        self.state = "preamble"
        self.preamble = 0
        self.padding = 0

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        self.buffer += data
        events: list[tuple[str, object]] = []
        keep = len(self.delimiter) + 4
        while True:
            if self.state in ("preamble", "body"):
                index = self.buffer.find(self.delimiter)
                if index < 0:
                    cut = max(len(self.buffer) - keep, 0)
                    if cut:
                        if self.state == "body":
                            events.append(("data", bytes(self.buffer[:cut])))
                        else:
                            self.preamble += cut
                            if self.preamble > MAX_PREAMBLE_BYTES:
                                raise Problem(400, "no multipart boundary found in the body; "
                                              "send multipart/form-data (curl -F file=@x.xlsx)")
                        del self.buffer[:cut]
                    return events
                if self.state == "body":
                    events.append(("data", bytes(self.buffer[:index])))
                    events.append(("end", None))
                del self.buffer[:index + len(self.delimiter)]
                self.state = "after"
            elif self.state == "after":
                # Padding is dropped as it arrives: keeping it and stripping the whole
                # buffer on every feed was quadratic (16 MiB of spaces took 5.8 s).
                padding = len(self.buffer) - len(self.buffer.lstrip(b" \t"))
                if padding:
                    del self.buffer[:padding]
                    self.padding += padding
                    if self.padding > MAX_PADDING_BYTES:
                        raise Problem(400, "malformed multipart body (white space after a "
                                      "boundary goes on and on)")
                if len(self.buffer) < 2:
                    return events
                self.padding = 0
                if self.buffer.startswith(b"--"):
                    self.state = "done"
                    self.buffer.clear()
                    events.append(("done", None))
                    return events
                if not self.buffer.startswith(b"\r\n"):
                    raise Problem(400, "malformed multipart body (no CRLF after a boundary)")
                del self.buffer[:2]
                self.state = "headers"
            elif self.state == "headers":
                index = self.buffer.find(b"\r\n\r\n")
                if index < 0:
                    if len(self.buffer) > MAX_HEADER_BYTES:
                        raise Problem(400, "multipart part headers are too long")
                    return events
                raw = bytes(self.buffer[:index]).decode("utf-8", "replace")
                del self.buffer[:index + 4]
                headers = {}
                for line in raw.split("\r\n"):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                events.append(("part", headers))
                self.state = "body"
            else:  # done: ignore the epilogue
                self.buffer.clear()
                return events


async def receive_upload(
    destination: Path, *, max_bytes: int, file_field: str = "file",
    text_fields: frozenset[str] = frozenset(),
) -> ReceivedUpload:
    """Stream this request's multipart body: the file part to ``destination``.

    Raises :class:`Problem` (413 over ``max_bytes``, 400/415/422 for malformed
    requests); ``destination`` never survives an error.
    """
    mimetype, options = parse_options_header(request.headers.get("Content-Type", ""))
    boundary = options.get("boundary", "")
    if mimetype != "multipart/form-data" or not boundary:
        raise Problem(415, f"expected a multipart/form-data upload with the workbook in field "
                      f"'{file_field}' (curl -F {file_field}=@chats.xlsx ...), got "
                      f"{mimetype or 'no Content-Type'}")
    if not valid_boundary(boundary):
        raise Problem(400, "the multipart boundary is not valid (RFC 2046: 1 to 70 letters, "
                      "digits or '()+_,-./:=? characters, not ending in a space)")
    with _upload_slot():
        return await _receive(destination, boundary, max_bytes=max_bytes,
                              file_field=file_field, text_fields=text_fields)


def valid_boundary(boundary: str) -> bool:
    raw = boundary.encode("latin-1", "replace")
    return 1 <= len(raw) <= 70 and not raw.endswith(b" ") and set(raw) <= _BCHARS


@contextmanager
def _upload_slot() -> Iterator[None]:
    """One of :data:`MAX_CONCURRENT_UPLOADS` places, or 503 at once (no queueing: a
    waiting upload would still hold its connection)."""
    extensions = current_app.extensions
    if extensions.get(_SLOTS_KEY, 0) >= MAX_CONCURRENT_UPLOADS:
        raise Problem(503, f"{MAX_CONCURRENT_UPLOADS} uploads are being received already; "
                      "retry shortly", headers={"Retry-After": "5", "Connection": "close"})
    extensions[_SLOTS_KEY] = extensions.get(_SLOTS_KEY, 0) + 1
    try:
        yield
    finally:
        extensions[_SLOTS_KEY] -= 1


async def _receive(destination: Path, boundary: str, *, max_bytes: int, file_field: str,
                   text_fields: frozenset[str]) -> ReceivedUpload:
    limit_text = f"{max_bytes:,} bytes (migration.max_upload_bytes)"
    length = request.content_length
    if length is not None and length > max_bytes + 64 * 1024:
        raise _too_large(f"the upload is {length:,} bytes; the limit is {limit_text}")

    upload = ReceivedUpload(path=destination)
    parser = _Multipart(boundary.encode("latin-1"))
    current: str | None = None  # "file", a text field name, or "skip"
    field_value = bytearray()
    pending = bytearray()
    body_bytes = 0
    started = trio.current_time()
    try:
        async with await trio.open_file(destination, "wb") as out:
            iterator = request.body.__aiter__()
            while parser.state != "done":
                with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        chunk = None
                    except RequestEntityTooLarge:
                        raise _too_large(f"the upload exceeds {limit_text}") from None
                if idle.cancelled_caught:
                    raise Problem(408, f"no data for {IDLE_TIMEOUT_S:g} s; upload aborted")
                if chunk is None:
                    raise Problem(400, "the body ended before the multipart closing boundary "
                                  "(was the upload interrupted?)")
                body_bytes += len(chunk)
                if body_bytes > max_bytes + 64 * 1024:
                    raise _too_large(f"the upload exceeds {limit_text}")
                elapsed = trio.current_time() - started
                if elapsed > MIN_RATE_GRACE_S and body_bytes < MIN_RATE_BYTES_S * elapsed:
                    raise Problem(408, f"the upload arrives slower than {MIN_RATE_BYTES_S:,} "
                                  "bytes/s; aborted", headers={"Connection": "close"})
                for event, value in parser.feed(chunk):
                    if event == "part":
                        current, filename = _part_kind(value, file_field, text_fields)
                        if current == "file":
                            if upload.has_file:
                                raise Problem(422, f"more than one '{file_field}' part; send "
                                              "one workbook per request", field=file_field)
                            upload.has_file = True
                            upload.filename = filename
                        field_value.clear()
                    elif event == "data" and current == "file":
                        assert isinstance(value, bytes)
                        upload.size += len(value)
                        if upload.size > max_bytes:
                            raise _too_large(f"the file exceeds {limit_text}")
                        pending += value
                        if len(pending) >= WRITE_CHUNK:
                            await out.write(bytes(pending))
                            pending.clear()
                    elif event == "data" and current not in (None, "skip"):
                        assert isinstance(value, bytes)
                        field_value += value
                        if len(field_value) > MAX_FIELD_BYTES:
                            raise Problem(422, f"form field {current!r} is too long",
                                          field=current)
                    elif event == "end" and current not in (None, "file", "skip"):
                        try:
                            upload.fields[current] = field_value.decode("utf-8").strip()
                        except UnicodeDecodeError:
                            raise Problem(422, f"form field {current!r} is not UTF-8",
                                          field=current) from None
            if pending:
                await out.write(bytes(pending))
    except BaseException:
        discard(destination)  # also on cancel (client gone): sync, a few microseconds
        raise
    return upload


def discard(*paths: Path) -> None:
    """Remove files that must not outlive a failed request."""
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _too_large(detail: str) -> Problem:
    # Close the connection: the client is still sending a body we will not read,
    # and a kept-alive connection would leave it blocked on a full socket buffer.
    return Problem(413, detail, headers={"Connection": "close"})


def _part_kind(headers: object, file_field: str,
               text_fields: frozenset[str]) -> tuple[str, str | None]:
    assert isinstance(headers, dict)
    disposition, params = parse_options_header(headers.get("content-disposition", ""))
    name = params.get("name")
    if disposition != "form-data" or not name:
        raise Problem(400, "a multipart part lacks Content-Disposition: form-data; name=...")
    if name == file_field:
        return "file", params.get("filename")
    if name in text_fields:
        return name, None
    allowed = ", ".join(sorted({file_field, *text_fields}))
    raise Problem(422, f"unknown form field {name!r}; allowed: {allowed}", field=name)
