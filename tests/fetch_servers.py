"""Local HTTP servers for the fetch tests and benchmark: real sockets on 127.0.0.1.

A tiny HTTP/1.1 server on Trio sockets and h11 (the parser httpx itself uses),
with keep-alive. Each path maps to an async handler that gets the
:class:`Request` and returns a :class:`Reply`, or ``None`` to drop the connection.
Handlers can hang (``await request.wait_closed()``) to play a server that never
answers; the server records every request, so tests assert on what the client
really sent (validators, retry timing) rather than on our own code's view.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    at: float
    stream: trio.SocketStream = field(repr=False)

    async def wait_closed(self) -> None:
        """Return when the client closes the connection (what a hung server sees)."""
        while True:
            try:
                if not await self.stream.receive_some(4096):
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


@dataclass
class Reply:
    status: int = 200
    body: bytes | Callable[[], AsyncIterator[bytes]] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = "application/json"
    #: Leave out Content-Length (the body is then sent chunked).
    chunked: bool = False


Handler = Callable[[Request], Awaitable[Reply | None]]


def json_reply(value: object, **kwargs: object) -> Reply:
    return Reply(body=json.dumps(value).encode(), **kwargs)  # type: ignore[arg-type]


class LocalServer:
    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        #: Serves every path without a route (404 when unset).
        self.fallback: Handler | None = None
        self.requests: list[Request] = []
        self.port = 0
        #: Connections whose client went away before a reply (hung handlers).
        self.abandoned = 0
        self.abandoned_event = trio.Event()
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (no polling) until ``predicate()`` holds after a request or a hang-up."""
        while not predicate():
            await self._changed.wait()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests_to(self, path: str) -> list[Request]:
        return [request for request in self.requests if request.path == path]

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def static(self, path: str, reply: Reply) -> str:
        async def handler(request: Request) -> Reply:
            return reply

        return self.route(path, handler)

    async def _serve(self, stream: trio.SocketStream) -> None:
        """Requests on one connection, kept alive like a real server's."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._receive(conn, stream)
                if request is None:
                    return
                handler = self.routes.get(request.path, self.fallback)
                reply = await handler(request) if handler else Reply(404, b'{"error":"no route"}')
                if reply is None:
                    self.abandoned += 1
                    self.abandoned_event.set()
                    self._notify()
                    return
                await self._send(conn, stream, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _receive(self, conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
        """The next whole request, or ``None`` when the client closed the connection."""
        request: Request | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return None
            elif isinstance(event, h11.Request):
                target = event.target.decode()
                path, _, query = target.partition("?")
                request = Request(
                    method=event.method.decode(), path=path, query=query,
                    headers={k.decode().lower(): v.decode() for k, v in event.headers},
                    at=trio.current_time(), stream=stream,
                )
                self.requests.append(request)
                self._notify()
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, reply: Reply) -> None:
        headers = list(reply.headers)
        if reply.content_type:
            headers.append(("Content-Type", reply.content_type))
        body = reply.body
        if isinstance(body, bytes) and not reply.chunked:
            headers.append(("Content-Length", str(len(body))))
        await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
        if isinstance(body, bytes):
            if body:
                await stream.send_all(conn.send(h11.Data(data=body)))
        else:
            async for chunk in body():
                await stream.send_all(conn.send(h11.Data(data=chunk)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


@asynccontextmanager
async def open_local_server() -> AsyncIterator[LocalServer]:
    """Serve on 127.0.0.1 (a free port) until the block ends."""
    server = LocalServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server._serve, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def hang(request: Request) -> None:
    """A handler for a server that accepts the request and never answers."""
    await request.wait_closed()
    return None
