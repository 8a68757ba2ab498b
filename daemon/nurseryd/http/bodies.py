"""A cap on the body bytes a request may buffer, decided by its route before any
handler runs.

Why: Quart buffers what the client sends until a handler reads it, and with no
global ``MAX_CONTENT_LENGTH`` (which would refuse uploads by their
``Content-Length``) a body that no handler reads was kept whole: 1.35 GB sent
to ``POST /jobs/{id}/cancel`` stayed in the daemon's memory. Quart's own cap is
per request (``max_content_length`` of the request's body buffer), so the app's
request class sets it from the path: uploads, which stream their body to disk
with their own byte cap (``uploads.py``), are left uncapped here; every other
route gets :data:`BUFFER_CAP`. Past the cap the buffer drops what arrives and a
read answers 413, so an unread body costs at most the cap.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from quart_trio.wrappers.request import TrioRequest

#: Bytes a non-upload request may buffer: above the 1 MiB JSON cap (``jobs.read_body``
#: answers that one with its own detail), far below anything that hurts.
BUFFER_CAP = 2 * 1024 * 1024


def bounded_request_class(streamed_paths: Iterable[str],
                          cap: int = BUFFER_CAP) -> type[TrioRequest]:
    """A request class whose body buffer is capped at ``cap`` except on
    ``streamed_paths`` (exact paths: uploads have no variable parts)."""
    streamed = frozenset(streamed_paths)

    class BoundedRequest(TrioRequest):
        def __init__(self, method: str, scheme: str, path: str, *args: Any,
                     max_content_length: int | None = None, **kwargs: Any) -> None:
            limit = max_content_length if path in streamed else cap
            super().__init__(method, scheme, path, *args, max_content_length=limit, **kwargs)

    return BoundedRequest
