"""The one access check of the API: a ``before_request`` hook around :func:`decide`.

Every request passes here before its handler (and before routing errors are
answered, so an unknown path without a token is a 401 like any other: a caller
who has not proven who it is learns nothing about routes). This module only
copies the request's facts out (:func:`facts_of`), asks the pure
:func:`~.access_policy.decide`, and either raises the refusal (the error table in
``errors.py`` answers it) or keeps the caller's :class:`~nurseryd.credentials.Principal`
for the handler: jobs record its name as ``submitted_by`` / ``cancelled_by``.

A route that needs other rules says so with :func:`route_rules` on its view
function: ``/healthz`` and ``/readyz`` are public, ``/metrics`` has its own
token, uploads take ``multipart/form-data``, the dashboard's page and sign-in
need no credential. The dashboard's session cookie is resolved here
(``sessions.py``) and judged by ``decide()`` like a token.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import TypeVar

from quart import Response, current_app, g, request
from quart_trio import QuartTrio

from ..config import Settings
from ..credentials import Principal
from .access_policy import JSON, RequestFacts, RouteAccess, RouteRules, decide
from .sessions import session_principal

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., object])
_RULES_ATTRIBUTE = "nurseryd_route_rules"
_DEFAULT_RULES = RouteRules()
#: A request carrying one of these came through a proxy: its loopback peer is the
#: proxy, not the caller, so protected mode does not serve it without a token.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def route_rules(access: RouteAccess = RouteAccess.API, body_type: str = JSON) -> Callable[[F], F]:
    """Mark a view function with the access rules it needs (default: API, JSON bodies)."""
    rules = RouteRules(access, body_type)

    def mark(view: F) -> F:
        setattr(view, _RULES_ATTRIBUTE, rules)
        return view

    return mark


def streamed_paths(app: QuartTrio) -> list[str]:
    """The paths of routes marked as taking multipart bodies: uploads, which stream
    to disk and so need no cap on what they buffer (see bodies.py)."""
    paths = []
    for rule in app.url_map.iter_rules():
        rules = getattr(app.view_functions.get(rule.endpoint), _RULES_ATTRIBUTE, _DEFAULT_RULES)
        if rules.body_type != JSON:
            paths.append(rule.rule)
    return paths


def caller() -> Principal | None:
    """Who the current request acts for (``None`` on public routes)."""
    principal: Principal | None = g.get("nurseryd_principal")
    return principal


def caller_name() -> str | None:
    principal = caller()
    return None if principal is None else principal.name


def caller_is_admin() -> bool:
    principal = caller()
    return principal is not None and principal.is_admin


def _peer_is_loopback() -> bool:
    client = request.scope.get("client")
    if not client:
        return False
    try:
        peer = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if not peer.is_loopback:
        return False
    return not any(name in request.headers for name in PROXY_HEADERS)


def facts_of() -> RequestFacts:
    """The current request, as :func:`decide` sees it."""
    headers = request.headers
    has_body = bool(request.content_length) or "transfer-encoding" in headers
    return RequestFacts(
        method=request.method,
        host=headers.get("host"),
        origin=headers.get("origin"),
        fetch_site=headers.get("sec-fetch-site"),
        authorization=headers.get("authorization"),
        content_type=headers.get("content-type"),
        has_body=has_body,
        from_loopback=_peer_is_loopback(),
        session=session_principal(),
    )


def _rules() -> RouteRules:
    endpoint = request.endpoint
    view = current_app.view_functions.get(endpoint) if endpoint else None
    rules: RouteRules = getattr(view, _RULES_ATTRIBUTE, _DEFAULT_RULES)
    return rules


#: On every answer: no MIME sniffing of JSON into something a browser runs, and job
#: data (params, results, rejects) kept out of shared and browser caches.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def install_access(app: QuartTrio, settings: Settings) -> None:
    """Check every request before its handler runs; harden every answer."""
    access = settings.access
    metrics_token_set = settings.metrics_token is not None

    @app.before_request
    async def _check_access() -> None:
        verdict = decide(facts_of(), _rules(), access, metrics_token_set=metrics_token_set)
        if verdict.refused is not None:
            log.debug("refused %s %s: %s", request.method, request.path,
                      type(verdict.refused).__name__)
            raise verdict.refused
        g.nurseryd_principal = verdict.principal

    @app.after_request
    async def _harden(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if body_left_unread():
            response.headers["Connection"] = "close"
        return response


def body_left_unread() -> bool:
    """Did the answer go out before the request's body had arrived?

    Then the connection must close: hypercorn stops reading a connection whose
    app no longer takes its body, so the next request on it (a client's
    keep-alive reuse) would wait forever (measured: a 300 KB body refused with
    401, then the same connection's next GET hung). Refusals, 405s and handlers
    that take no body (cancel) all answer before reading."""
    if not (request.content_length or "transfer-encoding" in request.headers):
        return False
    complete = getattr(request.body, "_complete", None)
    return complete is None or not complete.is_set()
