"""RFC 9457 problem details: every error the API returns is one of these.

Handlers raise :class:`Problem` (or an error of :mod:`nurseryd.errors`, which
``errors.py`` maps to one through its table); the app's one error handler turns
it into an ``application/problem+json`` response. ``detail`` always says what was wrong
*and* how to fix it, because it is the only thing a curl user reads.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from quart import Response

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An HTTP error with a JSON body; raise it from any handler."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra

    def to_response(self) -> Response:
        body = {"type": "about:blank", "title": self.title, "status": self.status,
                "detail": self.detail, **self.extra}
        return Response(
            json.dumps(body, default=str), status=self.status, headers=self.headers,
            content_type=PROBLEM_JSON,
        )
