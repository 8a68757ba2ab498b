"""The operator's dashboard at ``/`` and its sign-in at ``/session``.

Why three static files and no template: the page is the same for everyone (what
it shows comes from the API it calls, under the caller's own access), so it is
read once from the package and served as is. Script and style are separate files
so the page can carry a Content-Security-Policy without ``'unsafe-inline'``: an
injected ``<script>`` or ``onclick=`` in job data would not run even if some
rendering bug let it into the DOM (the script only ever sets ``textContent``).

The page and sign-in pass the Host and cross-site checks but need no credential
(``RouteAccess.SIGN_IN``): they are how a browser gets one. Everything the page
shows comes from the API under the session's (or protected mode's) principal,
including ``/dashboard/options`` (an ordinary read route): the names its import
forms offer, since nothing else in the API lists the configured sources.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from quart import Blueprint, Response, request

from ..credentials import Principal
from ..errors import NotAuthenticated
from ..kinds.migrate.source_config import database_sources, sheets_config
from ..kinds.migrate.targets import configured_targets, migration_settings
from .access import caller, route_rules
from .access_policy import JSON, RouteAccess, media_type
from .context import get_services
from .jobs import json_response, read_body, read_json_object
from .problems import Problem
from .sessions import COOKIE_NAME, store

log = logging.getLogger(__name__)
blueprint = Blueprint("dashboard", __name__)

FORM = "application/x-www-form-urlencoded"
#: No inline script or style, nothing from elsewhere, never framed (clickjacking on
#: the cancel button), forms only back to this daemon.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'")
_STATIC = resources.files("nurseryd.http") / "static"


def _asset(name: str) -> bytes:
    return (_STATIC / name).read_bytes()


_PAGE = _asset("dashboard.html")
_SCRIPT = _asset("dashboard.js")
_STYLE = _asset("dashboard.css")


def _static(body: bytes, content_type: str) -> Response:
    response = Response(body, content_type=content_type)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@blueprint.get("/")
@route_rules(RouteAccess.SIGN_IN)
async def page() -> Response:
    return _static(_PAGE, "text/html; charset=utf-8")


@blueprint.get("/dashboard.js")
@route_rules(RouteAccess.SIGN_IN)
async def script() -> Response:
    return _static(_SCRIPT, "text/javascript; charset=utf-8")


@blueprint.get("/dashboard.css")
@route_rules(RouteAccess.SIGN_IN)
async def style() -> Response:
    return _static(_STYLE, "text/css; charset=utf-8")


def _who(principal: Principal) -> dict[str, Any]:
    return {"name": principal.name, "role": principal.role.value, "via": principal.via,
            "protected_mode": get_services().settings.access.protected_mode}


@blueprint.get("/session")
async def whoami() -> Response:
    """Who the page acts for: the session's principal, a bearer token's, or ``local``
    in protected mode; 401 (the page then asks for a token) otherwise."""
    principal = caller()
    assert principal is not None  # an API route: access has decided
    return json_response(_who(principal))


@blueprint.get("/dashboard/options")
async def options() -> Response:
    """The names the import forms offer, read from the config file.

    Names only: a database source's URL carries its password and a spreadsheet's
    id is what the allow-list guards, so neither leaves the daemon; the import
    routes take these names and look the rest up themselves. Any caller who may
    read sees them (the forms are hidden from a read token, the names are not secret).
    """
    settings = get_services().settings
    sheets = sheets_config(settings)
    return json_response({
        "targets": sorted(configured_targets(settings)),
        "default_target": migration_settings(settings).default_target,
        "database_sources": sorted(database_sources(settings)),
        "spreadsheets": sorted(sheets.spreadsheets) if sheets.configured else [],
        "google_sheets": sheets.configured,
    })


async def _presented_token() -> tuple[str, bool]:
    """The ``token`` field of a JSON or form body, and whether it came as a form."""
    kind = media_type(request.headers.get("content-type"))
    if kind == FORM:
        raw = await read_body()
        try:
            fields = parse_qs(raw.decode("utf-8"), max_num_fields=10, strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            raise Problem(400, "the form is not valid UTF-8 url-encoded fields; send "
                          "token=<token>") from None
        values = fields.get("token", [])
        token: Any = values[0] if len(values) == 1 else None
        as_form = True
    elif kind in (JSON, ""):
        token = (await read_json_object()).get("token")
        as_form = False
    else:
        raise Problem(415, "send the token as JSON ({\"token\": \"…\"}, Content-Type: "
                      f"application/json) or as a form ({FORM})")
    if not isinstance(token, str) or not token.strip():
        raise Problem(422, "expected one field 'token' holding an API token",
                      field="token", invalid_params=[{"name": "token",
                                                      "reason": "missing or not a string"}])
    return token.strip(), as_form


@blueprint.post("/session")
@route_rules(RouteAccess.SIGN_IN)
async def sign_in() -> Response:
    """Exchange a token for a session cookie; the token itself is never stored,
    logged or echoed."""
    token, as_form = await _presented_token()
    access = get_services().settings.access
    if access.protected_mode:
        raise Problem(409, "no API token is configured, so there is nothing to sign in with: "
                      "the dashboard serves loopback callers without signing in")
    found = access.identify(token)
    if found is None:
        log.info("dashboard sign-in refused: the token matches none configured")
        raise NotAuthenticated("the token matches none configured; sign in with an API "
                               "token of this daemon", wrong_token=True)
    sessions = store()
    session_id = sessions.create(found.principal)
    log.info("dashboard sign-in as %s (%s)", found.name, found.role.value)
    who = _who(Principal(found.name, found.role, via="cookie"))
    response = Response("", status=303, headers={"Location": "/"}) if as_form \
        else json_response(who)
    response.set_cookie(COOKIE_NAME, session_id, max_age=int(sessions.lifetime_s), path="/",
                        secure=request.scheme == "https", httponly=True, samesite="Strict")
    return response


@blueprint.post("/session/logout")
@route_rules(RouteAccess.SIGN_IN)
async def sign_out() -> Response:
    """Forget the session (if any) and clear the cookie; the same answer either way."""
    store().drop(request.cookies.get(COOKIE_NAME))
    response = Response("", status=204)
    response.delete_cookie(COOKIE_NAME, path="/", secure=request.scheme == "https",
                           httponly=True, samesite="Strict")
    return response
