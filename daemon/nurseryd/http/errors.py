"""What the client sees for every error: one table, one handler.

Handlers raise; nothing else in ``http/`` decides a status code. :data:`ERROR_TABLE`
maps an error class of :mod:`nurseryd.errors` to its status and to what the
problem body says; :func:`problem_for` walks the raised error's MRO to the first
class listed, so a subclass answers like its parent until it is given a line of
its own. A :class:`Problem` raised by a handler is already an answer.

Besides the table there are only two catch-alls: Quart's own HTTP errors (unknown
route, wrong method, body too large) and the last-resort 500 for anything that
was not raised on purpose.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..errors import (
    BodyTypeRefused,
    CrossSiteRefused,
    DatabaseUnavailable,
    Draining,
    HostNotAllowed,
    JobAlreadyFinished,
    JobConflict,
    JobNotFound,
    JobNotRetryable,
    NotAuthenticated,
    NotPermitted,
    NurserydError,
    ParamError,
    QueueFull,
    UnknownKind,
)
from .problems import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """The parts of a problem body that depend on the error (the status is the table's)."""

    detail: str
    title: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Extra members of the problem body (``known_kinds``, ``invalid_params``, ``job``).
    fields: Mapping[str, Any] = field(default_factory=dict)


def _said(error: Exception) -> Answer:
    return Answer(str(error))


def _invalid_param(error: ParamError) -> Answer:
    return Answer(f"invalid parameter {error.field!r}: {error.message}",
                  title="Invalid parameter",
                  fields={"field": error.field,
                          "invalid_params": [{"name": error.field, "reason": error.message}]})


def _not_authenticated(error: NotAuthenticated) -> Answer:
    # RFC 6750 section 3: a wrong token says so; a missing one only names the scheme.
    challenge = 'Bearer realm="nurseryd"' + (', error="invalid_token"'
                                             if error.wrong_token else "")
    return Answer(str(error), title="Unauthorized", headers={"WWW-Authenticate": challenge})


#: error class -> (HTTP status, what the problem body says about it).
ERROR_TABLE: dict[type[Exception], tuple[int, Callable[[Any], Answer]]] = {
    ParamError: (422, _invalid_param),
    UnknownKind: (404, lambda error: Answer(str(error), fields={"known_kinds": error.known})),
    JobNotFound: (404, lambda error: Answer(f"{error}; list jobs with GET /jobs")),
    JobAlreadyFinished: (409, lambda error: Answer(
        f"{error}; only queued or running jobs can be cancelled", fields={"job": error.job})),
    JobConflict: (409, _said),
    JobNotRetryable: (409, lambda error: Answer(str(error), fields={"job": error.job})),
    Draining: (503, lambda error: Answer(str(error), headers={"Retry-After": "5"})),
    QueueFull: (503, lambda error: Answer(str(error), headers={"Retry-After": "1"})),
    DatabaseUnavailable: (503, lambda error: Answer(str(error), headers={"Retry-After": "5"})),
    NotAuthenticated: (401, _not_authenticated),
    NotPermitted: (403, _said),
    CrossSiteRefused: (403, lambda error: Answer(str(error), title="Cross-site request refused")),
    HostNotAllowed: (421, _said),
    BodyTypeRefused: (415, _said),
}


def problem_for(error: BaseException) -> Problem | None:
    """The answer to ``error``, or ``None`` if neither it nor a parent class is listed."""
    if isinstance(error, Problem):
        return error
    for cls in type(error).__mro__:
        entry = ERROR_TABLE.get(cls)
        if entry is not None:
            status, answer_for = entry
            answer = answer_for(error)
            return Problem(status, answer.detail, title=answer.title,
                           headers=dict(answer.headers), **answer.fields)
    return None


_HTTP_DETAIL = {
    404: "no such endpoint; see docs/api.md for the routes",
    405: "method not allowed on this endpoint; see docs/api.md",
    413: "request body too large",
}


def install_error_handlers(app: QuartTrio) -> None:
    """Every error the app answers is ``application/problem+json``."""

    @app.errorhandler(Problem)
    @app.errorhandler(NurserydError)
    async def _known(error: Exception) -> Response:
        problem = problem_for(error)
        if problem is None:  # raised on purpose, but not for a client (JobFailed, ...)
            return _internal_error(error)
        return problem.to_response()

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        status = error.code or 500
        detail = _HTTP_DETAIL.get(status, error.description or "")
        headers = {}
        if status == 405 and isinstance(error, MethodNotAllowed) and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        return Problem(status, detail, headers=headers).to_response()

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        return _internal_error(error)


class TracebackBudget:
    """At most ``limit`` tracebacks per ``window_s``: a request that fails the same
    way 10,000 times must not write 10,000 tracebacks (one 10-byte request wrote
    4 KB). Past the budget each failure is one line with its reference."""

    def __init__(self, limit: int = 10, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._spent: list[float] = []

    def take(self) -> bool:
        now = self.clock()
        self._spent = [at for at in self._spent if now - at < self.window_s]
        if len(self._spent) >= self.limit:
            return False
        self._spent.append(now)
        return True


_tracebacks = TracebackBudget()


def _internal_error(error: Exception) -> Response:
    """A generic 500 with a reference: exception text (database DETAIL, codec errors)
    can hold row values and internals, so it goes to the log, never to the caller."""
    reference = uuid.uuid4().hex[:12]
    if _tracebacks.take():
        log.error("unhandled error in a request (reference %s)", reference, exc_info=error)
    else:
        log.error("unhandled error in a request (reference %s): %s; traceback left out "
                  "(more than %d in %g s)", reference, type(error).__name__,
                  _tracebacks.limit, _tracebacks.window_s)
    return Problem(500, f"internal error (reference {reference}); the daemon's log has the "
                   "details", error_id=reference).to_response()
