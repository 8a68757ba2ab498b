"""The dashboard's sign-in: a token exchanged for an HttpOnly session cookie.

Why a random id mapped in memory rather than a signed value: a signed cookie
would need a signing key kept somewhere (one more secret to configure, rotate and
keep out of logs), and could not be revoked before it expires. A random id is a
pointer to nothing outside this process: signing out forgets it at once, a
restart forgets them all (the browser simply asks for the token again), and
the token itself never leaves the sign-in request. The store keeps the id's
SHA-256 only, so even the process memory holds no usable cookie.

The cookie is ``HttpOnly`` (no script, ours or an injected one, reads it),
``SameSite=Strict`` (no cross-site request carries it) and ``Path=/``; ``Secure``
when the request came over HTTPS. SameSite does not separate ports of one host
(``127.0.0.1:8084`` and ``127.0.0.1:9000`` are one *site*), so ``decide()`` also
makes every cookie-authenticated write prove it comes from this origin.

Bounded: at most :data:`MAX_SESSIONS` at once (the oldest is dropped past it),
each for :data:`SESSION_LIFETIME_S`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from quart import current_app, request

from ..credentials import Principal

COOKIE_NAME = "nurseryd_session"
#: Eight hours: a working day at the console, then the token again.
SESSION_LIFETIME_S = 8 * 3600
#: Sign-ins are rare; a flood of them must not grow memory without limit.
MAX_SESSIONS = 1000
_EXTENSION_KEY = "nurseryd.sessions"


@dataclass(frozen=True)
class Session:
    principal: Principal
    expires_at: float


class SessionStore:
    """Session ids (by digest) to principals, oldest first, with expiry."""

    def __init__(self, lifetime_s: float = SESSION_LIFETIME_S,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._lifetime_s = lifetime_s
        self._max = max_sessions

    def create(self, principal: Principal, now: float | None = None) -> str:
        """A new session for ``principal``; returns the cookie value (never stored)."""
        now = time.monotonic() if now is None else now
        session_id = secrets.token_urlsafe(32)
        self._sessions[_digest(session_id)] = Session(
            Principal(principal.name, principal.role, via="cookie"), now + self._lifetime_s)
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session_id

    def resolve(self, session_id: str | None, now: float | None = None) -> Principal | None:
        if not session_id or len(session_id) > 128:
            return None
        now = time.monotonic() if now is None else now
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= now:
            del self._sessions[key]
            return None
        return session.principal

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    @property
    def lifetime_s(self) -> float:
        return self._lifetime_s

    def __len__(self) -> int:
        return len(self._sessions)


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


def store() -> SessionStore:
    """The current app's store (one per app: sessions live as long as the process)."""
    found: SessionStore = current_app.extensions.setdefault(_EXTENSION_KEY, SessionStore())
    return found


def session_principal() -> Principal | None:
    """The principal of the current request's session cookie, if it names a live one."""
    return store().resolve(request.cookies.get(COOKIE_NAME))
